"""Path safety: every path an executor, a plan or a policy names is checked here before it is used.

A path is safe when it is a relative POSIX path that stays inside the workspace and cannot reach git's
own data. The checks run before any pattern matching, because a pattern cannot be trusted to reject
``../x`` or ``.GIT/hooks/pre-commit``. The ``.git`` checks follow git's own ``verify_path`` hardening
(CVE-2014-9390 and later): case folding, NTFS trailing dots and spaces, alternate data streams, the 8.3
short name ``GIT~1`` and the code points HFS+ ignores.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from conductor.errors import UnsafePath

MAX_PATH_BYTES = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")
# Bidirectional overrides and isolates make a name display differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_relpath(path: str) -> str:
    """Check that ``path`` is a safe workspace-relative path and return its normal form.

    The normal form drops redundant ``./`` components, repeated and trailing slashes
    (``./a//b/`` → ``a/b``).

    Args:
        path: a POSIX relative path such as ``src/app.py``.

    Returns:
        The normalised POSIX relative path.

    Raises:
        UnsafePath: naming the path and the reason: empty, too long, a control character (NUL
            included), a backslash, absolute, a Windows drive letter, not in Unicode NFC form, a ``..``
            component, a ``.git`` component in any disguise, or only ``.`` components.
    """
    reason = _unsafe_reason(path)
    if reason is None:
        normal = "/".join(part for part in path.split("/") if part not in ("", "."))
        if normal:
            return normal
        reason = "names the workspace root itself, not a file"
    raise UnsafePath(f"unsafe path {path!r}: {reason}")


def _unsafe_reason(path: object) -> str | None:
    if not isinstance(path, str):
        return f"not a string ({type(path).__name__})"
    if not path:
        return "empty"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    return _character_reason(path) or _shape_reason(path) or _component_reason(path)


def _character_reason(path: str) -> str | None:
    for char in path:
        if char == "\0":
            return "contains a NUL character"
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in _BIDI_CONTROLS:
            return f"contains the control character U+{ord(char):04X}"
    if "\\" in path:
        return "contains a backslash (use '/' as the separator)"
    return None


def _shape_reason(path: str) -> str | None:
    if path.startswith("/"):
        return "is absolute"
    if _DRIVE.match(path):
        return "starts with a Windows drive letter"
    if unicodedata.normalize("NFC", path) != path:
        return "is not in Unicode NFC form (decomposed characters)"
    return None


def _component_reason(path: str) -> str | None:
    for part in path.split("/"):
        if part == "..":
            return "has a '..' component (escapes the workspace)"
        if is_dotgit(part):
            return f"has a .git component ({part!r}): git's own data is off limits"
    return None


def is_dotgit(name: str) -> bool:
    """Whether a single path component names ``.git`` on some file system.

    Catches ``.GIT``, fullwidth ``．ｇｉｔ`` (NFKC), ``.git.`` and ``.git `` (Windows drops trailing dots
    and spaces), ``.git::$INDEX_ALLOCATION`` (NTFS streams), ``GIT~1`` (8.3 short name) and ``.g\\u200cit``
    (HFS+ ignores zero-width code points).
    """
    folded = unicodedata.normalize("NFKC", name)
    folded = "".join(char for char in folded if unicodedata.category(char) != "Cf")
    folded = folded.casefold().split(":", 1)[0].rstrip(". ")
    return folded in (".git", "git~1")


def resolve_inside(root: Path, relpath: str) -> Path:
    """Resolve ``relpath`` under ``root``, refusing anything whose real location leaves ``root``.

    Every symlink on the way is resolved (parents and the final component, when they exist), so a
    symlinked folder pointing outside ``root`` is caught. The check is done at call time: a caller that
    writes later must not let untrusted code change the tree in between.

    Args:
        root: the workspace folder.
        relpath: a path relative to ``root``; checked with :func:`check_relpath` first.

    Returns:
        The real (fully resolved) absolute path inside ``root``'s real path.

    Raises:
        UnsafePath: ``relpath`` is unsafe, or its real location is outside ``root``.
    """
    normal = check_relpath(relpath)
    real_root = root.resolve()
    try:
        real = (real_root / normal).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UnsafePath(f"unsafe path {relpath!r}: cannot resolve ({exc})") from exc
    if real != real_root and not real.is_relative_to(real_root):
        raise UnsafePath(f"unsafe path {relpath!r}: resolves to {real}, outside {real_root} (symlink)")
    if real == real_root:
        raise UnsafePath(f"unsafe path {relpath!r}: resolves to the workspace root itself (symlink)")
    inside = real.relative_to(real_root).as_posix()
    if any(is_dotgit(part) for part in inside.split("/")):
        raise UnsafePath(f"unsafe path {relpath!r}: resolves to {inside!r}, inside .git (symlink)")
    return real


def check_tree_path(path: str) -> str:
    """Check that ``path`` is a name a workspace snapshot can hold, and return it unchanged.

    Weaker than :func:`check_relpath` on purpose: a snapshot records what is on disk, so ``.git/config``, a
    backslash, a control character or a decomposed name are valid here (policy must see them to reject
    them). What no directory walk can produce is refused: an empty path, a leading ``/``, an empty, ``.``
    or ``..`` component, a NUL.

    Raises:
        UnsafePath: naming the path and the reason.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"unsafe path {path!r}: empty or not a string")
    if "\0" in path:
        raise UnsafePath(f"unsafe path {path!r}: contains a NUL character")
    if path.startswith("/"):
        raise UnsafePath(f"unsafe path {path!r}: is absolute")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise UnsafePath(f"unsafe path {path!r}: has an empty, '.' or '..' component (not a workspace entry)")
    return path


def check_link_target(link: str, target: str) -> str:
    """Check that the symlink ``link`` (workspace-relative) with the target text ``target`` stays inside.

    The target is resolved lexically from the link's folder, as the kernel would if no component on the
    way were itself a symlink (those are snapshot entries of their own, checked in turn).

    Args:
        link: the link's workspace-relative path, e.g. ``docs/latest``.
        target: what ``os.readlink`` returns, e.g. ``../build/html``.

    Returns:
        The workspace-relative path the link points to (``build/html``).

    Raises:
        UnsafePath: the target is empty or absolute, climbs out of the workspace, names the workspace root
            itself, or reaches into ``.git``.
    """
    if not target or "\0" in target:
        raise UnsafePath(f"unsafe symlink {link!r} -> {target!r}: empty target or a NUL character")
    if target.startswith("/"):
        raise UnsafePath(f"unsafe symlink {link!r} -> {target!r}: absolute target (outside the workspace)")
    parts: list[str] = []
    for part in [*link.split("/")[:-1], *target.split("/")]:
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif not parts:
            raise UnsafePath(f"unsafe symlink {link!r} -> {target!r}: climbs out of the workspace")
        else:
            parts.pop()
    if not parts:
        raise UnsafePath(f"unsafe symlink {link!r} -> {target!r}: points to the workspace root itself")
    if any(is_dotgit(part) for part in parts):
        raise UnsafePath(f"unsafe symlink {link!r} -> {target!r}: points into .git")
    return "/".join(parts)
