"""Pydantic models of the file contract: plan, task, lease, result, verdict, audit event.

These models are the source of the JSON Schemas in ``docs/schemas/`` (regenerate with
``python -m conductor.schemas``); ``docs/protocol.md`` explains how the files move. Every model forbids
unknown keys, so a misspelt field is an error, not a silently ignored value.

Timestamps are RFC 3339 UTC strings with a ``Z`` suffix (``2026-11-22T10:00:00.123456Z``).
Checksums are ``"sha256:<64 hex>"`` over the RFC 8785 canonical form of the document without its
``checksum`` field (see ``conductor.canonical``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from conductor.errors import UnsafePath
from conductor.paths import check_tree_path

TASK_SCHEMA = "conductor.task/v1"
LEASE_SCHEMA = "conductor.lease/v1"
RESULT_SCHEMA = "conductor.result/v1"
VERDICT_SCHEMA = "conductor.verdict/v1"
PLAN_SCHEMA = "conductor.plan/v1"

Checksum = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
StepId = Annotated[str, StringConstraints(pattern=r"^step_[0-9]{3,}$")]
GitMode = Literal["100644", "100755", "120000", "160000"]
ObjectId = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{40}|[0-9a-f]{64})$")]
"""A git object id: SHA-1 (40 hex) or SHA-256 (64 hex), as the project's repository uses."""
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# A result may answer a task file that is not a valid task (rejected unread): it names the file's stem.
FileStem = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
ConfidenceLevel = Literal["high", "medium", "low"]


def _tree_change(change: FileChange) -> FileChange:
    try:
        check_tree_path(change.path)
    except UnsafePath as exc:  # pydantic reports ValueError as a validation error naming the field
        raise ValueError(str(exc)) from None
    return change


def step_number(step_id: str) -> int:
    """The number of a step id (``step_012`` → 12): step ids are ordered by it, never as strings, since
    ``"step_1000" < "step_200"``."""
    return int(step_id.removeprefix("step_"))


def utc_now() -> str:
    """The current time as an RFC 3339 UTC string with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> datetime:
    """Parse a timestamp written by :func:`utc_now` (or any RFC 3339 UTC string)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class Contract(BaseModel):
    """Base of every contract model: unknown keys are errors; values are validated on assignment.

    Validation is strict (pydantic strict mode), as the JSON Schemas are: ``"1"``, ``1.0`` and ``true`` are
    not the integer 1, ``"0.9"`` is not a number, ``1`` is not a boolean. Subclasses that set their own
    ``model_config`` inherit this (pydantic merges configs).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    def to_document(self) -> dict[str, Any]:
        """The JSON-ready dict of this model (``None`` fields kept, as the schema lists them)."""
        return self.model_dump(mode="json")


# --- policy -------------------------------------------------------------------------------------


class FileRules(Contract):
    """File rules of a policy layer."""

    protected_patterns: list[str] = Field(
        default_factory=list,
        description="gitignore-style patterns (pathspec) of files no step may change",
    )


MAX_DIFF_LINES_BOUND = 1_000_000
"""The largest ``behavior.max_diff_lines`` a policy may set (a million changed lines: no limit in practice,
and far inside the integers canonical JSON can carry)."""
MAX_DIFF_BYTES_BOUND = 1 << 34
"""The largest ``behavior.max_diff_bytes`` (16 GiB)."""
MAX_STEP_TIMEOUT_SECONDS = 86_400
"""The largest ``behavior.timeout_seconds`` (one day per attempt)."""
MAX_ATTEMPTS_BOUND = 100
"""The largest ``behavior.max_attempts`` (as ``executor.max_attempts`` in config.yaml)."""


class Behavior(Contract):
    """Numeric limits of a policy layer; ``None`` means "not set by this layer"."""

    max_diff_lines: int | None = Field(
        default=None, ge=0, le=MAX_DIFF_LINES_BOUND, description="lines added + removed, per step")
    timeout_seconds: int | None = Field(
        default=None, gt=0, le=MAX_STEP_TIMEOUT_SECONDS, description="wall time of one attempt, seconds")
    max_diff_bytes: int | None = Field(
        default=None, ge=0, le=MAX_DIFF_BYTES_BOUND,
        description="bytes of new content (added and modified files, symlink targets), per step")
    max_attempts: int | None = Field(
        default=None, ge=1, le=MAX_ATTEMPTS_BOUND,
        description="attempts per step: repairs of rejected attempts and re-queues of expired leases share them")


SandboxMode = Literal["required", "auto", "off"]


class SandboxRules(Contract):
    """``sandbox:`` of a policy layer: how launched commands are contained (see conductor/sandbox.py)."""

    mode: SandboxMode | None = Field(
        default=None, description="required | auto | off; tighten-only (required > auto > off); default auto")
    network: bool | None = Field(
        default=None, description="may launched commands reach the network? default false; only the project "
        "layer can allow it")


class PolicyLayer(Contract):
    """One layer of policy (project, plan or step), as written in YAML or in plan.json."""

    global_constraints: list[str] = Field(default_factory=list)
    file_rules: FileRules = Field(default_factory=FileRules)
    behavior: Behavior = Field(default_factory=Behavior)
    sandbox: SandboxRules = Field(default_factory=SandboxRules)


class EffectivePolicy(Contract):
    """The merged policy a step runs under (project → plan → step, tighten-only)."""

    global_constraints: list[str]
    protected_patterns: list[str]
    max_diff_lines: int
    timeout_seconds: int
    max_diff_bytes: int = 2 * 1024 * 1024
    sandbox_mode: SandboxMode = "auto"
    network: bool = False
    max_attempts: int = 3


# --- plan ---------------------------------------------------------------------------------------


class StepSpec(Contract):
    """One step of a fork, as planned."""

    step_id: StepId
    title: str = ""
    instruction: str = Field(min_length=1)
    allowed_files: list[str] = Field(default_factory=list)
    depends_on: list[StepId] = Field(default_factory=list)
    confidence_estimate: float | None = Field(
        default=None, ge=0.0, le=1.0, description="the planner's own estimate that the step succeeds"
    )
    policy: PolicyLayer = Field(default_factory=PolicyLayer)


class Strategy(Contract):
    """One alternative way to reach the goal; it becomes one fork."""

    name: str = Field(min_length=1)
    description: str = ""


class ForkSpec(Contract):
    """A fork of the plan: a strategy and its steps."""

    fork_id: Identifier
    strategy: Strategy
    steps: list[StepSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _steps_in_order(self) -> ForkSpec:
        """Steps are listed by increasing number and depend only on steps listed before them: the engine
        runs them in list order, so a dependency on a later or unknown step would never be met."""
        earlier: set[str] = set()
        previous: str | None = None
        for step in self.steps:
            if previous is not None and step_number(step.step_id) <= step_number(previous):
                raise ValueError(f"{step.step_id} is listed after {previous}: steps go by increasing number")
            later = [ref for ref in step.depends_on if ref not in earlier]
            if later:
                raise ValueError(f"{step.step_id} depends on {', '.join(later)}, not an earlier step of the fork")
            earlier.add(step.step_id)
            previous = step.step_id
        return self


class ForkOrigin(Contract):
    """The past state a fork made by ``conductor fork --from`` starts from: a step of another fork."""

    fork_id: Identifier
    step_id: StepId
    event_seq: int = Field(ge=0, description="seq of the parent fork's step.merged event for step_id")
    event_hash: Checksum = Field(description="hash of that event: the new fork's log links to it")
    commit: ObjectId = Field(description="the parent fork's state after step_id: a commit in .conductor/git")


class ForkRecord(Contract):
    """``fork_<id>/fork.json``: a fork added to an existing plan by ``conductor fork --from``.

    ``plan.json`` is never rewritten; a plan's forks are its own plus every recorded fork.
    """

    schema_: Literal["conductor.fork/v1"] = Field(default="conductor.fork/v1", alias="schema")
    plan_id: Identifier
    fork: ForkSpec
    parent: ForkOrigin
    reused_steps: list[StepId] = Field(description="steps taken over from the parent, not run again")
    instruction: str | None = Field(default=None, description="extra instruction added to every later step")
    created_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class PlannerInfo(Contract):
    """Who made the plan."""

    kind: Literal["llm", "file", "handoff"]
    provider: str | None = None
    model: str | None = None
    source: str | None = Field(default=None, description="plan file path, for kind=file")


class ExecutorChoice(Contract):
    """The executor a plan was started with. ``resume``, ``fork --from`` and repairs call the same provider
    and model unless a flag overrides them (an override is logged as ``plan.models_overridden``)."""

    kind: Literal["llm", "command", "handoff"]
    provider: str | None = Field(default=None, description="for kind=llm: openai | gemini")
    model: str | None = Field(default=None, description="for kind=llm: the model name sent to the provider")


class Plan(Contract):
    """``plan.json``: the goal, its forks and the plan-level policy. Written once, checksummed."""

    schema_: Literal["conductor.plan/v1"] = Field(default=PLAN_SCHEMA, alias="schema")
    plan_id: Identifier
    goal: str
    created_at: str
    planner: PlannerInfo
    executor: ExecutorChoice | None = Field(
        default=None, description="the executor the plan was started with; absent in plans made before it was "
        "recorded (they continue with config.yaml's)")
    policy: PolicyLayer = Field(default_factory=PolicyLayer)
    forks: list[ForkSpec] = Field(min_length=1)
    base_commit: ObjectId | None = Field(
        default=None, description="the project as the plan began (uncommitted and untracked files included): "
        "a commit in .conductor/git; set when the plan is written")
    project_policy: PolicyLayer | None = Field(
        default=None, description="the project's policy.yaml as the plan began, pinned: a later edit of "
        "policy.yaml can only tighten this plan, never loosen it; set when the plan is written")
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def fork(self, fork_id: str) -> ForkSpec:
        """Return the fork with this id.

        Raises:
            KeyError: no such fork.
        """
        for fork in self.forks:
            if fork.fork_id == fork_id:
                return fork
        raise KeyError(fork_id)


# --- task ---------------------------------------------------------------------------------------


class Confidence(Contract):
    """Pre-execution confidence: high ≥ 0.8 (autonomous), medium ≥ 0.5 (extra checks), low (approval)."""

    score: float = Field(ge=0.0, le=1.0)
    level: ConfidenceLevel
    reasons: list[str] = Field(default_factory=list)


MAX_OUTPUT_TAIL_BYTES = 4 * 1024
"""Bytes of a failing command's output (its tail) a previous attempt carries."""
MAX_DIFF_EVIDENCE_BYTES = 8 * 1024
"""Bytes of a rejected attempt's diff a previous attempt carries."""


class PreviousAttempt(Contract):
    """The evidence of one earlier attempt of a step, carried by every later attempt's task file.

    Built by Conductor when it archives a rejected or failed attempt (``conductor.repair``); bounded and
    redacted: ``output_tail`` ≤ 4 KiB, ``diff`` ≤ 8 KiB, secrets replaced by ``[REDACTED]``.
    """

    attempt: int = Field(ge=1)
    outcome: Literal["rejected", "failed", "malformed", "lease_expired"] = Field(
        description="rejected: by Conductor's verifier; failed: the executor reported failure; malformed: its "
        "result or task file could not be trusted (checksum, schema, mismatch); lease_expired: its holder "
        "stopped renewing the lease")
    reasons: list[str] = Field(default_factory=list, description="why it was rejected, one line each")
    summary: str = Field(default="", description="the executor's own one-line summary")
    files: list[str] = Field(default_factory=list, description="paths it changed (Conductor's capture when it "
                             "has one, else the executor's report)")
    failed_command: str | None = Field(default=None, description="the first verification command that failed")
    output_tail: str = Field(default="", description="the last bytes (≤ 4 KiB) of that command's output")
    diff: str = Field(default="", description="its change as a unified diff against base_commit (≤ 8 KiB)")
    diff_truncated: bool = False
    forbidden: list[str] = Field(default_factory=list, description="paths it changed that the policy does not "
                                 "allow (outside allowed_files, or protected): a repair must leave them alone")


class Task(Contract):
    """``<step>.task.json``: one attempt of one step, as handed to an executor. Checksummed."""

    schema_: Literal["conductor.task/v1"] = Field(default=TASK_SCHEMA, alias="schema")
    task_id: StepId
    plan_id: Identifier
    fork_id: Identifier
    attempt: int = Field(ge=1)
    title: str = ""
    instruction: str = Field(min_length=1)
    allowed_files: list[str]
    protected_patterns: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)
    depends_on: list[StepId] = Field(default_factory=list)
    workspace: str = Field(description="the directory to work in, relative to the project root")
    base_commit: ObjectId = Field(description="the commit the workspace was checked out at (its .git HEAD); "
                                  "what changed is the working tree against it")
    timeout_seconds: int = Field(gt=0)
    max_diff_lines: int = Field(ge=0)
    max_diff_bytes: int = Field(default=2 * 1024 * 1024, ge=0, description="bytes of new content a step may add")
    sandbox_mode: SandboxMode = Field(default="auto", description="how launched commands are contained: "
                                      "required | auto | off (docs/security.md)")
    network: bool = Field(default=False, description="whether launched commands may reach the network")
    ignore: list[str] = Field(
        default_factory=list, description="gitignore-style patterns (config.yaml workspace.ignore) Conductor "
        "leaves out of what an attempt changed; files_changed entries matching them are not counted")
    policy_digest: Checksum
    confidence: Confidence
    max_attempts: int | None = Field(
        # Above the policy's bound: each attempt given back before any work (reason "given_back") adds one.
        default=None, ge=1, le=10 * MAX_ATTEMPTS_BOUND, description="the step's attempt budget (policy "
        "behavior.max_attempts, plus one per attempt given back unworked); None: the reaper's executor.max_attempts")
    previous_attempts: list[PreviousAttempt] = Field(
        default_factory=list, description="evidence of every earlier attempt of this step, oldest first")
    created_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class Lease(Contract):
    """``<step>.lease.json`` beside a claimed task: who holds it and until when.

    ``fencing_token`` equals the task's ``attempt``: a completion whose token is not the task's
    current attempt comes from a stale holder and is rejected.
    """

    schema_: Literal["conductor.lease/v1"] = Field(default="conductor.lease/v1", alias="schema")
    task_id: StepId
    attempt: int = Field(ge=1)
    fencing_token: int = Field(ge=1)
    holder: str
    pid: int = Field(description="a process that lives as long as the work; 0: none, the lease is held by time "
                     "alone (conductor task): only expires_at and the step's timeout end it")
    host: str
    acquired_at: str
    renewed_at: str
    expires_at: str
    pgid: int | None = Field(
        default=None, ge=1, description="process group of the command doing the work, once it started; optional"
    )
    pgid_start: str | None = Field(
        default=None, min_length=1,
        description="'<boot_id>:<starttime>' of that group's leader (Linux /proc), proof against pid reuse; optional",
    )
    contained: bool | None = Field(
        default=None,
        description="true: nothing of the work can outlive the holder `pid`: it runs inside that process and "
        "starts none (set at the claim), or every process of it runs in a pid namespace that dies with it "
        "(bubblewrap --unshare-pid --die-with-parent; recorded with pgid). Once that pid is gone nothing of the "
        "attempt can write its workspace, and the retry may take the folder; optional",
    )
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --- result and verdict -------------------------------------------------------------------------


class FileChange(Contract):
    """One changed path in a workspace."""

    path: str
    change: Literal["added", "modified", "deleted"]
    sha256: str | None = Field(default=None, description="hex digest of the new content; None if deleted")
    lines_added: int = Field(default=0, ge=0)
    lines_removed: int = Field(default=0, ge=0)
    binary: bool = False
    mode: GitMode | None = Field(
        default=None, description="git mode of the new entry (100644 file, 100755 executable, 120000 symlink); "
        "None if deleted or not reported")
    size: int | None = Field(default=None, ge=0, description="bytes of the new content; None if deleted or "
                             "not reported")
    old_mode: GitMode | None = Field(default=None, description="git mode before the change; None if added or not reported")


class ErrorInfo(Contract):
    """Why something failed: a machine-readable ``kind`` and a message for people."""

    kind: str
    message: str


class Usage(Contract):
    """LLM usage of one step or call."""

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cost_usd: float | None = Field(default=None, ge=0.0)

    def __add__(self, other: Usage) -> Usage:
        cost = None if self.cost_usd is None and other.cost_usd is None else (
            (self.cost_usd or 0.0) + (other.cost_usd or 0.0)
        )
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost_usd=cost,
        )


class ExecutorInfo(Contract):
    """Identity of an executor."""

    id: str = Field(description="e.g. 'conductor-worker@host:pid', 'llm:openai/gpt-4.1-mini'")
    kind: str = Field(description="llm | command | handoff | any name an external executor gives")
    version: str | None = None
    model: str | None = None


class Result(Contract):
    """``<step>.result.json``: what the executor says it did. Checksummed; never trusted alone."""

    schema_: Literal["conductor.result/v1"] = Field(default=RESULT_SCHEMA, alias="schema")
    task_id: FileStem = Field(description="the task's id; for a task file rejected unread, the file's name stem")
    plan_id: Identifier
    fork_id: Identifier
    attempt: int = Field(ge=1)
    fencing_token: int = Field(ge=1)
    task_checksum: Checksum
    status: Literal["completed", "failed"]
    executor: ExecutorInfo
    files_changed: list[Annotated[FileChange, AfterValidator(_tree_change)]] = Field(
        default_factory=list,
        description="workspace entries as a directory walk finds them: relative, no empty, '.' or '..' part, no NUL",
    )
    summary: str = ""
    error: ErrorInfo | None = None
    started_at: str
    finished_at: str
    usage: Usage = Field(default_factory=Usage)
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class CommandEvidence(Contract):
    """One verification command and what it did."""

    command: str
    exit_code: int | None = Field(description="None if it timed out or could not start")
    duration_seconds: float = Field(ge=0.0)
    timed_out: bool = False
    output_sha256: str = Field(description="hex SHA-256 of the combined stdout+stderr")
    output_tail: str = Field(description="the last 4,000 characters of the output")
    sandboxed: bool = Field(default=False, description="whether it ran inside the sandbox (docs/security.md)")


class Check(Contract):
    """One check of a verdict."""

    name: str
    passed: bool
    detail: str = ""


class Verdict(Contract):
    """``<step>.verdict.json``: Conductor's own decision on a finished attempt. Checksummed."""

    schema_: Literal["conductor.verdict/v1"] = Field(default=VERDICT_SCHEMA, alias="schema")
    task_id: StepId
    plan_id: Identifier
    fork_id: Identifier
    attempt: int = Field(ge=1)
    accepted: bool
    reasons: list[str] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    files_changed: list[FileChange] = Field(default_factory=list, description="ground truth from hashing")
    diff_lines: int = Field(ge=0)
    verification: list[CommandEvidence] = Field(default_factory=list)
    policy_digest: Checksum
    tree: ObjectId | None = Field(default=None, description="the attempt's working tree as captured (.conductor/git)")
    commit: ObjectId | None = Field(default=None, description="the fork's state after merging an accepted attempt")
    decided_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --- audit --------------------------------------------------------------------------------------


class Event(Contract):
    """One line of ``audit.log``: ``hash`` is SHA-256 over the JCS form of the entry without ``hash``;
    ``prev`` is the previous entry's hash (the genesis value for ``seq`` 0)."""

    seq: int = Field(ge=0)
    ts: str
    type: str = Field(pattern=r"^[a-z_]+(\.[a-z_]+)+$")
    data: dict[str, Any] = Field(default_factory=dict)
    prev: Checksum
    hash: Checksum


CONTRACT_MODELS: dict[str, type[BaseModel]] = {
    "plan": Plan,
    "fork": ForkRecord,
    "task": Task,
    "lease": Lease,
    "result": Result,
    "verdict": Verdict,
    "event": Event,
    "policy": PolicyLayer,
}
