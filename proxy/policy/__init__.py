"""Policies: the model, loading from YAML, and pure evaluation."""

from proxy.policy.evaluate import (
    Access,
    Decision,
    PolicyIndex,
    carved_out,
    compile_policy,
    evaluate,
    evaluate_all,
    granting_prefixes,
    may_be_granted,
)
from proxy.policy.load import PolicyError, load_policy, parse_policy
from proxy.policy.model import Effect, Identity, Issuer, Mode, Policy, Rule, Verb

__all__ = [
    "Access",
    "Decision",
    "Effect",
    "Identity",
    "Issuer",
    "Mode",
    "Policy",
    "PolicyError",
    "PolicyIndex",
    "Rule",
    "Verb",
    "carved_out",
    "compile_policy",
    "evaluate",
    "evaluate_all",
    "granting_prefixes",
    "load_policy",
    "may_be_granted",
    "parse_policy",
]
