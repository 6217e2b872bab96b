"""Traces, metrics and audit records of the real sidecar process, exported over both OTLP
protocols to a receiver that decodes the protobuf, with fake-gcs-server behind a recording
relay (which shows the trace context that reached "Cloud Storage")."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import secrets
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.devserver.issuer import DevIssuer
from proxy.metrics import NULL_METRICS
from proxy.observe import safe_query
from proxy.telemetry import Platform, Telemetry, exporter_configured, resource_attributes
from tests.support.fakegcs import FakeGcs
from tests.support.otlp_receiver import OtlpReceiver, Span
from tests.support.proxyproc import ProxyProcess, free_port, isolated_env
from tests.support.recorder import RecordingRelay

AUD = "telemetry-sidecar"
BUCKET = "tel-data"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
OBJECT_ROUTE = "/storage/v1/b/{bucket}/o/{object}"
CLOUD_RUN = {
    "K_SERVICE": "tel-proxy",
    "K_REVISION": "tel-proxy-00007-xyz",
    "K_CONFIGURATION": "tel-proxy",
}
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
METRICS = {
    "gcs_iap_proxy.requests",
    "http.server.request.duration",
    "gcs_iap_proxy.decisions",
    "gcs_iap_proxy.bytes",
    "http.client.request.duration",
    "gcs_iap_proxy.upstream.token_refreshes",
    "gcs_iap_proxy.policy.reloads",
}
# Every caller token minted by this module: none may ever be exported or logged.
MINTED: list[str] = []


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Setup:
    proxy: ProxyProcess
    protocol: str


def write_policy(tmp: Path, issuer: DevIssuer) -> Path:
    policy = tmp / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {issuer.issuer_url}
                audiences: ["{AUD}"]
            rules:
              - id: alice-folder
                principals: ["user:{ALICE}"]
                bucket: {BUCKET}
                prefixes: ["alice/"]
                verbs: [read, list, write, delete]
              - id: never-private
                effect: deny
                principals: [allAuthenticatedUsers]
                bucket: {BUCKET}
                prefixes: ["alice/private/"]
                verbs: ["*"]
            """
        )
    )
    return policy


def start_proxy(tmp: Path, issuer: DevIssuer, metadata_port: int, upstream: str, **env: str):
    args = env.pop("args", "").split()
    process = ProxyProcess(
        write_policy(tmp, issuer), upstream, isolated_env(tmp, metadata_port, **env), *args
    )
    process.wait_ready()
    return process


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def bucket(fake_gcs: FakeGcs) -> str:
    fake_gcs.create_bucket(BUCKET)
    fake_gcs.put_object(BUCKET, "alice/report.csv", b"a,b\n1,2\n")
    fake_gcs.put_object(BUCKET, "alice/private/diary.txt", b"dear diary")
    return BUCKET


@pytest.fixture(scope="module", params=["http/protobuf", "grpc"])
def setup(
    request, tmp_path_factory, dev_issuer, metadata_server, bucket, relay, receiver
) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("telemetry")
    env = {**receiver.env(request.param), **FAST_EXPORT, **CLOUD_RUN}
    process = start_proxy(tmp, dev_issuer, metadata_server[1], relay.url, **env)
    yield Setup(process, request.param)
    assert process.stop() == 0, process.output()


def token(issuer: DevIssuer, email: str) -> str:
    minted = issuer.mint(audience=AUD, subject=email.split("@")[0], email=email)
    MINTED.append(minted)
    return minted


def call(
    proxy: ProxyProcess,
    method: str,
    target: str,
    bearer: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    all_headers = {"User-Agent": "telemetry-test/1.0", **(headers or {})}
    if bearer is not None:
        all_headers["Authorization"] = f"Bearer {bearer}"
    connection.request(method, target, body=body, headers=all_headers)
    response = connection.getresponse()
    reply = Reply(response.status, dict(response.getheaders()), response.read())
    connection.close()
    return reply


def new_trace() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def trace_spans(receiver: OtlpReceiver, trace_id: str, count: int) -> dict[str, Span]:
    spans = receiver.wait_for(lambda: len(receiver.spans(trace_id)) >= count)
    spans = receiver.spans(trace_id)
    assert spans and len(spans) == count, [s.name for s in spans]
    return {s.name: s for s in spans}


def audit_records(proxy: ProxyProcess) -> list[dict]:
    records = []
    for line in proxy.output().splitlines():
        if line.startswith("{") and '"audit"' in line:
            records.append(json.loads(line))
    return records


def audit_for(proxy: ProxyProcess, trace_id: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [
            r
            for r in audit_records(proxy)
            if r.get("logging.googleapis.com/trace", "").endswith(f"/traces/{trace_id}")
        ]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit record for trace {trace_id}:\n{proxy.output()[-3000:]}")


def upstream_requests(relay: RecordingRelay, trace_id: str) -> list[str]:
    return [
        s.headers["traceparent"]
        for s in relay.seen
        if s.headers.get("traceparent", "").startswith(f"00-{trace_id}-")
    ]


# -- traces ------------------------------------------------------------------------------


def test_allowed_request_is_one_trace_continued_from_the_caller(
    setup: Setup, receiver, relay, dev_issuer, metadata_server
):
    trace_id, parent, traceparent = new_trace()
    target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv?alt=media"
    reply = call(setup.proxy, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
    assert reply.status == 200 and reply.body == b"a,b\n1,2\n"

    spans = trace_spans(receiver, trace_id, 4)
    server = spans[f"GET {OBJECT_ROUTE}"]
    assert {s.protocol for s in spans.values()} == {setup.protocol}
    assert server.kind == "SERVER" and server.parent_span_id == parent
    assert server.status == "UNSET"
    assert server.attributes == {
        "http.request.method": "GET",
        "url.path": f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv",
        "url.query": "alt=media",
        "url.scheme": "http",
        "http.route": OBJECT_ROUTE,
        "http.response.status_code": 200,
        "http.request.body.size": 0,
        "http.response.body.size": 8,
        "user_agent.original": "telemetry-test/1.0",
        "client.address": "127.0.0.1",
        "enduser.id": ALICE,
        "gcs.operation": "objects.get.media",
        "gcs.bucket": BUCKET,
        "gcs.object": "alice/report.csv",
        "authz.verb": "read",
        "authz.resource": f"gs://{BUCKET}/alice/report.csv",
        "authz.decision": "allow",
        "authz.enforced": "true",
        "authz.rule_id": "alice-folder",
        "authz.policy_revision": server.attributes["authz.policy_revision"],
    }
    assert re.fullmatch(r"[0-9a-f]{16}", server.attributes["authz.policy_revision"])

    for name in ("authenticate", "authorize", "upstream"):
        assert spans[name].parent_span_id == server.span_id, name
    assert spans["authorize"].attributes["authz.decision"] == "allow"
    assert spans["authorize"].attributes["authz.rule_id"] == "alice-folder"
    upstream = spans["upstream"]
    assert upstream.kind == "CLIENT" and upstream.status == "UNSET"
    relay_port = int(relay.url.rsplit(":", 1)[1])
    assert upstream.attributes == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": relay_port,
        "url.full": f"{relay.url}/storage/v1/b/{BUCKET}/o/alice%2Freport.csv",
        "url.template": OBJECT_ROUTE,
        "http.response.status_code": 200,
        "http.response.body.size": 8,
    }

    # What reached Cloud Storage continues the same trace, as a child of the CLIENT span.
    assert upstream_requests(relay, trace_id) == [f"00-{trace_id}-{upstream.span_id}-01"]

    server_resource = server.resource
    metadata, _ = metadata_server
    assert server_resource["service.name"] == "gcs-iap-proxy"
    assert server_resource["cloud.provider"] == "gcp"
    assert server_resource["cloud.platform"] == "gcp_cloud_run"
    assert server_resource["cloud.account.id"] == metadata.project_id
    assert server_resource["cloud.region"] == metadata.region
    assert server_resource["faas.instance"] == metadata.instance_id
    assert server_resource["faas.name"] == CLOUD_RUN["K_SERVICE"]
    assert server_resource["faas.version"] == CLOUD_RUN["K_REVISION"]
    assert server_resource["gcp.cloud_run.configuration"] == CLOUD_RUN["K_CONFIGURATION"]


def test_denial_by_rule_is_traced_without_an_upstream_call(
    setup: Setup, receiver, relay, dev_issuer
):
    trace_id, _, traceparent = new_trace()
    target = f"/storage/v1/b/{BUCKET}/o/alice%2Fprivate%2Fdiary.txt?alt=media"
    reply = call(setup.proxy, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
    assert reply.status == 403

    spans = trace_spans(receiver, trace_id, 3)
    assert set(spans) == {f"GET {OBJECT_ROUTE}", "authenticate", "authorize"}
    server = spans[f"GET {OBJECT_ROUTE}"]
    assert server.status == "UNSET"  # a refusal is an answer, not a server error
    assert server.attributes["http.response.status_code"] == 403
    assert server.attributes["authz.decision"] == "deny"
    assert server.attributes["authz.rule_id"] == "never-private"
    assert server.attributes["gcs.object"] == "alice/private/diary.txt"
    assert spans["authorize"].status == "UNSET"
    assert spans["authorize"].attributes["authz.decision"] == "deny"
    assert upstream_requests(relay, trace_id) == []


def test_denial_without_a_rule_and_a_list_prefix(setup: Setup, receiver, dev_issuer):
    trace_id, _, traceparent = new_trace()
    target = f"/storage/v1/b/{BUCKET}/o?prefix=alice%2F"
    reply = call(
        setup.proxy, "GET", target, token(dev_issuer, MALLORY), {"traceparent": traceparent}
    )
    assert reply.status == 403
    server = trace_spans(receiver, trace_id, 3)["GET /storage/v1/b/{bucket}/o"]
    attributes = server.attributes
    assert attributes["enduser.id"] == MALLORY
    assert attributes["gcs.prefix"] == "alice/"
    assert "gcs.object" not in attributes
    assert attributes["authz.verb"] == "list"
    assert attributes["authz.decision"] == "deny"
    assert "authz.rule_id" not in attributes
    assert attributes["url.query"] == "prefix=alice%2F"


def test_unauthenticated_request_is_traced_and_audited(setup: Setup, receiver):
    trace_id, _, traceparent = new_trace()
    target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
    reply = call(setup.proxy, "GET", target, headers={"traceparent": traceparent})
    assert reply.status == 401
    spans = trace_spans(receiver, trace_id, 2)
    assert spans["GET"].attributes["http.response.status_code"] == 401
    assert spans["authenticate"].attributes["authn.result"] == "rejected (401)"
    assert spans["authenticate"].status == "UNSET"
    record = audit_for(setup.proxy, trace_id)
    assert record["httpRequest"]["status"] == 401
    assert record["audit"]["decision"] == "deny"
    assert record["audit"]["identity"] is None
    assert record["audit"]["reason"] == "no identity token"


def test_a_refused_token_is_audited_with_why(setup: Setup, dev_issuer):
    trace_id, _, traceparent = new_trace()
    stranger = dev_issuer.mint(audience="someone-else", subject="alice", email=ALICE)
    target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
    reply = call(setup.proxy, "GET", target, stranger, {"traceparent": traceparent})
    assert reply.status == 401
    record = audit_for(setup.proxy, trace_id)
    assert record["audit"]["reason"] == "identity token audience does not match"
    assert stranger.rsplit(".", 1)[1] not in setup.proxy.output()


def test_audit_record_is_cloud_logging_structured(setup: Setup, dev_issuer, metadata_server):
    trace_id, _, traceparent = new_trace()
    target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv?alt=media&generation=1"
    reply = call(setup.proxy, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
    assert reply.status in {200, 404}
    record = audit_for(setup.proxy, trace_id)
    server_span_id = record["logging.googleapis.com/spanId"]
    metadata, _ = metadata_server
    assert record["logging.googleapis.com/trace"] == (
        f"projects/{metadata.project_id}/traces/{trace_id}"
    )
    assert re.fullmatch(r"[0-9a-f]{16}", server_span_id)
    assert record["logging.googleapis.com/trace_sampled"] is True
    assert record["severity"] == "NOTICE"
    assert record["message"] == (
        f"allow read gs://{BUCKET}/alice/report.csv for {ALICE} (rule alice-folder)"
    )
    http_request = record["httpRequest"]
    assert re.fullmatch(r"\d+\.\d{6}s", http_request.pop("latency"))
    assert http_request == {
        "requestMethod": "GET",
        "requestUrl": target,
        "status": reply.status,
        "requestSize": "0",
        "responseSize": str(len(reply.body)),
        "userAgent": "telemetry-test/1.0",
        "remoteIp": "127.0.0.1",
    }
    audit = record["audit"]
    assert audit["identity"]["email"] == ALICE
    assert audit["verb"] == "read"
    assert audit["resource"] == f"gs://{BUCKET}/alice/report.csv"
    assert audit["decision"] == "allow"
    assert audit["rule_id"] == "alice-folder"
    assert re.fullmatch(r"[0-9a-f]{16}", audit["policy_revision"])
    assert audit["latency_ms"] >= 0


# -- metrics -----------------------------------------------------------------------------


def test_metrics_are_exported(setup: Setup, receiver, dev_issuer):
    alice = token(dev_issuer, ALICE)
    assert call(setup.proxy, "GET", f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv", alice).status
    forbidden = f"/storage/v1/b/{BUCKET}/o/alice%2Fprivate%2Fx?alt=media"
    assert call(setup.proxy, "GET", forbidden, alice).status == 403

    def points():
        mine = [p for p in receiver.metrics() if p.resource.get("faas.name") == "tel-proxy"]
        names = {p.metric for p in mine}
        decided = {p.attributes.get("authz.decision") for p in mine}
        return mine if names >= METRICS and {"allow", "deny"} <= decided else []

    mine = receiver.wait_for(points)
    assert mine, sorted({p.metric for p in receiver.metrics()})
    assert setup.protocol in receiver.protocols()
    requests = [p for p in mine if p.metric == "gcs_iap_proxy.requests"]
    assert any(
        p.attributes.get("http.route") == OBJECT_ROUTE
        and p.attributes["http.response.status_code"] == 403
        for p in requests
    )
    decisions = [p for p in mine if p.metric == "gcs_iap_proxy.decisions"]
    assert {(p.attributes["authz.decision"], p.attributes["authz.verb"]) for p in decisions} >= {
        ("allow", "read"),
        ("deny", "read"),
    }
    units = {p.metric: p.unit for p in mine}
    assert units["http.server.request.duration"] == "s"
    assert units["gcs_iap_proxy.bytes"] == "By"
    refreshes = [p for p in mine if p.metric == "gcs_iap_proxy.upstream.token_refreshes"]
    assert max(p.value for p in refreshes) >= 1
    reloads = {p.attributes["outcome"] for p in mine if p.metric == "gcs_iap_proxy.policy.reloads"}
    assert reloads == {"ok", "failed"}
    sent = [p for p in mine if p.metric == "gcs_iap_proxy.bytes"]
    assert any(p.attributes["network.io.direction"] == "transmit" for p in sent)


# -- failures, sampling, no exporter -----------------------------------------------------


def test_upstream_failure_is_an_error_span_and_metric(
    setup: Setup, receiver, tmp_path, dev_issuer, metadata_server
):
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**receiver.env(setup.protocol), **FAST_EXPORT, "OTEL_SERVICE_NAME": "dead-upstream"}
    process = start_proxy(tmp_path, dev_issuer, metadata_server[1], dead, **env)
    try:
        trace_id, _, traceparent = new_trace()
        target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
        reply = call(process, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
        assert reply.status == 502
        spans = trace_spans(receiver, trace_id, 4)
        server, upstream = spans[f"GET {OBJECT_ROUTE}"], spans["upstream"]
        assert server.status == "ERROR" and server.attributes["error.type"] == "502"
        assert upstream.status == "ERROR"
        assert upstream.attributes["error.type"] == "UpstreamError"
        assert server.resource["service.name"] == "dead-upstream"

        def errors():
            return [
                p
                for p in receiver.metrics()
                if p.metric == "gcs_iap_proxy.upstream.errors"
                and p.resource["service.name"] == "dead-upstream"
            ]

        assert receiver.wait_for(errors)[0].attributes["error.type"] == "UpstreamError"
    finally:
        assert process.stop() == 0, process.output()


def test_sampler_comes_from_otel_traces_sampler(
    bucket, receiver, relay, tmp_path, dev_issuer, metadata_server
):
    env = {
        **receiver.env("http/protobuf"),
        **FAST_EXPORT,
        "OTEL_TRACES_SAMPLER": "always_off",
        "OTEL_SERVICE_NAME": "sampled-off",
    }
    process = start_proxy(tmp_path, dev_issuer, metadata_server[1], relay.url, **env)
    try:
        trace_id, _, traceparent = new_trace()
        target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
        reply = call(process, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
        assert reply.status == 200
        record = audit_for(process, trace_id)
        assert record["logging.googleapis.com/trace_sampled"] is False
        [upstream] = upstream_requests(relay, trace_id)
        assert upstream.endswith("-00")
        # Metrics still flow; spans do not.
        receiver.wait_for(
            lambda: [p for p in receiver.metrics() if p.resource["service.name"] == "sampled-off"]
        )
        assert receiver.spans(trace_id) == []
    finally:
        assert process.stop() == 0, process.output()


def test_without_exporter_the_callers_trace_still_reaches_upstream(
    bucket, receiver, relay, tmp_path, dev_issuer, metadata_server
):
    process = start_proxy(
        tmp_path, dev_issuer, metadata_server[1], relay.url, args="--log-format text"
    )
    try:
        trace_id, _, traceparent = new_trace()
        target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
        reply = call(process, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
        assert reply.status == 200
        assert upstream_requests(relay, trace_id) == [traceparent]
        reply = call(process, "GET", target.replace("alice%2F", "bob%2F"), token(dev_issuer, ALICE))
        assert reply.status == 403
        denied = f"audit   403 deny read gs://{BUCKET}/bob/report.csv for {ALICE}"
        deadline = time.monotonic() + 5  # audit lines are written after the response
        while denied not in process.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        output = process.output()
        assert f"audit   200 allow read gs://{BUCKET}/alice/report.csv for {ALICE}" in output
        assert denied in output
        assert "telemetry: traces" not in output
    finally:
        assert process.stop() == 0, process.output()
    assert receiver.spans(trace_id) == []


def test_metrics_without_traces_pass_the_callers_trace_upstream(
    bucket, receiver, relay, tmp_path, dev_issuer, metadata_server
):
    """OTEL_TRACES_EXPORTER=none with metrics on: no spans, yet the caller's traceparent
    still reaches Cloud Storage unchanged, and the upstream duration is measured."""
    env = {
        **receiver.env("http/protobuf"),
        **FAST_EXPORT,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "metrics-only",
    }
    process = start_proxy(tmp_path, dev_issuer, metadata_server[1], relay.url, **env)
    try:
        trace_id, _, traceparent = new_trace()
        target = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
        reply = call(process, "GET", target, token(dev_issuer, ALICE), {"traceparent": traceparent})
        assert reply.status == 200
        assert upstream_requests(relay, trace_id) == [traceparent]

        def client_durations():
            return [
                p
                for p in receiver.metrics()
                if p.metric == "http.client.request.duration"
                and p.resource["service.name"] == "metrics-only"
            ]

        points = receiver.wait_for(client_durations)  # one per export so far
        assert {p.attributes["http.response.status_code"] for p in points} == {200}
        assert receiver.spans(trace_id) == []
    finally:
        assert process.stop() == 0, process.output()


# -- secrets -----------------------------------------------------------------------------


def test_nothing_secret_is_exported_or_logged(setup: Setup, receiver, dev_issuer, metadata_server):
    alice = token(dev_issuer, ALICE)
    csek = base64.b64encode(secrets.token_bytes(32)).decode()
    signature = secrets.token_hex(64)
    credential = (
        f"sa%40p.iam.gserviceaccount.com%2F20260101%2Fauto%2Fstorage%2F{secrets.token_hex(6)}"
    )
    api_key = "AIza" + secrets.token_hex(16)
    query_token = token(dev_issuer, MALLORY)
    base = f"/storage/v1/b/{BUCKET}/o/alice%2Freport.csv"
    traced = []
    for target, headers in [
        (
            base + "?alt=media",
            {
                "x-goog-encryption-algorithm": "AES256",
                "x-goog-encryption-key": csek,
                "x-goog-encryption-key-sha256": base64.b64encode(
                    hashlib.sha256(base64.b64decode(csek)).digest()
                ).decode(),
            },
        ),
        (
            base + f"?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential={credential}"
            f"&X-Goog-Signature={signature}",
            {},
        ),
        (base + f"?alt=media&access_token={query_token}", {}),
        (base + f"?alt=media&key={api_key}", {}),
    ]:
        trace_id, _, traceparent = new_trace()
        call(setup.proxy, "GET", target, alice, {"traceparent": traceparent, **headers})
        traced.append(trace_id)
    for trace_id in traced:
        assert receiver.wait_for(lambda t=trace_id: receiver.spans(t)), trace_id
    time.sleep(0.5)  # let the metric reader export once more

    metadata, _ = metadata_server
    haystack = receiver.decoded_text() + "\n" + setup.proxy.output()
    assert "gcs-iap-proxy" in haystack and len(receiver.spans()) > len(traced)
    needles = {
        "CSEK key": csek,
        "signature": signature,
        "credential": credential,
        "api key": api_key,
    }
    for minted in MINTED:
        needles[f"caller token {minted[:12]}"] = minted
        needles[f"caller token signature {minted[:12]}"] = minted.rsplit(".", 1)[1]
    for issued in metadata.issued_tokens:
        needles[f"sidecar token {issued[:16]}"] = issued
    leaks = [what for what, needle in needles.items() if needle in haystack]
    assert leaks == []
    assert "Bearer " not in haystack
    assert "authorization" not in haystack.lower()


# -- units -------------------------------------------------------------------------------


def test_safe_query_keeps_only_harmless_values():
    assert safe_query("") == ""
    assert safe_query("alt=media&prefix=a%2F&generation=3") == "alt=media&prefix=a%2F&generation=3"
    assert safe_query("X-Goog-Signature=abc&upload_id=h&alt=json&flag") == (
        "X-Goog-Signature=REDACTED&upload_id=REDACTED&alt=json&REDACTED"
    )
    # A review: a second `?` or a `;` (alt=media?access_token=...), a bare item (a token
    # alone) and a page token (a sealed handle, or whatever a caller put there) were kept.
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    for query in (
        f"alt=media?access_token={jwt}",
        f"alt=media;access_token={jwt}",
        f"alt=media&{jwt}",
        f"pageToken={jwt}",
        f"alt=json&a?b={jwt}",
    ):
        assert jwt not in safe_query(query) and "c2lnbmF0dXJl" not in safe_query(query), query
    assert safe_query(f"alt=media?access_token={jwt}") == "alt=REDACTED"
    # A second review: a token as a name, or percent-encoded into a known value.
    for query in (f"{jwt}=x", f"access_token%3D{jwt}=", f"alt=media%3Faccess_token%3D{jwt}"):
        assert "c2lnbmF0dXJl" not in safe_query(query), query
    assert safe_query(f"{jwt}=x&alt=media%3Fa%3D{jwt}") == "REDACTED=REDACTED&alt=REDACTED"
    # What operators read stays: free text as clients encode it, numbers, known names.
    kept = "prefix=year%3D2024%2F&fields=items(name),nextPageToken&matchGlob=**/*.{csv,json}"
    assert (
        safe_query(kept + "&generation=1700000000000000") == kept + "&generation=1700000000000000"
    )
    assert (
        safe_query("upload_id=h&X-Goog-Signature=s")
        == "upload_id=REDACTED&X-Goog-Signature=REDACTED"
    )
    assert safe_query("alt=media&pageToken=x&maxResults=5") == (
        "alt=media&pageToken=REDACTED&maxResults=5"
    )


def test_exporter_is_configured_only_by_an_otlp_endpoint():
    assert not exporter_configured({})
    assert exporter_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert exporter_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not exporter_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert not exporter_configured(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
        }
    )


def test_resource_attributes_for_cloud_run():
    platform = Platform(project="p-1", region="europe-west1", instance="00ab")
    assert resource_attributes(CLOUD_RUN, platform) == {
        "service.version": resource_attributes({}, Platform())["service.version"],
        "cloud.provider": "gcp",
        "cloud.platform": "gcp_cloud_run",
        "faas.name": "tel-proxy",
        "faas.version": "tel-proxy-00007-xyz",
        "gcp.cloud_run.configuration": "tel-proxy",
        "cloud.account.id": "p-1",
        "cloud.region": "europe-west1",
        "faas.instance": "00ab",
    }


async def test_no_exporter_means_no_sdk_and_no_metadata_lookup():
    telemetry = Telemetry({"GOOGLE_CLOUD_PROJECT": "given"})
    await telemetry.start()
    assert telemetry.started and not telemetry.enabled
    assert telemetry.metrics is NULL_METRICS
    assert type(telemetry.tracer).__name__ == "NoOpTracer"
    assert telemetry.project == "given"


def test_an_upload_decided_before_and_after_its_body_is_one_authorize_span(
    setup: Setup, receiver, relay, dev_issuer
):
    """The URL's part of a decision comes before a metadata body, the rest after it; an
    allowed upload shows one decision (a review found two authorize spans)."""
    trace_id, _, traceparent = new_trace()
    body = (
        b'--B\r\nContent-Type: application/json\r\n\r\n{"name": "alice/traced.txt"}\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nDATA\r\n--B--\r\n"
    )
    reply = call(
        setup.proxy,
        "POST",
        f"/upload/storage/v1/b/{BUCKET}/o?uploadType=multipart",
        token(dev_issuer, ALICE),
        {"traceparent": traceparent, "Content-Type": "multipart/related; boundary=B"},
        body,
    )
    assert reply.status == 200, reply.body
    spans = trace_spans(receiver, trace_id, 4)
    assert set(spans) == {
        "POST /upload/storage/v1/b/{bucket}/o",
        "authenticate",
        "authorize",
        "upstream",
    }
