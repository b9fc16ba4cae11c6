"""The sandbox every process Conductor launches for a step runs in: writes only in its workspace and a
private temp folder, secrets hidden, no network unless the policy allows it.

On Linux this is bubblewrap (``bwrap``), as the Codex CLI and Anthropic's sandbox runtime use it: the
whole file system is mounted read-only (``--ro-bind / /``, which binds root too), the workspace and a
private temp folder are bound writable on top, folders holding secrets are replaced by empty ``tmpfs``
mounts and secret files by ``/dev/null``, and the network namespace is unshared (only a loopback of its
own). ``--unshare-pid`` and ``--die-with-parent`` make sure nothing the command starts outlives it:
killing the sandbox's process group ends its whole pid namespace.

Modes (``sandbox.mode`` in policy.yaml, tighten-only: ``required`` > ``auto`` > ``off``):

- ``required``: no sandbox available is an error (:class:`SandboxUnavailable`, exit 13) before anything
  runs;
- ``auto``: sandboxed where possible, otherwise the command runs unsandboxed and the run records
  ``sandboxed: false``;
- ``off``: never sandboxed.

Elsewhere (macOS, Windows) there is no sandbox yet: ``auto`` runs unsandboxed, ``required`` refuses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from conductor.errors import SandboxUnavailable

SandboxMode = Literal["required", "auto", "off"]
MODE_ORDER: dict[str, int] = {"off": 0, "auto": 1, "required": 2}

# Credentials a command never needs to read: hidden when they exist (relative to the home folder).
HOME_SECRETS = (".ssh", ".gnupg", ".aws", ".azure", ".config/gcloud", ".kube", ".docker", ".netrc",
                ".git-credentials", ".npmrc", ".pypirc", ".config/gh", ".config/conductor")


@dataclass(frozen=True)
class SandboxSpec:
    """What one launched command may do.

    Attributes:
        writable: folders the command may write (its workspace); everything else is read-only.
        hidden: files and folders whose content the command must not read (keys); folders become empty,
            files read as empty.
        network: whether it may open connections beyond its own loopback.
        mode: see the module docstring.
    """

    writable: tuple[Path, ...]
    hidden: tuple[Path, ...] = ()
    network: bool = False
    mode: SandboxMode = "auto"
    home: Path | None = field(default_factory=lambda: Path(os.path.expanduser("~")))


@dataclass(frozen=True)
class Wrapped:
    """A command line ready to run: ``argv`` (the sandbox's, or the command's own) and whether it is
    sandboxed; ``reason`` says why not."""

    argv: list[str]
    sandboxed: bool
    reason: str = ""

    @property
    def dies_with_starter(self) -> bool:
        """Whether every process of the command dies with the process that starts it: bubblewrap puts them
        in a pid namespace of their own (``--unshare-pid``) whose init dies with its parent
        (``--die-with-parent``), and the kernel then kills the rest."""
        if not self.sandboxed or "--" not in self.argv:
            return False
        return {"--unshare-pid", "--die-with-parent"} <= set(self.argv[: self.argv.index("--")])

    def describe(self, spec: SandboxSpec) -> str:
        """One line for an explanation or an error message."""
        if not self.sandboxed:
            return f"not sandboxed ({self.reason})"
        net = "network allowed" if spec.network else "no network"
        return f"sandboxed by bubblewrap: writes only in {', '.join(str(p) for p in spec.writable)}; {net}"


@cache
def _bwrap() -> str | None:
    """The path of ``bwrap`` on ``PATH`` (looked up once per process, as :func:`availability` is)."""
    return shutil.which("bwrap")


@cache
def availability() -> str | None:
    """None when bubblewrap works here, else why not (checked once per process)."""
    if not sys.platform.startswith("linux"):
        return f"no sandbox on {sys.platform} yet"
    _bwrap.cache_clear()  # looked up again whenever availability is (a test may change PATH)
    bwrap = _bwrap()
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-net", "--unshare-pid",
                            "--die-with-parent", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"bubblewrap cannot create namespaces here: {probe.stderr.strip()[:300]}"
    return None


@cache
def reports_status() -> bool:
    """Whether this bwrap has ``--json-status-fd`` (bubblewrap >= 0.3), through which
    ``conductor.proc`` learns the pid of the sandbox's namespace init (checked once per process)."""
    bwrap = _bwrap()
    if bwrap is None:
        return False
    try:
        helped = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--json-status-fd" in helped.stdout + helped.stderr


def require(mode: SandboxMode) -> None:
    """Fail early when ``mode`` is ``required`` and no sandbox is available.

    Raises:
        SandboxUnavailable: naming why.
    """
    if mode == "required" and (why := availability()) is not None:
        raise SandboxUnavailable(f"sandbox.mode is required but {why}")


def wrap(argv: Sequence[str], spec: SandboxSpec, *, cwd: Path) -> Wrapped:
    """The command line that runs ``argv`` in ``cwd`` inside the sandbox ``spec`` asks for.

    Raises:
        SandboxUnavailable: ``spec.mode`` is ``required`` and no sandbox is available.
    """
    if spec.mode == "off":
        return Wrapped(list(argv), False, "sandbox.mode is off")
    why = availability()
    if why is not None:
        require(spec.mode)
        return Wrapped(list(argv), False, why)
    args = [_bwrap() or "bwrap", "--new-session", "--die-with-parent", "--unshare-pid",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if not spec.network:
        args.append("--unshare-net")
    for path in _secrets(spec):
        args += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", os.devnull, str(path)]
    for path in spec.writable:
        args += ["--bind", str(path), str(path)]
    args += ["--chdir", str(cwd), "--", *argv]
    return Wrapped(args, True)


def _secrets(spec: SandboxSpec) -> list[Path]:
    # Hidden before writable: a writable folder inside a hidden one is bound after it and stays visible.
    found = [p for p in spec.hidden if p.exists()]
    if spec.home is not None:
        found += [spec.home / name for name in HOME_SECRETS if (spec.home / name).exists()]
    return found


def for_step(*, writable: Sequence[Path], keys_dir: Path, environ: Mapping[str, str], mode: SandboxMode,
             network: bool) -> SandboxSpec:
    """The sandbox of a step's command or verification command: writes only in ``writable``; Conductor's
    keys hidden (``keys_dir`` and any ``CONDUCTOR_SIGNING_KEY_FILE``) with the usual credentials of the
    home folder of ``environ``; network as the policy says."""
    hidden = [keys_dir]
    if environ.get("CONDUCTOR_SIGNING_KEY_FILE"):
        hidden.append(Path(environ["CONDUCTOR_SIGNING_KEY_FILE"]))
    home = environ.get("HOME")
    return SandboxSpec(writable=tuple(writable), hidden=tuple(hidden), network=network, mode=mode,
                       home=Path(home) if home else None)


def stricter(a: SandboxMode, b: SandboxMode) -> SandboxMode:
    """The stricter of two modes (tighten-only merging)."""
    return a if MODE_ORDER[a] >= MODE_ORDER[b] else b
