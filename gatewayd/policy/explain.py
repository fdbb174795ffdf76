"""`explain(policy, request)`: the decision plus what happened to every candidate rule.

It runs the one evaluator (`engine.evaluate`) with a trace, so its answer is by construction
the answer `decide()` gives; `format_explanation` turns it into the text `policy explain`
prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import RuleTrace, Trace, evaluate
from .model import Policy
from .request import AccessRequest, Decision
from .values import format_duration, format_size


@dataclass(frozen=True, slots=True)
class Explanation:
    """The decision, and each rule that names the request's service, in policy order."""

    decision: Decision
    request: AccessRequest
    admitted: bool  # False: refused before any rule was looked at (see decision.reason)
    considered: tuple[RuleTrace, ...]
    rules_in_policy: int


def explain(policy: Policy, request: AccessRequest) -> Explanation:
    trace = Trace()
    decision = evaluate(policy, request, trace)
    considered = tuple(sorted(trace.steps, key=lambda step: step.rule.order))
    return Explanation(decision, request, trace.admitted, considered, len(policy.rules))


def format_explanation(explanation: Explanation, policy: Policy) -> str:
    """The human-readable report of `gatewayd policy explain`."""
    decision = explanation.decision
    lines = [f"decision: {decision.decision}"]
    if decision.rule is not None:
        rule = next(r for r in policy.rules if r.id == decision.rule)
        lines.append(f"rule:     {rule.id} ({rule.origin})")
    else:
        lines.append("rule:     none")
    lines.append(f"reason:   {decision.reason}")
    if decision.decision == "allow":
        lines.append(f"obligations: {_obligations(decision)}")
    lines += _request_lines(explanation.request, policy)
    lines += _trace_lines(explanation)
    return "\n".join(lines) + "\n"


def _obligations(decision: Decision) -> str:
    parts = []
    if decision.obligations.read_only:
        parts.append("read-only")
    if decision.obligations.max_upload is not None:
        parts.append(f"uploads up to {format_size(decision.obligations.max_upload)}")
    return ", ".join(parts) or "none"


def _request_lines(request: AccessRequest, policy: Policy) -> list[str]:
    groups = ", ".join(sorted(request.groups)) or "none"
    if request.dest_host is not None or request.method is None:
        what = f"tunnel to {request.dest_host}:{request.dest_port}"
    else:
        host = f" (host {request.host})" if request.host else ""
        what = f"{request.method} {request.path}{host}"
    if request.now.utcoffset() is None:
        when = f"{request.now} (no time zone)"
    else:
        local = request.now.astimezone(policy.timezone)
        when = f"{local:%Y-%m-%d %H:%M:%S %a} {policy.timezone.key}"
    mfa = "unknown" if request.mfa_age is None else f"{format_duration(request.mfa_age)} ago"
    device = request.device or "none"
    if request.device:
        device += f" (bound to {request.device_user or 'nobody'})"
    attributes = ", ".join(f"{k}={v}" for k, v in sorted(request.attributes.items())) or "none"
    service = request.service or "none"
    return [
        f"request:  user {request.user} (groups: {groups}), service {service}: {what}",
        f"          at {when}, from {request.source}, last MFA {mfa}, device {device}",
        f"          attributes: {attributes}",
    ]


def _trace_lines(explanation: Explanation) -> list[str]:
    if not explanation.admitted:
        return ["rules:    none evaluated: the request was refused before rule evaluation"]
    if not explanation.considered:
        return [f"rules:    none of the {explanation.rules_in_policy} rules names this service"]
    decision = explanation.decision
    lines = [
        f"rules considered ({len(explanation.considered)} of {explanation.rules_in_policy} "
        f"name service {explanation.request.service}; policy order):"
    ]
    width = max(len(step.rule.id) for step in explanation.considered)
    for step in explanation.considered:
        outcome = _outcome(step, decision)
        lines.append(f"  {step.rule.effect:<5}  {step.rule.id:<{width}}  {outcome}")
    return lines


def _outcome(step: RuleTrace, decision: Decision) -> str:
    if step.outcome == "no_match":
        return f"no match — {step.failed}: {step.why}"
    if step.outcome == "mfa_stale":
        assert step.rule.mfa_max_age is not None  # only such rules can be stale
        text = f"matches, but needs MFA within {format_duration(step.rule.mfa_max_age)}"
    else:
        text = "MATCHES"
    if step.rule.id == decision.rule:
        return f"{text} — decides"
    if step.rule.effect == "allow" and decision.decision == "deny" and decision.rule:
        return f"{text}, but deny rule {decision.rule} overrides it"
    return text
