"""The test support code works: FakeGcs seeds and inspects, RecordingRelay forwards and records."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import socket
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yarl
from google.auth.credentials import AnonymousCredentials, Credentials

from tests.support.fakegcs import FakeGcs
from tests.support.recorder import RecordingRelay, Seen

with warnings.catch_warnings():
    # google.api_core warns (ImportWarning) when grpcio-status is missing; the JSON API
    # client does not need it, and pytest runs with filterwarnings=error.
    warnings.simplefilter("ignore", ImportWarning)
    from google.cloud import storage  # type: ignore[import-untyped]

pytestmark = pytest.mark.integration

_names = itertools.count()


class _BearerToken(Credentials):
    """Credentials that always send ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.token = token

    def refresh(self, request: Any) -> None:
        pass

    @property
    def expired(self) -> bool:
        return False

    @property
    def valid(self) -> bool:
        return True


@pytest.fixture(scope="module")
def gcs() -> Iterator[FakeGcs]:
    with FakeGcs() as server:
        yield server


@pytest.fixture
def bucket(gcs: FakeGcs) -> str:
    name = f"bkt-{next(_names)}"
    gcs.create_bucket(name)
    return name


@pytest.fixture
def relay(gcs: FakeGcs) -> Iterator[RecordingRelay]:
    with RecordingRelay(gcs.url) as r:
        yield r


@pytest.fixture
def no_bucket_metadata_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    # google-cloud-storage >= 3.x fetches GET /storage/v1/b/BUCKET from a background
    # thread on first use of a bucket; keep it out of the recorded traffic.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")


def _client(url: str, credentials: Credentials) -> storage.Client:
    return storage.Client(
        project="p", credentials=credentials, client_options={"api_endpoint": url}
    )


def _only(seen: list[Seen], method: str, path_prefix: str) -> Seen:
    hits = [s for s in seen if s.method == method and s.raw_path.startswith(path_prefix)]
    assert len(hits) == 1, seen
    return hits[0]


# ---------------------------------------------------------------------- FakeGcs


def test_fakegcs_seeds_and_inspects(gcs: FakeGcs, bucket: str) -> None:
    assert gcs.running
    resource = gcs.put_object(bucket, "dir/a.txt", b"hello", content_type="text/plain")
    assert resource["name"] == "dir/a.txt"
    assert resource["contentType"] == "text/plain"
    # Links carry fake-gcs-server's own address (see FAKE_GCS_NOTES.md).
    assert resource["mediaLink"] == (
        f"{gcs.url}/download/storage/v1/b/{bucket}/o/dir%2Fa.txt?alt=media"
    )
    gcs.put_object(bucket, "x/../y", b"dots")
    gcs.put_object(bucket, "top", b"")

    assert gcs.get_object(bucket, "dir/a.txt") == b"hello"
    assert gcs.get_object(bucket, "x/../y") == b"dots"
    assert gcs.get_object(bucket, "top") == b""
    assert gcs.get_object(bucket, "absent") is None
    assert gcs.get_object("no-such-bucket", "absent") is None
    assert gcs.list_names(bucket) == ["dir/a.txt", "top", "x/../y"]
    assert gcs.list_names(bucket, prefix="dir/") == ["dir/a.txt"]

    assert gcs.delete_object(bucket, "top") is True
    assert gcs.delete_object(bucket, "top") is False
    assert gcs.get_metadata(bucket, "top") is None


def test_fakegcs_lists_past_one_page(gcs: FakeGcs, bucket: str) -> None:
    names = [f"n/{i:04d}" for i in range(1005)]
    for name in names:
        gcs.put_object(bucket, name, b"")
    assert gcs.list_names(bucket) == names


def test_fakegcs_stops() -> None:
    server = FakeGcs().start()
    url = server.url
    server.stop()
    assert not server.running
    status = None
    with contextlib.suppress(OSError):
        status = server.request("GET", "/storage/v1/b")[0]
    assert status is None, f"{url} still answering"
    server.stop()  # idempotent


# ---------------------------------------------------------------------- relay


@pytest.mark.usefixtures("no_bucket_metadata_fetch")
def test_relay_forwards_google_client_upload(
    gcs: FakeGcs, bucket: str, relay: RecordingRelay
) -> None:
    anonymous = _client(relay.url, AnonymousCredentials())  # type: ignore[no-untyped-call]
    try:
        anonymous.bucket(bucket).blob("dir/anon.txt").upload_from_string(b"anon")
    finally:
        anonymous.close()
    assert gcs.get_object(bucket, "dir/anon.txt") == b"anon"
    seen = _only(relay.seen, "POST", f"/upload/storage/v1/b/{bucket}/o?")
    assert seen.raw_path == f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart"
    assert "authorization" not in seen.headers
    assert seen.headers["content-type"].startswith("multipart/related; boundary=")
    assert b'"name": "dir/anon.txt"' in seen.body_prefix

    relay.clear()
    assert relay.seen == []
    client = _client(relay.url, _BearerToken("test-token"))
    try:
        blob = client.bucket(bucket).blob("dir/a.txt")
        blob.upload_from_string(b"hello", content_type="text/plain", if_generation_match=0)
        # The upload response set blob.media_link, which names fake-gcs-server itself:
        # the client follows it and bypasses the relay (the proxy must rewrite links).
        assert blob.media_link.startswith(gcs.url + "/download/")
        assert blob.download_as_bytes() == b"hello"
        assert [s.method for s in relay.seen] == ["POST"]
        fresh = client.bucket(bucket).blob("dir/a.txt")
        assert fresh.download_as_bytes(start=1, end=3) == b"ell"
    finally:
        client.close()

    assert gcs.get_object(bucket, "dir/a.txt") == b"hello"
    up = _only(relay.seen, "POST", f"/upload/storage/v1/b/{bucket}/o?")
    assert up.raw_path == (
        f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart&ifGenerationMatch=0"
    )
    assert up.headers["authorization"] == "Bearer test-token"
    assert up.headers["x-upload-content-type"] == "text/plain"
    assert b"\r\n\r\nhello\r\n--" in up.body_prefix
    down = _only(relay.seen, "GET", f"/download/storage/v1/b/{bucket}/o/")
    assert down.raw_path == f"/download/storage/v1/b/{bucket}/o/dir%2Fa.txt?alt=media"
    assert down.headers["range"] == "bytes=1-3"
    assert down.headers["authorization"] == "Bearer test-token"
    assert down.body_prefix == b""


@pytest.mark.usefixtures("no_bucket_metadata_fetch")
def test_relay_rewrites_resumable_location(
    gcs: FakeGcs, bucket: str, relay: RecordingRelay
) -> None:
    data = bytes(range(256)) * 1024 * 2 + b"tail"  # 512 KiB + 4: three chunks
    client = _client(relay.url, _BearerToken("t"))
    try:
        blob = client.bucket(bucket).blob("big/file.bin", chunk_size=256 * 1024)
        # No size given: the client cannot choose multipart, so it goes resumable.
        blob.upload_from_file(io.BytesIO(data), content_type="application/x-test")
    finally:
        client.close()
    assert gcs.get_object(bucket, "big/file.bin") == data

    init, *chunks = relay.seen
    assert (init.method, init.raw_path) == (
        "POST",
        f"/upload/storage/v1/b/{bucket}/o?uploadType=resumable",
    )
    assert json.loads(init.body_prefix) == {"name": "big/file.bin"}
    # Every chunk came back through the relay, so the Location was rewritten.
    assert [c.method for c in chunks] == ["PUT", "PUT", "PUT"]
    assert [c.headers["content-range"] for c in chunks] == [
        "bytes 0-262143/*",
        "bytes 262144-524287/*",
        "bytes 524288-524291/524292",
    ]
    query = urllib.parse.parse_qs(chunks[0].query)
    assert query["name"] == ["big/file.bin"]
    assert query["uploadType"] == ["resumable"]
    assert len(chunks[0].body_prefix) == 64 * 1024  # prefix is capped
    assert chunks[2].body_prefix == b"tail"


async def test_relay_from_async_code(gcs: FakeGcs, bucket: str, relay: RecordingRelay) -> None:
    gcs.put_object(bucket, "x/../y", b"0123456789")
    raw = f"/download/storage/v1/b/{bucket}/o/x%2F%2E%2E%2Fy?alt=media"
    async with aiohttp.ClientSession() as session:
        url = yarl.URL(relay.url + raw, encoded=True)
        async with session.get(url, headers={"Range": "bytes=2-4"}) as resp:
            assert resp.status == 206
            assert await resp.read() == b"234"
            assert resp.headers["Content-Range"] == "bytes 2-4/10"

        async def body() -> Any:
            yield b"--BB\r\nContent-Type: application/json\r\n\r\n"
            yield json.dumps({"name": "chunked/obj"}).encode() + b"\r\n"
            yield b"--BB\r\nContent-Type: text/plain\r\n\r\nstreamed\r\n--BB--"

        async with session.post(
            f"{relay.url}/upload/storage/v1/b/{bucket}/o?uploadType=multipart",
            data=body(),
            headers={"Content-Type": "multipart/related; boundary=BB"},
        ) as resp:
            assert resp.status == 200, await resp.text()

    get, post = relay.seen
    assert get.raw_path == raw  # not decoded, not dot-normalised
    assert get.headers["range"] == "bytes=2-4"
    assert post.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in post.headers
    assert post.body_prefix.endswith(b"streamed\r\n--BB--")
    assert gcs.get_object(bucket, "chunked/obj") == b"streamed"


def test_relay_records_a_client_that_disconnects_mid_body(
    gcs: FakeGcs, bucket: str, relay: RecordingRelay
) -> None:
    host, port = yarl.URL(relay.url).host, yarl.URL(relay.url).port
    assert host is not None and port is not None
    head = (
        f"POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name=partial HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(head + b"x" * 500)
        time.sleep(1)  # the relay reads what came before it hears of the close
    deadline = time.monotonic() + 5
    while not relay.seen and time.monotonic() < deadline:
        time.sleep(0.02)
    (seen,) = relay.seen
    assert seen.headers["content-length"] == "1000"
    assert seen.body_prefix == b"x" * 500
    # fake-gcs-server saw a truncated body and created nothing.
    assert gcs.get_object(bucket, "partial") is None
    assert gcs.list_names(bucket) == []
