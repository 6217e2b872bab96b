"""Multipart uploads: the metadata part read and checked, the media part streamed on untouched.

Only the head of the body is parsed: the opening delimiter, the metadata part and the media
part's headers. The upstream body is our own head (the checked metadata, re-serialised, and
the media Content-Type) followed by the caller's remaining bytes exactly as sent, so the
media is never buffered and the upstream Content-Length is known whenever the caller's is.
Both CRLF and bare-LF line endings are accepted, as Cloud Storage accepts them; the head we
write uses the caller's, because a multipart reader takes its line ending from the first
delimiter and must find the same one before the caller's closing delimiter.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import BadRequest, PayloadTooLarge
from proxy.gcs.coding import BodyReader, held_from
from proxy.gcs.metadata import MAX_METADATA_BYTES, parse_metadata

_CHUNK = 1 << 20
_HEADERS_ROOM = 16 * 1024  # the delimiters and part headers around the metadata
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
# RFC 2046 bchars, 1 to 70: none needs escaping in the quoted boundary we forward. A
# backslash did (review: Go's parser, as Cloud Storage's may, unescaped `a\=b` into `a=b`
# and found a smuggled part naming another object).
_BCHARS = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_MAX_PART_HEADERS = 16  # a part's header lines: each arrival re-reads them
# MIME-Version: the email package writes it into every part (apitools: gsutil, gcloud).
_MEDIA_HEADERS = ("content-type", "content-transfer-encoding", "mime-version")


@dataclass
class MultipartUpload:
    """An upload whose metadata has been read; `rest` is the caller's body from the media data on."""

    metadata: dict[str, Any]
    media_headers: dict[str, str]
    boundary: str
    consumed: int
    leftover: bytes
    content: BodyReader
    newline: str = "\r\n"  # the caller's: the closing delimiter in its bytes uses the same

    @property
    def media_type(self) -> str:
        return self.media_headers.get("content-type", "application/octet-stream")

    def head(self, metadata: Mapping[str, Any]) -> bytes:
        lines = [
            f"--{self.boundary}",
            "Content-Type: application/json; charset=UTF-8",
            "",
            json.dumps(metadata),
        ]
        lines += [
            f"--{self.boundary}",
            *(f"{k.title()}: {v}" for k, v in self.media_headers.items()),
            "",
            "",
        ]
        return self.newline.join(lines).encode()

    def upstream_length(self, metadata: Mapping[str, Any], caller_length: int | None) -> int | None:
        return (
            None
            if caller_length is None
            else len(self.head(metadata)) + caller_length - self.consumed
        )

    def rebuilt(self, metadata: Mapping[str, Any]) -> tuple[str, AsyncIterator[bytes]]:
        """The upstream Content-Type and body."""
        return f'multipart/related; boundary="{self.boundary}"', self._body(self.head(metadata))

    async def _body(self, head: bytes) -> AsyncIterator[bytes]:
        # The caller's bytes from the first delimiter on wait until the whole body has
        # proved whole (coding.held_from): Cloud Storage may store the object on reading
        # the closing delimiter, and a body cut short after it, or with broken chunk
        # framing, must store nothing (a review saw one stored while the request failed).
        # A delimiter starts a line (RFC 2046 5.1.1; CRLF or bare LF, as in the head), and
        # the media starts one (some parsers take a delimiter there as an empty part):
        # `--boundary` elsewhere in the media is data, and holding from it would hold the
        # rest of the media.
        yield head
        marker, longest = _delimiter_line(self.boundary)
        async for chunk in held_from(self._caller_bytes(), marker, before=b"\n", longest=longest):
            yield chunk

    async def _caller_bytes(self) -> AsyncIterator[bytes]:
        yield self.leftover
        async for chunk in self.content.iter_chunked(_CHUNK):
            yield chunk


def _delimiter_line(boundary: str) -> tuple[re.Pattern[bytes], int]:
    """Where a delimiter may be: `--boundary` at the start of a line and then a space, a
    tab, a line end or `--` (RFC 2046 5.1.1 allows padding, then the line's end or `--`;
    Go's parser, as Cloud Storage's may, takes any of these for one). A line that only
    starts like one, `--boundaryX...` or `--boundary-x`, is data (a review: gcsfs media
    holding `--==0==X ...` was held and refused). The pattern, and its longest match."""
    delimiter = b"\n--" + boundary.encode()
    return re.compile(re.escape(delimiter) + rb"(?:[ \t\r\n]|--)"), len(delimiter) + 2


def boundary_of(content_type: str) -> str:
    if not content_type.lower().startswith("multipart/related"):
        raise BadRequest("uploadType=multipart needs a multipart/related body")
    match = _BOUNDARY.search(content_type)
    boundary = (match.group(1) or match.group(2)) if match else None
    if not boundary or not _BCHARS.match(boundary):
        raise BadRequest("the multipart/related Content-Type needs a valid boundary")
    return boundary


def _repr_quoted(boundary: str) -> bool:
    return len(boundary) > 2 and boundary[0] == boundary[-1] == "'"


class _Head:
    """A cursor over the buffered head of the body."""

    def __init__(self, data: bytes, delimiter: bytes) -> None:
        self.data, self.delimiter, self.pos = data, delimiter, 0

    def line(self) -> bytes | None:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            return None
        line, self.pos = self.data[self.pos : end], end + 1
        return line.removesuffix(b"\r")

    def headers(self) -> dict[str, str] | None:
        found: dict[str, str] = {}
        while (line := self.line()) is not None:
            if not line:
                return found
            if len(found) == _MAX_PART_HEADERS:
                raise BadRequest("a multipart part has too many header lines")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name.strip() or any(c in name for c in " \t"):
                raise BadRequest("malformed multipart part header")
            if name.strip().lower() in found:
                raise BadRequest("repeated multipart part header")
            found[name.strip().lower()] = value.strip()
        return None

    def until_delimiter(self) -> bytes | None:
        marker = self.data.find(b"\n" + self.delimiter, self.pos)
        if marker < 0:
            return None
        value = self.data[self.pos : marker].removesuffix(b"\r")
        self.pos = marker + 1
        return value


def _parse_head(
    data: bytes, boundary: str, limit: int
) -> tuple[dict[str, Any], dict[str, str], int, str] | None:
    """Metadata, media headers, where the media data starts and the newline; None if incomplete."""
    head = _Head(data, b"--" + boundary.encode())
    opening = head.line()
    if opening is None:
        return None
    newline = "\r\n" if data[: head.pos].endswith(b"\r\n") else "\n"
    if opening.rstrip(b" \t") != head.delimiter:
        raise BadRequest("the multipart body must start with its boundary")
    if head.headers() is None or (raw := head.until_delimiter()) is None:
        return None
    metadata = parse_metadata(raw, limit)
    separator = head.line()
    if separator is None:
        return None
    if separator.rstrip(b" \t") != head.delimiter:
        raise BadRequest("a multipart upload needs a media part after the metadata")
    media = head.headers()
    if media is None:
        return None
    unknown = set(media) - set(_MEDIA_HEADERS)
    if unknown or any(c in v for v in media.values() for c in "\r\n"):
        raise BadRequest(
            "the media part takes only Content-Type, Content-Transfer-Encoding and MIME-Version"
        )
    return metadata, media, head.pos, newline


async def read_multipart(
    headers: Mapping[str, str], content: BodyReader, limit: int = MAX_METADATA_BYTES
) -> MultipartUpload:
    """The head of a multipart upload, its metadata part at most `limit` bytes."""
    boundary = boundary_of(headers.get("content-type", ""))
    settled = not _repr_quoted(boundary)
    data = b""
    while True:
        if not settled and (end := data.find(b"\n")) >= 0:
            # apitools (gsutil, gcloud storage) writes `boundary=%r`: Python's repr quotes
            # it in single quotes, and its delimiters use the bare value. The opening line
            # says which; what goes upstream is that boundary, double-quoted.
            opening = data[:end].removesuffix(b"\r").rstrip(b" \t")
            if opening == b"--" + boundary[1:-1].encode():
                boundary = boundary[1:-1]
            settled = True
        parsed = _parse_head(data, boundary, limit) if settled else None
        if parsed is not None:
            metadata, media, start, newline = parsed
            return MultipartUpload(metadata, media, boundary, start, data[start:], content, newline)
        if len(data) > limit + _HEADERS_ROOM:
            raise PayloadTooLarge(f"multipart metadata part is larger than {limit} bytes")
        chunk = await content.readany()
        if not chunk:
            raise BadRequest("the multipart body ended before its media part")
        data += chunk
