"""Policy evaluation: a pure function from (policy index, identity, access) to a decision."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from proxy.policy.model import Effect, Identity, Mode, Policy, Rule, Verb, template_safe

_TEMPLATE_START = "${"


@dataclass(frozen=True)
class Access:
    """One thing an operation needs: `verb` on gs://bucket/path (an object, or a list prefix)."""

    verb: Verb
    bucket: str
    path: str

    @property
    def resource(self) -> str:
        return f"gs://{self.bucket}/{self.path}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    access: Access
    rule: Rule | None
    reason: str

    @property
    def rule_id(self) -> str | None:
        return self.rule.id if self.rule else None


@dataclass(frozen=True)
class _Entry:
    order: int
    rule: Rule
    prefix: str

    def matches(self, identity: Identity, path: str) -> bool:
        if _TEMPLATE_START not in self.prefix:
            return path.startswith(self.prefix)
        expanded = self.prefix
        for name, value in identity.template_values().items():
            token = "${" + name + "}"
            if token in expanded:
                if not template_safe(value):
                    return False
                expanded = expanded.replace(token, value)  # type: ignore[arg-type]
        return path.startswith(expanded)


@dataclass
class _PrefixTable:
    """Rules of one (principal, bucket), looked up by the prefixes of a path."""

    static: dict[str, list[_Entry]] = field(default_factory=lambda: defaultdict(list))
    lengths: list[int] = field(default_factory=list)
    templated: list[_Entry] = field(default_factory=list)

    def add(self, entry: _Entry) -> None:
        if _TEMPLATE_START in entry.prefix:
            self.templated.append(entry)
            return
        self.static[entry.prefix].append(entry)
        if len(entry.prefix) not in self.lengths:
            self.lengths.append(len(entry.prefix))
            self.lengths.sort()

    def candidates(self, path: str) -> list[_Entry]:
        found: list[_Entry] = []
        for length in self.lengths:
            if length > len(path):
                break
            found.extend(self.static.get(path[:length], ()))
        found.extend(self.templated)
        return found


@dataclass(frozen=True)
class PolicyIndex:
    """A policy compiled for lookups by principal, then bucket, then prefix."""

    policy: Policy
    tables: dict[tuple[str, str], _PrefixTable]

    @property
    def revision(self) -> str:
        return self.policy.revision

    @property
    def enforcing(self) -> bool:
        return self.policy.mode is Mode.ENFORCE


def expand_principal(policy: Policy, principal: str) -> tuple[str, ...]:
    """A rule principal as the identity principals it stands for (groups expanded)."""
    if principal.startswith("group:"):
        return tuple(_normalise(p) for p in policy.groups.get(principal[len("group:") :], ()))
    return (_normalise(principal),)


def _normalise(principal: str) -> str:
    kind, sep, rest = principal.partition(":")
    if kind in {"user", "serviceAccount", "domain"}:
        return f"{kind}{sep}{rest.lower()}"
    return principal


def compile_policy(policy: Policy) -> PolicyIndex:
    tables: dict[tuple[str, str], _PrefixTable] = defaultdict(_PrefixTable)
    for order, rule in enumerate(policy.rules):
        keys = {p for principal in rule.principals for p in expand_principal(policy, principal)}
        for key in keys:
            table = tables[(key, rule.bucket)]
            for prefix in rule.prefixes:
                table.add(_Entry(order, rule, prefix))
    return PolicyIndex(policy, dict(tables))


def evaluate(index: PolicyIndex, identity: Identity, access: Access) -> Decision:
    """Any matching deny wins; else any matching allow; else deny."""
    allow: _Entry | None = None
    deny: _Entry | None = None
    for principal in identity.principals():
        table = index.tables.get((principal, access.bucket))
        if table is None:
            continue
        for entry in table.candidates(access.path):
            if access.verb not in entry.rule.verbs or not entry.matches(identity, access.path):
                continue
            if entry.rule.effect is Effect.DENY:
                if deny is None or entry.order < deny.order:
                    deny = entry
            elif allow is None or entry.order < allow.order:
                allow = entry
    if deny is not None:
        return Decision(False, access, deny.rule, f"denied by rule {deny.rule.id!r}")
    if allow is not None:
        return Decision(True, access, allow.rule, f"allowed by rule {allow.rule.id!r}")
    return Decision(False, access, None, f"no rule grants {access.verb.value} on {access.resource}")


def evaluate_all(index: PolicyIndex, identity: Identity, accesses: tuple[Access, ...]) -> Decision:
    """An operation is allowed only if every access it needs is; the first refusal decides."""
    decisions = [evaluate(index, identity, access) for access in accesses]
    refused = [d for d in decisions if not d.allowed]
    return refused[0] if refused else decisions[0]
