"""Operations: what a request asks Cloud Storage to do, parsed from method, raw path and query."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from proxy.errors import BadRequest, Forbidden, MethodNotAllowed
from proxy.gcs.rawurl import RawTarget, check_object_name, parse_target
from proxy.policy.evaluate import Access
from proxy.policy.model import Verb

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_DIGITS = re.compile(r"^-?[0-9]{1,20}$")
_BOOL = frozenset({"true", "false"})


class Kind(enum.StrEnum):
    """The Cloud Storage API method an operation maps to (span and audit name)."""

    GET = "objects.get"
    MEDIA = "objects.get.media"
    LIST = "objects.list"
    INSERT_MEDIA = "objects.insert.media"
    INSERT_MULTIPART = "objects.insert.multipart"
    DELETE = "objects.delete"
    PATCH = "objects.patch"
    UPDATE = "objects.update"


class Api(enum.StrEnum):
    JSON = "/storage/v1"
    UPLOAD = "/upload/storage/v1"
    DOWNLOAD = "/download/storage/v1"


ROUTES: dict[Kind, str] = {
    Kind.GET: "/storage/v1/b/{bucket}/o/{object}",
    Kind.MEDIA: "/storage/v1/b/{bucket}/o/{object}?alt=media",
    Kind.LIST: "/storage/v1/b/{bucket}/o",
    Kind.INSERT_MEDIA: "/upload/storage/v1/b/{bucket}/o?uploadType=media",
    Kind.INSERT_MULTIPART: "/upload/storage/v1/b/{bucket}/o?uploadType=multipart",
    Kind.DELETE: "/storage/v1/b/{bucket}/o/{object}",
    Kind.PATCH: "/storage/v1/b/{bucket}/o/{object}",
    Kind.UPDATE: "/storage/v1/b/{bucket}/o/{object}",
}

_PRECONDITIONS = frozenset(
    {
        "ifGenerationMatch",
        "ifGenerationNotMatch",
        "ifMetagenerationMatch",
        "ifMetagenerationNotMatch",
    }
)
_COMMON = frozenset({"alt", "prettyPrint", "fields", "userProject", "quotaUser"})
_ALLOWED_PARAMS: dict[Kind, frozenset[str]] = {
    Kind.GET: _COMMON | _PRECONDITIONS | {"generation", "projection", "softDeleted"},
    Kind.MEDIA: _COMMON | _PRECONDITIONS | {"generation"},
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
        "projection",
        "softDeleted",
    },
    Kind.INSERT_MEDIA: _COMMON
    | _PRECONDITIONS
    | {"uploadType", "name", "contentEncoding", "projection"},
    Kind.INSERT_MULTIPART: _COMMON
    | _PRECONDITIONS
    | {"uploadType", "name", "contentEncoding", "projection"},
    Kind.DELETE: _COMMON | _PRECONDITIONS | {"generation"},
    Kind.PATCH: _COMMON
    | _PRECONDITIONS
    | {"generation", "projection", "overrideUnlockedRetention"},
    Kind.UPDATE: _COMMON
    | _PRECONDITIONS
    | {"generation", "projection", "overrideUnlockedRetention"},
}
# Parameters that grant more than the operation's verb; refused until an issue adds them.
_PRIVILEGED_PARAMS = frozenset({"predefinedAcl", "kmsKeyName", "overrideUnlockedRetention"})
_NUMERIC = _PRECONDITIONS | {"generation", "maxResults"}
_BOOLEAN = frozenset(
    {
        "prettyPrint",
        "versions",
        "includeTrailingDelimiter",
        "includeFoldersAsPrefixes",
        "softDeleted",
    }
)


@dataclass(frozen=True)
class Operation:
    """A parsed request: what to authorise and everything needed to rebuild it upstream."""

    kind: Kind
    method: str
    bucket: str
    object: str | None = None
    prefix: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    accesses: tuple[Access, ...] = field(default=())
    user_project: str | None = None

    @property
    def route(self) -> str:
        return ROUTES[self.kind]

    @property
    def resource(self) -> str:
        path = self.object if self.object is not None else (self.prefix or "")
        return f"gs://{self.bucket}/{path}"

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    def with_param(self, name: str, value: str) -> Operation:
        params = tuple((k, v) for k, v in self.params if k != name) + ((name, value),)
        return replace(self, params=params)


def parse_request(method: str, raw_target: str, headers: Mapping[str, str]) -> Operation:
    """Parse a data-port request into an operation, or raise a 4xx `ProxyError`."""
    if "x-http-method-override" in headers:
        raise BadRequest("method override is not accepted")
    target = parse_target(raw_target)
    operation = _route(method, target)
    _check_params(operation.kind, target.query)
    user_project = _user_project(target.query, headers)
    params = tuple(
        (k, v) for k, v in target.query.items() if k not in {"userProject", "projection"}
    )
    if operation.kind in {
        Kind.GET,
        Kind.LIST,
        Kind.PATCH,
        Kind.UPDATE,
        Kind.INSERT_MEDIA,
        Kind.INSERT_MULTIPART,
    }:
        # ACLs are admin material; metadata responses never carry them.
        params += (("projection", "noAcl"),)
    return replace(operation, params=params, user_project=user_project)


def _user_project(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    from_query = query.get("userProject")
    from_header = headers.get("x-goog-user-project")
    if from_query is not None and from_header is not None and from_query != from_header:
        raise BadRequest("userProject and X-Goog-User-Project disagree")
    return from_query if from_query is not None else from_header


def _check_params(kind: Kind, query: Mapping[str, str]) -> None:
    allowed = _ALLOWED_PARAMS[kind]
    for name, value in query.items():
        if name in _PRIVILEGED_PARAMS:
            raise Forbidden(f"the {name!r} parameter is not permitted through this proxy")
        if name not in allowed:
            raise BadRequest(f"unsupported query parameter {name!r} for {kind.value}")
        if name in _NUMERIC and not _DIGITS.match(value):
            raise BadRequest(f"query parameter {name!r} must be an integer")
        if name in _BOOLEAN and value not in _BOOL:
            raise BadRequest(f"query parameter {name!r} must be true or false")
    if query.get("projection", "noAcl") not in {"noAcl", "full"}:
        raise BadRequest("projection must be noAcl or full")


def _bucket(name: str) -> str:
    if not _BUCKET.match(name) or ".." in name:
        raise BadRequest(f"invalid bucket name {name[:64]!r}")
    return name


def _route(method: str, target: RawTarget) -> Operation:
    s = target.segments
    for api in Api:
        parts = tuple(api.value[1:].split("/"))
        if s[: len(parts)] == parts:
            return _route_api(api, method, s[len(parts) :], target.query)
    raise Forbidden("this request is not permitted through the proxy")


def _route_api(api: Api, method: str, s: tuple[str, ...], query: Mapping[str, str]) -> Operation:
    if len(s) < 3 or s[0] != "b" or s[2] != "o":
        raise Forbidden("only object operations are permitted through the proxy")
    bucket = _bucket(s[1])
    rest = s[3:]
    if api is Api.UPLOAD:
        if rest or method != "POST":
            raise Forbidden("this upload request is not permitted through the proxy")
        return _upload(bucket, query)
    if not rest:
        if api is not Api.JSON or method not in {"GET", "HEAD"}:
            raise Forbidden("this request is not permitted through the proxy")
        prefix = query.get("prefix", "")
        return Operation(
            Kind.LIST, "GET", bucket, prefix=prefix, accesses=(Access(Verb.LIST, bucket, prefix),)
        )
    if len(rest) > 1:
        raise Forbidden("object sub-resources are not permitted through the proxy")
    name = check_object_name(rest[0])
    if api is Api.DOWNLOAD:
        if method not in {"GET", "HEAD"}:
            raise MethodNotAllowed("downloads accept GET and HEAD only")
        return _object(Kind.MEDIA, method, bucket, name, Verb.READ)
    alt = query.get("alt", "json")
    if alt not in {"json", "media"}:
        raise BadRequest("alt must be json or media")
    if method in {"GET", "HEAD"}:
        kind = Kind.MEDIA if alt == "media" else Kind.GET
        return _object(kind, method, bucket, name, Verb.READ)
    if alt != "json":
        raise BadRequest("alt=media is only valid for downloads")
    verbs = {
        "DELETE": (Kind.DELETE, Verb.DELETE),
        "PATCH": (Kind.PATCH, Verb.METADATA),
        "PUT": (Kind.UPDATE, Verb.METADATA),
    }
    if method not in verbs:
        raise MethodNotAllowed(f"{method} is not supported on objects")
    kind, verb = verbs[method]
    return _object(kind, method, bucket, name, verb)


def _object(kind: Kind, method: str, bucket: str, name: str, verb: Verb) -> Operation:
    return Operation(kind, method, bucket, object=name, accesses=(Access(verb, bucket, name),))


def _upload(bucket: str, query: Mapping[str, str]) -> Operation:
    upload_type = query.get("uploadType")
    if upload_type == "media":
        name = query.get("name")
        if name is None:
            raise BadRequest("uploadType=media requires the name parameter")
        return _object(Kind.INSERT_MEDIA, "POST", bucket, check_object_name(name), Verb.WRITE)
    if upload_type == "multipart":
        # The object name may live in the metadata part: resolved once that part is read.
        name = query.get("name")
        return Operation(Kind.INSERT_MULTIPART, "POST", bucket, object=name)
    raise Forbidden(f"uploadType {upload_type!r} is not permitted through the proxy")
