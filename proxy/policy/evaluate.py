"""Policy evaluation: a pure function from (policy index, identity, access) to a decision."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace

from proxy.policy.model import (
    ISSUER_ALIASES,
    TEMPLATE_VARIABLES,
    UNKNOWN_EMAIL,
    Effect,
    Identity,
    Mode,
    Policy,
    Rule,
    Verb,
    fold,
    template_safe,
)

_TEMPLATE_START = "${"
_TEMPLATE_VARIABLE = re.compile(r"\$\{(" + "|".join(sorted(TEMPLATE_VARIABLES)) + r")\}")


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
    checks: tuple[Decision, ...] = ()  # of an operation needing several accesses: each one

    @property
    def rule_id(self) -> str | None:
        return self.rule.id if self.rule else None


@dataclass(frozen=True)
class _Entry:
    order: int
    rule: Rule


@dataclass
class _Slot:
    """The earliest allow and deny rule per verb for one prefix: the cost of a lookup is one
    slot per matching prefix, however many rules repeat that prefix."""

    allow: dict[Verb, _Entry] = field(default_factory=dict)
    deny: dict[Verb, _Entry] = field(default_factory=dict)

    def add(self, entry: _Entry) -> None:
        slots = self.deny if entry.rule.effect is Effect.DENY else self.allow
        for verb in entry.rule.verbs:
            if verb not in slots:  # rules are added in order: the first one decides
                slots[verb] = entry


def expand_template(template: str, identity: Identity) -> str | None:
    """A templated prefix with the identity's values, or None if a value is unsafe.

    One pass over the template: a value is never read as a template itself (an email
    `${sub}@example.com` must not become another subject's home)."""
    parts = _TEMPLATE_VARIABLE.split(template)  # literal, name, literal, name, ..., literal
    if len(parts) == 1:
        return template
    values = identity.template_values()
    for i in range(1, len(parts), 2):
        value = values[parts[i]]
        if value is None or not template_safe(value):
            return None
        parts[i] = value
    return "".join(parts)


@dataclass
class _PrefixTable:
    """Rules of one (principal, bucket), looked up by the prefixes of a path.

    Static prefixes are found by slicing the path at each known prefix length; templated
    prefixes by the static head before their first `${`, so only templates that can match
    the path are expanded."""

    static: dict[str, _Slot] = field(default_factory=lambda: defaultdict(_Slot))
    templates: dict[str, dict[str, _Slot]] = field(default_factory=lambda: defaultdict(dict))
    lengths: list[int] = field(default_factory=list)
    # Per template: the pattern of every path under it, and its deny rules alone.
    _unfilled: dict[str, tuple[re.Pattern[str], _Slot]] = field(default_factory=dict)

    def add(self, entry: _Entry, prefix: str) -> None:
        if _TEMPLATE_START in prefix:
            head = prefix[: prefix.index(_TEMPLATE_START)]
            self.templates[head].setdefault(prefix, _Slot()).add(entry)
            key = len(head)
        else:
            self.static[prefix].add(entry)
            key = len(prefix)
        if key not in self.lengths:
            self.lengths.append(key)
            self.lengths.sort()

    def allows_somewhere(self, verb: Verb) -> bool:
        """Whether some prefix has an allow rule for `verb` (templated ones included)."""
        templated = (slot for slots in self.templates.values() for slot in slots.values())
        return any(verb in slot.allow for slot in (*self.static.values(), *templated))

    def denies_under(self, identity: Identity, verb: Verb, path: str) -> bool:
        """Whether a deny for `verb` covers some prefix at or below `path` (a carve-out).
        A template the identity cannot fill in counts wherever it could lie."""
        for prefix, slot in self.static.items():
            if verb in slot.deny and prefix.startswith(path):
                return True
        for head, templated in self.templates.items():
            for template, slot in templated.items():
                if verb in slot.deny:
                    expanded = expand_template(template, identity)
                    if expanded is None and (head.startswith(path) or path.startswith(head)):
                        return True
                    if expanded is not None and expanded.startswith(path):
                        return True
        return False

    def allowing(self, identity: Identity) -> list[str]:
        """The prefixes (templates filled in for `identity`) where some rule allows
        something: a path under none of them is allowed nothing here."""
        found = [prefix for prefix, slot in self.static.items() if slot.allow]
        for templated in self.templates.values():
            for template, slot in templated.items():
                expanded = expand_template(template, identity) if slot.allow else None
                if expanded is not None:
                    found.append(expanded)
        return found

    def slots(self, identity: Identity, path: str) -> list[_Slot]:
        found: list[_Slot] = []
        for length in self.lengths:
            if length > len(path):
                break
            head = path[:length]
            slot = self.static.get(head)
            if slot is not None:
                found.append(slot)
            for template, templated in self.templates.get(head, {}).items():
                expanded = expand_template(template, identity)
                if expanded is not None:
                    if path.startswith(expanded):
                        found.append(templated)
                elif templated.deny:
                    # No value to fill in (no email, no `hd`, an unsafe one): its allows
                    # never match, its denies match any value. A deny on `home/${email}/x/`
                    # is not escaped by a token without an email.
                    pattern, denies = self._unfilled_slot(template, templated)
                    if pattern.match(path):
                        found.append(denies)
        return found

    def _unfilled_slot(self, template: str, slot: _Slot) -> tuple[re.Pattern[str], _Slot]:
        unfilled = self._unfilled.get(template)
        if unfilled is None:
            parts = _TEMPLATE_VARIABLE.split(template)
            pattern = "".join(
                re.escape(part) if i % 2 == 0 else "[^/]+" for i, part in enumerate(parts)
            )
            unfilled = self._unfilled[template] = (re.compile(pattern), _Slot(deny=slot.deny))
        return unfilled


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
    if kind in _BY_EMAIL:
        return f"{kind}{sep}{fold(rest)}"
    if kind == "subject":
        issuer, _, subject = rest.partition("#")
        return f"subject:{ISSUER_ALIASES.get(issuer, issuer)}#{subject}"
    return principal


_BY_EMAIL = frozenset({"user", "serviceAccount", "domain"})


def compile_policy(policy: Policy) -> PolicyIndex:
    tables: dict[tuple[str, str], _PrefixTable] = defaultdict(_PrefixTable)
    for order, rule in enumerate(policy.rules):
        keys = {p for principal in rule.principals for p in expand_principal(policy, principal)}
        if rule.effect is Effect.DENY and any(k.partition(":")[0] in _BY_EMAIL for k in keys):
            keys.add(UNKNOWN_EMAIL)  # a caller whose email is not known may be one of them
        for key in keys:
            table = tables[(key, rule.bucket)]
            for prefix in rule.prefixes:
                table.add(_Entry(order, rule), prefix)
    return PolicyIndex(policy, dict(tables))


def evaluate(index: PolicyIndex, identity: Identity, access: Access) -> Decision:
    """Any matching deny wins; else any matching allow; else deny."""
    allow: _Entry | None = None
    deny: _Entry | None = None
    for principal in identity.principals():
        table = index.tables.get((principal, access.bucket))
        if table is None:
            continue
        for slot in table.slots(identity, access.path):
            denied = slot.deny.get(access.verb)
            if denied is not None and (deny is None or denied.order < deny.order):
                deny = denied
            allowed = slot.allow.get(access.verb)
            if allowed is not None and (allow is None or allowed.order < allow.order):
                allow = allowed
    if deny is not None:
        return Decision(False, access, deny.rule, f"denied by rule {deny.rule.id!r}")
    for principal in identity.deny_only_principals():
        table = index.tables.get((principal, access.bucket))
        for slot in table.slots(identity, access.path) if table is not None else ():
            denied = slot.deny.get(access.verb)
            if denied is not None and (deny is None or denied.order < deny.order):
                deny = denied
    if deny is not None:
        return Decision(False, access, deny.rule, _unproven(deny.rule, identity))
    if allow is not None:
        return Decision(True, access, allow.rule, f"allowed by rule {allow.rule.id!r}")
    return Decision(False, access, None, f"no rule grants {access.verb.value} on {access.resource}")


def _unproven(rule: Rule, identity: Identity) -> str:
    if identity.email is None:
        return (
            f"denied by rule {rule.id!r}: it names callers by email, and the token vouches for none"
        )
    return f"denied by rule {rule.id!r}: the email is in its domain, and the token names no such hd"


def granting_prefixes(rule: Rule, identity: Identity, path: str) -> list[str]:
    """The prefixes of `rule`, filled in for `identity`, that `path` lies under."""
    found = []
    for prefix in rule.prefixes:
        expanded = expand_template(prefix, identity)
        if expanded is not None and path.startswith(expanded):
            found.append(expanded)
    return found


def may_be_granted(index: PolicyIndex, identity: Identity, verb: Verb, bucket: str) -> bool:
    """Whether any allow rule could grant `verb` on some object of `bucket` to `identity`:
    False means every object there is refused, whatever its name turns out to be."""
    for principal in identity.principals():
        table = index.tables.get((principal, bucket))
        if table is not None and table.allows_somewhere(verb):
            return True
    return False


def allowing(index: PolicyIndex, identity: Identity, bucket: str) -> list[str]:
    """Prefixes of `bucket` under which some rule allows `identity` something: `evaluate`
    refuses every path under none of them (what the policy tools skip asking about)."""
    found: list[str] = []
    for principal in identity.principals():
        table = index.tables.get((principal, bucket))
        if table is not None:
            found += table.allowing(identity)
    return found


def carved_out(index: PolicyIndex, identity: Identity, access: Access) -> bool:
    """Whether some deny rule hides part of what lies under `access.path` from `identity`
    (the deny carve-outs a list of that prefix filters out)."""
    for principal in identity.principals() | identity.deny_only_principals():
        table = index.tables.get((principal, access.bucket))
        if table is not None and table.denies_under(identity, access.verb, access.path):
            return True
    return False


def evaluate_all(index: PolicyIndex, identity: Identity, accesses: tuple[Access, ...]) -> Decision:
    """An operation is allowed only if every access it needs is; the first refusal decides.
    Allowed, the decision named is the one for what the operation changes (a copy's write
    of its destination, not the read of its source); `checks` holds every decision."""
    if len(accesses) == 1:
        return evaluate(index, identity, accesses[0])
    decisions = tuple(evaluate(index, identity, access) for access in accesses)
    refused = [d for d in decisions if not d.allowed]
    named = refused[0] if refused else max(decisions, key=lambda d: _WEIGHT[d.access.verb])
    return replace(named, checks=decisions)


# What an access does to its object, most first: it names an allowed operation's decision.
_WEIGHT = {
    Verb.ADMIN: 5,
    Verb.WRITE: 4,
    Verb.DELETE: 3,
    Verb.METADATA: 2,
    Verb.LIST: 1,
    Verb.READ: 0,
}
