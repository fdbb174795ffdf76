"""gatewayd.policy: who may do what, when — the policy language, its loader and `decide()`.

Public API (other modules depend on these names)::

    policy = load_policy(Path("policies"))          # raises PolicyError(errors=[PolicyIssue])
    policy.http_service_for(host, raw_path)          # -> service name | None
    policy.tcp_service_for(host, port, attributes)   # -> service name | None
    decision = decide(policy, request)               # pure; -> Decision(allow|deny|step_up)
    explanation = explain(policy, request)           # same evaluation, with a per-rule trace

Module map: `paths` (request-path normaliser), `values` (value syntaxes), `yamlsrc` (YAML with
line numbers), `schema` (pydantic file schema), `check` (whole-policy checks), `compiler`
(compiled, indexed policy), `model` (compiled types, route tables), `request` (request and
decision types), `conditions` (compiled rule conditions), `engine` (decide), `explain`
(traces and their text), `loader` (load_policy), `cli` (`gatewayd policy ...`).
"""

from .engine import decide
from .errors import PolicyError, PolicyIssue
from .explain import Explanation, explain
from .loader import load_policy, load_policy_texts
from .model import HttpService, Policy, Role, Rule, Service, TcpService
from .paths import AmbiguousPathError, normalize_path
from .request import READ_METHODS, AccessRequest, Decision, Obligations

__all__ = [
    "READ_METHODS",
    "AccessRequest",
    "AmbiguousPathError",
    "Decision",
    "Explanation",
    "HttpService",
    "Obligations",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "Role",
    "Rule",
    "Service",
    "TcpService",
    "decide",
    "explain",
    "load_policy",
    "load_policy_texts",
    "normalize_path",
]
