"""Policy lint: valid policies that probably do not say what their author meant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from proxy.policy.evaluate import expand_principal
from proxy.policy.grants import covers, hosted_domains
from proxy.policy.model import Effect, Policy, Rule, Source, Verb

WRITE_LIKE = frozenset({Verb.WRITE, Verb.DELETE, Verb.ADMIN})
BUCKET_WIDE_RISKY = frozenset({Verb.WRITE, Verb.DELETE, Verb.METADATA, Verb.ADMIN})
# Templates that give each caller a place of their own; `${domain}` is shared by a whole domain.
PER_CALLER = ("${email}", "${sub}")


@dataclass(frozen=True, order=True)
class LintWarning:
    source: Source
    subject: str  # "rule 'id'", "group 'name'" or "issuer URL"
    message: str
    rule: str | None = None

    def __str__(self) -> str:
        return f"{self.source}: warning: {self.subject}: {self.message}"

    def as_json(self) -> dict[str, object]:
        return {
            "source": str(self.source),
            "rule": self.rule,
            "subject": self.subject,
            "message": self.message,
        }


def lint(policy: Policy) -> list[LintWarning]:
    """Every warning for `policy`, in file order."""
    found = [
        *_over_grants(policy),
        *_bucket_wide(policy),
        *_open_prefixes(policy),
        *_shadowed(policy),
        *_service_accounts_as_users(policy),
        *_unused_groups(policy),
        *_unmatchable_issuers(policy),
        *_subjects_across_issuers(policy),
    ]
    return sorted(found, key=lambda w: (w.source.file, w.source.line, w.message))


def _warn(rule: Rule, message: str) -> LintWarning:
    return LintWarning(rule.source, f"rule {rule.id!r}", message, rule.id)


def _verbs(verbs: frozenset[Verb]) -> str:
    return ", ".join(sorted(v.value for v in verbs))


def _members(policy: Policy, rule: Rule) -> Iterator[tuple[str, str]]:
    """(principal as written, an identity principal it stands for)."""
    for written in rule.principals:
        for member in expand_principal(policy, written):
            yield written, member


def _allows(policy: Policy) -> Iterator[Rule]:
    return (r for r in policy.rules if r.effect is Effect.ALLOW)


def _over_grants(policy: Policy) -> Iterator[LintWarning]:
    for rule in _allows(policy):
        risky = rule.verbs & WRITE_LIKE
        if not risky or all(any(t in p for t in PER_CALLER) for p in rule.prefixes):
            continue
        for written, member in _members(policy, rule):
            if member == "allAuthenticatedUsers" or member.startswith("domain:"):
                via = f" (via {written})" if written != member else ""
                yield _warn(
                    rule,
                    f"{member}{via} may {_verbs(risky)}: every caller it covers shares that "
                    "access; name users, service accounts or groups, or use a ${email} prefix",
                )


def _bucket_wide(policy: Policy) -> Iterator[LintWarning]:
    for rule in _allows(policy):
        risky = rule.verbs & BUCKET_WIDE_RISKY
        if "" in rule.prefixes and risky:
            yield _warn(
                rule,
                f'grants {_verbs(risky)} on the whole bucket gs://{rule.bucket}/ (prefix ""); '
                "limit it to a folder",
            )


def _open_prefixes(policy: Policy) -> Iterator[LintWarning]:
    for rule in policy.rules:
        for prefix in rule.prefixes:
            if prefix and not prefix.endswith("/"):
                yield _warn(
                    rule,
                    f"prefix {prefix!r} does not end in '/': it also matches "
                    f"{prefix + '-private/'!r} and every other name starting {prefix!r}",
                )


def _prefix_covers(wide: str, narrow: str) -> bool:
    """Whether every object under `narrow` is under `wide`, for any caller."""
    if "${" in wide:
        return narrow.startswith(wide)  # the same template, or a folder inside it
    head = narrow.split("${", 1)[0]
    return head.startswith(wide)


def _covered_by(rule: Rule, other: Rule, verb: Verb, prefix: str) -> bool:
    """Whether `other` (already known to hold the member) covers `verb` on `prefix`."""
    return (
        other.bucket == rule.bucket
        and verb in other.verbs
        and any(_prefix_covers(p, prefix) for p in other.prefixes)
    )


class _Holders:
    """For a member, the rules whose principals cover it, in policy order: the rules that
    name it, and those naming a domain or every caller. Looked up per member instead of
    asking every other rule, so a policy of thousands of rules lints in seconds."""

    def __init__(self, policy: Policy) -> None:
        self.hosted = hosted_domains(policy)
        self.position = {id(r): i for i, r in enumerate(policy.rules)}
        self._named: dict[str, list[Rule]] = {}
        self._wide: list[tuple[str, Rule]] = []
        for rule in policy.rules:
            for member in {m for _, m in _members(policy, rule)}:
                self._named.setdefault(member, []).append(rule)
                if member == "allAuthenticatedUsers" or member.startswith("domain:"):
                    self._wide.append((member, rule))

    def deciding_first(self, rule: Rule, member: str) -> list[Rule]:
        """The rules holding `member` that decide before `rule` could, in the order they
        decide: every deny, then earlier allows, for an allow; earlier denies for a deny."""
        here = self.position[id(rule)]
        found = {id(r): r for r in self._named.get(member, ())}
        found.update(  # a domain's allow may not hold a Google account of its emails
            (id(r), r)
            for wide, r in self._wide
            if covers(wide, member, self.hosted and r.effect is Effect.ALLOW)
        )
        before = [
            r
            for r in found.values()
            if r is not rule
            and (
                (r.effect is Effect.DENY and rule.effect is Effect.ALLOW)
                or (r.effect is rule.effect and self.position[id(r)] < here)
            )
        ]
        return sorted(before, key=lambda r: (r.effect is Effect.ALLOW, self.position[id(r)]))


def _shadowed(policy: Policy) -> Iterator[LintWarning]:
    holders = _Holders(policy)
    for rule in policy.rules:
        # A deny beats any allow; an earlier rule of the same effect decides before a later one.
        deciding = _deciders(policy, rule, holders)
        if deciding:
            yield _warn(rule, f"never decides anything: everything it covers is {deciding}")


def _deciders(policy: Policy, rule: Rule, holders: _Holders) -> str | None:
    """Which rules decide everything `rule` covers, in words; None if `rule` ever decides."""
    found: dict[Effect, set[str]] = {Effect.ALLOW: set(), Effect.DENY: set()}
    tuples = [
        (member, verb, prefix)
        for _, member in _members(policy, rule)
        for verb in rule.verbs
        for prefix in rule.prefixes
    ]
    held: dict[str, list[Rule]] = {}
    for member, verb, prefix in tuples:
        if member not in held:
            held[member] = holders.deciding_first(rule, member)
        by = [o for o in held[member] if _covered_by(rule, o, verb, prefix)]
        if not by:
            return None
        found[by[0].effect].add(by[0].id)
    words = {Effect.DENY: "denied by", Effect.ALLOW: "already granted by earlier"}
    if rule.effect is Effect.DENY:
        words[Effect.DENY] = "already denied by earlier"
    parts = [
        f"{words[effect]} {', '.join(repr(i) for i in sorted(ids))}"
        for effect, ids in found.items()
        if ids
    ]
    return " or ".join(parts) if tuples else None


def _service_accounts_as_users(policy: Policy) -> Iterator[LintWarning]:
    for rule in policy.rules:
        for written, member in _members(policy, rule):
            if member.startswith("user:") and member.endswith(".gserviceaccount.com"):
                via = f" (via {written})" if written != member else ""
                yield _warn(
                    rule,
                    f"{member}{via} never matches: service accounts are serviceAccount:EMAIL",
                )


def _unused_groups(policy: Policy) -> Iterator[LintWarning]:
    used = {
        p.removeprefix("group:")
        for r in policy.rules
        for p in r.principals
        if p.startswith("group:")
    }
    for name in sorted(set(policy.groups) - used):
        source = policy.group_sources.get(name, Source(policy.files[0] if policy.files else "?", 0))
        yield LintWarning(source, f"group {name!r}", "is defined but no rule uses it")


def _unmatchable_issuers(policy: Policy) -> Iterator[LintWarning]:
    members = {m for rule in _allows(policy) for _, m in _members(policy, rule)}
    for issuer in policy.issuers:
        if any(
            not m.startswith("subject:") or m.startswith(f"subject:{issuer.issuer}#")
            for m in members
        ):
            continue
        source = issuer.source or Source(policy.files[0] if policy.files else "?", 0)
        yield LintWarning(
            source,
            f"issuer {issuer.issuer}",
            "no allow rule can match its callers (every allow rule names only other "
            "issuers' subject: principals)",
        )


def _subjects_across_issuers(policy: Policy) -> Iterator[LintWarning]:
    """`${sub}` gives each caller a place of their own only within one issuer: OIDC makes a
    subject unique per issuer, so two issuers' callers can share one."""
    issuers = sorted({i.issuer for i in policy.issuers})
    if len(issuers) < 2:
        return
    for rule in _allows(policy):
        templated = [p for p in rule.prefixes if "${sub}" in p]
        members = [m for _, m in _members(policy, rule)]
        # Who can match: a subject: principal's own issuer; any other principal, every issuer.
        spans = {
            m.removeprefix("subject:").partition("#")[0]
            for m in members
            if m.startswith("subject:")
        }
        if templated and (len(spans) > 1 or any(not m.startswith("subject:") for m in members)):
            yield _warn(
                rule,
                f"prefix {templated[0]!r} is shared by callers of {len(issuers)} issuers with "
                "the same subject (a subject is unique only within its issuer: "
                f"{', '.join(issuers)}); use ${{email}}, or subject: principals of one issuer",
            )
