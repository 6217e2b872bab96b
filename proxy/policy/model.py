"""The policy model: frozen values built by the loader, read by the evaluator."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

GOOGLE_ISSUER = "https://accounts.google.com"
IAP_ISSUER = "https://cloud.google.com/iap"
# Issuers whose tokens name the caller's Google Workspace or Cloud Identity domain in `hd`:
# their `domain:` is that claim, as in IAM, not the email's domain (anyone can sign up for
# a Google account with a work address, and keep it after leaving).
HOSTED_DOMAIN_ISSUERS = frozenset({GOOGLE_ISSUER, IAP_ISSUER})
# The spelling of Google's issuer that its tokens may also carry, as policies may write it.
ISSUER_ALIASES = {"accounts.google.com": GOOGLE_ISSUER}


def spellings(issuer: str) -> tuple[str, ...]:
    """Every `iss` a token of `issuer` may carry: its name, and its aliases."""
    return (issuer, *(alias for alias, name in ISSUER_ALIASES.items() if name == issuer))


# Held by an identity whose token vouches for no usable email: deny rules that name callers
# by email or domain apply to it, so a deny is not escaped by leaving the email out. Not a
# principal a policy can write.
UNKNOWN_EMAIL = "email-unknown:"


class Verb(enum.StrEnum):
    READ = "read"
    LIST = "list"
    WRITE = "write"
    DELETE = "delete"
    METADATA = "metadata"
    ADMIN = "admin"


ALL_VERBS: frozenset[Verb] = frozenset(Verb)


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"


@dataclass(frozen=True)
class Source:
    """Where a policy element was written: shown by `explain`, never to callers."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Issuer:
    issuer: str
    audiences: tuple[str, ...]
    header: str | None = None
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: int = 30
    source: Source | None = None


@dataclass(frozen=True)
class Rule:
    id: str
    effect: Effect
    principals: tuple[str, ...]
    bucket: str
    prefixes: tuple[str, ...]
    verbs: frozenset[Verb]
    source: Source


@dataclass(frozen=True)
class Policy:
    """A complete, validated policy; `revision` is a hash of the source files."""

    mode: Mode
    issuers: tuple[Issuer, ...]
    groups: dict[str, tuple[str, ...]]
    rules: tuple[Rule, ...]
    user_projects: frozenset[str]
    revision: str
    files: tuple[str, ...] = field(default=())
    group_sources: dict[str, Source] = field(default_factory=dict)


# What `${...}` may name in a prefix; Identity.template_values gives each one.
TEMPLATE_VARIABLES = frozenset(["email", "sub", "domain"])


def email_vouched(claims: Mapping[str, object]) -> bool:
    """Whether a token vouches for its `email`: `email_verified` true, or absent (IAP's
    header JWT has none). Anything else counts as unverified, not only `false`: "FALSE",
    0, null, "no", a list."""
    verified = claims.get("email_verified", True)
    return verified is True or (isinstance(verified, str) and verified.lower() == "true")


def fold(text: str) -> str:
    """Emails and domains as principals compare them: lower case."""
    return text.lower()


def lowers_into_ascii(text: str) -> bool:
    """Whether a character outside ASCII lowers into ASCII (the Kelvin sign into `k`): an
    email holding one would be taken for another person's."""
    return not text.isascii() and any(not c.isascii() and c.lower().isascii() for c in text)


def usable_email(value: object) -> str | None:
    """A claimed email as principals compare it: one `@` between a local part and a
    domain, lowered; None for anything else (`example.com` alone would be that domain,
    `\u212aate@` would be kate's)."""
    if not isinstance(value, str) or lowers_into_ascii(value):
        return None
    local, at, domain = value.partition("@")
    if not (at and local and domain) or "@" in domain:
        return None
    return fold(value)


def template_safe(value: str | None) -> bool:
    """Whether an identity value may be substituted into a prefix template."""
    if not value or ".." in value:
        return False
    return not any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value)


class InputError(ValueError):
    """A resource, claim or identity given on the command line or in a case is malformed."""


@dataclass(frozen=True)
class Identity:
    """A verified caller. `email` is set only when the token vouches for it (and folded);
    `hosted_domain` is a Google token's `hd`."""

    issuer: str
    subject: str
    email: str | None = None
    hosted_domain: str | None = None

    @property
    def domain(self) -> str | None:
        if self.issuer in HOSTED_DOMAIN_ISSUERS:
            return self.hosted_domain
        return self.email.rpartition("@")[2] if self.email else None

    @property
    def display(self) -> str:
        return self.email or f"{self.issuer}#{self.subject}"

    def principals(self) -> frozenset[str]:
        return self._principals

    def deny_only_principals(self) -> frozenset[str]:
        """More principals whose deny rules apply, and only those: a deny cannot be escaped
        by a token without an email, or a Google token without its domain's `hd`."""
        return self._deny_only

    @cached_property
    def _principals(self) -> frozenset[str]:
        found = {"allAuthenticatedUsers", f"subject:{self.issuer}#{self.subject}"}
        if self.email:
            kind = "serviceAccount" if self.email.endswith(".gserviceaccount.com") else "user"
            found.add(f"{kind}:{self.email}")
        if self.domain:
            found.add(f"domain:{self.domain}")
        return frozenset(found)

    @cached_property
    def _deny_only(self) -> frozenset[str]:
        if not self.email:
            return frozenset({UNKNOWN_EMAIL})
        return frozenset({f"domain:{self.email.rpartition('@')[2]}"}) - self._principals

    def template_values(self) -> dict[str, str | None]:
        return {"email": self.email, "sub": self.subject, "domain": self.domain}

    @classmethod
    def of(cls, issuer: str, subject: str, claims: Mapping[str, object]) -> Identity:
        """The identity a token's verified claims name (the sidecar's and the policy
        tools' one reading): the email if vouched for and well formed, Google's `hd`."""
        email = usable_email(claims.get("email")) if email_vouched(claims) else None
        hd = claims.get("hd")  # counted with a vouched email only, as every domain: is
        hosted = (
            email
            and isinstance(hd, str)
            and hd
            and not lowers_into_ascii(hd)  # as an email: `\u212aorp.com` is not korp.com
            and issuer in HOSTED_DOMAIN_ISSUERS
        )
        return cls(issuer, subject, email, fold(hd) if hosted and isinstance(hd, str) else None)
