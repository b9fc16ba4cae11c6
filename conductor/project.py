"""Create a project (``conductor init``) and load its config and policy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from conductor.config import Config, load_config
from conductor.errors import StateConflict, UnsafePath
from conductor.fsutil import publish_exclusive
from conductor.keys import PUBLIC_KEY_FILE, project_key
from conductor.layout import CONDUCTOR_DIR, ProjectLayout
from conductor.models import PolicyLayer
from conductor.paths import check_relpath
from conductor.policy import load_policy

GITIGNORE = """\
# Conductor's working state: rebuildable or secret, never committed.
git/
scratch/
recordings/
checkouts/
keys/*.key
# Lock files: empty, only held while a process works.
*.lock
"""


@dataclass(frozen=True)
class InitializedProject(ProjectLayout):
    """The layout of a project :func:`init_project` prepared, and what it created.

    Attributes:
        created: paths created by this call, relative to ``root`` (POSIX), in creation order; empty
            when the project was already complete.
    """

    created: tuple[str, ...] = ()


def template_text(name: str) -> str:
    """The text of a packaged template, ``"config.yaml"`` or ``"policy.yaml"``."""
    return resources.files("conductor").joinpath("templates", name).read_text(encoding="utf-8")


def init_project(root: Path, name: str | None = None) -> InitializedProject:
    """Prepare a Conductor project; never overwrites an existing file.

    Creates ``.conductor/`` with ``config.yaml`` and ``policy.yaml`` (from the packaged templates), an
    Ed25519 signing key in ``keys/`` (``signing.key`` mode 0600, ``signing.pub``),
    ``handoff/`` and a ``.gitignore`` that keeps workspaces, scratch copies, objects and private keys out
    of version control. Running it again only adds what is missing.

    Args:
        root: the folder to prepare, or (with ``name``) the folder to create the project in.
        name: a new folder name under ``root``; it may exist only if empty or already a project.

    Returns:
        The project's layout, with ``created`` listing what this call created.

    Raises:
        UnsafePath: ``name`` is not a single safe folder name.
        StateConflict: ``root/name`` exists and is a file, or a non-empty folder that is not a project.
        OSError: the folders or files cannot be created.
    """
    project = root / _folder_name(name) if name is not None else root
    _check_target(project, strict=name is not None)
    layout = ProjectLayout(project)
    created: list[str] = []
    for folder in (project, layout.conductor_dir, layout.handoff_dir):
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            created.append(_relative(folder, project))
    files = {
        layout.config_file: template_text("config.yaml"),
        layout.policy_file: template_text("policy.yaml"),
        layout.conductor_dir / ".gitignore": GITIGNORE,
    }
    for path, text in files.items():
        if _create(path, text):
            created.append(_relative(path, project))
    had_public = (layout.keys_dir / PUBLIC_KEY_FILE).exists()
    project_key(layout.keys_dir, layout.conductor_dir)  # made outside the project, or moved out of it
    if not had_public:
        created.append(_relative(layout.keys_dir / PUBLIC_KEY_FILE, project))
    return InitializedProject(root=project, created=tuple(c for c in created if c != "."))


def _folder_name(name: str) -> str:
    normal = check_relpath(name)
    if "/" in normal or normal == CONDUCTOR_DIR:
        raise UnsafePath(f"unsafe project name {name!r}: must be a single folder name")
    return normal


def _check_target(project: Path, *, strict: bool) -> None:
    if project.exists() and not project.is_dir():
        raise StateConflict(f"{project} exists and is not a folder")
    if (project / CONDUCTOR_DIR).exists() and not (project / CONDUCTOR_DIR).is_dir():
        raise StateConflict(f"{project / CONDUCTOR_DIR} exists and is not a folder")
    if strict and project.is_dir() and not (project / CONDUCTOR_DIR).is_dir() and any(project.iterdir()):
        raise StateConflict(
            f"{project} already exists and is not empty; choose another name or run init inside it"
        )


def _create(path: Path, text: str) -> bool:
    try:
        publish_exclusive(path, text.encode("utf-8"))
    except FileExistsError:
        return False  # someone's edited file: keep it
    return True


def _relative(path: Path, project: Path) -> str:
    return path.relative_to(project).as_posix()


def load_project(
    layout: ProjectLayout, environ: Mapping[str, str] = os.environ
) -> tuple[Config, PolicyLayer]:
    """Load a project's ``config.yaml`` (with environment overrides) and ``policy.yaml``.

    Missing files mean defaults.

    Raises:
        ConfigError: either file is invalid (naming the file, key and line).
    """
    return load_config(layout.config_file, environ), load_policy(layout.policy_file)
