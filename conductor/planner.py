"""Turning a goal into a plan: strategies, each a fork, each with ordered steps.

Two planners: an LLM (structured output, ``PlanDraft``) and a hand-written plan file (YAML or JSON,
``PlanFile``). Both produce the same ``PlanDraft``, which ``build_plan`` turns into a ``Plan`` with step
ids ``step_001``… and ``depends_on`` resolved.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from conductor.errors import ConfigError, UnsafePath
from conductor.llm.base import LLMClient
from conductor.models import (
    ForkSpec,
    Plan,
    PlannerInfo,
    PolicyLayer,
    StepSpec,
    Strategy,
    utc_now,
)
from conductor.policy import validate_allowed_files

if TYPE_CHECKING:
    from conductor.yamlutil import Document, Loc

MAX_LISTED_FILES = 300


# --- what the LLM answers (all fields required: OpenAI strict structured output) -----------------


class DraftStep(BaseModel):
    """One step as the planner proposes it."""

    id: str = Field(description="short unique name within the strategy, e.g. 'add-tests'")
    title: str
    instruction: str = Field(description="what the executor must do, precisely")
    allowed_files: list[str] = Field(description="paths (or globs) relative to the repository root the step may change")
    depends_on: list[str] = Field(description="ids of earlier steps of this strategy that must finish first")
    confidence: float = Field(description="probability in [0, 1] that the step succeeds as written")


class DraftStrategy(BaseModel):
    name: str
    description: str
    steps: list[DraftStep]


class PlanDraft(BaseModel):
    """The planner's answer: distinct strategies for the goal."""

    strategies: list[DraftStrategy]


# --- a hand-written plan file -------------------------------------------------------------------


class FileStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    title: str = ""
    instruction: str = Field(min_length=1)
    allowed_files: list[str] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    policy: PolicyLayer = Field(default_factory=PolicyLayer)


class FileStrategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    steps: list[FileStep] = Field(min_length=1)


class PlanFile(BaseModel):
    """A hand-written plan: ``goal`` (optional when given on the command line), ``policy``, ``strategies``."""

    model_config = ConfigDict(extra="forbid")

    goal: str | None = None
    policy: PolicyLayer = Field(default_factory=PolicyLayer)
    strategies: list[FileStrategy] = Field(min_length=1)


def load_plan_file(path: Path) -> PlanFile:
    """Load and validate a plan file (YAML or JSON).

    Raises:
        ConfigError: unreadable, malformed, or an unknown key (naming file, key and line).
    """
    return _load_plan_document(path)[0]


def _load_plan_document(path: Path) -> tuple[PlanFile, Document]:
    from conductor.yamlutil import read_mapping_document, validate_document

    if not path.is_file():
        raise ConfigError(f"{path}: plan file not found")
    document = read_mapping_document(path)
    return validate_document(document, PlanFile), document


def new_plan_id() -> str:
    """A sortable plan id: UTC time to the second and 4 random hex digits, e.g. ``20261122T100000-3fa2``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)


def _fork_steps(strategy: FileStrategy, where: _Where) -> list[StepSpec]:
    numbers: dict[str, int] = {}
    for index, step in enumerate(strategy.steps, start=1):
        name = step.id or str(index)
        if name in numbers:
            raise ConfigError(where.error(("steps", index - 1, "id"), f"step id {name!r} used twice", None))
        numbers[name] = index
    steps = []
    for index, step in enumerate(strategy.steps, start=1):
        label = step.id or str(index)
        depends = []
        for position, ref in enumerate(step.depends_on):
            if numbers.get(ref, index) >= index:  # compared as numbers: step 1000 comes after step 200
                raise ConfigError(where.error(("steps", index - 1, "depends_on", position),
                                              f"depends_on {ref!r} names no earlier step", label))
            depends.append(_step_id(numbers[ref]))
        allowed = []
        for position, entry in enumerate(step.allowed_files):
            try:
                allowed += [item for item in validate_allowed_files([entry]) if item not in allowed]
            except UnsafePath as exc:
                raise ConfigError(where.error(("steps", index - 1, "allowed_files", position), str(exc), label)) from exc
        steps.append(StepSpec(
            step_id=_step_id(index), title=step.title or (step.id or ""), instruction=step.instruction,
            allowed_files=allowed, depends_on=depends, confidence_estimate=step.confidence, policy=step.policy,
        ))
    return steps


def _step_id(number: int) -> str:
    return f"step_{number:03d}"


@dataclass(frozen=True)
class _Where:
    """Where a strategy came from, for errors: ``plan.yaml:12: strategies[0].steps[2].depends_on[0]: …``."""

    source: str
    lines: Mapping[Loc, int]
    position: int
    name: str

    def error(self, loc: Loc, problem: str, step: str | None) -> str:
        full: Loc = ("strategies", self.position, *loc)
        line = next((self.lines[full[:n]] for n in range(len(full), 0, -1) if full[:n] in self.lines), None)
        key = "strategies" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in full[1:])
        context = f"strategy {self.name!r}" + (f", step {_label(step)}" if step is not None else "")
        return f"{self.source}{f':{line}' if line else ''}: {key}: {problem} ({context})"


def _label(step: str) -> str:
    return step if step.isprintable() and step.strip() == step and step else repr(step)


def build_plan(
    *, goal: str, strategies: list[FileStrategy], policy: PolicyLayer, planner: PlannerInfo,
    source: str, plan_id: str | None = None, lines: Mapping[Loc, int] | None = None,
) -> Plan:
    """Make a ``Plan`` (one fork per strategy, forks numbered 1…N, steps ``step_001``… in order).

    Args:
        lines: line of each key of the plan file, by key path (``Document.lines``), for error messages.

    Raises:
        ConfigError: a step depends on a missing or later step, a step id is used twice, or an
            ``allowed_files`` entry is unsafe or starts or ends with whitespace (it could never match).
    """
    forks = [
        ForkSpec(fork_id=str(number), strategy=Strategy(name=s.name, description=s.description),
                 steps=_fork_steps(s, _Where(source, lines or {}, number - 1, s.name)))
        for number, s in enumerate(strategies, start=1)
    ]
    return Plan(plan_id=plan_id or new_plan_id(), goal=goal, created_at=utc_now(), planner=planner,
                policy=policy, forks=forks)


def plan_from_file(path: Path, *, goal: str | None, forks: int | None) -> Plan:
    """A plan from a hand-written file; ``forks`` keeps only the first N strategies.

    Raises:
        ConfigError: as :func:`load_plan_file` and :func:`build_plan`; no goal in the file or the call.
    """
    plan_file, document = _load_plan_document(path)
    final_goal = goal or plan_file.goal
    if not final_goal:
        raise ConfigError(f"{path}: no goal: give one on the command line or as `goal:` in the file")
    strategies = plan_file.strategies[:forks] if forks else plan_file.strategies
    return build_plan(goal=final_goal, strategies=strategies, policy=plan_file.policy,
                      planner=PlannerInfo(kind="file", source=str(path)), source=str(path), lines=document.lines)


PLANNER_SYSTEM = (
    "You plan changes to a software repository for autonomous coding agents. Propose genuinely different "
    "strategies (not variations of wording). Each strategy is a short list of small, verifiable steps. Each "
    "step names exactly the files it may change (paths relative to the repository root) and depends only on "
    "earlier steps of the same strategy. Estimate for each step the probability that it succeeds as written."
)


def render_planner_prompt(goal: str, *, forks: int, files: list[str], constraints: list[str]) -> str:
    """The planner's user prompt: the goal, how many strategies, the constraints and the file list."""
    lines = [f"# Goal\n{goal}", "", f"Propose exactly {forks} distinct strateg{'y' if forks == 1 else 'ies'}."]
    if constraints:
        lines += ["", "# Constraints every step must respect"] + [f"- {c}" for c in constraints]
    lines += ["", "# Repository files"] + [f"- {f}" for f in files[:MAX_LISTED_FILES]]
    if len(files) > MAX_LISTED_FILES:
        lines.append(f"- … and {len(files) - MAX_LISTED_FILES} more")
    return "\n".join(lines)


def list_project_files(root: Path) -> list[str]:
    """Files of the project, relative, skipping ``.git``, ``.conductor`` and common tool folders."""
    skip = {".git", ".conductor", "__pycache__", ".venv", "venv", "node_modules", ".pytest_cache"}
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        rel = Path(folder).relative_to(root)
        found += [(rel / n).as_posix() for n in sorted(names)]
        if len(found) > 5 * MAX_LISTED_FILES:
            break
    return found


def plan_with_llm(
    client: LLMClient, *, goal: str, forks: int, root: Path, constraints: list[str],
    on_call: Callable[[dict[str, Any]], None],
) -> Plan:
    """Ask an LLM for ``forks`` strategies and build the plan.

    Args:
        on_call: receives the ``llm.call`` audit data (provider, model, tokens, duration, ``cached``, and
            ``recording``: the request key, when the client records).

    Raises:
        BackendError: the provider failed or answered something unusable.
        ConfigError: the answer had no strategies, or a step is malformed (unsafe path, bad dependency).
    """
    from conductor.errors import BackendError

    prompt = render_planner_prompt(goal, forks=forks, files=list_project_files(root), constraints=constraints)
    reply = client.generate(system=PLANNER_SYSTEM, prompt=prompt, schema=PlanDraft)
    on_call({
        "purpose": "plan", "provider": client.settings.provider, "model": reply.model,
        "input_tokens": reply.usage.input_tokens, "output_tokens": reply.usage.output_tokens,
        "cost_usd": reply.usage.cost_usd, "duration_seconds": round(reply.duration_seconds, 6),
        # a replay (cached) repeats the recorded usage: totals of new spending skip it
        "cached": reply.cached, **({"recording": reply.recording} if reply.recording else {}),
    })
    draft: PlanDraft = reply.parsed
    if not draft.strategies:
        raise BackendError("the planner returned no strategies")
    strategies = [
        FileStrategy(name=s.name, description=s.description, steps=[
            FileStep(id=d.id, title=d.title, instruction=d.instruction, allowed_files=d.allowed_files,
                     depends_on=d.depends_on, confidence=min(1.0, max(0.0, d.confidence)))
            for d in s.steps
        ])
        for s in draft.strategies[:forks]
        if s.steps
    ]
    if not strategies:
        raise BackendError("the planner returned strategies without steps")
    info = PlannerInfo(kind="llm", provider=client.settings.provider, model=client.settings.model)
    return build_plan(goal=goal, strategies=strategies, policy=PolicyLayer(), planner=info, source="planner answer")
