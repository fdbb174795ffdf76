"""Tests for gatewayd.audit (the package API other modules depend on)."""

from __future__ import annotations

import inspect
from typing import Any

import gatewayd.audit as audit


def test_everything_exported_exists() -> None:
    for name in audit.__all__:
        assert getattr(audit, name) is not None, name


def parameters(function: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


def test_audit_log_constructor_keeps_the_agreed_names_and_defaults() -> None:
    params = parameters(audit.AuditLog.__init__)
    assert list(params)[1] == "path"
    expected_defaults = {
        "fsync": "always", "fsync_interval": 1.0, "rotate_bytes": None, "rotate_daily": False,
        "checkpoint_interval": 60.0, "checkpoint_every": 1000, "on_failure": "deny",
        "metrics": None, "clock": None, "logger": None,
    }
    for name, default in expected_defaults.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == default, name
    assert str(params["timezone"].default) == "Asia/Tokyo"
    for name in ("node", "signing_key_path"):
        assert params[name].default is inspect.Parameter.empty


def test_functions_keep_their_agreed_shape() -> None:
    assert list(parameters(audit.verify_files))[:2] == ["paths", "public_key"]
    query = parameters(audit.query_files)
    assert {"user", "event", "service", "since", "until"} <= set(query)
    assert all(query[n].kind is inspect.Parameter.KEYWORD_ONLY
               for n in ("user", "event", "service", "since", "until"))
    for method in ("start", "close"):
        assert inspect.iscoroutinefunction(getattr(audit.AuditLog, method))
    assert isinstance(audit.AuditLog.healthy, property)
