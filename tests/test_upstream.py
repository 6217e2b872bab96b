"""proxy.upstream against raw TCP peers: framing, reuse, timeouts, injection, flow control.

Every peer is a real asyncio server on 127.0.0.1 that speaks crafted bytes; the assertions
are on the bytes it actually received and the connections it actually accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import pytest

from proxy.upstream import (
    HIGH_WATER,
    LOW_WATER,
    ConnectError,
    Disconnected,
    ReadTimeout,
    Response,
    StaleConnection,
    Upstream,
)

# -- the raw peer ---------------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes  # decoded (chunk framing removed)
    raw: bytes  # exactly as received


class Conn:
    """One accepted connection, seen from the peer's side."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self.reader = reader
        self.writer = writer
        self.received = bytearray()  # every byte the client sent on this connection
        self.requests: list[Request] = []
        self.client_closed = False

    async def _until(self, separator: bytes) -> bytes:
        data = await self.reader.readuntil(separator)
        self.received += data
        return data

    async def _exactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.received += data
        return data

    async def head(self) -> bytes | None:
        """The next request head, or None when the client closed the connection."""
        try:
            return await self._until(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.received += exc.partial
            self.client_closed = True
            return None

    async def request(self) -> Request | None:
        """The next whole request (body framed by Content-Length or chunked), or None."""
        start = len(self.received)
        head = await self.head()
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [(n, v) for n, _, v in (line.partition(": ") for line in lines[1:] if line)]
        fields = {n.lower(): v for n, v in headers}
        body = b""
        if fields.get("transfer-encoding") == "chunked":
            while size := int((await self._until(b"\r\n")).split(b";")[0], 16):
                body += (await self._exactly(size + 2))[:-2]
            await self._exactly(2)  # the empty trailer section
        elif "content-length" in fields:
            body = await self._exactly(int(fields["content-length"]))
        request = Request(method, target, headers, body, bytes(self.received[start:]))
        self.requests.append(request)
        return request

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Each part in its own TCP write, `pause` seconds apart."""
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await self.writer.drain()

    async def until_closed(self) -> None:
        """Say nothing more; wait for the client to close (recording what it sends)."""
        self.received += await self.reader.read()
        self.client_closed = True

    def reset(self) -> None:
        """Close with a TCP RST rather than a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Conn], Awaitable[None]]


class Peer:
    """A raw HTTP/1.1 upstream: `script` speaks for every accepted connection."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.conns: list[Conn] = []
        self.open = 0
        self.max_open = 0
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if self.tls is not None:
            self.url = f"https://localhost:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.conns)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: some tests mean it to
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def stop(self) -> None:
        self.server.close()
        for conn in self.conns:  # scripts still waiting on the client see the end and return
            conn.writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()


def ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra.encode(), body)


async def echo(conn: Conn) -> None:
    """Answer every request with its target as the body."""
    while (request := await conn.request()) is not None:
        await conn.send(ok(request.target.encode()))


def first_then_echo(first: Script) -> Script:
    """`first` speaks for the first connection, `echo` for any later one."""

    async def script(conn: Conn) -> None:
        await (first(conn) if conn.index == 0 else echo(conn))

    return script


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Peer]]]:
    peers: list[Peer] = []

    async def start(script: Script, tls: ssl.SSLContext | None = None) -> Peer:
        peer = Peer(script, tls)
        await peer.start()
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        await peer.stop()
    assert [e for p in peers for e in p.errors] == []


@pytest.fixture
async def client(serve: object) -> AsyncIterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(peer: Peer, *, read_timeout: float = 1.0, limit: int = 256) -> Upstream:
        upstream = Upstream(peer.url, connect_timeout=1.0, read_timeout=read_timeout, limit=limit)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.close()


async def fetch(
    upstream: Upstream,
    target: str = "/",
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | AsyncIterator[bytes] | None = None,
) -> tuple[Response, bytes]:
    async with await upstream.request(method, target, headers, body) as response:
        return response, await response.read()


# -- answers: framing ---------------------------------------------------------------


async def closed_by_client(conn: Conn, seconds: float = 5) -> bool:
    """Whether the client closes `conn` within `seconds` (the peer hears of it in its own time)."""
    for _ in range(int(seconds / 0.01)):
        if conn.client_closed:
            return True
        await asyncio.sleep(0.01)
    return conn.client_closed


async def test_content_length_body_in_several_writes(serve, client):
    body = bytes(range(256)) * 1000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(head, body[:10], body[10:100_000], body[100_000:], pause=0.03)
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer)
    async with await upstream.request("GET", "/o", []) as response:
        assert (response.status, response.content_length) == (200, len(body))
        pieces = [chunk async for chunk in response.chunks()]
    assert b"".join(pieces) == body
    assert len(pieces) >= 3  # several reads, all but the first past the parser
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 1


CHUNKED = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"5;ext=1\r\nhello\r\n",
    b"6\r\n world\r\n",
    b"1f4\r\n" + b"x" * 500 + b"\r\n",
    b"0\r\n\r\n",
]


@pytest.mark.parametrize("pause", [0.0, 0.03], ids=["one-write", "several-writes"])
async def test_chunked_body(serve, client, pause):
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(*([b"".join(CHUNKED)] if not pause else CHUNKED), pause=pause)
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer)
    response, body = await fetch(upstream, "/o")
    assert (response.status, response.content_length) == (200, None)
    assert body == b"hello world" + b"x" * 500
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 1


@pytest.mark.parametrize("pause", [0.0, 0.03], ids=["one-write", "several-writes"])
async def test_body_delimited_by_connection_close(serve, client, pause):
    parts = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"first ", b"second ", b"third"]

    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(*([b"".join(parts)] if not pause else parts), pause=pause)

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    response, body = await fetch(upstream, "/o")
    assert (response.status, body) == (200, b"first second third")
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2


async def test_head_answer_announcing_a_length_has_no_body_and_keeps_the_connection(serve, client):
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: "e"\r\n\r\n')
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer)
    response, body = await fetch(upstream, "/o", "HEAD")
    assert (response.status, response.content_length, body) == (200, 1000, b"")
    assert response.headers["etag"] == '"e"'
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 1
    assert [r.method for r in peer.conns[0].requests] == ["HEAD", "GET"]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: "e"\r\n\r\n',
    ],
    ids=["204", "304"],
)
async def test_no_body_statuses_then_reuse(serve, client, head):
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(head)
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer)
    response, body = await fetch(upstream, "/o")
    assert response.status in (204, 304) and body == b""
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 1


async def test_interim_100_continue_is_skipped(serve, client):
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(
            b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n", ok(b"done", "X-Final: 1"), pause=0.03
        )
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer)
    response, body = await fetch(upstream, "/o")
    assert (response.status, body) == (200, b"done")
    assert "X-Final" in response.headers and "X-Interim" not in response.headers
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 1


# -- connection reuse -----------------------------------------------------------------


async def test_keep_alive_then_connection_close(serve, client):
    async def script(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            if request.target == "/close":
                await conn.send(ok(b"/close", "Connection: close"))
                return
            await conn.send(ok(request.target.encode()))

    peer = await serve(script)
    upstream = client(peer)
    for target in ("/a", "/b", "/c", "/close"):
        assert (await fetch(upstream, target))[1] == target.encode()
    assert peer.accepted == 1
    assert [r.target for r in peer.conns[0].requests] == ["/a", "/b", "/c", "/close"]
    assert (await fetch(upstream, "/d"))[1] == b"/d"
    assert peer.accepted == 2


async def test_idle_connection_closed_by_the_server_is_not_reused(serve, client):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(b"/a"))  # keep-alive announced, then closed anyway

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    assert (await fetch(upstream, "/a"))[1] == b"/a"
    await asyncio.sleep(0.1)  # the close reaches the client while the connection is idle
    assert (await fetch(upstream, "/b"))[1] == b"/b"
    assert peer.accepted == 2


async def test_pooled_connection_closed_before_any_answer_is_stale(serve, client):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(b"/a"))
        await conn.request()  # the reused connection's request arrives; closed unanswered

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    assert (await fetch(upstream, "/a"))[1] == b"/a"
    with pytest.raises(StaleConnection):
        await upstream.request("GET", "/b", [])
    assert [r.target for r in peer.conns[0].requests] == ["/a", "/b"]
    assert (await fetch(upstream, "/c"))[1] == b"/c"
    assert peer.accepted == 2


async def test_fresh_connection_closed_before_any_answer_is_not_stale(serve, client):
    async def first(conn: Conn) -> None:
        await conn.request()

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    with pytest.raises(Disconnected) as info:
        await upstream.request("GET", "/a", [])
    assert type(info.value) is Disconnected  # not StaleConnection: resending is not known safe


@pytest.mark.parametrize(
    ("method", "parts", "expected"),
    [
        ("GET", [ok(b"hello") + ok(b"EVIL")], b"hello"),
        ("GET", [ok(b"hello") + b"HTTP/1.1 200 OK\r\n"], b"hello"),
        ("GET", [ok(b"hello") + b"garbage"], b"hello"),
        (
            "GET",
            [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hel", b"lo" + ok(b"EVIL")],
            b"hello",
        ),
        ("GET", [ok(b"hello"), ok(b"EVIL")], b"hello"),
        ("GET", [b"".join(CHUNKED[:2] + CHUNKED[4:]) + ok(b"EVIL")], b"hello"),
        ("GET", [b"HTTP/1.1 204 No Content\r\n\r\nhello"], b""),
        ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], b""),
    ],
    ids=[
        "glued-response-same-write",
        "glued-partial-head-same-write",
        "glued-garbage-same-write",
        "past-content-length-later-write",
        "glued-response-later-write",
        "chunked-glued-response",
        "204-with-a-body",
        "HEAD-with-a-body",
    ],
)
async def test_bytes_beyond_the_answer_are_never_an_answer(serve, client, method, parts, expected):
    sent = asyncio.Event()

    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(*parts, pause=0.03)
        sent.set()
        await echo(conn)  # were the connection reused, it would still answer properly

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    _, body = await fetch(upstream, "/o", method)
    assert body == expected
    await sent.wait()  # the extra bytes are out, then time for the pool to see them arrive
    await asyncio.sleep(0.1)
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2, "a connection that carried extra bytes was reused"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
async def test_malformed_answer_is_disconnected_and_not_reused(serve, client, answer):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)
        await conn.until_closed()  # the client must close it: nothing else will

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    with pytest.raises(Disconnected):
        await upstream.request("GET", "/o", [])
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2
    assert await closed_by_client(peer.conns[0])


# -- timeouts and broken answers -----------------------------------------------------


async def test_no_answer_is_a_read_timeout(serve, client):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.until_closed()

    peer = await serve(first_then_echo(first))
    upstream = client(peer, read_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ReadTimeout):
        await upstream.request("GET", "/o", [])
    assert 0.4 <= time.monotonic() - start < 3  # bounded, not hung
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2
    assert await closed_by_client(peer.conns[0])


async def test_stall_mid_body_is_a_read_timeout_from_chunks(serve, client):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 50)
        await conn.until_closed()

    peer = await serve(first_then_echo(first))
    upstream = client(peer, read_timeout=0.5)
    got = bytearray()
    async with await upstream.request("GET", "/o", []) as response:
        start = time.monotonic()
        with pytest.raises(ReadTimeout):
            async for chunk in response.chunks():
                got += chunk
        assert 0.4 <= time.monotonic() - start < 3  # bounded, not hung
    assert got == b"a" * 50
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2


@pytest.mark.parametrize(
    ("answer", "before_the_cut"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 50, b"a" * 50),
        (b"".join(CHUNKED[:2]), b"hello"),
    ],
    ids=["content-length", "chunked"],
)
async def test_body_cut_short_is_disconnected(serve, client, answer, before_the_cut):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    got = bytearray()
    async with await upstream.request("GET", "/o", []) as response:
        with pytest.raises(Disconnected) as info:
            async for chunk in response.chunks():
                got += chunk
    assert type(info.value) is Disconnected
    assert got == before_the_cut
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2


async def test_reset_is_not_the_end_of_a_close_delimited_body(serve, client):
    async def first(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
        await asyncio.sleep(0.05)
        conn.reset()  # RST, not FIN: the body did not end, the connection broke

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    async with await upstream.request("GET", "/o", []) as response:
        with pytest.raises(Disconnected):
            await response.read()


async def test_connection_refused_is_connect_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        upstream = Upstream(f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=1, limit=1)
        for _ in range(2):  # the one slot is given back after a failure
            with pytest.raises(ConnectError):
                await upstream.request("GET", "/", [])
        await upstream.close()


# -- the request as sent ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/x", [("X-A", "1\r\nInjected: yes")]),
        ("GET", "/x", [("X-A", "1\nInjected: yes")]),
        ("GET", "/x", [("X-A", "1\rInjected: yes")]),
        ("GET", "/x", [("X-A", "a\x00b")]),
        ("GET", "/x", [("X A", "1")]),
        ("GET", "/x", [("X:A", "1")]),
        ("GET", "/x", [("", "1")]),
        ("GET", "/x", [("X-A\r\nInjected", "1")]),
        ("GET", "/x", [("X-A\n", "1")]),
        ("GET", "/x", [("Injected: yes\r\nX-A", "1")]),
        ("GET /y", "/x", []),
        ("", "/x", []),
        ("GET\n", "/x", []),
        ("GET", "/a b", []),
        ("GET", "/a\r\nInjected: yes", []),
        ("GET", "/a\n", []),
        ("GET", "/a\x00", []),
        ("GET", "/a\tb", []),
        ("GET", "/\u00e9", []),
    ],
    ids=[
        "value-crlf",
        "value-lf",
        "value-cr",
        "value-nul",
        "name-space",
        "name-colon",
        "name-empty",
        "name-crlf",
        "name-trailing-lf",
        "name-injected-line",
        "method-space",
        "method-empty",
        "method-trailing-lf",
        "target-space",
        "target-crlf",
        "target-trailing-lf",
        "target-nul",
        "target-tab",
        "target-non-ascii",
    ],
)
async def test_injection_is_refused_before_anything_is_sent(serve, client, method, target, headers):
    peer = await serve(echo)
    upstream = client(peer, limit=1)
    with pytest.raises(ValueError):
        await upstream.request(method, target, [("X-Ok", "1"), *headers])
    await asyncio.sleep(0.05)
    assert peer.accepted == 0
    assert (await fetch(upstream, "/ok"))[1] == b"/ok"  # and the one slot is still free
    assert peer.conns[0].received.startswith(b"GET /ok HTTP/1.1\r\n")


async def chunks_of(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


async def test_request_framing_as_received(serve, client):
    peer = await serve(echo)
    upstream = client(peer)
    host = b"Host: 127.0.0.1:%d\r\n" % peer.port

    caller = [
        ("X-First", "1"),
        ("Host", "evil.example"),
        ("Connection", "close"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Content-Length", "999"),
        ("x-last", "two  words"),
    ]
    await fetch(upstream, "/up?a=1", "POST", caller, b"hello")
    await fetch(upstream, "/stream", "PUT", [("X-A", "1")], chunks_of(b"abc", b"", b"x" * 300))
    await fetch(
        upstream,
        "/framed",
        "PUT",
        [("Content-Length", "303"), ("X-A", "1")],
        chunks_of(b"abc", b"x" * 300),
    )
    await fetch(upstream, "/empty", "POST")
    await fetch(upstream, "/get", "GET", [("X-A", "1")])
    for method in ("PUT", "PATCH"):
        await fetch(upstream, "/nobody", method)

    raw = [r.raw for r in peer.conns[0].requests]
    assert peer.accepted == 1
    assert raw[0] == (
        b"POST /up?a=1 HTTP/1.1\r\n"
        + host
        + b"X-First: 1\r\nx-last: two  words\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert raw[1] == (
        b"PUT /stream HTTP/1.1\r\n" + host + b"X-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n"
    )
    assert raw[2] == (
        b"PUT /framed HTTP/1.1\r\n"
        + host
        + b"Content-Length: 303\r\nX-A: 1\r\n\r\nabc"
        + b"x" * 300
    )
    assert raw[3] == b"POST /empty HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n"
    assert raw[4] == b"GET /get HTTP/1.1\r\n" + host + b"X-A: 1\r\n\r\n"
    assert raw[5] == b"PUT /nobody HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n"
    assert raw[6] == b"PATCH /nobody HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n"


async def test_streamed_body_longer_than_its_content_length_is_not_smuggled(serve, client):
    # Defence in depth: the forwarder bounds callers' bodies today, but a client that writes
    # past the length it announced desynchronises the connection: the extra bytes are a
    # smuggled request, whose answer is then taken for the next caller's.
    async def slow_echo(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            await asyncio.sleep(0.05)
            await conn.send(ok(request.target.encode()))

    peer = await serve(slow_echo)
    upstream = client(peer)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    with contextlib.suppress(ValueError, ConnectionError, TimeoutError):
        await fetch(
            upstream, "/up", "PUT", [("Content-Length", "5")], chunks_of(b"hello", smuggled)
        )
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert [r.target for c in peer.conns for r in c.requests] == ["/up", "/next"]


# -- flow control ---------------------------------------------------------------------


async def test_slow_reader_bounds_buffering_and_gets_every_byte(serve, client):
    size = 20 << 20
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    sent = hashlib.sha256()

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(size // len(block)):
            part = bytes([i]) + block[1:]
            sent.update(part)
            await conn.send(part)
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer, read_timeout=5.0)
    received = hashlib.sha256()
    total = most = 0
    async with await upstream.request("GET", "/big", []) as response:
        async for chunk in response.chunks():
            received.update(chunk)
            total += len(chunk)
            await asyncio.sleep(0.002)
            # Response._buffered (private): body bytes held in memory, not yet consumed.
            most = max(most, response._buffered)
    assert total == size and received.digest() == sent.digest()
    assert LOW_WATER < most <= HIGH_WATER + (1 << 20)  # backpressure engaged, and held
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 1


async def test_completed_answer_released_unread_leaves_a_usable_connection(serve, client):
    # HIGH_WATER + 1 bytes: the read that completes the body is the one that pauses reading.
    body = b"z" * (HIGH_WATER + 1)

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(body))
        await echo(conn)

    peer = await serve(script)
    upstream = client(peer, read_timeout=0.5)
    response = await upstream.request("GET", "/big", [])
    for _ in range(100):  # until the whole body is buffered (Response._complete, private)
        if response._complete:
            break
        await asyncio.sleep(0.01)
    assert response._complete
    response.release()  # complete and keep-alive: pooled
    assert (await fetch(upstream, "/next"))[1] == b"/next"


# -- uploads ----------------------------------------------------------------------------


async def test_early_answer_during_an_upload(serve, client):
    yielded = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal yielded
        for _ in range(50):
            yielded += 1
            yield b"u" * (1 << 20)
            await asyncio.sleep(0.002)

    async def first(conn: Conn) -> None:
        await conn.head()  # the body is never read
        await conn.send(ok(b"bad request").replace(b"200 OK", b"400 Bad Request"))
        await conn.until_closed()

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    async with asyncio.timeout(3):
        response = await upstream.request("PUT", "/up", [], upload())
        assert response.status == 400
        assert await response.read() == b"bad request"
        response.release()
    assert yielded < 50  # the upload was abandoned
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2
    assert await closed_by_client(peer.conns[0])


async def test_limit_caps_open_connections(serve, client):
    async def script(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            await asyncio.sleep(0.2)
            await conn.send(ok(request.target.encode()))

    peer = await serve(script)
    upstream = client(peer, limit=2)
    results = await asyncio.gather(*(fetch(upstream, f"/{i}") for i in range(3)))
    assert [body for _, body in results] == [b"/0", b"/1", b"/2"]
    assert peer.max_open == 2 and peer.accepted == 2


async def test_failing_upload_raises_its_own_error_and_closes(serve, client):
    stalled = TimeoutError("the caller stalled")

    async def upload() -> AsyncIterator[bytes]:
        yield b"abc"
        await asyncio.sleep(0.05)
        raise stalled

    async def first(conn: Conn) -> None:
        await conn.head()
        await conn.until_closed()

    peer = await serve(first_then_echo(first))
    upstream = client(peer)
    with pytest.raises(TimeoutError) as info:
        await upstream.request("PUT", "/up", [], upload())
    assert info.value is stalled
    assert await closed_by_client(peer.conns[0])
    assert peer.conns[0].received.endswith(b"\r\n\r\n3\r\nabc\r\n")  # no terminating chunk
    assert (await fetch(upstream, "/next"))[1] == b"/next"
    assert peer.accepted == 2


async def test_an_upload_slower_than_the_read_timeout_is_not_cut(serve, client):
    """The answer's clock starts once the body is sent: a caller uploading at its own pace
    for longer than read_timeout is not a silent upstream."""

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"s" * 1000
            await asyncio.sleep(0.2)

    peer = await serve(echo)
    upstream = client(peer, read_timeout=0.5)
    started = time.monotonic()
    response, body = await fetch(upstream, "/slow", "PUT", body=upload())
    assert (response.status, body) == (200, b"/slow")
    assert time.monotonic() - started > 1.0
    assert peer.conns[0].requests[0].body == b"s" * 6000


def self_signed(name: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a fresh self-signed certificate for `name`, and its PEM."""
    import datetime
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as pem:
        pem.write(cert_pem + key_pem)
        pem.flush()
        context.load_cert_chain(pem.name)
    return context, cert_pem


async def test_tls_upstream_certificate_is_verified(serve):
    """https upstreams: the system's trust store by default, and the name must match."""
    server_tls, cert_pem = self_signed("localhost")
    peer = await serve(echo, server_tls)
    trusting = ssl.create_default_context(cadata=cert_pem.decode())
    verified = Upstream(peer.url, connect_timeout=2, read_timeout=2, ssl_context=trusting)
    response, body = await fetch(verified, "/secure")
    assert (response.status, body) == (200, b"/secure")
    await verified.close()
    untrusted = Upstream(peer.url, connect_timeout=2, read_timeout=2)
    with pytest.raises(ConnectError, match="certificate verify failed"):
        await untrusted.request("GET", "/x", [])
    wrong_name = Upstream(
        f"https://127.0.0.1:{peer.port}", connect_timeout=2, read_timeout=2, ssl_context=trusting
    )
    with pytest.raises(ConnectError, match=r"certificate verify failed|match"):
        await wrong_name.request("GET", "/x", [])
    assert [r.target for c in peer.conns for r in c.requests] == ["/secure"]


# -- found in review: trailers, non-Latin-1 values, failed uploads, stalled drains ---------


async def test_trailer_fields_never_become_the_next_answers_headers(serve, client):
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nfirst\r\n0\r\nLocation: https://x/?upload_id=FIRST\r\n\r\n"
        )
        await conn.request()
        await conn.send(ok(b"second", "Location: https://x/?upload_id=SECOND"))
        await conn.until_closed()

    peer = await serve(script)
    upstream = client(peer)
    first, body = await fetch(upstream, "/a")
    assert body == b"first" and "Location" not in first.headers
    second, body = await fetch(upstream, "/b")
    assert body == b"second"
    assert second.headers.getall("Location") == ["https://x/?upload_id=SECOND"]
    assert peer.accepted == 1


async def test_header_values_go_on_as_the_caller_sent_them(serve, client):
    peer = await serve(echo)
    upstream = client(peer)
    # aiohttp hands a handler UTF-8-decoded values (surrogateescape for invalid bytes).
    values = ["app/日本", b"raw\xff".decode("utf-8", "surrogateescape")]
    response, _ = await fetch(
        upstream, "/h", headers=[("User-Agent", values[0]), ("X-B", values[1])]
    )
    assert response.status == 200
    raw = peer.conns[0].requests[0].raw
    assert "User-Agent: app/日本\r\n".encode() in raw and b"X-B: raw\xff\r\n" in raw


async def test_a_connection_whose_upload_failed_is_not_reused(serve, client):
    """An early answer is complete and keep-alive, but the caller's upload then broke: the
    connection is mid-body, so the next request must get a new one."""
    caller_left = asyncio.Event()

    async def script(conn: Conn) -> None:
        head = await conn.head()
        if head is not None and b"/upload-A" in head:
            await conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad")
            await conn.until_closed()
        else:
            await echo_after(conn, head)

    async def echo_after(conn: Conn, head: bytes | None) -> None:
        if head is not None:
            target = head.split(b" ")[1]
            await conn.send(ok(target))
        await echo(conn)

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"
        await caller_left.wait()
        raise ConnectionResetError("caller A went away")

    peer = await serve(script)
    upstream = client(peer)
    response = await upstream.request("PUT", "/upload-A", [("Content-Length", "10")], body())
    assert (response.status, await response.read()) == (400, b"bad")
    caller_left.set()
    await asyncio.sleep(0)  # the upload fails in the same turn as the release below
    response.release()
    assert (await fetch(upstream, "/request-B"))[1] == b"/request-B"
    assert peer.accepted == 2
    assert b"/request-B" not in bytes(peer.conns[0].received)


async def test_upstream_that_stops_reading_an_upload_is_a_read_timeout(serve, client):
    async def script(conn: Conn) -> None:
        await conn.head()
        await asyncio.sleep(3)  # never reads the body, never answers

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * (1 << 20)

    peer = await serve(script)
    upstream = client(peer, read_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ReadTimeout):
        await upstream.request("PUT", "/up", [], body())
    assert time.monotonic() - started < 2.9  # before the peer's 3 s: the timeout, not its end


async def test_a_caller_that_stops_reading_at_the_end_frees_the_upstream_slot():
    """Forwarder: the last chunk of a chunked download drains under the idle timeout too, so
    a caller that stops reading (socket open, window full) cannot hold a connection slot."""
    from aiohttp import web

    from proxy.forward import Forwarder, Outcome, ResponsePlan
    from proxy.gcs.bodies import Body
    from proxy.gcs.parse import parse_request

    chunk = 16 << 10

    answering: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answering.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):
            writer.write(b"%x\r\n" % chunk + b"d" * chunk + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    gcs = await asyncio.start_server(answer, "127.0.0.1", 0)
    upstream = Upstream(
        f"http://127.0.0.1:{gcs.sockets[0].getsockname()[1]}",
        connect_timeout=1,
        read_timeout=5,
        limit=1,
    )
    forwarder = Forwarder(upstream, idle_timeout=0.5)
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        request.transport.get_extra_info("socket").setsockopt(  # type: ignore[union-attr]
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        operation = parse_request("GET", request.raw_path, request.headers)
        try:
            return await forwarder.forward(
                request, operation, Body(), "token", ResponsePlan(), Outcome()
            )
        finally:
            ended.set()

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    caller = socket.socket()
    caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    caller.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(caller, ("127.0.0.1", port))
        await loop.sock_sendall(
            caller, b"GET /storage/v1/b/bkt/o/obj?alt=media HTTP/1.1\r\nHost: p\r\n\r\n"
        )
        async with asyncio.timeout(4):  # never reading: the handler must still end
            await ended.wait()
        assert upstream._slots._value == 1  # private, read only here: the slot came back
    finally:
        caller.close()
        await runner.cleanup()
        gcs.close()
        for writer in answering:
            writer.close()
        await upstream.close()
