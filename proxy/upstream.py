"""The upstream HTTP/1.1 client: one origin, a pool of keep-alive connections, bodies
streamed both ways with flow control.

Why not aiohttp's client: its ClientSession, ClientRequest and ClientResponse layers cost
about 140 us of CPU per small request more than this (bare relays on a 2-CPU machine: 330
vs 190 us per request), a fifth of everything the sidecar spends on a 1 KiB GET. Answers
are parsed by llhttp (httptools). On purpose this client has no redirects, cookies,
proxies, decompression or headers of its own: every header that leaves is the
forwarder's decision (proxy.gcs.build).

Errors: `ConnectError` (could not connect), `Disconnected` (the connection broke before the
whole answer arrived; `StaleConnection` when a pooled connection was found closed before
any of the answer: resending is safe, RFC 9112 9.3.1), `ConnectTimeout` and `ReadTimeout`
(no byte for `read_timeout` seconds while one was awaited). Anything raised by the body
being sent (a caller's stalled or broken upload) is raised as is.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER = 1 << 20  # body bytes buffered before reading from upstream pauses
LOW_WATER = HIGH_WATER // 4
KEEPALIVE = 15.0  # seconds a pooled connection may sit idle and still be reused
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # fullmatch only
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_NO_BODY_STATUS = frozenset({204, 304})


class UpstreamConnectionError(ConnectionError):
    """The upstream could not be reached, or its connection broke mid-answer."""


class ConnectError(UpstreamConnectionError):
    pass


class Disconnected(UpstreamConnectionError):
    pass


class StaleConnection(Disconnected):
    """A reused connection was closed before any of the answer arrived."""


class BodyLengthError(ValueError):
    """A streamed body did not have the length it announced: the exchange is abandoned."""


class UpstreamTimeoutError(TimeoutError):
    pass


class ConnectTimeout(UpstreamTimeoutError):
    pass


class ReadTimeout(UpstreamTimeoutError):
    pass


Body = bytes | AsyncIterable[bytes] | None


class Upstream:
    """Requests to one origin (`base_url`'s scheme, host and port) over pooled connections."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in {"http", "https"} or not url.hostname:
            raise ValueError(f"upstream must be an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._host_header = f"Host: {url.netloc.rpartition('@')[2]}\r\n".encode("ascii")
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Body = None,
    ) -> Response:
        """Send one request; the answer's head is returned, its body left to stream. The
        caller must `release()` the response (or use it as an async context manager)."""
        head, announced = self._head(method, target, headers, body)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise ConnectTimeout("every upstream connection stayed busy") from None
        try:
            connection = self._pooled() or await self._connect()
        except BaseException:
            self._slots.release()
            raise
        return await connection.exchange(method, head, body, announced)

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: Body
    ) -> tuple[bytes, int | None]:
        """The request head, and the length a streamed body announced (None: it goes chunked)."""
        if not _TOKEN.fullmatch(method) or not target.isascii() or _BAD_TARGET.search(target):
            raise ValueError("invalid request line")
        out = bytearray(f"{method} {target} HTTP/1.1\r\n".encode("ascii"))
        out += self._host_header
        announced: int | None = None
        for name, value in headers:
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise ValueError(f"invalid header {name!r}")
            lowered = name.lower()
            if lowered in {"host", "connection", "transfer-encoding", "keep-alive"}:
                continue  # connection-level: this client's business
            if lowered == "content-length":
                if isinstance(body, bytes):
                    continue  # written below from the body itself
                if not value.isdigit() or announced is not None or body is None:
                    raise ValueError("Content-Length must be one number, with a body")
                announced = int(value)
            # aiohttp decoded the caller's bytes as UTF-8 (surrogateescape): the same bytes go on.
            out += f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
        if isinstance(body, bytes):
            out += b"Content-Length: %d\r\n" % len(body)
        elif body is not None and announced is None:
            out += b"Transfer-Encoding: chunked\r\n"
        elif body is None and method in {"POST", "PUT", "PATCH"}:
            out += b"Content-Length: 0\r\n"
        out += b"\r\n"
        return bytes(out), announced

    def _pooled(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(now):
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
                # Happy eyeballs (RFC 8305), as aiohttp's client did: an address family that
                # silently drops SYNs (IPv6 without a route out) costs 0.25 s, not the timeout.
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=0.25, interleave=1
                )
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {self.host}:{self.port} in time") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return connection

    def _done(self, connection: _Connection, keep: bool) -> None:
        """A connection's exchange is over: back to the pool, or closed."""
        self._slots.release()
        if keep and not self._closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def _forget(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Response:
    """An answer's status and headers; its body is read with `chunks()` or `read()`."""

    def __init__(
        self, connection: _Connection, status: int, headers: CIMultiDictProxy[str], body: bool
    ) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = not body
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each piece as it was received (never joined)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= LOW_WATER:
                    self._connection.resume_reading()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._complete:
                return
            else:
                await self._connection.wait(self)

    async def read(self) -> bytes:
        if self._complete and self._error is None:  # all here already: a small answer's case
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self._connection.resume_reading()
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Give the connection back: pooled if the whole answer was read, else closed."""
        if not self._released:
            self._released = True
            self._connection.finish(reusable=self._complete and self._error is None)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- fed by the connection ---------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._exchanges = 0
        self._lost = False
        self._parser: Any = None
        self._method = ""
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._headers: list[tuple[str, str]] = []
        self._informational = False
        self._answered = False  # any byte of the current answer arrived
        self._remaining = 0  # bytes of a Content-Length body still to come (counted here)
        self._keep_alive = False
        self._writer: asyncio.Task[None] | None = None
        self._paused_reading = False
        self._can_write = True
        self._drained: asyncio.Future[None] | None = None

    # -- the exchange ------------------------------------------------------------------

    def usable(self, now: float) -> bool:
        return not self._lost and now - self.idle_since < KEEPALIVE

    async def exchange(
        self, method: str, head: bytes, body: Body, announced: int | None
    ) -> Response:
        assert self.transport is not None
        self._exchanges += 1
        self._method = method
        self._parser = httptools.HttpResponseParser(self)
        self._head = self._loop.create_future()
        self._response = None
        self._answered = False
        self._keep_alive = False
        self._remaining = 0
        self._headers = []
        self.resume_reading()  # a pooled connection may have been paused by its last answer
        if isinstance(body, bytes) and len(body) <= 65536:
            self.transport.write(head + body)  # one write for a small request
        else:
            self.transport.write(head)
            if isinstance(body, bytes):
                self.transport.write(body)
            elif body is not None:
                self._writer = self._loop.create_task(self._send(body, announced))
                self._writer.add_done_callback(self._sent)
        try:
            if self._writer is not None:
                # Uploading: the caller's pace, not upstream's. The answer's clock starts
                # once the body is sent (or upstream answers early).
                either: set[asyncio.Future[Any]] = {self._head, self._writer}
                await asyncio.wait(either, return_when=FIRST_COMPLETED)
            response: Response = await self._await(self._head)
            return response
        except BaseException:
            self._abandon()
            raise

    async def _send(self, body: AsyncIterable[bytes], announced: int | None) -> None:
        """A streamed body: chunked, or exactly the `announced` number of bytes (more or
        fewer would leave upstream reading the next request from the wrong place)."""
        assert self.transport is not None
        left = announced
        async for chunk in body:
            if not chunk:
                continue
            if self._lost:
                return
            if left is None:
                self.transport.write(b"%x\r\n" % len(chunk))
                self.transport.write(chunk)
                self.transport.write(b"\r\n")
            else:
                left -= len(chunk)
                if left < 0:
                    raise BodyLengthError("the body is longer than its Content-Length")
                self.transport.write(chunk)
            if not self._can_write:
                self._drained = self._loop.create_future()
                await self._await(self._drained)  # upstream stopped reading: a read timeout
        if left:
            raise BodyLengthError("the body ended before its Content-Length")
        if left is None and not self._lost:
            self.transport.write(b"0\r\n\r\n")

    def _sent(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # the body being sent failed: so does the exchange
            self._fail(error)
            self.close()

    async def wait(self, response: Response) -> None:
        """Until more of `response`'s body, its end or an error arrives."""
        response._waiter = self._loop.create_future()
        try:
            await self._await(response._waiter)
        finally:
            response._waiter = None

    async def _await(self, future: asyncio.Future[Any]) -> Any:
        timer = self._loop.call_later(self._upstream.read_timeout, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            error = ReadTimeout(f"no answer from upstream for {self._upstream.read_timeout:g} s")
            future.set_exception(error)
            self._fail(error)  # the answer's head, or its body, fails the same way
            self.close()

    def finish(self, *, reusable: bool) -> None:
        """The response was released."""
        writer = self._writer
        sent = writer is None or (
            writer.done() and not writer.cancelled() and writer.exception() is None
        )
        keep = reusable and sent and self._keep_alive and not self._lost
        if writer is not None and not writer.done():
            writer.cancel()
        self._writer = None
        self._parser = None
        self._upstream._done(self, keep)

    def _abandon(self) -> None:
        """The exchange failed before a response was handed out."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._writer = None
        self.close()
        self._upstream._slots.release()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self._lost = True

    def pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self._lost:
            self._paused_reading = False
            self.transport.resume_reading()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._remaining and self._parser is None:
            self._body(data)
            return
        if self._parser is None:  # nothing asked: a server speaking out of turn
            self.close()
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Disconnected(f"malformed answer from upstream: {exc}"))
            self.close()
            return
        if self._remaining:
            # The rest of a Content-Length body is counted here, not parsed: llhttp would
            # hand it over as a copy of every chunk.
            self._parser = None

    def _body(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        if len(data) > self._remaining:  # more than announced: never reuse this connection
            data = data[: self._remaining]
            self._keep_alive = False
        self._remaining -= len(data)
        response._feed(data)
        if not self._remaining:
            response._finish()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._upstream._forget(self)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        response = self._response
        if (
            exc is None
            and response is not None
            and not response._complete
            and self._until_eof(response)
        ):
            response._finish()  # a body delimited by the (orderly) end of the connection
            return
        if self._parser is None and not self._remaining:
            return  # between answers
        stale = self._exchanges > 1 and not self._answered
        kind = StaleConnection if stale else Disconnected
        self._fail(kind("upstream closed the connection before the whole answer"))

    def _until_eof(self, response: Response) -> bool:
        return (
            response.content_length is None
            and "chunked" not in response.headers.get("Transfer-Encoding", "").lower()
        )

    def pause_writing(self) -> None:
        self._can_write = False

    def resume_writing(self) -> None:
        self._can_write = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._response is not None:
            self._response._fail(error)

    # -- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            return  # a chunked body's trailer fields: not relayed, never another answer's
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, self._headers = self._headers, []
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._informational = True
            return
        self._keep_alive = self._parser.should_keep_alive()
        body = self._method != "HEAD" and status not in _NO_BODY_STATUS
        self._response = Response(self, status, CIMultiDictProxy(CIMultiDict(headers)), body)
        if self._head is not None and not self._head.done():
            self._head.set_result(self._response)
        if not body:  # llhttp would wait for a HEAD answer's announced body
            self._parser = None
        elif self._response.content_length and "Transfer-Encoding" not in self._response.headers:
            self._remaining = self._response.content_length

    def on_message_begin(self) -> None:
        if self._response is not None and self._response._complete:
            # Bytes after a final answer: not ours to interpret, and the connection's
            # state is unknown. The answer stands; the connection is never reused.
            self._keep_alive = False
            raise Disconnected("upstream sent more than one answer")

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None or self._parser is None:  # a body after HEAD, 204 or 304
            self._keep_alive = False
            return
        if self._remaining:  # llhttp never hands over more than Content-Length
            self._remaining -= len(body)
        response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._remaining = 0
        if self._response is not None:
            self._response._finish()
        self._parser = None
