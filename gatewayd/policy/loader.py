"""Load a policy directory: read, parse, validate, check, compile — or report every problem.

`load_policy(Path("policies"))` reads every ``*.yaml``/``*.yml`` file directly in the
directory (suffix in any case; sorted by name; hidden entries such as editor lock files and
``.git`` are skipped), parses each with line numbers, validates it against the pydantic
schema, runs the whole-policy checks and compiles the result. If anything is wrong it raises
one `PolicyError` listing all problems as ``file:line: message``; it never returns a partial
policy.

Every other visible entry except a README is an error, not skipped: an operator who puts a
file into the policy directory expects it to count, and a file that silently does not — a
guard-rail file saved as ``.yaml.bak`` or ``.txt`` — drops its deny rules (fail open).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pydantic_core import ErrorDetails

from .check import LoadedFile, check_policy
from .compiler import compile_policy
from .errors import PolicyError, PolicyIssue
from .model import Policy
from .schema import SchemaError, known_keys, validate_file
from .yamlsrc import DataPath, YamlDocument, parse_yaml

POLICY_SUFFIXES = (".yaml", ".yml")  # compared in lower case: '.YAML' is a policy file too
# Visible entries that may sit in a policy directory without being policy files.
NOT_POLICY_FILES = frozenset({"README", "README.md"})
_STRAY_FILE = "not a policy file: rename it to *.yaml or move it out"
_STRAY_DIRECTORY = (
    "not a policy file: a directory (only files directly in the policy directory are read); "
    "move it out"
)


@dataclass(frozen=True, slots=True)
class DirectoryListing:
    """A policy directory's visible entries: policy files in policy order, and the rest
    (other than a README), which are errors."""

    policy_files: tuple[Path, ...]
    strays: tuple[Path, ...]


def list_directory(directory: Path) -> DirectoryListing:
    """Sort the entries of a policy directory (raises OSError if it cannot be listed).

    Every visible ``*.yaml``/``*.yml`` entry, in any case, is a policy file, even one that
    is not a readable regular file: a guard-rail file that became a dangling symlink or a
    directory must be an error when read, not skipped — skipping it would drop its deny
    rules (fail open). Hidden entries are skipped; anything else but a README is a stray.
    """
    files: list[Path] = []
    strays: list[Path] = []
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() in POLICY_SUFFIXES:
            files.append(entry)
        elif entry.name not in NOT_POLICY_FILES:
            strays.append(entry)
    return DirectoryListing(tuple(sorted(files)), tuple(sorted(strays)))


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, in policy order (raises OSError if unreadable)."""
    return list(list_directory(directory).policy_files)


def _stray_issue(entry: Path) -> PolicyIssue:
    return PolicyIssue(str(entry), None, _STRAY_DIRECTORY if entry.is_dir() else _STRAY_FILE)


def load_policy(directory: Path) -> Policy:
    """Load and compile the policy in `directory`; raise `PolicyError` listing all problems."""
    directory = Path(directory)  # tolerate a str from callers outside the typed world
    try:
        listing = list_directory(directory)
    except OSError as exc:
        reason = f"cannot read policy directory: {exc.strerror or exc}"
        raise PolicyError([PolicyIssue(str(directory), None, reason)]) from None
    issues = [_stray_issue(entry) for entry in listing.strays]
    if not listing.policy_files:
        empty = PolicyIssue(str(directory), None, "no policy files (*.yaml, *.yml) in directory")
        raise PolicyError([*issues, empty])
    texts: dict[str, str] = {}
    for path in listing.policy_files:
        try:
            texts[str(path)] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            issues.append(PolicyIssue(str(path), None, f"not valid UTF-8 ({exc.reason})"))
        except OSError as exc:
            issues.append(PolicyIssue(str(path), None, f"cannot read: {exc.strerror or exc}"))
    try:
        policy = load_policy_texts(texts)
    except PolicyError as exc:
        raise PolicyError([*issues, *exc.errors]) from None
    if issues:
        raise PolicyError(issues)
    return policy


def load_policy_texts(texts: Mapping[str, str]) -> Policy:
    """Load a policy from file names and YAML texts, in the given order (for tests, tools)."""
    loaded: list[LoadedFile] = []
    issues: list[PolicyIssue] = []
    for file, text in texts.items():
        document, yaml_issues = parse_yaml(text, file)
        issues += yaml_issues
        if document is None:
            continue
        validated = validate_file(document.data)
        for error in validated.errors:
            issues += schema_issues(error, document)
        loaded.append(LoadedFile(document.source, validated))
    issues += check_policy(loaded)
    if issues:
        raise PolicyError(issues)
    return compile_policy(loaded)


def schema_issues(error: SchemaError, document: YamlDocument) -> list[PolicyIssue]:
    """pydantic errors as `file:line: where: what`, deduplicated, lines from the YAML."""
    issues: dict[tuple[int, str], PolicyIssue] = {}
    for detail in error.error.errors():
        path = _data_path(document.data, (*error.at, *detail["loc"]))
        where, what = _describe(detail, path, document.data)
        message = f"{where}: {what}" if where else what
        line = document.source.line_of(path)
        issues.setdefault((line, message), PolicyIssue(document.source.file, line, message))
    return list(issues.values())


def _data_path(data: object, loc: tuple[int | str, ...]) -> DataPath:
    """The part of a pydantic location that exists in the data (drops union tags and the
    names of missing keys)."""
    path: list[str | int] = []
    node = data
    for element in loc:
        in_dict = isinstance(node, dict) and element in node
        in_list = isinstance(node, list) and isinstance(element, int) and 0 <= element < len(node)
        if in_dict or in_list:
            node = node[element]  # type: ignore[index]  # checked just above
            path.append(element)
    return tuple(path)


def _ctx(detail: ErrorDetails, key: str) -> object:
    return detail.get("ctx", {}).get(key)


def _generic_message(detail: ErrorDetails) -> str:
    message = detail["msg"].replace("Input should be", "must be")
    value = detail.get("input")
    if isinstance(value, (str, int, float, bool)) and len(repr(value)) <= 40:
        message += f" (got {value!r})"
    return message


# pydantic error type -> the sentence an administrator reads (anything else: pydantic's own).
_MESSAGES: Mapping[str, Callable[[ErrorDetails], str]] = MappingProxyType({
    "missing": lambda d: f"missing required key {d['loc'][-1]!r}",
    "union_tag_not_found": lambda d: "missing required key 'kind' (http or tcp)",
    "union_tag_invalid": lambda d: f"kind must be 'http' or 'tcp', not {_ctx(d, 'tag')!r}",
    "value_error": lambda d: str(_ctx(d, "error") or d["msg"]),
    "too_short": lambda d: "must not be empty (omit the key to mean 'any')",
})  # fmt: skip


def _describe(detail: ErrorDetails, path: DataPath, data: object) -> tuple[str, str]:
    """(where, what) for one pydantic error."""
    kind = detail["type"]
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else str(detail["loc"][-1])
        return _where(path[:-1], data), f"unknown key {key!r}{_did_you_mean(key)}"
    if not path and kind in ("model_type", "dict_type"):
        return "", "a policy file must be a mapping with keys timezone, roles, services, rules"
    return _where(path, data), _MESSAGES.get(kind, _generic_message)(detail)


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(known_keys()), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _where(path: Sequence[str | int], data: object) -> str:
    """'rule \\'staff-files\\': when.hours', 'role \\'staff\\'', 'services.files.kind' ..."""
    if not path:
        return ""
    head = ""
    rest = list(path)
    if len(path) >= 2 and path[0] in ("rules", "roles", "services"):
        head = _named_head(path[0], path[1], data)
        rest = list(path[2:])
    tail = ""
    for element in rest:
        tail += f"[{element}]" if isinstance(element, int) else f".{element}"
    tail = tail.lstrip(".")
    return f"{head}: {tail}" if head and tail else head or tail


def _named_head(section: str | int, key: str | int, data: object) -> str:
    if section == "rules":
        rules = data.get("rules") if isinstance(data, dict) else None
        rule = rules[key] if isinstance(rules, list) and isinstance(key, int) else None
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        return f"rule {rule_id!r}" if isinstance(rule_id, str) else f"rules[{key}]"
    return f"{'role' if section == 'roles' else 'service'} {key!r}"
