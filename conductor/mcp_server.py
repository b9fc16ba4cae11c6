"""``conductor mcp``: the handoff protocol as Model Context Protocol tools, for any MCP client.

Claude Code, Codex, Cursor and every other MCP client can then plan and execute without knowing the file
contract. The tools are thin: each calls the function ``conductor task`` calls
(:mod:`conductor.handoff.agent` for step tasks, :mod:`conductor.handoff.planning` for planning tasks) and
returns its JSON; a :class:`~conductor.errors.ConductorError` becomes an MCP ``ToolError`` carrying
Conductor's message (the client sees ``is_error`` and the text).

Because a client may have no file tools (or shell) of its own, four tools read and write files inside the
workspace of a task the caller holds — ``list_files``, ``read_file``, ``write_file``, ``delete_file`` —
and ``run_checks`` runs the project's verification commands there, contained as the verifier runs them. Paths are
relative to the workspace and confined to it (:func:`conductor.paths.resolve_inside`: no absolute path,
no ``..``, no ``.git`` in any disguise, no symlink leading out). A write or delete outside the task's
``allowed_files``, or of a protected path, is refused up front (the verifier would reject the step), so a
client learns at once rather than after ``complete_task``.

Resources: ``conductor://plans`` (every plan, newest last, with its status), ``conductor://plans/{plan_id}``
(a plan's forks and steps by state), ``conductor://plans/{plan_id}/forks/{fork_id}`` and
``conductor://planning`` (planning tasks waiting or in progress).

The SDK (``mcp`` 2.x, ``MCPServer``) is imported inside :func:`build_server`, so ``conductor --help``
never loads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from conductor.errors import ConductorError, UnsafePath
from conductor.layout import ProjectLayout

MAX_READ_BYTES = 1024 * 1024
"""A ``read_file`` answer carries at most this many bytes of the file (``offset`` pages on)."""
MAX_WRITE_BYTES = 4 * 1024 * 1024
MAX_LISTED = 2000
PLAN_WAIT_SECONDS = 30.0
"""How long ``submit_plan`` waits, by default, for Conductor's verdict on the answer."""

T = TypeVar("T")

INSTRUCTIONS = """\
Conductor hands out tasks; you execute them (or plan). Files are the contract, and these tools do the file work.
Plan: get_planning_task (goal, facts, plan_schema, previous_rejections) then submit_plan (a plan object matching
plan_schema); a rejected plan comes back as a new attempt with the reasons.
Execute: claim_task -> read_file / write_file in the task's workspace (paths relative to it, only allowed_files)
-> run_checks (optional: the verification commands) -> complete_task (Conductor captures what changed and
verifies it). release_task gives a task back.
"""


def _holder(environ: Mapping[str, str]) -> str:
    from conductor.handoff.agent import HOLDER_ENV
    from conductor.handoff.lease import HOST

    return environ.get(HOLDER_ENV, "").strip() or f"conductor-mcp@{HOST}:{os.getpid()}"


class Workspace:
    """File access inside the workspace of a task the caller holds (the confinement rules in the module doc)."""

    def __init__(self, root: Path, allowed_files: list[str], protected_patterns: list[str]) -> None:
        self.root = root
        self.allowed_files = allowed_files
        self.protected_patterns = protected_patterns

    def resolve(self, path: str) -> tuple[str, Path]:
        """The normal relative path and the real absolute path of ``path``.

        Raises:
            UnsafePath: absolute, ``..``, ``.git``, or a symlink leading out of the workspace.
        """
        from conductor.paths import check_relpath, resolve_inside

        normal = check_relpath(path)
        return normal, resolve_inside(self.root, normal)

    def check_writable(self, normal: str, real: Path) -> None:
        """Refuse a change the verifier would reject: outside ``allowed_files`` or protected.

        Raises:
            UnsafePath: naming the path and the rule.
        """
        from conductor.policy import matches_allowed, matches_protected

        inside = real.relative_to(self.root.resolve()).as_posix()
        for name in dict.fromkeys((normal, inside)):
            if not matches_allowed(name, self.allowed_files):
                raise UnsafePath(f"{name!r} is outside this task's allowed_files ({', '.join(self.allowed_files) or 'none'}): "
                                 "the verifier would reject the step, so the write is refused")
            if matches_protected(name, self.protected_patterns):
                raise UnsafePath(f"{name!r} is protected by the policy ({', '.join(self.protected_patterns)}): "
                                 "no step may change it")

    def list(self, folder: str) -> dict[str, Any]:
        base = self.root.resolve() if folder in ("", ".") else self.resolve(folder)[1]
        if not base.is_dir():
            raise UnsafePath(f"{folder!r} is not a folder of the workspace")
        root = self.root.resolve()
        entries: list[dict[str, Any]] = []
        truncated = False
        for current, dirs, names in os.walk(base):  # never follows a symlinked folder: it is listed as a link
            links = [d for d in dirs if os.path.islink(os.path.join(current, d))]
            dirs[:] = sorted(d for d in dirs if d != ".git" and d not in links)
            for name in sorted(names + links):
                path = Path(current) / name
                if len(entries) >= MAX_LISTED:
                    truncated = True
                    break
                entry: dict[str, Any] = {"path": path.relative_to(root).as_posix()}
                if path.is_symlink():
                    entry["symlink"] = os.readlink(path)
                else:
                    entry["size"] = path.lstat().st_size
                entries.append(entry)
            if truncated:
                break
        return {"folder": base.relative_to(root).as_posix() if base != root else ".", "files": entries,
                "truncated": truncated}

    def read(self, path: str, offset: int, limit: int) -> dict[str, Any]:
        normal, real = self.resolve(path)
        if not real.is_file():
            raise UnsafePath(f"{normal!r} is not a file of the workspace")
        size = real.stat().st_size
        limit = max(0, min(limit, MAX_READ_BYTES))
        with open(real, "rb") as handle:
            handle.seek(max(0, offset))
            data = handle.read(limit)
        content = _utf8_prefix(data, whole=max(0, offset) + len(data) >= size)
        if content is None:
            raise UnsafePath(f"{normal!r} is not UTF-8 text (a binary file): read_file returns text only")
        data = content.encode("utf-8")  # a character cut by the limit is left for the next read
        end = max(0, offset) + len(data)
        return {"path": normal, "size": size, "offset": max(0, offset), "content": content, "truncated": end < size}

    def write(self, path: str, content: str) -> dict[str, Any]:
        normal, real = self.resolve(path)
        self.check_writable(normal, real)
        data = content.encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            raise UnsafePath(f"{normal!r}: {len(data)} bytes is more than write_file takes ({MAX_WRITE_BYTES})")
        if real.is_dir():
            raise UnsafePath(f"{normal!r} is a folder")
        existed = real.exists()
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            self.resolve(normal)  # the folders just made did not lead anywhere else
            fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise ConductorError(f"{normal!r}: cannot write: {exc.strerror or exc}") from exc
        return {"path": normal, "bytes": len(data), "created": not existed}

    def delete(self, path: str) -> dict[str, Any]:
        from conductor.paths import check_relpath, resolve_inside

        normal = check_relpath(path)
        parent = normal.rpartition("/")[0]
        folder = resolve_inside(self.root, parent) if parent else self.root.resolve()
        target = folder / normal.rpartition("/")[2]  # the entry itself, a symlink included, never its target
        self.check_writable(normal, target)
        if target.is_dir() and not target.is_symlink():
            raise UnsafePath(f"{normal!r} is a folder: delete its files one by one")
        try:
            target.unlink()
        except FileNotFoundError:
            raise UnsafePath(f"{normal!r} does not exist in the workspace") from None
        return {"path": normal, "deleted": True}


def _utf8_prefix(data: bytes, *, whole: bool) -> str | None:
    """``data`` as text; when it is not the file's end, up to 3 trailing bytes of a cut character are dropped.
    None when it is not UTF-8."""
    for cut in range(0 if whole else 4):
        try:
            return (data[: len(data) - cut] if cut else data).decode("utf-8")
        except UnicodeDecodeError:
            continue
    try:
        return data.decode("utf-8") if whole else None
    except UnicodeDecodeError:
        return None


def build_server(start: Path, *, environ: Mapping[str, str] = os.environ):  # type: ignore[no-untyped-def]
    """The MCP server of the project holding ``start`` (tools and resources as the module doc lists them).

    Args:
        start: a folder in the project; the project is found as every command finds it.
        environ: where ``CONDUCTOR_HOLDER`` (the holder name; default ``conductor-mcp@<host>:<pid>``) and
            config overrides are read.

    Returns:
        An ``mcp.server.MCPServer``; ``.run()`` serves it over stdio.

    Raises:
        NotFound: no Conductor project at or above ``start``.
    """
    from mcp.server import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from conductor import __version__
    from conductor.handoff import agent, planning
    from conductor.redact import redact

    layout = ProjectLayout.find(start)
    holder = _holder(environ)
    server = MCPServer("conductor", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")

    def call(action: Callable[[], T]) -> T:
        try:
            return action()
        except ConductorError as exc:
            raise ToolError(redact(str(exc))) from exc

    def lease_seconds() -> float:
        return planning.configured_lease_seconds(layout, environ)

    def step(task: Any) -> dict[str, Any]:
        return {"kind": "step", **task.to_json()}

    def workspace(task_id: str, plan_id: str | None, fork_id: str | None) -> Workspace:
        # heartbeat: the caller must hold the task, and every file call renews its lease
        task = agent.heartbeat(layout, task_id, plan_id=plan_id, fork_id=fork_id, holder=holder, environ=environ)
        return Workspace(Path(task.workspace), list(task.allowed_files), list(task.protected_patterns))

    # --- step tasks (conductor task …) ---

    @server.tool()
    def list_tasks(plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Tasks waiting or in progress (oldest plan first), and planning tasks waiting for a plan."""
        return call(lambda: {
            "tasks": [step(t) for t in agent.list_tasks(layout, plan_id=plan_id, fork_id=fork_id, environ=environ)],
            "planning": planning.planning_tasks(layout), "holder": holder})

    @server.tool()
    def claim_task(plan_id: str | None = None, fork_id: str | None = None, task_id: str | None = None,
                   wait_seconds: float = 0.0) -> dict[str, Any]:
        """Claim the next pending task (or task_id, a step id such as step_001 or PLAN/FORK/STEP).

        A pending planning task is offered first (kind "planning": answer it with submit_plan). A step task
        (kind "step") has a workspace: work only there (read_file / write_file), change only allowed_files,
        then complete_task. wait_seconds: wait that long for a task to be published.
        """
        def claim() -> dict[str, Any]:
            waiting = [p for p, _ in planning.pending_planning(layout) if plan_id in (None, p)]
            if task_id is None and fork_id is None and waiting:
                offered = planning.claim_planning(layout, waiting[0], holder=holder, lease_seconds=lease_seconds())
                if offered is not None:
                    return offered.to_json()
            return step(agent.claim(layout, plan_id=plan_id, fork_id=fork_id, task_id=task_id, holder=holder,
                                    wait_seconds=max(0.0, min(wait_seconds, 600.0)), environ=environ))
        return call(claim)

    @server.tool()
    def show_task(task_id: str, plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """One task in any state (result and verdict once finished); renews your lease if you hold it."""
        return call(lambda: step(agent.show(layout, task_id, plan_id=plan_id, fork_id=fork_id, holder=holder,
                                            environ=environ)))

    @server.tool()
    def heartbeat(task_id: str, plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Renew your lease of a task you hold (every task and file call renews it too)."""
        return call(lambda: step(agent.heartbeat(layout, task_id, plan_id=plan_id, fork_id=fork_id, holder=holder,
                                                 environ=environ)))

    @server.tool()
    def complete_task(task_id: str, summary: str = "", explanation: str | None = None, status: str = "success",
                      plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Finish a task you hold: Conductor captures what changed in its workspace and verifies it.

        status: "success", or "failed" to give up on the step for good (release_task lets it be retried).
        The answer lists files_changed and warnings (what the verifier will reject).
        """
        return call(lambda: agent.complete(layout, task_id, plan_id=plan_id, fork_id=fork_id, status=status,
                                           summary=summary, explanation=explanation, holder=holder,
                                           environ=environ).to_json())

    @server.tool()
    def release_task(task_id: str, reason: str = "", plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Give a task you hold back; it is offered again as a new attempt (the last attempt fails instead)."""
        return call(lambda: step(agent.release(layout, task_id, plan_id=plan_id, fork_id=fork_id, reason=reason,
                                               holder=holder, environ=environ)))

    # --- files of a held task's workspace ---

    @server.tool()
    def list_files(task_id: str, folder: str = ".", plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Files of your task's workspace (below folder, .git left out), paths relative to the workspace."""
        return call(lambda: workspace(task_id, plan_id, fork_id).list(folder))

    @server.tool()
    def read_file(task_id: str, path: str, offset: int = 0, limit: int = MAX_READ_BYTES,
                  plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """A UTF-8 text file of your task's workspace (path relative to it; at most 1 MiB per call)."""
        return call(lambda: workspace(task_id, plan_id, fork_id).read(path, offset, limit))

    @server.tool()
    def write_file(task_id: str, path: str, content: str, plan_id: str | None = None,
                   fork_id: str | None = None) -> dict[str, Any]:
        """Create or replace a file of your task's workspace with content (UTF-8); only allowed_files."""
        return call(lambda: workspace(task_id, plan_id, fork_id).write(path, content))

    @server.tool()
    def delete_file(task_id: str, path: str, plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Delete a file of your task's workspace; only allowed_files."""
        return call(lambda: workspace(task_id, plan_id, fork_id).delete(path))

    @server.tool()
    def run_checks(task_id: str, plan_id: str | None = None, fork_id: str | None = None) -> dict[str, Any]:
        """Run the project's verification commands in your task's workspace, as Conductor will after
        complete_task (same sandbox), and return each one's exit code and output tail."""
        return call(lambda: _run_checks(layout, agent.heartbeat(layout, task_id, plan_id=plan_id, fork_id=fork_id,
                                                                 holder=holder, environ=environ), environ))

    # --- planning ---

    @server.tool()
    def get_planning_task(plan_id: str | None = None, wait_seconds: float = 0.0) -> dict[str, Any]:
        """Claim the planning task waiting for a plan (or show the one you hold): goal, strategies wanted,
        project facts, plan_schema and previous_rejections. Answer it with submit_plan."""
        def get() -> dict[str, Any]:
            import time

            until = time.monotonic() + max(0.0, min(wait_seconds, 600.0))
            while True:
                for row in planning.planning_tasks(layout):
                    if (plan_id is None or row["plan_id"] == plan_id) and row["holder"] == holder:
                        return planning.held_planning(layout, row["plan_id"], holder=holder,
                                                      lease_seconds=lease_seconds()).to_json()
                claimed = planning.claim_planning(layout, plan_id, holder=holder, lease_seconds=lease_seconds())
                if claimed is not None:
                    return claimed.to_json()
                if time.monotonic() >= until:
                    from conductor.errors import NotFound

                    raise NotFound("no planning task waits for a plan" + (f" for plan {plan_id}" if plan_id else ""))
                time.sleep(0.2)
        return call(get)

    @server.tool()
    def submit_plan(plan: dict[str, Any], plan_id: str | None = None,
                    wait_seconds: float = PLAN_WAIT_SECONDS) -> dict[str, Any]:
        """Answer the planning task with a plan (an object matching plan_schema: {strategies: [...]}).

        Waits up to wait_seconds for Conductor's verdict: accepted, or rejected with reasons (then the
        task is offered again as a new attempt: call get_planning_task, fix, submit again).
        """
        data = json.dumps(plan, ensure_ascii=False, indent=2).encode("utf-8")
        return call(lambda: planning.submit_plan(layout, plan_id, holder=holder, answer=data, fmt="json",
                                                 wait_seconds=min(wait_seconds, 600.0)))

    # --- status ---

    @server.tool()
    def status(plan_id: str | None = None) -> dict[str, Any]:
        """Plans with their forks and steps by state (the newest plan, or plan_id), and planning tasks."""
        from conductor.inspect import plan_status
        from conductor.plan_store import latest_plan_id

        def get() -> dict[str, Any]:
            ids = layout.plan_ids()
            chosen = plan_id or (latest_plan_id(layout) if ids else None)
            return {"plan": plan_status(layout, chosen) if chosen else None, "plans": ids,
                    "planning": planning.planning_tasks(layout)}
        return call(get)

    @server.resource("conductor://plans", mime_type="application/json")
    def plans_resource() -> str:
        """Every plan (oldest first) with its status."""
        from conductor.inspect import plan_status

        return _json([_status_or_error(plan_status, layout, p) for p in layout.plan_ids()])

    @server.resource("conductor://plans/{plan_id}", mime_type="application/json")
    def plan_resource(plan_id: str) -> str:
        """One plan's forks and steps by state."""
        from conductor.inspect import plan_status

        return _json(_resource(lambda: plan_status(layout, plan_id)))

    @server.resource("conductor://plans/{plan_id}/forks/{fork_id}", mime_type="application/json")
    def fork_resource(plan_id: str, fork_id: str) -> str:
        """One fork of a plan: its strategy and steps by state."""
        from conductor.inspect import plan_status

        def get() -> dict[str, Any]:
            for fork in plan_status(layout, plan_id)["forks"]:
                if fork["fork_id"] == fork_id:
                    return fork
            from conductor.errors import NotFound

            raise NotFound(f"no fork {fork_id!r} in plan {plan_id}")
        return _json(_resource(get))

    @server.resource("conductor://planning", mime_type="application/json")
    def planning_resource() -> str:
        """Planning tasks waiting for a plan or in progress."""
        return _json(planning.planning_tasks(layout))

    return server


def _run_checks(layout: ProjectLayout, task: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """The verification commands in the held task's workspace, contained as the verifier contains them;
    each limited to ``verification.timeout_seconds`` and to the time left before the task's deadline.

    Raises:
        SandboxUnavailable: the task requires a sandbox and none can be made here.
    """
    from datetime import UTC, datetime

    from conductor.models import parse_time
    from conductor.project import load_project
    from conductor.sandbox import for_step
    from conductor.verification import all_passed, run_verification

    config = load_project(layout, environ)[0]
    left = (parse_time(task.deadline) - datetime.now(UTC)).total_seconds() if task.deadline else float("inf")
    timeout = max(1.0, min(float(config.verification.timeout_seconds), left))
    workspace = Path(task.workspace)
    sandbox = for_step(writable=(workspace,), keys_dir=layout.keys_dir, environ=os.environ,
                       mode=task.extra.get("sandbox_mode", "auto"), network=bool(task.extra.get("network", False)))
    # An attempt folder's commands get their TMPDIR beside it, where recovery's sweep removes what a kill leaves.
    temp_parent = workspace.parent if workspace.resolve().is_relative_to(layout.scratch_root.resolve()) else None
    evidence = run_verification(list(config.verification.commands), workspace, timeout_seconds=timeout,
                                sandbox=sandbox, env_names=config.executor.env, temp_parent=temp_parent)
    return {"ref": task.ref, "passed": all_passed(evidence),
            "checks": [{"command": e.command, "exit_code": e.exit_code, "timed_out": e.timed_out,
                        "sandboxed": e.sandboxed, "output_tail": e.output_tail} for e in evidence]}


def _resource(get: Callable[[], T]) -> T:
    from mcp.server.mcpserver.exceptions import ResourceError

    try:
        return get()
    except ConductorError as exc:
        raise ResourceError(str(exc)) from exc


def _status_or_error(plan_status: Callable[[ProjectLayout, str], dict[str, Any]], layout: ProjectLayout,
                     plan_id: str) -> dict[str, Any]:
    try:
        return plan_status(layout, plan_id)
    except ConductorError as exc:
        return {"plan_id": plan_id, "error": str(exc)}


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def serve(start: Path, *, environ: Mapping[str, str] = os.environ) -> None:
    """Serve the project's MCP server over stdio until the client closes it.

    Raises:
        NotFound: no Conductor project at or above ``start`` (before anything is served).
    """
    build_server(start, environ=environ).run()
