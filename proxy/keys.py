"""Issuer signing keys: discovery, JWKS fetching over aiohttp, caching and rate-limited refresh."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from proxy.policy.load import is_loopback_url
from proxy.policy.model import Issuer

log = logging.getLogger(__name__)

UNKNOWN_KID_REFRESH_INTERVAL = 30.0
MAX_DOCUMENT_BYTES = 1 << 20
_MIN_TTL, _MAX_TTL, _DEFAULT_TTL = 300.0, 3600.0, 3600.0


@dataclass(frozen=True)
class SigningKey:
    """A public key and the algorithm its JWK pins it to, if any."""

    key: Any
    alg: str | None


class KeyFetchError(Exception):
    """Keys could not be fetched or parsed; the cache keeps what it had."""


def _acceptable_url(url: str) -> bool:
    return url.startswith("https://") or (url.startswith("http://") and is_loopback_url(url))


def _max_age(cache_control: str | None) -> float:
    for part in (cache_control or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() == "max-age" and value.isdigit():
            return min(max(float(value), _MIN_TTL), _MAX_TTL)
    return _DEFAULT_TTL


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """Signing keys by kid (keys without a kid are stored under their index)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyFetchError("JWKS document has no 'keys' list")
    keys: dict[str, SigningKey] = {}
    for index, data in enumerate(document["keys"]):
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        if data.get("kty") == "oct":  # a symmetric key can never verify a public issuer's token
            continue
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
        alg = data.get("alg")
        keys[str(data.get("kid", f"#{index}"))] = SigningKey(
            key.key, alg if isinstance(alg, str) else None
        )
    if not keys:
        raise KeyFetchError("JWKS document has no usable signing keys")
    return keys


class IssuerKeys:
    """The cached JWKS of one issuer."""

    def __init__(self, issuer: Issuer, session: aiohttp.ClientSession) -> None:
        self.issuer = issuer
        self._session = session
        self._keys: dict[str, SigningKey] = {}
        self._jwks_uri = issuer.jwks_uri
        self._lock = asyncio.Lock()
        self._last_forced = float("-inf")
        self._last_attempt = float("-inf")
        self.ttl = _DEFAULT_TTL
        self.fetched = False
        self.last_error: str | None = None

    def lookup(self, kid: str | None) -> list[SigningKey]:
        if kid is None:
            return list(self._keys.values())
        key = self._keys.get(kid)
        return [key] if key is not None else []

    async def key_for(self, kid: str | None) -> list[SigningKey]:
        """Known keys for `kid`; an unknown kid refreshes at most once per interval."""
        found = self.lookup(kid)
        if found:
            return found
        now = time.monotonic()
        if not self.fetched:
            # Never fetched yet (start-up, or the issuer was down): join or start a fetch.
            if now - self._last_attempt >= 1.0 or self._lock.locked():
                await self.refresh()
            return self.lookup(kid)
        if now - self._last_forced < UNKNOWN_KID_REFRESH_INTERVAL:
            return []
        self._last_forced = now
        await self.refresh()
        return self.lookup(kid)

    async def refresh(self) -> bool:
        """Fetch keys once (single-flight); on failure the old keys stay."""
        if self._lock.locked():
            async with self._lock:
                return self.last_error is None
        async with self._lock:
            self._last_attempt = time.monotonic()
            try:
                self._keys = await self._fetch()
            except KeyFetchError as exc:
                self.last_error = str(exc)
                log.warning("key refresh failed for issuer %s: %s", self.issuer.issuer, exc)
                return False
            self.fetched = True
            self.last_error = None
            return True

    async def _fetch(self) -> dict[str, SigningKey]:
        if self._jwks_uri is None:
            self._jwks_uri = await self._discover()
        document, cache_control = await self._get_json(self._jwks_uri)
        keys = parse_jwks(document)
        self.ttl = _max_age(cache_control)
        return keys

    async def _discover(self) -> str:
        url = self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document, _ = await self._get_json(url)
        if not isinstance(document, dict):
            raise KeyFetchError("discovery document is not a JSON object")
        if document.get("issuer") != self.issuer.issuer:
            raise KeyFetchError("discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _acceptable_url(jwks_uri):
            raise KeyFetchError("discovery document has no acceptable jwks_uri")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with self._session.get(url, timeout=timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise KeyFetchError(f"GET {url}: HTTP {resp.status}")
                body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise KeyFetchError(f"GET {url}: document too large")
                return json.loads(body), resp.headers.get("Cache-Control")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KeyFetchError(f"GET {url}: {exc.__class__.__name__}: {exc}") from exc

    async def keep_fresh(self) -> None:
        """Background task: fetch until it succeeds, then refresh on the cache lifetime."""
        backoff = 1.0
        while True:
            if await self.refresh():
                backoff = 1.0
                await asyncio.sleep(self.ttl)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
