"""Object metadata in request bodies: read bounded, checked against the operation, re-serialised."""

from __future__ import annotations

import json
import math
from typing import Any

from proxy.errors import BadRequest, PayloadTooLarge
from proxy.policy.evaluate import Access
from proxy.policy.model import Verb

MAX_METADATA_BYTES = 1 << 20
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
MAX_METADATA_DEPTH = 32  # Cloud Storage's resources nest five levels at most

WRITABLE = frozenset(
    {
        "name",
        "bucket",
        "contentType",
        "contentEncoding",
        "contentDisposition",
        "contentLanguage",
        "cacheControl",
        "metadata",
        "customTime",
        "crc32c",
        "md5Hash",
        "storageClass",
        "contexts",
    }
)
# Fields that change who may access the object or how long it must live: need `admin`.
PRIVILEGED = frozenset({"acl", "retention", "temporaryHold", "eventBasedHold", "kmsKeyName"})
# Output-only fields that clients echo back in full updates; Cloud Storage ignores them.
OUTPUT_ONLY = frozenset(
    {
        "kind",
        "id",
        "selfLink",
        "mediaLink",
        "generation",
        "metageneration",
        "size",
        "timeCreated",
        "updated",
        "timeDeleted",
        "timeStorageClassUpdated",
        "etag",
        "owner",
        "componentCount",
        "customerEncryption",
        "softDeleteTime",
        "hardDeleteTime",
        "retentionExpirationTime",
        "restoreToken",
        "timeFinalized",
    }
)


def parse_metadata(body: bytes, limit: int = MAX_METADATA_BYTES) -> dict[str, Any]:
    if len(body) > limit:
        raise PayloadTooLarge(f"object metadata is larger than {limit} bytes")
    if not body.strip():
        return {}
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("object metadata is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("object metadata must be a JSON object")
    _check_document(value)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity


def _check_document(document: dict[str, Any]) -> None:
    """What Python's json accepts but JSON text cannot carry on: strings with lone
    surrogates (escaped as \\ud800), numbers beyond a double (Python writes them back
    as Infinity) and nesting no metadata needs."""
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_METADATA_DEPTH:
            raise BadRequest(f"object metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                pending.append((item, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            _check_text(value)
        elif _out_of_range(value):
            raise BadRequest("object metadata holds a number out of range")


def _out_of_range(value: object) -> bool:
    if type(value) is float:
        return not math.isfinite(value)  # 1e400 reads as inf, and would be sent as Infinity
    return type(value) is int and not _I64_MIN <= value <= _I64_MAX  # no field holds more


def _check_text(value: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise BadRequest("object metadata holds a string that is not Unicode text") from None


def checked_metadata(
    metadata: dict[str, Any], bucket: str, name: str | None
) -> tuple[dict[str, Any], str, tuple[Access, ...]]:
    """The metadata to forward, the object name it settles on, and any extra accesses it needs."""
    unknown = sorted(set(metadata) - WRITABLE - PRIVILEGED - OUTPUT_ONLY)
    if unknown:
        raise BadRequest(f"unsupported object metadata field {unknown[0]!r}")
    body_bucket = metadata.get("bucket")
    if body_bucket is not None and body_bucket != bucket:
        raise BadRequest("the bucket in the metadata does not match the request URL")
    body_name = metadata.get("name")
    if body_name is not None and not isinstance(body_name, str):
        raise BadRequest("the object name in the metadata must be a string")
    if body_name is not None and name is not None and body_name != name:
        raise BadRequest("the object name in the metadata does not match the request URL")
    settled = name if name is not None else body_name
    if settled is None:
        raise BadRequest("the upload names no object")
    extra = (Access(Verb.ADMIN, bucket, settled),) if PRIVILEGED & set(metadata) else ()
    forwarded = {k: v for k, v in metadata.items() if k not in OUTPUT_ONLY}
    return forwarded, settled, extra


async def read_bounded(chunks: Any, limit: int = MAX_METADATA_BYTES) -> bytes:
    """Read an aiohttp stream up to `limit` bytes; more is 413."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    return bytes(data)
