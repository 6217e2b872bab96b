"""Policy loading (every error, with file:line) and evaluation (deny wins, default deny, templates)."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
import yaml

from proxy.policy import (
    Access,
    Identity,
    Mode,
    PolicyError,
    Verb,
    compile_policy,
    evaluate,
    load_policy,
)
from proxy.policy.evaluate import (
    PolicyIndex,
    carved_out,
    evaluate_all,
    expand_principal,
    expand_template,
    may_be_granted,
)
from proxy.policy.grants import (
    Grant,
    Representatives,
    covers,
    grants,
    hosted_domains,
    principals_of,
    regions,
)
from proxy.policy.lint import _prefix_covers, lint
from proxy.policy.load import PolicyText, parse_policy
from proxy.policy.model import ALL_VERBS, Effect

EXAMPLE = Path(__file__).resolve().parent.parent / "policies" / "example.yaml"
GOOGLE = "https://accounts.google.com"
ALICE = Identity(GOOGLE, "1", "alice@example.com", "example.com")
BOB = Identity(GOOGLE, "2", "bob@analytics.example.com", "analytics.example.com")
# A personal Google account registered with a work address: no `hd`, not the domain's.
DAVE = Identity(GOOGLE, "5", "dave@example.com")
ETL = Identity(GOOGLE, "3", "etl@acme-prod.iam.gserviceaccount.com")
STRANGER = Identity(GOOGLE, "4", "mallory@example.net")


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def home_and_sub_folders(tmp_path: Path) -> PolicyIndex:
    """Everyone may read `home/${email}/` and `sub/${sub}/` of bucket bkt."""
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        rules:
          - id: home
            principals: [allAuthenticatedUsers]
            bucket: bkt
            prefixes: ["home/${{email}}/", "sub/${{sub}}/"]
            verbs: [read]
        """,
    )
    return compile_policy(load_policy(path))


def errors_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value.errors


@pytest.fixture(scope="module")
def example():
    return compile_policy(load_policy(EXAMPLE))


def decide(index, identity, verb, resource):
    bucket, _, path = resource.removeprefix("gs://").partition("/")
    return evaluate(index, identity, Access(Verb(verb), bucket, path))


def test_example_policy_loads_with_sources(example):
    policy = example.policy
    assert [r.id for r in policy.rules] == [
        "analysts-read-reports",
        "etl-writes-reports",
        "per-user-home",
        "never-secrets",
    ]
    assert str(policy.rules[0].source) == f"{EXAMPLE}:21"
    assert policy.mode is Mode.ENFORCE
    assert len(policy.revision) == 16


@pytest.mark.parametrize(
    ("identity", "verb", "resource", "allowed", "rule"),
    [
        (ALICE, "read", "gs://acme-reports/reports/2026/q1.csv", True, "analysts-read-reports"),
        (BOB, "list", "gs://acme-reports/shared/", True, "analysts-read-reports"),
        (ALICE, "read", "gs://acme-reports/reports/secret/pay.csv", False, "never-secrets"),
        (ETL, "write", "gs://acme-reports/reports/secret/x", False, "never-secrets"),
        (ALICE, "write", "gs://acme-reports/reports/x", False, None),
        (ALICE, "read", "gs://acme-reports/reportsX/y", False, None),
        (ALICE, "read", "gs://other-bucket/reports/x", False, None),
        (STRANGER, "read", "gs://acme-reports/reports/2026/q1.csv", False, None),
        (ALICE, "delete", "gs://acme-home/home/alice@example.com/n.txt", True, "per-user-home"),
        (ALICE, "read", "gs://acme-home/home/bob@example.com/n.txt", False, None),
        (ALICE, "read", "gs://acme-home/home/alice@example.com.evil/n.txt", False, None),
        (DAVE, "read", "gs://acme-home/home/dave@example.com/n.txt", False, None),
        (ETL, "write", "gs://acme-reports/reports/2026/q2.csv", True, "etl-writes-reports"),
    ],
)
def test_example_decisions(example, identity, verb, resource, allowed, rule):
    decision = decide(example, identity, verb, resource)
    assert (decision.allowed, decision.rule_id) == (allowed, rule)


def test_default_deny_reason_names_verb_and_resource(example):
    decision = decide(example, STRANGER, "read", "gs://acme-reports/reports/a")
    assert decision.reason == "no rule grants read on gs://acme-reports/reports/a"


def test_unverified_email_matches_nothing_but_subject(tmp_path):
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        rules:
          - {{id: by-domain, principals: ["domain:example.com"], bucket: bkt, prefixes: [""], verbs: [read]}}
          - {{id: by-subject, principals: ["subject:{GOOGLE}#42"], bucket: bkt, prefixes: ["s/"], verbs: [read]}}
        """,
    )
    index = compile_policy(load_policy(path))
    unverified = Identity(GOOGLE, "42", None)
    assert not decide(index, unverified, "read", "gs://bkt/x").allowed
    assert decide(index, unverified, "read", "gs://bkt/s/x").rule_id == "by-subject"


DEV = "https://login.example.com"


def deny_by_email(tmp_path: Path) -> PolicyIndex:
    """Everyone reads shared/, but named callers: by email, by group, by domain."""
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}, {{issuer: "{DEV}", audiences: [a]}}]
        groups: {{banned: ["user:eve@example.org"]}}
        rules:
          - {{id: everyone, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [""], verbs: [read]}}
          - {{id: no-ci, effect: deny, principals: ["serviceAccount:ci@p.iam.gserviceaccount.com"], bucket: bkt, prefixes: ["ci/"], verbs: [read]}}
          - {{id: no-mallory, effect: deny, principals: ["user:Mallory@Example.com"], bucket: bkt, prefixes: ["m/"], verbs: [read]}}
          - {{id: no-banned, effect: deny, principals: ["group:banned"], bucket: bkt, prefixes: ["g/"], verbs: [read]}}
          - {{id: no-contractors, effect: deny, principals: ["domain:contractors.example.com"], bucket: bkt, prefixes: ["c/"], verbs: [read]}}
          - {{id: subject-own, principals: ["subject:{DEV}#7"], bucket: bkt, prefixes: ["m/own/"], verbs: [write]}}
        """,
    )
    return compile_policy(load_policy(path))


@pytest.mark.parametrize("where", ["ci/x", "m/x", "g/x", "c/x"])
@pytest.mark.parametrize("issuer", [GOOGLE, DEV])
def test_a_deny_by_email_is_not_escaped_by_a_token_without_one(tmp_path, where, issuer):
    """A review: with no email (or an unverified one) in the token, a caller denied by
    email held only `allAuthenticatedUsers` and its subject, and read what its deny
    covered. A deny that names callers by email now covers every caller whose email is not
    known; a caller with another verified email is not affected."""
    index = deny_by_email(tmp_path)
    for nameless in (
        Identity(issuer, "7"),
        Identity.of(issuer, "7", {"email": "x@example.org", "email_verified": False}),
    ):
        decision = decide(index, nameless, "read", f"gs://bkt/{where}")
        assert not decision.allowed
        assert decision.reason.endswith("it names callers by email, and the token vouches for none")
        assert carved_out(index, nameless, Access(Verb.READ, "bkt", where[:2]))
    someone = Identity(issuer, "8", "someone@example.org")
    assert decide(index, someone, "read", f"gs://bkt/{where}").rule_id == "everyone"
    assert decide(index, Identity(issuer, "7"), "read", "gs://bkt/elsewhere").allowed
    # Allows are not widened: the subject still writes only its own folder.
    assert decide(index, Identity(issuer, "7"), "write", "gs://bkt/m/own/x").allowed == (
        issuer == DEV
    )


def test_a_templated_deny_covers_callers_without_the_value(tmp_path):
    """A review: a deny on `home/${email}/private/` (or `teams/${domain}/budget/`) could
    not be filled in for a caller without an email (or a Google account without `hd`),
    so it never matched them. An unfilled template in a deny matches any value; in an
    allow, none."""
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}, {{issuer: "{DEV}", audiences: [a]}}]
        rules:
          - {{id: everyone, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [""], verbs: [read, list]}}
          - {{id: not-private, effect: deny, principals: ["user:bob@example.com"], bucket: bkt, prefixes: ["home/${{email}}/private/"], verbs: ["*"]}}
          - {{id: not-budget, effect: deny, principals: ["domain:contractor.com"], bucket: bkt, prefixes: ["teams/${{domain}}/budget/"], verbs: ["*"]}}
          - {{id: own-notes, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["notes/${{email}}/"], verbs: [write]}}
        """,
    )
    index = compile_policy(load_policy(path))
    bob = Identity.of(DEV, "bob", {"email": "bob@example.com"})
    nameless = [
        Identity.of(DEV, "bob", {}),
        Identity.of(DEV, "bob", {"email": "bob@example.com", "email_verified": False}),
    ]
    for caller in (bob, *nameless):
        denied = decide(index, caller, "read", "gs://bkt/home/bob@example.com/private/pay.txt")
        assert denied.rule_id == "not-private", caller
        assert carved_out(index, caller, Access(Verb.LIST, "bkt", "home/"))
    for caller in nameless:
        assert decide(index, caller, "read", "gs://bkt/home/bob@example.com/notes.txt").allowed
        assert not decide(index, caller, "write", "gs://bkt/notes/x/y").allowed  # allows: none
    eve = Identity.of(GOOGLE, "2", {"email": "eve@contractor.com"})  # no `hd`
    assert decide(index, eve, "read", "gs://bkt/teams/contractor.com/budget/q1.csv").rule_id == (
        "not-budget"
    )


def test_non_ascii_capitals_in_a_deny_still_match(tmp_path):
    """A review: folding ASCII only let `deny user:JÖRG@...` miss `jörg@...`. Emails
    lower as before; what lowers into ASCII from outside it (the Kelvin sign) is refused
    instead, in a token (no email) and in a policy (an error)."""
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{DEV}", audiences: [a]}}]
        rules:
          - {{id: everyone, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [""], verbs: [read]}}
          - {{id: not-jorg, effect: deny, principals: ["user:JÖRG@example.com"], bucket: bkt, prefixes: ["p/"], verbs: [read]}}
        """,
    )
    index = compile_policy(load_policy(path))
    jorg = Identity.of(DEV, "1", {"email": "jörg@example.com"})
    assert decide(index, jorg, "read", "gs://bkt/p/x").rule_id == "not-jorg"
    kelvin = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{DEV}", audiences: [a]}}]
        rules:
          - {{id: r, principals: ["user:\u212aate@example.com"], bucket: bkt, prefixes: [""], verbs: [read]}}
        """,
        name="kelvin.yaml",
    )
    assert len(errors_of(kelvin)) == 1


def test_google_domains_are_the_hd_claim(tmp_path):
    """A `domain:` principal of a Google token is its `hd` (the Workspace domain), as in
    IAM: anyone may register a Google account with a work address (and keep it after
    leaving). A deny by domain still covers such an account."""
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}, {{issuer: "{DEV}", audiences: [a]}}]
        rules:
          - {{id: staff, principals: ["domain:example.com"], bucket: bkt, prefixes: ["staff/"], verbs: [read]}}
          - {{id: everyone, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["open/"], verbs: [read]}}
          - {{id: no-example, effect: deny, principals: ["domain:example.com"], bucket: bkt, prefixes: ["open/closed/"], verbs: [read]}}
        """,
    )
    index = compile_policy(load_policy(path))
    member = Identity.of(GOOGLE, "1", {"email": "ann@example.com", "hd": "Example.COM"})
    personal = Identity.of(GOOGLE, "2", {"email": "ann@example.com"})
    elsewhere = Identity.of(GOOGLE, "3", {"email": "ann@example.com", "hd": "other.org"})
    other_issuer = Identity.of(DEV, "4", {"email": "ann@example.com", "hd": "other.org"})
    assert member.domain == "example.com" and personal.domain is None
    # A Kelvin sign lowers into another domain's `k`: no domain, as for an email.
    assert Identity.of(GOOGLE, "8", {"email": "a@korp.com", "hd": "\u212aorp.com"}).domain is None
    # `hd` counts with a vouched email only, as every domain: does.
    for claims in (
        {"hd": "example.com"},
        {"email": "a@example.com", "email_verified": False, "hd": "example.com"},
    ):
        assert Identity.of(GOOGLE, "9", claims).domain is None
    assert other_issuer.domain == "example.com"  # `hd` is Google's claim only
    assert decide(index, member, "read", "gs://bkt/staff/x").allowed
    assert decide(index, other_issuer, "read", "gs://bkt/staff/x").allowed
    for outsider in (personal, elsewhere):
        assert not decide(index, outsider, "read", "gs://bkt/staff/x").allowed
        refused = decide(index, outsider, "read", "gs://bkt/open/closed/x")
        assert refused.rule_id == "no-example" and "names no such hd" in refused.reason
        assert decide(index, outsider, "read", "gs://bkt/open/x").allowed


@pytest.mark.parametrize(
    ("claimed", "email"),
    [
        ("example.com", None),  # no `@`: was user:example.com and domain:example.com
        ("@example.com", None),
        ("ann@", None),
        ("a@evil.org@example.com", None),
        ("Ann@Example.COM", "ann@example.com"),
        ("JÖRG@example.com", "jörg@example.com"),
        ("\u212aate@example.com", None),  # the Kelvin sign lowers into kate's `k`
    ],
)
def test_an_email_claim_counts_only_well_formed_and_lowered(claimed, email):
    identity = Identity.of(DEV, "1", {"email": claimed})
    assert identity.email == email
    if email is None:
        assert identity.principals() == {"allAuthenticatedUsers", f"subject:{DEV}#1"}


def test_a_subject_principal_names_a_configured_issuer_as_tokens_do(tmp_path):
    """`accounts.google.com` is the other spelling of Google's issuer in its tokens; an
    issuer the policy does not configure can never match, so naming one is an error."""
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        rules:
          - {{id: everyone, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [""], verbs: [read]}}
          - {{id: not-42, effect: deny, principals: ["subject:accounts.google.com#42"], bucket: bkt, prefixes: ["s/"], verbs: [read]}}
        """,
    )
    index = compile_policy(load_policy(path))
    assert decide(index, Identity(GOOGLE, "42"), "read", "gs://bkt/s/x").rule_id == "not-42"
    assert decide(index, Identity(GOOGLE, "43"), "read", "gs://bkt/s/x").allowed
    typo = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        groups: {{g: ["subject:https://login.example.com/#abc"]}}
        rules:
          - {{id: r, principals: ["group:g", "subject:https://accounts.google.com/#1"], bucket: bkt, prefixes: [""], verbs: [read]}}
        """,
    )
    errors = errors_of(typo)
    assert len(errors) == 2
    assert all("which is not in issuers" in e for e in errors)


@pytest.mark.parametrize(
    ("email", "subject"),
    [("a/b@example.com", "1"), ("..@example.com", "1"), ("x\n@example.com", "1")],
)
def test_unsafe_template_values_never_match(tmp_path, email, subject):
    index = home_and_sub_folders(tmp_path)
    identity = Identity(GOOGLE, subject, email)
    assert not decide(index, identity, "read", f"gs://bkt/home/{email}/x").allowed
    assert decide(index, identity, "read", "gs://bkt/sub/1/x").allowed


def test_empty_sub_never_matches_template(tmp_path):
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        rules:
          - {{id: home, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["u/${{sub}}/"], verbs: [read]}}
        """,
    )
    index = compile_policy(load_policy(path))
    assert not decide(index, Identity(GOOGLE, "", None), "read", "gs://bkt/u//x").allowed


def test_every_error_reported_at_once_with_lines(tmp_path):
    path = write(
        tmp_path,
        """\
        version: 1
        colour: blue
        issuers:
          - issuer: http://login.example.com
            audiences: [x]
          - issuer: https://login.example.com
          - issuer: https://other.example.com
            audiences: [y]
            algorithms: [HS256, none]
        groups:
          team: ["user:alice@example.com", "nonsense"]
        rules:
          - id: a
            principals: ["group:ghosts"]
            bucket: bkt
            prefixes: [""]
            verbs: [read, fly]
          - id: a
            principals: [allUsers]
            bucket: Bad_Bucket
            prefixes: ["${nope}/"]
            verbs: read
            extra: 1
        """,
    )
    errors = errors_of(path)
    expected = [
        (2, "unknown key 'colour'"),
        (4, "http:// is allowed only on loopback"),
        (6, "missing required key 'audiences'"),
        (9, "algorithm 'HS256' is not allowed"),
        (9, "algorithm 'none' is not allowed"),
        (11, "invalid principal 'nonsense'"),
        (17, "unknown verb 'fly'"),
        (18, "duplicate rule id 'a'"),
        (19, "allUsers is not supported"),
        (20, "invalid bucket name"),
        (21, "unknown template variable ${nope}"),
        (22, "verbs must be a list"),
        (23, "unknown key 'extra'"),
        (14, "undefined group 'ghosts'"),
    ]
    for line, text in expected:
        assert any(e.startswith(f"{path}:{line}: ") and text in e for e in errors), (
            line,
            text,
            errors,
        )
    assert len(errors) == len(expected), errors


def test_wrong_version_and_types(tmp_path):
    path = write(
        tmp_path,
        """\
        version: 2
        """,
    )
    assert errors_of(path)[0] == f"{path}:1: version must be between 1 and 1"
    typed = write(
        tmp_path,
        f"""\
        version: 1
        mode: enforce-ish
        issuers: [{{issuer: "{GOOGLE}", audiences: [a], leeway_seconds: "30"}}]
        groups: [not, a, mapping]
        rules: {{}}
        """,
        "typed.yaml",
    )
    errors = errors_of(typed)
    assert f"{typed}:2: mode must be 'enforce' or 'audit', not 'enforce-ish'" in errors
    assert f"{typed}:3: leeway_seconds must be an integer" in errors
    assert f"{typed}:4: groups must be a mapping of group name to principals" in errors
    assert f"{typed}:5: rules must be a list" in errors


def test_duplicate_yaml_keys_and_bad_yaml(tmp_path):
    dup = write(tmp_path, "version: 1\nversion: 1\n", "dup.yaml")
    assert any(":2: policy: duplicate key 'version'" in e for e in errors_of(dup))
    bad = write(tmp_path, "version: 1\nrules: [\n", "bad.yaml")
    assert errors_of(bad)[0].startswith(f"{bad}:")
    assert "invalid YAML" in errors_of(bad)[0]


def test_directory_merges_files_and_skips_tests(tmp_path):
    write(tmp_path, f"version: 1\nissuers: [{{issuer: '{GOOGLE}', audiences: [a]}}]\n", "a.yaml")
    write(
        tmp_path,
        "version: 1\nrules: [{id: r, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [p/], verbs: [read]}]\n",
        "b.yaml",
    )
    write(tmp_path, "this is: [not loaded\n", "b_test.yaml")
    policy = load_policy(tmp_path)
    assert [r.id for r in policy.rules] == ["r"]
    assert len(policy.files) == 2


def test_duplicate_ids_across_files(tmp_path):
    rule = "rules: [{id: r, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [p/], verbs: [read]}]\n"
    write(
        tmp_path, f"version: 1\nissuers: [{{issuer: '{GOOGLE}', audiences: [a]}}]\n{rule}", "a.yaml"
    )
    write(tmp_path, f"version: 1\n{rule}", "b.yaml")
    errors = errors_of(tmp_path)
    assert any("b.yaml:2: duplicate rule id 'r'" in e and "a.yaml:3" in e for e in errors), errors


def test_well_known_issuers_get_keys_and_algorithms(example):
    google, iap = example.policy.issuers
    assert google.jwks_uri == "https://www.googleapis.com/oauth2/v3/certs"
    assert google.algorithms == ("RS256",)
    assert iap.header == "x-goog-iap-jwt-assertion"
    assert iap.algorithms == ("ES256",)


def test_operation_needs_every_access(example):
    accesses = (
        Access(Verb.READ, "acme-reports", "reports/a"),
        Access(Verb.WRITE, "acme-reports", "shared/b"),
    )
    decision = evaluate_all(example, ALICE, accesses)
    assert not decision.allowed
    assert decision.access.verb is Verb.WRITE


def test_index_cost_does_not_depend_on_rule_count(tmp_path):
    rules = "\n".join(
        f"  - {{id: r{i}, principals: ['user:u{i}@example.com'], bucket: b{i % 7}x, prefixes: ['p{i}/'], verbs: [read]}}"
        for i in range(2000)
    )
    path = write(
        tmp_path,
        f"version: 1\nissuers: [{{issuer: '{GOOGLE}', audiences: [a]}}]\nrules:\n{rules}\n",
    )
    index = compile_policy(load_policy(path))
    who = Identity(GOOGLE, "9", "u1234@example.com")
    assert decide(index, who, "read", "gs://b2x/p1234/file").rule_id == "r1234"
    assert not decide(index, who, "read", "gs://b2x/p1235/file").allowed
    # Only the caller's own principals' tables are consulted.
    assert len(index.tables) == 2000


@pytest.mark.parametrize(
    ("email", "subject", "victim"),
    [
        ("${sub}@example.com", "bob", "home/bob@example.com/"),  # email names the subject
        ("${domain}@example.com", "1", "home/example.com@example.com/"),
        ("eve@example.com", "${domain}", "sub/example.com/"),  # subject names the domain
        ("eve@example.com", "${email}", "sub/eve@example.com/"),
    ],
)
def test_template_values_are_not_expanded_again(tmp_path, email, subject, victim):
    index = home_and_sub_folders(tmp_path)
    identity = Identity(GOOGLE, subject, email)
    assert not decide(index, identity, "read", f"gs://bkt/{victim}x").allowed
    # Their own, literal values still match.
    assert decide(index, identity, "read", f"gs://bkt/home/{email}/x").allowed
    assert decide(index, identity, "read", f"gs://bkt/sub/{subject}/x").allowed


@pytest.mark.parametrize(
    "header",
    ["Authorization", "cookie", "user-agent", "x-goog-api-client", "range", "traceparent"],
)
def test_a_token_header_must_not_be_one_the_sidecar_forwards_logs_or_reads(tmp_path, header):
    """Found by a review: `header: user-agent` passed `policy check`, and the caller's ID
    token then went upstream, into the audit line and into the span."""
    path = write(
        tmp_path,
        f"""\
        version: 1
        issuers:
          - issuer: "https://login.example.com"
            audiences: [a]
            header: {header}
        rules: []
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: header {header!r} cannot carry an issuer's token: the sidecar forwards, "
        "logs or reads it for another purpose"
    ]
    fine = write(tmp_path, path.read_text().replace(f"header: {header}", "header: x-my-idp-jwt"))
    assert load_policy(fine).issuers[0].header == "x-my-idp-jwt"


def test_may_be_granted_asks_whether_any_prefix_of_the_bucket_could_allow(tmp_path):
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        rules:
          - {{id: homes, principals: [allAuthenticatedUsers], bucket: homes, prefixes: ["h/${{email}}/"], verbs: [write]}}
          - {{id: reports, principals: ["user:alice@example.com"], bucket: data, prefixes: ["r/"], verbs: [read]}}
          - {{id: no-writes, effect: deny, principals: ["user:alice@example.com"], bucket: data, prefixes: [""], verbs: [write]}}
        """,
    )
    index = compile_policy(load_policy(path))
    alice = Identity(GOOGLE, "1", "alice@example.com")
    assert may_be_granted(index, alice, Verb.WRITE, "homes")  # a template counts
    assert may_be_granted(index, alice, Verb.READ, "data")
    assert not may_be_granted(index, alice, Verb.WRITE, "data")  # only a deny mentions it
    assert not may_be_granted(index, alice, Verb.READ, "elsewhere")


def test_carved_out_finds_deny_rules_below_a_prefix(tmp_path):
    path = write(
        tmp_path,
        f"""
        version: 1
        issuers: [{{issuer: "{GOOGLE}", audiences: [a]}}]
        rules:
          - {{id: team, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["t/"], verbs: [list]}}
          - {{id: hr, effect: deny, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["t/hr/"], verbs: ["*"]}}
          - {{id: mine, effect: deny, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["u/${{email}}/x/"], verbs: [list]}}
        """,
    )
    index = compile_policy(load_policy(path))
    alice = Identity(GOOGLE, "1", "alice@example.com")

    def carved(prefix: str) -> bool:
        return carved_out(index, alice, Access(Verb.LIST, "bkt", prefix))

    assert carved("t/") and carved("t/h") and carved("")
    assert not carved("t/a/") and not carved("t/hrx")
    assert carved("u/alice@example.com/") and not carved("u/bob@example.com/")


def random_policies(seed: int, count: int):  # type: ignore[no-untyped-def]
    """Small policies over overlapping principals (users, a domain, every caller, a group,
    a subject), prefixes (the root, nested, templated, without a slash) and effects."""
    chance = random.Random(seed)  # noqa: S311 (test data, not secrets)
    principals = [
        "user:alice@example.com", "user:bob@example.com", "user:carol@other.org",
        "serviceAccount:svc@proj.iam.gserviceaccount.com", "domain:example.com",
        "allAuthenticatedUsers", "group:team", "subject:https://accounts.google.com#123",
    ]  # fmt: skip
    prefixes = [
        "", "a/", "a/b/", "a/bx", "b/", "home/", "home/${email}/", "home/${sub}/x/",
        "d/${domain}/", "a/${email}",
    ]  # fmt: skip
    verbs = ["read", "list", "write", "delete", "metadata", "admin", "*"]
    for _ in range(count):
        rules = [
            {
                "id": f"r{i}",
                "effect": chance.choice(["allow", "allow", "deny"]),
                "principals": chance.sample(principals, chance.randint(1, 3)),
                "bucket": chance.choice(["bkt-one", "bkt-two"]),
                "prefixes": chance.sample(prefixes, chance.randint(1, 3)),
                "verbs": chance.sample(verbs, chance.randint(1, 3)),
            }
            for i in range(chance.randint(1, 12))
        ]
        document = {
            "version": 1,
            "issuers": [{"issuer": "https://accounts.google.com", "audiences": ["a"]}],
            "groups": {"team": ["user:bob@example.com", "user:dave@example.com"]},
            "rules": rules,
        }
        yield parse_policy([PolicyText("random.yaml", yaml.safe_dump(document))])


def test_grants_asks_only_where_it_matters_and_finds_what_asking_everywhere_finds():
    """grants() (behind `policy diff`) skips regions under no prefix that allows the
    principal anything. Against asking the evaluator about every region and verb, on
    random policies with templates, domains, groups, subjects, denies and the root."""

    def everywhere(policy, principals, places, people):  # type: ignore[no-untyped-def]
        index = compile_policy(policy)
        found = set()
        for principal in principals:
            identity = people.identity(principal)
            if identity is None:
                continue
            for bucket, prefixes in places.items():
                for prefix in prefixes:
                    path = expand_template(prefix, identity) if "${" in prefix else prefix
                    for verb in ALL_VERBS:
                        access = Access(verb, bucket, path if path is not None else prefix)
                        if evaluate(index, identity, access).allowed:
                            found.add(Grant(principal, verb.value, bucket, prefix))
        return found

    for policy in random_policies(7, 60):
        named = principals_of(policy)
        people = Representatives(named)
        places = regions(policy)
        assert grants(policy, named, places, people) == everywhere(policy, named, places, people)


def test_lint_finds_the_shadowed_rules_that_asking_every_other_rule_finds():
    """lint looks up only the rules holding each member; against asking every rule that
    decides first, for every member, verb and prefix, on random policies."""

    def shadowed(policy):  # type: ignore[no-untyped-def]
        hosted = hosted_domains(policy)  # a Google domain's allow does not hold its emails
        found = {}
        rules = policy.rules
        for position, rule in enumerate(rules):
            first = [r for r in rules if r.effect is Effect.DENY and rule.effect is Effect.ALLOW]
            first += [r for r in rules[:position] if r.effect is rule.effect]
            deciders, shadow = [], True
            members = [m for p in rule.principals for m in expand_principal(policy, p)]
            for member in members:
                for verb in rule.verbs:
                    for prefix in rule.prefixes:
                        by = [
                            o
                            for o in first
                            if o.bucket == rule.bucket
                            and verb in o.verbs
                            and any(covers(m, member, hosted and o.effect is Effect.ALLOW)
                                    for p in o.principals for m in expand_principal(policy, p))
                            and any(_prefix_covers(p, prefix) for p in o.prefixes)
                        ]  # fmt: skip
                        if not by:
                            shadow = False
                        else:
                            deciders.append(by[0].id)
            if shadow and members:
                found[rule.id] = sorted(set(deciders))
        return found

    seen = 0
    for policy in random_policies(11, 80):
        expected = shadowed(policy)
        warned = {w.rule: w.message for w in lint(policy) if "never decides" in w.message}
        assert set(warned) == set(expected)
        for rule_id, deciders in expected.items():
            assert all(repr(d) in warned[rule_id] for d in deciders)
        seen += len(expected)
    assert seen > 10  # the random policies do shadow rules
