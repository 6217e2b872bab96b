"""Real faults between the proxy and its neighbours: a TCP relay that can refuse, reset, hang
or answer errors, and restartable loopback servers (same port, so "it came back")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from proxy.devserver.issuer import bind_socket, serve_socket
from tests.support.threaded import LoopThread

_HEAD_END = b"\r\n\r\n"


class FaultyUpstream:
    """A TCP relay in front of `target_port`. `mode`: "pass" (relay bytes), "reset" (read the
    request head and one body byte if any, then RST), "hang" (read it, never answer).
    `statuses` are answered (Connection: close), one per request, before anything else.
    `stop()` closes the port (connections refused); `start()` reopens the same port."""

    def __init__(self, loop_thread: LoopThread, target_port: int) -> None:
        self._loop_thread = loop_thread
        self.target_port = target_port
        self.port = 0
        self.mode = "pass"
        self.statuses: list[int] = []
        self.requests: list[str] = []  # the request line of every request that reached us
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyUpstream:
        self._loop_thread.run(self._start())
        return self

    async def _start(self) -> None:
        sock = bind_socket("127.0.0.1", self.port)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._handle, sock=sock)

    def stop(self) -> None:
        self._loop_thread.run(self._stop())

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._drop_all()

    def set(self, mode: str, statuses: list[int] | None = None) -> None:
        """Switch behaviour; connections opened under the old behaviour are cut."""

        def apply() -> None:
            self.mode, self.statuses = mode, list(statuses or [])
            self.requests.clear()
            self._drop_all()

        self._loop_thread.loop.call_soon_threadsafe(apply)
        self._loop_thread.run(asyncio.sleep(0.05))

    def _drop_all(self) -> None:
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            head = await reader.readuntil(_HEAD_END)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        self.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
        if self.statuses:
            await _answer(writer, self.statuses.pop(0))
        elif self.mode == "reset":
            if _has_body(head):
                await reader.read(1)  # the body has started: the proxy cannot replay it now
            _reset(writer)
        elif self.mode == "hang":
            await reader.read()  # until the proxy gives up
            writer.close()
        else:
            await self._relay(head, reader, writer)
        self._open.discard(writer)

    async def _relay(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(writer)
            return
        up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


def _has_body(head: bytes) -> bool:
    lower = head.lower()
    return b"transfer-encoding: chunked" in lower or (
        b"content-length:" in lower and b"content-length: 0\r\n" not in lower
    )


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        _reset(sink)


async def _answer(writer: asyncio.StreamWriter, status: int) -> None:
    body = json.dumps(
        {"error": {"code": status, "message": "injected", "errors": [{"reason": "injected"}]}}
    ).encode()
    writer.write(
        f"HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Restartable:
    """An aiohttp app on a fixed loopback port that can be stopped and started again."""

    def __init__(
        self, loop_thread: LoopThread, make_app: Callable[[], web.Application], port: int = 0
    ) -> None:
        self._loop_thread = loop_thread
        self._make_app = make_app
        self.port = port
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None

    def start(self) -> Restartable:
        self._sock = bind_socket("127.0.0.1", self.port)
        self.port = self._sock.getsockname()[1]
        self._runner = self._run(serve_socket(self._make_app(), self._sock))
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._loop_thread.run(coro)
