"""Benchmark: the sidecar side by side with nginx and with no proxy at all. A program, not a test.

    python tests/bench.py [--seconds 5] [--rounds 3] [--json PATH] [--python PY]   (or: make bench)

Starts fake-gcs-server (the upstream), nginx in front of it (the reference proxy: keep-alive
upstream, no buffering either way), the dev issuer and metadata server, an OTLP receiver in
its own process, and the sidecar three times (--workers 1; --workers N as nginx's
worker_processes, N = the CPUs by default; --workers 1 exporting OTLP http/protobuf to the
receiver), each with a real signed token and a realistic policy. Then it measures,
interleaving the contestants round by round so that a noisy machine hurts them alike:

1. 1 KiB object GETs at 32 connections (wrk): direct, nginx, the sidecars.
2. Added latency at 1 connection: p50 and p99 of the sidecar minus direct.
3. 256 MiB GET and upload (uploadType=media), direct vs sidecar (and nginx, for reference);
   4 concurrent 256 MiB GETs.
4. Peak RSS of the sidecar's process tree during those streams at 64 MiB, 256 MiB, 1 GiB;
   idle RSS.
5. Cold start: process start to /readyz 200, median of 3 (without and with an exporter).
6. Policy decision time at 10 / 1,000 / 100,000 rules (tests/bench_policy.py); token
   verification, first sight vs a repeated token.

Prints one JSON object, then a Markdown table of every figure against its target. Needs
`wrk`, `nginx` and `curl` (Debian: nginx-light wrk curl); `make bench` installs them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.devserver.issuer import DevIssuer, bind_socket, http_url, serve_socket  # noqa: E402
from proxy.devserver.metadata import DevMetadataServer, start_metadata  # noqa: E402
from proxy.identity import JwtVerifier  # noqa: E402
from proxy.policy import compile_policy, load_policy  # noqa: E402
from tests import bench_policy  # noqa: E402
from tests.bench_telemetry import ReceiverProcess  # noqa: E402
from tests.support import dockerfile, loadgen  # noqa: E402
from tests.support.fakegcs import FakeGcs  # noqa: E402
from tests.support.nginx import NginxProxy  # noqa: E402
from tests.support.proxyproc import ProxyProcess, isolated_env  # noqa: E402
from tests.support.threaded import LoopThread  # noqa: E402

AUD = "https://bench-app-abc123-uc.a.run.app"
BUCKET = "bench-data"
SMALL = "/storage/v1/b/bench-data/o/bench%2Fone-kib.bin?alt=media"
MIB = 1 << 20
STREAM_SIZES = {"64MiB": 64 * MIB, "256MiB": 256 * MIB, "1GiB": 1024 * MIB}
MEDIAN_STREAMS = "256MiB"
SIZED = "sidecar xN"  # --workers N, N = the CPUs (as nginx's worker_processes)
TARGETS = {
    "small_get_sidecar_vs_nginx": ">= 0.5",
    "added_p50_ms": "<= 0.5",
    "large_get_sidecar_vs_direct": ">= 0.8",
    "large_put_sidecar_vs_direct": ">= 0.8",
    "peak_rss_mib": "<= 100, flat 64 MiB -> 1 GiB",
    "idle_rss_mib": "<= 60",
    "cold_start_s": "<= 0.8",
    "otel_cost": "<= 10%",
    "failures": "0",
}


def write_policy(tmp: Path, issuer: DevIssuer) -> Path:
    """A policy shaped like a real one: an issuer with options, groups, per-user homes, deny carve-outs."""
    path = tmp / "policy.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            mode: enforce
            issuers:
              - issuer: {issuer.issuer_url}
                audiences: ["{AUD}"]
                algorithms: [RS256, ES256]
                leeway_seconds: 30
            groups:
              analysts: ["user:alice@example.com", "domain:analytics.example.com"]
              loaders: ["user:bench@example.com", "serviceAccount:etl@acme.iam.gserviceaccount.com"]
            rules:
              - id: analysts-read-reports
                principals: ["group:analysts"]
                bucket: acme-reports
                prefixes: ["reports/", "shared/"]
                verbs: [read, list]
              - id: per-user-home
                principals: ["domain:example.com"]
                bucket: acme-home
                prefixes: ["home/${{email}}/"]
                verbs: [read, list, write, delete]
              - id: loaders-bench
                principals: ["group:loaders"]
                bucket: {BUCKET}
                prefixes: ["bench/", "big/"]
                verbs: [read, list, write, delete]
              - id: never-secrets
                effect: deny
                principals: ["allAuthenticatedUsers"]
                bucket: {BUCKET}
                prefixes: ["bench/secret/"]
                verbs: ["*"]
              - id: never-report-secrets
                effect: deny
                principals: ["allAuthenticatedUsers"]
                bucket: acme-reports
                prefixes: ["reports/secret/"]
                verbs: ["*"]
            """
        )
    )
    return path


# -- the contestants --------------------------------------------------------------------


class Bench:
    """Everything the measurements need, started once."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp, self.args = tmp, args
        self._cleanups: list[Callable[[], object]] = []
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.loop = LoopThread("bench-servers")
        self._cleanups.append(self.loop.stop)
        sock = bind_socket("127.0.0.1", 0)
        self.issuer = DevIssuer(http_url("127.0.0.1", sock.getsockname()[1]))
        issuer_runner = self.loop.run(serve_socket(self.issuer.app(), sock))
        self._cleanups.append(lambda: self.loop.run(issuer_runner.cleanup()))
        metadata = DevMetadataServer(issuer=self.issuer)
        metadata_runner, metadata_port = self.loop.run(start_metadata(metadata))
        self._cleanups.append(lambda: self.loop.run(metadata_runner.cleanup()))
        self.token = self.mint("bench@example.com")
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.policy = write_policy(self.tmp, self.issuer)
        # The image's interpreter settings (PYTHONDONTWRITEBYTECODE, ...).
        image = dockerfile.image_env(ROOT / "Dockerfile")
        self.env = isolated_env(self.tmp, metadata_port, **image)
        self.gcs = FakeGcs().start()
        self._cleanups.append(self.gcs.stop)
        self.gcs.create_bucket(BUCKET)
        self.gcs.put_object(BUCKET, "bench/one-kib.bin", os.urandom(1024))
        self.receiver = ReceiverProcess()
        self._cleanups.append(self.receiver.stop)
        self.otel_env = {**self.env, **self.receiver.env("http/protobuf")}
        upstream = f"127.0.0.1:{self.gcs.port}"
        self.nginx = NginxProxy(self.tmp / "nginx", upstream, self.args.workers)
        self._cleanups.append(self.nginx.stop)
        self.sidecar = self.start_sidecar(self.env, 1)
        self.sidecars = self.start_sidecar(self.env, self.args.workers)
        self.otel = self.start_sidecar(self.otel_env, 1)
        self.nginx.wait_ready(SMALL)
        self.urls = {
            "direct": self.gcs.url,
            "nginx": self.nginx.url,
            "sidecar": self.sidecar.url,
            SIZED: self.sidecars.url,
            "sidecar+otel": self.otel.url,
        }

    def mint(self, email: str) -> str:
        return self.issuer.mint(audience=AUD, subject=email, email=email, lifetime=3 * 3600)

    def start_sidecar(self, env: dict[str, str], workers: int) -> ProxyProcess:
        proxy = ProxyProcess(
            self.policy, self.gcs.url, env, "--workers", str(workers), python=self.args.python
        )
        self._cleanups.append(proxy.stop)
        proxy.wait_ready()
        return proxy

    def stop(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()


# -- 1, 2: small objects ---------------------------------------------------------------


def small_gets(bench: Bench, script: Path) -> dict[str, Any]:
    args = bench.args
    rates: dict[str, list[float]] = {name: [] for name in bench.urls}
    latency: dict[str, list[tuple[float, float]]] = {"direct": [], "sidecar": []}
    failures = 0
    for round_ in range(args.rounds):
        for name, url in bench.urls.items():
            result = loadgen.wrk(
                url + SMALL, bench.headers, connections=32, seconds=args.seconds, script=script
            )
            rates[name].append(result.rate)
            failures += result.failures
        for name in latency:
            result = loadgen.wrk(
                bench.urls[name] + SMALL,
                bench.headers,
                connections=1,
                seconds=args.seconds,
                script=script,
            )
            latency[name].append((result.p50_ms, result.p99_ms))
            failures += result.failures
        progress(
            f"round {round_ + 1}: "
            + ", ".join(f"{n} {r[-1]:.0f}/s" for n, r in rates.items())
            + f"; 1-conn p50 direct {latency['direct'][-1][0]:.3f} ms,"
            f" sidecar {latency['sidecar'][-1][0]:.3f} ms"
        )
    rate = {name: statistics.median(values) for name, values in rates.items()}
    p50 = {n: statistics.median(v[0] for v in values) for n, values in latency.items()}
    p99 = {n: statistics.median(v[1] for v in values) for n, values in latency.items()}
    return {
        "rps": {name: round(value) for name, value in rate.items()},
        "sidecar_vs_nginx": rate[SIZED] / rate["nginx"],
        "one_worker_vs_nginx": rate["sidecar"] / rate["nginx"],
        "sidecar_vs_direct": rate[SIZED] / rate["direct"],
        "nginx_vs_direct": rate["nginx"] / rate["direct"],
        "otel_cost": 1 - rate["sidecar+otel"] / rate["sidecar"],
        "latency_ms": {"p50": p50, "p99": p99},
        "added_p50_ms": p50["sidecar"] - p50["direct"],
        "added_p99_ms": p99["sidecar"] - p99["direct"],
        "failures": failures,
    }


# -- 3, 4: large objects and memory ----------------------------------------------------


def large_streams(bench: Bench) -> dict[str, Any]:
    source = bench.tmp / "object.bin"
    sidecar_pid = bench.sidecar.process.pid
    idle = loadgen.tree_rss_mib(sidecar_pid)
    result: dict[str, Any] = {"idle_rss_mib": idle, "sizes": {}}
    failures = 0
    for label, size in STREAM_SIZES.items():
        with source.open("wb") as out:
            out.truncate(size)  # sparse zeros: the disk is not what is measured
        name = f"big/{label}.bin"
        get_path = f"/storage/v1/b/{BUCKET}/o/{name.replace('/', '%2F')}?alt=media"
        put_path = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}"
        rounds = bench.args.rounds if label == MEDIAN_STREAMS else 1
        speeds: dict[str, list[float]] = {}
        peak = 0.0

        def timed(
            key: str,
            transfers: list[loadgen.Transfer],
            size: int = size,
            speeds: dict[str, list[float]] = speeds,
        ) -> None:
            nonlocal failures
            moved = (max(t.received, t.sent) for t in transfers)
            failures += sum(1 for t in transfers if not 200 <= t.status < 300)
            failures += sum(1 for n in moved if n != size)
            seconds = max(t.seconds for t in transfers)
            speeds.setdefault(key, []).append(len(transfers) * size / MIB / seconds)

        for _ in range(rounds):
            for who in ("direct", "nginx", "sidecar"):
                url = bench.urls[who]
                if who == "nginx" and label != MEDIAN_STREAMS:
                    continue  # the reference proxy's ratio, at one size
                with loadgen.PeakRss(sidecar_pid) as rss:
                    timed(f"put_{who}", [loadgen.upload(url + put_path, bench.headers, source)])
                    timed(f"get_{who}", loadgen.download(url + get_path, bench.headers))
                    if who != "nginx":
                        timed(f"get4_{who}", loadgen.download(url + get_path, bench.headers, 4))
                if who == "sidecar":
                    peak = max(peak, rss.peak)
        medians = {key: statistics.median(values) for key, values in speeds.items()}
        result["sizes"][label] = {"mib_per_s": medians, "peak_rss_mib": peak}
        progress(
            f"{label}: GET {medians['get_sidecar']:.0f} vs {medians['get_direct']:.0f} MiB/s,"
            f" PUT {medians['put_sidecar']:.0f} vs {medians['put_direct']:.0f} MiB/s,"
            f" 4xGET {medians['get4_sidecar']:.0f} vs {medians['get4_direct']:.0f} MiB/s,"
            f" peak RSS {peak:.1f} MiB"
        )
        bench.gcs.delete_object(BUCKET, name)
    source.unlink()
    main = result["sizes"][MEDIAN_STREAMS]["mib_per_s"]
    peaks = [s["peak_rss_mib"] for s in result["sizes"].values()]
    result.update(
        get_sidecar_vs_direct=main["get_sidecar"] / main["get_direct"],
        put_sidecar_vs_direct=main["put_sidecar"] / main["put_direct"],
        get4_sidecar_vs_direct=main["get4_sidecar"] / main["get4_direct"],
        get_nginx_vs_direct=main["get_nginx"] / main["get_direct"],
        put_nginx_vs_direct=main["put_nginx"] / main["put_direct"],
        peak_rss_mib=max(peaks),
        peak_rss_spread_mib=max(peaks) - min(peaks),
        idle_rss_after_mib=loadgen.tree_rss_mib(sidecar_pid),
        idle_rss_sized_tree_mib=loadgen.tree_rss_mib(bench.sidecars.process.pid),
        failures=failures,
    )
    return result


# -- 5: cold start ---------------------------------------------------------------------


def ready_after(bench: Bench, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proxy = ProxyProcess(bench.policy, bench.gcs.url, env, python=bench.args.python)
    try:
        while proxy.process.poll() is None and time.perf_counter() - started < 30:
            try:
                with urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.005)
        raise RuntimeError(f"sidecar never became ready:\n{proxy.output()}")
    finally:
        proxy.stop()


def settle(bench: Bench, quiet: float = 0.02, limit: float = 15.0) -> None:
    """Wait until the contestants already started are idle (ready is not the same as done
    starting: their upstream token and imports still run in threads), so that their last
    start-up work does not slow the cold starts measured next."""
    pids = [p.process.pid for p in (bench.sidecar, bench.sidecars, bench.otel)]
    deadline = time.monotonic() + limit
    before = loadgen.tree_cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = loadgen.tree_cpu_seconds(pids)
        if now - before < quiet:
            return
        before = now


def cold_start(bench: Bench) -> dict[str, float]:
    settle(bench)
    plain = [ready_after(bench, bench.env) for _ in range(3)]
    otel = [ready_after(bench, bench.otel_env) for _ in range(3)]
    return {"no_exporter_s": statistics.median(plain), "otlp_exporter_s": statistics.median(otel)}


# -- 6: in-process costs ---------------------------------------------------------------


def policy_decisions() -> dict[str, float]:
    result = {}
    for size in bench_policy.SIZES:
        index = compile_policy(bench_policy.synthetic_policy(size))
        result[str(size)] = bench_policy.median_ns(index, bench_policy.workload(size), 30) / 1000
    return result


async def _token_costs(bench: Bench, count: int) -> dict[str, float]:
    issuers = load_policy(bench.policy).issuers
    tokens = [bench.mint(f"user{i}@example.com") for i in range(count + 1)]
    async with aiohttp.ClientSession() as session:
        verifier = JwtVerifier(issuers, session)
        await verifier.verify({"authorization": f"Bearer {tokens[0]}"})  # keys fetched once

        async def each(token_for: Callable[[int], str]) -> float:
            started = time.perf_counter()
            for i in range(count):
                await verifier.verify({"authorization": f"Bearer {token_for(i)}"})
            return (time.perf_counter() - started) / count * 1e6

        first = await each(lambda i: tokens[i + 1])
        repeated = await each(lambda _: tokens[0])
    return {"first_sight_us": first, "repeated_us": repeated}


def token_costs(bench: Bench) -> dict[str, float]:
    return asyncio.run(_token_costs(bench, 300))


# -- report ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(total_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    small, large = r["small"], r["large"]
    return {
        "small_get_sidecar_vs_nginx": small["sidecar_vs_nginx"] >= 0.5,
        "added_p50_ms": small["added_p50_ms"] <= 0.5,
        "large_get_sidecar_vs_direct": large["get_sidecar_vs_direct"] >= 0.8,
        "large_put_sidecar_vs_direct": large["put_sidecar_vs_direct"] >= 0.8,
        "peak_rss_mib": large["peak_rss_mib"] <= 100 and large["peak_rss_spread_mib"] <= 10,
        "idle_rss_mib": large["idle_rss_mib"] <= 60,
        "cold_start_s": r["cold_start"]["no_exporter_s"] <= 0.8,
        "otel_cost": small["otel_cost"] <= 0.10,
        "failures": small["failures"] + large["failures"] == 0,
    }


def table(r: dict[str, Any]) -> str:
    small, large, cold = r["small"], r["large"], r["cold_start"]
    ok = r["targets_met"]
    sizes = large["sizes"]
    main = sizes[MEDIAN_STREAMS]["mib_per_s"]
    rps = small["rps"]
    m = r["machine"]
    mark = {True: "met", False: "**missed**"}
    rows = [
        ("1 KiB GET, 32 conns (req/s)",
         f"direct {rps['direct']}, nginx {rps['nginx']}, sidecar --workers {r['workers']}"
         f" {rps[SIZED]} (--workers 1: {rps['sidecar']}, {small['one_worker_vs_nginx']:.2f} of nginx)",
         f"sidecar/nginx **{small['sidecar_vs_nginx']:.2f}**", ">= 0.5",
         mark[ok["small_get_sidecar_vs_nginx"]]),
        ("telemetry: OTLP exporter on vs off",
         f"{rps['sidecar+otel']} vs {rps['sidecar']} req/s",
         f"cost **{small['otel_cost'] * 100:.0f}%**", "<= 10%", mark[ok["otel_cost"]]),
        ("added latency, 1 conn (p50 / p99)",
         f"direct {small['latency_ms']['p50']['direct']:.3f} / "
         f"{small['latency_ms']['p99']['direct']:.3f} ms",
         f"**+{small['added_p50_ms']:.3f}** / +{small['added_p99_ms']:.3f} ms", "p50 <= 0.5 ms",
         mark[ok["added_p50_ms"]]),
        ("256 MiB GET (MiB/s)",
         f"direct {main['get_direct']:.0f}, sidecar {main['get_sidecar']:.0f}"
         f" (nginx {main['get_nginx']:.0f}: {large['get_nginx_vs_direct']:.2f} of direct)",
         f"**{large['get_sidecar_vs_direct']:.2f}**", ">= 0.8",
         mark[ok["large_get_sidecar_vs_direct"]]),
        ("256 MiB upload, uploadType=media (MiB/s)",
         f"direct {main['put_direct']:.0f}, sidecar {main['put_sidecar']:.0f}"
         f" (nginx {main['put_nginx']:.0f}: {large['put_nginx_vs_direct']:.2f} of direct)",
         f"**{large['put_sidecar_vs_direct']:.2f}**", ">= 0.8",
         mark[ok["large_put_sidecar_vs_direct"]]),
        ("4 concurrent 256 MiB GETs (MiB/s, total)",
         f"direct {main['get4_direct']:.0f}, sidecar {main['get4_sidecar']:.0f}",
         f"{large['get4_sidecar_vs_direct']:.2f}", "-", "-"),
        ("peak RSS of the sidecar during GET, upload, 4 GETs",
         ", ".join(f"{k} {v['peak_rss_mib']:.1f}" for k, v in sizes.items()) + " MiB",
         f"**{large['peak_rss_mib']:.1f} MiB** (spread {large['peak_rss_spread_mib']:.1f})",
         "<= 100 MiB, flat", mark[ok["peak_rss_mib"]]),
        ("idle RSS (one process; --workers 1)",
         f"after load {large['idle_rss_after_mib']:.1f} MiB; --workers {r['workers']} tree"
         f" {large['idle_rss_sized_tree_mib']:.1f} MiB",
         f"**{large['idle_rss_mib']:.1f} MiB**", "<= 60 MiB", mark[ok["idle_rss_mib"]]),
        ("cold start to /readyz 200 (median of 3)",
         f"with OTLP exporter {cold['otlp_exporter_s']:.2f} s",
         f"**{cold['no_exporter_s']:.2f} s**", "<= 0.8 s", mark[ok["cold_start_s"]]),
        ("policy decision (us) at 10 / 1k / 100k rules",
         " / ".join(f"{v:.2f}" for v in r["policy_us"].values()), "-", "-", "-"),
        ("token verification (us), first sight / repeated",
         f"{r['token']['first_sight_us']:.0f} / {r['token']['repeated_us']:.1f}", "-", "-", "-"),
        ("non-2xx answers and socket errors under load", "",
         f"**{small['failures'] + large['failures']}**", "0", mark[ok["failures"]]),
    ]  # fmt: skip
    lines = [
        f"{m['date']}, {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']},"
        f" nginx worker_processes {r['workers']}; streams, memory and latency: sidecar --workers 1;"
        f" load average at start {m['load_average'][0]}",
        "",
        "| measure | figures | ratio / result | target | |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="nginx's and the sized sidecar's"
    )
    parser.add_argument("--json", type=Path, help="also write the JSON object here")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs the sidecar (make bench: the image's locked install)",
    )
    args = parser.parse_args()
    missing = loadgen.have_tools("wrk", "nginx", "curl")
    if missing:
        print(
            f"bench: {', '.join(missing)} not found; on Debian: "
            "apt-get install -y nginx-light wrk curl (or run `make bench`)",
            file=sys.stderr,
        )
        return 2
    results: dict[str, Any] = {
        "machine": machine(),
        "workers": args.workers,
        "sidecar_python": args.python,
    }
    with tempfile.TemporaryDirectory(prefix="gcs-iap-bench-") as scratch:
        tmp = Path(scratch)
        script = tmp / "report.lua"
        script.write_text(loadgen.WRK_REPORT)
        bench = Bench(tmp, args)
        try:
            results["cold_start"] = cold_start(bench)
            progress(f"cold start: {results['cold_start']}")
            results["large"] = large_streams(bench)
            results["small"] = small_gets(bench, script)
            results["policy_us"] = policy_decisions()
            results["token"] = token_costs(bench)
        finally:
            bench.stop()
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = TARGETS
    results["targets_met"] = verdicts(results)
    text = json.dumps(results, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
