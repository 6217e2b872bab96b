"""Gzip request bodies: decompressed a bounded step at a time, every member, damage refused."""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import re
import zlib

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding
from proxy.gcs.coding import MAX_MEMBERS, Gunzipped, body_coding, held_from
from proxy.gcs.multipart import _delimiter_line


def stream(body: bytes, step: int) -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(BaseProtocol(loop), 1 << 24, loop=loop)
    for i in range(0, len(body), step):
        reader.feed_data(body[i : i + step])
    reader.feed_eof()
    return reader


@pytest.mark.parametrize("feed", [1, 7, 4096, 1 << 20])
async def test_members_in_any_pieces_come_out_whole_and_bounded(feed):
    data = os.urandom(100_000) + b"z" * 900_000  # incompressible, then highly compressible
    body = gzip.compress(data[:12345]) + gzip.compress(data[12345:])
    pieces = [c async for c in Gunzipped(stream(body, feed), step=65536).iter_any()]
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) <= 65536  # a bomb is read a step at a time


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "truncated"),
        (gzip.compress(b"x" * 5000)[:-3], "truncated"),
        (b"plain text", "not valid gzip"),
        (gzip.compress(b"x") + b"\x00\x00", "not valid gzip"),
        (zlib.compress(b"x"), "not valid gzip"),  # deflate (zlib) sent as gzip
    ],
    ids=["empty", "truncated", "plain", "trailing", "zlib"],
)
async def test_damaged_bodies_are_400(body, message):
    with pytest.raises(BadRequest, match=message):
        async for _ in Gunzipped(stream(body, 3)).iter_any():
            pass


@pytest.mark.parametrize(
    ("values", "coding"),
    [
        ([], None),
        (["identity"], None),
        (["gzip"], "gzip"),
        (["x-gzip"], "gzip"),
        ([" GZip "], "gzip"),
    ],
)
def test_codings_read(values, coding):
    headers = CIMultiDictProxy(CIMultiDict([("Content-Encoding", v) for v in values]))
    assert body_coding(headers) == coding


@pytest.mark.parametrize(
    "values", [["br"], ["deflate"], ["gzip, gzip"], ["gzip", "gzip"], ["gzip", "br"], ["zstd"]]
)
def test_other_codings_and_stacks_are_415(values):
    headers = CIMultiDictProxy(CIMultiDict([("Content-Encoding", v) for v in values]))
    with pytest.raises(UnsupportedEncoding):
        body_coding(headers)


async def test_members_beyond_the_cap_are_400_before_they_cost_much():
    # Found by a review: 400,000 empty members (8 MB) held the event loop for seconds.
    empty = gzip.compress(b"")
    fine = empty * (MAX_MEMBERS - 1) + gzip.compress(b"{}")
    assert b"".join([c async for c in Gunzipped(stream(fine, 65536)).iter_any()]) == b"{}"
    with pytest.raises(BadRequest, match="at most 64 members"):
        async for _ in Gunzipped(stream(empty * 100_000, 65536)).iter_any():
            pass


async def test_max_input_bounds_what_is_sent_not_only_what_it_inflates_to():
    # 2 MB of empty stored deflate blocks inflating to 2 bytes: only the body timeout
    # stopped it (found by a review).
    padded = zlib.compressobj(wbits=31)
    body = padded.compress(b"{") + padded.flush(zlib.Z_SYNC_FLUSH)  # byte-aligned here
    body += b"\x00\x00\x00\xff\xff" * 400_000  # empty stored blocks, none final
    body += padded.compress(b"}") + padded.flush()
    assert len(body) > 1_000_000
    with pytest.raises(PayloadTooLarge, match="larger than 70000 bytes"):
        async for _ in Gunzipped(stream(body, 65536), max_input=70_000).iter_any():
            pass
    whole = [c async for c in Gunzipped(stream(body, 65536)).iter_any()]
    assert b"".join(whole) == b"{}"


async def chunks_of(*pieces: bytes, fail: bool = False):
    for piece in pieces:
        yield piece
    if fail:
        raise BadRequest("the gzip request body is truncated")


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 13, 20])  # every way the marker can straddle
async def test_held_from_sends_nothing_from_the_delimiter_on_until_a_clean_end(cut):
    body = b"media bytes " + b"\r\n--BOUNDARY--\r\n" + b"epilogue"
    sent: list[bytes] = []
    with pytest.raises(BadRequest):
        async for chunk in held_from(chunks_of(body[:cut], body[cut:], fail=True), b"--BOUNDARY"):
            sent.append(chunk)
    assert b"".join(sent) == body[: len(b"media bytes \r\n")][: len(b"".join(sent))]
    assert b"--BOUNDARY" not in b"".join(sent)
    whole = [c async for c in held_from(chunks_of(body[:cut], body[cut:]), b"--BOUNDARY")]
    assert b"".join(whole) == body


async def test_held_from_streams_media_without_a_delimiter_and_caps_what_follows_one():
    media = [os.urandom(50_000) for _ in range(6)]
    out = [c async for c in held_from(chunks_of(*media), b"--never-in-random-bytes")]
    assert b"".join(out) == b"".join(media)
    assert len(out) > 1  # streamed as it came, not gathered to the end
    with pytest.raises(BadRequest, match="after its boundary"):
        async for _ in held_from(chunks_of(b"x--B--", b"e" * 70_000), b"--B", limit=65536):
            pass


@pytest.mark.parametrize("kind", ["bytes", "delimiter line"])
async def test_held_from_against_finding_the_marker_in_the_whole_body(kind):
    # An oracle over random bodies of a small alphabet and random cuts: before the first
    # marker in `before` + body, everything streams; from it on, nothing until a clean end.
    # `before` was sent already: a marker may begin in it, and none of it comes out again.
    # The delimiter line is multipart's: `--b`, padding, then a line end or `--`.
    rng = random.Random(2046)  # noqa: S311 (test data, not secrets)
    if kind == "bytes":
        marker, longest, alphabet = b"\n--b", 4, b"\n-bx"
        pattern = re.compile(re.escape(marker))
    else:
        pattern, longest = _delimiter_line("b")
        marker, alphabet = pattern, b"\n-bx \r"
    for _ in range(3000):
        before = bytes(rng.choice(alphabet) for _ in range(rng.randrange(3)))
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(16)))
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randrange(4))))
        pieces = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        found = pattern.search(before + body)
        free = body if found is None else body[: max(found.start() - len(before), 0)]
        options = {"before": before, "longest": longest}
        whole = [c async for c in held_from(chunks_of(*pieces), marker, **options)]
        assert b"".join(whole) == body, (before, pieces)
        sent = bytearray()
        with pytest.raises(BadRequest):
            async for chunk in held_from(chunks_of(*pieces, fail=True), marker, **options):
                sent += chunk
        assert bytes(sent) == free[: len(sent)], (before, pieces)
        assert len(sent) >= len(free) - (longest - 1), (before, pieces)


@pytest.mark.parametrize(
    ("line", "delimiter"),
    [
        (b"\n--==0==\r\n", True),
        (b"\n--==0==\n", True),  # bare LF, as apitools writes
        (b"\n--==0==--", True),  # the closing one
        (b"\n--==0==  \t\r\n", True),  # transport padding
        (b"\n--==0== x\r\n", True),  # padding, then not a line end: Go's parser takes it
        (b"\n--==0==X not a delimiter\n", False),  # a review: gcsfs media, 400
        (b"\n--==0==-x\n", False),  # one dash is not the closing `--` (Go: data)
        (b"x--==0==\r\n", False),  # not at a line's start
    ],
)
def test_a_delimiter_line_is_the_boundary_alone_on_its_line(line, delimiter):
    pattern, longest = _delimiter_line("==0==")
    found = pattern.search(line)
    assert (found is not None) == delimiter
    assert found is None or len(found.group()) <= longest


async def test_a_bomb_lets_the_event_loop_run_between_its_steps():
    # Found by a review: 256 KB inflating to 256 MiB ran for half a second without letting
    # the event loop serve anyone else (health checks included).
    bomb = gzip.compress(b"\0" * (64 << 20))
    turns = 0

    async def other_request() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_request())
    await asyncio.sleep(0)
    steps, started = 0, turns
    async for _ in Gunzipped(stream(bomb, 1 << 20), step=1 << 18).iter_any():
        steps += 1
    other.cancel()
    assert steps == 256
    assert turns - started >= steps - 1  # a turn for everyone else between steps
