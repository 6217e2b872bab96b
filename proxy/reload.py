"""Policy hot reload: poll the policy path (secret-volume symlink swaps included) and SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from proxy.identity import JwtVerifier
from proxy.policy import Issuer, Policy, PolicyError, PolicyIndex, compile_policy, load_policy
from proxy.policy.load import policy_files

if TYPE_CHECKING:
    from proxy.components import Components

log = logging.getLogger(__name__)

# Give a writer that is still busy a moment, so a half-written file is not reported broken.
SETTLE_SECONDS = 0.2
# A policy refused only because an issuer's keys could not be fetched is tried again, after
# these many seconds, doubling: the file on disk must win once it can load, and every
# worker must get there (each reloads on its own).
RETRY_FIRST, RETRY_MOST = 1.0, 60.0
Fingerprint = tuple[tuple[object, ...], ...]


@dataclass
class ReloadStats:
    """Reload outcomes since start; exported as metrics by proxy.telemetry."""

    ok: int = 0
    failed: int = 0
    last_error: str | None = None


def fingerprint(path: Path) -> Fingerprint:
    """A cheap stat-based signature of everything that makes up the policy at `path`.

    `stat` follows symlinks and the resolved target is part of the signature, so the atomic
    `..data` symlink swap of Kubernetes and Cloud Run secret volumes shows up even when the
    new file has the same size and modification time as the old one."""
    entries: list[tuple[object, ...]] = []
    for item in [path, *(policy_files(path) if path.is_dir() else ())]:
        try:
            st = item.stat()
        except OSError as exc:
            entries.append((str(item), type(exc).__name__))
            continue
        target = os.path.realpath(item)
        entries.append((str(item), target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(entries)


def _issuer_settings(issuers: Sequence[Issuer]) -> tuple[Issuer, ...]:
    # Moving an issuer to another line is not a change of who may sign tokens.
    return tuple(dataclasses.replace(i, source=None) for i in issuers)


class KeysUnavailable(PolicyError):
    """A policy that loaded, refused because some issuer's keys could not be fetched now."""


class PolicyReloader:
    """Replaces `components.policy` (and the verifier, if issuers changed) with a new policy,
    but only one that loaded completely; otherwise the last good policy stays in force."""

    def __init__(
        self,
        path: Path,
        components: Components,
        session: aiohttp.ClientSession,
        *,
        interval: float = 1.0,
        key_tasks: Sequence[asyncio.Task[None]] = (),
        transform: Callable[[Policy], Policy] | None = None,
    ) -> None:
        self.path = path
        self.components = components
        self.stats = ReloadStats()
        self._session = session
        self._interval = interval
        self._key_tasks = list(key_tasks)
        self._transform = transform
        self._hangup = asyncio.Event()
        self._signature: Fingerprint = ()
        self._retry_delay = RETRY_FIRST
        self._retry_at: float | None = None  # loop time of the next try of a refused policy
        self._retrying: Fingerprint = ()  # the file that try is for

    def start(self) -> asyncio.Task[None]:
        """Install the SIGHUP handler now (so an early SIGHUP cannot kill us) and start watching."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hangup.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            log.debug("SIGHUP reload unavailable here; polling only")
        return asyncio.create_task(self.run())

    async def run(self) -> None:
        try:
            self._signature = await asyncio.to_thread(fingerprint, self.path)
            # The file may have changed between the first load and now.
            await self.reload("start-up check", quiet=True)
            while True:
                if await self._wait_for_hangup():
                    self._signature = await asyncio.to_thread(fingerprint, self.path)
                    await self.reload("SIGHUP")
                elif self._interval > 0 and await self._changed_on_disk():
                    await self.reload("policy changed on disk")
                elif self._retry_at is not None and self._retry_at <= self._loop_time():
                    await self._retry()
        finally:
            self._remove_signal_handler()
            for task in self._key_tasks:
                task.cancel()

    async def _retry(self) -> None:
        """Try the refused file again, but only that file: an edit since then waits for its
        own signal (SIGHUP-only mode) or for the poll that notices it."""
        if await asyncio.to_thread(fingerprint, self.path) != self._retrying:
            self._settle_retries()
            return
        await self.reload("retrying: issuer keys were unavailable")

    def _settle_retries(self) -> None:
        self._retry_at, self._retry_delay = None, RETRY_FIRST

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def _wait_for_hangup(self) -> bool:
        timeout = self._interval if self._interval > 0 else None
        if self._retry_at is not None:
            until_retry = max(0.0, self._retry_at - self._loop_time())
            timeout = until_retry if timeout is None else min(timeout, until_retry)
        try:
            await asyncio.wait_for(self._hangup.wait(), timeout)
        except TimeoutError:
            return False
        self._hangup.clear()
        return True

    async def _changed_on_disk(self) -> bool:
        seen = await asyncio.to_thread(fingerprint, self.path)
        if seen == self._signature:
            return False
        await asyncio.sleep(SETTLE_SECONDS)
        settled = await asyncio.to_thread(fingerprint, self.path)
        if settled != seen:
            return False  # still being written: look again at the next poll
        self._signature = settled
        return True

    async def reload(self, why: str, *, quiet: bool = False) -> bool:
        """Load, validate and swap in the policy at `path`; False if it was rejected."""
        current = self.components.policy
        try:
            policy = await asyncio.to_thread(self._load)
            if policy.revision == current.revision:
                if not quiet:
                    log.info("policy unchanged (%s): revision %s", why, current.revision)
                self._settle_retries()
                return True
            index = await asyncio.to_thread(compile_policy, policy)
            verifier = await self._verifier_for(policy, current)
        except KeysUnavailable as exc:
            self._failed(why, current, exc.errors)
            if self._signature != self._retrying:  # another file: its own backoff
                self._retry_delay, self._retrying = RETRY_FIRST, self._signature
            self._retry_at = self._loop_time() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MOST)
            return False
        except PolicyError as exc:  # the file itself: trying it again gives the same answer
            self._failed(why, current, exc.errors)
            self._settle_retries()
            return False
        except Exception as exc:
            log.exception("policy reload crashed")
            self._failed(why, current, [f"{self.path}: {type(exc).__name__}: {exc}"])
            self._settle_retries()
            return False
        self._settle_retries()
        self._swap(index, verifier)
        self.stats.ok += 1
        log.info(
            "policy reloaded (%s): revision %s -> %s, %d rules",
            why,
            current.revision,
            policy.revision,
            len(policy.rules),
        )
        return True

    def _load(self) -> Policy:
        policy = load_policy(self.path)
        return self._transform(policy) if self._transform else policy

    async def _verifier_for(self, policy: Policy, current: PolicyIndex) -> JwtVerifier | None:
        """A verifier for changed issuers, with every issuer's keys already fetched."""
        if _issuer_settings(policy.issuers) == _issuer_settings(current.policy.issuers):
            return None
        verifier = JwtVerifier(policy.issuers, self._session)
        keys = list(verifier.keys.values())
        fetched = await asyncio.gather(*(k.refresh() for k in keys))
        errors = [
            f"{k.issuer.source or self.path}: keys of issuer {k.issuer.issuer} could not be "
            f"fetched: {k.last_error}"
            for k, ok in zip(keys, fetched, strict=True)
            if not ok
        ]
        if errors:
            raise KeysUnavailable(errors)
        return verifier

    def _swap(self, index: PolicyIndex, verifier: JwtVerifier | None) -> None:
        # No await in here: a request sees the old policy and verifier or the new ones.
        self.components.policy = index
        if verifier is None:
            return
        self.components.verifier = verifier
        for task in self._key_tasks:
            task.cancel()
        self._key_tasks = [asyncio.create_task(k.keep_fresh()) for k in verifier.keys.values()]

    def _failed(self, why: str, current: PolicyIndex, errors: Sequence[str]) -> None:
        self.stats.failed += 1
        self.stats.last_error = "\n".join(errors)
        log.error(
            "policy reload rejected (%s; %d failed so far); still enforcing revision %s:\n%s",
            why,
            self.stats.failed,
            current.revision,
            self.stats.last_error,
        )

    def _remove_signal_handler(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
