"""The operations behind the CLI, as plain functions over typed arguments (no click, no rich).

``open_project`` → ``new_plan`` → ``run_plan``; ``resume_plan``; ``approve_step``; ``start_worker``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conductor.audit import AuditLog
from conductor.config import Config
from conductor.engine import Engine, EngineOptions, RunnerFactory, RunReport
from conductor.errors import ConfigError, NotFound
from conductor.layout import ProjectLayout
from conductor.llm.base import LLMClient, LLMSettings
from conductor.keys import SigningKey
from conductor.llm.ledger import BudgetLimits, Ledger, call_scope, ledger_path
from conductor.models import ExecutorChoice, ForkRecord, Plan, PolicyLayer
from conductor.plan_store import (
    create_plan,
    fork_log,
    latest_plan_id,
    policy_layers,
    load_plan,
    plan_log,
)
from conductor.recovery import recover_project


@dataclass(frozen=True)
class Project:
    """A loaded project: where it is and what its config and policy say."""

    layout: ProjectLayout
    config: Config
    policy: PolicyLayer
    environ: Mapping[str, str]


def open_project(
    start: Path, *, environ: Mapping[str, str] = os.environ, overrides: Mapping[str, Any] | None = None
) -> Project:
    """Find the project holding ``start`` and load its config (with env and flag overrides) and policy.

    Raises:
        NotFound: no ``.conductor/`` folder at or above ``start``.
        ConfigError: config.yaml or policy.yaml is invalid.
    """
    from conductor.project import load_project

    layout = ProjectLayout.find(start)
    config, policy = load_project(layout, environ)
    if overrides:
        config = config.override(overrides)
    return Project(layout=layout, config=config, policy=policy, environ=environ)


@dataclass(frozen=True)
class RunChoices:
    """What the command line chose for one run; ``None`` = not given.

    Attributes:
        provider, model: ``--provider`` / ``--model``; on ``resume`` and ``fork`` they override the plan's
            recorded executor (``plan.models_overridden``).
        budget_usd, budget_tokens: ``--budget-usd`` / ``--budget-tokens``, the plan's LLM budget (USD;
            input + output tokens); remembered by the plan (``budget.set``).
    """

    provider: str | None = None
    model: str | None = None
    budget_usd: float | None = None
    budget_tokens: int | None = None

    @property
    def sets_budget(self) -> bool:
        return self.budget_usd is not None or self.budget_tokens is not None


def llm_settings(config: Config, *, provider: str, model: str) -> LLMSettings:
    """LLM settings for one provider and model from the config's ``llm`` section (``llm.prices`` of the
    model, else the global prices)."""
    base_url = config.llm.openai_base_url if provider == "openai" else config.llm.gemini_base_url
    price_in, price_out = config.llm.price_of(model)
    return LLMSettings(
        provider=provider, model=model, base_url=base_url, timeout_seconds=config.llm.timeout_seconds,
        max_retries=config.llm.max_retries, temperature=config.llm.temperature,
        input_usd_per_million=price_in, output_usd_per_million=price_out,
        max_output_tokens=config.llm.max_output_tokens,
    )


_LEDGERS: dict[Path, Ledger] = {}
_LEDGERS_GUARD = threading.Lock()


def project_ledger(project: Project) -> Ledger:
    """The project's cost ledger, one object per process (every client of the process shares its fold)."""
    path = ledger_path(project.layout.conductor_dir)
    with _LEDGERS_GUARD:
        return _LEDGERS.setdefault(path, Ledger(path))


def _client(project: Project, *, provider: str, model: str, no_cache: bool = False,
            budget: BudgetLimits | None = None) -> LLMClient:
    """The provider's client, behind the project's recordings of earlier calls and its cost ledger.

    Args:
        no_cache: call the provider even when a recording of the same request exists (and record anew).
        budget: limits every call is reserved against (``conductor.llm.metered``); None: none.

    Raises:
        CredentialsMissing: the provider has no key. ConfigError: a USD budget and no price for the model.
    """
    from conductor.llm import make_client
    from conductor.llm.metered import MeteredClient
    from conductor.llm.recording import RecordingClient, RecordingStore

    client = make_client(llm_settings(project.config, provider=provider, model=model), project.environ)
    recorded = RecordingClient(client, RecordingStore(project.layout.recordings_dir), refresh=no_cache)
    return MeteredClient(recorded, project_ledger(project), budget)


def budget_limits(project: Project, plan_id: str | None, choices: RunChoices | None = None) -> BudgetLimits:
    """The LLM budget of a run: each plan limit from its flag, else the plan's last ``budget.set``, else
    ``config.yaml``'s ``budget`` section; the fork limits from ``config.yaml``."""
    choices = choices or RunChoices()
    config = project.config.budget
    usd, tokens = config.plan_usd, config.plan_tokens
    if plan_id is not None:
        recorded = next((e for e in reversed(plan_log(project.layout, plan_id).events()) if e.type == "budget.set"), None)
        if recorded is not None:
            usd, tokens = recorded.data.get("plan_usd"), recorded.data.get("plan_tokens")
    usd = choices.budget_usd if choices.budget_usd is not None else usd
    tokens = choices.budget_tokens if choices.budget_tokens is not None else tokens
    return BudgetLimits(plan_usd=usd, plan_tokens=tokens, fork_usd=config.fork_usd, fork_tokens=config.fork_tokens)


def _record_budget(project: Project, plan_id: str, choices: RunChoices) -> None:
    if choices.sets_budget:
        limits = budget_limits(project, plan_id, choices)
        plan_log(project.layout, plan_id).append("budget.set", {
            "plan_usd": limits.plan_usd, "plan_tokens": limits.plan_tokens, "by": "flags"})


def executor_choice(config: Config) -> ExecutorChoice:
    """What a new plan records as its executor (``plan.json`` ``executor``)."""
    if config.executor.kind != "llm":
        return ExecutorChoice(kind=config.executor.kind)
    return ExecutorChoice(kind="llm", provider=config.executor_provider, model=config.executor_model)


def plan_project(project: Project, plan: Plan, choices: RunChoices | None = None) -> tuple[Project, dict[str, Any] | None]:
    """The project as ``plan``'s steps run: the executor's provider and model are the plan's own (as it was
    started), not ``config.yaml``'s, unless ``--provider`` / ``--model`` override them.

    Returns:
        The project with its config so changed (so the engine and the confidence history see the model
        that runs), and the data of a ``plan.models_overridden`` event when a flag changed the plan's
        choice (else None). A plan made before executors were recorded, or run now by a non-``llm``
        executor, keeps ``config.yaml``'s.
    """
    choices = choices or RunChoices()
    recorded = plan.executor
    config = project.config
    if recorded is None or recorded.kind != "llm" or recorded.provider is None or config.executor.kind != "llm":
        return project, None
    provider = choices.provider or recorded.provider
    if choices.model is not None:
        model = choices.model
    elif provider == recorded.provider and recorded.model is not None:
        model = recorded.model
    else:  # another provider without --model: the recorded model is not one of its models
        model = config.executor_model
    config = config.override({"executor.provider": provider, "executor.model": model})
    override = None
    if (provider, model) != (recorded.provider, recorded.model):
        override = {"role": "executor", "recorded": {"provider": recorded.provider, "model": recorded.model},
                    "used": {"provider": provider, "model": model}, "by": "flags"}
    return replace(project, config=config), override


def runner_factory(project: Project, *, no_cache: bool = False, budget: BudgetLimits | None = None) -> RunnerFactory | None:
    """The in-process executor for the configured kind (None for ``handoff``).

    Builds the LLM client at once, so a missing API key fails before anything is written.

    Args:
        budget: the LLM budget every step's call is reserved against.

    Raises:
        CredentialsMissing: the executor's provider has no key.
        ConfigError: a USD budget is set and the executor's model has no price.
    """
    config = project.config
    if config.executor.kind == "handoff":
        return None
    if config.executor.kind == "command":
        from conductor.executors.command import CommandRunner

        command = config.executor.command
        assert command is not None  # validated by ExecutorConfig
        from conductor.handoff.lease import holder_name

        identity = holder_name("conductor-engine")
        return lambda log: CommandRunner(command, layout=project.layout, environ=project.environ, identity=identity,
                                         env_names=config.executor.env)
    from conductor.executors.llm import LLMRunner

    client = _client(project, provider=config.executor_provider, model=config.executor_model, no_cache=no_cache,
                     budget=budget)
    return lambda log: LLMRunner(client, on_event=log.append)


def new_plan(
    project: Project, *, goal: str | None, plan_file: Path | None, forks: int, no_cache: bool = False,
    on_planning: Callable[[Any], None] = lambda task: None, choices: RunChoices | None = None,
) -> Plan:
    """Plan ``goal`` (with the LLM planner, an agent's answer to a planning task when ``planner.kind`` is
    ``handoff``, or from ``plan_file``) and write the plan to disk.

    Args:
        on_planning: receives the published ``PlanningTask`` (handoff planning only), e.g. to tell the user.
        choices: the flags of the run: the plan records its executor (``plan.json`` ``executor``, from the
            config with ``--provider``/``--model`` in it) and the budget they set (``budget.set``).

    Raises:
        ConfigError: no goal, or an invalid plan file.
        CredentialsMissing / BackendError: the planner's provider failed.
        PlanningFailed: handoff planning got no acceptable plan (every attempt rejected, or the timeout).
        BudgetExceeded: the planner's call does not fit the budget (nothing is written).
        KeyFileError: a ``trust.keys`` public key is missing or unusable (naming it and its config line;
            nothing is written).
    """
    choices = choices or RunChoices()
    check_trusted_keys(project)  # a key that cannot be loaded stops the run before plan.json exists
    sealed = _make_plan(project, goal=goal, plan_file=plan_file, forks=forks, no_cache=no_cache,
                        on_planning=on_planning, choices=choices)
    _record_budget(project, sealed.plan_id, choices)
    return sealed


def check_trusted_keys(project: Project) -> None:
    """Load every ``trust.keys`` public key of config.yaml, as the verifier will.

    Raises:
        KeyFileError: a key file is missing, malformed or not Ed25519, naming the file, the entry and
            its line in config.yaml.
    """
    from conductor.keys import TrustStore

    TrustStore.for_project(project.layout.keys_dir, project.config.trust, project.layout.conductor_dir)


def _make_plan(project: Project, *, goal: str | None, plan_file: Path | None, forks: int, no_cache: bool,
               on_planning: Callable[[Any], None], choices: RunChoices) -> Plan:
    from conductor.planner import new_plan_id, plan_from_file, plan_with_llm

    ignore = list(project.config.workspace.ignore)
    executor = executor_choice(project.config)
    if plan_file is not None:
        plan = plan_from_file(plan_file, goal=goal, forks=forks).model_copy(update={"executor": executor})
        return create_plan(project.layout, plan, ignore=ignore, project_policy=project.policy)
    if not goal:
        raise ConfigError("no goal given (pass a goal, or --plan FILE)")
    planner = project.config.planner
    if planner.kind == "handoff":
        return _plan_by_handoff(project, goal=goal, forks=forks, on_planning=on_planning)
    client = _client(project, provider=planner.provider, model=planner.model, no_cache=no_cache,
                     budget=budget_limits(project, None, choices))
    calls: list[dict[str, Any]] = []
    plan_id = new_plan_id()  # before the call: the ledger files the planner's call under the plan
    with call_scope(plan_id=plan_id, purpose="plan"):
        plan = plan_with_llm(client, goal=goal, forks=forks, root=project.layout.root,
                             constraints=list(project.policy.global_constraints), on_call=calls.append)
    plan = plan.model_copy(update={"plan_id": plan_id, "executor": executor})
    sealed = create_plan(project.layout, plan, ignore=ignore, project_policy=project.policy)
    log = plan_log(project.layout, sealed.plan_id)
    for call in calls:
        log.append("llm.call", call)
    return sealed


def _plan_by_handoff(project: Project, *, goal: str, forks: int, on_planning: Callable[[Any], None]) -> Plan:
    """Handoff planning (``conductor.handoff.planning``): the accepted plan, written, with ``planning.accepted``
    in its log."""
    from conductor.handoff.planning import plan_by_handoff

    config = project.config
    plan, round_ = plan_by_handoff(
        project.layout, goal=goal, strategies=forks, policy=project.policy, verification=config.verification.commands,
        max_attempts=config.executor.max_attempts, lease_seconds=config.executor.lease_seconds,
        timeout_seconds=config.planner.handoff_timeout_seconds, poll_seconds=config.executor.poll_seconds,
        on_published=on_planning)
    plan = plan.model_copy(update={"executor": executor_choice(config)})
    sealed = create_plan(project.layout, plan, ignore=list(config.workspace.ignore), project_policy=project.policy)
    assert round_.accepted is not None
    attempt, verdict = round_.accepted
    plan_log(project.layout, sealed.plan_id).append("planning.accepted", {
        "attempt": attempt, "holder": verdict.holder, "answer_sha256": verdict.answer_sha256,
        "verdict_checksum": verdict.checksum, "forks": len(sealed.forks),
        "rejected_attempts": [r.attempt for r in round_.rejections]})
    return sealed


def run_plan(
    project: Project, plan: Plan, options: EngineOptions, *,
    on_progress: Callable[[], None] = lambda: None, stop: threading.Event | None = None,
    factory: RunnerFactory | None = None,
) -> RunReport:
    """Run (or continue) ``plan`` until it finishes or halts."""
    recover_project(project.layout, plan_id=plan.plan_id, exclusive=True, ignore=project.config.workspace.ignore)
    _check_sandbox(project, plan)
    factory = factory if factory is not None else runner_factory(project)
    engine = Engine(project.layout, project.config, project.policy, plan, runner_factory=factory,
                    options=options, on_progress=on_progress, signer=project_signer(project))
    return engine.run(stop)


def _check_sandbox(project: Project, plan: Plan) -> None:
    """``required`` without a sandbox stops the run before anything is launched; ``auto`` without one is
    recorded once in the plan's log (``sandbox.unavailable``) and every command then runs uncontained.

    Raises:
        SandboxUnavailable: the plan's policy requires a sandbox and none can be made here.
    """
    from conductor.policy import merge_policies
    from conductor.sandbox import availability, require

    effective = merge_policies(policy_layers(plan, project.policy)).effective
    require(effective.sandbox_mode)
    why = availability()
    if effective.sandbox_mode == "auto" and why is not None:
        log = plan_log(project.layout, plan.plan_id)
        if not any(e.type == "sandbox.unavailable" for e in log.events()):
            log.append("sandbox.unavailable", {"mode": "auto", "reason": why})


def project_signer(project: Project) -> SigningKey:
    """The key Conductor signs with: ``CONDUCTOR_SIGNING_KEY_FILE``, else the project's key kept outside
    the project (``conductor.keys``; made now, or moved out of ``.conductor/keys/``, if needed).

    Raises:
        KeyFileError: the key file is unreadable, malformed or readable by others.
    """
    from conductor.keys import project_key

    key = project_key(project.layout.keys_dir, project.layout.conductor_dir, project.environ)
    assert key is not None  # create=True
    return key


def resume_plan(project: Project, plan_id: str | None) -> Plan:
    """Load the plan to resume (the newest unfinished one by default) and record the resume.

    Raises:
        NotFound: no such plan, or no unfinished plan.
        IntegrityError: plan.json was altered.
    """
    plan = _plan_to_resume(project, plan_id)
    plan_log(project.layout, plan.plan_id).append("plan.resumed", {"pid": os.getpid()})
    return plan


def _plan_to_resume(project: Project, plan_id: str | None) -> Plan:
    recover_project(project.layout, plan_id=plan_id)  # a torn log tail would stop the lookup and the append
    plan_id = plan_id or latest_plan_id(project.layout, unfinished=True)
    return load_plan(project.layout, plan_id)


def prepare_resume(
    project: Project, plan_id: str | None, choices: RunChoices | None = None, *, no_cache: bool = False,
) -> tuple[Project, Plan, RunnerFactory | None]:
    """:func:`resume_plan` with the plan's own executor model (:func:`plan_project`) and its budget.

    The executor is built before anything is recorded, so a missing API key changes nothing.

    Returns:
        The project as the plan runs (pass it to :func:`run_plan`), the plan, and its executor factory.

    Raises:
        NotFound, IntegrityError: as :func:`resume_plan`. CredentialsMissing: the plan's provider has no key.
    """
    choices = choices or RunChoices()
    plan = _plan_to_resume(project, plan_id)
    running, override = plan_project(project, plan, choices)
    factory = runner_factory(running, no_cache=no_cache, budget=budget_limits(project, plan.plan_id, choices))
    plan_log(project.layout, plan.plan_id).append("plan.resumed", {"pid": os.getpid()})
    _record_run(project, plan.plan_id, override, choices)
    return running, plan, factory


def prepare_fork(
    project: Project, plan_id: str | None, step_id: str, *, fork_id: str | None, instruction: str | None,
    choices: RunChoices | None = None, no_cache: bool = False,
) -> tuple[Project, ForkRecord, Plan, RunnerFactory | None]:
    """:func:`fork_plan` with the plan's own executor model (:func:`plan_project`) and its budget.

    Raises:
        as :func:`fork_plan`; CredentialsMissing: the plan's provider has no key (nothing is written).
    """
    choices = choices or RunChoices()
    plan = load_plan(project.layout, resolve_plan_id(project.layout, plan_id))
    running, override = plan_project(project, plan, choices)
    factory = runner_factory(running, no_cache=no_cache, budget=budget_limits(project, plan.plan_id, choices))
    record, plan = fork_plan(project, plan.plan_id, step_id, fork_id=fork_id, instruction=instruction)
    _record_run(project, plan.plan_id, override, choices)
    return running, record, plan, factory


def _record_run(project: Project, plan_id: str, override: dict[str, Any] | None, choices: RunChoices) -> None:
    if override is not None:
        plan_log(project.layout, plan_id).append("plan.models_overridden", override)
    _record_budget(project, plan_id, choices)


def fork_plan(
    project: Project, plan_id: str | None, step_id: str, *, fork_id: str | None, instruction: str | None
) -> tuple[ForkRecord, Plan]:
    """Add a fork that starts after ``step_id`` (see ``conductor.timetravel.fork_from``) and record it.

    Returns:
        The fork's record and the plan with the fork in it, ready for :func:`run_plan`.

    Raises:
        NotFound: no such plan or merged step. ConfigError: the step is ambiguous or the last one.
    """
    from conductor.timetravel import fork_from

    plan_id = resolve_plan_id(project.layout, plan_id)
    record = fork_from(project.layout, plan_id, step_id, fork_id=fork_id, instruction=instruction)
    plan_log(project.layout, plan_id).append("plan.forked", {
        "fork_id": record.fork.fork_id, "parent": record.parent.model_dump(mode="json"),
        "instruction": record.instruction, "pid": os.getpid(),
    })
    return record, load_plan(project.layout, plan_id)


def approve_step(project: Project, step_id: str, *, plan_id: str | None, fork_id: str | None, by: str) -> list[str]:
    """Approve a low-confidence step that waits for approval.

    Returns:
        The fork ids where the step was approved.

    Raises:
        NotFound: the step waits for approval in no fork (of the selected plan/fork).
    """
    plan_id = plan_id or latest_plan_id(project.layout)
    plan = load_plan(project.layout, plan_id)
    approved = []
    for spec in plan.forks:
        if fork_id is not None and spec.fork_id != fork_id:
            continue
        log = fork_log(project.layout, plan_id, spec.fork_id)
        events = log.events()
        requested = any(e.type == "approval.requested" and e.data.get("step_id") == step_id for e in events)
        granted = any(e.type == "approval.granted" and e.data.get("step_id") == step_id for e in events)
        if requested and not granted:
            log.append("approval.granted", {"step_id": step_id, "by": by})
            approved.append(spec.fork_id)
    if not approved:
        where = f"fork {fork_id} of plan {plan_id}" if fork_id else f"plan {plan_id}"
        raise NotFound(f"{step_id} does not wait for approval in {where}")
    return approved


def audit_logs(layout: ProjectLayout, plan_id: str) -> list[tuple[str, AuditLog]]:
    """The plan's logs, labelled: ``("plan", …)`` then ``("fork 1", …)``…"""
    logs = [("plan", plan_log(layout, plan_id, cut_torn_tail=False))]
    for folder in sorted(layout.plan_dir(plan_id).glob("fork_*")):
        logs.append((f"fork {folder.name[5:]}", AuditLog(folder / "audit.log")))
    return logs


def resolve_plan_id(layout: ProjectLayout, plan_id: str | None) -> str:
    """``plan_id`` if given and known, else the newest plan.

    Raises:
        NotFound: no such plan.
    """
    if plan_id is None:
        return latest_plan_id(layout)
    if plan_id not in layout.plan_ids():
        raise NotFound(f"no plan {plan_id!r}")
    return plan_id
