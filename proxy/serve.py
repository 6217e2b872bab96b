"""`serve`: load the policy, start the data and admin listeners, run until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
from aiohttp import web

from proxy import audit
from proxy.app import Components, admin_app, data_server
from proxy.credentials import AdcTokenSource, TokenSource
from proxy.forward import Forwarder
from proxy.gcs.sessions import session_key
from proxy.identity import JwtVerifier
from proxy.limits import Limits, server_options
from proxy.policy import Policy, compile_policy, load_policy
from proxy.reload import PolicyReloader
from proxy.retry import RetryPolicy
from proxy.settings import Settings
from proxy.supervise import is_worker, supervise
from proxy.telemetry import Telemetry
from proxy.upstream import Upstream

log = logging.getLogger(__name__)
PolicyTransform = Callable[[Policy], Policy]


@asynccontextmanager
async def running(
    settings: Settings,
    policy: Policy,
    *,
    tokens: TokenSource | None = None,
    reuse_port: bool = False,
    transform: PolicyTransform | None = None,
) -> AsyncIterator[Components]:
    """Both listeners up, background refreshers running; torn down gracefully on exit."""
    async with AsyncExitStack() as stack:
        keys_session = await stack.enter_async_context(aiohttp.ClientSession(trust_env=False))
        upstream = Upstream(
            settings.upstream,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
        stack.push_async_callback(upstream.close)
        verifier = JwtVerifier(policy.issuers, keys_session)
        source = tokens or AdcTokenSource()
        telemetry = Telemetry()
        stack.callback(telemetry.shutdown)
        components = Components(
            policy=compile_policy(policy),
            verifier=verifier,
            tokens=source,
            forwarder=Forwarder(
                upstream,
                RetryPolicy(settings.retry_attempts, settings.retry_backoff),
                idle_timeout=settings.body_timeout,
            ),
            telemetry=telemetry,
            project=os.environ.get("GOOGLE_CLOUD_PROJECT"),
            ready_checks=[lambda: verifier.ready, lambda: telemetry.started],
        )
        tasks = [asyncio.create_task(k.keep_fresh()) for k in verifier.keys.values()]
        reloader = PolicyReloader(
            settings.policy,
            components,
            keys_session,
            interval=settings.reload_interval,
            key_tasks=list(tasks),
            transform=transform,
        )
        telemetry.watched.reloads = reloader.stats
        tasks.append(reloader.start())
        tasks.append(asyncio.create_task(telemetry.start()))
        if isinstance(source, AdcTokenSource):
            telemetry.watched.tokens = source
            tasks.append(asyncio.create_task(source.keep_fresh()))
        stack.push_async_callback(_cancel, tasks)
        limits = _limits(settings)
        data = data_server(components, limits, **server_options(limits))
        for runner, address in (
            (
                web.ServerRunner(data, shutdown_timeout=settings.shutdown_grace),
                settings.listen,
            ),
            (
                web.AppRunner(
                    admin_app(components), shutdown_timeout=settings.shutdown_grace, access_log=None
                ),
                settings.admin_listen,
            ),
        ):
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, address.host, address.port, reuse_port=reuse_port).start()
        yield components


def _limits(settings: Settings) -> Limits:
    return Limits(
        max_concurrent=settings.max_concurrent,
        max_header_bytes=settings.max_header_bytes,
        max_metadata_bytes=settings.max_metadata_bytes,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
    )


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve_until_stopped(
    settings: Settings,
    policy: Policy,
    *,
    reuse_port: bool = False,
    transform: PolicyTransform | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings, policy, reuse_port=reuse_port, transform=transform):
        log.info(
            "serving on %s (admin %s), upstream %s, policy %s revision %s",
            settings.listen,
            settings.admin_listen,
            settings.upstream,
            settings.policy,
            policy.revision,
        )
        await stop.wait()
        log.info("shutting down: draining in-flight requests (up to %gs)", settings.shutdown_grace)


def _use_uvloop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(settings: Settings, transform: PolicyTransform | None = None) -> int:
    try:
        session_key()  # an unusable PROXY_SESSION_KEY is a usage error, not a crash later
    except ValueError as exc:
        print(f"gcs-iap-proxy: {exc}", file=sys.stderr)
        return 2
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
        if settings.workers > 1 and not is_worker():
            return supervise(settings)
        _use_uvloop()
        asyncio.run(
            serve_until_stopped(
                settings, policy, reuse_port=settings.workers > 1, transform=transform
            )
        )
        return 0
    finally:
        audit.stop_logging()
