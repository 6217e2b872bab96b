"""Gzip request bodies: decompressed a bounded step at a time, every member, damage refused."""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import BadRequest, UnsupportedEncoding
from proxy.gcs.coding import Gunzipped, body_coding, held_back


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


async def test_held_back_releases_the_tail_only_after_a_clean_end():
    sent: list[bytes] = []

    async def source(fail: bool):
        for _ in range(4):
            yield b"a" * 50_000
        if fail:
            raise BadRequest("the gzip request body is truncated")

    with pytest.raises(BadRequest):
        async for chunk in held_back(source(True), hold=65536):
            sent.append(chunk)
    assert sum(map(len, sent)) == 200_000 - 65536  # the last 64 KiB never left
    whole = [c async for c in held_back(source(False), hold=65536)]
    assert b"".join(whole) == b"a" * 200_000
