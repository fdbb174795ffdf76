"""YAML parsing that remembers where everything came from, for `file:line:` errors.

PyYAML's composer gives a node tree with positions; this module turns it into plain Python
data plus a `SourceMap` from data paths (e.g. ``("rules", 3, "when", "hours")``) to 1-based
line numbers. On the way it refuses what PyYAML would silently accept: duplicate keys (the
last would win and e.g. drop a whole ``rules:`` section), merge keys, custom tags.

Scalars follow the YAML 1.2 core schema, not PyYAML's YAML 1.1 default: ``no``, ``on`` and
``off`` are strings, ``07:00`` is a string (not the sexagesimal number 420), and only
``true``/``false`` are booleans.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import yaml

from .errors import PolicyIssue

DataPath = tuple[str | int, ...]

# Plain scalars with a fixed meaning in the YAML 1.2 core schema.
_CONSTANTS: Mapping[str, object] = MappingProxyType({
    "": None, "~": None, "null": None, "Null": None, "NULL": None,
    "true": True, "True": True, "TRUE": True,
    "false": False, "False": False, "FALSE": False,
})  # fmt: skip
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_CORE_TAG_PREFIX = "tag:yaml.org,2002:"
# Tags the composer resolves for plain YAML; anything else (!!python/..., !include) is refused.
_CORE_TAGS = frozenset(
    _CORE_TAG_PREFIX + name
    for name in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")
)
# Aliases can make a small file expand enormously ("billion laughs"); no policy needs this.
_MAX_NODES = 200_000


@dataclass(frozen=True, slots=True)
class SourceMap:
    """Line numbers of a parsed file, by data path."""

    file: str
    lines: Mapping[DataPath, int]

    def line_of(self, path: DataPath) -> int:
        """Line of `path`, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1

    def issue(self, path: DataPath, message: str) -> PolicyIssue:
        return PolicyIssue(self.file, self.line_of(path), message)


@dataclass(frozen=True, slots=True)
class YamlDocument:
    data: object
    source: SourceMap


class _Converter:
    """Walks a composed node tree into data, lines and issues (one instance per file)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[DataPath, int] = {}
        self.issues: list[PolicyIssue] = []
        self.nodes = 0

    def convert(self, node: yaml.Node, path: DataPath) -> object:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _TooLargeError
        self.lines.setdefault(path, node.start_mark.line + 1)
        if node.tag not in _CORE_TAGS:
            self._issue(node, f"YAML tag {node.tag!r} is not supported")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, index)) for index, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return _scalar(node)

    def _mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[object, object]:
        result: dict[object, object] = {}
        first_line: dict[object, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self._issue(key_node, "mapping keys must be plain scalars")
                continue
            if key_node.tag == _CORE_TAG_PREFIX + "merge":
                self._issue(key_node, "YAML merge keys ('<<') are not supported")
                continue
            key = _scalar(key_node)
            if not isinstance(key, (str, int)):
                self._issue(key_node, f"mapping key {key_node.value!r} must be text")
                continue
            if key in first_line:
                self._issue(key_node, f"duplicate key {key!r} (first at line {first_line[key]})")
                continue
            first_line[key] = line
            self.lines[(*path, key)] = line
            result[key] = self.convert(value_node, (*path, key))
        return result

    def _issue(self, node: yaml.Node, message: str) -> None:
        self.issues.append(PolicyIssue(self.file, node.start_mark.line + 1, message))


class _TooLargeError(Exception):
    pass


def _scalar(node: yaml.ScalarNode) -> object:
    text = node.value
    if node.style is not None:  # quoted, literal or folded: always a string
        return text
    if text in _CONSTANTS:
        return _CONSTANTS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def parse_yaml(text: str, file: str) -> tuple[YamlDocument | None, list[PolicyIssue]]:
    """Parse one YAML document; syntax errors come back as issues with their line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and problem.startswith("but "):  # "expected X" is in the context
            problem = f"{exc.context}, {problem}"
        return None, [PolicyIssue(file, line, f"YAML syntax error: {problem}")]
    except yaml.YAMLError as exc:
        return None, [PolicyIssue(file, None, f"YAML error: {exc}")]
    converter = _Converter(file)
    if node is None:
        return YamlDocument(None, SourceMap(file, {(): 1})), []
    try:
        data = converter.convert(node, ())
    except _TooLargeError:
        return None, [PolicyIssue(file, 1, f"document too large (over {_MAX_NODES} nodes)")]
    except RecursionError:
        return None, [PolicyIssue(file, 1, "document nested too deeply")]
    return YamlDocument(data, SourceMap(file, converter.lines)), converter.issues
