"""The proxy's error hierarchy, rendered once in the GCS JSON error shape.

    ProxyError
    ├── BadRequest             400 invalid
    ├── Unauthenticated        401 required / authError (+ WWW-Authenticate)
    ├── Forbidden              403 forbidden
    │   └── UpstreamForbidden      (Cloud Storage's own 403: its reason, our message)
    ├── NotFound               404 notFound
    ├── MethodNotAllowed       405 methodNotAllowed
    ├── PayloadTooLarge        413 uploadTooLarge
    ├── UnsupportedEncoding    415 unsupportedMediaType (a body coding other than gzip)
    ├── ExpectationFailed      417 expectationFailed
    ├── UpstreamError          502 backendError   (bad or no answer from Cloud Storage)
    │   └── CredentialsRefused                    (a 401 to the proxy's own token)
    ├── Unavailable            503 backendError   (no upstream token, not ready)
    └── UpstreamTimeout        504 gatewayTimeout

Messages are written for the caller: they say what was wrong, never which rule
or which policy file decided, and never echo a credential.
"""

from __future__ import annotations

import json
from typing import ClassVar

from aiohttp import web


class ProxyError(Exception):
    status: ClassVar[int] = 500
    reason: ClassVar[str] = "internalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.summary = message  # what the audit record says was wrong

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, object]:
        return error_body(self.status, self.reason, self.message)


class BadRequest(ProxyError):
    status = 400
    reason = "invalid"


class Unauthenticated(ProxyError):
    """No usable caller identity. `missing` distinguishes "no token" from "bad token"."""

    status = 401
    reason = "authError"

    def __init__(self, message: str, *, missing: bool = False, summary: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing
        self.summary = summary or ("no identity token" if missing else message)

    def headers(self) -> dict[str, str]:
        if self.missing:
            return {"WWW-Authenticate": 'Bearer realm="gcs-iap-proxy"'}
        description = self.message.replace("\\", "").replace('"', "'")
        return {
            "WWW-Authenticate": (
                f'Bearer realm="gcs-iap-proxy", error="invalid_token", '
                f'error_description="{description}"'
            )
        }

    def body(self) -> dict[str, object]:
        reason = "required" if self.missing else self.reason
        return error_body(self.status, reason, self.message)


class Forbidden(ProxyError):
    status = 403
    reason = "forbidden"


class UpstreamForbidden(Forbidden):
    """Cloud Storage refused the proxy's own request (its IAM, a retention policy, a
    requester-pays bucket). Its reason is kept, for clients that act on it; its message is
    not: that names the proxy's service account and project."""

    def __init__(self, upstream_reason: str) -> None:
        super().__init__(f"Cloud Storage refused the request ({upstream_reason})")
        self.upstream_reason = upstream_reason

    def body(self) -> dict[str, object]:
        return error_body(self.status, self.upstream_reason, self.message)


class NotFound(ProxyError):
    status = 404
    reason = "notFound"


class MethodNotAllowed(ProxyError):
    status = 405
    reason = "methodNotAllowed"


class PayloadTooLarge(ProxyError):
    status = 413
    reason = "uploadTooLarge"


class UnsupportedEncoding(ProxyError):
    status = 415
    reason = "unsupportedMediaType"


class ExpectationFailed(ProxyError):
    status = 417
    reason = "expectationFailed"


class UpstreamError(ProxyError):
    status = 502
    reason = "backendError"


class CredentialsRefused(UpstreamError):
    """Cloud Storage answered 401 to the proxy's own token: never the caller's 401."""


class Unavailable(ProxyError):
    status = 503
    reason = "backendError"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "gatewayTimeout"


def error_body(status: int, reason: str, message: str) -> dict[str, object]:
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
    }


# Our answers name the product, not its stack's versions (aiohttp's default `Server`).
SERVER = "gcs-iap-proxy"


def error_response(error: ProxyError) -> web.Response:
    return json_error(error.status, error.body(), error.headers())


def json_error(
    status: int, body: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        charset="UTF-8",
        headers={**(headers or {}), "Server": SERVER},
    )
