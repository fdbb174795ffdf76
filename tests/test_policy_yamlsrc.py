"""Tests for gatewayd.policy.yamlsrc: line numbers, YAML 1.2 core scalars, refusals."""

from __future__ import annotations

import pytest

from gatewayd.policy.yamlsrc import parse_yaml

DOCUMENT = """\
timezone: Asia/Tokyo
rules:
  - id: first
    effect: allow
    when:
      hours: "07:00-22:00"
  - id: second
    methods: [GET,
              PUT]
"""


def test_data_and_line_numbers() -> None:
    document, issues = parse_yaml(DOCUMENT, "p.yaml")
    assert issues == []
    assert document is not None
    assert document.data == {
        "timezone": "Asia/Tokyo",
        "rules": [
            {"id": "first", "effect": "allow", "when": {"hours": "07:00-22:00"}},
            {"id": "second", "methods": ["GET", "PUT"]},
        ],
    }
    lines = document.source
    assert lines.line_of(("timezone",)) == 1
    assert lines.line_of(("rules",)) == 2
    assert lines.line_of(("rules", 0)) == 3
    assert lines.line_of(("rules", 0, "when", "hours")) == 6
    assert lines.line_of(("rules", 1)) == 7
    assert lines.line_of(("rules", 1, "methods", 1)) == 9
    # Unknown paths fall back to the nearest known ancestor.
    assert lines.line_of(("rules", 0, "when", "nope", 3)) == 5
    assert lines.line_of(("nothing",)) == 1


@pytest.mark.parametrize(
    ("scalar", "value"),
    [("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("07:00", "07:00"), ("1:30", "1:30"),
     ("true", True), ("False", False), ("~", None), ("null", None), ("", None), ("42", 42), ("-7", -7),
     ("0777", 777), ("1.5", 1.5), ("1e3", 1000.0), ('"42"', "42"), ("'true'", "true"), ("5m", "5m"),
     ("0x1F", "0x1F"), ("2025-04-07", "2025-04-07")],
)
def test_scalars_follow_yaml_1_2_core_schema(scalar: str, value: object) -> None:
    document, issues = parse_yaml(f"key: {scalar}\n", "p.yaml")
    assert issues == []
    assert document is not None
    assert document.data == {"key": value}
    assert type(document.data["key"]) is type(value)  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1\nb: 2\na: 3\n", "p.yaml:3: duplicate key 'a' (first at line 1)"),
        ("rules:\n  - id: x\n    id: y\n", "p.yaml:3: duplicate key 'id' (first at line 2)"),
        ("base: &b {x: 1}\nother:\n  <<: *b\n", "p.yaml:3: YAML merge keys ('<<') are not supported"),
        ("a: !!python/object:os.system x\n", "p.yaml:1: YAML tag 'tag:yaml.org,2002:python/object:os.system' is not supported"),
        ("a: !include other.yaml\n", "p.yaml:1: YAML tag '!include' is not supported"),
        ("? [a, b]\n: 1\n", "p.yaml:1: mapping keys must be plain scalars"),
        ("~: 1\n", "p.yaml:1: mapping key '~' must be text"),
    ],
)
def test_refusals_are_reported_with_their_line(text: str, expected: str) -> None:
    _, issues = parse_yaml(text, "p.yaml")
    assert [str(issue) for issue in issues] == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - id: x\n    effect: allow\n   subjects: '*'\n", "p.yaml:4: YAML syntax error: expected <block end>, but found '<block mapping start>'"),
        ("a: [1, 2\n", "p.yaml:2: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
        ("a: 'unterminated\n", "p.yaml:2: YAML syntax error: found unexpected end of stream"),
        ("a: b: c\n", "p.yaml:1: YAML syntax error: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", "p.yaml:2: YAML syntax error: expected a single document in the stream, but found another document"),
        ("\tkey: 1\n", "p.yaml:1: YAML syntax error: found character '\\t' that cannot start any token"),
        ("a: *nowhere\n", "p.yaml:1: YAML syntax error: found undefined alias 'nowhere'"),
    ],
)
def test_syntax_errors_carry_the_line(text: str, expected: str) -> None:
    document, issues = parse_yaml(text, "p.yaml")
    assert document is None
    assert [str(issue) for issue in issues] == [expected]


def test_empty_file_is_an_empty_document() -> None:
    document, issues = parse_yaml("# only a comment\n", "p.yaml")
    assert issues == []
    assert document is not None and document.data is None


def test_alias_bombs_are_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    document, issues = parse_yaml("\n".join(lines) + "\n", "bomb.yaml")
    assert document is None
    assert [str(issue) for issue in issues] == ["bomb.yaml:1: document too large (over 200000 nodes)"]


def test_small_aliases_are_fine() -> None:
    document, issues = parse_yaml("nets: &office [10.0.0.0/8]\nother: *office\n", "p.yaml")
    assert issues == []
    assert document is not None
    assert document.data == {"nets": ["10.0.0.0/8"], "other": ["10.0.0.0/8"]}


# Nesting is refused by counting, never by a RecursionError escaping (or being caught at
# whatever depth the caller's stack happens to be). Policies need about 5 levels; 64 pass.
DEEP = 3000


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("rules: " + "[" * DEEP, 1, id="flow-sequences-unclosed"),
        pytest.param("rules: " + "[" * DEEP + "]" * DEEP + "\n", 1, id="flow-sequences"),
        pytest.param("a: " + "{a: " * DEEP + "}" * DEEP + "\n", 1, id="flow-mappings"),
        pytest.param("- " * DEEP + "x\n", 1, id="block-sequences-one-line"),
        pytest.param("".join(" " * i + "a:\n" for i in range(DEEP)), 65, id="block-mappings-indented"),
        pytest.param("x: 1\n\nrules:\n  - " + "[" * DEEP, 4, id="line-of-the-first-level-too-many"),
    ],
)
def test_deep_nesting_is_an_issue_not_a_crash(text: str, line: int) -> None:
    document, issues = parse_yaml(text, "p.yaml")
    assert document is None
    assert [str(issue) for issue in issues] == [f"p.yaml:{line}: YAML nesting too deep (more than 64 levels)"]


def test_nesting_up_to_the_limit_is_fine() -> None:
    document, issues = parse_yaml("[" * 64 + "]" * 64 + "\n", "p.yaml")
    assert issues == [] and document is not None
    _, issues = parse_yaml("[" * 65 + "]" * 65 + "\n", "p.yaml")
    assert [str(issue) for issue in issues] == ["p.yaml:1: YAML nesting too deep (more than 64 levels)"]


def test_aliases_cannot_build_nesting_past_the_limit() -> None:
    # Each anchored value is 40 deep, within the limit; the alias puts one inside the other.
    text = "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n"
    document, issues = parse_yaml(text, "p.yaml")
    assert document is None
    assert [str(issue) for issue in issues] == ["p.yaml:1: YAML nesting too deep (more than 64 levels)"]


def test_a_recursive_alias_is_an_issue() -> None:
    document, issues = parse_yaml("rules:\n  - &r [x, *r]\n", "p.yaml")
    assert document is None
    assert [str(issue) for issue in issues] == ["p.yaml:2: YAML alias refers to a collection that contains it"]


@pytest.mark.parametrize("digits", [65, 5000])
def test_overlong_integers_are_an_issue_not_a_crash(digits: int) -> None:
    # Python refuses int() of more than 4300 digits with a ValueError; no policy number
    # needs more than a few digits.
    document, issues = parse_yaml(f"a: 1\nsize: {'9' * digits}\n", "p.yaml")
    assert [str(issue) for issue in issues] == [
        "p.yaml:2: number too long (more than 64 digits; quote it if it is text)"
    ]
    document, issues = parse_yaml(f"a: '{'9' * digits}'\n", "p.yaml")
    assert issues == [] and document is not None


def test_overlong_integer_keys_are_an_issue() -> None:
    _, issues = parse_yaml(f"roles:\n  {'1' * 100}: {{}}\n", "p.yaml")
    assert [str(issue) for issue in issues] == [
        "p.yaml:2: number too long (more than 64 digits; quote it if it is text)"
    ]
