"""Benchmark: instructions the sidecar executes per request, counted by callgrind. A program, not a test.

    python tests/bench_instructions.py [--requests 300] [--exporter] [--env K=V ...] [--python PY]

Timings on a shared 2-CPU machine move by tens of percent from run to run; instruction
counts do not: the same code, inputs and environment give the same count whatever else
the machine is doing. This starts fake-gcs-server, the dev issuer and metadata server
and the sidecar (with bench.py's policy and a signed token) under
`valgrind --tool=callgrind --instr-atstart=no`, sends 100 warm-up 1 KiB GETs, switches
instrumentation on for `--requests` more on one keep-alive connection, one at a time,
switches it off, and prints the user-space instructions per request of the sidecar
process (every thread: audit writer and span batching included). Kernel work (the
socket calls) is not counted: compare changes of Python-level work with it, and keep
timing whole runs with `make bench`. `--exporter` adds an OTLP exporter (to a receiver
in its own process); `--env` sets more of the sidecar's environment (for instance
`OTEL_METRICS_EXPORTER=none`). Needs valgrind (Debian: valgrind).
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.devserver.issuer import DevIssuer, bind_socket, http_url, serve_socket  # noqa: E402
from proxy.devserver.metadata import DevMetadataServer, start_metadata  # noqa: E402
from tests.bench import AUD, BUCKET, SMALL, write_policy  # noqa: E402
from tests.bench_telemetry import ReceiverProcess  # noqa: E402
from tests.support.fakegcs import FakeGcs  # noqa: E402
from tests.support.proxyproc import ProxyProcess, isolated_env  # noqa: E402
from tests.support.threaded import LoopThread  # noqa: E402

WARM_UP = 100


def get(connection: http.client.HTTPConnection, token: str, count: int) -> None:
    for _ in range(count):
        connection.request("GET", SMALL, headers={"Authorization": f"Bearer {token}"})
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"the sidecar answered {answer.status}")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def total_instructions(out: Path) -> int:
    """The sum of the `totals:` lines of every dump (one file per thread or dump)."""
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--exporter", action="store_true", help="with an OTLP exporter")
    parser.add_argument("--python", default=sys.executable, help="the sidecar's interpreter")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="more env")
    parser.add_argument("--out", help="keep callgrind's dump here (for callgrind_annotate)")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("bench_instructions: needs valgrind (Debian: apt-get install valgrind)")
        return 1
    cleanups: list = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-instr-") as temp:
            tmp = Path(temp)
            loop = LoopThread("bench-servers")
            cleanups.append(loop.stop)
            sock = bind_socket("127.0.0.1", 0)
            issuer = DevIssuer(http_url("127.0.0.1", sock.getsockname()[1]))
            runner = loop.run(serve_socket(issuer.app(), sock))
            cleanups.append(lambda: loop.run(runner.cleanup()))
            metadata_runner, metadata_port = loop.run(
                start_metadata(DevMetadataServer(issuer=issuer))
            )
            cleanups.append(lambda: loop.run(metadata_runner.cleanup()))
            token = issuer.mint(
                audience=AUD, subject="bench@example.com", email="bench@example.com"
            )
            env = isolated_env(tmp, metadata_port)
            if args.exporter:
                receiver = ReceiverProcess()
                cleanups.append(receiver.stop)
                env = {**env, **receiver.env("http/protobuf")}
            env.update(item.split("=", 1) for item in args.env)
            gcs = FakeGcs().start()
            cleanups.append(gcs.stop)
            gcs.create_bucket(BUCKET)
            gcs.put_object(BUCKET, "bench/one-kib.bin", bytes(1024))
            out = Path(args.out) if args.out else tmp / "callgrind.out"
            wrapper = [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}",
            ]  # fmt: skip
            proxy = ProxyProcess(
                write_policy(tmp, issuer), gcs.url, env, python=args.python, wrapper=wrapper
            )
            cleanups.append(proxy.stop)
            proxy.wait_ready(timeout=180)
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
            get(connection, token, WARM_UP)
            control(proxy.process.pid, "-i", "on")
            get(connection, token, args.requests)
            time.sleep(0.5)  # the audit writer's batch, and spans' hand-off, counted too
            control(proxy.process.pid, "-i", "off")
            control(proxy.process.pid, "-d")
            time.sleep(1)
            total = total_instructions(out)
            connection.close()
            label = "with OTLP exporter" if args.exporter else "no exporter"
            label += "".join(f", {item}" for item in args.env)
            print(
                f"1 KiB GET, {label}: {total / args.requests:,.0f} instructions per request"
                f" ({args.requests} requests, {total:,} in all)"
            )
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
