"""The real sidecar as a subprocess (`python -m proxy serve`), with loopback stand-ins around it."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port for a sidecar to listen on, below the kernel's ephemeral range: a port found
    free there by bind(0) can be taken by any outgoing connection (the tests make
    thousands) before the sidecar binds it, which failed a run with EADDRINUSE. Never
    the same port twice in one test session."""
    if _EPHEMERAL_LOW > 21000:
        for _ in range(500):
            port = random.randrange(20000, _EPHEMERAL_LOW)  # noqa: S311 - not a secret
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(tmp: Path, metadata_port: int, **extra: str) -> dict[str, str]:
    """No ambient Google credentials: only the metadata stand-in can vouch for the sidecar."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "CLOUDSDK_CONFIG": str(tmp / "gcloud"),
        "GCE_METADATA_HOST": f"127.0.0.1:{metadata_port}",
        "GCE_METADATA_IP": f"127.0.0.1:{metadata_port}",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


class ProxyProcess:
    def __init__(
        self,
        policy: Path,
        upstream: str,
        env: dict[str, str],
        *extra_args: str,
        python: str = sys.executable,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log = policy.parent / f"proxy-{self.port}.log"
        command = [
            *wrapper, python, "-m", "proxy", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--policy", str(policy),
            "--upstream", upstream,
            *extra_args,
        ]  # fmt: skip
        self._out = self.log.open("wb")
        self.process = subprocess.Popen(
            command, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"proxy not ready in {timeout}s:\n{self.output()}")

    def audit_records(self, resource: str, timeout: float = 5) -> list[dict[str, Any]]:
        """Audit records for `resource`, waiting for them: they are written after the response."""
        deadline = time.monotonic() + timeout
        while True:
            records = [
                record
                for line in self.output().splitlines()
                if line.startswith("{") and '"audit"' in line
                for record in [json.loads(line)]
                if record.get("audit", {}).get("resource") == resource
            ]
            if records or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return self.process.returncode
