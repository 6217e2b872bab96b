"""Faults injected for real against the sidecar process: stopped servers, rotated keys,
refused/reset/hung upstream connections, SIGTERM during a transfer, cut sockets, slow
clients, too many requests, several workers. Each test says what a user would check."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.devserver.issuer import DevIssuer, http_url
from proxy.devserver.metadata import DevMetadataServer
from tests.support.fakegcs import FakeGcs
from tests.support.faults import FaultyUpstream, Restartable
from tests.support.proxyproc import ProxyProcess, free_port, isolated_env
from tests.support.threaded import LoopThread

pytestmark = pytest.mark.integration

AUD = "resilience"
BUCKET = "res-data"
ALICE = "alice@example.com"
FAST_RETRIES = ("--retry-backoff", "0.05")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def error(self) -> dict[str, object]:
        error: dict[str, object] = json.loads(self.body)["error"]
        return error


def write_policy(path: Path, *issuers: str, extra_rules: str = "") -> Path:
    listed = "".join(f'  - issuer: {url}\n    audiences: ["{AUD}"]\n' for url in issuers)
    path.write_text(
        "version: 1\nissuers:\n"
        + listed
        + textwrap.dedent(
            f"""\
            rules:
              - id: alice-home
                principals: ["user:{ALICE}"]
                bucket: {BUCKET}
                prefixes: ["alice/"]
                verbs: [read, list, write, delete, metadata]
            """
        )
        + extra_rules
    )
    return path


def call(
    port: int,
    method: str,
    target: str,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, target, body=body, headers=all_headers)
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, dict(response.headers), data, time.monotonic() - started)
    finally:
        connection.close()


def get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_alive(proxy: ProxyProcess, timeout: float = 20) -> None:
    def alive() -> bool:
        assert proxy.process.poll() is None, proxy.output()
        try:
            return get_json(proxy.admin_url + "/healthz")[0] == 200
        except OSError:
            return False

    assert wait_for(alive, timeout), proxy.output()


def object_path(name: str) -> str:
    return f"/storage/v1/b/{BUCKET}/o/{name.replace('/', '%2F')}"


def media_path(name: str) -> str:
    return f"/download/storage/v1/b/{BUCKET}/o/{name.replace('/', '%2F')}?alt=media"


def upload_path(name: str, extra: str = "") -> str:
    return (
        f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name.replace('/', '%2F')}{extra}"
    )


@pytest.fixture(scope="module")
def bucket(fake_gcs: FakeGcs) -> FakeGcs:
    fake_gcs.create_bucket(BUCKET)
    return fake_gcs


@pytest.fixture
def alice_token(dev_issuer: DevIssuer) -> str:
    return dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)


@pytest.fixture
def start_proxy(tmp_path: Path, metadata_server) -> Iterator:  # type: ignore[type-arg]
    started: list[ProxyProcess] = []

    def start(
        upstream: str,
        *args: str,
        policy: Path | None = None,
        metadata_port: int | None = None,
        ready: bool = True,
    ) -> ProxyProcess:
        env = isolated_env(tmp_path, metadata_port or metadata_server[1])
        process = ProxyProcess(policy or tmp_path / "policy.yaml", upstream, env, *args)
        started.append(process)
        if ready:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


# -- metadata server ---------------------------------------------------------------------


def test_metadata_server_down_at_start_then_back(
    tmp_path, start_proxy, dev_issuer, bucket, alice_token, loop_thread: LoopThread
):
    """Unreachable at start: alive, not ready, clear 503s; ready by itself once it is back."""
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    metadata = Restartable(loop_thread, DevMetadataServer().app, port=free_port())
    proxy = start_proxy(bucket.url, metadata_port=metadata.port, ready=False)
    wait_alive(proxy)
    time.sleep(0.5)
    assert proxy.process.poll() is None
    status, readiness = get_json(proxy.admin_url + "/readyz")
    assert (status, readiness["ready"]) == (503, False)
    reply = call(proxy.port, "GET", object_path("alice/none.txt"), alice_token)
    assert reply.status == 503 and reply.seconds < 5
    assert "credentials" in str(reply.error()["message"])
    assert reply.error()["errors"][0]["reason"] == "backendError"  # type: ignore[index]

    metadata.start()
    try:
        assert wait_for(lambda: get_json(proxy.admin_url + "/readyz")[0] == 200, 20)
        bucket.put_object(BUCKET, "alice/back.txt", b"back")
        assert call(proxy.port, "GET", media_path("alice/back.txt"), alice_token).body == b"back"
    finally:
        metadata.stop()


def test_metadata_outage_mid_run_serves_the_cached_token_until_near_expiry(
    tmp_path, start_proxy, dev_issuer, bucket, alice_token, loop_thread: LoopThread
):
    # A 14 s token is used until 10 s before it expires: ~4 s of outage are covered.
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    server = DevMetadataServer(expires_in=14)
    metadata = Restartable(loop_thread, server.app).start()
    proxy = start_proxy(bucket.url, metadata_port=metadata.port)
    bucket.put_object(BUCKET, "alice/cached.txt", b"cached")
    issued_before = len(server.issued_tokens)

    metadata.stop()
    outage = time.monotonic()
    try:
        assert call(proxy.port, "GET", media_path("alice/cached.txt"), alice_token).status == 200
        statuses = []
        while time.monotonic() - outage < 14:
            reply = call(proxy.port, "GET", media_path("alice/cached.txt"), alice_token)
            statuses.append((round(time.monotonic() - outage, 1), reply.status))
            if reply.status == 503:
                break
            time.sleep(0.25)
        first_refusal = statuses[-1][0]
        assert statuses[-1][1] == 503, statuses
        # Served through the outage, refused before the token's real expiry.
        assert 1.5 <= first_refusal < 14, statuses
    finally:
        metadata.start()
    try:
        assert wait_for(
            lambda: (
                call(proxy.port, "GET", media_path("alice/cached.txt"), alice_token).status == 200
            ),
            20,
        )
        assert len(server.issued_tokens) > issued_before
    finally:
        metadata.stop()


# -- issuer keys -------------------------------------------------------------------------


def test_issuer_outage_and_key_rotation(tmp_path, start_proxy, bucket, loop_thread: LoopThread):
    """Two issuers: A goes down (cached keys keep working, a failed refresh keeps them);
    B rotates its keys (picked up on the first new-kid token, unknown kids rate-limited)."""
    servers = {}
    for name in ("a", "b"):
        port = free_port()
        issuer = DevIssuer(http_url("127.0.0.1", port))
        servers[name] = (issuer, Restartable(loop_thread, issuer.app, port=port).start())
    (issuer_a, server_a), (issuer_b, _) = servers["a"], servers["b"]
    try:
        write_policy(tmp_path / "policy.yaml", issuer_a.issuer_url, issuer_b.issuer_url)
        proxy = start_proxy(bucket.url)
        bucket.put_object(BUCKET, "alice/k.txt", b"k")

        def status(issuer: DevIssuer, **mint) -> int:  # type: ignore[no-untyped-def]
            token = issuer.mint(audience=AUD, subject="alice", email=ALICE, **mint)
            return call(proxy.port, "GET", media_path("alice/k.txt"), token).status

        server_a.stop()
        assert status(issuer_a) == 200  # cached keys
        started = time.monotonic()
        assert status(issuer_a, kid="unknown-kid") == 401  # refresh attempted, failed
        assert time.monotonic() - started < 5
        assert status(issuer_a) == 200  # the failed refresh kept the old keys

        fetches = issuer_b.jwks_fetches
        issuer_b.rotate()
        assert status(issuer_b) == 200  # first token with the new kid
        assert issuer_b.jwks_fetches == fetches + 1
        for _ in range(5):
            assert status(issuer_b, kid="never-published") == 401
        assert issuer_b.jwks_fetches == fetches + 1  # at most one refresh per 30 s
    finally:
        for _, server in servers.values():
            server.stop()


# -- upstream faults ---------------------------------------------------------------------


@pytest.fixture
def faulty(loop_thread: LoopThread, bucket: FakeGcs) -> Iterator[FaultyUpstream]:
    relay = FaultyUpstream(loop_thread, bucket.port).start()
    yield relay
    relay.stop()


@pytest.fixture
def faulty_proxy(tmp_path, start_proxy, dev_issuer, faulty) -> ProxyProcess:  # type: ignore[no-untyped-def]
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    return start_proxy(faulty.url, *FAST_RETRIES, "--read-timeout", "1", "--connect-timeout", "1")


def assert_gcs_error(reply: Reply, status: int, reason: str) -> None:
    assert reply.status == status, reply
    error = reply.error()
    assert error["code"] == status
    assert error["errors"][0]["reason"] == reason  # type: ignore[index]


def test_upstream_refused_then_back(faulty_proxy, faulty, bucket, alice_token):
    bucket.put_object(BUCKET, "alice/up.txt", b"up")
    faulty.stop()
    reply = call(faulty_proxy.port, "GET", media_path("alice/up.txt"), alice_token)
    assert_gcs_error(reply, 502, "backendError")
    assert reply.seconds < 5  # a refused connection ends the retries' budget early
    faulty.start()  # same port: recovery needs no proxy restart
    assert call(faulty_proxy.port, "GET", media_path("alice/up.txt"), alice_token).body == b"up"


def test_upstream_reset_retries_idempotent_requests_only(faulty_proxy, faulty, bucket, alice_token):
    bucket.put_object(BUCKET, "alice/reset.txt", b"r")
    faulty.set("reset")
    reply = call(faulty_proxy.port, "GET", media_path("alice/reset.txt"), alice_token)
    assert_gcs_error(reply, 502, "backendError")
    assert len(faulty.requests) == 3  # retried: a read is always idempotent

    faulty.set("reset")
    # ifGenerationMatch makes the upload idempotent, but its streamed body has started.
    target = upload_path("alice/new.bin", "&ifGenerationMatch=0")
    reply = call(faulty_proxy.port, "POST", target, alice_token, body=b"x" * 100_000)
    assert_gcs_error(reply, 502, "backendError")
    assert len(faulty.requests) == 1
    assert bucket.get_object(BUCKET, "alice/new.bin") is None

    faulty.set("pass")
    assert call(faulty_proxy.port, "GET", media_path("alice/reset.txt"), alice_token).status == 200


def test_slow_upstream_is_a_bounded_504(faulty_proxy, faulty, bucket, alice_token):
    bucket.put_object(BUCKET, "alice/slow.txt", b"s")
    faulty.set("hang")
    reply = call(faulty_proxy.port, "GET", media_path("alice/slow.txt"), alice_token)
    assert_gcs_error(reply, 504, "gatewayTimeout")
    assert 0.9 < reply.seconds < 5  # --read-timeout 1, and a read timeout is not retried
    assert len(faulty.requests) == 1
    faulty.set("pass")
    assert call(faulty_proxy.port, "GET", media_path("alice/slow.txt"), alice_token).status == 200


@pytest.mark.parametrize("status", [429, 503])
def test_gcs_429_and_5xx_are_retried_with_backoff(
    faulty_proxy, faulty, bucket, alice_token, status
):
    bucket.put_object(BUCKET, "alice/busy.txt", b"busy")
    faulty.set("pass", [status, status])
    reply = call(faulty_proxy.port, "GET", media_path("alice/busy.txt"), alice_token)
    assert (reply.status, reply.body) == (200, b"busy")
    assert len(faulty.requests) == 3

    faulty.set("pass", [status] * 3)  # attempts exhausted: Cloud Storage's answer goes back
    reply = call(faulty_proxy.port, "GET", media_path("alice/busy.txt"), alice_token)
    assert reply.status == status and len(faulty.requests) == 3


def test_conditional_writes_are_retried_unconditional_ones_are_not(
    faulty_proxy, faulty, bucket, alice_token
):
    generation = bucket.put_object(BUCKET, "alice/d.txt", b"d")["generation"]
    faulty.set("pass", [503])
    reply = call(faulty_proxy.port, "DELETE", object_path("alice/d.txt"), alice_token)
    assert reply.status == 503 and len(faulty.requests) == 1
    assert bucket.get_object(BUCKET, "alice/d.txt") == b"d"

    faulty.set("pass", [503])
    target = object_path("alice/d.txt") + f"?ifGenerationMatch={generation}"
    reply = call(faulty_proxy.port, "DELETE", target, alice_token)
    assert reply.status in (200, 204) and len(faulty.requests) == 2
    assert bucket.get_object(BUCKET, "alice/d.txt") is None

    # A metadata body is bytes already read: it can be replayed.
    bucket.put_object(BUCKET, "alice/m.txt", b"m")
    faulty.set("pass", [503])
    body = json.dumps({"metadata": {"k": "v"}}).encode()
    target = object_path("alice/m.txt") + "?ifMetagenerationMatch=1"
    headers = {"Content-Type": "application/json"}
    reply = call(faulty_proxy.port, "PATCH", target, alice_token, body=body, headers=headers)
    assert reply.status == 200 and len(faulty.requests) == 2


# -- shutdown --------------------------------------------------------------------------


def raw_get(port: int, target: str, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    return sock


def read_slowly(sock: socket.socket, pause: float) -> bytes:
    received = bytearray()
    try:
        while chunk := sock.recv(64 * 1024):
            received += chunk
            time.sleep(pause)
    except ConnectionResetError:
        pass
    return bytes(received)


def body_of(response: bytes) -> bytes:
    _, _, body = response.partition(b"\r\n\r\n")
    return body


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def big_object(bucket: FakeGcs) -> bytes:
    data = os.urandom(12 << 20)
    bucket.put_object(BUCKET, "alice/big.bin", data)
    return data


def test_sigterm_stops_accepting_and_drains_a_long_download(
    tmp_path, start_proxy, dev_issuer, bucket, alice_token, big_object
):
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    proxy = start_proxy(bucket.url)  # default grace: 8 s
    sock = raw_get(proxy.port, media_path("alice/big.bin"), alice_token)
    first = sock.recv(64 * 1024)
    proxy.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert wait_for(lambda: refuses(proxy.port), 3)  # no new connections
    rest = read_slowly(sock, 0.01)  # ~6 MB/s: the download outlives the signal by seconds
    sock.close()
    finished = time.monotonic() - signalled
    body = body_of(first + rest)
    assert hashlib.sha256(body).digest() == hashlib.sha256(big_object).digest()
    assert proxy.process.wait(timeout=10) == 0
    assert 1 < finished < 8


def test_sigterm_grace_bounds_the_drain(
    tmp_path, start_proxy, dev_issuer, bucket, alice_token, big_object
):
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    proxy = start_proxy(bucket.url, "--shutdown-grace", "1")
    sock = raw_get(proxy.port, media_path("alice/big.bin"), alice_token)
    sock.recv(64 * 1024)
    proxy.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert proxy.process.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 6  # undrained, it would wait for the reader
    assert len(read_slowly(sock, 0)) < len(big_object)  # cut, never completed silently
    sock.close()


# -- client aborts -----------------------------------------------------------------------


def cut(sock: socket.socket) -> None:
    """Close with RST, as a crashed client would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def abort_upload(port: int, token: str, name: str, multipart: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    if multipart:
        target = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart"
        head = (
            f'--b\r\nContent-Type: application/json\r\n\r\n{{"name": "{name}"}}\r\n'
            "--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        content_type = "multipart/related; boundary=b"
    else:
        target, head, content_type = upload_path(name), b"", "application/octet-stream"
    sock.sendall(
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {1 << 20}\r\n\r\n".encode()
        + head
        + b"z" * 65536
    )
    time.sleep(0.005)
    cut(sock)


def abort_download(port: int, token: str) -> None:
    sock = raw_get(port, media_path("alice/big.bin"), token)
    sock.recv(65536)
    cut(sock)


def process_stats(pid: int, upstream_port: int) -> tuple[int, int, int]:
    """(open fds, RSS KiB, established connections to the upstream) of `pid`, from /proc."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    fds = len(list(fd_dir.iterdir()))
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    upstream = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == upstream_port and fields[3] == "01" and fields[9] in inodes:
            upstream += 1
    return fds, rss, upstream


def test_client_aborts_leave_no_object_and_leak_nothing(
    tmp_path, start_proxy, dev_issuer, bucket, alice_token, big_object
):
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    proxy = start_proxy(bucket.url)
    pid = proxy.process.pid

    def abort(i: int) -> None:
        if i % 3 == 2:
            abort_download(proxy.port, alice_token)
        else:
            abort_upload(proxy.port, alice_token, f"alice/aborted/{i}", multipart=i % 3 == 1)

    for i in range(30):  # warm-up: pools, caches, lazy imports
        abort(i)
    time.sleep(1)
    before = process_stats(pid, bucket.port)
    for i in range(200):
        abort(i)

    def settled() -> bool:  # the last aborts may still be closing on a loaded machine
        fds, _, upstream = process_stats(pid, bucket.port)
        return fds <= before[0] + 2 and upstream <= max(before[2], 2)

    wait_for(settled, 10)
    after = process_stats(pid, bucket.port)
    print(f"(fds, rss KiB, upstream conns) before={before} after={after}")
    assert after[0] <= before[0] + 2, (before, after)  # file descriptors flat
    assert after[1] - before[1] < 16 * 1024, (before, after)  # RSS flat (< 16 MiB growth)
    assert after[2] <= max(before[2], 2), (before, after)  # upstream requests were aborted
    assert bucket.list_names(BUCKET, prefix="alice/aborted/") == []
    # Still healthy.
    assert call(proxy.port, "GET", media_path("alice/big.bin"), alice_token).status == 200


# -- limits ------------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path, start_proxy, dev_issuer, bucket) -> ProxyProcess:  # type: ignore[no-untyped-def]
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    return start_proxy(
        bucket.url,
        "--max-concurrent", "2",
        "--header-timeout", "1",
        "--body-timeout", "1",
        "--max-header-bytes", "4096",
        "--max-metadata-bytes", "1000",
    )  # fmt: skip


def test_header_and_metadata_size_limits(limited, bucket, alice_token):
    bucket.put_object(BUCKET, "alice/l.txt", b"l")
    big = {"X-Padding": "p" * 5000}
    assert (
        call(limited.port, "GET", media_path("alice/l.txt"), alice_token, headers=big).status == 400
    )
    body = json.dumps({"metadata": {"k": "v" * 2000}}).encode()
    headers = {"Content-Type": "application/json"}
    reply = call(limited.port, "PATCH", object_path("alice/l.txt"), alice_token, body, headers)
    assert_gcs_error(reply, 413, "uploadTooLarge")
    assert call(limited.port, "GET", media_path("alice/l.txt"), alice_token).status == 200
    # Bodies that announce no length, or a smaller one than they hold, meet the same limit
    # as they are read: chunked, gzip (2,000 bytes in 40), a multipart upload's metadata.
    for sent, extra in (
        (iter([body[:500], body[500:]]), {}),
        (gzip.compress(body), {"Content-Encoding": "gzip"}),
    ):
        reply = call(
            limited.port, "PATCH", object_path("alice/l.txt"), alice_token, sent, headers | extra
        )
        assert_gcs_error(reply, 413, "uploadTooLarge")
    multipart = (
        b"--b\r\nContent-Type: application/json\r\n\r\n"
        + json.dumps({"name": "alice/limit.txt", "metadata": {"k": "v" * 2000}}).encode()
        + b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nm\r\n--b--\r\n"
    )
    reply = call(
        limited.port,
        "POST",
        f"/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart",
        alice_token,
        multipart,
        {"Content-Type": "multipart/related; boundary=b"},
    )
    assert_gcs_error(reply, 413, "uploadTooLarge")
    assert bucket.get_object(BUCKET, "alice/limit.txt") is None
    # The limit is the metadata's: a gzip upload's media, compressed or not, is not counted
    # (a review: 413 for 200 KB of random media). The media holds `--b` where no delimiter
    # can be (not after a line break): held from there, the rest of the body was 400, a
    # CI run's random media did so by chance.
    rng = random.Random(7)  # noqa: S311 (test data, not secrets)
    media = rng.randbytes(100_000) + b"x--b--\r\n" + rng.randbytes(100_000)
    upload = (
        b"--b\r\nContent-Type: application/json\r\n\r\n"
        + json.dumps({"name": "alice/gz-media.bin"}).encode()
        + b"\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        + media
        + b"\r\n--b--\r\n"
    )
    reply = call(
        limited.port,
        "POST",
        f"/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart",
        alice_token,
        gzip.compress(upload),
        {"Content-Type": "multipart/related; boundary=b", "Content-Encoding": "gzip"},
    )
    assert reply.status == 200, reply.body
    assert bucket.get_object(BUCKET, "alice/gz-media.bin") == media
    small = json.dumps({"metadata": {"k": "v"}}).encode()
    reply = call(
        limited.port,
        "PATCH",
        object_path("alice/l.txt"),
        alice_token,
        gzip.compress(small),
        headers | {"Content-Encoding": "gzip"},
    )
    assert reply.status == 200


def stalled_upload(port: int, token: str, name: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {upload_path(name)} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: text/plain\r\nContent-Length: 1000\r\n\r\nonly the start".encode()
    )
    return sock


@pytest.fixture
def crowded(tmp_path, start_proxy, dev_issuer, bucket) -> ProxyProcess:  # type: ignore[no-untyped-def]
    write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    return start_proxy(bucket.url, "--max-concurrent", "2", "--body-timeout", "3")


def test_concurrency_limit_refuses_fast_and_stalled_bodies_time_out(crowded, bucket, alice_token):
    bucket.put_object(BUCKET, "alice/c.txt", b"c")
    stalled = [stalled_upload(crowded.port, alice_token, f"alice/stalled-{i}") for i in (1, 2)]
    deadline = time.monotonic() + 2  # until the sidecar has read both uploads' headers
    while (
        reply := call(crowded.port, "GET", media_path("alice/c.txt"), alice_token)
    ).status == 200:
        assert time.monotonic() < deadline, "two stalled uploads did not fill both slots"
        time.sleep(0.05)
    assert_gcs_error(reply, 503, "backendError")
    assert reply.headers["Retry-After"] == "1" and reply.seconds < 1.5  # not a queue

    for sock in stalled:  # the body idle timeout (3 s) frees both slots
        sock.settimeout(10)
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"reason": "requestTimeout"' in answer
    assert bucket.list_names(BUCKET, prefix="alice/stalled-") == []
    assert call(crowded.port, "GET", media_path("alice/c.txt"), alice_token).status == 200


def test_slowloris_headers_are_cut(limited):
    sock = socket.create_connection(("127.0.0.1", limited.port))
    sock.sendall(b"GET /res-data/x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    closed = False
    try:
        for _ in range(20):
            sock.sendall(b"X")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    if not closed:
        sock.settimeout(1)
        closed = sock.recv(1024) == b""
    sock.close()
    assert closed and time.monotonic() - started < 3


# -- workers -----------------------------------------------------------------------------


def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == supervisor:
            pids.append(int(stat.parent.name))
    return pids


def serving_pid(connection: http.client.HTTPConnection, port: int, pids: list[int]) -> int | None:
    """Which worker process holds the server end of `connection` (from /proc)."""
    assert connection.sock is not None
    client_port = connection.sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def exchange(
    connection: http.client.HTTPConnection,
    method: str,
    target: str,
    token: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection.request(
        method, target, body=body, headers={"Authorization": f"Bearer {token}", **(headers or {})}
    )
    response = connection.getresponse()
    return response.status, dict(response.headers), response.read()


def test_workers_share_the_port_upload_sessions_and_reloads(
    tmp_path, start_proxy, dev_issuer, bucket, alice_token
):
    policy = write_policy(tmp_path / "policy.yaml", dev_issuer.issuer_url)
    bucket.put_object(BUCKET, "alice/w.txt", b"w")
    bucket.put_object(BUCKET, "shared/news.txt", b"news")
    proxy = start_proxy(bucket.url, "--workers", "2", "--reload-interval", "0")
    assert wait_for(lambda: len(worker_pids(proxy.process.pid)) == 2, 10)
    pids = worker_pids(proxy.process.pid)

    by_worker: dict[int, http.client.HTTPConnection] = {}
    deadline = time.monotonic() + 15  # a worker may start listening later than the other
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        assert exchange(connection, "GET", media_path("alice/w.txt"), alice_token)[0] == 200
        pid = serving_pid(connection, proxy.port, pids)
        if pid is not None and pid not in by_worker:
            by_worker[pid] = connection
        else:
            connection.close()
        if len(by_worker) == 2:
            break
    assert sorted(by_worker) == sorted(pids), "SO_REUSEPORT never reached both workers"
    first, second = by_worker.values()

    # A resumable session opened on one worker is continued on the other.
    start = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name=alice%2Fshared.bin"
    status, headers, _ = exchange(
        first, "POST", start, alice_token, b"{}", {"Content-Type": "application/json"}
    )
    assert status == 200
    location = headers["Location"].removeprefix(proxy.url)
    data = os.urandom(300_000)
    status, _, _ = exchange(
        second,
        "PUT",
        location,
        alice_token,
        data,
        {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
    )
    assert status == 200
    assert bucket.get_object(BUCKET, "alice/shared.bin") == data

    # SIGHUP to the supervisor: every worker reloads.
    for connection in (first, second):
        assert exchange(connection, "GET", media_path("shared/news.txt"), alice_token)[0] == 403
    write_policy(
        policy,
        dev_issuer.issuer_url,
        extra_rules=f"""  - id: news
    principals: ["user:{ALICE}"]
    bucket: {BUCKET}
    prefixes: ["shared/"]
    verbs: [read]
""",
    )
    proxy.process.send_signal(signal.SIGHUP)
    for connection in (first, second):
        assert wait_for(
            lambda c=connection: (
                exchange(c, "GET", media_path("shared/news.txt"), alice_token)[0] == 200
            ),
            10,
        ), proxy.output()[-2000:]
        connection.close()
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=15) == 0
