"""The long-lived parts the request pipeline consults, shared by the app, telemetry and reload."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.credentials import TokenSource
from proxy.forward import Forwarder
from proxy.gcs.sessions import SessionSealer, session_key
from proxy.identity import TokenVerifier
from proxy.policy import PolicyIndex
from proxy.telemetry import Telemetry


@dataclass
class Components:
    """Everything the pipeline consults; swapped as a whole on policy reload."""

    policy: PolicyIndex
    verifier: TokenVerifier
    tokens: TokenSource
    forwarder: Forwarder
    telemetry: Telemetry
    project: str | None = None
    sessions: SessionSealer = field(default_factory=lambda: SessionSealer(session_key()))
    ready_checks: list[Callable[[], bool]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.tokens.ready and all(check() for check in self.ready_checks)


RECORD = "gcs_iap_proxy.audit_record"
