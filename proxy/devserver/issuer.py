"""A local OIDC issuer: in-memory signing keys, discovery, JWKS and a dev-only token endpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import socket
import time
from dataclasses import dataclass

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

SIGNING_ALGORITHMS = ("RS256", "ES256")
# Never published in the JWKS: minted only so tests can prove a verifier refuses them.
# "HS256" is the classic confusion token, HMAC-keyed with the RSA public key's PEM.
UNSAFE_ALGORITHMS = ("none", "HS256")
JWKS_CACHE_CONTROL = "public, max-age=300"
DEFAULT_LIFETIME = 3600

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    """One private key and the `kid` and JWS algorithm it is published under."""

    kid: str
    alg: str
    private_key: PrivateKey

    @classmethod
    def generate(cls, alg: str) -> SigningKey:
        key: PrivateKey
        if alg == "RS256":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        return cls(kid=secrets.token_hex(20), alg=alg, private_key=key)

    def public_jwk(self) -> dict[str, object]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def stable_subject(email: str) -> str:
    """A 21-digit numeric id derived from `email`, shaped like a Google account's `sub`."""
    digest = int.from_bytes(hashlib.sha256(email.encode()).digest()[:16], "big")
    return "1" + str(digest % 10**20).zfill(20)


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, so the real port of `port=0` is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def serve_socket(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class DevIssuer:
    """An OIDC issuer at `issuer_url` with one RS256 and one ES256 key, both in memory."""

    def __init__(self, issuer_url: str) -> None:
        self.issuer_url = issuer_url.rstrip("/")
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self._keys = self._generate_keys()

    @staticmethod
    def _generate_keys() -> dict[str, SigningKey]:
        return {alg: SigningKey.generate(alg) for alg in SIGNING_ALGORITHMS}

    @property
    def kids(self) -> dict[str, str]:
        """The current `kid` for each algorithm."""
        return {alg: key.kid for alg, key in self._keys.items()}

    def rotate(self) -> None:
        """Replace every key; the old kids vanish from the JWKS at once (no grace period)."""
        self._keys = self._generate_keys()

    def jwks(self) -> dict[str, list[dict[str, object]]]:
        return {"keys": [key.public_jwk() for key in self._keys.values()]}

    def discovery(self) -> dict[str, object]:
        return {
            "issuer": self.issuer_url,
            "jwks_uri": self.issuer_url + "/jwks",
            "token_endpoint": self.issuer_url + "/token",
            "id_token_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "claims_supported": ["iss", "aud", "sub", "iat", "exp", "email", "email_verified"],
        }

    def mint(
        self,
        *,
        audience: str,
        subject: str,
        email: str | None = None,
        email_verified: bool | None = True,
        alg: str = "RS256",
        lifetime: int = DEFAULT_LIFETIME,
        extra: dict[str, object] | None = None,
        kid: str | None = None,
        now: int | None = None,
    ) -> str:
        """A signed ID token; `extra` overrides any claim and `kid` the header's key id.

        `alg` is RS256 or ES256, or one of UNSAFE_ALGORITHMS to craft a token a
        verifier must reject.
        """
        issued_at = int(time.time()) if now is None else now
        claims: dict[str, object] = {
            "iss": self.issuer_url,
            "aud": audience,
            "sub": subject,
            "iat": issued_at,
            "exp": issued_at + lifetime,
        }
        if email is not None:
            claims["email"] = email
            if email_verified is not None:
                claims["email_verified"] = email_verified
        claims.update(extra or {})
        return self._sign(alg, _compact_json(claims), kid)

    def _sign(self, alg: str, payload: bytes, kid: str | None) -> str:
        if alg in UNSAFE_ALGORITHMS:
            return self._sign_unsafe(alg, payload, kid)
        if alg not in self._keys:
            raise ValueError(f"unsupported algorithm {alg!r}")
        key = self._keys[alg]
        headers = {"kid": key.kid if kid is None else kid}
        # PyJWS, not PyJWT: it signs the payload as given, so tests can craft malformed claims.
        return jwt.api_jws.encode(payload, key.private_key, algorithm=alg, headers=headers)

    def _sign_unsafe(self, alg: str, payload: bytes, kid: str | None) -> str:
        rsa_key = self._keys["RS256"]
        header = {"alg": alg, "kid": rsa_key.kid if kid is None else kid, "typ": "JWT"}
        signing_input = f"{_b64(_compact_json(header))}.{_b64(payload)}"
        signature = b""
        if alg == "HS256":
            mac_key = rsa_key.public_pem()
            signature = hmac.new(mac_key, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._handle_discovery)
        app.router.add_get("/jwks", self._handle_jwks)
        app.router.add_post("/token", self._handle_token)
        app.router.add_post("/rotate", self._handle_rotate)
        app.router.add_get("/stats", self._handle_stats)
        return app

    async def _handle_discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        return web.json_response(self.discovery())

    async def _handle_jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response(self.jwks(), headers={"Cache-Control": JWKS_CACHE_CONTROL})

    async def _handle_token(self, request: web.Request) -> web.Response:
        fields = await _token_request_fields(request)
        audience, email = fields.get("audience"), fields.get("email")
        subject = fields.get("sub") or (stable_subject(email) if email else None)
        alg = fields.get("alg", "RS256")
        if not audience or not subject or alg not in SIGNING_ALGORITHMS:
            return _oauth_error("need audience, email or sub, and alg RS256 or ES256")
        token = self.mint(audience=audience, subject=subject, email=email, alg=alg)
        return web.json_response({"id_token": token, "token_type": "Bearer"})

    async def _handle_rotate(self, request: web.Request) -> web.Response:
        # RSA key generation takes tens of milliseconds: keep it off the event loop.
        await asyncio.to_thread(self.rotate)
        return web.json_response({"kids": self.kids})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        stats = {"jwks_fetches": self.jwks_fetches, "discovery_fetches": self.discovery_fetches}
        return web.json_response(stats)


async def _token_request_fields(request: web.Request) -> dict[str, str]:
    """String fields of a JSON or form body; anything unparsable yields no fields."""
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            return {}
        items = body.items() if isinstance(body, dict) else []
    else:
        items = (await request.post()).items()
    return {str(name): value for name, value in items if isinstance(value, str)}


def _oauth_error(description: str) -> web.Response:
    body = {"error": "invalid_request", "error_description": description}
    return web.json_response(body, status=400)


async def serve_issuer(issuer: DevIssuer, host: str, port: int) -> web.AppRunner:
    """Serve `issuer` on host:port; the caller owns the runner and awaits `cleanup()`."""
    runner = web.AppRunner(issuer.app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def start_issuer(host: str = "127.0.0.1", port: int = 0) -> tuple[DevIssuer, web.AppRunner]:
    """Bind first, so an issuer on port 0 knows its own URL before it mints anything."""
    sock = bind_socket(host, port)
    try:
        url = http_url(host, sock.getsockname()[1])
        issuer = await asyncio.to_thread(DevIssuer, url)
    except BaseException:
        sock.close()
        raise
    return issuer, await serve_socket(issuer.app(), sock)
