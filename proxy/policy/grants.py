"""Access as grants: who may do what, and what changed, by asking the evaluator about principals."""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from proxy.policy.evaluate import (
    Access,
    Decision,
    PolicyIndex,
    allowing,
    compile_policy,
    evaluate,
    expand_principal,
    expand_template,
)
from proxy.policy.model import (
    ALL_VERBS,
    GOOGLE_ISSUER,
    HOSTED_DOMAIN_ISSUERS,
    TEMPLATE_VARIABLES,
    Identity,
    Policy,
    fold,
)

# A stand-in issuer and subject no `subject:` principal names, for principals that are emails.
ANY_ISSUER = "urn:gcs-iap-proxy:any-issuer"
ANY_SUBJECT = "any-subject"
_ANYONE = "anyone"
_NOWHERE = "nowhere.invalid"  # a reserved name (RFC 2606): no caller's real domain
_TEMPLATE = re.compile(r"\$\{([a-z]+)\}")


def covers(wide: str, narrow: str, hosted: bool = False) -> bool:
    """Whether every identity holding principal `narrow` also holds `wide`. With `hosted`
    (the policy lists Google's or IAP's issuer, whose `domain:` is the token's `hd`), a
    domain does not cover its emails: `ann@example.com` may be a personal Google account.
    A domain's deny still covers them (see Identity.deny_only_principals): pass False."""
    if wide == narrow or wide == "allAuthenticatedUsers":
        return True
    kind, _, rest = wide.partition(":")
    if kind != "domain" or hosted:
        return False
    narrow_kind, _, email = narrow.partition(":")
    return narrow_kind in {"user", "serviceAccount"} and email.rpartition("@")[2] == rest


def hosted_domains(*policies: Policy) -> bool:
    """Whether a policy lists an issuer whose `domain:` is the token's `hd`."""
    return any(i.issuer in HOSTED_DOMAIN_ISSUERS for p in policies for i in p.issuers)


def principals_of(policy: Policy) -> set[str]:
    """Every principal the policy names, groups expanded."""
    return {
        p for rule in policy.rules for q in rule.principals for p in expand_principal(policy, q)
    }


class Representatives:
    """An identity for each principal: one that holds that principal and nothing more specific
    the policies mention, so evaluating it tells what every holder of the principal may do."""

    def __init__(self, named: Iterable[str], hosted: bool = False) -> None:
        named = set(named)
        # A person stands for its least: with Google's issuer listed, a personal account
        # (no `hd`) that no domain allow covers.
        self._person_issuer = GOOGLE_ISSUER if hosted else ANY_ISSUER
        self._emails = {
            p.partition(":")[2] for p in named if p.startswith(("user:", "serviceAccount:"))
        }
        self._domains = {p.partition(":")[2] for p in named if p.startswith("domain:")}
        domains = self._domains | {email.rpartition("@")[2] for email in self._emails}
        nowhere, n = _NOWHERE, 0
        while nowhere in domains:
            n += 1
            nowhere = f"{n}.{_NOWHERE}"
        # Everyone, and a subject, stand for callers with an email no rule names: a caller
        # whose token vouches for none is denied more (deny rules by email cover it), so
        # it is not what they may do at most.
        self._nobody_named = f"{_ANYONE}@{nowhere}"

    def identity(self, principal: str) -> Identity | None:
        """None for a principal no caller can hold (`user:` with a service account's email)."""
        kind, _, rest = principal.partition(":")
        if kind in {"user", "serviceAccount"}:
            identity = Identity(self._person_issuer, ANY_SUBJECT, rest)
            return identity if principal in identity.principals() else None
        if kind == "domain":
            return Identity(ANY_ISSUER, ANY_SUBJECT, self.member(rest))
        if kind == "subject":
            issuer, _, subject = rest.partition("#")
            return Identity(issuer, subject, self._nobody_named)
        return Identity(ANY_ISSUER, ANY_SUBJECT, self._nobody_named)

    def variants(
        self,
        principal: str,
        emails: Iterable[str],
        subjects: Iterable[str],
        domains: Iterable[str] = (),
    ) -> Iterator[Identity]:
        """The representative, then holders of the principal with the claims it leaves
        open taken from `emails` and `subjects`: what a templated prefix singles out
        (`subs/${sub}/` of a domain, `sh/${email}/` of a subject)."""
        identity = self.identity(principal)
        if identity is None:
            return
        yield identity
        kind = principal.partition(":")[0]
        if kind == "subject":
            for email in emails:
                yield Identity(identity.issuer, identity.subject, email, email.rpartition("@")[2])
        elif kind in {"user", "serviceAccount"}:  # one person: a whole domain is not its
            for subject in subjects:  # member with this subject (listed as that subject)
                yield Identity(identity.issuer, subject, identity.email)
            if identity.issuer == GOOGLE_ISSUER:  # a Workspace member of a named domain
                for domain in sorted(self._domains | set(domains)):
                    yield Identity(GOOGLE_ISSUER, ANY_SUBJECT, identity.email, domain)

    def member(self, domain: str) -> str:
        """An email of `domain` no principal names."""
        local, n = _ANYONE, 0
        while f"{local}@{domain}" in self._emails:
            n += 1
            local = f"{_ANYONE}{n}"
        return f"{local}@{domain}"


def prune(principals: Iterable[str], hosted: bool = False) -> list[str]:
    """Drop principals another one in the list already covers."""
    found = sorted(set(principals))
    return [p for p in found if not any(q != p and covers(q, p, hosted) for q in found)]


# -- who-can ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WhoCan:
    access: Access
    principals: tuple[str, ...]
    exceptions: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {"principals": list(self.principals), "except": list(self.exceptions)}

    def text(self) -> str:
        if not self.principals:
            return f"nobody may {self.access.verb.value} {self.access.resource}"
        lines = [f"may {self.access.verb.value} {self.access.resource}:"]
        lines += [f"  {p}" for p in self.principals]
        if self.exceptions:
            lines.append("except (denied or not granted):")
            lines += [f"  {p}" for p in self.exceptions]
        return "\n".join(lines)


def _bindings(template: str, path: str) -> dict[str, str] | None:
    """The template values that make `template` a prefix of `path` (None if none do)."""
    parts = _TEMPLATE.split(template)
    pattern, seen = "", set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pattern += re.escape(part)
        elif part in seen:
            pattern += f"(?P={part})"
        else:
            seen.add(part)
            # A trailing variable would match any prefix of the segment: take the whole one.
            pattern += f"(?P<{part}>[^/]+)"
    match = re.match(pattern, path)
    return dict(match.groupdict()) if match else None


def _template_values(policy: Policy, bucket: str, path: str) -> list[dict[str, str]]:
    """The template values that make some rule's templated prefix a prefix of `path`."""
    found = []
    for rule in policy.rules:
        if rule.bucket != bucket:
            continue
        for prefix in rule.prefixes:
            values = _bindings(prefix, path) if "${" in prefix else None
            if values and set(values) <= TEMPLATE_VARIABLES:
                found.append(values)
    return found


def _template_principals(policy: Policy, bound: list[dict[str, str]]) -> set[str]:
    """Principals a templated prefix singles out for this path (`home/${email}/` -> user:...)."""
    found: set[str] = set()
    for values in bound:
        email, domain, sub = values.get("email"), values.get("domain"), values.get("sub")
        if email:
            kind = "serviceAccount" if email.endswith(".gserviceaccount.com") else "user"
            found.add(f"{kind}:{fold(email)}")
        elif domain:
            found.add(f"domain:{fold(domain)}")
        elif sub:
            found.update(f"subject:{i.issuer}#{sub}" for i in policy.issuers)
    return found


def who_can(policy: Policy, access: Access, index: PolicyIndex | None = None) -> WhoCan:
    """The principals (groups expanded, denies applied) that may perform `access`.

    A principal is listed if some holder of it may: a `subject:` with an email the path
    names or in a domain the policy names, a person with a subject the path names."""
    index = index or compile_policy(policy)
    bound = _template_values(policy, access.bucket, access.path)
    candidates = principals_of(policy) | _template_principals(policy, bound)
    candidates.add("allAuthenticatedUsers")
    hosted = hosted_domains(policy)
    people = Representatives(candidates, hosted)
    emails = {fold(v["email"]) for v in bound if "email" in v and "@" in v["email"]}
    emails |= {people.member(p.partition(":")[2]) for p in candidates if p.startswith("domain:")}
    subjects = sorted({v["sub"] for v in bound if "sub" in v})
    domains = sorted({fold(v["domain"]) for v in bound if "domain" in v})

    def may(principal: str) -> bool:
        for n, identity in enumerate(people.variants(principal, emails, subjects, domains)):
            decision = evaluate(index, identity, access)
            # A variant counts only by a rule naming the principal, or singling out its
            # subject: `home/${email}/` of everyone allows a subject whose email is bob's,
            # but that is bob's home.
            if decision.allowed and (n == 0 or _names(policy, decision, principal, access)):
                return True
        return False

    allowed = {p for p in candidates if may(p)}
    listed = prune(allowed, hosted)
    refused = sorted(  # denied principals a listed one may hold (a domain: its emails)
        p for p in candidates - allowed if any(covers(q, p) and q != p for q in listed)
    )
    return WhoCan(access, tuple(listed), tuple(refused))


def _names(policy: Policy, decision: Decision, principal: str, access: Access) -> bool:
    rule = decision.rule
    if rule is None:
        return False
    if any(principal in expand_principal(policy, p) for p in rule.principals):
        return True
    kind, _, rest = principal.partition(":")
    if kind in {"user", "serviceAccount"}:  # a template of its email singles it out
        return any(
            fold((_bindings(p, access.path) or {}).get("email") or "") == rest
            for p in rule.prefixes
            if "${" in p
        )
    subject = rest.partition("#")[2]
    return kind == "subject" and any(
        (_bindings(p, access.path) or {}).get("sub") == subject for p in rule.prefixes if "${" in p
    )


# -- diff -----------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Grant:
    principal: str
    verb: str
    bucket: str
    prefix: str

    def as_json(self) -> dict[str, str]:
        return {
            "principal": self.principal,
            "verb": self.verb,
            "bucket": self.bucket,
            "prefix": self.prefix,
        }

    def __str__(self) -> str:
        return f"{self.principal} {self.verb} gs://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class AccessDiff:
    granted: tuple[Grant, ...]
    revoked: tuple[Grant, ...]

    @property
    def changed(self) -> bool:
        return bool(self.granted or self.revoked)

    def as_json(self) -> dict[str, object]:
        return {
            "granted": [g.as_json() for g in self.granted],
            "revoked": [g.as_json() for g in self.revoked],
        }

    def text(self) -> str:
        if not self.changed:
            return "no change in access"
        lines = [f"+ {g}" for g in self.granted] + [f"- {g}" for g in self.revoked]
        summary = f"{len(self.granted)} grant(s) added, {len(self.revoked)} removed"
        return "\n".join([*lines, summary])


Regions = dict[str, set[str]]


def regions(*policies: Policy) -> Regions:
    """Per bucket, every prefix any rule names. Access is the same for every object whose
    longest named prefix is the same, so asking about each named prefix answers for all."""
    found: Regions = {}
    for policy in policies:
        for rule in policy.rules:
            found.setdefault(rule.bucket, set()).update(rule.prefixes)
    return found


def grants(
    policy: Policy, principals: Iterable[str], places: Regions, people: Representatives
) -> set[Grant]:
    """Every (principal, verb, bucket, prefix) the policy allows, one per region.

    A templated prefix stands for each caller's own value: a principal's representative is
    asked about the prefix filled in with its own email, subject or domain. Only regions
    under a prefix where some rule allows the principal something are asked about (every
    other one `evaluate` refuses): near-linear in the rules, not quadratic."""
    index = compile_policy(policy)
    ordered = {
        bucket: (sorted(p for p in prefixes if "${" not in p), [p for p in prefixes if "${" in p])
        for bucket, prefixes in places.items()
    }
    verbs = sorted(ALL_VERBS)
    found: set[Grant] = set()
    for principal in principals:
        identity = people.identity(principal)
        if identity is None:
            continue
        for bucket, (static, templated) in ordered.items():
            heads = tuple(allowing(index, identity, bucket))
            if not heads:
                continue  # nothing allowed to this principal in this bucket
            asked = {(p, p) for head in heads for p in _starting_with(static, head)}
            for template in templated:
                path = expand_template(template, identity)
                path = template if path is None else path
                if path.startswith(heads):
                    asked.add((template, path))
            for prefix, path in asked:
                for verb in verbs:
                    if evaluate(index, identity, Access(verb, bucket, path)).allowed:
                        found.add(Grant(principal, verb.value, bucket, prefix))
    return found


def _starting_with(ordered: list[str], head: str) -> Iterator[str]:
    """The strings of sorted `ordered` that start with `head`."""
    for prefix in itertools.islice(ordered, bisect.bisect_left(ordered, head), None):
        if not prefix.startswith(head):
            return
        yield prefix


def _minimal(changes: set[Grant], places: Regions, hosted: bool = False) -> tuple[Grant, ...]:
    """Drop a change another one implies: a wider principal, or the enclosing region.
    Linear in the changes: only `allAuthenticatedUsers` and `domain:` principals are wider
    than others, and a region's parent is found among its own prefixes."""
    wide = {
        c.principal
        for c in changes
        if c.principal == "allAuthenticatedUsers" or c.principal.startswith("domain:")
    }
    named = {bucket: set(prefixes) for bucket, prefixes in places.items()}

    def parent(bucket: str, prefix: str) -> str | None:
        """The longest other named prefix that encloses `prefix`."""
        inside = named.get(bucket, set())
        return next(
            (prefix[:n] for n in range(len(prefix) - 1, -1, -1) if prefix[:n] in inside), None
        )

    def implied(g: Grant) -> bool:
        wider = any(
            Grant(p, g.verb, g.bucket, g.prefix) in changes
            for p in wide
            if p != g.principal and covers(p, g.principal, hosted)
        )
        enclosing = parent(g.bucket, g.prefix)
        return wider or (enclosing is not None and replace_prefix(g, enclosing) in changes)

    return tuple(sorted(g for g in changes if not implied(g)))


def replace_prefix(grant: Grant, prefix: str) -> Grant:
    return Grant(grant.principal, grant.verb, grant.bucket, prefix)


def diff(old: Policy, new: Policy) -> AccessDiff:
    """Access NEW grants that OLD did not, and access OLD granted that NEW does not."""
    named = principals_of(old) | principals_of(new)
    hosted = hosted_domains(old, new)
    people = Representatives(named, hosted)
    places = regions(old, new)
    before = grants(old, named, places, people)
    after = grants(new, named, places, people)
    return AccessDiff(
        _minimal(after - before, places, hosted), _minimal(before - after, places, hosted)
    )
