"""Multipart uploads: read the metadata part, then stream the media part into a rebuilt body."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import BodyPartReader, MultipartReader, StreamReader

from proxy.errors import BadRequest
from proxy.gcs.metadata import MAX_METADATA_BYTES, parse_metadata

_CHUNK = 256 * 1024


@dataclass
class MultipartUpload:
    """An upload whose metadata has been read and whose media part is still streaming."""

    metadata: dict[str, Any]
    media_type: str
    media: BodyPartReader
    reader: MultipartReader

    def rebuilt(self, metadata: Mapping[str, Any]) -> tuple[str, AsyncIterator[bytes]]:
        """The upstream Content-Type and body: our boundary, our metadata, the caller's bytes."""
        boundary = "gcs-iap-proxy-" + secrets.token_hex(16)
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps(metadata)}\r\n"
            f"--{boundary}\r\nContent-Type: {self.media_type}\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        return f"multipart/related; boundary={boundary}", self._body(head, tail)

    async def _body(self, head: bytes, tail: bytes) -> AsyncIterator[bytes]:
        yield head
        while chunk := await self.media.read_chunk(_CHUNK):
            yield chunk
        if await _next_part(self.reader) is not None:
            # Raising mid-body aborts the upstream request, so no object is created.
            raise BadRequest("a multipart upload carries exactly two parts")
        yield tail


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except (ValueError, AssertionError, aiohttp.ClientPayloadError) as exc:
        raise BadRequest("malformed multipart body") from exc
    if part is not None and not isinstance(part, BodyPartReader):
        raise BadRequest("nested multipart bodies are not supported")
    return part


async def read_multipart(headers: Mapping[str, str], content: StreamReader) -> MultipartUpload:
    content_type = headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/related") or "boundary=" not in content_type:
        raise BadRequest("uploadType=multipart needs a multipart/related body with a boundary")
    reader = MultipartReader({"Content-Type": content_type}, content)
    first = await _next_part(reader)
    if first is None:
        raise BadRequest("multipart body has no metadata part")
    raw = bytearray()
    while chunk := await first.read_chunk(64 * 1024):
        raw += chunk
        if len(raw) > MAX_METADATA_BYTES:
            raise BadRequest("multipart metadata part is larger than 1 MiB")
    metadata = parse_metadata(bytes(raw))
    media = await _next_part(reader)
    if media is None:
        raise BadRequest("multipart body has no media part")
    media_type = media.headers.get("Content-Type", "application/octet-stream")
    if any(c in media_type for c in "\r\n"):
        raise BadRequest("invalid media Content-Type")
    return MultipartUpload(metadata, media_type, media, reader)
