"""Benchmark: what telemetry costs the sidecar's throughput. A program, not a test.

    python tests/bench_telemetry.py [--seconds 4] [--rounds 3] [--concurrency 8]

Starts fake-gcs-server, the dev issuer and metadata server, a local OTLP receiver (both
protocols), and four sidecar processes:

    bare     the pipeline with tracing and metrics hooks removed (audit records still written)
    off      the real sidecar, no OTEL_* endpoint (the default)
    http     exporting traces and metrics over OTLP http/protobuf to the local receiver
    grpc     exporting traces and metrics over OTLP grpc to the local receiver

Each round drives every variant in turn with the same load (authorised 1 KiB media GETs,
`--concurrency` connections for `--seconds`), and the median requests/s of each variant is
printed with its ratio to `bare` and to `off`, all measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.devserver.issuer import DevIssuer, bind_socket, http_url, serve_socket  # noqa: E402
from proxy.devserver.metadata import DevMetadataServer, start_metadata  # noqa: E402
from tests.support.fakegcs import FakeGcs  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.support.proxyproc import ProxyProcess, free_port, isolated_env  # noqa: E402
from tests.support.threaded import LoopThread  # noqa: E402

AUD = "bench"
BUCKET = "bench-data"
OBJECT = "bench/one-kib.bin"
TARGET = f"/storage/v1/b/{BUCKET}/o/bench%2Fone-kib.bin?alt=media"
BARE = "bare"


def bare_serve(argv: list[str]) -> int:
    """`serve` with the tracing/metrics hooks replaced by the least the pipeline needs."""
    from aiohttp import web

    from proxy import app, audit, cli
    from proxy.components import RECORD, Components

    async def audit_only(
        request: web.BaseRequest, handler: app.Handler, components: Components
    ) -> web.StreamResponse:
        path, _, _ = request.raw_path.partition("?")
        record = audit.AuditRecord(
            request.method, path, request.headers.get("User-Agent"), request.remote
        )
        request[RECORD] = record
        try:
            response = await handler(request)
            record.status = response.status
            return response
        finally:
            if record.decision is not None or record.status == 401:
                audit.write(record, components.project)

    @contextlib.contextmanager
    def nothing(*_: object) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def upstream(
        _: object, __: object, outcome: object, record: audit.AuditRecord
    ) -> Iterator[None]:
        try:
            yield
        finally:
            record.response_bytes = outcome.response_bytes  # type: ignore[attr-defined]

    app.trace_and_audit = audit_only  # type: ignore[assignment]
    app.authenticating = nothing  # type: ignore[assignment]
    app.authorizing = nothing  # type: ignore[assignment]
    app.calling_upstream = upstream  # type: ignore[assignment]
    return cli.main(argv)


def policy(tmp: Path, issuer: DevIssuer) -> Path:
    path = tmp / "policy.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {issuer.issuer_url}
                audiences: ["{AUD}"]
            rules:
              - id: bench-read
                principals: ["user:bench@example.com"]
                bucket: {BUCKET}
                prefixes: ["bench/"]
                verbs: [read]
            """
        )
    )
    return path


class BareProxy(ProxyProcess):
    """A ProxyProcess whose process runs `bare_serve` instead of `python -m proxy serve`."""

    def __init__(self, policy_path: Path, upstream: str, env: dict[str, str]) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log = policy_path.parent / f"proxy-{self.port}.log"
        argv = [
            "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--policy", str(policy_path),
            "--upstream", upstream,
        ]  # fmt: skip
        code = f"import sys; from tests.bench_telemetry import bare_serve; sys.exit(bare_serve({argv!r}))"
        self._out = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def receiver_main() -> None:
    """The OTLP receiver in its own process, so decoding does not slow the load generator."""
    with OtlpReceiver() as receiver:
        print(receiver.grpc_endpoint, receiver.http_endpoint, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
        spans = receiver.spans()
        print(f"{len(spans)} spans {sorted({s.protocol for s in spans})}", flush=True)


class ReceiverProcess:
    def __init__(self) -> None:
        code = "from tests.bench_telemetry import receiver_main; receiver_main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None
        self.grpc, self.http = self.process.stdout.readline().split()

    def env(self, protocol: str) -> dict[str, str]:
        endpoint = self.grpc if protocol == "grpc" else self.http
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}

    def stop(self) -> str:
        summary, _ = self.process.communicate("", timeout=30)
        return summary.strip()


async def drive(url: str, token: str, seconds: float, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def worker(deadline: float) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with session.get(TARGET, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"unexpected {response.status}")
                done += 1

        warm = time.perf_counter() + 0.5
        await asyncio.gather(*(worker(warm) for _ in range(concurrency)))
        done = 0
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    loop = LoopThread("bench-servers")
    sock = bind_socket("127.0.0.1", 0)
    issuer = DevIssuer(http_url("127.0.0.1", sock.getsockname()[1]))
    issuer_runner = loop.run(serve_socket(issuer.app(), sock))
    metadata_runner, metadata_port = loop.run(start_metadata(DevMetadataServer(issuer=issuer)))
    token = issuer.mint(audience=AUD, subject="bench", email="bench@example.com", lifetime=3600)
    proxies: dict[str, ProxyProcess] = {}
    rates: dict[str, list[float]] = {}
    receiver = ReceiverProcess()
    with tempfile.TemporaryDirectory() as scratch, FakeGcs() as gcs:
        tmp = Path(scratch)
        gcs.create_bucket(BUCKET)
        gcs.put_object(BUCKET, OBJECT, bytes(1024))
        path = policy(tmp, issuer)
        env = isolated_env(tmp, metadata_port)
        try:
            proxies[BARE] = BareProxy(path, gcs.url, env)
            proxies["off"] = ProxyProcess(path, gcs.url, env)
            for protocol, name in (("http/protobuf", "http"), ("grpc", "grpc")):
                proxies[name] = ProxyProcess(path, gcs.url, {**env, **receiver.env(protocol)})
            for proxy in proxies.values():
                proxy.wait_ready()
            rates = {name: [] for name in proxies}
            for round_ in range(args.rounds):
                for name, proxy in proxies.items():
                    rate = asyncio.run(drive(proxy.url, token, args.seconds, args.concurrency))
                    rates[name].append(rate)
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{n} {r[-1]:.0f}/s" for n, r in rates.items()),
                    flush=True,
                )
        finally:
            for proxy in proxies.values():
                proxy.stop()
            summary = receiver.stop()
            loop.run(metadata_runner.cleanup())
            loop.run(issuer_runner.cleanup())
            loop.stop()
    report(rates, args)
    print(f"\nthe receiver decoded {summary}")
    return 0


def report(rates: dict[str, list[float]], args: argparse.Namespace) -> None:
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"\nmedian of {args.rounds} rounds, {args.seconds:.0f}s each, "
        f"{args.concurrency} connections, 1 KiB media GETs"
    )
    print(f"{'variant':8} {'req/s':>8} {'vs bare':>8} {'vs off':>8}")
    for name, value in median.items():
        print(f"{name:8} {value:8.0f} {value / median[BARE]:8.3f} {value / median['off']:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
