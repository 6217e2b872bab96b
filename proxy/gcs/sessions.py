"""Handles the caller holds in place of Cloud Storage's own: resumable-upload sessions and
list page tokens, AES-GCM sealed with a key every worker shares.

A Cloud Storage upload id is a bearer capability: whoever holds it can upload without any
credential. The caller therefore never sees it. It gets an opaque handle binding (issuer,
subject, bucket, object, upload id, expiry).

A list's page token names where the next page starts: an object name, which may be one
the caller's grant hides (a denied folder inside a listable prefix). The caller gets it
sealed for (issuer, subject, bucket, the listing's other parameters), and only that
identity's same listing opens it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import BadRequest

SESSION_KEY_ENV = "PROXY_SESSION_KEY"
SESSION_LIFETIME = 7 * 24 * 3600  # Cloud Storage keeps a resumable session for a week
_AAD = b"gcs-iap-proxy/upload-session/v1"
_PAGE_AAD = b"gcs-iap-proxy/page-token/v1"
_NONCE = 12
# A handle must fit a request line (aiohttp: 8190 bytes): an object name of 1,024 UTF-8
# bytes plus an upload id or a page token and the identity come to about 2 KiB sealed.
MAX_HANDLE = 6144
_PAGE_PAD = 2048  # one size for every token a 1,024-byte name can produce


@dataclass(frozen=True)
class UploadSession:
    """What a handle binds. `replaces`: opened without create-only (the caller could
    delete), so its chunks need `delete` still; `privileged`: opened with what needs
    `admin` (an ACL, a retention, a hold, a KMS key), so its chunks need `admin` still.
    A policy that takes either away stops the session, as it stops a new one."""

    issuer: str
    subject: str
    bucket: str
    object: str
    upload_id: str
    expires: int
    replaces: bool = True
    privileged: bool = False


class InvalidSession(BadRequest):
    """The handle is not one this proxy (or a sibling worker) issued, or it has expired."""

    status = 404
    reason = "notFound"


class InvalidPageToken(BadRequest):
    """A pageToken this proxy did not issue to this identity for this bucket."""


def _page_aad(issuer: str, subject: str, bucket: str, listing: str) -> bytes:
    bound = json.dumps([issuer, subject, bucket, listing], separators=(",", ":"))
    return _PAGE_AAD + b"\0" + bound.encode()


def session_key(env: dict[str, str] | None = None) -> bytes:
    """The shared key from PROXY_SESSION_KEY (base64, 32 bytes), or a fresh one for this process tree."""
    value = (env if env is not None else os.environ).get(SESSION_KEY_ENV)
    if not value:
        return secrets.token_bytes(32)
    try:
        key = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{SESSION_KEY_ENV} must be base64") from None
    if len(key) != 32:
        raise ValueError(f"{SESSION_KEY_ENV} must decode to 32 bytes")
    return key


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


class SessionSealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def _seal(self, fields: list[str | int], aad: bytes, pad: int = 1) -> str:
        nonce = secrets.token_bytes(_NONCE)
        payload = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        payload += b" " * (-len(payload) % pad)  # JSON ignores trailing spaces
        sealed = nonce + self._aead.encrypt(nonce, payload, aad)
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def _open(self, handle: str, aad: bytes) -> list[object] | None:
        """The sealed fields, or None for anything this key did not seal with `aad`."""
        if not handle or len(handle) > MAX_HANDLE:
            return None
        try:
            raw = base64.b64decode(handle + "=" * (-len(handle) % 4), altchars=b"-_", validate=True)
            fields = json.loads(self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], aad))
        except (binascii.Error, ValueError, InvalidTag):
            return None
        return fields if isinstance(fields, list) else None

    def seal(self, session: UploadSession) -> str:
        fields: list[str | int] = [
            session.issuer,
            session.subject,
            session.bucket,
            session.object,
            session.upload_id,
            session.expires,
            int(session.replaces),
            int(session.privileged),
        ]
        return self._seal(fields, _AAD)

    def open(self, handle: str, now: float | None = None) -> UploadSession:
        fields = self._open(handle, _AAD)
        # Six fields: a handle from before sessions carried their powers. The defaults: it replaces
        # (its chunks need `delete`: one from a write-only caller starts again), not to be
        # privileged: every caller without `admin` would lose its uploads in flight.
        if fields is None or len(fields) not in (6, 8):
            raise InvalidSession("no such upload session")
        session = UploadSession(*fields[:6], *map(bool, fields[6:]))  # type: ignore[arg-type]
        if session.expires < (time.time() if now is None else now):
            raise InvalidSession("the upload session has expired")
        return session

    def seal_page(self, issuer: str, subject: str, bucket: str, listing: str, token: str) -> str:
        """`token` for one identity's listing of a bucket; `listing` is that listing's other
        parameters (prefix, delimiter, ...): the token continues that listing only.

        Only the token is encrypted, padded to one size: AES-GCM keeps the length, and the
        token's would hint at the hidden name it may point at. What it is bound to is
        authenticated, not encrypted, so no caller-chosen parameter moves the length
        either (a review read a hidden name's length by growing quotaUser)."""
        return self._seal([token], _page_aad(issuer, subject, bucket, listing), _PAGE_PAD)

    def open_page(self, handle: str, issuer: str, subject: str, bucket: str, listing: str) -> str:
        """The upstream page token `handle` seals for exactly this identity and listing."""
        fields = self._open(handle, _page_aad(issuer, subject, bucket, listing))
        if not fields or len(fields) != 1 or not isinstance(fields[0], str):
            raise InvalidPageToken("Invalid page token")
        return fields[0]

    def new(
        self,
        issuer: str,
        subject: str,
        bucket: str,
        name: str,
        upload_id: str,
        *,
        replaces: bool,
        privileged: bool,
    ) -> str:
        expires = int(time.time()) + SESSION_LIFETIME
        return self.seal(
            UploadSession(issuer, subject, bucket, name, upload_id, expires, replaces, privileged)
        )
