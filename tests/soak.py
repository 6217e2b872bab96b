"""Soak: mixed load from several identities through the real sidecar for a bounded time.

    python -m tests.soak --duration 60 --concurrency 8

Starts fake-gcs-server, a local issuer, the metadata stand-in and the sidecar, then runs
allowed and denied reads, writes, lists and resumable uploads at once. Every answer is
checked: the decision against the policy, the bytes against the md5 they were written
with. Prints a JSON report; exits 1 on any 5xx, wrong decision or data mismatch.
(Not collected by pytest: tests/test_soak.py runs it briefly.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp

from proxy.devserver.issuer import DevIssuer, bind_socket, http_url, serve_socket
from proxy.devserver.metadata import DevMetadataServer, start_metadata
from tests.support.fakegcs import FakeGcs
from tests.support.proxyproc import ProxyProcess, isolated_env
from tests.support.threaded import LoopThread

AUD = "soak"
BUCKET = "soak-data"
USERS = ("alice", "bob", "carol")  # each owns USER/; carol may also read alice/
OUTSIDER = "mallory"
POLICY = """\
version: 1
issuers:
  - issuer: ISSUER
    audiences: ["AUD"]
rules:
  - id: own-home
    principals: ["domain:example.com"]
    bucket: BUCKET
    prefixes: ["${email}/"]
    verbs: [read, list, write, delete]
  - id: carol-reads-alice
    principals: ["user:carol@example.com"]
    bucket: BUCKET
    prefixes: ["alice@example.com/"]
    verbs: [read, list]
"""


def md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


@dataclass
class Report:
    requests: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    wrong_decisions: list[str] = field(default_factory=list)
    data_mismatches: list[str] = field(default_factory=list)

    def check(self, op: str, status: int, allowed: bool, ok: tuple[int, ...] = (200,)) -> bool:
        self.requests[op] += 1
        if status >= 500:
            self.server_errors.append(f"{op}: {status}")
            return False
        if allowed and status not in ok:
            self.wrong_decisions.append(f"{op}: expected {ok}, got {status}")
        if not allowed and status != 403:
            self.wrong_decisions.append(f"{op}: expected 403, got {status}")
        return allowed and status in ok


class Load:
    def __init__(self, url: str, issuer: DevIssuer, report: Report) -> None:
        self.url = url
        self.report = report
        self.tokens = {
            name: issuer.mint(audience=AUD, subject=name, email=f"{name}@example.{tld}")
            for name, tld in [*((u, "com") for u in USERS), (OUTSIDER, "net")]
        }
        self.written: dict[str, str] = {}  # object name -> md5
        self.counter = 0

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def fresh_name(self, owner: str) -> str:
        self.counter += 1
        return f"{owner}@example.com/obj-{self.counter}"

    async def write(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        who = rng.choice(USERS)
        owner = who if rng.random() < 0.8 else rng.choice(USERS)
        name, data = self.fresh_name(owner), rng.randbytes(rng.randint(0, 200_000))
        target = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={quote(name, safe='')}"
        async with session.post(self.url + target, data=data, headers=self.auth(who)) as r:
            body = await r.read()
            if self.report.check("write", r.status, who == owner):
                if json.loads(body).get("md5Hash") != md5(data):
                    self.report.data_mismatches.append(f"write {name}: md5 differs")
                self.written[name] = md5(data)

    async def read(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        if not self.written:
            return
        name = rng.choice(sorted(self.written))
        who = rng.choice([*USERS, OUTSIDER])
        owner = name.split("@")[0]
        allowed = who == owner or (who == "carol" and owner == "alice")
        target = f"/download/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}?alt=media"
        async with session.get(self.url + target, headers=self.auth(who)) as r:
            data = await r.read()
            if self.report.check("read", r.status, allowed) and md5(data) != self.written[name]:
                self.report.data_mismatches.append(f"read {name}: md5 differs")

    async def list(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        who, owner = rng.choice([*USERS, OUTSIDER]), rng.choice(USERS)
        prefix = f"{owner}@example.com/"
        allowed = who == owner or (who == "carol" and owner == "alice")
        target = f"/storage/v1/b/{BUCKET}/o?prefix={quote(prefix, safe='')}"
        async with session.get(self.url + target, headers=self.auth(who)) as r:
            body = await r.read()
            if self.report.check("list", r.status, allowed):
                names = [item["name"] for item in json.loads(body).get("items", [])]
                if any(not n.startswith(prefix) for n in names):
                    self.report.wrong_decisions.append(f"list {prefix}: foreign names")

    async def resumable(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        who = rng.choice(USERS)
        name, data = self.fresh_name(who), rng.randbytes(rng.randint(262_145, 600_000))
        start = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name={quote(name, safe='')}"
        async with session.post(self.url + start, json={}, headers=self.auth(who)) as r:
            await r.read()
            if not self.report.check("resumable.start", r.status, True):
                return
            location = r.headers["Location"]
        first = data[:262_144]
        spans = [(0, first, f"bytes 0-{len(first) - 1}/*")]
        spans.append(
            (len(first), data[len(first) :], f"bytes {len(first)}-{len(data) - 1}/{len(data)}")
        )
        for index, (_, chunk, content_range) in enumerate(spans):
            headers = {**self.auth(who), "Content-Range": content_range}
            async with session.put(location, data=chunk, headers=headers) as r:
                body = await r.read()
                final = index == len(spans) - 1
                if not self.report.check(
                    "resumable.chunk", r.status, True, (200,) if final else (308,)
                ):
                    return
        if json.loads(body).get("md5Hash") != md5(data):
            self.report.data_mismatches.append(f"resumable {name}: md5 differs")
        self.written[name] = md5(data)

    async def worker(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - load shapes, not secrets
        ops = [self.write] * 3 + [self.read] * 4 + [self.list] * 2 + [self.resumable]
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                await rng.choice(ops)(session, rng)


async def run_load(url: str, issuer: DevIssuer, duration: float, concurrency: int) -> Report:
    report = Report()
    load = Load(url, issuer, report)
    deadline = time.monotonic() + duration
    await asyncio.gather(*(load.worker(deadline, seed) for seed in range(concurrency)))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=1, help="sidecar worker processes")
    args = parser.parse_args(argv)

    thread = LoopThread("soak-servers")
    with FakeGcs() as gcs, tempfile.TemporaryDirectory() as tmp:
        gcs.create_bucket(BUCKET)
        sock = bind_socket("127.0.0.1", 0)
        issuer = DevIssuer(http_url("127.0.0.1", sock.getsockname()[1]))
        issuer_runner = thread.run(serve_socket(issuer.app(), sock))
        metadata_runner, metadata_port = thread.run(start_metadata(DevMetadataServer()))
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(
            POLICY.replace("ISSUER", issuer.issuer_url)
            .replace("AUD", AUD)
            .replace("BUCKET", BUCKET)
        )
        proxy = ProxyProcess(
            policy, gcs.url, isolated_env(Path(tmp), metadata_port), "--workers", str(args.workers)
        )
        try:
            proxy.wait_ready()
            started = time.monotonic()
            report = asyncio.run(run_load(proxy.url, issuer, args.duration, args.concurrency))
            elapsed = time.monotonic() - started
        finally:
            code = proxy.stop()
            log = proxy.log.read_text(errors="replace").splitlines()
            problems = [line for line in log if '"status":5' in line or "Traceback" in line]
            thread.run(issuer_runner.cleanup())
            thread.run(metadata_runner.cleanup())
            thread.stop()
    total = sum(report.requests.values())
    summary = {
        "seconds": round(elapsed, 1),
        "requests": total,
        "requests_per_second": round(total / elapsed, 1),
        "by_operation": dict(report.requests),
        "server_errors": len(report.server_errors),
        "wrong_decisions": len(report.wrong_decisions),
        "data_mismatches": len(report.data_mismatches),
        "proxy_exit_code": code,
        "examples": (report.server_errors + report.wrong_decisions + report.data_mismatches)[:10],
        "proxy_5xx_log": problems[:5],
    }
    print(json.dumps(summary, indent=2))
    clean = not (report.server_errors or report.wrong_decisions or report.data_mismatches)
    return 0 if clean and total and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
