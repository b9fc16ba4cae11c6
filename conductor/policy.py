"""Policy: load ``policy.yaml``, merge layers tighten-only, and judge a set of file changes.

Layers are merged in order (project → plan → step). The first layer is authoritative; a later layer —
which an LLM may have written — can only tighten it: constraints and protected patterns accumulate,
numeric limits take the smaller value, and anything looser is ignored with a note saying so.

Pattern semantics (gitignore syntax, via pathspec's ``GitIgnoreSpec``):

* ``protected_patterns`` are unanchored like ``.gitignore`` lines (``*.lock`` matches at any depth).
  They are matched case-insensitively too, so ``A.LOCK`` cannot slip past ``*.lock`` on a
  case-insensitive file system, and in Unicode NFC form, so a pattern typed decomposed (``e`` + U+0301)
  protects the composed name (U+00E9). Paths themselves must be NFC (``check_relpath`` refuses others).
* ``allowed_files`` entries are anchored at the workspace root: ``hello.py`` is that file only,
  ``docs/`` is everything below ``docs``, ``src/**/*.py`` is a glob.

Every path is checked with :func:`conductor.paths.check_relpath` before any pattern sees it.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pathspec import GitIgnoreSpec

from conductor.canonical import digest
from conductor.errors import ConfigError, UnsafePath
from conductor.models import Check, EffectivePolicy, FileChange, PolicyLayer, SandboxMode
from conductor.sandbox import stricter
from conductor.paths import check_link_target, check_relpath
from conductor.yamlutil import read_yaml_document, validate_document

DEFAULT_MAX_DIFF_LINES = 500
DEFAULT_TIMEOUT_SECONDS = 300
DEFAULT_MAX_DIFF_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_SOURCE = "default"
CONFIG_SOURCE = "config"
_LIMIT_DEFAULTS = {"max_diff_lines": DEFAULT_MAX_DIFF_LINES, "timeout_seconds": DEFAULT_TIMEOUT_SECONDS,
                   "max_diff_bytes": DEFAULT_MAX_DIFF_BYTES, "max_attempts": DEFAULT_MAX_ATTEMPTS}


def load_policy(path: Path) -> PolicyLayer:
    """Load a policy file (``.conductor/policy.yaml``).

    Args:
        path: the YAML file; a missing file is an empty layer (every value from the defaults).

    Raises:
        ConfigError: a YAML error, an unknown key or a bad value, naming the file, key and line; or a
            protected pattern that is not valid gitignore syntax.
    """
    if not path.exists():
        return PolicyLayer()
    document = read_yaml_document(path)
    layer = validate_document(document, PolicyLayer)
    for index, pattern in enumerate(layer.file_rules.protected_patterns):
        line = document.lines.get(("file_rules", "protected_patterns", index))
        where = f"{document.source}:{line}" if line else document.source
        _compile([pattern], f"{where}: file_rules.protected_patterns[{index}]")
    return layer


# --- merge --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergedPolicy:
    """The effective policy and where each part of it came from.

    Attributes:
        effective: the merged values a step runs under.
        sources: layer name of each value: ``"max_diff_lines"`` and ``"timeout_seconds"`` map to a layer
            name or ``"default"``; ``"global_constraints[i]"`` and ``"protected_patterns[i]"`` to the
            layer that added item ``i``.
        notes: one line per ignored request, e.g. a plan asking for a looser limit.
    """

    effective: EffectivePolicy
    sources: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """``"sha256:<hex>"`` over the canonical form of the effective policy (recorded in tasks)."""
        return digest(self.effective.to_document())

    def source_of_pattern(self, index: int) -> str:
        """The layer that added protected pattern ``index``."""
        return self.sources.get(f"protected_patterns[{index}]", DEFAULT_SOURCE)


def merge_policies(
    layers: Sequence[tuple[str, PolicyLayer]], *, defaults: Mapping[str, int] | None = None
) -> MergedPolicy:
    """Merge policy layers tighten-only, first layer authoritative.

    Args:
        layers: ``(name, layer)`` pairs in order, e.g. ``[("project", p), ("plan", q), ("step", r)]``.
        defaults: limits that replace the built-in defaults when no layer sets them, with source
            ``"config"``: the engine passes ``{"max_attempts": executor.max_attempts}`` (config.yaml).

    Returns:
        The merged policy. Limits no layer sets come from the defaults (500 diff lines, 300 seconds).
        A later layer's negated protected pattern (``!x``), which would unprotect files, is ignored.

    Raises:
        ConfigError: a protected pattern is not valid gitignore syntax (naming the layer).
    """
    sources: dict[str, str] = {}
    notes: list[str] = []
    constraints: list[str] = []
    patterns: list[str] = []
    for position, (name, layer) in enumerate(layers):
        for constraint in layer.global_constraints:
            _add(constraints, constraint, f"global_constraints[{len(constraints)}]", name, sources)
        for pattern in layer.file_rules.protected_patterns:
            if pattern not in patterns and _pattern_allowed(pattern, position, name, notes):
                _add(patterns, pattern, f"protected_patterns[{len(patterns)}]", name, sources)
    limits = {limit: _tightest(limit, layers, sources, notes, defaults or {}) for limit in _LIMIT_DEFAULTS}
    mode, network = _sandbox(layers, sources, notes)
    effective = EffectivePolicy(global_constraints=constraints, protected_patterns=patterns, **limits,
                                sandbox_mode=mode, network=network)
    return MergedPolicy(effective=effective, sources=sources, notes=notes)


def _sandbox(layers: Sequence[tuple[str, PolicyLayer]], sources: dict[str, str], notes: list[str]) -> tuple[SandboxMode, bool]:
    """``sandbox.mode`` takes the strictest (required > auto > off), ``sandbox.network`` stays off once any
    layer turns it off; only the first (project) layer may loosen the defaults (auto, no network)."""
    mode: SandboxMode = "auto"
    network, mode_source, network_source = False, DEFAULT_SOURCE, DEFAULT_SOURCE
    for position, (name, layer) in enumerate(layers):
        asked_mode, asked_network = layer.sandbox.mode, layer.sandbox.network
        if asked_mode is not None:
            if position == 0 or stricter(asked_mode, mode) == asked_mode != mode:
                mode, mode_source = asked_mode, name
            elif asked_mode != mode:
                notes.append(f"{name} asked sandbox.mode={asked_mode}, looser than {mode} from {mode_source}: ignored")
        if asked_network is not None:
            if position == 0 or (network and not asked_network):
                network, network_source = asked_network, name
            elif asked_network and not network:
                notes.append(f"{name} asked sandbox.network=true, looser than false from {network_source}: ignored")
    sources["sandbox.mode"], sources["sandbox.network"] = mode_source, network_source
    return mode, network


def _add(items: list[str], item: str, key: str, layer: str, sources: dict[str, str]) -> None:
    if item not in items:  # keep the first-seen position and the layer that said it first
        sources[key] = layer
        items.append(item)


def _pattern_allowed(pattern: str, position: int, layer: str, notes: list[str]) -> bool:
    if not pattern.strip() or pattern.startswith("#"):
        notes.append(f"{layer} protected pattern {pattern!r} matches nothing (blank or a comment): ignored")
        return False
    if pattern.startswith("!") and position > 0:
        notes.append(f"{layer} asked protected pattern {pattern!r}, which would unprotect files: ignored")
        return False
    _compile([pattern], f"{layer} policy: file_rules.protected_patterns")
    return True


def _tightest(
    name: str, layers: Sequence[tuple[str, PolicyLayer]], sources: dict[str, str], notes: list[str],
    defaults: Mapping[str, int],
) -> int:
    value, source = (defaults[name], CONFIG_SOURCE) if name in defaults else (_LIMIT_DEFAULTS[name], DEFAULT_SOURCE)
    for position, (layer_name, layer) in enumerate(layers):
        asked = getattr(layer.behavior, name)
        if asked is None:
            continue
        if position == 0 or asked < value:
            value, source = asked, layer_name
        elif asked > value:
            notes.append(
                f"{layer_name} asked behavior.{name}={asked}, looser than {value} from {source}: ignored"
            )
    sources[name] = source
    return value


def _compile(patterns: Sequence[str], where: str) -> GitIgnoreSpec:
    try:
        return GitIgnoreSpec.from_lines(patterns)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: invalid gitignore pattern: {exc}") from exc


# --- allowed files ------------------------------------------------------------------------------


def validate_allowed_files(entries: Sequence[str]) -> list[str]:
    """Check ``allowed_files`` entries with the path rules and return them normalised.

    A trailing ``/`` (meaning "everything below") is kept; duplicates are dropped.

    Raises:
        UnsafePath: an entry is empty, absolute, has ``..``, a ``.git`` component, a backslash, a control
            character, or a part that starts or ends with whitespace (gitignore syntax drops trailing
            spaces and a file name almost never has them, so such an entry could never match).
    """
    normal: list[str] = []
    for entry in entries:
        checked = check_relpath(entry) + ("/" if entry.endswith("/") else "")
        if any(part != part.strip() for part in entry.split("/")):
            raise UnsafePath(f"unsafe path {entry!r}: starts or ends a part with whitespace, which an "
                             "allowed_files entry may not (a stray space would never match the file meant)")
        if checked not in normal:
            normal.append(checked)
    return normal


def _allowed_spec(entries: Sequence[str]) -> GitIgnoreSpec:
    # A leading '/' anchors a gitignore pattern at the root, and makes '!' and '#' literal.
    return _compile(["/" + entry for entry in entries], "allowed_files")


def matches_allowed(path: str, allowed_files: Sequence[str]) -> bool:
    """Whether ``path`` is covered by ``allowed_files`` (root-anchored gitignore-style entries).

    Args:
        path: a workspace-relative path; an unsafe one is never allowed.
        allowed_files: entries such as ``hello.py``, ``docs/`` or ``src/**/*.py``.

    Raises:
        UnsafePath: an ``allowed_files`` entry is unsafe (see :func:`validate_allowed_files`).
    """
    spec = _allowed_spec(validate_allowed_files(allowed_files))
    try:
        return spec.match_file(check_relpath(path))
    except UnsafePath:
        return False


# --- evaluate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyDecision:
    """Whether a set of changes passes the policy.

    Attributes:
        allowed: True when no check failed.
        reasons: one line per violation, e.g. ``"a.lock: matches protected pattern '*.lock' (project)"``.
        checks: ``paths_safe``, ``within_allowed_files``, ``outside_protected_patterns``, ``diff_size``.
    """

    allowed: bool
    reasons: list[str]
    checks: list[Check]


def evaluate_changes(
    merged: MergedPolicy, allowed_files: Sequence[str], changes: Sequence[FileChange],
    symlinks: Mapping[str, str] | None = None,
) -> PolicyDecision:
    """Judge ``changes`` against the merged policy and the step's allowed files.

    Unsafe paths (``../x``, ``.git/hooks/pre-commit``, NUL, …) are violations, not exceptions, and are
    not matched against any pattern. An unsafe ``allowed_files`` entry is a violation too. Deleting a
    file counts as changing it.

    Args:
        merged: the step's merged policy.
        allowed_files: root-anchored gitignore-style entries from the step.
        changes: the changes actually found in the workspace (ground truth, not the executor's claim).
        symlinks: every symlink of the tree after the change (path → target text). A protected path is
            protected under every name a symlink gives it: a symlink named like a protected folder, one
            pointing at a protected path, and a change reached through a symlink all count.

    Returns:
        The decision; an empty change list is allowed.
    """
    safe, unsafe_reasons = _safe_paths(changes)
    allowed_reasons = _outside_allowed(safe, allowed_files)
    protected_reasons = _protected(merged, safe)
    protected_reasons += [r for r in _protected_through_links(merged, safe, symlinks or {}) if r not in protected_reasons]
    size_reasons, size_detail = _diff_size(merged, changes)
    pattern_count = len(merged.effective.protected_patterns)
    checks = [
        _check("paths_safe", unsafe_reasons, f"{len(changes)} path(s) checked"),
        _check("within_allowed_files", allowed_reasons, f"allowed: {', '.join(allowed_files) or '(none)'}"),
        _check("outside_protected_patterns", protected_reasons, f"{pattern_count} pattern(s)"),
        _check("diff_size", size_reasons, size_detail),
    ]
    reasons = unsafe_reasons + allowed_reasons + protected_reasons + size_reasons
    return PolicyDecision(allowed=not reasons, reasons=reasons, checks=checks)


def _check(name: str, reasons: list[str], detail: str) -> Check:
    return Check(name=name, passed=not reasons, detail="; ".join(reasons) if reasons else detail)


def _safe_paths(changes: Sequence[FileChange]) -> tuple[list[str], list[str]]:
    safe: list[str] = []
    reasons: list[str] = []
    for change in changes:
        try:
            safe.append(check_relpath(change.path))
        except UnsafePath as exc:
            reasons.append(str(exc))
    return safe, reasons


def _outside_allowed(paths: list[str], allowed_files: Sequence[str]) -> list[str]:
    reasons: list[str] = []
    entries: list[str] = []
    for entry in allowed_files:
        try:
            entries.extend(validate_allowed_files([entry]))
        except UnsafePath as exc:
            reasons.append(f"allowed_files: {exc}")
    spec = _allowed_spec(entries)
    reasons += [f"{path}: outside allowed_files" for path in paths if not spec.match_file(path)]
    return reasons


def _protected(merged: MergedPolicy, paths: list[str]) -> list[str]:
    patterns = merged.effective.protected_patterns
    reasons = []
    for path in paths:
        index = protected_index(path, patterns)
        if index is not None:
            source = merged.source_of_pattern(index)
            reasons.append(f"{path}: matches protected pattern {patterns[index]!r} ({source})")
    return reasons


def _protected_through_links(merged: MergedPolicy, paths: list[str], symlinks: Mapping[str, str]) -> list[str]:
    patterns = merged.effective.protected_patterns
    resolved: dict[str, str] = {}
    for link, target in symlinks.items():
        try:
            resolved[link] = check_link_target(link, target)
        except UnsafePath:
            continue  # an unsafe link is refused on its own (unsafe_symlink)
    reasons = []

    def judge(path: str, name: str, why: str) -> None:
        for candidate in (name, name + "/"):
            index = protected_index(candidate, patterns)
            if index is not None:
                reasons.append(f"{path}: {why} {name!r}, which matches protected pattern {patterns[index]!r} "
                               f"({merged.source_of_pattern(index)})")
                return

    for path in paths:
        if path in resolved:  # the link itself: its name may stand for a folder, its target is reached
            judge(path, path, "a symlink named")
            judge(path, resolved[path], "a symlink to")
        for link, target in resolved.items():
            if path.startswith(target + "/"):
                judge(path, link + path[len(target):], "also reachable as")
    return reasons


def protected_index(path: str, patterns: Sequence[str]) -> int | None:
    """The index of the protected pattern that protects ``path``, or None if none does.

    gitignore semantics: the last matching pattern decides, so a ``!x`` after ``*.lock`` unprotects ``x``.
    Matching is done as written and again case-folded; a match either way protects the path.

    Args:
        path: a path already normalised by :func:`conductor.paths.check_relpath`.
        patterns: unanchored gitignore-style patterns.
    """
    indexed, exact, folded = _protected_specs(tuple(patterns))
    for spec, candidate in ((exact, path), (folded, path.casefold())):
        result = spec.check_file(candidate)
        if result.include and result.index is not None:
            return indexed[result.index]
    return None


@functools.lru_cache(maxsize=64)
def _protected_specs(patterns: tuple[str, ...]) -> tuple[list[int], GitIgnoreSpec, GitIgnoreSpec]:
    # pathspec skips empty lines, so keep a map from its pattern index back to ours.
    indexed = [index for index, pattern in enumerate(patterns) if pattern]
    # Paths reaching here are NFC (check_relpath); a pattern written decomposed must protect them too.
    kept = [unicodedata.normalize("NFC", patterns[index]) for index in indexed]
    exact = _compile(kept, "protected_patterns")
    folded = _compile([pattern.casefold() for pattern in kept], "protected_patterns")
    return indexed, exact, folded


def matches_protected(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` is protected by ``patterns``; an unsafe path counts as protected.

    Raises:
        ConfigError: a pattern is not valid gitignore syntax.
    """
    try:
        normal = check_relpath(path)
    except UnsafePath:
        return True
    return protected_index(normal, patterns) is not None


def _diff_size(merged: MergedPolicy, changes: Sequence[FileChange]) -> tuple[list[str], str]:
    # Lines alone miss one 15 MB line or a 20 MB binary: new content is also counted in bytes.
    total = sum(change.lines_added + change.lines_removed for change in changes)
    size = sum(change.size or 0 for change in changes if change.change != "deleted")
    limit, byte_limit = merged.effective.max_diff_lines, merged.effective.max_diff_bytes
    source = merged.sources.get("max_diff_lines", DEFAULT_SOURCE)
    byte_source = merged.sources.get("max_diff_bytes", DEFAULT_SOURCE)
    detail = f"{total} line(s) changed, limit {limit} ({source}); {size} byte(s) of new content, limit {byte_limit}"
    reasons = []
    if total > limit:
        reasons.append(f"diff of {total} lines (added + removed) exceeds max_diff_lines {limit} ({source})")
    if size > byte_limit:
        reasons.append(f"{size} bytes of new content exceed max_diff_bytes {byte_limit} ({byte_source})")
    return reasons, detail
