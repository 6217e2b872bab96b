"""Operations: what a request asks Cloud Storage to do, as a value the rest of the proxy trusts."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from proxy.policy.evaluate import Access


class Kind(enum.StrEnum):
    """The Cloud Storage API method an operation maps to (span and audit name)."""

    GET = "objects.get"
    MEDIA = "objects.get.media"
    XML_GET = "xml.objects.get"
    LIST = "objects.list"
    INSERT_MEDIA = "objects.insert.media"
    INSERT_MULTIPART = "objects.insert.multipart"
    RESUMABLE_START = "objects.insert.resumable"
    RESUMABLE_CHUNK = "objects.insert.resumable.chunk"
    RESUMABLE_CANCEL = "objects.insert.resumable.cancel"
    DELETE = "objects.delete"
    PATCH = "objects.patch"
    UPDATE = "objects.update"
    COPY = "objects.copy"
    REWRITE = "objects.rewrite"
    COMPOSE = "objects.compose"
    MOVE = "objects.move"
    RESTORE = "objects.restore"
    ACL = "objectAccessControls"


class Api(enum.StrEnum):
    JSON = "/storage/v1"
    UPLOAD = "/upload/storage/v1"
    DOWNLOAD = "/download/storage/v1"


ROUTES: dict[Kind, str] = {
    Kind.GET: "/storage/v1/b/{bucket}/o/{object}",
    Kind.MEDIA: "/storage/v1/b/{bucket}/o/{object}?alt=media",
    Kind.XML_GET: "/{bucket}/{object}",
    Kind.LIST: "/storage/v1/b/{bucket}/o",
    Kind.INSERT_MEDIA: "/upload/storage/v1/b/{bucket}/o?uploadType=media",
    Kind.INSERT_MULTIPART: "/upload/storage/v1/b/{bucket}/o?uploadType=multipart",
    Kind.RESUMABLE_START: "/upload/storage/v1/b/{bucket}/o?uploadType=resumable",
    Kind.RESUMABLE_CHUNK: "/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={handle}",
    Kind.RESUMABLE_CANCEL: "/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={handle}",
    Kind.DELETE: "/storage/v1/b/{bucket}/o/{object}",
    Kind.PATCH: "/storage/v1/b/{bucket}/o/{object}",
    Kind.UPDATE: "/storage/v1/b/{bucket}/o/{object}",
    Kind.COPY: "/storage/v1/b/{bucket}/o/{object}/copyTo/b/{bucket}/o/{object}",
    Kind.REWRITE: "/storage/v1/b/{bucket}/o/{object}/rewriteTo/b/{bucket}/o/{object}",
    Kind.COMPOSE: "/storage/v1/b/{bucket}/o/{object}/compose",
    Kind.MOVE: "/storage/v1/b/{bucket}/o/{object}/moveTo/o/{object}",
    Kind.RESTORE: "/storage/v1/b/{bucket}/o/{object}/restore",
    Kind.ACL: "/storage/v1/b/{bucket}/o/{object}/acl",
}

# Operations that create or replace their destination object.
WRITES = frozenset(
    {
        Kind.INSERT_MEDIA,
        Kind.INSERT_MULTIPART,
        Kind.RESUMABLE_START,
        Kind.COPY,
        Kind.REWRITE,
        Kind.COMPOSE,
        Kind.MOVE,
        Kind.RESTORE,
    }
)


@dataclass(frozen=True)
class Source:
    bucket: str
    object: str


@dataclass(frozen=True)
class Operation:
    """A parsed request: what to authorise and everything needed to rebuild it upstream.

    `bucket`/`object` name the object acted on (the destination of copies); `sources` the
    objects read from; `accesses` everything the caller needs, all of which must be granted.
    """

    kind: Kind
    method: str
    bucket: str
    object: str | None = None
    prefix: str | None = None
    sources: tuple[Source, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    accesses: tuple[Access, ...] = ()
    user_project: str | None = None
    acl_entity: str | None = None
    upload_handle: str | None = None
    privileged: bool = False  # a parameter needs `admin` on the object, once it is known

    @property
    def route(self) -> str:
        return ROUTES[self.kind]

    @property
    def resource(self) -> str:
        path = self.object if self.object is not None else (self.prefix or "")
        return f"gs://{self.bucket}/{path}"

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    def evolve(self, **changes: Any) -> Operation:
        """`dataclasses.replace`, without its per-call look at the fields (every request
        makes a few copies). Operation has no __post_init__ to run again."""
        unknown = changes.keys() - self.__dict__.keys()
        if unknown:
            raise TypeError(f"Operation has no field(s) {sorted(unknown)}")
        clone = object.__new__(Operation)
        clone.__dict__.update(self.__dict__, **changes)
        return clone

    def with_param(self, name: str, value: str) -> Operation:
        params = tuple((k, v) for k, v in self.params if k != name) + ((name, value),)
        return self.evolve(params=params)

    def without_param(self, name: str) -> Operation:
        return self.evolve(params=tuple((k, v) for k, v in self.params if k != name))

    def needing(self, *accesses: Access) -> Operation:
        return self.evolve(accesses=self.accesses + accesses)
