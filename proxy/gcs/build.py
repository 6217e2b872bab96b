"""Upstream requests built from a parsed operation: target, headers, never the caller's raw URL."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import SERVER, BadRequest
from proxy.gcs.headers import FORWARDED_REQUEST_HEADERS, LIST_REQUEST_HEADERS, XML_READ_HEADERS
from proxy.gcs.operation import Api, Kind, Operation
from proxy.gcs.rawurl import encode_query, encode_segment

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
        "set-cookie2",
        "alt-svc",
        "server",
        "x-guploader-uploadid",
        "content-length",
        "location",
        "content-location",  # may name the real upload session, as Location does
        "x-goog-upload-url",
        "x-goog-upload-control-url",
        "x-goog-upload-status",
        # About the sidecar's own credentials and Cloud Storage's own hops and traces, not
        # the caller's: a challenge can name the service account (the sidecar's 401s carry
        # their own).
        "www-authenticate",
        "via",
        "x-cloud-trace-context",
    }
)
_FIXED_PARAMS: dict[Kind, tuple[tuple[str, str], ...]] = {
    Kind.MEDIA: (("alt", "media"),),
    Kind.RESUMABLE_CHUNK: (("uploadType", "resumable"),),
    Kind.RESUMABLE_CANCEL: (("uploadType", "resumable"),),
}
# Parameters the proxy sets itself (from the parsed operation) for these kinds.
_REPLACED_PARAMS: dict[Kind, frozenset[str]] = {
    Kind.MEDIA: frozenset({"alt"}),
    Kind.LIST: frozenset({"fields"}),  # items must keep their names so the list can be filtered
    Kind.INSERT_MULTIPART: frozenset({"name"}),
    Kind.RESUMABLE_START: frozenset({"name"}),
    Kind.RESUMABLE_CHUNK: frozenset({"uploadType", "upload_id", "name"}),
    Kind.RESUMABLE_CANCEL: frozenset({"uploadType", "upload_id", "name"}),
}


def _object_path(bucket: str, name: str) -> str:
    return f"/b/{encode_segment(bucket)}/o/{encode_segment(name)}"


def upstream_path(operation: Operation) -> str:
    bucket, name = operation.bucket, operation.object or ""
    kind = operation.kind
    if kind in {
        Kind.INSERT_MEDIA,
        Kind.INSERT_MULTIPART,
        Kind.RESUMABLE_START,
        Kind.RESUMABLE_CHUNK,
        Kind.RESUMABLE_CANCEL,
    }:
        return f"{Api.UPLOAD.value}/b/{encode_segment(bucket)}/o"
    if kind is Kind.XML_GET:
        return f"/{encode_segment(bucket)}/{encode_segment(name)}"
    if kind is Kind.LIST:
        return f"{Api.JSON.value}/b/{encode_segment(bucket)}/o"
    if kind in {Kind.COPY, Kind.REWRITE}:
        source = operation.sources[0]
        verb = "copyTo" if kind is Kind.COPY else "rewriteTo"
        return f"{Api.JSON.value}{_object_path(source.bucket, source.object)}/{verb}{_object_path(bucket, name)}"
    if kind is Kind.MOVE:
        source = operation.sources[0]
        return (
            f"{Api.JSON.value}{_object_path(bucket, source.object)}/moveTo/o/{encode_segment(name)}"
        )
    suffix = {Kind.COMPOSE: "/compose", Kind.RESTORE: "/restore", Kind.ACL: "/acl"}.get(kind, "")
    if kind is Kind.ACL and operation.acl_entity is not None:
        suffix += "/" + encode_segment(operation.acl_entity)
    return f"{Api.JSON.value}{_object_path(bucket, name)}{suffix}"


def upstream_target(operation: Operation, upload_id: str | None = None) -> str:
    """Encoded path and query for the upstream request."""
    replaced = _REPLACED_PARAMS.get(operation.kind, frozenset())
    params = tuple((k, v) for k, v in operation.params if k not in replaced)
    params += _FIXED_PARAMS.get(operation.kind, ())
    if operation.kind in {Kind.RESUMABLE_START, Kind.RESUMABLE_CHUNK, Kind.RESUMABLE_CANCEL}:
        params += (("name", operation.object or ""),)
    if upload_id is not None:
        params += (("upload_id", upload_id),)
    if operation.user_project is not None:
        params += (("userProject", operation.user_project),)
    query = encode_query(params)
    path = upstream_path(operation)
    return f"{path}?{query}" if query else path


def upstream_headers(
    incoming: CIMultiDictProxy[str], token: str, kind: Kind, *, reads_answer: bool
) -> dict[str, str]:
    """The caller's allowlisted headers plus the sidecar's own token; body headers are set
    per body. Headers the caller's `Connection` names are hop-by-hop (RFC 9110 7.6.1) and
    stay here. A repeated list-valued header is joined into one; any other repeat, in any
    spelling, is 400 rather than a choice between values. `Accept-Encoding` is dropped
    when the sidecar reads the answer itself (a JSON document it rewrites)."""
    allowed = XML_READ_HEADERS if kind is Kind.XML_GET else FORWARDED_REQUEST_HEADERS
    headers: dict[str, str] = {}
    for name, value in incoming.items():
        key = name.lower()
        if key not in allowed:
            continue
        if key not in headers:
            headers[key] = value
        elif key in LIST_REQUEST_HEADERS:
            headers[key] = f"{headers[key]},{value}"
        else:
            raise BadRequest(f"more than one {key} header")
    if "connection" in incoming:
        for option in _options(incoming):
            headers.pop(option, None)
    if reads_answer:
        headers.pop("accept-encoding", None)
    headers["Authorization"] = f"Bearer {token}"
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Cloud Storage's answer headers that reach the caller (its `Server` and any header its
    `Connection` names among the dropped), with the sidecar's own `Server`."""
    dropped = DROPPED_RESPONSE_HEADERS
    if "connection" in upstream:
        dropped = dropped | _options(upstream)
    headers = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in dropped)
    headers["Server"] = SERVER
    return headers


def _options(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """The header names a message's `Connection` header lists, lowercased."""
    return frozenset(
        option.strip().lower()
        for value in headers.getall("connection")
        for option in value.split(",")
    )
