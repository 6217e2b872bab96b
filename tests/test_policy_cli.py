"""`gcs-iap-proxy policy ...`: check, lint, explain, who-can, test and diff, text and JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "policies" / "example.yaml"
EXAMPLE_TESTS = ROOT / "policies" / "example_test.yaml"
ISSUERS = 'issuers: [{issuer: "https://accounts.google.com", audiences: [a]}]\n'


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = run(capsys, *argv, "--format", "json")
    return code, json.loads(out)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# -- check ------------------------------------------------------------------------------------


def test_check_clean_policy(capsys):
    code, out, _ = run(capsys, "check", str(EXAMPLE))
    assert code == 0
    assert out.startswith(f"ok: {EXAMPLE}: 4 rules, revision ")
    code, data = run_json(capsys, "check", str(EXAMPLE.parent))
    assert code == 0 and data["ok"] and data["errors"] == []
    assert data["policies"][0]["rules"] == 4  # the directory skipped example_test.yaml


def test_check_reports_every_error_with_file_and_line(capsys, tmp_path):
    write(tmp_path / "a.yaml", "version: 1\n" + ISSUERS + "colour: blue\n")
    write(
        tmp_path / "b.yaml",
        """\
        version: 1
        rules:
          - id: r
            principals: ["group:nobody"]
            bucket: bkt
            prefixes: [x/]
            verbs: [fly]
        """,
    )
    write(tmp_path / "b_test.yaml", "not: [a, policy\n")  # never read as a policy
    code, out, _ = run(capsys, "check", str(tmp_path))
    assert code == 1
    assert out.splitlines() == [
        f"{tmp_path / 'a.yaml'}:3: policy: unknown key 'colour'",
        f"{tmp_path / 'b.yaml'}:7: unknown verb 'fly' (use read, list, write, delete, metadata, admin or *)",
        f"{tmp_path / 'b.yaml'}:4: undefined group 'nobody'",
    ]
    code, data = run_json(capsys, "check", str(tmp_path), str(EXAMPLE))
    assert code == 1 and not data["ok"] and len(data["errors"]) == 3
    assert [p["path"] for p in data["policies"]] == [str(EXAMPLE)]


def test_check_missing_file_and_usage_errors(capsys, tmp_path):
    code, out, _ = run(capsys, "check", str(tmp_path / "nope.yaml"))
    assert (code, out.strip()) == (1, f"{tmp_path / 'nope.yaml'}:0: no policy file found")
    for argv in (["check"], ["check", "--format", "xml", str(EXAMPLE)], ["frobnicate"]):
        with pytest.raises(SystemExit) as exited:
            main(["policy", *argv])
        assert exited.value.code == 2
    assert main(["policy"]) == 2


def test_console_script_exit_codes(tmp_path):
    bad = write(tmp_path / "bad.yaml", "version: 1\nrules: [\n")
    command = [sys.executable, "-m", "proxy", "policy", "check"]
    done = subprocess.run([*command, str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{bad}:3: invalid YAML")
    assert subprocess.run(command, capture_output=True, check=False).returncode == 2


# -- lint -------------------------------------------------------------------------------------


def test_example_policy_lints_clean(capsys):
    assert run(capsys, "lint", str(EXAMPLE)) == (0, "ok: no warnings\n", "")


LINTED = """\
version: 1
issuers:
  - issuer: https://accounts.google.com
    audiences: [a]
  - issuer: https://login.example.com
    audiences: [b]
groups:
  everyone: ["domain:example.com"]
  unused: ["user:zed@example.com"]
rules:
  - id: open-drop
    principals: [allAuthenticatedUsers]
    bucket: drop
    prefixes: ["in/"]
    verbs: [write]
  - id: team-admin
    principals: ["group:everyone"]
    bucket: team
    prefixes: [""]
    verbs: ["*"]
  - id: reports
    principals: ["subject:https://accounts.google.com#42"]
    bucket: data
    prefixes: ["reports"]
    verbs: [read]
  - id: reports-again
    principals: ["subject:https://accounts.google.com#42"]
    bucket: data
    prefixes: ["reports/2026/"]
    verbs: [read]
  - id: hidden
    principals: ["subject:https://accounts.google.com#42"]
    bucket: drop
    prefixes: ["secret/"]
    verbs: [read]
  - id: no-secrets
    effect: deny
    principals: [allAuthenticatedUsers]
    bucket: drop
    prefixes: [""]
    verbs: [read]
  - id: home
    principals: ["domain:example.com"]
    bucket: home
    prefixes: ["u/${email}/"]
    verbs: [read, write, delete]
"""


def test_lint_warns_with_rule_ids_and_lines(capsys, tmp_path):
    path = write(tmp_path / "p.yaml", LINTED)
    code, out, _ = run(capsys, "lint", str(path))
    assert code == 1
    lines = out.splitlines()
    expected = [
        (11, "rule 'open-drop': allAuthenticatedUsers may write"),
        (16, "rule 'team-admin': domain:example.com (via group:everyone) may admin, delete, write"),
        (
            16,
            "rule 'team-admin': grants admin, delete, metadata, write on the whole bucket gs://team/",
        ),
        (
            21,
            "rule 'reports': prefix 'reports' does not end in '/': it also matches 'reports-private/'",
        ),
        (
            26,
            "rule 'reports-again': never decides anything: everything it covers is already granted by earlier 'reports'",
        ),
        (
            31,
            "rule 'hidden': never decides anything: everything it covers is denied by 'no-secrets'",
        ),
        (9, "group 'unused': is defined but no rule uses it"),
    ]
    for line, text in expected:
        assert any(x.startswith(f"{path}:{line}: warning: {text}") for x in lines), (
            line,
            text,
            out,
        )
    # The per-user home (a domain writing, but each only under their own ${email}) is fine.
    assert "'home'" not in out
    assert lines[-1] == f"{len(expected)} warning(s)"
    code, data = run_json(capsys, "lint", str(path))
    assert code == 1 and not data["ok"]
    assert {w["rule"] for w in data["warnings"]} == {
        "open-drop",
        "team-admin",
        "reports",
        "reports-again",
        "hidden",
        None,
    }
    assert data["warnings"][0] == {
        "source": f"{path}:9",
        "rule": None,
        "subject": "group 'unused'",
        "message": "is defined but no rule uses it",
    }


def test_lint_warns_about_issuers_no_rule_can_match(capsys, tmp_path):
    path = write(
        tmp_path / "p.yaml",
        """\
        version: 1
        issuers:
          - {issuer: "https://accounts.google.com", audiences: [a]}
          - {issuer: "https://login.example.com", audiences: [b]}
        rules:
          - id: robot
            principals: ["subject:https://accounts.google.com#42"]
            bucket: data
            prefixes: ["in/"]
            verbs: [read]
        """,
    )
    code, out, _ = run(capsys, "lint", str(path))
    assert code == 1
    assert out.splitlines()[0] == (
        f"{path}:4: warning: issuer https://login.example.com: no allow rule can match its "
        "callers (every allow rule names only other issuers' subject: principals)"
    )
    assert out.splitlines()[1:] == ["1 warning(s)"]


def test_lint_of_invalid_policy_prints_errors(capsys, tmp_path):
    path = write(tmp_path / "p.yaml", "version: 1\n")
    code, out, _ = run(capsys, "lint", str(path))
    assert code == 1
    assert f"{path}:1: no issuers" in out


# -- explain ----------------------------------------------------------------------------------


def test_explain_text_and_json(capsys):
    code, out, _ = run(
        capsys,
        "explain",
        "--policy",
        str(EXAMPLE),
        "--identity",
        "alice@example.com",
        "read",
        "gs://acme-reports/reports/secret/salaries.csv",
    )
    assert (code, out) == (0, f"deny: denied by rule 'never-secrets' ({EXAMPLE}:42)\n")
    base = ["explain", "--policy", str(EXAMPLE), "--identity", "Alice@Example.com"]
    assert run_json(capsys, *base, "list", "gs://acme-reports/shared/") == (
        0,
        {
            "decision": "allow",
            "rule": "analysts-read-reports",
            "source": f"{EXAMPLE}:21",
            "reason": "allowed by rule 'analysts-read-reports'",
        },
    )
    assert run_json(capsys, *base, "write", "gs://acme-reports/shared/x")[1] == {
        "decision": "deny",
        "rule": None,
        "source": None,
        "reason": "no rule grants write on gs://acme-reports/shared/x",
    }


def test_explain_claims_shape_the_identity(capsys):
    home = ["read", "gs://acme-home/home/carol@example.com/a.txt"]
    base = ["explain", "--policy", str(EXAMPLE), "--identity", "carol@example.com"]
    # A Google token names the Workspace domain in `hd`: without it, not example.com's.
    assert run_json(capsys, *base, *home)[1]["decision"] == "deny"
    base += ["--claim", "hd=example.com"]
    assert run_json(capsys, *base, *home)[1]["decision"] == "allow"
    unverified = run_json(capsys, *base, "--claim", "email_verified=false", *home)[1]
    assert unverified["decision"] == "deny"
    # As the sidecar reads a token: the string "true" in any letter case vouches.
    assert (
        run_json(capsys, *base, "--claim", "email_verified=TRUE", *home)[1]["decision"] == "allow"
    )


def test_explain_usage_and_policy_errors(capsys, tmp_path):
    base = ["explain", "--policy", str(EXAMPLE), "--identity", "a@example.com"]
    code, _, err = run(capsys, *base, "read", "acme-reports/x")
    assert code == 2 and "expected gs://BUCKET/OBJECT" in err
    code, _, err = run(capsys, *base, "--claim", "nonsense", "read", "gs://b/x")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run(capsys, *base, "--claim", "groups=admins", "read", "gs://b/x")
    assert code == 2 and "iss, sub, email_verified" in err  # a claim that decides nothing
    bad = write(tmp_path / "bad.yaml", "version: 1\n" + ISSUERS + "rules: 3\n")
    code, out, err = run(
        capsys, "explain", "--policy", str(bad), "--identity", "a@b.com", "read", "gs://b/x"
    )
    assert (code, out) == (1, "")
    assert err.strip() == f"{bad}:3: rules must be a list"


# -- who-can ----------------------------------------------------------------------------------


def test_who_can_expands_groups_and_applies_denies(capsys):
    base = ["who-can", "--policy", str(EXAMPLE)]
    code, data = run_json(capsys, *base, "read", "gs://acme-reports/reports/2026/q1.csv")
    assert code == 0
    assert data == {
        "principals": [
            "domain:analytics.example.com",
            "serviceAccount:etl@acme-prod.iam.gserviceaccount.com",
            "user:alice@example.com",
        ],
        "except": [],
    }
    assert run_json(capsys, *base, "read", "gs://acme-reports/reports/secret/a")[1] == {
        "principals": [],
        "except": [],
    }
    code, out, _ = run(capsys, *base, "read", "gs://acme-reports/reports/secret/a")
    assert out == "nobody may read gs://acme-reports/reports/secret/a\n"


def test_who_can_resolves_templates(capsys):
    base = ["who-can", "--policy", str(EXAMPLE), "delete"]
    _, out, _ = run(capsys, *base, "gs://acme-home/home/carol@example.com/x")
    assert out.splitlines() == [
        "may delete gs://acme-home/home/carol@example.com/x:",
        "  user:carol@example.com",
    ]
    # Google tokens: example.com is the `hd` of a Workspace, whose members may have
    # addresses in other domains; eve@example.net may be one.
    assert run_json(capsys, *base, "gs://acme-home/home/eve@example.net/x")[1]["principals"] == [
        "user:eve@example.net"
    ]


def test_a_google_domain_does_not_cover_its_emails_in_the_policy_tools(capsys, tmp_path):
    """A review: who-can, diff and lint took domain:example.com to cover
    user:ann@example.com; with Google's issuer, `domain:` is the token's `hd`, and a
    personal account ann@example.com holds only the user rule. Adding it was 'no change
    in access', and lint advised deleting it as 'never decides'."""
    dom = "  - {id: dom, principals: ['domain:example.com'], bucket: bkt, prefixes: [pub/], verbs: [read]}\n"
    ann = "  - {id: ann, principals: ['user:ann@example.com'], bucket: bkt, prefixes: [pub/], verbs: [read]}\n"
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("version: 1\n" + ISSUERS + "rules:\n" + dom)
    new.write_text("version: 1\n" + ISSUERS + "rules:\n" + dom + ann)
    code, data = run_json(capsys, "diff", str(old), str(new))
    assert code == 1
    assert data["granted"] == [
        {"principal": "user:ann@example.com", "verb": "read", "bucket": "bkt", "prefix": "pub/"}
    ]
    assert run_json(capsys, "who-can", "--policy", str(new), "read", "gs://bkt/pub/f")[1] == {
        "principals": ["domain:example.com", "user:ann@example.com"],
        "except": [],
    }
    _, out, _ = run(capsys, "lint", str(new))
    assert "never decides" not in out


def test_who_can_finds_google_members_whose_hd_is_not_their_emails_domain(capsys, tmp_path):
    """A review: the sidecar allowed alice@example.com with hd corp.example.com on
    dom/corp.example.com/ (user rule, ${domain}), and ann@example.com of corp.example.com
    on home/ann@example.com/ (domain rule, ${email}); who-can answered nobody."""
    rules = (
        "  - {id: own, principals: ['user:alice@example.com'], bucket: bkt, prefixes: ['dom/${domain}/'], verbs: [read]}\n"
        "  - {id: corp, principals: ['domain:corp.example.com'], bucket: bkt, prefixes: ['home/${email}/'], verbs: [read]}\n"
    )
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\n" + ISSUERS + "rules:\n" + rules)
    base = ["who-can", "--policy", str(path), "read"]
    assert run_json(capsys, *base, "gs://bkt/dom/corp.example.com/f")[1]["principals"] == [
        "user:alice@example.com"
    ]
    assert run_json(capsys, *base, "gs://bkt/home/ann@example.com/f")[1]["principals"] == [
        "user:ann@example.com"
    ]


def test_who_can_lists_denied_members_of_a_wider_grant(capsys, tmp_path):
    rules = """\
        rules:
          - {id: all, principals: ["domain:example.com"], bucket: bkt, prefixes: [d/], verbs: [read]}
          - {id: not-bob, effect: deny, principals: ["user:bob@example.com"], bucket: bkt, prefixes: [d/], verbs: [read]}
        """
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\n" + ISSUERS + textwrap.dedent(rules))
    assert run_json(capsys, "who-can", "--policy", str(path), "read", "gs://bkt/d/x") == (
        0,
        {"principals": ["domain:example.com"], "except": ["user:bob@example.com"]},
    )


def test_everyone_and_subjects_are_not_taken_for_callers_without_an_email(capsys, tmp_path):
    """A review: with a deny naming one user, diff and who-can asked about everyone and
    about subjects with an identity that has no email, which such a deny now covers: a
    new grant to everyone showed as 'no change in access'. They stand for callers with
    an email no rule names."""
    no_bob = "  - {id: no-bob, effect: deny, principals: [user:bob@example.com], bucket: bkt, prefixes: [pub/], verbs: ['*']}\n"
    more = (
        "  - {id: all, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: [pub/], verbs: [read]}\n"
        "  - {id: svc, principals: ['subject:https://accounts.google.com#svc'], bucket: bkt, prefixes: [pub/], verbs: [write]}\n"
    )
    old = tmp_path / "old.yaml"
    old.write_text("version: 1\n" + ISSUERS + "rules:\n" + no_bob)
    new = tmp_path / "new.yaml"
    new.write_text("version: 1\n" + ISSUERS + "rules:\n" + no_bob + more)
    code, data = run_json(capsys, "diff", str(old), str(new))
    assert code == 1
    assert data["granted"] == [
        {"principal": "allAuthenticatedUsers", "verb": "read", "bucket": "bkt", "prefix": "pub/"},
        {
            "principal": "subject:https://accounts.google.com#svc",
            "verb": "write",
            "bucket": "bkt",
            "prefix": "pub/",
        },
    ]
    base = ["who-can", "--policy", str(new)]
    assert run_json(capsys, *base, "read", "gs://bkt/pub/x")[1] == {
        "principals": ["allAuthenticatedUsers"],
        "except": ["user:bob@example.com"],
    }
    assert run_json(capsys, *base, "write", "gs://bkt/pub/x")[1]["principals"] == [
        "subject:https://accounts.google.com#svc"
    ]


def test_who_can_finds_holders_singled_out_by_a_template(capsys, tmp_path):
    """A review: who-can answered nobody for `subs/1234/` of a `domain:` rule's
    `subs/${sub}/`, and for a `subject:` rule's `sh/${email}/`, where the sidecar and
    explain allow. The subject a path names, or the email, is now tried on each holder."""
    dev = "https://login.example.com"
    rules = f"""\
        issuers: [{{issuer: "https://accounts.google.com", audiences: [a]}}, {{issuer: "{dev}", audiences: [a]}}]
        rules:
          - {{id: subs, principals: ["domain:example.com"], bucket: bkt, prefixes: ["subs/${{sub}}/"], verbs: [read]}}
          - {{id: shared, principals: ["subject:{dev}#sa-77"], bucket: bkt, prefixes: ["sh/${{email}}/"], verbs: [read]}}
          - {{id: homes, principals: [allAuthenticatedUsers], bucket: bkt, prefixes: ["home/${{email}}/"], verbs: [read]}}
        """
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\n" + textwrap.dedent(rules))
    base = ["who-can", "--policy", str(path), "read"]
    assert run_json(capsys, *base, "gs://bkt/subs/1234/x")[1]["principals"] == [
        "subject:https://accounts.google.com#1234",
        f"subject:{dev}#1234",
    ]
    assert run_json(capsys, *base, "gs://bkt/sh/bob@example.org/f")[1]["principals"] == [
        f"subject:{dev}#sa-77"
    ]
    # A template of anyone's email singles out that user, not everyone.
    assert run_json(capsys, *base, "gs://bkt/home/bob@example.org/f")[1]["principals"] == [
        "user:bob@example.org"
    ]
    explain = ["explain", "--policy", str(path), "--identity", "ann@example.com", "read"]
    decision = run_json(
        capsys, *explain, "--claim", f"iss={dev}", "--claim", "sub=1234", "gs://bkt/subs/1234/x"
    )
    assert decision[1]["decision"] == "allow"


# -- test -------------------------------------------------------------------------------------


def test_example_tests_pass(capsys):
    code, out, _ = run(capsys, "test", str(EXAMPLE_TESTS))
    assert (code, out) == (0, "16 passed, 0 failed\n")
    code, data = run_json(capsys, "test", str(EXAMPLE.parent))
    assert code == 0 and data["passed"] == 16 and data["failed"] == 0


def test_failing_case_names_expectation_and_deciding_rule(capsys, tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "policy.yaml")
    tests = write(
        tmp_path / "policy_test.yaml",
        """\
        policy: policy.yaml
        cases:
          - name: alice reads reports
            identity: {email: alice@example.com}
            verb: read
            resource: gs://acme-reports/reports/q1.csv
            expect: allow
          - name: alice reads secrets
            identity: {email: alice@example.com}
            verb: read
            resource: gs://acme-reports/reports/secret/q1.csv
            expect: allow
          - name: right decision, wrong rule
            identity: {email: etl@acme-prod.iam.gserviceaccount.com}
            verb: read
            resource: gs://acme-reports/reports/q1.csv
            expect: allow
            rule: etl-writes-reports
        """,
    )
    code, out, _ = run(capsys, "test", str(tests))
    assert code == 1
    assert out.splitlines() == [
        f"FAIL {tests}:8: alice reads secrets: expected allow, got deny "
        f"(rule 'never-secrets' at {tmp_path / 'policy.yaml'}:42: denied by rule 'never-secrets')",
        f"FAIL {tests}:13: right decision, wrong rule: expected allow by rule 'etl-writes-reports', "
        f"got allow (rule 'analysts-read-reports' at {tmp_path / 'policy.yaml'}:21: "
        "allowed by rule 'analysts-read-reports')",
        "1 passed, 2 failed",
    ]
    code, data = run_json(capsys, "test", str(tests))
    assert (code, data["passed"], data["failed"]) == (1, 1, 2)
    assert data["cases"][1]["actual"] == "deny" and data["cases"][1]["rule"] == "never-secrets"


def test_malformed_test_file_reports_every_problem(capsys, tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "policy.yaml")
    tests = write(
        tmp_path / "policy_test.yaml",
        """\
        policy: policy.yaml
        cases:
          - name: a
            identity: {mail: a@example.com}
            verb: fly
            resource: s3://x/y
            expect: maybe
        """,
    )
    code, out, _ = run(capsys, "test", str(tests))
    assert code == 1
    for line, text in [
        (4, "identity: unknown key 'mail'"),
        (4, "identity needs an email or a sub"),
        (5, "unknown verb 'fly'"),
        (6, "expected gs://BUCKET/OBJECT"),
        (7, "expect must be 'allow' or 'deny'"),
    ]:
        assert f"{tests}:{line}: {text}" in out, (line, text, out)


# -- diff -------------------------------------------------------------------------------------


def changed_example(tmp_path: Path) -> Path:
    text = EXAMPLE.read_text()
    text = text.replace('prefixes: ["reports/", "shared/"]', 'prefixes: ["reports/"]')
    text = text.replace(
        "    - user:alice@example.com\n",
        "    - user:alice@example.com\n    - user:dave@example.com\n",
    )
    text += (
        "\n"
        "  - id: public-drop\n"
        '    principals: ["domain:example.com"]\n'
        "    bucket: acme-drop\n"
        '    prefixes: ["in/"]\n'
        "    verbs: [write]\n"
        "  - id: no-2019\n"
        "    effect: deny\n"
        '    principals: ["allAuthenticatedUsers"]\n'
        "    bucket: acme-reports\n"
        '    prefixes: ["reports/2019/"]\n'
        "    verbs: [read]\n"
    )
    path = tmp_path / "new.yaml"
    path.write_text(text)
    return path


def grant(principal: str, verb: str, bucket: str, prefix: str) -> dict[str, str]:
    return {"principal": principal, "verb": verb, "bucket": bucket, "prefix": prefix}


def test_diff_identical_policies(capsys, tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "same.yaml")
    assert run(capsys, "diff", str(EXAMPLE), str(tmp_path / "same.yaml")) == (
        0,
        "no change in access\n",
        "",
    )
    assert run_json(capsys, "diff", str(EXAMPLE), str(EXAMPLE)) == (
        0,
        {"granted": [], "revoked": []},
    )


def test_diff_lists_granted_and_revoked_access(capsys, tmp_path):
    new = changed_example(tmp_path)
    code, data = run_json(capsys, "diff", str(EXAMPLE), str(new))
    assert code == 1
    assert data["granted"] == [
        grant("domain:example.com", "write", "acme-drop", "in/"),
        grant("user:dave@example.com", "list", "acme-reports", "reports/"),
        grant("user:dave@example.com", "read", "acme-reports", "reports/"),
    ]
    revoked = [
        grant(p, v, "acme-reports", "shared/")
        for p in (
            "domain:analytics.example.com",
            "serviceAccount:etl@acme-prod.iam.gserviceaccount.com",
            "user:alice@example.com",
        )
        for v in ("list", "read")
    ]
    revoked += [
        grant(p, "read", "acme-reports", "reports/2019/")
        for p in (
            "domain:analytics.example.com",
            "serviceAccount:etl@acme-prod.iam.gserviceaccount.com",
            "user:alice@example.com",
        )
    ]
    assert sorted(data["revoked"], key=lambda g: tuple(g.values())) == sorted(
        revoked, key=lambda g: tuple(g.values())
    )
    code, out, _ = run(capsys, "diff", str(EXAMPLE), str(new))
    assert "+ domain:example.com write gs://acme-drop/in/" in out.splitlines()
    assert "- user:alice@example.com read gs://acme-reports/reports/2019/" in out.splitlines()
    assert out.splitlines()[-1] == "3 grant(s) added, 9 removed"
    # And back again: the same changes, the other way round.
    assert run_json(capsys, "diff", str(new), str(EXAMPLE))[1]["revoked"] == data["granted"]


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_diff_reads_revisions_from_git(capsys, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "policies").mkdir(parents=True)
    shutil.copy(EXAMPLE, repo / "policies" / "policy.yaml")
    shutil.copy(EXAMPLE_TESTS, repo / "policies" / "policy_test.yaml")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "v1")
    (repo / "policies" / "policy.yaml").write_text(changed_example(tmp_path).read_text())
    monkeypatch.chdir(repo)

    code, data = run_json(capsys, "diff", "HEAD:policies/policy.yaml", "policies/policy.yaml")
    assert code == 1 and len(data["granted"]) == 3 and len(data["revoked"]) == 9
    git(repo, "commit", "-q", "-am", "v2")
    code, data = run_json(capsys, "diff", "HEAD~1:policies/", "HEAD:policies")
    assert code == 1 and len(data["granted"]) == 3
    assert run(capsys, "diff", "HEAD:policies/", "policies/") == (0, "no change in access\n", "")

    code, out, err = run(capsys, "diff", "no-such-rev:policies/policy.yaml", "policies/")
    assert (code, out) == (2, "")
    assert err.startswith("no-such-rev:policies/policy.yaml:0: ")
    broken = write(repo / "broken.yaml", "version: 1\n")
    code, _, err = run(capsys, "diff", "HEAD:policies/", str(broken))
    assert code == 2 and f"{broken}:1: no issuers" in err


def test_lint_warns_when_a_subject_folder_spans_issuers(capsys, tmp_path):
    path = write(
        tmp_path / "p.yaml",
        """\
        version: 1
        issuers:
          - {issuer: "https://accounts.google.com", audiences: [a]}
          - {issuer: "https://login.example.com", audiences: [b]}
        rules:
          - id: homes
            principals: [allAuthenticatedUsers]
            bucket: data
            prefixes: ["home/${sub}/"]
            verbs: [read]
          - id: robot-home
            principals: ["subject:https://accounts.google.com#42"]
            bucket: data
            prefixes: ["robots/${sub}/"]
            verbs: [read]
        """,
    )
    code, out, _ = run(capsys, "lint", str(path))
    assert code == 1
    assert out.splitlines() == [
        f"{path}:6: warning: rule 'homes': prefix 'home/${{sub}}/' is shared by callers of 2 "
        "issuers with the same subject (a subject is unique only within its issuer: "
        "https://accounts.google.com, https://login.example.com); use ${email}, or "
        "subject: principals of one issuer",
        "1 warning(s)",
    ]
    one = write(tmp_path / "one.yaml", path.read_text().replace('  - {issuer: "https://login', "#"))
    assert run(capsys, "lint", str(one))[0] == 0
    # subject: principals of two issuers share robots/42/ as much as anyone does.
    two = path.read_text().replace(
        '["subject:https://accounts.google.com#42"]',
        '["subject:https://accounts.google.com#42", "subject:https://login.example.com#42"]',
    )
    code, out, _ = run(capsys, "lint", str(write(tmp_path / "two.yaml", two)))
    assert code == 1 and "rule 'robot-home': prefix 'robots/${sub}/' is shared" in out
    # Subjects with '#' in them, of one issuer, are one issuer.
    hashes = path.read_text().replace(
        '["subject:https://accounts.google.com#42"]',
        '["subject:https://accounts.google.com#team#1", "subject:https://accounts.google.com#crew#2"]',
    )
    code, out, _ = run(capsys, "lint", str(write(tmp_path / "hashes.yaml", hashes)))
    assert "robot-home" not in out


# -- what `serve` loads -------------------------------------------------------------------------


def test_serve_leaves_the_policy_tooling_unloaded():
    # The sidecar runs `gcs-iap-proxy serve` through proxy.cli: test, diff, lint and who-can
    # (and git, subprocess-based reading) are imported by their own commands only, so the
    # serving process does not carry them (about 0.26 MiB of idle RSS).
    code = "import sys, proxy.cli, proxy.serve; print(*sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert {"proxy.cli", "proxy.serve", "proxy.policy.load"} <= loaded
    tooling = {
        "proxy.policy.cases",
        "proxy.policy.gitread",
        "proxy.policy.grants",
        "proxy.policy.lint",
    }
    assert not tooling & loaded


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`policy diff OLD NEW | head`: the pipe closes while the diff is still printing."""
    rules = "".join(
        f"  - {{id: r{i}, principals: ['user:u{i}@example.com'], bucket: bkt, prefixes: ['p{i}/'], verbs: [read]}}\n"
        for i in range(2000)  # more than a pipe holds
    )
    old = write(tmp_path / "old.yaml", "version: 1\n" + ISSUERS + "rules: []\n")
    new = write(tmp_path / "new.yaml", "version: 1\n" + ISSUERS + "rules:\n" + rules)
    command = [sys.executable, "-m", "proxy", "policy", "diff", str(old), str(new)]
    diff = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert diff.stdout is not None and diff.stderr is not None
    first = diff.stdout.readline()
    diff.stdout.close()
    _, stderr = diff.communicate(timeout=60)
    assert diff.returncode == 1
    assert first.startswith(b"+ ")
    assert stderr == b""
