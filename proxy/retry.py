"""Upstream retries, as Cloud Storage's retry guidance has them: which answers, which operations, how long to wait.

Retryable: HTTP 408, 429 and any 5xx, connection refusals and resets. Only idempotent
operations are retried: reads and lists always; deletes, metadata updates and object
writes only when a precondition pins the generation they act on (the guidance's
"conditionally idempotent"); ACL changes, moves, restores and resumable chunks never.
A streamed request body cannot be replayed, so once its first byte has been taken
nothing is retried. Waits grow exponentially with random jitter.

A read timeout is not retried: the upstream already had the whole idle-read budget,
and the caller's own client library retries with its own deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.gcs.operation import WRITES, Kind, Operation

RETRYABLE_STATUS = frozenset({408, 429})
_ALWAYS = frozenset({Kind.GET, Kind.MEDIA, Kind.XML_GET, Kind.LIST})
# Writes made idempotent by ifGenerationMatch; moves and restores are never retried.
_GENERATION_PINNED = WRITES - {Kind.MOVE, Kind.RESTORE}
_METAGENERATION_PINNED = frozenset({Kind.PATCH, Kind.UPDATE})


def retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def idempotent(operation: Operation) -> bool:
    """True when sending `operation` twice leaves Cloud Storage as sending it once would."""
    kind = operation.kind
    if kind in _ALWAYS:
        return True
    if kind in _GENERATION_PINNED:
        return operation.param("ifGenerationMatch") is not None
    if kind is Kind.DELETE:
        return any(operation.param(p) is not None for p in ("ifGenerationMatch", "generation"))
    if kind in _METAGENERATION_PINNED:
        return operation.param("ifMetagenerationMatch") is not None
    return False


class StreamedBody:
    """A caller's body on its way upstream: remembers whether it was started, and gives up
    (raising `TimeoutError`) when the caller leaves it idle for `idle_timeout` seconds."""

    def __init__(self, chunks: AsyncIterator[bytes], idle_timeout: float | None) -> None:
        self._chunks = chunks
        self._idle_timeout = idle_timeout
        self.started = False
        self.stalled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self.stalled = True
                raise
            yield chunk


def replayable(data: Any) -> bool:
    return not (isinstance(data, StreamedBody) and data.started)


@dataclass(frozen=True)
class RetryPolicy:
    """Truncated exponential backoff with jitter: attempt n waits about initial·2ⁿ⁻¹ seconds."""

    attempts: int = 3
    initial: float = 1.0
    maximum: float = 32.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def tries(self) -> Iterator[int]:
        return iter(range(1, max(self.attempts, 1) + 1))

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based), honouring a small Retry-After."""
        base = min(self.initial * 2.0 ** (attempt - 1), self.maximum)
        wait = base / 2 + self.rng.uniform(0, base / 2)
        if retry_after is not None and retry_after.isdigit():
            wait = max(wait, min(float(retry_after), self.maximum))
        return wait

    def may_retry(self, attempt: int, operation: Operation, data: Any) -> bool:
        return attempt < self.attempts and idempotent(operation) and replayable(data)
