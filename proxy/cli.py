"""The `gcs-iap-proxy` command line. Exit codes: 0 ok, 1 failure (policy errors, failed tests), 2 usage."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.policy import Access, Identity, PolicyError, Verb, compile_policy, evaluate, load_policy
from proxy.settings import SettingsError, add_serve_arguments, resolve


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except SettingsError as exc:
        print(f"gcs-iap-proxy: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gcs-iap-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the sidecar")
    add_serve_arguments(serve)
    serve.set_defaults(run=_serve)

    dev = commands.add_parser("dev", help="run everything locally with no cloud account")
    dev.add_argument("--policy", default=None, help="policy file (default: policies/example.yaml)")
    dev.add_argument("--port", type=int, default=9180, help="data port (admin is port+1)")
    dev.set_defaults(run=_dev)

    policy = commands.add_parser("policy", help="check, explain and test policies")
    sub = policy.add_subparsers(metavar="SUBCOMMAND")
    check = sub.add_parser("check", help="validate policy files")
    check.add_argument("paths", nargs="+")
    check.add_argument("--format", choices=["text", "json"], default="text")
    check.set_defaults(run=_check)
    explain = sub.add_parser("explain", help="decision and the rule that made it")
    explain.add_argument("--policy", required=True)
    explain.add_argument("--identity", required=True, help="caller email")
    explain.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE")
    explain.add_argument("--format", choices=["text", "json"], default="text")
    explain.add_argument("verb", choices=[v.value for v in Verb])
    explain.add_argument("resource", help="gs://BUCKET/OBJECT")
    explain.set_defaults(run=_explain)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from proxy.serve import serve

    return serve(resolve(args))


def _dev(args: argparse.Namespace) -> int:
    from proxy.dev import run_dev

    return run_dev(args.policy, args.port)


def _check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(*args.paths)
    except PolicyError as exc:
        if args.format == "json":
            print(json.dumps({"ok": False, "errors": exc.errors}))
        else:
            print("\n".join(exc.errors))
        return 1
    if args.format == "json":
        print(json.dumps({"ok": True, "revision": policy.revision, "rules": len(policy.rules)}))
    else:
        print(f"ok: {len(policy.rules)} rules, revision {policy.revision}")
    return 0


def parse_resource(value: str) -> tuple[str, str]:
    if not value.startswith("gs://") or ("/" not in value[5:] and not value[5:]):
        raise SettingsError(f"expected gs://BUCKET/OBJECT, got {value!r}")
    bucket, _, path = value[5:].partition("/")
    if not bucket:
        raise SettingsError(f"expected gs://BUCKET/OBJECT, got {value!r}")
    return bucket, path


def identity_from_args(email: str, claims: Sequence[str]) -> Identity:
    values = dict(c.partition("=")[::2] for c in claims)
    return Identity(
        issuer=values.get("iss", "https://accounts.google.com"),
        subject=values.get("sub", email),
        email=None if values.get("email_verified") == "false" else email.lower(),
    )


def _explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 1
    bucket, path = parse_resource(args.resource)
    identity = identity_from_args(args.identity, args.claim)
    decision = evaluate(compile_policy(policy), identity, Access(Verb(args.verb), bucket, path))
    result = {
        "decision": "allow" if decision.allowed else "deny",
        "rule": decision.rule_id,
        "source": str(decision.rule.source) if decision.rule else None,
        "reason": decision.reason,
    }
    if args.format == "json":
        print(json.dumps(result))
    else:
        where = f" ({result['source']})" if result["source"] else ""
        print(f"{result['decision']}: {decision.reason}{where}")
    return 0
