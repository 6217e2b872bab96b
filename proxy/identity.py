"""Caller identity: find the token in a request, verify it against the policy's issuers."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import jwt

from proxy.errors import BadRequest, Unauthenticated
from proxy.keys import IssuerKeys, SigningKey
from proxy.policy.model import Identity, Issuer, spellings

MAX_TOKEN_BYTES = 16 * 1024
_CACHE_SIZE = 4096
# A verified token is remembered until its `exp`, and never longer than this: an issuer's
# `exp` years ahead (it signed it) must not outlive a key it has since withdrawn for long.
CACHE_SECONDS = 300.0
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]


class TokenVerifier(Protocol):
    async def verify(self, headers: Mapping[str, str]) -> Identity: ...


@dataclass(frozen=True)
class _Presented:
    token: str
    source: str  # the header it came in
    candidates: tuple[Issuer, ...]


def _single(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of a credential header. Two are refused, not chosen between: a proxy
    in front that appends its own must not decide, by order, who the caller is."""
    getall = getattr(headers, "getall", None)  # a request's multidict; a plain dict has one
    if getall is None:
        return headers.get(name)
    values: list[str] = getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"more than one {name} header")
    return values[0] if values else None


def bearer_token(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def identity_from_claims(issuer: str, claims: Mapping[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthenticated("token has no subject")
    return Identity.of(issuer, sub, claims)


class JwtVerifier:
    """Verifies OIDC ID tokens from the policy's issuers; remembers verified tokens until `exp`."""

    def __init__(self, issuers: Sequence[Issuer], session: aiohttp.ClientSession) -> None:
        self.issuers = tuple(issuers)
        self.keys = {
            i.issuer + "|" + (i.header or ""): IssuerKeys(i, session) for i in self.issuers
        }
        self._headers = sorted({i.header for i in self.issuers if i.header})
        self._cache: OrderedDict[bytes, tuple[Identity, float]] = OrderedDict()

    @property
    def ready(self) -> bool:
        return all(k.fetched for k in self.keys.values())

    def issuer_keys(self, issuer: Issuer) -> IssuerKeys:
        return self.keys[issuer.issuer + "|" + (issuer.header or "")]

    def present(self, headers: Mapping[str, str]) -> _Presented:
        for header in self._headers:
            value = _single(headers, header)
            if value:
                matching = tuple(i for i in self.issuers if i.header == header)
                return _Presented(value.strip(), header, matching)
        authorization = _single(headers, "authorization")
        if not authorization:
            raise Unauthenticated(
                "no identity token: send Authorization: Bearer <ID token>", missing=True
            )
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated(
                "Authorization header must use the Bearer scheme", summary="not a bearer token"
            )
        return _Presented(
            token, "authorization", tuple(i for i in self.issuers if i.header is None)
        )

    async def verify(self, headers: Mapping[str, str]) -> Identity:
        presented = self.present(headers)
        if len(presented.token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("identity token is too large")
        if not presented.token.isascii():  # a JWT is ASCII; aiohttp hands on other bytes
            raise Unauthenticated("identity token is not a JWT")
        cache_key = hashlib.sha256(f"{presented.source}\0{presented.token}".encode()).digest()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        identity, expiry = await self._verify(presented)
        self._remember(cache_key, identity, min(expiry, time.time() + CACHE_SECONDS))
        return identity

    def _remember(self, key: bytes, identity: Identity, expiry: float) -> None:
        self._cache[key] = (identity, expiry)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _verify(self, presented: _Presented) -> tuple[Identity, float]:
        header, unverified = _unverified(presented.token)
        issuer = _issuer_for(presented.candidates, unverified.get("iss"))
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise Unauthenticated(
                f"token algorithm {str(alg)[:16]!r} is not accepted for this issuer"
            )
        kid = header.get("kid")
        keys = await self.issuer_keys(issuer).key_for(kid if isinstance(kid, str) else None)
        # A key that names its algorithm is used for that algorithm only.
        keys = [k for k in keys if k.alg in (None, alg)]
        if not keys:
            raise Unauthenticated("token signing key is not recognised")
        claims = _decode(presented.token, keys, alg, issuer)
        # A cached identity must never outlive its token.
        return identity_from_claims(issuer.issuer, claims), float(claims["exp"])


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        header = jwt.get_unverified_header(token)
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise Unauthenticated("identity token is malformed") from exc
    return header, payload


def _issuer_for(candidates: Sequence[Issuer], iss: object) -> Issuer:
    for issuer in candidates:
        if iss in spellings(issuer.issuer):
            return issuer
    raise Unauthenticated("token issuer is not trusted")


def _decode(token: str, keys: Sequence[SigningKey], alg: str, issuer: Issuer) -> dict[str, Any]:
    error: jwt.PyJWTError | None = None
    for key in keys:
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=list(spellings(issuer.issuer)),
                leeway=issuer.leeway_seconds,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.InvalidSignatureError as exc:
            error = exc
        except jwt.PyJWTError as exc:
            raise _translate(exc) from exc
    raise _translate(error or jwt.InvalidSignatureError())


def _translate(exc: jwt.PyJWTError) -> Unauthenticated:
    messages: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.ExpiredSignatureError, "identity token has expired"),
        (jwt.ImmatureSignatureError, "identity token is not yet valid"),
        (jwt.InvalidAudienceError, "identity token audience does not match"),
        (jwt.InvalidIssuerError, "token issuer is not trusted"),
        (
            jwt.MissingRequiredClaimError,
            f"identity token lacks the {getattr(exc, 'claim', '?')!r} claim",
        ),
        (jwt.InvalidSignatureError, "identity token signature is invalid"),
        (jwt.InvalidAlgorithmError, "token algorithm is not accepted for this issuer"),
    ]
    for kind, message in messages:
        if isinstance(exc, kind):
            return Unauthenticated(message)
    return Unauthenticated("identity token is invalid")
