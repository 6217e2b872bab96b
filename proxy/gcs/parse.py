"""Parsing a data-port request (method, raw target, headers) into an `Operation`."""

from __future__ import annotations

import re
from collections.abc import Mapping

from proxy.errors import BadRequest, Forbidden, MethodNotAllowed
from proxy.gcs.operation import Api, Kind, Operation, Source
from proxy.gcs.rawurl import RawTarget, check_object_name, parse_target
from proxy.policy.evaluate import Access
from proxy.policy.model import Verb

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_DIGITS = re.compile(r"^[0-9]{1,20}$")  # generations, metagenerations, counts: never negative
_BOOL = frozenset({"true", "false"})
_API_PREFIXES = tuple((api, tuple(api.value[1:].split("/"))) for api in Api)
_RESUMABLE_PATH = ("resumable", "upload", "storage", "v1")
_RESERVED_FIRST_SEGMENTS = frozenset({"storage", "upload", "download", "batch", "resumable"})

_PRECONDITIONS = frozenset(
    {
        "ifGenerationMatch",
        "ifGenerationNotMatch",
        "ifMetagenerationMatch",
        "ifMetagenerationNotMatch",
    }
)
_SOURCE_PRECONDITIONS = frozenset(
    {
        "ifSourceGenerationMatch",
        "ifSourceGenerationNotMatch",
        "ifSourceMetagenerationMatch",
        "ifSourceMetagenerationNotMatch",
    }
)
_COMMON = frozenset({"alt", "prettyPrint", "fields", "userProject", "quotaUser", "projection"})
_UPLOAD = (
    _COMMON
    | _PRECONDITIONS
    | {"uploadType", "name", "contentEncoding", "predefinedAcl", "kmsKeyName"}
)
_COPY = (
    _COMMON
    | _PRECONDITIONS
    | _SOURCE_PRECONDITIONS
    | {
        "sourceGeneration",
        "destinationPredefinedAcl",
        "destinationKmsKeyName",
    }
)
_ALLOWED_PARAMS: dict[Kind, frozenset[str]] = {
    Kind.GET: _COMMON | _PRECONDITIONS | {"generation", "softDeleted"},
    Kind.MEDIA: _COMMON | _PRECONDITIONS | {"generation"},
    Kind.XML_GET: frozenset({"generation", "userProject"}),
    Kind.LIST: _COMMON
    | {
        "prefix",
        "delimiter",
        "maxResults",
        "pageToken",
        "versions",
        "startOffset",
        "endOffset",
        "matchGlob",
        "includeTrailingDelimiter",
        "includeFoldersAsPrefixes",
        "softDeleted",
    },
    Kind.INSERT_MEDIA: _UPLOAD,
    Kind.INSERT_MULTIPART: _UPLOAD,
    Kind.RESUMABLE_START: _UPLOAD,
    Kind.RESUMABLE_CHUNK: frozenset({"uploadType", "upload_id", "name", "userProject"}),
    Kind.RESUMABLE_CANCEL: frozenset({"uploadType", "upload_id", "name", "userProject"}),
    Kind.DELETE: _COMMON | _PRECONDITIONS | {"generation"},
    Kind.PATCH: _COMMON
    | _PRECONDITIONS
    | {"generation", "predefinedAcl", "overrideUnlockedRetention"},
    Kind.UPDATE: _COMMON
    | _PRECONDITIONS
    | {"generation", "predefinedAcl", "overrideUnlockedRetention"},
    Kind.COPY: _COPY,
    Kind.REWRITE: _COPY | {"rewriteToken", "maxBytesRewrittenPerCall"},
    Kind.COMPOSE: _COMMON | _PRECONDITIONS | {"kmsKeyName", "destinationPredefinedAcl"},
    Kind.MOVE: _COMMON | _PRECONDITIONS | _SOURCE_PRECONDITIONS,
    Kind.RESTORE: _COMMON | _PRECONDITIONS | {"generation", "copySourceAcl", "restoreToken"},
    Kind.ACL: frozenset({"generation", "userProject", "prettyPrint", "fields", "alt"}),
}
# Parameters that change who may access an object or how it is protected: need `admin`.
# Every parameter name some request may carry (what logs may name).
KNOWN_PARAMS = frozenset().union(*_ALLOWED_PARAMS.values())
_PRIVILEGED_PARAMS = frozenset(
    {
        "predefinedAcl",
        "destinationPredefinedAcl",
        "kmsKeyName",
        "destinationKmsKeyName",
        "overrideUnlockedRetention",
        "copySourceAcl",
    }
)
_NUMERIC = (
    _PRECONDITIONS
    | _SOURCE_PRECONDITIONS
    | {
        "generation",
        "sourceGeneration",
        "maxResults",
        "maxBytesRewrittenPerCall",
    }
)
_BOOLEAN = frozenset(
    {
        "prettyPrint",
        "versions",
        "includeTrailingDelimiter",
        "includeFoldersAsPrefixes",
        "softDeleted",
        "copySourceAcl",
        "overrideUnlockedRetention",
    }
)
# ACLs are admin material: metadata responses never carry them.
_NO_ACL = frozenset(
    {
        Kind.GET,
        Kind.LIST,
        Kind.PATCH,
        Kind.UPDATE,
        Kind.INSERT_MEDIA,
        Kind.INSERT_MULTIPART,
        Kind.RESUMABLE_START,
        Kind.COPY,
        Kind.REWRITE,
        Kind.MOVE,
        Kind.RESTORE,
    }
)


def parse_request(method: str, raw_target: str, headers: Mapping[str, str]) -> Operation:
    """Parse a data-port request into an operation, or raise a 4xx `ProxyError`."""
    if "x-http-method-override" in headers:
        raise BadRequest("method override is not accepted")
    if "x-goog-upload-protocol" in headers:
        raise BadRequest(
            "the X-Goog-Upload-Protocol upload protocol is not supported; use uploadType="
        )
    target = parse_target(raw_target)
    operation = _route(method, target)
    operation = _check_params(operation, target.query)
    params = tuple(
        (k, v.lower() if k in _BOOLEAN else v)  # clients send True as well as true
        for k, v in target.query.items()
        if k not in {"userProject", "projection"}
    )
    if operation.kind in _NO_ACL:
        params += (("projection", "noAcl"),)
    return operation.evolve(params=params, user_project=_user_project(target.query, headers))


def _user_project(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    from_query = query.get("userProject")
    from_header = headers.get("x-goog-user-project")
    if from_query is not None and from_header is not None and from_query != from_header:
        raise BadRequest("userProject and X-Goog-User-Project disagree")
    return from_query if from_query is not None else from_header


def _check_params(operation: Operation, query: Mapping[str, str]) -> Operation:
    kind = operation.kind
    allowed = _ALLOWED_PARAMS[kind]
    for name, value in query.items():
        if name not in allowed:
            raise BadRequest(f"unsupported query parameter {name!r} for {kind.value}")
        if name in _NUMERIC and not _DIGITS.match(value):
            raise BadRequest(f"query parameter {name!r} must be an integer")
        if name in _BOOLEAN and value.lower() not in _BOOL:
            raise BadRequest(f"query parameter {name!r} must be true or false")
    if query.get("projection", "noAcl") not in {"noAcl", "full"}:
        raise BadRequest("projection must be noAcl or full")
    if kind is Kind.LIST and query.get("alt", "json") != "json":
        raise BadRequest("a listing is only JSON (alt=json)")
    if not _PRIVILEGED_PARAMS & set(query):
        return operation
    # Remembered as well as required now: a body may still rename the object (settle_object).
    operation = operation.evolve(privileged=True)
    if operation.object is None:
        return operation
    return operation.needing(Access(Verb.ADMIN, operation.bucket, operation.object))


def _bucket(name: str) -> str:
    if not _BUCKET.match(name) or ".." in name:
        raise BadRequest(f"invalid bucket name {name[:64]!r}")
    return name


def _route(method: str, target: RawTarget) -> Operation:
    s = target.segments
    if s[: len(_RESUMABLE_PATH)] == _RESUMABLE_PATH:
        # The discovery document's resumable path, which apitools (gsutil, gcloud storage)
        # starts its sessions on: a session start only, forwarded on the upload path.
        if target.query.get("uploadType") != "resumable" or "upload_id" in target.query:
            raise Forbidden("only resumable session starts are permitted on this path")
        return _route_api(Api.UPLOAD, method, s[len(_RESUMABLE_PATH) :], target.query)
    for api, parts in _API_PREFIXES:
        if s[: len(parts)] == parts:
            return _route_api(api, method, s[len(parts) :], target.query)
    if s[0] in _RESERVED_FIRST_SEGMENTS:
        raise Forbidden("this request is not permitted through the proxy")
    return _route_xml(method, s)


def _route_xml(method: str, s: tuple[str, ...]) -> Operation:
    """XML API, path style: GET/HEAD /BUCKET/OBJECT only."""
    if len(s) < 2:
        raise Forbidden("only object reads are permitted on the XML API")
    if method not in {"GET", "HEAD"}:
        raise Forbidden("only object reads are permitted on the XML API")
    bucket, name = _bucket(s[0]), check_object_name("/".join(s[1:]))
    return _object(Kind.XML_GET, method, bucket, name, Verb.READ)


def _route_api(api: Api, method: str, s: tuple[str, ...], query: Mapping[str, str]) -> Operation:
    if len(s) < 3 or s[0] != "b" or s[2] != "o":
        raise Forbidden("only object operations are permitted through the proxy")
    bucket = _bucket(s[1])
    rest = s[3:]
    if api is Api.UPLOAD:
        if rest:
            raise Forbidden("this upload request is not permitted through the proxy")
        return _upload(method, bucket, query)
    if not rest:
        if api is not Api.JSON or method not in {"GET", "HEAD"}:
            raise Forbidden("this request is not permitted through the proxy")
        prefix = query.get("prefix", "")
        return Operation(
            Kind.LIST, "GET", bucket, prefix=prefix, accesses=(Access(Verb.LIST, bucket, prefix),)
        )
    name = check_object_name(rest[0])
    if len(rest) > 1:
        if api is not Api.JSON:
            raise Forbidden("object sub-resources are not permitted on this path")
        return _sub_resource(method, bucket, name, rest[1:])
    if api is Api.DOWNLOAD:
        if method not in {"GET", "HEAD"}:
            raise MethodNotAllowed("downloads accept GET and HEAD only")
        return _object(Kind.MEDIA, method, bucket, name, Verb.READ)
    return _object_method(method, bucket, name, query.get("alt", "json"))


def _object_method(method: str, bucket: str, name: str, alt: str) -> Operation:
    if alt not in {"json", "media"}:
        raise BadRequest("alt must be json or media")
    if method in {"GET", "HEAD"}:
        return _object(Kind.MEDIA if alt == "media" else Kind.GET, method, bucket, name, Verb.READ)
    if alt != "json":
        raise BadRequest("alt=media is only valid for downloads")
    kinds = {
        "DELETE": (Kind.DELETE, Verb.DELETE),
        "PATCH": (Kind.PATCH, Verb.METADATA),
        "PUT": (Kind.UPDATE, Verb.METADATA),
    }
    if method not in kinds:
        raise MethodNotAllowed(f"{method} is not supported on objects")
    kind, verb = kinds[method]
    return _object(kind, method, bucket, name, verb)


def _sub_resource(method: str, bucket: str, name: str, rest: tuple[str, ...]) -> Operation:
    head = rest[0]
    if head in {"copyTo", "rewriteTo"} and len(rest) == 5 and rest[1] == "b" and rest[3] == "o":
        kind = Kind.COPY if head == "copyTo" else Kind.REWRITE
        destination = (_bucket(rest[2]), check_object_name(rest[4]))
        return _copy(kind, method, Source(bucket, name), *destination)
    if head == "moveTo" and len(rest) == 3 and rest[1] == "o":
        operation = _copy(
            Kind.MOVE, method, Source(bucket, name), bucket, check_object_name(rest[2])
        )
        return operation.needing(Access(Verb.DELETE, bucket, name))
    if head == "compose" and len(rest) == 1:
        _require(method, "POST")
        # Sources live in the body: added once it is read.
        return Operation(
            Kind.COMPOSE, "POST", bucket, object=name, accesses=(Access(Verb.WRITE, bucket, name),)
        )
    if head == "restore" and len(rest) == 1:
        _require(method, "POST")
        accesses = (Access(Verb.READ, bucket, name), Access(Verb.WRITE, bucket, name))
        return Operation(Kind.RESTORE, "POST", bucket, object=name, accesses=accesses)
    if head == "acl" and len(rest) <= 2:
        if method not in {"GET", "POST", "PUT", "PATCH", "DELETE"} or (len(rest) == 1) != (
            method in {"GET", "POST"}
        ):
            raise MethodNotAllowed(f"{method} is not supported on this ACL resource")
        entity = rest[1] if len(rest) == 2 else None
        operation = _object(Kind.ACL, method, bucket, name, Verb.ADMIN)
        return operation.evolve(acl_entity=entity)
    raise Forbidden("this object sub-resource is not permitted through the proxy")


def _require(method: str, expected: str) -> None:
    if method != expected:
        raise MethodNotAllowed(f"this resource accepts {expected} only")


def _copy(kind: Kind, method: str, source: Source, bucket: str, name: str) -> Operation:
    _require(method, "POST")
    accesses = (Access(Verb.READ, source.bucket, source.object), Access(Verb.WRITE, bucket, name))
    return Operation(kind, "POST", bucket, object=name, sources=(source,), accesses=accesses)


def _object(kind: Kind, method: str, bucket: str, name: str, verb: Verb) -> Operation:
    return Operation(kind, method, bucket, object=name, accesses=(Access(verb, bucket, name),))


def _upload(method: str, bucket: str, query: Mapping[str, str]) -> Operation:
    upload_type = query.get("uploadType")
    if "upload_id" in query:
        if upload_type not in {None, "resumable"}:
            raise BadRequest("upload_id belongs to resumable uploads")
        kinds = {
            "PUT": Kind.RESUMABLE_CHUNK,
            "POST": Kind.RESUMABLE_CHUNK,
            "DELETE": Kind.RESUMABLE_CANCEL,
        }
        if method not in kinds:
            raise MethodNotAllowed(f"{method} is not supported on an upload session")
        # Who may use it is decided by the session handle, opened once the caller is known.
        return Operation(
            kinds[method],
            "PUT" if method == "POST" else method,
            bucket,
            upload_handle=query["upload_id"],
        )
    _require(method, "POST")
    name = query.get("name")
    if upload_type == "media":
        if name is None:
            raise BadRequest("uploadType=media requires the name parameter")
        return _object(Kind.INSERT_MEDIA, "POST", bucket, check_object_name(name), Verb.WRITE)
    if upload_type in {"multipart", "resumable"}:
        kind = Kind.INSERT_MULTIPART if upload_type == "multipart" else Kind.RESUMABLE_START
        # The object name may live in the metadata: settled once the body is read.
        return Operation(
            kind, "POST", bucket, object=check_object_name(name) if name is not None else None
        )
    raise BadRequest(f"unsupported uploadType {upload_type!r}")
