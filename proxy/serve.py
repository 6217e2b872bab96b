"""`serve`: load the policy, start the data and admin listeners, run until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
from aiohttp import web

from proxy import audit
from proxy.app import Components, admin_app, data_app, upstream_session
from proxy.credentials import AdcTokenSource, TokenSource
from proxy.forward import Forwarder
from proxy.identity import JwtVerifier
from proxy.policy import Policy, compile_policy, load_policy
from proxy.settings import Address, Settings
from proxy.telemetry import Telemetry

log = logging.getLogger(__name__)
SHUTDOWN_GRACE = 8.0
PolicyTransform = Callable[[Policy], Policy]


@asynccontextmanager
async def running(
    settings: Settings,
    policy: Policy,
    *,
    tokens: TokenSource | None = None,
    reuse_port: bool = False,
) -> AsyncIterator[Components]:
    """Both listeners up, background refreshers running; torn down gracefully on exit."""
    async with AsyncExitStack() as stack:
        keys_session = await stack.enter_async_context(aiohttp.ClientSession(trust_env=False))
        upstream = await stack.enter_async_context(
            upstream_session(settings.connect_timeout, settings.read_timeout)
        )
        verifier = JwtVerifier(policy.issuers, keys_session)
        source = tokens or AdcTokenSource()
        telemetry = Telemetry()
        stack.callback(telemetry.shutdown)
        components = Components(
            policy=compile_policy(policy),
            verifier=verifier,
            tokens=source,
            forwarder=Forwarder(upstream, settings.upstream),
            telemetry=telemetry,
            project=os.environ.get("GOOGLE_CLOUD_PROJECT"),
            ready_checks=[lambda: verifier.ready],
        )
        tasks = [asyncio.create_task(k.keep_fresh()) for k in verifier.keys.values()]
        if isinstance(source, AdcTokenSource):
            tasks.append(asyncio.create_task(source.keep_fresh()))
        stack.push_async_callback(_cancel, tasks)
        for app, address in (
            (data_app(components), settings.listen),
            (admin_app(components), settings.admin_listen),
        ):
            runner = web.AppRunner(
                app, shutdown_timeout=SHUTDOWN_GRACE, access_log=None, handle_signals=False
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, address.host, address.port, reuse_port=reuse_port).start()
        yield components


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve_until_stopped(
    settings: Settings, policy: Policy, *, reuse_port: bool = False
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings, policy, reuse_port=reuse_port):
        log.info(
            "serving on %s (admin %s), upstream %s, policy %s revision %s",
            settings.listen,
            settings.admin_listen,
            settings.upstream,
            settings.policy,
            policy.revision,
        )
        await stop.wait()
        log.info("shutting down: draining in-flight requests (up to %.0fs)", SHUTDOWN_GRACE)


def _use_uvloop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(settings: Settings, transform: PolicyTransform | None = None) -> int:
    audit.configure_logging(settings.log_format)
    try:
        from proxy.policy import PolicyError

        try:
            policy = load_policy(settings.policy)
        except PolicyError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            print(
                f"policy {settings.policy}: {len(exc.errors)} error(s); not starting",
                file=sys.stderr,
            )
            return 1
        if transform is not None:
            policy = transform(policy)
        if settings.workers > 1 and os.environ.get("PROXY_WORKER") is None:
            return _supervise(settings)
        _use_uvloop()
        asyncio.run(serve_until_stopped(settings, policy, reuse_port=settings.workers > 1))
        return 0
    finally:
        audit.stop_logging()


def _supervise(settings: Settings) -> int:
    """Run N worker processes sharing the listeners through SO_REUSEPORT."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("--workers > 1 needs SO_REUSEPORT", file=sys.stderr)
        return 2
    env = dict(os.environ, PROXY_WORKER="1")
    command = [sys.executable, "-m", "proxy", "serve", *_flags(settings)]
    workers = [subprocess.Popen(command, env=env) for _ in range(settings.workers)]  # noqa: S603

    def forward(signum: int, _: object) -> None:
        for worker in workers:
            worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [worker.wait() for worker in workers]
    return max(codes, default=0)


def _flags(settings: Settings) -> Sequence[str]:
    def address(a: Address) -> str:
        return str(a)

    return [
        "--listen",
        address(settings.listen),
        "--admin-listen",
        address(settings.admin_listen),
        "--policy",
        str(settings.policy),
        "--upstream",
        settings.upstream,
        "--workers",
        str(settings.workers),
        "--log-format",
        settings.log_format,
        "--connect-timeout",
        str(settings.connect_timeout),
        "--read-timeout",
        str(settings.read_timeout),
    ]
