"""The `gcs-iap-proxy` command line. Exit codes: 0 ok, 1 failure (policy errors, lint warnings,
failed tests, access changed in `diff`), 2 usage (and unreadable inputs to `diff`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy import __version__
from proxy.policy import (
    Access,
    Policy,
    PolicyError,
    Verb,
    compile_policy,
    evaluate,
    load_policy,
    parse_policy,
)
from proxy.policy.model import InputError
from proxy.settings import SettingsError, add_serve_arguments, resolve


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except (SettingsError, InputError) as exc:
        print(f"gcs-iap-proxy: {exc}", file=sys.stderr)
        return 2
    except _Failed as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # The reader went away (`policy diff ... | head`): no traceback, and none either
        # when the interpreter flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


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

    _add_policy_commands(
        commands.add_parser(
            "policy", help="policy as code: check, lint, test, explain, who-can, diff"
        )
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = resolve(args)
    from proxy.supervise import is_worker, supervise

    if settings.workers > 1 and not is_worker():
        return supervise(settings)  # before importing the server: the parent stays small
    from proxy.serve import serve

    return serve(settings)


def _dev(args: argparse.Namespace) -> int:
    from proxy.dev import run_dev

    return run_dev(args.policy, args.port)


# -- policy commands: parse arguments, call proxy.policy, print text or JSON -----------------


def _add_policy_commands(policy: argparse.ArgumentParser) -> None:
    sub = policy.add_subparsers(metavar="SUBCOMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=text, description=text)
        parser.add_argument("--format", choices=["text", "json"], default="text")
        parser.set_defaults(run=run)
        return parser

    for name, run, text in (
        ("check", _check, "validate policies: every error as FILE:LINE; exit 1 on any"),
        ("lint", _lint, "warn about over-grants, shadowed rules, open prefixes; exit 1 on any"),
    ):
        command(name, run, text).add_argument("paths", nargs="+", metavar="PATH")
    explain = command("explain", _explain, "the decision and the rule (FILE:LINE) that made it")
    explain.add_argument("--policy", required=True)
    explain.add_argument("--identity", required=True, metavar="EMAIL", help="caller email")
    explain.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE")
    _add_access(explain)
    who = command("who-can", _who_can, "principals that may do VERB on gs://BUCKET/OBJECT")
    who.add_argument("--policy", required=True)
    _add_access(who)
    test = command("test", _test, "run policy test cases (*_test.yaml); exit 1 on failure")
    test.add_argument("paths", nargs="+", metavar="FILE_test.yaml")
    diff = command("diff", _diff, "access NEW grants or removes; exit 1 when it changed")
    diff.add_argument("old", metavar="OLD", help="a path, or REV:PATH read from git")
    diff.add_argument("new", metavar="NEW", help="a path, or REV:PATH read from git")


def _add_access(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("verb", choices=[v.value for v in Verb])
    parser.add_argument("resource", help="gs://BUCKET/OBJECT")


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    print(json.dumps(data, indent=2) if args.format == "json" else text)


def _load(path: str) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as exc:
        raise _Failed(exc.errors) from exc


class _Failed(Exception):
    """A policy could not be loaded; its errors are printed and the command exits 1."""

    def __init__(self, errors: Sequence[str], code: int = 1) -> None:
        super().__init__("\n".join(errors))
        self.errors, self.code = list(errors), code


def _check(args: argparse.Namespace) -> int:
    errors: list[str] = []
    loaded: list[dict[str, object]] = []
    for path in args.paths:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            errors += exc.errors
            continue
        loaded.append({"path": path, "revision": policy.revision, "rules": len(policy.rules)})
    lines = errors or [
        f"ok: {p['path']}: {p['rules']} rules, revision {p['revision']}" for p in loaded
    ]
    _emit(args, {"ok": not errors, "errors": errors, "policies": loaded}, "\n".join(lines))
    return 1 if errors else 0


def _lint(args: argparse.Namespace) -> int:
    from proxy.policy.lint import LintWarning, lint

    errors: list[str] = []
    warnings: list[LintWarning] = []
    for path in args.paths:
        try:
            warnings += lint(load_policy(path))
        except PolicyError as exc:
            errors += exc.errors
    lines = errors + [str(w) for w in warnings]
    lines.append(f"{len(warnings)} warning(s)" if warnings or errors else "ok: no warnings")
    data = {
        "ok": not (errors or warnings),
        "errors": errors,
        "warnings": [w.as_json() for w in warnings],
    }
    _emit(args, data, "\n".join(lines))
    return 1 if errors or warnings else 0


def _explain(args: argparse.Namespace) -> int:
    from proxy.policy.cases import make_identity, parse_claims, parse_resource

    policy = _load(args.policy)
    bucket, path = parse_resource(args.resource)
    identity = make_identity(policy, {**parse_claims(args.claim), "email": args.identity})
    decision = evaluate(compile_policy(policy), identity, Access(Verb(args.verb), bucket, path))
    source = str(decision.rule.source) if decision.rule else None
    word = "allow" if decision.allowed else "deny"
    data = {"decision": word, "rule": decision.rule_id, "source": source, "reason": decision.reason}
    _emit(args, data, f"{word}: {decision.reason}" + (f" ({source})" if source else ""))
    return 0


def _who_can(args: argparse.Namespace) -> int:
    from proxy.policy.cases import parse_resource
    from proxy.policy.grants import who_can

    policy = _load(args.policy)
    bucket, path = parse_resource(args.resource)
    answer = who_can(policy, Access(Verb(args.verb), bucket, path))
    _emit(args, answer.as_json(), answer.text())
    return 0


def _test(args: argparse.Namespace) -> int:
    from proxy.policy.cases import run_tests

    report = run_tests([Path(p) for p in args.paths])
    _emit(args, report.as_json(), report.text())
    return 0 if report.ok else 1


def _diff(args: argparse.Namespace) -> int:
    from proxy.policy.gitread import read_source
    from proxy.policy.grants import diff

    try:
        old, new = (parse_policy(read_source(spec)) for spec in (args.old, args.new))
    except PolicyError as exc:
        raise _Failed(exc.errors, code=2) from exc
    changes = diff(old, new)
    _emit(args, changes.as_json(), changes.text())
    return 1 if changes.changed else 0
