"""Benchmark decide(): a generated 500-rule policy, many varied requests, median and p99.

Run: .venv/bin/python bench/bench_policy.py [--rules 500] [--requests 20000] [--seed 1]

The policy goes through the real loader (YAML text -> checks -> compiled index), so the
numbers include everything decide() does per request: path normalisation, route
cross-check, facts, the per-service rule scan, conditions.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import yaml

from gatewayd.policy import AccessRequest, Policy, decide, load_policy_texts

TCP_SERVICES = 5
ROLES = 20
METHODS = ["GET", "HEAD", "OPTIONS", "PROPFIND", "POST", "PUT", "DELETE", "MKCOL", "MOVE"]
SEGMENTS = ["docs", "2025", "reports", "budget", "team", "archive", "inbox", "plans", "x"]


def generate_policy(rules: int, http_services: int, rng: random.Random) -> dict[str, object]:
    """A policy document shaped like a large ward's: many services, roles and rules."""
    services: dict[str, object] = {
        f"app{i}": {"kind": "http", "prefixes": [f"/app{i}/"]} for i in range(http_services)
    }
    services.update(
        {f"tcp{i}": {"kind": "tcp", "destinations": [f"host{i}.ward.local:{1000 + i}"]}
         for i in range(TCP_SERVICES)}
    )  # fmt: skip
    roles = {f"role{i}": {"groups": [f"group{i}", f"group{i + ROLES}"]} for i in range(ROLES)}
    return {
        "timezone": "Asia/Tokyo",
        "roles": roles,
        "services": services,
        "rules": [_rule(n, http_services, rng) for n in range(rules)],
    }


def _rule(n: int, http_services: int, rng: random.Random) -> dict[str, object]:
    deny = n % 10 == 0
    if n % 25 == 0 or rng.random() < 0.2:
        service = f"tcp{rng.randrange(TCP_SERVICES)}"
        rule: dict[str, object] = {"services": [service]}
    else:
        app = rng.randrange(http_services)
        rule = {
            "services": [f"app{app}"],
            "methods": rng.sample(METHODS, rng.randint(1, 4)),
            "paths": [
                f"/app{app}/{rng.choice(SEGMENTS)}/**",
                f"/app{app}/*/{rng.choice(SEGMENTS)}",
            ],
        }
    when: dict[str, object] = {}
    if rng.random() < 0.3:
        when["hours"] = rng.choice(["07:00-22:00", "08:30-17:15", "22:00-06:00"])
    if rng.random() < 0.3:
        when["weekdays"] = ["mon-fri"]
    if rng.random() < 0.2:
        when["networks"] = ["10.0.0.0/8", "2001:db8::/32"]
    if deny:
        when.setdefault("hours", "01:00-05:00")
    rule.update({
        "id": f"rule-{n}",
        "effect": "deny" if deny else "allow",
        "subjects": {"roles": rng.sample([f"role{i}" for i in range(ROLES)], 2)},
    })  # fmt: skip
    if when:
        rule["when"] = when
    if not deny and rng.random() < 0.2:
        rule["mfa_max_age"] = "10m"
    return rule


def generate_requests(
    policy: Policy, count: int, http_services: int, rng: random.Random
) -> list[AccessRequest]:
    start = datetime(2025, 4, 7, tzinfo=UTC)
    requests = []
    for _ in range(count):
        groups = frozenset(f"group{rng.randrange(2 * ROLES)}" for _ in range(rng.randint(1, 3)))
        base = AccessRequest(
            user=f"user{rng.randrange(1000)}",
            groups=groups,
            source=ipaddress.ip_address(rng.choice(["10.1.2.3", "192.0.2.7", "2001:db8::5"])),
            now=start + timedelta(minutes=rng.randrange(7 * 24 * 60)),
            mfa_age=rng.choice([None, 30.0, 3600.0]),
            frontend="https",
            service=None,
        )
        if rng.random() < 0.85:
            app = rng.randrange(http_services)
            path = f"/app{app}/" + "/".join(rng.choices(SEGMENTS, k=rng.randint(1, 5)))
            if rng.random() < 0.05:
                path += "/%2e%2e/secret"
            service = policy.http_service_for(None, path)
            method = rng.choice(METHODS)
            requests.append(replace(base, service=service, method=method, path=path))
        else:
            i = rng.randrange(TCP_SERVICES)
            requests.append(replace(
                base, frontend="ssh", service=f"tcp{i}",
                dest_host=f"host{i}.ward.local", dest_port=1000 + i,
            ))  # fmt: skip
    return requests


def measure(policy: Policy, requests: list[AccessRequest], rounds: int) -> list[float]:
    """Per-call decide() times in microseconds (each request timed individually)."""
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(rounds):
        for request in requests:
            started = clock()
            decide(policy, request)
            samples.append((clock() - started) / 1000)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=500)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--http-services", type=int, default=25,
                        help="rules are spread over this many HTTP services (+5 TCP)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    document = generate_policy(args.rules, args.http_services, rng)
    started = time.perf_counter()
    policy = load_policy_texts({"bench.yaml": yaml.safe_dump(document, sort_keys=False)})
    load_ms = (time.perf_counter() - started) * 1000
    requests = generate_requests(policy, args.requests, args.http_services, rng)
    measure(policy, requests[:2000], 1)  # warm-up
    samples = sorted(measure(policy, requests, args.rounds))
    median = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]
    outcomes = Counter(decide(policy, request).decision for request in requests)
    per_service = max(len(rules.all) for rules in policy.rule_index.values())
    print(f"policy: {len(policy.rules)} rules, {len(policy.services)} services "
          f"(at most {per_service} rules per service), loaded in {load_ms:.0f} ms")  # fmt: skip
    print(f"requests: {len(requests)} x {args.rounds} rounds; decisions: {dict(outcomes)}")
    mean = statistics.fmean(samples)
    print(f"decide(): median {median:.2f} us, p99 {p99:.2f} us, mean {mean:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
