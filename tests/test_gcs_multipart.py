"""The multipart upload reader: metadata parsed, media streamed on untouched, lengths exact."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from proxy.errors import BadRequest, PayloadTooLarge
from proxy.gcs.multipart import read_multipart


def reader(body: bytes) -> aiohttp.StreamReader:
    stream = aiohttp.StreamReader(
        BaseProtocol(asyncio.get_running_loop()), 1 << 24, loop=asyncio.get_running_loop()
    )
    # Feed in small pieces, as a socket would.
    step = 7 if len(body) < 4096 else 65536
    for i in range(0, len(body), step):
        stream.feed_data(body[i : i + step])
    stream.feed_eof()
    return stream


async def rebuild(body: bytes, content_type: str, metadata: dict[str, object] | None = None):
    upload = await read_multipart({"content-type": content_type}, reader(body))
    final = metadata if metadata is not None else upload.metadata
    new_type, chunks = upload.rebuilt(final)
    data = b"".join([c async for c in chunks])
    assert upload.upstream_length(final, len(body)) == len(data)
    return upload, new_type, data


@pytest.mark.parametrize("nl", ["\r\n", "\n"])
async def test_line_endings_are_kept(nl):
    media = b"line one\r\nline two\n--not-the-boundary\n"
    body = (
        (
            f"--XyZ{nl}Content-Type: application/json; charset=UTF-8{nl}{nl}"
            f'{{"name": "dir/file.txt", "acl": []}}{nl}--XyZ{nl}Content-Type: text/plain{nl}{nl}'
        ).encode()
        + media
        + f"{nl}--XyZ--".encode()
    )
    upload, new_type, data = await rebuild(
        body, 'multipart/related; boundary="XyZ"', {"name": "dir/file.txt"}
    )
    assert upload.metadata == {"name": "dir/file.txt", "acl": []}
    assert upload.media_type == "text/plain"
    assert new_type == 'multipart/related; boundary="XyZ"'
    expected_head = f"--XyZ{nl}Content-Type: application/json; charset=UTF-8{nl}{nl}{json.dumps({'name': 'dir/file.txt'})}{nl}--XyZ{nl}Content-Type: text/plain{nl}{nl}"
    assert data == expected_head.encode() + media + f"{nl}--XyZ--".encode()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/related", b"--b\r\n"),
        ("text/plain", b"--b\r\n"),
        ("multipart/related; boundary=b", b"no delimiter\r\n"),
        ("multipart/related; boundary=b", b"--b\r\n\r\n{}\r\n--b--\r\n"),
        ("multipart/related; boundary=b", b"--b\r\n\r\nnot json\r\n--b\r\n\r\nx\r\n--b--"),
        ("multipart/related; boundary=b", b"--b\r\n\r\n{}\r\n--b\r\nX-Evil: 1\r\n\r\nx\r\n--b--"),
        (
            "multipart/related; boundary=b",
            b"--b\r\nbroken header\r\n\r\n{}\r\n--b\r\n\r\nx\r\n--b--",
        ),
        ("multipart/related; boundary=b", b"--b\r\n\r\n{}"),
        # a review: a megabyte of header lines was re-read in Python at every arrival
        (
            "multipart/related; boundary=b",
            b"--b\r\n"
            + b"".join(b"h%d: x\r\n" % i for i in range(17))
            + b"\r\n{}\r\n--b\r\n\r\nx\r\n--b--",
        ),
        ("multipart/related; boundary=a\\b", b"--a\\b\r\n\r\n{}\r\n--a\\b\r\n\r\nx\r\n--a\\b--"),
        (
            'multipart/related; boundary="' + "b" * 71 + '"',  # RFC 2046: at most 70
            b"--%s\r\n\r\n{}\r\n--%s\r\n\r\nx\r\n--%s--" % ((b"b" * 71,) * 3),
        ),
    ],
)
async def test_malformed_bodies_are_400(content_type, body):
    with pytest.raises(BadRequest):
        await read_multipart({"content-type": content_type}, reader(body))


@pytest.mark.parametrize(("limit", "size"), [(1 << 20, 2 << 20), (1000, 20_000)])
async def test_a_metadata_part_over_the_limit_is_413_before_more_is_read(limit, size):
    body = b"--b\r\n\r\n" + b"{" * size
    with pytest.raises(PayloadTooLarge, match=f"larger than {limit} bytes"):
        await read_multipart({"content-type": "multipart/related; boundary=b"}, reader(body), limit)


@pytest.mark.parametrize(
    ("content_type", "delimiter", "forwarded"),
    [
        # apitools (gsutil, gcloud storage): `boundary=%r`, delimiters with the bare value
        ("multipart/related; boundary='==abc=='", b"--==abc==", '"==abc=="'),
        # a boundary that really is quoted: its delimiters carry the quotes
        ("multipart/related; boundary='==abc=='", b"--'==abc=='", "\"'==abc=='\""),
    ],
)
async def test_a_repr_quoted_boundary_is_the_one_the_body_uses(content_type, delimiter, forwarded):
    body = (
        delimiter + b"\nContent-Type: application/json\n\n{}\n"
        + delimiter + b"\nContent-Type: text/plain\n\nmedia\n" + delimiter + b"--\n"
    )  # fmt: skip
    _, new_type, data = await rebuild(body, content_type, {"name": "x"})
    assert new_type == f"multipart/related; boundary={forwarded}"
    assert data.endswith(b"\nmedia\n" + delimiter + b"--\n")
