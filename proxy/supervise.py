"""`serve --workers N`: a lean parent that runs N `serve` workers sharing the ports (SO_REUSEPORT).

The parent imports neither aiohttp nor the telemetry SDK: it validates the policy, hands every
worker the same upload-session key, forwards SIGTERM/SIGINT/SIGHUP and exits with the worst
worker exit code.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys

from proxy.policy.load import PolicyError, load_policy
from proxy.settings import OPTIONS, Settings

WORKER_ENV = "PROXY_WORKER"
SESSION_KEY_ENV = "PROXY_SESSION_KEY"  # read by proxy.gcs.sessions in each worker


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) is not None


def worker_flags(settings: Settings) -> list[str]:
    """Every `serve` option, as resolved here, so workers cannot drift from the parent."""
    flags: list[str] = []
    for flag, _, _, _ in OPTIONS:
        flags += [flag, str(getattr(settings, flag[2:].replace("-", "_")))]
    return flags


def supervise(settings: Settings) -> int:
    if not hasattr(socket, "SO_REUSEPORT"):
        print("gcs-iap-proxy: --workers > 1 needs SO_REUSEPORT", file=sys.stderr)
        return 2
    try:
        load_policy(settings.policy)
    except PolicyError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        print(
            f"policy {settings.policy}: {len(exc.errors)} error(s); not starting", file=sys.stderr
        )
        return 1
    env = dict(os.environ, **{WORKER_ENV: "1"})
    # One upload-session key for the process tree: a handle minted by one worker opens in all.
    env.setdefault(
        SESSION_KEY_ENV, base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    )
    command = [sys.executable, "-m", "proxy", "serve", *worker_flags(settings)]
    workers = [subprocess.Popen(command, env=env) for _ in range(settings.workers)]  # noqa: S603

    def forward(signum: int, _: object) -> None:
        for worker in workers:
            worker.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: each worker reloads
        signal.signal(signum, forward)
    return max((worker.wait() for worker in workers), default=0)
