"""Request limits on the data port: concurrency, header and metadata sizes, slow clients.

Header size and header timeout are enforced by aiohttp's connection handler (see
`server_options`); concurrency and metadata size by the `limit_requests` layer;
the body idle timeout by `proxy.retry.StreamedBody` (streamed media) and `body_deadline`
(bounded metadata reads); the response idle timeout by the forwarder.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.errors import PayloadTooLarge, ProxyError, Unavailable, error_response

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Layer = Callable[[web.BaseRequest, Handler], Awaitable[web.StreamResponse]]
METADATA_CEILING = 1 << 20  # proxy.gcs.metadata reads at most this much, whatever the setting
MAX_HEADER_FIELDS = 128


class Overloaded(Unavailable):
    """More requests in flight than allowed: refused at once, never queued."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class SlowClient(ProxyError):
    status = 408
    reason = "requestTimeout"


@dataclass(frozen=True)
class Limits:
    max_concurrent: int = 1000
    max_header_bytes: int = 16384
    max_metadata_bytes: int = METADATA_CEILING
    header_timeout: float = 30.0
    body_timeout: float = 60.0


def server_options(limits: Limits) -> dict[str, Any]:
    """aiohttp connection-handler settings: header sizes and the header (keep-alive idle) timeout.

    aiohttp closes a connection that has not delivered a complete request within its
    keep-alive timeout, counted from connect or from the end of the previous response:
    that is the header read timeout, and it also bounds idle keep-alive connections.
    """
    return {
        "max_line_size": limits.max_header_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": MAX_HEADER_FIELDS,
        "keepalive_timeout": limits.header_timeout,
        # Bodies are read as sent: a gzip body the proxy only streams goes upstream
        # compressed, and one it reads is decompressed by proxy.gcs.coding, bounded.
        "auto_decompress": False,
    }


def limit_requests(limits: Limits) -> Layer:
    """Outermost data-port layer: a fast 503 beyond `max_concurrent`, a fast 413 for
    metadata bodies that announce more than `max_metadata_bytes`."""
    in_flight = 0

    async def layer(request: web.BaseRequest, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        if in_flight >= limits.max_concurrent:
            return error_response(
                Overloaded("the proxy is handling too many requests; retry shortly")
            )
        too_large = _oversized_metadata(request, limits.max_metadata_bytes)
        if too_large is not None:
            return error_response(too_large)
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    return layer


def _oversized_metadata(request: web.BaseRequest, limit: int) -> ProxyError | None:
    # Only upload paths carry object data; every other body is JSON metadata.
    if request.raw_path.startswith("/upload/"):
        return None
    length = request.content_length
    if length is not None and length > limit:
        return PayloadTooLarge(f"request body is larger than {limit} bytes")
    return None


@asynccontextmanager
async def body_deadline(seconds: float) -> AsyncIterator[None]:
    """The bounded (metadata) part of a body must arrive within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise SlowClient(f"the request body did not arrive within {seconds:g} s") from None
