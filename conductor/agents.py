"""Instruction files that tell an IDE agent how to work on a Conductor project (``conductor init --agent``).

Each agent reads its project instructions from a file of its own; this module knows where, writes a
Conductor section into that file and keeps everything else in it byte for byte. Where each reads them,
and the documentation that says so:

- ``claude-code``: ``CLAUDE.md`` (https://docs.anthropic.com/en/docs/claude-code/memory)
- ``codex``: ``AGENTS.md``, read from the git root down to the working folder
  (https://developers.openai.com/codex/guides/agents-md)
- ``cursor``: ``.cursor/rules/conductor.mdc``, an MDC rule whose front matter has ``description``,
  ``globs`` and ``alwaysApply`` (https://www.cursor.com/docs/rules)
- ``gemini``: ``GEMINI.md`` (https://geminicli.com/docs/cli/gemini-md)
- ``aider``: ``CONVENTIONS.md``, which aider loads only when ``.aider.conf.yml`` lists it under ``read:``
  (https://aider.chat/docs/usage/conventions.html, https://aider.chat/docs/config/aider_conf.html)
- ``generic``: ``AGENTS.md`` (https://agents.md/)

The section sits between :data:`BEGIN` and :data:`END` marker lines (HTML comments, invisible in
rendered Markdown). Writing it again replaces only what is between the markers, so a second run changes
nothing; text outside the markers is never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from conductor.errors import ConfigError
from conductor.fsutil import atomic_write

BEGIN = "<!-- BEGIN conductor: written by `conductor init --agent`; edits between these markers are replaced -->"
END = "<!-- END conductor -->"

AIDER_CONFIG = ".aider.conf.yml"
AIDER_CONVENTIONS = "CONVENTIONS.md"

CURSOR_FRONT_MATTER = (
    "---\n"
    "description: How to execute and plan Conductor tasks (conductor task, conductor mcp)\n"
    "globs:\n"
    "alwaysApply: true\n"
    "---\n"
)
"""Cursor's MDC front matter: ``alwaysApply: true`` puts the rule in every Agent request."""


@dataclass(frozen=True)
class AgentTarget:
    """Where one agent reads its project instructions.

    Attributes:
        name: the ``--agent`` value.
        path: the instruction file, relative to the project root (POSIX).
        title: the agent's product name.
        source: the documentation that states the convention.
        front_matter: text a new file starts with (Cursor's MDC header), or ``""``.
    """

    name: str
    path: str
    title: str
    source: str
    front_matter: str = ""


AGENTS: dict[str, AgentTarget] = {
    target.name: target
    for target in (
        AgentTarget("claude-code", "CLAUDE.md", "Claude Code", "https://docs.anthropic.com/en/docs/claude-code/memory"),
        AgentTarget("codex", "AGENTS.md", "Codex", "https://developers.openai.com/codex/guides/agents-md"),
        AgentTarget("cursor", ".cursor/rules/conductor.mdc", "Cursor", "https://www.cursor.com/docs/rules",
                    CURSOR_FRONT_MATTER),
        AgentTarget("gemini", "GEMINI.md", "Gemini CLI", "https://geminicli.com/docs/cli/gemini-md"),
        AgentTarget("aider", AIDER_CONVENTIONS, "aider", "https://aider.chat/docs/usage/conventions.html"),
        AgentTarget("generic", "AGENTS.md", "any agent that reads AGENTS.md", "https://agents.md/"),
    )
}


INSTRUCTIONS = """\
## Conductor: executing and planning tasks

This project is run by Conductor. A plan is split into steps; each step is a *task* you execute in a
folder of its own, the task's *workspace*. Conductor checks the result itself (allowed files, diff size,
the project's verification commands) before it merges anything, so follow these rules exactly.

### Started by `conductor worker`?

If the environment variable `CONDUCTOR_TASK_ID` is set, the worker has already claimed one task for you:
the instruction is `$CONDUCTOR_INSTRUCTION`, the current folder is the workspace, the allowed paths are
in `$CONDUCTOR_ALLOWED_FILES` (one per line). Do that one thing, write a short Markdown account to
`$CONDUCTOR_EXPLANATION_FILE`, and exit 0 (non-zero if you could not do it). Run no `conductor task`
command: the worker completes the task for you.

### Executing a step (two commands)

1. Claim the next pending task:

       conductor task claim --json

   It prints `task_id`, `plan_id`, `fork_id`, `attempt`, `instruction`, `workspace` (an absolute path),
   `allowed_files`, `constraints`, `checks` and `deadline`. Exit code 9 means there is nothing to claim.
   To choose a task, run `conductor task list --json` first, then `conductor task claim TASK --json`.
2. Work **only inside `workspace`** (`cd` into it): it is a checkout of the fork's current state with a
   `.git` of its own (`git status` and `git diff` there show your changes). Change only paths that match
   `allowed_files` (gitignore-style patterns at the workspace root); never the project folder itself,
   never another workspace. Follow every line of `constraints`.
3. Run the `checks` (the commands Conductor runs afterwards) and the project's tests inside the
   workspace before completing.
4. Complete it (TASK is the `task_id`, or `PLAN/FORK/STEP` when several plans are running):

       conductor task complete TASK --summary "one line: what you did"

   Conductor works out the changed files itself. Add `--explanation-file NOTES.md` to attach a
   Markdown account for the reviewer.
5. If you cannot do the task, give it back; it is offered again as a new attempt:

       conductor task release TASK --reason "why"

   If you did the work and it fails, `conductor task complete TASK --status failed --summary "why"`
   records a failed attempt instead; Conductor retries the step with that evidence while attempts remain.
6. Finish before `deadline`. `conductor task heartbeat TASK` renews the lease (so does every
   `conductor task` call on the task); after the deadline the task is re-queued and your work dropped.

### Planning

With `conductor explore --planner handoff` Conductor asks for the plan instead of calling an LLM:
`conductor task claim --json` then offers the planning task first, with `"kind": "planning"`,
`task_id` `planning`, the `goal`, how many `strategies` are wanted, the `plan_schema`, `facts` about the
project and any `previous_rejections`. Write the plan as a YAML file (JSON for a `.json` name) that
follows `plan_schema` and answer with:

    conductor task complete planning --plan PLAN --plan-file plan.yaml

PLAN is the `plan_id` of the planning task. A plan that fails the schema or the policy is rejected with
the reasons and offered again as a new attempt.

### Through MCP

If your client has the Conductor MCP server (`conductor mcp`, stdio), use its tools instead of the shell:
`claim_task`, then `read_file` / `write_file` in the task's workspace (or your own file tools there),
`run_checks`, and `complete_task`; `release_task` gives a task back, `heartbeat` renews it;
`get_planning_task` and `submit_plan` answer a planning task. The same rules apply.

### Never

- Never read or write anything under `.conductor/` (task files, leases, audit logs, keys, other
  workspaces) except inside the one workspace you were given, which lies below `.conductor/scratch/`:
  only the `conductor` commands touch the rest.
- Never change files outside the workspace or outside `allowed_files`, and never commit to the project.
- Never create another git repository inside the workspace, and leave no process writing into it after
  you completed the task.
"""


@dataclass
class WrittenFile:
    """One file ``install`` looked at: ``action`` is ``created``, ``updated`` or ``unchanged``."""

    path: str
    action: str


@dataclass
class AgentInstall:
    """What :func:`install` did for one agent."""

    agent: str
    files: list[WrittenFile] = field(default_factory=list)


def section_text(newline: str = "\n") -> str:
    """The delimited Conductor section (markers included), ending with a newline."""
    text = f"{BEGIN}\n{INSTRUCTIONS}{END}\n"
    return text.replace("\n", newline) if newline != "\n" else text


def upsert_section(existing: str, section: str, *, path: str = "the file") -> str:
    """``existing`` with its Conductor section replaced by ``section``, or ``section`` appended.

    Text outside the markers is kept exactly. Appending separates the section from earlier text by one
    blank line.

    Raises:
        ConfigError: the markers are unbalanced (a BEGIN without its END, an END first, or two sections),
            so the right span cannot be told; ``path`` names the file in the message.
    """
    begins = [m.start() for m in re.finditer(re.escape(BEGIN), existing)]
    ends = [m.start() for m in re.finditer(re.escape(END), existing)]
    if not begins and not ends:
        if not existing:
            return section
        newline = "\r\n" if "\r\n" in existing else "\n"
        gap = "" if existing.endswith(newline) else newline
        return existing + gap + newline + section
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ConfigError(f"{path}: the Conductor section's markers are unbalanced ({len(begins)} BEGIN, {len(ends)} END); "
                          f"fix or remove them by hand, then run `conductor init --agent` again")
    start = existing.rfind("\n", 0, begins[0]) + 1  # the marker's line start
    stop = ends[0] + len(END)
    if existing.startswith("\r\n", stop):
        stop += 2
    elif existing.startswith("\n", stop):
        stop += 1
    return existing[:start] + section + existing[stop:]


def install(root: Path, agent: str) -> AgentInstall:
    """Write (or refresh) the Conductor section of ``agent``'s instruction file under ``root``.

    Args:
        root: the project root.
        agent: a key of :data:`AGENTS`.

    Returns:
        The files looked at, each ``created``, ``updated`` or ``unchanged``.

    Raises:
        ConfigError: unknown agent; an existing file that is not UTF-8 or whose markers are unbalanced;
            an ``.aider.conf.yml`` whose ``read:`` entry cannot be extended safely.
        OSError: a file cannot be written.
    """
    target = AGENTS.get(agent)
    if target is None:
        raise ConfigError(f"--agent: unknown agent {agent!r} (known: {', '.join(AGENTS)})")
    result = AgentInstall(agent)
    result.files.append(_write_section(root, target))
    if agent == "aider":
        result.files.append(_aider_read_entry(root))
    return result


def _read_text(path: Path, shown: str) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not UTF-8 ({exc.reason} at byte {exc.start}); Conductor writes only UTF-8") from None


def _write_text(path: Path, text: str, existed: bool) -> None:
    mode = path.stat().st_mode & 0o7777 if existed else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"), mode=mode)


def _through_link(root: Path, relative: str) -> Path:
    """The file to write for ``relative``: itself, or what it links to (a ``CLAUDE.md -> AGENTS.md`` link is
    common and must stay a link). A link that leads out of the project is refused."""
    path = root / relative
    if not path.is_symlink():
        return path
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise ConfigError(f"{relative}: a symlink to {real}, outside the project; add the Conductor section there "
                          "by hand, or replace the link with a file")
    return real


def _write_section(root: Path, target: AgentTarget) -> WrittenFile:
    path = _through_link(root, target.path)
    existing = _read_text(path, target.path)
    if existing is None:
        _write_text(path, target.front_matter + section_text(), existed=False)
        return WrittenFile(target.path, "created")
    newline = "\r\n" if "\r\n" in existing else "\n"
    if not existing.strip() and target.front_matter:
        existing = target.front_matter.replace("\n", newline)  # an empty rule file gets its header
    updated = upsert_section(existing, section_text(newline), path=target.path)
    if updated == existing:
        return WrittenFile(target.path, "unchanged")
    _write_text(path, updated, existed=True)
    return WrittenFile(target.path, "updated")


_READ_LINE = re.compile(r"^read[ \t]*:(?P<value>[^\n#]*?)[ \t]*(?P<comment>#[^\n]*)?$", re.MULTILINE)


def _aider_read_entry(root: Path) -> WrittenFile:
    """Make ``.aider.conf.yml``'s top-level ``read:`` include CONVENTIONS.md, editing only that entry."""
    path = _through_link(root, AIDER_CONFIG)
    existing = _read_text(path, AIDER_CONFIG)
    if existing is None:
        _write_text(path, f"read: {AIDER_CONVENTIONS}\n", existed=False)
        return WrittenFile(AIDER_CONFIG, "created")
    before = _yaml_mapping(existing)
    if AIDER_CONVENTIONS in _as_list(before.get("read")):
        return WrittenFile(AIDER_CONFIG, "unchanged")
    updated = _add_read_entry(existing)
    after = _yaml_mapping(updated) if updated is not None else None
    expected = {**before, "read": [*_as_list(before.get("read")), AIDER_CONVENTIONS]}
    if after is None or {**after, "read": _as_list(after.get("read"))} != expected:
        raise ConfigError(f"{AIDER_CONFIG}: cannot add {AIDER_CONVENTIONS} to its `read:` entry safely; "
                          f"add it by hand (read: [..., {AIDER_CONVENTIONS}])")
    _write_text(path, updated, existed=True)
    return WrittenFile(AIDER_CONFIG, "updated")


def _add_read_entry(text: str) -> str | None:
    """``text`` with CONVENTIONS.md added to its ``read:`` line or list; None when no edit fits."""
    newline = "\r\n" if "\r\n" in text else "\n"
    plain = text.replace("\r\n", "\n")
    match = _READ_LINE.search(plain)
    if match is None:
        gap = "" if not plain or plain.endswith("\n") else "\n"
        return text + gap.replace("\n", newline) + f"read: {AIDER_CONVENTIONS}{newline}"
    value = match.group("value").strip()
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1].strip()
        new_value = f"[{inner}, {AIDER_CONVENTIONS}]" if inner else f"[{AIDER_CONVENTIONS}]"
        edited = plain[:match.start("value")] + " " + new_value + plain[match.end("value"):]
    elif value:
        edited = plain[:match.start("value")] + f" [{value}, {AIDER_CONVENTIONS}]" + plain[match.end("value"):]
    else:  # a block list follows: add an item after its last one, indented like it
        lines = plain[match.end():].split("\n")[1:]
        offset, indent, seen = match.end() + 1, None, 0
        for line in lines:
            item = re.match(r"^([ \t]*)- ", line)
            if item is None and (line.strip() == "" or line.lstrip().startswith("#")):
                offset += len(line) + 1
                continue
            if item is None:
                break
            indent = item.group(1)
            offset += len(line) + 1
            seen = offset
        if indent is None:
            return None
        if seen > len(plain):  # the last item ends the file without a newline
            edited = plain + f"\n{indent}- {AIDER_CONVENTIONS}"
        else:
            edited = plain[:seen] + f"{indent}- {AIDER_CONVENTIONS}\n" + plain[seen:]
    return edited.replace("\n", newline) if newline != "\n" else edited


def _yaml_mapping(text: str) -> dict[str, object]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{AIDER_CONFIG}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{AIDER_CONFIG}: the top level is not a mapping")
    return value


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def agent_names() -> list[str]:
    """The ``--agent`` values, in table order."""
    return list(AGENTS)


__all__ = ["AGENTS", "BEGIN", "END", "INSTRUCTIONS", "AgentInstall", "AgentTarget", "WrittenFile", "agent_names",
           "install", "section_text", "upsert_section"]
