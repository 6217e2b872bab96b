"""Upstream requests built from a parsed operation: target, headers, never the caller's raw URL."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.gcs.operation import Api, Kind, Operation
from proxy.gcs.rawurl import encode_query, encode_segment

# Request headers a caller may send on to Cloud Storage; everything else is dropped.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "cache-control",
        "content-md5",
        "content-range",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-unmodified-since",
        "range",
        "user-agent",
        "x-goog-api-client",
        "x-goog-gcs-idempotency-token",
        "x-goog-encryption-algorithm",
        "x-goog-encryption-key",
        "x-goog-encryption-key-sha256",
        "x-goog-hash",
        "x-upload-content-type",
        "x-upload-content-length",
    }
)
# Response headers never sent back to the caller.
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "alt-svc",
        "server",
        "x-guploader-uploadid",
        "content-length",
        "location",
        "x-goog-upload-url",
        "x-goog-upload-control-url",
    }
)

_API_PATHS: dict[Kind, Api] = {
    Kind.INSERT_MEDIA: Api.UPLOAD,
    Kind.INSERT_MULTIPART: Api.UPLOAD,
}


def upstream_target(operation: Operation) -> str:
    """Encoded path and query for the upstream request."""
    api = _API_PATHS.get(operation.kind, Api.JSON)
    path = f"{api.value}/b/{encode_segment(operation.bucket)}/o"
    if operation.object is not None and api is Api.JSON:
        path += "/" + encode_segment(operation.object)
    params = operation.params
    if operation.kind is Kind.MEDIA:
        params = tuple((k, v) for k, v in params if k != "alt") + (("alt", "media"),)
    if operation.kind is Kind.LIST:
        # Items must keep their names so the response can be filtered.
        params = tuple((k, v) for k, v in params if k != "fields")
    if operation.kind is Kind.INSERT_MULTIPART:
        params = tuple((k, v) for k, v in params if k != "name")
    if operation.user_project is not None:
        params += (("userProject", operation.user_project),)
    query = encode_query(params)
    return f"{path}?{query}" if query else path


def upstream_headers(incoming: Mapping[str, str], token: str) -> dict[str, str]:
    """Allowlisted caller headers plus the sidecar's own token; body headers are set per body."""
    headers = {k: v for k, v in incoming.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
    headers["Authorization"] = f"Bearer {token}"
    return headers


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower() not in DROPPED_RESPONSE_HEADERS}
