"""The decision: `decide(policy, request) -> Decision`, a pure function.

No I/O, no clock (the time is `request.now`), no await, no randomness. The semantics:

1. Requests that cannot be evaluated safely are refused first (rule None): no or unknown
   service, naive time, missing method/path/destination, a method that is not an uppercase
   token (`values.is_request_method`), an ambiguous path, a path that does not route to the
   named service, a destination that is not the service's.
2. Default deny; deny overrides allow: if any deny rule matches, the decision is deny, by
   the first matching deny rule in policy order, whatever the order of the allow rules.
3. Otherwise, if an allow rule matches and the user's MFA is fresh enough for it, allow.
   When several do, the most permissive decides (see `RuleSet`).
4. Otherwise, if an allow rule matched but only with stale (or unknown) MFA, step_up.
5. Otherwise deny: "no rule allows this".

`evaluate` is the one evaluator. `decide` calls it without a trace: it looks only at the
rules indexed for the request's service and method and stops at the first deciding match.
`explain` calls it with a `Trace` to fill: it then visits every rule of the service and
records each outcome — the decision is the same either way (the method index only leaves out
rules whose method condition would fail; tests check the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .conditions import Facts, reaches
from .model import HttpService, Policy, Rule, ServiceRules, TcpService
from .paths import AmbiguousPathError, normalize_path
from .request import AccessRequest, Decision
from .values import canonical_host, format_duration, is_request_method, show_method

NO_RULE_ALLOWS = Decision("deny", None, "no rule allows this")


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """What happened to one rule during an explained evaluation.

    outcome: "match" (all conditions hold and MFA is fresh enough), "mfa_stale" (all
    conditions hold but the rule wants fresher MFA) or "no_match" (then `failed` is the
    policy key of the first condition that failed and `why` says why).
    """

    rule: Rule
    outcome: Literal["match", "mfa_stale", "no_match"]
    failed: str | None = None
    why: str | None = None


@dataclass(slots=True)
class Trace:
    """Filled by an explained evaluation: whether the request got as far as the rules
    (`admitted`) and what happened to each candidate rule (`steps`, evaluation order)."""

    admitted: bool = False
    steps: list[RuleTrace] = field(default_factory=list)

    def append(self, step: RuleTrace) -> None:
        self.steps.append(step)


def decide(policy: Policy, request: AccessRequest) -> Decision:
    """Decide whether `request` may proceed under `policy` (pure; see module docstring)."""
    return evaluate(policy, request, None)


def evaluate(policy: Policy, request: AccessRequest, trace: Trace | None) -> Decision:
    """The evaluator behind `decide` and `explain`; fills `trace` when one is given."""
    admitted = _admit(policy, request)
    if isinstance(admitted, Decision):
        return admitted
    facts, service_rules = admitted
    if trace is None:
        rules = service_rules.candidates(facts.method)
    else:
        trace.admitted = True
        rules = service_rules.all
    deny = _first_matching_deny(rules.denies, facts, trace)
    if deny is not None and trace is None:
        return deny.verdict
    allow, stale = _best_allow(rules.allows, facts, request.mfa_age, trace)
    if deny is not None:
        return deny.verdict
    if allow is not None:
        return allow.verdict
    if stale is not None:
        return _step_up(stale, request.mfa_age)
    return NO_RULE_ALLOWS


def _first_matching_deny(
    denies: tuple[Rule, ...], facts: Facts, trace: Trace | None
) -> Rule | None:
    first: Rule | None = None
    for rule in denies:
        if _conditions_hold(rule, facts, trace):
            if trace is None:
                return rule
            trace.append(RuleTrace(rule, "match"))
            first = first or rule
    return first


def _best_allow(
    allows: tuple[Rule, ...], facts: Facts, mfa_age: float | None, trace: Trace | None
) -> tuple[Rule | None, Rule | None]:
    """The deciding allow rule (fresh MFA) and the first rule that matched with stale MFA."""
    best: Rule | None = None
    stale: Rule | None = None
    for rule in allows:
        if not _conditions_hold(rule, facts, trace):
            continue
        if rule.mfa_is_fresh(mfa_age):
            if trace is None:
                return rule, stale
            trace.append(RuleTrace(rule, "match"))
            best = best or rule
        else:
            if trace is not None:
                trace.append(RuleTrace(rule, "mfa_stale"))
            stale = stale or rule
    return best, stale


def _conditions_hold(rule: Rule, facts: Facts, trace: Trace | None) -> bool:
    for condition in rule.conditions:
        if not condition.test(facts):
            if trace is not None:
                trace.append(RuleTrace(rule, "no_match", condition.name, condition.why_not(facts)))
            return False
    return True


def _step_up(rule: Rule, mfa_age: float | None) -> Decision:
    assert rule.mfa_max_age is not None  # only rules with an MFA age limit can be stale
    if mfa_age is None or not math.isfinite(mfa_age) or mfa_age < 0:
        last = "unknown"
    else:
        last = f"{format_duration(mfa_age)} ago"
    return Decision(
        "step_up",
        rule.id,
        f"fresh MFA required: rule {rule.id} wants MFA within "
        f"{format_duration(rule.mfa_max_age)}, last MFA {last}",
    )


def _refuse(reason: str) -> Decision:
    return Decision("deny", None, reason)


def _admit(policy: Policy, request: AccessRequest) -> Decision | tuple[Facts, ServiceRules]:
    """Facts and candidate rules for a request that can be evaluated, else a refusal."""
    if request.now.utcoffset() is None:
        return _refuse("request time has no time zone")
    name = request.service
    if name is None:
        return _refuse("the request is not for any known service")
    service = policy.services.get(name)
    rules = policy.rules_for(name)
    if service is None or rules is None:
        return _refuse(f"unknown service {name}")
    if isinstance(service, HttpService):
        facts_or_refusal = _admit_http(policy, request, service)
    else:
        facts_or_refusal = _admit_tcp(policy, request, service)
    if isinstance(facts_or_refusal, Decision):
        return facts_or_refusal
    return facts_or_refusal, rules


def _admit_http(policy: Policy, request: AccessRequest, service: HttpService) -> Facts | Decision:
    if request.method is None or request.path is None:
        return _refuse("HTTP request without method or path")
    if not is_request_method(request.method):
        return _refuse(
            f"HTTP method refused: {show_method(request.method)} is not an uppercase method token"
        )
    try:
        path = normalize_path(request.path)
    except AmbiguousPathError as exc:
        return _refuse(f"ambiguous request path refused: {exc.reason}")
    if policy.http_routes.route(request.host, path) != service.name:
        return _refuse(f"path {path} is not part of service {service.name}")
    return Facts(request, policy.timezone, path=path)


def _admit_tcp(policy: Policy, request: AccessRequest, service: TcpService) -> Facts | Decision:
    if request.dest_host is None or request.dest_port is None:
        return _refuse("TCP request without destination")
    host = canonical_host(request.dest_host)
    facts = Facts(request, policy.timezone, host=host)
    if not reaches(service.destinations, facts):
        dest = f"{request.dest_host}:{request.dest_port}"
        return _refuse(f"{dest} is not a destination of service {service.name} for this user")
    return facts
