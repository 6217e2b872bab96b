"""Resumable-upload session handles: the real upload id sealed for one identity and one object.

A Cloud Storage upload id is a bearer capability: whoever holds it can upload without any
credential. The caller therefore never sees it. It gets an opaque handle, AES-GCM sealed
with a key every worker shares, binding (issuer, subject, bucket, object, upload id, expiry).
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
_NONCE = 12
MAX_HANDLE = 4096


@dataclass(frozen=True)
class UploadSession:
    issuer: str
    subject: str
    bucket: str
    object: str
    upload_id: str
    expires: int


class InvalidSession(BadRequest):
    """The handle is not one this proxy (or a sibling worker) issued, or it has expired."""

    status = 404
    reason = "notFound"


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

    def seal(self, session: UploadSession) -> str:
        nonce = secrets.token_bytes(_NONCE)
        payload = json.dumps(
            [
                session.issuer,
                session.subject,
                session.bucket,
                session.object,
                session.upload_id,
                session.expires,
            ],
            separators=(",", ":"),
        ).encode()
        sealed = nonce + self._aead.encrypt(nonce, payload, _AAD)
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, handle: str, now: float | None = None) -> UploadSession:
        if not handle or len(handle) > MAX_HANDLE:
            raise InvalidSession("no such upload session")
        try:
            raw = base64.b64decode(handle + "=" * (-len(handle) % 4), altchars=b"-_", validate=True)
            payload = json.loads(self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _AAD))
            session = UploadSession(*payload)
        except (binascii.Error, ValueError, InvalidTag, TypeError):
            raise InvalidSession("no such upload session") from None
        if session.expires < (time.time() if now is None else now):
            raise InvalidSession("the upload session has expired")
        return session

    def new(self, issuer: str, subject: str, bucket: str, name: str, upload_id: str) -> str:
        expires = int(time.time()) + SESSION_LIFETIME
        return self.seal(UploadSession(issuer, subject, bucket, name, upload_id, expires))
