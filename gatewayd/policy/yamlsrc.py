"""YAML parsing that remembers where everything came from, for `file:line:` errors.

PyYAML's composer gives a node tree with positions; this module turns it into plain Python
data plus a `SourceMap` from data paths (e.g. ``("rules", 3, "when", "hours")``) to 1-based
line numbers. On the way it refuses what PyYAML would silently accept: duplicate keys (the
last would win and e.g. drop a whole ``rules:`` section), merge keys, custom tags.

Whatever the text, parsing ends in data or in issues, never in another exception: ``policy
check`` must print ``file:line: message`` for a hostile or corrupted file, not a traceback.
So the sizes PyYAML and Python would choke on are bounded here, by counting: nesting depth
(PyYAML's composer recurses once per level, so ``[[[[…`` a few thousand deep would raise
RecursionError), aliases (a recursive alias, or an alias "bomb" that expands enormously) and
the digits of an integer (Python refuses ``int()`` of more than 4300 digits).

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
# The deepest legitimate policy data is 5 levels (rules, a rule, when, networks, a network).
# The limit is checked by counting, before and while recursing, and is far below Python's
# recursion limit: catching RecursionError instead would depend on how deep the caller's
# stack already is, and a RecursionError can surface anywhere (pydantic, the checks).
_MAX_DEPTH = 64
_TOO_DEEP = f"YAML nesting too deep (more than {_MAX_DEPTH} levels)"
# No policy number has more than a handful of digits; this also keeps int() well inside
# Python's own (process-wide, adjustable) limit on digits, so the outcome never depends on it.
_MAX_DIGITS = 64


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


class _RefusedError(Exception):
    """The document cannot be turned into data at all; `line` and `message` say why."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _DepthLimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader whose recursive composer refuses collections nested deeper than
    `_MAX_DEPTH`, with the line of the first collection too many."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # collections being composed around the next node

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth >= _MAX_DEPTH and self.check_event(
            yaml.SequenceStartEvent, yaml.MappingStartEvent
        ):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            raise _RefusedError(event.start_mark.line + 1, _TOO_DEEP)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Converter:
    """Walks a composed node tree into data, lines and issues (one instance per file).

    Aliases make the tree a graph: a shared node is converted once per reference (and counts
    against `_MAX_NODES` each time), a node that contains itself is refused, and nesting built
    from aliases is held to the same `_MAX_DEPTH` as written nesting.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[DataPath, int] = {}
        self.issues: list[PolicyIssue] = []
        self.nodes = 0
        self.open: set[int] = set()  # ids of the collections being converted

    def convert(self, node: yaml.Node, path: DataPath) -> object:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _RefusedError(1, f"document too large (over {_MAX_NODES} nodes)")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if node.tag not in _CORE_TAGS:
            self._issue(node, f"YAML tag {node.tag!r} is not supported")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        line = node.start_mark.line + 1
        if id(node) in self.open:
            raise _RefusedError(line, "YAML alias refers to a collection that contains it")
        if len(path) >= _MAX_DEPTH:  # only reachable through aliases (see the loader)
            raise _RefusedError(line, _TOO_DEEP)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            assert isinstance(node, yaml.SequenceNode)
            return [self.convert(item, (*path, index)) for index, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode) -> object:
        try:
            return _scalar(node)
        except ValueError as exc:
            self._issue(node, str(exc))
            return None

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
            try:
                key = _scalar(key_node)
            except ValueError as exc:
                self._issue(key_node, str(exc))
                continue
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


def _scalar(node: yaml.ScalarNode) -> object:
    """The value of a scalar under the YAML 1.2 core schema (ValueError: number too long)."""
    text = node.value
    if node.style is not None:  # quoted, literal or folded: always a string
        return text
    if text in _CONSTANTS:
        return _CONSTANTS[text]
    if _INT.fullmatch(text):
        if len(text.lstrip("+-")) > _MAX_DIGITS:
            raise ValueError(
                f"number too long (more than {_MAX_DIGITS} digits; quote it if it is text)"
            )
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def parse_yaml(text: str, file: str) -> tuple[YamlDocument | None, list[PolicyIssue]]:
    """Parse one YAML document; syntax errors come back as issues with their line."""
    try:
        node = yaml.compose(text, Loader=_DepthLimitedLoader)
    except _RefusedError as exc:
        return None, [PolicyIssue(file, exc.line, exc.message)]
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
    except _RefusedError as exc:
        return None, [PolicyIssue(file, exc.line, exc.message)]
    return YamlDocument(data, SourceMap(file, converter.lines)), converter.issues
