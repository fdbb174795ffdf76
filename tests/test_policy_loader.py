"""Tests for gatewayd.policy.loader (and errors): directory handling, file order, collecting
every problem of every file, and the `file:line: message` format."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.policy import PolicyError, PolicyIssue, load_policy, load_policy_texts
from gatewayd.policy.loader import policy_files

SERVICES = "services:\n  files: {kind: http, prefixes: /files/}\n"


def write(directory: Path, files: dict[str, str | bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return directory


def errors(directory: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(directory)
    return [str(issue) for issue in caught.value.errors]


def test_files_are_read_in_name_order_and_rules_keep_that_order(tmp_path: Path) -> None:
    write(tmp_path, {
        "20-b.yml": "rules:\n  - {id: b1, effect: allow, subjects: '*', services: files}\n",
        "10-a.yaml": SERVICES + "rules:\n  - {id: a1, effect: allow, subjects: '*', services: files}\n",
        "30-c.yaml": "rules:\n  - {id: c1, effect: deny, subjects: '*', services: files, paths: /files/x}\n",
        ".#10-a.yaml": "not: [valid",  # editor lock file: hidden, skipped
        "README.md": "# not a policy",
        "README": "not a policy either",
    })
    policy = load_policy(tmp_path)
    assert [rule.id for rule in policy.rules] == ["a1", "b1", "c1"]
    assert policy.files == tuple(str(tmp_path / name) for name in ("10-a.yaml", "20-b.yml", "30-c.yaml"))
    assert policy.rules[0].origin == f"{tmp_path / '10-a.yaml'}:4"


def test_policy_files_lists_only_policy_files(tmp_path: Path) -> None:
    write(tmp_path, {"b.yaml": "", "a.yml": "", ".hidden.yaml": "", "c.json": "", "d.YAML": "", "e.Yml": ""})
    assert [p.name for p in policy_files(tmp_path)] == ["a.yml", "b.yaml", "d.YAML", "e.Yml"]


def test_suffixes_are_compared_ignoring_case(tmp_path: Path) -> None:
    # A guard-rail file renamed to .YAML was skipped: its deny rules silently disappeared.
    write(tmp_path, {
        "10-a.yaml": SERVICES + "rules:\n  - {id: a, effect: allow, subjects: '*', services: files}\n",
        "90-guard.YAML": "rules:\n  - {id: no-x, effect: deny, subjects: '*', services: files, paths: /files/x}\n",
        "91-more.YML": "rules:\n  - {id: no-y, effect: deny, subjects: '*', services: files, paths: /files/y}\n",
        "92-last.Yaml": "rules:\n  - {id: no-z, effect: deny, subjects: '*', services: files, paths: /files/z}\n",
    })
    assert [rule.id for rule in load_policy(tmp_path).rules] == ["a", "no-x", "no-y", "no-z"]


def test_entries_that_are_not_policy_files_are_errors(tmp_path: Path) -> None:
    # An operator who puts a file into the policy directory expects it to count; a file that
    # silently does not (a backup, a typo in the suffix) must be reported, not skipped.
    write(tmp_path, {
        "10-a.yaml": SERVICES,
        "rules.yaml.bak": "rules: []\n",
        "guard.txt": "",
        "x.json": "{}",
        "90-guard.yaml~": "",
        "90-guard.yaml.orig": "",
        "readme.txt": "",
        "README.md": "# fine",
        "README": "fine",
        ".hidden": "fine",
        ".10-a.yaml.swp": "fine",
    })
    (tmp_path / "old").mkdir()
    (tmp_path / ".git").mkdir()
    message = "not a policy file: rename it to *.yaml or move it out"
    assert errors(tmp_path) == [
        f"{tmp_path}/90-guard.yaml.orig: {message}",
        f"{tmp_path}/90-guard.yaml~: {message}",
        f"{tmp_path}/guard.txt: {message}",
        f"{tmp_path}/old: not a policy file: a directory (only files directly in the policy directory are read); move it out",
        f"{tmp_path}/readme.txt: {message}",
        f"{tmp_path}/rules.yaml.bak: {message}",
        f"{tmp_path}/x.json: {message}",
    ]


def test_stray_entries_are_reported_with_the_problems_of_the_policy_files(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": "colour: red\n", "b.yml.bak": ""})
    assert errors(tmp_path) == [
        f"{tmp_path}/a.yaml:1: unknown key 'colour'",
        f"{tmp_path}/b.yml.bak: not a policy file: rename it to *.yaml or move it out",
    ]
    (tmp_path / "a.yaml").unlink()
    assert errors(tmp_path) == [
        f"{tmp_path}: no policy files (*.yaml, *.yml) in directory",
        f"{tmp_path}/b.yml.bak: not a policy file: rename it to *.yaml or move it out",
    ]


def test_all_problems_of_all_files_are_collected_and_sorted(tmp_path: Path) -> None:
    write(tmp_path, {
        "a.yaml": SERVICES + "rules:\n  - {id: r, effect: allow, subjects: '*', services: nope}\n",
        "b.yaml": "rules:\n  - id: x\n    effect: allow\n   subjects: '*'\n",
        "c.yaml": "timezone: Nowhere/City\nroles:\n  r: {groups: []}\n",
    })
    base = str(tmp_path)
    assert errors(tmp_path) == [
        f"{base}/a.yaml:4: rule 'r': unknown service 'nope'",
        f"{base}/b.yaml:4: YAML syntax error: expected <block end>, but found '<block mapping start>'",
        f"{base}/c.yaml:1: timezone: unknown timezone 'Nowhere/City': use an IANA name like 'Asia/Tokyo'",
        f"{base}/c.yaml:3: role 'r': role maps no groups or users, so nobody can ever hold it",
    ]


def test_relative_directory_gives_relative_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "policies", {"a.yaml": "rules: 5\n"})
    monkeypatch.chdir(tmp_path)
    assert errors(Path("policies")) == ["policies/a.yaml:1: rules: must be a valid list (got 5)"]


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    assert errors(tmp_path) == [f"{tmp_path}: no policy files (*.yaml, *.yml) in directory"]


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    assert errors(tmp_path / "missing") == [
        f"{tmp_path / 'missing'}: cannot read policy directory: No such file or directory"
    ]


def test_non_utf8_file_is_an_error_and_other_files_still_checked(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": b"roles:\n  \xff\xfe: {}\n", "b.yaml": "colour: red\n"})
    assert errors(tmp_path) == [
        f"{tmp_path}/a.yaml: not valid UTF-8 (invalid start byte)",
        f"{tmp_path}/b.yaml:1: unknown key 'colour'",
    ]


def test_unreadable_file_is_an_error_not_skipped(tmp_path: Path) -> None:
    # Root reads anything chmod'ed 0 (CI runs as root); a dangling symlink and a directory
    # cannot be read by anyone. Skipping them would silently drop their (deny) rules.
    write(tmp_path, {"a.yaml": SERVICES})
    (tmp_path / "b.yaml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "c.yml").mkdir()
    assert errors(tmp_path) == [
        f"{tmp_path}/b.yaml: cannot read: No such file or directory",
        f"{tmp_path}/c.yml: cannot read: Is a directory",
    ]


def test_files_with_only_comments_give_an_empty_policy(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": "# nothing yet\n"})
    policy = load_policy(tmp_path)
    assert policy.rules == () and dict(policy.services) == {}
    assert policy.timezone.key == "Asia/Tokyo"


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (PolicyIssue("policies/a.yaml", 12, "unknown key 'x'"), "policies/a.yaml:12: unknown key 'x'"),
        (PolicyIssue("policies", None, "no policy files"), "policies: no policy files"),
    ],
)
def test_issue_format(issue: PolicyIssue, text: str) -> None:
    assert str(issue) == text


def test_policy_error_lists_issues_sorted_by_file_and_line() -> None:
    error = PolicyError([
        PolicyIssue("b.yaml", 1, "x"), PolicyIssue("a.yaml", 10, "y"), PolicyIssue("a.yaml", 2, "z"),
        PolicyIssue("a.yaml", None, "w"),
    ])
    assert [str(issue) for issue in error.errors] == ["a.yaml: w", "a.yaml:2: z", "a.yaml:10: y", "b.yaml:1: x"]
    assert str(error) == "a.yaml: w\na.yaml:2: z\na.yaml:10: y\nb.yaml:1: x"


# ---------------------------------------------------------------------------------------------
# Fuzzing: whatever the files contain, loading returns a Policy or raises PolicyError, whose
# issues name the files; never any other exception (which `policy check` would print as a
# traceback, and the gateway would treat as a crash instead of "policy invalid").

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "policies").glob("*.yaml"))
SHIPPED_TEXT = "".join(path.read_text(encoding="utf-8") for path in SHIPPED)
# Tokens that steer random text into YAML structure and into every part of the schema.
YAML_TOKENS = [
    "[", "]", "{", "}", ": ", ", ", "- ", "\n", "  ", "\t", "? ", "|", ">", "'", '"', "#", "---\n", "...\n",
    "&a ", "*a", "&b ", "*b", "!!str ", "!!map ", "!x ", "<<: ", "%YAML 1.2\n", "~", "true", "null", "07:00",
    "-1", "0", "1e999", ".nan", "9" * 70, "9" * 4400, "\x00", "\ufeff", "\u2028", "é", "\\", "%2e", "\udcff",
    "timezone", "Asia/Tokyo", "roles", "services", "rules", "id", "effect", "allow", "deny", "subjects",
    "'*'", "roles: [r]", "groups", "users", "kind", "http", "tcp", "prefixes", "/files/", "hosts",
    "destinations", "'{user.pc}:3389'", "h.local:22", "methods", "GET", "get", "paths", "/files/**",
    "/files/*.x", "when", "hours", "'07:00-22:00'", "weekdays", "mon-fri", "networks", "10.0.0.0/8",
    "device", "registered", "device_bound_to_user", "mfa_max_age", "5m", "obligations", "read_only",
    "max_upload", "10MiB", "description", "x",
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_or_policy_error(texts: dict[str, str]) -> None:
    try:
        load_policy_texts(texts)
    except PolicyError as exc:
        assert exc.errors
        assert {issue.file for issue in exc.errors} <= set(texts)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_in_a_policy_file(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "p.yaml").write_bytes(content)
        try:
            load_policy(Path(directory))
        except PolicyError as exc:
            assert exc.errors


@FUZZ
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=60).map("".join))
def test_fuzz_yaml_ish_text(text: str) -> None:
    load_or_policy_error({"p.yaml": text})


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_any_text(text: str) -> None:
    load_or_policy_error({"p.yaml": text})


@FUZZ
@given(st.data())
def test_fuzz_mutated_shipped_policy(data: st.DataObject) -> None:
    """The shipped policy with a few random cuts, insertions and duplications: text that is
    nearly valid reaches the schema, the checks and the compiler."""
    text = SHIPPED_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 40)))
        edit = data.draw(st.sampled_from(["cut", "insert", "duplicate"]))
        if edit == "cut":
            text = text[:start] + text[end:]
        elif edit == "insert":
            text = text[:start] + data.draw(st.sampled_from(YAML_TOKENS)) + text[start:]
        else:
            text = text[:end] + text[start:end] + text[end:]
    load_or_policy_error({"p.yaml": text})


@FUZZ
@given(st.sampled_from(["[", "{a: ", "- ", "a:\n", "? "]), st.integers(1, 4000), st.booleans())
def test_fuzz_deep_nesting(opener: str, depth: int, indent: bool) -> None:
    if indent:
        text = "".join(" " * level + opener + "\n" for level in range(depth))
    else:
        text = "rules: " + opener * depth
    load_or_policy_error({"p.yaml": text})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mfa_max_age: " + "9" * 400 + "h", "mfa_max_age: duration too long: at most 365d"),
        ("mfa_max_age: " + "9" * 60, "mfa_max_age: duration too long: at most 365d"),
        ("obligations: {max_upload: '" + "9" * 5000 + "B'}", "obligations.max_upload: invalid size: more than 18 digits"),
    ],
)
def test_huge_numbers_in_values_are_policy_errors(value: str, message: str) -> None:
    # These escaped as OverflowError (float of a 400-digit int) or as Python's own ValueError
    # about integers of more than 4300 digits.
    text = SERVICES + f"rules:\n  - id: r\n    effect: allow\n    subjects: '*'\n    services: files\n    {value}\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_texts({"p.yaml": text})
    assert [str(issue) for issue in caught.value.errors] == [f"p.yaml:8: rule 'r': {message}"]
