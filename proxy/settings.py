"""Settings for `serve`: command-line flags over environment variables over defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class SettingsError(Exception):
    """A flag or environment variable has an unusable value."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    listen: Address
    admin_listen: Address
    policy: Path
    upstream: str
    workers: int
    log_format: str
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    reload_interval: float = 1.0
    shutdown_grace: float = 8.0
    max_concurrent: int = 1000
    max_header_bytes: int = 16384
    max_metadata_bytes: int = 1 << 20
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    retry_attempts: int = 3
    retry_backoff: float = 1.0


# flag, env, default, help
OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("--listen", "PROXY_LISTEN", "127.0.0.1:9180", "data listener (GCS JSON/XML API paths)"),
    (
        "--admin-listen",
        "PROXY_ADMIN_LISTEN",
        "127.0.0.1:9181",
        "admin listener (/healthz, /readyz)",
    ),
    ("--policy", "PROXY_POLICY", "/etc/gcs-iap-proxy/policy.yaml", "policy file or directory"),
    ("--upstream", "PROXY_UPSTREAM", "https://storage.googleapis.com", "Cloud Storage endpoint"),
    ("--workers", "PROXY_WORKERS", "1", "worker processes sharing the data port"),
    ("--log-format", "PROXY_LOG_FORMAT", "json", "json (Cloud Logging) or text"),
    ("--connect-timeout", "PROXY_CONNECT_TIMEOUT", "10", "upstream connect timeout, seconds"),
    ("--read-timeout", "PROXY_READ_TIMEOUT", "120", "upstream idle-read timeout, seconds"),
    (
        "--reload-interval",
        "PROXY_RELOAD_INTERVAL",
        "1",
        "seconds between policy file checks (0: reload on SIGHUP only)",
    ),
    ("--shutdown-grace", "PROXY_SHUTDOWN_GRACE", "8", "seconds to drain on SIGTERM"),
    ("--max-concurrent", "PROXY_MAX_CONCURRENT", "1000", "in-flight requests per worker"),
    ("--max-header-bytes", "PROXY_MAX_HEADER_BYTES", "16384", "longest request line or header"),
    ("--max-metadata-bytes", "PROXY_MAX_METADATA_BYTES", "1048576", "JSON/metadata body limit"),
    ("--header-timeout", "PROXY_HEADER_TIMEOUT", "30", "seconds to send request headers"),
    ("--body-timeout", "PROXY_BODY_TIMEOUT", "60", "seconds a request/response body may idle"),
    ("--retry-attempts", "PROXY_RETRY_ATTEMPTS", "3", "upstream attempts per request (1: none)"),
    ("--retry-backoff", "PROXY_RETRY_BACKOFF", "1", "first retry wait, seconds; doubles"),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, env, default, text in OPTIONS:
        parser.add_argument(flag, default=None, help=f"{text} [env {env}, default {default}]")


def parse_address(value: str, what: str) -> Address:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{what}: expected HOST:PORT, got {value!r}")
    return Address(host, int(port))


def _positive(value: str, what: str, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise SettingsError(f"{what}: expected a number, got {value!r}") from None
    if number <= 0:
        raise SettingsError(f"{what}: must be positive")
    return number


def _non_negative(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{what}: expected a number, got {value!r}") from None
    if not number >= 0:  # also rejects NaN
        raise SettingsError(f"{what}: must not be negative")
    return number


def resolve(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    values: dict[str, str] = {}
    for flag, name, default, _ in OPTIONS:
        attr = flag[2:].replace("-", "_")
        given = getattr(args, attr, None)
        values[attr] = given if given is not None else env.get(name, default)
    upstream = values["upstream"].rstrip("/")
    if not upstream.startswith(("https://", "http://")):
        raise SettingsError(f"--upstream: expected an http(s) URL, got {upstream!r}")
    if values["log_format"] not in {"json", "text"}:
        raise SettingsError("--log-format: expected json or text")
    return Settings(
        listen=parse_address(values["listen"], "--listen"),
        admin_listen=parse_address(values["admin_listen"], "--admin-listen"),
        policy=Path(values["policy"]),
        upstream=upstream,
        workers=int(_positive(values["workers"], "--workers", int)),
        log_format=values["log_format"],
        connect_timeout=_positive(values["connect_timeout"], "--connect-timeout", float),
        read_timeout=_positive(values["read_timeout"], "--read-timeout", float),
        reload_interval=_non_negative(values["reload_interval"], "--reload-interval"),
        shutdown_grace=_non_negative(values["shutdown_grace"], "--shutdown-grace"),
        max_concurrent=int(_positive(values["max_concurrent"], "--max-concurrent", int)),
        max_header_bytes=int(_positive(values["max_header_bytes"], "--max-header-bytes", int)),
        max_metadata_bytes=_metadata_limit(values["max_metadata_bytes"]),
        header_timeout=_positive(values["header_timeout"], "--header-timeout", float),
        body_timeout=_positive(values["body_timeout"], "--body-timeout", float),
        retry_attempts=int(_positive(values["retry_attempts"], "--retry-attempts", int)),
        retry_backoff=_non_negative(values["retry_backoff"], "--retry-backoff"),
    )


def _metadata_limit(value: str) -> int:
    limit = int(_positive(value, "--max-metadata-bytes", int))
    if limit > 1 << 20:
        raise SettingsError("--max-metadata-bytes: at most 1048576 (the metadata parser's ceiling)")
    return limit


def settings_from(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return resolve(parser.parse_args(list(argv)), env)
