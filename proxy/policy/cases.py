"""Policy test cases (`*_test.yaml` beside the policy): parsing, running, and the CLI's inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.policy.evaluate import Access, Decision, PolicyIndex, compile_policy, evaluate
from proxy.policy.load import PolicyError, load_policy
from proxy.policy.model import (
    GOOGLE_ISSUER,
    ISSUER_ALIASES,
    Identity,
    InputError,
    Policy,
    Source,
    Verb,
)

IDENTITY_KEYS = ("email", "sub", "issuer", "email_verified", "hd")
CASE_KEYS = ("name", "identity", "verb", "resource", "expect", "rule")


def parse_resource(value: str) -> tuple[str, str]:
    """`gs://BUCKET/OBJECT` (or `gs://BUCKET/` for the whole bucket) as (bucket, object)."""
    bucket, _, path = value.removeprefix("gs://").partition("/")
    if not value.startswith("gs://") or not bucket:
        raise InputError(f"expected gs://BUCKET/OBJECT, got {value!r}")
    return bucket, path


# The token claims a decision depends on besides the email (`--identity`).
CLAIMS = ("iss", "sub", "email_verified", "hd")


def parse_claims(claims: Sequence[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for claim in claims:
        key, sep, value = claim.partition("=")
        if not sep or not key:
            raise InputError(f"expected --claim KEY=VALUE, got {claim!r}")
        if key not in CLAIMS:
            raise InputError(f"--claim {key!r}: the claims that decide are {', '.join(CLAIMS)}")
        values[key] = value
    return values


def make_identity(policy: Policy, values: Mapping[str, str | bool | None]) -> Identity:
    """The identity a verified token with these claims would yield (as proxy.identity does)."""
    email = values.get("email")
    named = values.get("issuer") or values.get("iss")
    subject = values.get("sub") or email
    if not isinstance(subject, str) or not subject:
        raise InputError("an identity needs an email or a sub")
    issuer = str(named) if named else _default_issuer(policy)
    return Identity.of(ISSUER_ALIASES.get(issuer, issuer), subject, values)


def _default_issuer(policy: Policy) -> str:
    return policy.issuers[0].issuer if policy.issuers else GOOGLE_ISSUER


# -- test files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    source: Source
    identity: dict[str, str | bool | None]
    verb: Verb
    resource: str
    expect: bool
    rule: str | None = None


@dataclass(frozen=True)
class CaseFile:
    path: str
    policy: Path
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class Result:
    case: Case
    decision: Decision

    @property
    def ok(self) -> bool:
        rule_ok = self.case.rule is None or self.case.rule == self.decision.rule_id
        return self.decision.allowed == self.case.expect and rule_ok

    def as_json(self) -> dict[str, object]:
        rule = self.decision.rule
        return {
            "name": self.case.name,
            "source": str(self.case.source),
            "ok": self.ok,
            "expect": _word(self.case.expect),
            "actual": _word(self.decision.allowed),
            "expect_rule": self.case.rule,
            "rule": rule.id if rule else None,
            "rule_source": str(rule.source) if rule else None,
            "reason": self.decision.reason,
        }

    def text(self) -> str:
        rule = self.decision.rule
        by = f"rule {rule.id!r} at {rule.source}" if rule else "no rule"
        expected = _word(self.case.expect) + (
            f" by rule {self.case.rule!r}" if self.case.rule else ""
        )
        return (
            f"FAIL {self.case.source}: {self.case.name}: expected {expected}, "
            f"got {_word(self.decision.allowed)} ({by}: {self.decision.reason})"
        )


def _word(allowed: bool) -> str:
    return "allow" if allowed else "deny"


@dataclass(frozen=True)
class CaseReport:
    results: tuple[Result, ...]
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.ok for r in self.results)

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "passed": sum(r.ok for r in self.results),
            "failed": sum(not r.ok for r in self.results),
            "errors": list(self.errors),
            "cases": [r.as_json() for r in self.results],
        }

    def text(self) -> str:
        lines = list(self.errors) + [r.text() for r in self.results if not r.ok]
        passed = sum(r.ok for r in self.results)
        failed = len(self.results) - passed
        lines.append(f"{passed} passed, {failed} failed" + (", errors" if self.errors else ""))
        return "\n".join(lines)


def case_files(path: Path) -> list[Path]:
    """A file stands for itself; a directory for its `*_test.yaml` files."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.endswith("_test.yaml") and p.is_file())
    return [path]


def run_tests(paths: Sequence[Path]) -> CaseReport:
    results: list[Result] = []
    errors: list[str] = []
    for path in paths:
        files = case_files(path) if path.exists() else []
        if not files:
            errors.append(f"{path}:0: no test file found")
        for file in files:
            try:
                results += run_file(parse_test_file(file))
            except PolicyError as exc:
                errors += exc.errors
    return CaseReport(tuple(results), tuple(errors))


def run_file(tests: CaseFile) -> list[Result]:
    policy = load_policy(tests.policy)
    index = compile_policy(policy)
    return [_run(index, case) for case in tests.cases]


def _run(index: PolicyIndex, case: Case) -> Result:
    bucket, path = parse_resource(case.resource)
    identity = make_identity(index.policy, case.identity)
    return Result(case, evaluate(index, identity, Access(case.verb, bucket, path)))


def parse_test_file(path: Path) -> CaseFile:
    """Read a test file strictly: every problem at once, as `FILE:LINE: message`."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([f"{path}:0: cannot read: {exc}"]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError([f"{path}:{line}: invalid YAML: {exc}"]) from exc
    reader = _Reader(str(path))
    top = reader.mapping(root, "test file", ("policy", "cases"), ("policy", "cases"))
    cases: list[Case] = []
    policy = None
    if top is not None and "policy" in top:
        name = reader.string(top["policy"], "policy")
        policy = path.parent / name if name else None
    if top is not None and "cases" in top:
        if not isinstance(top["cases"], SequenceNode) or not top["cases"].value:
            reader.error(top["cases"], "cases must be a non-empty list")
        else:
            cases = [c for node in top["cases"].value if (c := reader.case(node)) is not None]
    if reader.errors or policy is None:
        raise PolicyError(reader.errors or [f"{path}:1: no policy named"])
    return CaseFile(str(path), policy, tuple(cases))


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[str] = []
        self.names: set[str] = set()

    def error(self, node: Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        self.errors.append(f"{self.file}:{line}: {message}")

    def mapping(
        self, node: Node | None, what: str, allowed: Sequence[str], required: Sequence[str]
    ) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping")
            return None
        fields: dict[str, Node] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.value not in allowed:
                self.error(key, f"{what}: unknown key {getattr(key, 'value', '?')!r}")
            elif key.value in fields:
                self.error(key, f"{what}: duplicate key {key.value!r}")
            else:
                fields[key.value] = value
        for key in required:
            if key not in fields:
                self.error(node, f"{what}: missing required key {key!r}")
        return fields

    def string(self, node: Node, what: str) -> str | None:
        if (
            not isinstance(node, ScalarNode)
            or node.tag != "tag:yaml.org,2002:str"
            or not node.value
        ):
            self.error(node, f"{what} must be a non-empty string")
            return None
        return str(node.value)

    def case(self, node: Node) -> Case | None:
        required = ("name", "identity", "verb", "resource", "expect")
        fields = self.mapping(node, "case", CASE_KEYS, required)
        if fields is None or any(k not in fields for k in required):
            return None
        before = len(self.errors)
        name = self.string(fields["name"], "name") or ""
        if name in self.names:
            self.error(fields["name"], f"duplicate case name {name!r}")
        self.names.add(name)
        identity = self.identity(fields["identity"])
        verb = self.string(fields["verb"], "verb")
        if verb is not None and verb not in {v.value for v in Verb}:
            self.error(fields["verb"], f"unknown verb {verb!r}")
        resource = self.string(fields["resource"], "resource") or ""
        try:
            parse_resource(resource)
        except InputError as exc:
            self.error(fields["resource"], str(exc))
        expect = self.string(fields["expect"], "expect")
        if expect not in {"allow", "deny"}:
            self.error(fields["expect"], "expect must be 'allow' or 'deny'")
        rule = self.string(fields["rule"], "rule") if "rule" in fields else None
        if len(self.errors) > before or verb is None:
            return None
        source = Source(self.file, node.start_mark.line + 1)
        return Case(name, source, identity, Verb(verb), resource, expect == "allow", rule)

    def identity(self, node: Node) -> dict[str, str | bool | None]:
        fields = self.mapping(node, "identity", IDENTITY_KEYS, ())
        if fields is None:
            return {}
        values: dict[str, str | bool | None] = {}
        for key, value in fields.items():
            if key == "email_verified":
                if not isinstance(value, ScalarNode) or value.tag != "tag:yaml.org,2002:bool":
                    self.error(value, "email_verified must be true or false")
                else:
                    values[key] = value.value.lower() == "true"
            else:
                values[key] = self.string(value, key)
        if not values.get("email") and not values.get("sub"):
            self.error(node, "identity needs an email or a sub")
        return values
