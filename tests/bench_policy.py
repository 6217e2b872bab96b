"""Benchmark: median policy decision time at 10, 1,000 and 100,000 rules.

Run: python tests/bench_policy.py [--repeat N]

Not a test (pytest does not collect it, nothing asserts a time): it prints the median cost of
one `evaluate()` per policy size and the ratio of the largest to the smallest, measured in the
same run. Target (issue 4): 100,000 rules within 3x of 10 rules, and under 50 us.

The policies look like a large real one: per-user folders spread over many buckets, team
groups, domain-wide read grants, per-user templated homes and deny carve-outs. The caller
asks for things it is granted, things it is denied, and things no rule mentions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.policy import Access, Identity, Mode, Policy, Rule, Verb, compile_policy, evaluate
from proxy.policy.evaluate import PolicyIndex
from proxy.policy.model import ALL_VERBS, Effect, Issuer, Source

SIZES = (10, 1_000, 100_000)
GOOGLE = "https://accounts.google.com"
BUCKETS = 200


def synthetic_policy(size: int) -> Policy:
    rules: list[Rule] = []
    groups = {
        f"team{t}": (f"user:lead{t}@example.com", f"domain:t{t}.example.com") for t in range(50)
    }
    for i in range(size):
        bucket = f"bucket-{i % BUCKETS:04d}"
        kind = i % 10
        if kind == 0:
            principals, prefixes, verbs = (
                ("domain:example.com",),
                (f"shared/{i}/",),
                {Verb.READ, Verb.LIST},
            )
        elif kind == 1:
            principals, prefixes, verbs = ("domain:example.com",), ("home/${email}/",), ALL_VERBS
        elif kind == 2:
            principals, prefixes, verbs = (f"group:team{i % 50}",), (f"teams/{i}/",), {Verb.READ}
        else:
            principals = (f"user:u{i}@example.com",)
            prefixes, verbs = (f"users/{i}/", f"drop/{i}/"), {Verb.READ, Verb.WRITE}
        effect = Effect.ALLOW
        if kind == 9:
            effect, principals, prefixes = (
                Effect.DENY,
                ("allAuthenticatedUsers",),
                (f"users/{i - 6}/secret/",),
            )
        rules.append(
            Rule(
                id=f"r{i}",
                effect=effect,
                principals=principals,
                bucket=bucket,
                prefixes=prefixes,
                verbs=frozenset(verbs),
                source=Source("bench.yaml", i + 1),
            )
        )
    return Policy(
        mode=Mode.ENFORCE,
        issuers=(Issuer(GOOGLE, ("aud",)),),
        groups=groups,
        rules=tuple(rules),
        user_projects=frozenset(),
        revision=f"bench-{size}",
    )


def workload(size: int) -> list[tuple[Identity, Access]]:
    """Requests against rule 3 (present at every size) and misses, same shape at every size."""
    user = Identity(GOOGLE, "3", "u3@example.com")
    other = Identity(GOOGLE, "7", "nobody@elsewhere.example.org")
    bucket = "bucket-0003"
    return [
        (user, Access(Verb.READ, bucket, "users/3/2026/report.csv")),  # allow
        (user, Access(Verb.READ, bucket, "users/3/secret/pay.csv")),  # deny (size > 9)
        (user, Access(Verb.WRITE, bucket, "elsewhere/x")),  # no rule
        (user, Access(Verb.READ, "bucket-0001", "home/u3@example.com/notes.txt")),  # template
        (other, Access(Verb.READ, bucket, "users/3/2026/report.csv")),  # stranger
    ]


def median_ns(index: PolicyIndex, requests: list[tuple[Identity, Access]], repeat: int) -> float:
    samples: list[float] = []
    batch = 200
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(batch):
            for identity, access in requests:
                evaluate(index, identity, access)
        samples.append((time.perf_counter_ns() - start) / (batch * len(requests)))
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50, help="timed batches per size")
    args = parser.parse_args()
    results: dict[int, float] = {}
    for size in SIZES:
        started = time.perf_counter()
        index = compile_policy(synthetic_policy(size))
        built = time.perf_counter() - started
        results[size] = median_ns(index, workload(size), args.repeat)
        print(
            f"{size:>7} rules: median {results[size] / 1000:6.2f} us/decision (index built in {built:.2f}s)"
        )
    ratio = results[SIZES[-1]] / results[SIZES[0]]
    worst = max(results.values()) / 1000
    print(
        f"ratio {SIZES[-1]:,}/{SIZES[0]} rules: {ratio:.2f}x (target <= 3x); slowest {worst:.2f} us (target < 50 us)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
