"""A recording HTTP relay to put between the proxy and fake-gcs-server.

``RecordingRelay(target).start()`` serves on a free 127.0.0.1 port from its own
thread and event loop, so synchronous tests (urllib, google-cloud-storage) and
async tests (aiohttp) can both use it. Every request is forwarded verbatim:

- method, and the raw path + query exactly as received (``request.raw_path``; no
  decoding, re-encoding or dot-segment normalisation);
- all headers except ``Host`` (replaced by the target's) and the connection-level
  ``Connection``/``Keep-Alive``; ``Content-Length`` is kept, and a body that came in
  chunked goes upstream chunked (aiohttp writes its own ``Transfer-Encoding``);
- the body, streamed as it came (a gzip body is not decompressed on the way).

The response is streamed back as is (no decompression); a ``Location`` or
``X-Goog-Upload-URL`` header that points at the target is rewritten to point at the
relay, so resumable uploads keep going through it.

Each request is recorded as a :class:`Seen` in ``relay.seen`` (a snapshot list) once
its body has been forwarded and before any of the response reaches the client, so a
client that has its response can assert on ``seen`` at once. If the client drops the
connection mid-body, the request is still recorded (with the bytes that arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import yarl
from aiohttp import web

__all__ = ["BODY_PREFIX_LIMIT", "RecordingRelay", "Seen"]

BODY_PREFIX_LIMIT = 64 * 1024

# Not forwarded in either direction: they describe one connection, not the message.
# Transfer-Encoding is not copied but reproduced: a body without Content-Length is
# sent upstream chunked, exactly as a chunked body came in.
_REQUEST_DROP = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding"}
)
_RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_REWRITTEN = frozenset({"location", "x-goog-upload-url"})


@dataclass(frozen=True)
class Seen:
    """One request as the relay received it."""

    method: str
    raw_path: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body_prefix: bytes  # the first BODY_PREFIX_LIMIT bytes of the body

    @property
    def path(self) -> str:
        """``raw_path`` without the query string (still percent-encoded)."""
        return self.raw_path.partition("?")[0]

    @property
    def query(self) -> str:
        """The raw query string (without ``?``), still percent-encoded."""
        return self.raw_path.partition("?")[2]


def _lower_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


class RecordingRelay:
    """Forward everything to ``target`` (e.g. ``FakeGcs.url``) and record what passed."""

    def __init__(self, target: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target.rstrip("/")
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._url: str | None = None

    # ------------------------------------------------------------------ records

    @property
    def seen(self) -> list[Seen]:
        """A snapshot of the requests recorded so far, oldest first."""
        with self._lock:
            return list(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("relay not started")
        return self._url

    def start(self) -> str:
        """Start serving in a background thread; returns the relay's base URL."""
        if self._thread is not None:
            raise RuntimeError("relay already started")
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._url = loop.run_until_complete(self._astart())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._astop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="RecordingRelay", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._loop = None
            raise failure[0]
        return self.url

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        self._thread = None
        self._loop = None
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)

    def __enter__(self) -> RecordingRelay:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _astart(self) -> str:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=1024**4)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://{self._host}:{port}"

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ relay

    def _rewrite(self, value: str) -> str:
        if self._url is not None and value.startswith(self.target):
            rest = value[len(self.target) :]
            if rest == "" or rest[0] in "/?#":
                return self._url + rest
        return value

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        received = _lower_headers(request.headers.items())
        forward = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}
        prefix = bytearray()
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self._record(Seen(request.method, request.raw_path, received, bytes(prefix)))

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_any():
                room = BODY_PREFIX_LIMIT - len(prefix)
                if room > 0:
                    prefix.extend(chunk[:room])
                yield chunk

        has_body = request.body_exists
        url = yarl.URL(self.target + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=forward,
                data=body() if has_body else None,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                compress=None,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return web.json_response(
                {"error": {"code": 502, "message": f"relay: upstream failed: {exc!r}"}},
                status=502,
            )
        finally:
            # The body has been forwarded (or the client went away): record before
            # any of the response goes back.
            record()
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                lname = name.lower()
                if lname in _RESPONSE_DROP:
                    continue
                response.headers.add(name, self._rewrite(value) if lname in _REWRITTEN else value)
            if "Content-Length" in upstream.headers and upstream.content_length is not None:
                response.content_length = upstream.content_length
            # A client that goes away mid-response is not an error for the relay; an
            # upstream that breaks mid-body propagates, so the client sees a cut body.
            with contextlib.suppress(ConnectionResetError):
                await response.prepare(request)
                if request.method != "HEAD":
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                await response.write_eof()
        return response
