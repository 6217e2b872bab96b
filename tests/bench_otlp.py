"""Benchmark: the sidecar's spans, made and encoded by opentelemetry's SDK against proxy.spans
and proxy.otlp. A program, not a test.

    python tests/bench_otlp.py [--requests 128] [--rounds 7]

Makes one export batch of the sidecar's spans (per request: the SERVER span with the
attributes proxy.observe sets, `authenticate` and `authorize` INTERNAL children and the
`upstream` CLIENT span; 512 spans for the default 128 requests) with the SDK's tracer and
with proxy.spans.Tracer, timing both (median microseconds per request of four spans);
then times, for the SDK's batch, the stock `encode_spans(spans).SerializePartialToString()`
and `proxy.otlp.encode_spans(spans)`, and proxy.otlp on proxy.spans' batch (median
microseconds per span), and prints the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (  # noqa: E402
    encode_spans as stock_encode_spans,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import (  # noqa: E402
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: E402
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags  # noqa: E402

from proxy import otlp, spans  # noqa: E402

RESOURCE = {
    "service.name": "gcs-iap-proxy",
    "service.version": "0.1.0",
    "cloud.provider": "gcp",
    "cloud.platform": "gcp_cloud_run",
    "faas.name": "proxy",
    "faas.version": "proxy-00007-xyz",
    "gcp.cloud_run.configuration": "proxy",
    "cloud.account.id": "my-project",
    "cloud.region": "europe-west1",
    "faas.instance": "0069c7a988c1b2a8f6c2e1d0",
}


class Kept(SpanProcessor):
    """Keeps the ended spans: the least a processor can do."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def sdk_tracer(kept: Kept) -> trace.Tracer:
    provider = TracerProvider(resource=Resource.create(RESOURCE), shutdown_on_exit=False)
    provider.add_span_processor(kept)
    return provider.get_tracer("gcs-iap-proxy", "0.1.0")


def lean_tracer(kept: Kept) -> trace.Tracer:
    provider = TracerProvider(resource=Resource.create(RESOURCE), shutdown_on_exit=False)
    return spans.Tracer(
        resource=provider.resource,
        scope=InstrumentationScope("gcs-iap-proxy", "0.1.0"),
        sampler=provider.sampler,
        limits=SpanLimits(),
        processor=kept,
    )


def batch(tracer: trace.Tracer, requests: int) -> None:
    for n in range(requests):
        caller = SpanContext(
            0x0AF7651916CD43DD8448EB211C800000 + n,
            0xB7AD6B7169200000 + n,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        context = trace.set_span_in_context(NonRecordingSpan(caller))
        target = f"/storage/v1/b/data/o/alice%2Freports%2F{n:05d}.csv"
        with tracer.start_as_current_span(
            "GET",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "GET", "url.path": target, "url.scheme": "http"},
        ) as server:
            with tracer.start_as_current_span("authenticate"):
                pass
            with tracer.start_as_current_span("authorize") as authorize:
                authorize.set_attributes(
                    {
                        "authz.verb": "read",
                        "authz.resource": f"data/alice/reports/{n:05d}.csv",
                        "authz.decision": "allow",
                        "authz.enforced": "true",
                        "authz.rule_id": "alice-folder",
                        "authz.policy_revision": "3f9a2c1",
                        "enduser.id": "alice@example.com",
                    }
                )
            with tracer.start_as_current_span("upstream", kind=SpanKind.CLIENT) as upstream:
                upstream.set_attributes(
                    {
                        "http.request.method": "GET",
                        "server.address": "storage.googleapis.com",
                        "server.port": 443,
                        "url.full": "https://storage.googleapis.com" + target,
                        "url.template": "/storage/v1/b/{bucket}/o/{object}",
                        "http.response.body.size": 1024,
                        "http.response.status_code": 200,
                        "network.protocol.version": "1.1",
                    }
                )
            server.update_name("GET /storage/v1/b/{bucket}/o/{object}")
            server.set_attributes(
                {
                    "http.response.status_code": 200,
                    "http.request.body.size": 0,
                    "http.response.body.size": 1024,
                    "url.query": "alt=media",
                    "http.route": "/storage/v1/b/{bucket}/o/{object}",
                    "user_agent.original": "python-requests/2.32.3",
                    "client.address": "10.0.0.7",
                    "enduser.id": "alice@example.com",
                    "gcs.operation": "objects.get",
                    "gcs.bucket": "data",
                    "gcs.object": f"alice/reports/{n:05d}.csv",
                    "authz.decision": "allow",
                    "authz.rule_id": "alice-folder",
                }
            )


def made(make: Callable[[Kept], trace.Tracer], requests: int) -> Sequence[ReadableSpan]:
    kept = Kept()
    batch(make(kept), requests)
    return kept.spans


def median_seconds(run: Callable[[], object], rounds: int) -> float:
    run()  # warm the caches (both encoders have some)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    count = args.requests
    making = {
        "SDK tracer": median_seconds(lambda: made(sdk_tracer, count), args.rounds),
        "proxy.spans": median_seconds(lambda: made(lean_tracer, count), args.rounds),
    }
    print(f"{count} requests of four spans made, median of {args.rounds} rounds")
    for name, seconds in making.items():
        print(f"  {name:<11} {seconds * 1e6 / count:7.2f} us/request")
    print(f"  SDK tracer / proxy.spans: {making['SDK tracer'] / making['proxy.spans']:.1f}x")
    spans = made(sdk_tracer, count)
    lean = made(lean_tracer, count)
    ours = otlp.encode_spans(spans)
    stock = stock_encode_spans(spans)
    assert type(stock).FromString(ours) == stock, "proxy.otlp disagrees with the stock encoder"
    timings = {
        "stock": median_seconds(
            lambda: stock_encode_spans(spans).SerializePartialToString(), args.rounds
        ),
        "proxy.otlp": median_seconds(lambda: otlp.encode_spans(spans), args.rounds),
        "proxy.otlp on proxy.spans": median_seconds(lambda: otlp.encode_spans(lean), args.rounds),
    }
    print(f"{len(spans)} spans, {len(ours)} bytes, median of {args.rounds} rounds")
    for name, seconds in timings.items():
        print(
            f"  {name:<25} {seconds * 1e6 / len(spans):7.2f} us/span  {seconds * 1e3:7.2f} ms/batch"
        )
    print(f"  stock / proxy.otlp: {timings['stock'] / timings['proxy.otlp']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
