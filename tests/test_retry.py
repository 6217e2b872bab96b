"""Retry decisions (Cloud Storage's retry guidance) and the resilience settings."""

from __future__ import annotations

import random

import pytest

from proxy.gcs.parse import parse_request
from proxy.retry import RetryPolicy, StreamedBody, idempotent, replayable, retryable_status
from proxy.settings import SettingsError, settings_from


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("GET", "/storage/v1/b/bkt/o/a", True),
        ("GET", "/download/storage/v1/b/bkt/o/a?alt=media", True),
        ("GET", "/storage/v1/b/bkt/o?prefix=a%2F", True),
        ("DELETE", "/storage/v1/b/bkt/o/a", False),
        ("DELETE", "/storage/v1/b/bkt/o/a?generation=5", True),
        ("DELETE", "/storage/v1/b/bkt/o/a?ifGenerationMatch=5", True),
        ("PATCH", "/storage/v1/b/bkt/o/a", False),
        ("PATCH", "/storage/v1/b/bkt/o/a?ifMetagenerationMatch=2", True),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=a", False),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=a&ifGenerationMatch=0", True),
        ("POST", "/storage/v1/b/bkt/o/a/copyTo/b/bkt/o/b?ifGenerationMatch=0", True),
        ("POST", "/storage/v1/b/bkt/o/a/acl", False),
        ("PUT", "/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=h", False),
    ],
)
def test_idempotency_follows_the_guidance(method, target, expected):
    assert idempotent(parse_request(method, target, {})) is expected


def test_retryable_statuses():
    assert [
        s
        for s in (200, 308, 400, 403, 404, 408, 412, 429, 500, 502, 503, 504)
        if retryable_status(s)
    ] == [
        408,
        429,
        500,
        502,
        503,
        504,
    ]


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    policy = RetryPolicy(attempts=10, initial=1.0, maximum=8.0, rng=random.Random(1))  # noqa: S311
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (9, 8.0)]:
        delays = {policy.delay(attempt) for _ in range(50)}
        assert all(base / 2 <= d <= base for d in delays)
        assert len(delays) > 1  # jittered
    assert policy.delay(1, retry_after="5") >= 5
    assert policy.delay(1, retry_after="600") <= 8.0


async def test_a_started_stream_is_never_replayed():
    async def chunks():
        yield b"a"

    body = StreamedBody(chunks(), idle_timeout=1)
    assert replayable(body) and replayable(b"bytes") and replayable(None)
    assert [c async for c in body] == [b"a"]
    assert not replayable(body)
    operation = parse_request("GET", "/storage/v1/b/bkt/o/a", {})
    assert not RetryPolicy(attempts=3).may_retry(1, operation, body)
    assert RetryPolicy(attempts=3).may_retry(2, operation, None)
    assert not RetryPolicy(attempts=3).may_retry(3, operation, None)


def test_resilience_settings_from_flags_and_environment():
    settings = settings_from(
        ["--shutdown-grace", "3", "--retry-attempts", "1"],
        {"PROXY_MAX_CONCURRENT": "7", "PROXY_BODY_TIMEOUT": "2.5", "PROXY_HEADER_TIMEOUT": "4"},
    )
    assert (settings.shutdown_grace, settings.retry_attempts) == (3.0, 1)
    assert (settings.max_concurrent, settings.body_timeout, settings.header_timeout) == (
        7,
        2.5,
        4.0,
    )
    defaults = settings_from([], {})
    assert (defaults.shutdown_grace, defaults.max_metadata_bytes, defaults.retry_attempts) == (
        8.0,
        1 << 20,
        3,
    )
    with pytest.raises(SettingsError, match="max-metadata-bytes"):
        settings_from(["--max-metadata-bytes", str(2 << 20)], {})
    with pytest.raises(SettingsError, match="max-concurrent"):
        settings_from(["--max-concurrent", "0"], {})
