"""Load for benchmarks: wrk runs, curl transfers of large objects, RSS of a process tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# wrk calls done() once at the end; its summary counts status >= 400 as errors.status.
WRK_REPORT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %.1f, "p99_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class WrkResult:
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    requests: int
    failures: int  # non-2xx/3xx answers, socket errors and timeouts


def wrk(
    url: str, headers: dict[str, str], *, connections: int, seconds: float, script: Path
) -> WrkResult:
    threads = max(1, min(connections, os.cpu_count() or 1))
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
        "-s", str(script),
    ]  # fmt: skip
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run([*command, url], capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith('{"requests"'))
    data = json.loads(line)
    failures = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        rate=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        requests=data["requests"],
        failures=failures,
    )


@dataclass(frozen=True)
class Transfer:
    status: int
    received: int
    sent: int
    seconds: float


def _curl(arguments: list[str], headers: dict[str, str]) -> subprocess.Popen[str]:
    command = ["curl", "-s", "-o", "/dev/null", "-H", "Expect:"]
    command += ["-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    return subprocess.Popen([*command, *arguments], stdout=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen[str]) -> Transfer:
    out, _ = process.communicate(timeout=600)
    status, down, up, seconds = out.split()
    return Transfer(int(status), int(float(down)), int(float(up)), float(seconds))


def download(url: str, headers: dict[str, str], parallel: int = 1) -> list[Transfer]:
    """GET `url` with `parallel` concurrent curl processes, bodies discarded."""
    processes = [_curl([url], headers) for _ in range(parallel)]
    return [_finish(p) for p in processes]


def upload(url: str, headers: dict[str, str], source: Path) -> Transfer:
    """POST the file as the body (streamed by curl, with its Content-Length)."""
    headers = {"Content-Type": "application/octet-stream", **headers}
    return _finish(_curl(["-X", "POST", "-T", str(source), url], headers))


def have_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(child) for child in text.split()]
    except OSError:
        pass
    return found


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by `pids` and all their descendants (every thread)."""
    total, pending = 0, list(pids)
    while pending:
        pid = pending.pop()
        pending += _children(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                    total += int(stat.read().split()[0])
        except OSError:
            continue  # gone meanwhile
    return total / 1e9


def tree_rss_mib(pid: int) -> float:
    """VmRSS of `pid` and all its descendants, in MiB."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        total += _rss_kib(current)
        pending += _children(current)
    return total / 1024


class PeakRss:
    """Samples a process tree's RSS in a thread while the `with` block runs; `peak` in MiB."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_mib(self.pid))
