"""Request bodies sent with `Content-Encoding: gzip` (gsutil -J, gcloud storage
--gzip-in-flight): Cloud Storage decompresses them itself.

A body the proxy only streams (media, a resumable chunk) goes upstream exactly as sent,
compressed, with its Content-Encoding. A body the proxy reads to decide (metadata JSON, a
multipart upload's metadata part) is decompressed here, a bounded step at a time, and what
goes upstream is what was checked: the decompressed bytes, without the header. Any other
coding is refused: aiohttp's own decoding is off (`server_options`), so nothing is decoded
that the caller did not ask Cloud Storage to decode.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator, Mapping

from aiohttp import StreamReader
from multidict import MultiMapping

from proxy.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding

GZIP = "gzip"
STEP = 1 << 18  # decompressed bytes per step: bounded memory and time on the event loop
_GZIP_WBITS = 31  # zlib: gzip header and trailer, largest window
_NAMES = {"gzip": GZIP, "x-gzip": GZIP}
MAX_MEMBERS = 64  # gzip members in a body the proxy decompresses (one, from real clients)
HELD_LIMIT = 1 << 16  # a multipart body's closing delimiter and epilogue, held to the end


def body_coding(headers: Mapping[str, str]) -> str | None:
    """`gzip`, or None for a body sent as is; 415 for any other coding (or several)."""
    if isinstance(headers, MultiMapping):
        values = headers.getall("Content-Encoding", [])
    else:
        values = [headers["Content-Encoding"]] if "Content-Encoding" in headers else []
    codings = [c.strip().lower() for v in values for c in v.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _NAMES:
        return _NAMES[codings[0]]
    raise UnsupportedEncoding("request bodies may be sent as is or with Content-Encoding: gzip")


class Gunzipped:
    """The decompressed bytes of a gzip body, read like the aiohttp stream they come from.

    Every member of a multi-member body is read, up to `MAX_MEMBERS` (a body of thousands
    of tiny members costs a decompressor each: CPU on the event loop for nothing); a
    truncated member, trailing bytes that are not another member, or bytes that are not
    gzip at all are 400. `max_input`, if given, bounds the compressed bytes read (413):
    a body read whole is bounded as sent as well as decompressed.
    """

    def __init__(
        self, content: StreamReader, step: int = STEP, max_input: int | None = None
    ) -> None:
        self._content = content
        self._step = step
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""
        self._members = 1
        self._received = 0  # compressed bytes read from the caller
        self._max_input = max_input

    async def readany(self) -> bytes:
        """The next decompressed bytes (at most one step); b"" at the end of the body."""
        while True:
            if not self._input:
                self._input = await self._content.readany()
                if not self._input:
                    if not self._inflate.eof:
                        raise BadRequest("the gzip request body is truncated")
                    return b""
                self._received += len(self._input)
                if self._max_input is not None and self._received > self._max_input:
                    raise PayloadTooLarge(f"request body is larger than {self._max_input} bytes")
            if self._inflate.eof:  # the last member ended: the next must start here
                self._members += 1
                if self._members > MAX_MEMBERS:
                    raise BadRequest(f"a gzip request body may hold at most {MAX_MEMBERS} members")
                self._inflate = zlib.decompressobj(_GZIP_WBITS)
            try:
                out = self._inflate.decompress(self._input, self._step)
            except zlib.error:
                raise BadRequest("the request body is not valid gzip") from None
            self._input = self._inflate.unconsumed_tail or self._inflate.unused_data
            if out:
                if self._input:  # more steps from the same input (a bomb has thousands):
                    await asyncio.sleep(0)  # other requests run between them
                return out

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """Steps as they are decompressed (each at most one step, whatever `n`)."""
        return self.iter_any()


async def held_from(
    chunks: AsyncIterator[bytes],
    marker: bytes | re.Pattern[bytes],
    limit: int = HELD_LIMIT,
    before: bytes = b"",
    longest: int | None = None,
) -> AsyncIterator[bytes]:
    """`chunks` up to the first `marker`; from there on, held until the source has ended
    without an error (at most `limit` bytes, else 400).

    The marker is a multipart body's delimiter: Cloud Storage may store the object as soon
    as it reads the closing one, wherever it lies (an epilogue may follow it). Held, it goes
    upstream only once the whole body (decompressed or as sent) has proved whole, so a
    damaged body stores nothing: the upstream request is cut before its end. `before` is
    what preceded `chunks` (already sent, not yielded again): a marker may begin in it. A
    pattern's matches are `longest` bytes at most.
    """
    if isinstance(marker, bytes):
        pattern, longest = re.compile(re.escape(marker)), len(marker)
    elif longest is None:
        raise TypeError("held_from needs a pattern's longest match")
    else:
        pattern = marker
    keep = longest - 1  # a marker may straddle two chunks
    carry = before[max(len(before) - keep, 0) :]
    sent = len(carry)  # the leading bytes of `carry` that are `before`'s, not ours to yield
    held: bytearray | None = None
    async for chunk in chunks:
        if held is None:
            data = carry + chunk
            found = pattern.search(data)
            if found is None:
                cut = max(len(data) - keep, 0)
                if cut > sent:
                    yield data[sent:cut]
                carry, sent = data[cut:], max(sent - cut, 0)
                continue
            at = found.start()
            if at > sent:
                yield data[sent:at]
            held = bytearray(data[max(at, sent) :])
        else:
            held += chunk
        if len(held) > limit:
            raise BadRequest(f"a multipart body goes on for over {limit} bytes after its boundary")
    if held is not None:
        yield bytes(held)
    elif len(carry) > sent:
        yield carry[sent:]


# What a body is read from: as it arrives, or decompressed.
BodyReader = StreamReader | Gunzipped
