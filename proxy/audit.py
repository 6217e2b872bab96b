"""Audit records and process logs: JSON lines in Cloud Logging's structured format, or text."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any

AUDIT_LOGGER = "gcs_iap_proxy.audit"
_SEVERITY = {
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
}


@dataclass
class AuditRecord:
    """What one request decided; filled in as the pipeline runs, written once at the end."""

    method: str
    path: str
    user_agent: str | None
    remote_ip: str | None
    query: str = ""  # with every value that could be a secret already redacted
    started: float = field(default_factory=time.perf_counter)
    seconds: float | None = None
    identity: dict[str, str] | None = None
    operation: str | None = None
    route: str | None = None
    bucket: str | None = None
    object: str | None = None
    prefix: str | None = None
    verb: str | None = None
    resource: str | None = None
    decision: str | None = None
    enforced: bool = True
    rule_id: str | None = None
    reason: str | None = None
    policy_revision: str | None = None
    status: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    trace_id: str | None = None
    span_id: str | None = None
    sampled: bool = False

    @property
    def who(self) -> str | None:
        identity = self.identity or {}
        return identity.get("email") or identity.get("subject")

    @property
    def url(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    def entry(self, project: str | None) -> dict[str, Any]:
        """The record as a Cloud Logging structured entry (the jsonPayload of a LogEntry)."""
        latency = self.seconds if self.seconds is not None else time.perf_counter() - self.started
        decision = self.decision or "deny"
        entry: dict[str, Any] = {
            "severity": "NOTICE" if decision == "allow" else "WARNING",
            "message": self.message(decision),
            "httpRequest": {
                "requestMethod": self.method,
                "requestUrl": self.url,
                "status": self.status,
                "requestSize": str(self.request_bytes),
                "responseSize": str(self.response_bytes),
                "userAgent": self.user_agent,
                "remoteIp": self.remote_ip,
                "latency": f"{latency:.6f}s",
            },
            "audit": {
                "identity": self.identity,
                "operation": self.operation,
                "verb": self.verb,
                "resource": self.resource,
                "decision": decision,
                "enforced": self.enforced,
                "rule_id": self.rule_id,
                "reason": self.reason,
                "policy_revision": self.policy_revision,
                "latency_ms": round(latency * 1000, 3),
            },
            "logging.googleapis.com/labels": {"component": "gcs-iap-proxy"},
        }
        if self.trace_id:
            trace = f"projects/{project}/traces/{self.trace_id}" if project else self.trace_id
            entry["logging.googleapis.com/trace"] = trace
            entry["logging.googleapis.com/spanId"] = self.span_id
            entry["logging.googleapis.com/trace_sampled"] = self.sampled
        return entry

    def message(self, decision: str) -> str:
        what = f"{self.verb} {self.resource}" if self.verb else f"{self.method} {self.path}"
        who = self.who or "anonymous"
        return f"{decision} {what} for {who}" + (f" (rule {self.rule_id})" if self.rule_id else "")


class JsonFormatter(logging.Formatter):
    """A log record as one Cloud Logging structured JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = getattr(record, "entry", None)
        if entry is None:
            entry = {
                "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
                "message": record.getMessage(),
                "logger": record.name,
            }
            if record.exc_info:
                entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = getattr(record, "entry", None)
        if entry is None:
            return f"{record.levelname.lower():7} {record.getMessage()}"
        audit = entry["audit"]
        http = entry["httpRequest"]
        return (
            f"audit   {http['status']} {entry['message']} [{audit['reason']}] "
            f"rev={audit['policy_revision']} {http['latency']}"
        )


_listener: logging.handlers.QueueListener | None = None


def configure_logging(log_format: str) -> None:
    """Audit records to stdout, process logs to stderr; written by a thread, never the event loop."""
    global _listener
    if _listener is not None:
        _listener.stop()
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(formatter)
    stdout.addFilter(lambda r: r.name == AUDIT_LOGGER)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    stderr.addFilter(lambda r: r.name != AUDIT_LOGGER)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, stdout, stderr, respect_handler_level=True)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _listener.start()


def stop_logging() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def write(record: AuditRecord, project: str | None) -> None:
    logging.getLogger(AUDIT_LOGGER).info("audit", extra={"entry": record.entry(project)})
