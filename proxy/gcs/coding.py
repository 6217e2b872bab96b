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

import zlib
from collections.abc import AsyncIterator, Mapping

from aiohttp import StreamReader
from multidict import MultiMapping

from proxy.errors import BadRequest, UnsupportedEncoding

GZIP = "gzip"
STEP = 1 << 18  # decompressed bytes per step: bounded memory and time on the event loop
_GZIP_WBITS = 31  # zlib: gzip header and trailer, largest window
_NAMES = {"gzip": GZIP, "x-gzip": GZIP}


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

    Every member of a multi-member body is read; a truncated member, trailing bytes that
    are not another member, or bytes that are not gzip at all are 400.
    """

    def __init__(self, content: StreamReader, step: int = STEP) -> None:
        self._content = content
        self._step = step
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""

    async def readany(self) -> bytes:
        """The next decompressed bytes (at most one step); b"" at the end of the body."""
        while True:
            if not self._input:
                self._input = await self._content.readany()
                if not self._input:
                    if not self._inflate.eof:
                        raise BadRequest("the gzip request body is truncated")
                    return b""
            if self._inflate.eof:  # the last member ended: the next must start here
                self._inflate = zlib.decompressobj(_GZIP_WBITS)
            try:
                out = self._inflate.decompress(self._input, self._step)
            except zlib.error:
                raise BadRequest("the request body is not valid gzip") from None
            self._input = self._inflate.unconsumed_tail or self._inflate.unused_data
            if out:
                return out

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """Steps as they are decompressed (each at most one step, whatever `n`)."""
        return self.iter_any()


HOLD = 1 << 16


async def held_back(chunks: AsyncIterator[bytes], hold: int = HOLD) -> AsyncIterator[bytes]:
    """`chunks`, the last `hold` bytes held until the source has ended without an error.

    A multipart body ends with its closing delimiter, and Cloud Storage may store the
    object once it has read that far: held back, it goes upstream only once the whole gzip
    body has proved whole, so a damaged one stores nothing (the upstream request is cut).
    """
    tail = b""
    async for chunk in chunks:
        tail += chunk
        if len(tail) > hold:
            yield tail[:-hold]
            tail = tail[-hold:]
    if tail:
        yield tail


# What a body is read from: as it arrives, or decompressed.
BodyReader = StreamReader | Gunzipped
