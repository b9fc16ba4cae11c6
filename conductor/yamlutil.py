"""Load YAML (and hand-written JSON) mappings into pydantic models with errors that point at lines.

Every error becomes a one-line :class:`ConfigError` naming the file, the dotted key and its line::

    .conductor/policy.yaml:7: file_rules.protected_pattern: unknown key (known: protected_patterns)

The loader is PyYAML's ``SafeLoader`` (no arbitrary objects) with duplicate keys refused, since the
last-one-wins rule of plain PyYAML hides mistakes in policy files. Hostile input is bounded while the
document is composed, before anything expands it: nesting deeper than :data:`MAX_DEPTH` levels (aliases
counted as what they stand for), aliases standing for more than :data:`MAX_ALIAS_NODES` nodes in all (a
"billion laughs" file), an alias used inside its own anchor, and integer literals longer than
:data:`MAX_INT_CHARS` characters are each a ``ConfigError`` naming the line.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from conductor.canonical import MAX_JSON_DEPTH, strict_loads
from conductor.errors import ConfigError, InvalidDocument

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"

MAX_DEPTH = MAX_JSON_DEPTH
"""Deepest nesting of mappings and sequences (a scalar inside 63 collections is at level 64), as for JSON.
Conductor's files nest about 8 levels; the bound keeps PyYAML's recursive composer far from the
interpreter's recursion limit."""
MAX_ALIAS_NODES = 10_000
"""Nodes that all aliases of a document may stand for together, each counted expanded (an alias of a
list of 9 scalars counts 10). Reusing a policy block in a few hundred steps fits; a "billion laughs"
document, whose size is exponential in its aliases, is refused at the alias that crosses the bound."""
MAX_INT_CHARS = 32
"""Longest integer literal: far more than any setting's range, far less than Python's 4,300-digit
limit on ``int()`` (past it PyYAML raises a plain ValueError)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, and bounds nesting, aliases and integer literals.

    The bounds are enforced while composing, so no work is ever proportional to an alias's expansion.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._alias_nodes = 0
        self._composing: set[str] = set()  # anchors whose node is not finished yet
        self._shapes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes expanded, levels)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self._composing:
                raise ComposerError(None, None, f"alias *{event.anchor} is used inside its own anchor "
                                    "(a recursive document)", event.start_mark)
            node: Node = super().compose_node(parent, index)  # 'found undefined alias' comes from here
            self._count_alias(node, event)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._composing.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._composing.discard(anchor)

    def _count_alias(self, node: Node, event: AliasEvent) -> None:
        size, levels = self._shape(node)
        if self._depth + levels > MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels through alias "
                                f"*{event.anchor}", event.start_mark)
        self._alias_nodes += size
        if self._alias_nodes > MAX_ALIAS_NODES:
            raise ComposerError(None, None, f"aliases stand for more than {MAX_ALIAS_NODES} nodes when expanded "
                                f"(at alias *{event.anchor}): refused as an alias bomb", event.start_mark)

    def _shape(self, node: Node) -> tuple[int, int]:
        """Nodes and levels of ``node`` with aliases expanded, memoised: a finished node is within the
        bounds already, so this recursion is at most :data:`MAX_DEPTH` deep."""
        known = self._shapes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, SequenceNode):
            children = list(node.value)
        else:
            children = []
        shapes = [self._shape(child) for child in children]
        shape = (1 + sum(size for size, _ in shapes), 1 + max((levels for _, levels in shapes), default=0))
        self._shapes[id(node)] = shape
        return shape

    def construct_yaml_int(self, node: ScalarNode) -> int:
        if len(node.value) > MAX_INT_CHARS:
            raise ConstructorError(None, None, f"integer literal of {len(node.value)} characters is out of range "
                                   f"(at most {MAX_INT_CHARS})", node.start_mark)
        value: int = super().construct_yaml_int(node)
        return value

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # '<<' merges are meant to be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error reports it
            if first is not None:
                raise ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


# Unquoted timestamps stay strings: every model here stores RFC 3339 text, and a hand-written
# `created_at: 2026-11-22T10:00:00Z` must not turn into a datetime that then fails validation.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass
class Document:
    """A parsed mapping and where its keys were.

    Attributes:
        data: the parsed top-level mapping.
        source: the file name used in error messages.
        lines: 1-based line of every mapping key and sequence item, by key path
            (``("behavior", "max_diff_lines")``).
    """

    data: dict[str, Any]
    source: str
    lines: dict[Loc, int] = field(default_factory=dict)


def display_path(path: Path) -> str:
    """``path`` as people should see it in messages: relative to the current folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


def read_yaml_document(path: Path, *, source: str | None = None) -> Document:
    """Parse a YAML file whose top level is a mapping, recording key lines.

    An empty file (or one holding only comments) is an empty mapping.

    Args:
        path: the YAML file.
        source: the name used in messages; defaults to :func:`display_path`.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, has a syntax error or a duplicate key
            (``<file>:<line>: <problem>``), or its top level is not a mapping.
    """
    source = source or display_path(path)
    text = _read_text(path, source)
    return _parse_yaml(text, source)


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _parse_yaml(text: str, source: str) -> Document:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = {} if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_message(exc, source)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the top level must be a mapping of keys, not {_kind(data)}")
    return Document(data=data, source=source, lines=_key_lines(node))


def _yaml_message(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem:
        problem = f"{problem} ({exc.context})"
    return f"{source}{line}: {problem}"


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"a {type(value).__name__} value"


def _key_lines(node: Node | None, prefix: Loc = ()) -> dict[Loc, int]:
    lines: dict[Loc, int] = {}
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE_TAG:
                loc = (*prefix, key_node.value)
                lines[loc] = key_node.start_mark.line + 1
                lines.update(_key_lines(value_node, loc))
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*prefix, index)))
    return lines


def load_yaml_mapping(path: Path, model: type[M], *, source: str | None = None) -> M:
    """Load a YAML mapping file into ``model``.

    Args:
        path: the YAML file (an empty file is ``{}``).
        model: the pydantic model to validate against.
        source: the file name used in messages; defaults to :func:`display_path`.

    Returns:
        The validated model.

    Raises:
        ConfigError: a syntax error, a duplicate key, or validation errors, one ``file:line: key: problem``
            per error, joined with ``"; "``.
    """
    return validate_document(read_yaml_document(path, source=source), model)


def load_yaml_or_json_mapping(path: Path, model: type[M], *, source: str | None = None) -> M:
    """Load a hand-written mapping file: ``.json`` as strict JSON, anything else as YAML.

    JSON is parsed by :func:`conductor.canonical.strict_loads` (no duplicate keys, no NaN); key lines
    for its validation messages come from a best-effort YAML pass over the same text.

    Raises:
        ConfigError: as :func:`load_yaml_mapping`; invalid JSON too.
    """
    return validate_document(read_mapping_document(path, source=source), model)


def read_mapping_document(path: Path, *, source: str | None = None) -> Document:
    """Parse a hand-written mapping file, ``.json`` as strict JSON and anything else as YAML.

    Raises:
        ConfigError: as :func:`read_yaml_document`; invalid JSON, or JSON whose top level is not an object.
    """
    if path.suffix.lower() != ".json":
        return read_yaml_document(path, source=source)
    source = source or display_path(path)
    text = _read_text(path, source)
    try:
        data = strict_loads(text, source=source)
    except InvalidDocument as exc:
        raise ConfigError(str(exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be an object, not {_kind(data)}")
    return Document(data=data, source=source, lines=_json_lines(text, source))


def _json_lines(text: str, source: str) -> dict[Loc, int]:
    try:
        return _parse_yaml(text, source).lines
    except ConfigError:
        return {}  # valid JSON that YAML 1.1 cannot read (rare): messages go without line numbers


def validate_document(document: Document, model: type[M], *, overrides: Mapping[Loc, str] | None = None) -> M:
    """Validate ``document.data`` against ``model``, turning pydantic errors into one ConfigError.

    Args:
        document: the parsed mapping and its key lines.
        model: the pydantic model.
        overrides: where values that did not come from the file came from, by key path, e.g.
            ``{("planner", "forks"): "CONDUCTOR_PLANNER_FORKS"}``; errors under such a path name it.

    Raises:
        ConfigError: every validation error, one per ``"; "``-separated part.
    """
    try:
        return model.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, document, overrides or {})) from exc


def format_validation_error(
    error: ValidationError, model: type[BaseModel], document: Document, overrides: Mapping[Loc, str]
) -> str:
    """One ``"; "``-joined line describing every error of ``error``: ``file:line: dotted.key: problem``."""
    parts = []
    for item in error.errors():
        loc = _document_loc(document.data, tuple(item["loc"]))
        where = _where(loc, document, overrides)
        key = _dotted(loc)
        problem = _problem(item, model, loc)
        parts.append(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
    return "; ".join(parts)


def _document_loc(data: Any, loc: Loc) -> Loc:
    """Drop the parts of a pydantic loc that are not document keys (union member tags like ``'int'``)."""
    kept: list[str | int] = []
    current = data
    for position, part in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(current, dict) and (part in current or last):
            kept.append(part)
            current = current.get(part)
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            kept.append(part)
            current = current[part]
    return tuple(kept)


def _where(loc: Loc, document: Document, overrides: Mapping[Loc, str]) -> str:
    for prefix_len in range(len(loc), 0, -1):
        if loc[:prefix_len] in overrides:
            return overrides[loc[:prefix_len]]
    for prefix_len in range(len(loc), 0, -1):
        line = document.lines.get(loc[:prefix_len])
        if line is not None:
            return f"{document.source}:{line}"
    return document.source


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _problem(item: Mapping[str, Any], model: type[BaseModel], loc: Loc) -> str:
    if item["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        return f"unknown key (known: {', '.join(known)})" if known else "unknown key"
    if item["type"] == "missing":
        return "required key is missing"
    message = str(item["msg"])
    return message.removeprefix("Value error, ")


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue  # a list index: the item model is already ``current``
        info = current.model_fields.get(str(part)) or _field_by_alias(current, str(part))
        current = _model_in(info.annotation) if info is not None else None
    if current is None:
        return []
    return [info.alias or name for name, info in current.model_fields.items()]


def _field_by_alias(model: type[BaseModel], alias: str) -> Any:
    return next((info for info in model.model_fields.values() if info.alias == alias), None)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``Model``, ``list[Model]`` or ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is None and not isinstance(annotation, types.UnionType):
        return None
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


__all__ = [
    "Document",
    "Loc",
    "display_path",
    "format_validation_error",
    "load_yaml_mapping",
    "load_yaml_or_json_mapping",
    "read_mapping_document",
    "read_yaml_document",
    "validate_document",
]
