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
    )


def settings_from(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return resolve(parser.parse_args(list(argv)), env)
