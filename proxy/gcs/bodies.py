"""Request bodies: the bounded metadata that completes an operation, and what goes upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import StreamReader

from proxy.errors import BadRequest
from proxy.gcs.coding import GZIP, BodyReader, Gunzipped, body_coding
from proxy.gcs.metadata import MAX_METADATA_BYTES, checked_metadata, parse_metadata, read_bounded
from proxy.gcs.multipart import read_multipart
from proxy.gcs.operation import Kind, Operation, Source
from proxy.gcs.rawurl import check_object_name
from proxy.policy.evaluate import Access
from proxy.policy.model import Verb

STREAM_CHUNK = 1 << 20
_JSON = (("Content-Type", "application/json; charset=UTF-8"),)
_ACL_FIELDS = frozenset(
    {
        "entity",
        "role",
        "kind",
        "id",
        "selfLink",
        "bucket",
        "object",
        "generation",
        "etag",
        "email",
        "entityId",
        "domain",
        "projectTeam",
    }
)
_GZIP_SLACK = 1 << 16  # gzip's own bytes around a body read whole (headers, block framing)
_ACL_WRITES = frozenset({"POST", "PUT", "PATCH"})
_COMPOSE_SOURCE_FIELDS = frozenset({"name", "generation", "objectPreconditions"})


@dataclass(frozen=True)
class Body:
    """What goes upstream as the request body, with the headers that describe it."""

    data: Any = None
    headers: tuple[tuple[str, str], ...] = ()


async def stream_body(content: StreamReader) -> AsyncIterator[bytes]:
    """The caller's body, chunk by chunk, as it arrives."""
    async for chunk in content.iter_chunked(STREAM_CHUNK):
        yield chunk


def _json_body(document: object) -> Body:
    return Body(json.dumps(document).encode(), _JSON)


def settle_object(operation: Operation, name: str, extra: tuple[Access, ...] = ()) -> Operation:
    """The operation once its object name is known from the body."""
    name = check_object_name(name)
    accesses = (Access(Verb.WRITE, operation.bucket, name), *extra)
    if operation.privileged:
        accesses += (Access(Verb.ADMIN, operation.bucket, name),)
    return replace(operation, object=name, accesses=accesses)


# Bodies read_body leaves streaming (nothing in them is needed to decide).
STREAMED_BODIES = frozenset({Kind.INSERT_MEDIA, Kind.RESUMABLE_CHUNK})
# Bodies read_body reads whole (bounded): their metadata completes the decision.
METADATA_BODIES = frozenset(
    {
        Kind.INSERT_MULTIPART,
        Kind.RESUMABLE_START,
        Kind.PATCH,
        Kind.UPDATE,
        Kind.COPY,
        Kind.REWRITE,
        Kind.COMPOSE,
        Kind.ACL,
    }
)


async def read_body(
    operation: Operation,
    headers: Mapping[str, str],
    content: StreamReader,
    limit: int = MAX_METADATA_BYTES,
) -> tuple[Operation, Body]:
    """Complete the operation from its body; media is left streaming. What is read whole
    (JSON, a multipart metadata part) is bounded by `limit` as it arrives, decompressed:
    a chunked or gzip body announces no length the first check could have refused."""
    kind = operation.kind
    if kind is Kind.INSERT_MEDIA:
        return operation, _media_body(headers, content)
    if kind is Kind.RESUMABLE_CHUNK:
        return operation, _media_body(headers, content, allow_empty=True)
    if kind not in METADATA_BODIES or (kind is Kind.ACL and operation.method not in _ACL_WRITES):
        return operation, Body()
    reader: BodyReader = content
    gzipped = body_coding(headers) == GZIP
    if gzipped:  # what is checked is what goes upstream: decompressed
        # Read whole, a body is bounded as sent too; a multipart head is bounded
        # decompressed, and its media is not bounded at all.
        whole = kind is not Kind.INSERT_MULTIPART
        reader = Gunzipped(content, max_input=limit + _GZIP_SLACK if whole else None)
    if kind is Kind.INSERT_MULTIPART:
        upload = await read_multipart(headers, reader, limit)
        metadata, name, extra = checked_metadata(
            upload.metadata, operation.bucket, operation.object
        )
        metadata["name"] = name  # the URL's name, if any, travels in the metadata we rebuild
        content_type, data = upload.rebuilt(metadata)
        body_headers = [("Content-Type", content_type)]
        length = upload.upstream_length(metadata, None if gzipped else _length(headers))
        if length is not None:
            body_headers.append(("Content-Length", str(length)))
        return settle_object(operation, name, extra), Body(data, tuple(body_headers))
    if kind is Kind.RESUMABLE_START:
        metadata, name, extra = checked_metadata(
            await _json(reader, limit), operation.bucket, operation.object
        )
        metadata["name"] = name
        return settle_object(operation, name, extra), _json_body(metadata)
    if kind in {Kind.PATCH, Kind.UPDATE, Kind.COPY, Kind.REWRITE}:
        return await _object_metadata(operation, reader, limit)
    if kind is Kind.COMPOSE:
        return _compose(operation, await _json(reader, limit))
    return operation, _json_body(_acl_entry(await _json(reader, limit)))  # an ACL entry written


async def _json(content: BodyReader, limit: int) -> dict[str, Any]:
    return parse_metadata(await read_bounded(content.iter_any(), limit))


async def _object_metadata(
    operation: Operation, content: BodyReader, limit: int
) -> tuple[Operation, Body]:
    raw = await _json(content, limit)
    if not raw and operation.kind in {Kind.COPY, Kind.REWRITE}:
        return operation, Body()
    metadata, _, extra = checked_metadata(raw, operation.bucket, operation.object)
    return operation.needing(*extra), _json_body(metadata)


def _length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _media_body(
    headers: Mapping[str, str], content: StreamReader, *, allow_empty: bool = False
) -> Body:
    body_headers = [("Content-Type", headers.get("Content-Type", "application/octet-stream"))]
    length = headers.get("Content-Length")
    chunked = headers.get("Transfer-Encoding", "").lower() == "chunked"
    if body_coding(headers) == GZIP and (chunked or length not in (None, "0")):
        body_headers.append(("Content-Encoding", GZIP))  # as sent: Cloud Storage decodes it
    if length is not None:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        body_headers.append(("Content-Length", length))
        if length == "0" and allow_empty:
            return Body(b"", tuple(body_headers))
    elif not chunked:
        if allow_empty:
            return Body(b"", (*body_headers, ("Content-Length", "0")))
        raise BadRequest("an upload needs Content-Length or chunked encoding")
    return Body(stream_body(content), tuple(body_headers))


def _compose(operation: Operation, document: dict[str, Any]) -> tuple[Operation, Body]:
    sources = document.get("sourceObjects")
    if not isinstance(sources, list) or not 1 <= len(sources) <= 32:
        raise BadRequest("compose needs between 1 and 32 sourceObjects")
    parsed: list[dict[str, Any]] = []
    for source in sources:
        if not isinstance(source, dict) or set(source) - _COMPOSE_SOURCE_FIELDS:
            raise BadRequest(
                "each source object takes only name, generation and objectPreconditions"
            )
        name = source.get("name")
        if not isinstance(name, str):
            raise BadRequest("each source object needs a name")
        parsed.append(
            {k: v for k, v in source.items() if v is not None} | {"name": check_object_name(name)}
        )
    destination = document.get("destination", {})
    if not isinstance(destination, dict):
        raise BadRequest("destination must be an object resource")
    metadata, _, extra = checked_metadata(destination, operation.bucket, operation.object)
    unknown = set(document) - {"kind", "sourceObjects", "destination"}
    if unknown:
        raise BadRequest(f"unsupported compose field {sorted(unknown)[0]!r}")
    reads = tuple(Access(Verb.READ, operation.bucket, s["name"]) for s in parsed)
    operation = replace(
        operation,
        sources=tuple(Source(operation.bucket, s["name"]) for s in parsed),
        accesses=reads + operation.accesses + extra,
    )
    return operation, _json_body(
        {"kind": "storage#composeRequest", "sourceObjects": parsed, "destination": metadata}
    )


def _acl_entry(document: dict[str, Any]) -> dict[str, Any]:
    unknown = set(document) - _ACL_FIELDS
    if unknown:
        raise BadRequest(f"unsupported access control field {sorted(unknown)[0]!r}")
    entry: dict[str, Any] = {k: document[k] for k in ("entity", "role") if k in document}
    if not all(isinstance(v, str) for v in entry.values()):
        raise BadRequest("entity and role must be strings")
    return entry
