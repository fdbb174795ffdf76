"""Tests for gatewayd.config: value grammars, error messages, defaults, and CONFIGURATION.md sync."""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gatewayd.config import (
    ConfigError,
    ListenAddress,
    Settings,
    default_config_path,
    load_settings,
    parse_duration,
    parse_listen,
    parse_size,
    settings_from_mapping,
)

REPO = Path(__file__).resolve().parent.parent
CONFIGURATION_MD = REPO / "CONFIGURATION.md"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900), ("10h", 36000), ("30s", 30), ("500ms", 0.5), ("1h30m", 5400),
        ("7d", 604800), ("0s", 0), ("1d2h3m4s", 93784),
    ],
)
def test_duration_grammar_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text", ["", "soon", "15", "m", "15 m", "15M", "-5m", "1.5h", "15mm", "h15", "15m ", "1w",
             "9" * 400 + "s", "3651d"]
)
def test_duration_grammar_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == text  # the offending text is carried for the message


@pytest.mark.parametrize(
    ("text", "size"),
    [("10MiB", 10 * 1024**2), ("512KiB", 524288), ("1GB", 10**9), ("0B", 0), ("7B", 7),
     ("3 MB", 3_000_000), ("2GiB", 2 * 1024**3)],
)
def test_size_grammar_accepts(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "10", "10mb", "MiB", "-1MiB", "1.5GiB", "10 furlongs"])
def test_size_grammar_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9480", ("127.0.0.1", 9480)), ("[::1]:443", ("::1", 443)),
     ("0.0.0.0:0", ("0.0.0.0", 0)), ("localhost:22", ("localhost", 22))],
)
def test_listen_grammar_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == ListenAddress(*expected)


@pytest.mark.parametrize(
    "text", ["9480", "127.0.0.1", "127.0.0.1:99999", "999.0.0.1:80", "::1:443", "[::1]", "host:x",
             "example.org:443"],
)
def test_listen_grammar_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


# Every kind of mistake an operator makes, and the exact line they get back.
ERROR_TABLE: list[tuple[str, str]] = [
    ('[sessions]\nidle_timeout = "soon"',
     'sessions.idle_timeout: expected a duration like "15m", got "soon"'),
    ("[sessions]\nidle_timeout = 900", 'sessions.idle_timeout: expected a duration like "15m", got 900'),
    ('[sessions]\nmax_concurrent = "140"', 'sessions.max_concurrent: expected an integer, got "140"'),
    ("[sessions]\nmax_concurrent = 1.5", "sessions.max_concurrent: expected an integer, got 1.5"),
    ("[sessions]\nper_user = 0", "sessions.per_user: expected a number >= 1, got 0"),
    ("[sessions]\nidle_timeout = \"11h\"",
     "sessions: idle_timeout (11:00:00) must not exceed absolute_timeout (10:00:00)"),
    ("[sessions]\nidel_timeout = \"15m\"", "sessions.idel_timeout: unknown key"),
    ("[sesions]\nidle_timeout = \"15m\"", "sesions: unknown key"),
    ("sessions = 5", "sessions: expected a table, got 5"),
    ('[audit]\nfsync = "sometimes"',
     "audit.fsync: expected one of 'always' or 'interval', got \"sometimes\""),
    ('[audit]\nrotate_size = "10 furlongs"',
     'audit.rotate_size: expected a size like "10MiB", got "10 furlongs"'),
    ('[audit]\ntimezone = "Mars/Olympus"',
     'audit.timezone: expected an IANA time zone like "Asia/Tokyo", got "Mars/Olympus"'),
    ('[audit]\nrotate_daily = "yes"', 'audit.rotate_daily: expected true or false, got "yes"'),
    ('[metrics]\nlisten = "127.0.0.1:99999"',
     'metrics.listen: expected an address like "127.0.0.1:9480", got "127.0.0.1:99999"'),
    ('[gateway]\nnode = "gw 1"',
     "gateway.node: expected letters, digits, '.', '_' or '-', got \"gw 1\""),
    ('[gateway]\nnode = ""', 'gateway.node: expected at least 1 characters, got ""'),
    ('[gateway]\nlog_level = "verbose"',
     "gateway.log_level: expected one of 'debug', 'info', 'warning' or 'error', got \"verbose\""),
    ("[policy]\ndir = 5", "policy.dir: expected a path string, got 5"),
    ('[audit]\ncheckpoint_interval = "0s"', 'audit.checkpoint_interval: expected a duration greater than zero, got "0s"'),
    ('[sessions]\nidle_timeout = "99999999999999999999d"', 'sessions.idle_timeout: expected a duration like "15m", got "99999999999999999999d"'),
    ('[upstreams.files]\nurl = "http://svc:S3cret@10.0.0.5:80/x"', 'upstreams.files.url: expected a URL like "http://127.0.0.1:8081", got "http://***@10.0.0.5:80/x"'),
    ("upstreams = 5", "upstreams: expected a table, got 5"),
]


@pytest.mark.parametrize(("toml_text", "message"), ERROR_TABLE)
def test_error_names_file_key_and_expectation(tmp_path: Path, toml_text: str, message: str) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text(toml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.errors == [f"{path}: {message}"]


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text('[sessions]\nidle_timeout = "soon"\nper_user = 0\n[audit]\nbogus = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert len(info.value.errors) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"[sessions\n", "invalid TOML"), (b"\xff\xfe", "not UTF-8 text")],
)
def test_unparseable_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "absent.toml")


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text("")
    assert load_settings(path) == Settings()


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "gatewayd.toml"
    path.write_text('[policy]\ndir = "policies"\n[audit]\npath = "/abs/audit.log"\n')
    settings = load_settings(path)
    assert settings.policy.dir == tmp_path / "etc" / "policies"
    assert settings.audit.path == Path("/abs/audit.log")


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.sessions.per_user = 5  # type: ignore[misc]


def test_default_config_path_honours_environment() -> None:
    assert default_config_path({"GATEWAYD_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert default_config_path({}) == Path("/etc/gatewayd/gatewayd.toml")


# --- CONFIGURATION.md stays in sync with the code --------------------------------------------


REQUIRED = "(required)"


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default of every setting; a table of named tables is written ``<name>``."""
    leaves: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves.update(_leaf_fields(annotation, f"{prefix}{name}."))
        elif len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            leaves.update(_leaf_fields(args[1], f"{prefix}{name}.<name>."))
        else:
            leaves[f"{prefix}{name}"] = (REQUIRED if field.is_required()
                                         else field.get_default(call_default_factory=True))
    return leaves


def _documented_defaults() -> dict[str, str]:
    # Keys are dotted paths of any depth: `audit.path`, `upstreams.<name>.url`,
    # `directory.ldap.urls` (a nested table).
    rows = re.findall(r"^\| `([a-z_]+(?:\.(?:<name>|[a-z_]+))*\.[a-z_]+)` \|[^|]*\| `?([^`|]*)`? \|",
                      CONFIGURATION_MD.read_text(), re.MULTILINE)
    return dict(rows)


def _as_mapping(key: str, value: object) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``a.b``; a ``<name>`` part becomes an example name."""
    parts = [("example" if part == "<name>" else part) for part in key.split(".")]
    data: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        data = {part: data}
    return data


def test_every_setting_is_documented_and_nothing_else() -> None:
    assert set(_documented_defaults()) == set(_leaf_fields(Settings))


@pytest.mark.parametrize("key", sorted(_leaf_fields(Settings)))
def test_documented_default_is_the_real_default(key: str) -> None:
    literal, default = _documented_defaults()[key], _leaf_fields(Settings)[key]
    if default is REQUIRED or literal in {REQUIRED, "(none)"}:
        assert literal == REQUIRED if default is REQUIRED else default is None
        return
    data = _as_mapping(key, tomllib.loads(f"value = {literal}")["value"])
    if key.startswith("upstreams."):
        data["upstreams"]["example"].setdefault("url", "http://127.0.0.1:1")
    node: Any = settings_from_mapping(data)
    for part in key.split("."):
        node = node["example"] if part == "<name>" else (
            node[part] if isinstance(node, dict) else getattr(node, part))
    assert node == default


def test_documented_example_is_valid_and_complete() -> None:
    example = re.search(r"## Example.*?```toml\n(.*?)```", CONFIGURATION_MD.read_text(), re.DOTALL)
    assert example is not None
    data = tomllib.loads(example.group(1))
    settings_from_mapping(data, source="CONFIGURATION.md")
    leaves = set(_leaf_fields(Settings))

    def keys(table: dict[str, Any], prefix: str) -> set[str]:
        found: set[str] = set()
        for key, value in table.items():
            # A table-valued setting (directory.ldap.attributes) is one key, not a section.
            if isinstance(value, dict) and f"{prefix}{key}" not in leaves:
                part = "<name>" if prefix == "upstreams." else key
                found |= keys(value, f"{prefix}{part}.")
            else:
                found.add(f"{prefix}{key}")
        return found

    assert keys(data, "") == leaves


def test_optional_paths_may_be_none_when_built_in_code() -> None:
    from gatewayd.config import HttpsSettings  # noqa: PLC0415

    assert HttpsSettings(client_ca_file=None).client_ca_file is None
