"""``.conductor/config.yaml``: planner, executor, verification, LLM, workspace and approval settings.

Defaults are the field defaults below and nowhere else (``conductor/templates/config.yaml`` spells them
out for people, and a test checks that it loads back to them). Values are resolved in this order, each
overriding the previous one:

1. the defaults;
2. ``config.yaml``;
3. environment variables ``CONDUCTOR_<SECTION>_<KEY>`` for scalar keys, e.g. ``CONDUCTOR_PLANNER_MODEL``,
   ``CONDUCTOR_EXECUTOR_KIND``, ``CONDUCTOR_LLM_OPENAI_BASE_URL``, ``CONDUCTOR_APPROVAL_AUTO_APPROVE``
   (an empty value sets an optional key to null);
4. command-line flags, through :meth:`Config.override`.

A ``CONDUCTOR_<SECTION>_…`` variable that names no key is an error (a typo must not be silently
ignored); other ``CONDUCTOR_`` variables, such as ``CONDUCTOR_SIGNING_KEY_FILE``, are not config keys.

Every number has a lower and an upper bound (the constants below; docs/cli.md lists them), and floats
must be finite: a value out of range is a ``ConfigError`` (exit 3) when the file is loaded, never a
crash later (``lease_seconds: 1000000000000`` used to overflow the lease's expiry date mid-run).
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from conductor.errors import ConfigError
from conductor.yamlutil import (
    Document,
    Loc,
    display_path,
    format_validation_error,
    read_yaml_document,
)

ENV_PREFIX = "CONDUCTOR_"
Provider = Literal["openai", "gemini"]
DEFAULT_WORKSPACE_IGNORE = (
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".venv/",
    "venv/",
    "node_modules/",
)


MAX_FORKS = 16
"""Strategies one plan may explore (as ``explore --forks``): each is a fork with its own attempts."""
MAX_PARALLEL = 64
"""Tasks the engine runs at once: each holds a thread and, for a command, a process."""
MAX_ATTEMPTS = 100
"""Attempts per step before it fails."""
MAX_LEASE_SECONDS = 86_400
"""One day: the longest lease (and heartbeat); a dead holder's task waits at most this long."""
MAX_PLANNING_SECONDS = 86_400
"""One day: the longest handoff planning waits for an agent's plan."""
MAX_POLL_SECONDS = 3_600.0
"""Fallback re-check interval of watchers."""
MAX_COMMAND_SECONDS = 86_400
"""One day: the longest a verification command may run."""
MAX_LLM_TIMEOUT_SECONDS = 3_600.0
"""One hour per LLM request."""
MAX_LLM_RETRIES = 20
MAX_USD_PER_MILLION = 10_000.0
"""Price bound per million tokens, far above any price today; it keeps reported costs finite."""
MAX_OUTPUT_TOKENS = 1_000_000
"""Answer tokens one request may ask for, above any model's output limit today."""
MAX_BUDGET_USD = 1_000_000.0
MAX_BUDGET_TOKENS = 10**12


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlannerConfig(_Section):
    """How plans are made."""

    provider: Provider = "openai"
    model: str = Field(default="gpt-4.1-mini", min_length=1)
    forks: int = Field(default=3, ge=1, le=MAX_FORKS, description="strategies asked for by `explore`")
    kind: Literal["llm", "handoff"] = Field(
        default="llm", description="llm: Conductor asks the model; handoff: an agent answers a planning task")
    handoff_timeout_seconds: int = Field(
        default=3_600, gt=0, le=MAX_PLANNING_SECONDS, description="how long handoff planning waits for an acceptable plan")


class ExecutorConfig(_Section):
    """Who executes tasks, and the lease timings of the handoff protocol (seconds)."""

    kind: Literal["llm", "command", "handoff"] = "llm"
    provider: Provider | None = Field(default=None, description="null: the planner's provider")
    model: str | None = Field(default=None, min_length=1, description="null: the planner's model")
    command: str | None = Field(default=None, min_length=1, description="required when kind is 'command'")
    parallel: int = Field(default=4, ge=1, le=MAX_PARALLEL, description="tasks executed at once")
    max_attempts: int = Field(default=3, ge=1, le=MAX_ATTEMPTS)
    lease_seconds: int = Field(default=60, gt=0, le=MAX_LEASE_SECONDS)
    heartbeat_seconds: int = Field(default=10, gt=0, le=MAX_LEASE_SECONDS)
    poll_seconds: float = Field(default=2.0, gt=0, le=MAX_POLL_SECONDS, allow_inf_nan=False)
    env: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list, description="names of environment variables passed on to launched commands, "
        "besides PATH, HOME, locale and CONDUCTOR_* (everything else, API keys included, is withheld)")

    @model_validator(mode="after")
    def _consistent(self) -> ExecutorConfig:
        if self.kind == "command" and not self.command:
            raise ValueError("kind 'command' requires executor.command")
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be less than "
                f"lease_seconds ({self.lease_seconds}), or leases expire between heartbeats"
            )
        return self


class VerificationConfig(_Section):
    """Commands run in a workspace after each step; all must exit 0."""

    commands: list[str] = Field(default_factory=list)
    timeout_seconds: int = Field(default=600, gt=0, le=MAX_COMMAND_SECONDS)


class ModelPrice(_Section):
    """The price of one model, USD per million tokens."""

    input_usd_per_million: float = Field(ge=0.0, le=MAX_USD_PER_MILLION, allow_inf_nan=False)
    output_usd_per_million: float = Field(ge=0.0, le=MAX_USD_PER_MILLION, allow_inf_nan=False)


class LlmConfig(_Section):
    """LLM client settings shared by planner and executor."""

    openai_base_url: str | None = Field(default=None, min_length=1)
    gemini_base_url: str | None = Field(default=None, min_length=1)
    timeout_seconds: float = Field(default=120, gt=0, le=MAX_LLM_TIMEOUT_SECONDS, allow_inf_nan=False)
    max_retries: int = Field(default=2, ge=0, le=MAX_LLM_RETRIES)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    input_usd_per_million: float | None = Field(
        default=None, ge=0.0, le=MAX_USD_PER_MILLION, allow_inf_nan=False, description="price of input tokens")
    output_usd_per_million: float | None = Field(
        default=None, ge=0.0, le=MAX_USD_PER_MILLION, allow_inf_nan=False, description="price of output tokens")
    prices: dict[Annotated[str, StringConstraints(min_length=1)], ModelPrice] = Field(
        default_factory=dict, description="model name -> its price; a model not listed has the two prices above")
    max_output_tokens: int = Field(
        default=16_384, ge=1, le=MAX_OUTPUT_TOKENS, description="answer tokens a request asks for at most; "
        "the worst case a budget reserves")

    def price_of(self, model: str) -> tuple[float | None, float | None]:
        """``(input, output)`` USD per million tokens of ``model``: its ``prices`` entry, else the global pair."""
        listed = self.prices.get(model)
        if listed is not None:
            return listed.input_usd_per_million, listed.output_usd_per_million
        return self.input_usd_per_million, self.output_usd_per_million


class BudgetConfig(_Section):
    """Limits of LLM spending (``conductor.llm.ledger``); null is no limit. Tokens count input + output.

    ``--budget-usd`` / ``--budget-tokens`` override the plan limits for one plan (and are remembered by it).
    """

    plan_usd: float | None = Field(default=None, gt=0.0, le=MAX_BUDGET_USD, allow_inf_nan=False)
    plan_tokens: int | None = Field(default=None, gt=0, le=MAX_BUDGET_TOKENS)
    fork_usd: float | None = Field(default=None, gt=0.0, le=MAX_BUDGET_USD, allow_inf_nan=False)
    fork_tokens: int | None = Field(default=None, gt=0, le=MAX_BUDGET_TOKENS)


class WorkspaceConfig(_Section):
    """Files left out of what an attempt changed (gitignore-style patterns), and whether attempt folders
    stay after a plan finishes."""

    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_WORKSPACE_IGNORE))
    keep: bool = False


class ApprovalConfig(_Section):
    """Whether low-confidence steps run without `conductor approve`."""

    auto_approve: bool = False


class TrustedKey(_Section):
    """A public key whose signatures Conductor accepts, and the executors it may sign for."""

    public_key: str = Field(min_length=1, description="PEM public key file; a relative path is under .conductor/")
    executors: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1, description="fnmatch patterns on executor ids; '*' = any"
    )


class TrustConfig(_Section):
    """Which keys may sign provenance (besides the project's own ``keys/signing.pub``)."""

    keys: list[TrustedKey] = Field(default_factory=list)
    require_signatures: bool = Field(default=False, description="true: unsigned provenance is a rejection")


class Config(_Section):
    """The whole of ``config.yaml``."""

    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    verification: VerificationConfig = Field(default_factory=VerificationConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    workspace: WorkspaceConfig = Field(default_factory=WorkspaceConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)

    @property
    def executor_provider(self) -> str:
        """The executor's provider, falling back to the planner's."""
        return self.executor.provider or self.planner.provider

    @property
    def executor_model(self) -> str:
        """The executor's model, falling back to the planner's."""
        return self.executor.model or self.planner.model

    def override(self, values: Mapping[str, Any]) -> Config:
        """A new validated Config with dotted keys replaced, e.g. ``{"planner.model": "x"}``.

        ``None`` values are skipped, so CLI flags that were not given can be passed as they are.

        Raises:
            ConfigError: an unknown key, or a value that does not validate (naming the key).
        """
        data = self.model_dump(mode="python")
        sources: dict[Loc, str] = {}
        for dotted, value in values.items():
            if value is None:
                continue
            section, key = _split_dotted(dotted)
            data[section][key] = value
            sources[(section, key)] = f"override {dotted}={value!r}"
        return _validate(Document(data=data, source="override"), sources)


def _split_dotted(dotted: str) -> tuple[str, str]:
    section, _, key = dotted.partition(".")
    if section not in Config.model_fields or key not in _section_model(section).model_fields:
        raise ConfigError(f"override {dotted}: unknown config key (known: {', '.join(_all_keys())})")
    return section, key


def _section_model(section: str) -> type[BaseModel]:
    annotation = Config.model_fields[section].annotation
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation


def _all_keys() -> list[str]:
    return [
        f"{section}.{key}" for section in Config.model_fields for key in _section_model(section).model_fields
    ]


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Load ``config.yaml`` and apply ``CONDUCTOR_<SECTION>_<KEY>`` environment overrides.

    Args:
        path: the config file; a missing file means all defaults.
        environ: the environment to read overrides from.

    Returns:
        The validated config.

    Raises:
        ConfigError: a YAML error, an unknown key, an invalid value (naming the file, key and line, or
            the environment variable it came from), an unknown ``CONDUCTOR_<SECTION>_…`` variable, or a
            broken cross-field rule (``kind: command`` without a command; heartbeat not below the lease).
    """
    if path.exists():
        document = read_yaml_document(path)
    else:
        document = Document(data={}, source=display_path(path))
    sources = _apply_environment(document.data, environ)
    return _validate(document, sources)


def _validate(document: Document, sources: Mapping[Loc, str]) -> Config:
    try:
        return Config.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Config, document, sources)) from exc


def env_variables() -> dict[str, tuple[str, str]]:
    """Every environment variable that overrides a scalar key: name -> (section, key)."""
    names = {}
    for section in Config.model_fields:
        for key, info in _section_model(section).model_fields.items():
            if not _is_list(info.annotation) and typing.get_origin(info.annotation) is not dict:
                names[f"{ENV_PREFIX}{section}_{key}".upper()] = (section, key)
    return names


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[Loc, str]:
    """Write environment overrides into ``data`` in place; return which keys came from which variable."""
    known = env_variables()
    section_prefixes = tuple(f"{ENV_PREFIX}{section}_".upper() for section in Config.model_fields)
    sources: dict[Loc, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(section_prefixes):
            continue  # CONDUCTOR_SIGNING_KEY_FILE and friends are not config keys
        if name not in known:
            raise ConfigError(_unknown_variable(name, known))
        section, key = known[name]
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the file's own error ("should be a valid dictionary") is clearer
        target[key] = _env_value(section, key, value)
        sources[(section, key)] = f"{name}={value!r}"
    return sources


def _unknown_variable(name: str, known: Mapping[str, tuple[str, str]]) -> str:
    section_prefix = name[: name.index("_", len(ENV_PREFIX)) + 1]
    candidates = sorted(n for n in known if n.startswith(section_prefix))
    return f"{name}: not a config variable (known: {', '.join(candidates)}; lists and maps are set in config.yaml)"


def _env_value(section: str, key: str, value: str) -> str | None:
    annotation = _section_model(section).model_fields[key].annotation
    if value == "" and _is_optional(annotation):
        return None
    return value


def _is_optional(annotation: Any) -> bool:
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list
