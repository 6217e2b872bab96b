"""Audit records and process logs: JSON lines in Cloud Logging's structured format, or text."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

AUDIT_LOGGER = "gcs_iap_proxy.audit"
FLUSH_DELAY = 0.01  # seconds an audit line may wait for others to leave in the same write
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
    checks: list[dict[str, str | None]] | None = None  # each access of a several-access operation
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
        if self.checks:
            entry["audit"]["checks"] = self.checks
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


# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def json_line(entry: dict[str, Any]) -> str:
    return _encode(entry)


def text_line(entry: dict[str, Any]) -> str:
    audit = entry["audit"]
    http = entry["httpRequest"]
    return (
        f"audit   {http['status']} {entry['message']} [{audit['reason']}] "
        f"rev={audit['policy_revision']} {http['latency']}"
    )


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
        return json_line(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = getattr(record, "entry", None)
        if entry is None:
            return f"{record.levelname.lower():7} {record.getMessage()}"
        return text_line(entry)


class AuditWriter:
    """Audit lines to a stream: formatted on the event loop, written by one thread.

    Records are kept as they are handed over and formatted FLUSH_DELAY later, all at once:
    off the request's path (its answer has left by then), and the thread gets one write
    per batch rather than one per request (a hand-off through the logging machinery cost
    ~0.25 ms of CPU per request). The loop never blocks on a slow reader of stdout (a
    pipe to a log agent): the thread does. Lines keep their order; `close` writes
    everything still pending before it returns.
    """

    def __init__(self, stream: TextIO, format_line: Callable[[dict[str, Any]], str]) -> None:
        self._stream = stream
        self._format = format_line
        self._pending: list[tuple[AuditRecord, str | None]] = []
        self._batches: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def write(self, record: AuditRecord, project: str | None) -> None:
        """Keep `record` (no longer changed by its request) for the next batch."""
        self._pending.append((record, project))
        if len(self._pending) > 1:
            return  # a flush is already scheduled
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop (a test, the CLI): nothing to batch with
            self._flush()
            return
        loop.call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._batches.put("".join(self._format(r.entry(p)) + "\n" for r, p in pending))

    def _run(self) -> None:
        while (batch := self._batches.get()) is not None:
            try:
                self._stream.write(batch)
                self._stream.flush()
            except (OSError, ValueError) as exc:  # stdout gone: say so where it may be seen
                print(f"gcs-iap-proxy: audit records could not be written: {exc}", file=sys.stderr)

    def close(self) -> None:
        self._flush()
        self._batches.put(None)
        self._thread.join(timeout=10)


_listener: logging.handlers.QueueListener | None = None
_writer: AuditWriter | None = None


def configure_logging(log_format: str) -> None:
    """Audit records to stdout (see AuditWriter), process logs to stderr; both written by
    threads, never by the event loop."""
    global _listener, _writer
    stop_logging()
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    _writer = AuditWriter(sys.stdout, json_line if log_format == "json" else text_line)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, stderr, respect_handler_level=True)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _listener.start()


def stop_logging() -> None:
    global _listener, _writer
    if _writer is not None:
        _writer.close()
        _writer = None
    if _listener is not None:
        _listener.stop()
        _listener = None


def write(record: AuditRecord, project: str | None) -> None:
    """Audit `record`, which its request no longer changes."""
    if _writer is not None:
        _writer.write(record, project)
    else:  # logging never configured (a library user): the audit logger still gets it
        logging.getLogger(AUDIT_LOGGER).info("audit", extra={"entry": record.entry(project)})
