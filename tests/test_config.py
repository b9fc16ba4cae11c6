"""config.yaml loading, YAML error reporting, environment and CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from conductor.config import Config, env_variables, load_config
from conductor.errors import ConfigError
from conductor.models import Plan, PolicyLayer
from conductor.yamlutil import load_yaml_mapping, load_yaml_or_json_mapping


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- yamlutil -----------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.yaml", "behavior:\n  max_diff_lines: 5\n  timeout_seconds: [1\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_mapping(path, PolicyLayer, source="policy.yaml")
    assert str(info.value).startswith("policy.yaml:4: ")


def test_bad_indentation_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "planner:\n  model: x\n provider: openai\n")
    with pytest.raises(ConfigError, match=r"^c\.yaml:3: "):
        load_yaml_mapping(path, Config, source="c.yaml")


def test_unknown_key_two_levels_deep_names_key_path_and_line(tmp_path: Path) -> None:
    text = "# policy\nglobal_constraints: []\n\nfile_rules:\n  protected_patterns: []\n\n  protected_pattern: ['x']\n"
    path = write(tmp_path / "policy.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_yaml_mapping(path, PolicyLayer, source=".conductor/policy.yaml")
    assert str(info.value) == (
        ".conductor/policy.yaml:7: file_rules.protected_pattern: unknown key (known: protected_patterns)"
    )


def test_bad_value_names_key_and_line_and_several_errors_join(tmp_path: Path) -> None:
    text = "behavior:\n  max_diff_lines: lots\n  timeout_seconds: 0\nextra: 1\n"
    path = write(tmp_path / "p.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_yaml_mapping(path, PolicyLayer, source="p.yaml")
    parts = str(info.value).split("; ")
    assert "\n" not in str(info.value)
    assert parts[0].startswith("p.yaml:2: behavior.max_diff_lines: Input should be a valid integer")
    assert parts[1] == "p.yaml:3: behavior.timeout_seconds: Input should be greater than 0"
    assert parts[2].startswith("p.yaml:4: extra: unknown key (known: global_constraints, file_rules, behavior, sandbox)")


def test_list_item_error_names_index_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "global_constraints:\n  - ok\n  - [nested]\n")
    with pytest.raises(ConfigError, match=r"^p\.yaml:3: global_constraints\[1\]: Input should be a valid string"):
        load_yaml_mapping(path, PolicyLayer, source="p.yaml")


def test_unquoted_timestamps_stay_strings(tmp_path: Path) -> None:
    class Stamp(BaseModel):
        at: str
        day: str

    path = write(tmp_path / "s.yaml", "at: 2026-11-22T10:00:00Z\nday: 2026-11-22\n")
    assert load_yaml_mapping(path, Stamp) == Stamp(at="2026-11-22T10:00:00Z", day="2026-11-22")
    assert yaml.safe_load("d: 2026-11-22")["d"] != "2026-11-22"  # plain SafeLoader left untouched


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "behavior:\n  max_diff_lines: 10\n  max_diff_lines: 900\n")
    with pytest.raises(ConfigError, match=r"^p\.yaml:3: duplicate key 'max_diff_lines' \(first on line 2\)"):
        load_yaml_mapping(path, PolicyLayer, source="p.yaml")


def test_duplicate_keys_in_flow_mapping_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "behavior: {max_diff_lines: 1, max_diff_lines: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        load_yaml_mapping(path, PolicyLayer, source="p.yaml")


def test_empty_file_is_empty_mapping(tmp_path: Path) -> None:
    assert load_yaml_mapping(write(tmp_path / "p.yaml", ""), PolicyLayer) == PolicyLayer()
    assert load_yaml_mapping(write(tmp_path / "q.yaml", "# only a comment\n"), PolicyLayer) == PolicyLayer()


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml_mapping(write(tmp_path / "p.yaml", "- a\n- b\n"), PolicyLayer)


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "global_constraints: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:1: "):
        load_yaml_mapping(path, PolicyLayer, source="p.yaml")


def test_missing_required_key_names_parent_line(tmp_path: Path) -> None:
    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        needed: int

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inner: Inner

    path = write(tmp_path / "x.yaml", "\ninner:\n  other: 1\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_mapping(path, Outer, source="x.yaml")
    assert "x.yaml:2: inner.needed: required key is missing" in str(info.value)
    assert "x.yaml:3: inner.other: unknown key (known: needed)" in str(info.value)


def test_json_plan_file_parsed_strictly(tmp_path: Path) -> None:
    dup = write(tmp_path / "plan.json", '{"global_constraints": [], "global_constraints": ["x"]}')
    with pytest.raises(ConfigError, match="duplicate key"):
        load_yaml_or_json_mapping(dup, PolicyLayer)
    nan = write(tmp_path / "nan.json", '{"behavior": {"max_diff_lines": NaN}}')
    with pytest.raises(ConfigError, match="NaN"):
        load_yaml_or_json_mapping(nan, PolicyLayer)


def test_json_validation_errors_have_lines(tmp_path: Path) -> None:
    text = '{\n  "global_constraints": [],\n  "behavior": {\n    "max_diff_linez": 3\n  }\n}\n'
    path = write(tmp_path / "p.json", text)
    with pytest.raises(ConfigError, match=r"^p\.json:4: behavior\.max_diff_linez: unknown key"):
        load_yaml_or_json_mapping(path, PolicyLayer, source="p.json")


def test_yaml_plan_file_with_nested_error(tmp_path: Path) -> None:
    text = """\
plan_id: p1
goal: g
created_at: "2026-01-01T00:00:00Z"
planner: {kind: file}
forks:
  - fork_id: a
    strategy: {name: s}
    steps:
      - step_id: step_001
        instruction: do it
        policy:
          behavior: {max_diff_lines: -1}
"""
    path = write(tmp_path / "plan.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_yaml_or_json_mapping(path, Plan, source="plan.yaml")
    assert str(info.value).startswith(
        "plan.yaml:12: forks[0].steps[0].policy.behavior.max_diff_lines: Input should be greater than or equal to 0"
    )


# --- config -------------------------------------------------------------------------------------


def test_missing_config_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "config.yaml", environ={})
    assert config == Config()
    assert config.planner.provider == "openai"
    assert config.planner.model == "gpt-4.1-mini"
    assert config.planner.forks == 3
    assert config.executor.kind == "llm"
    assert config.executor.lease_seconds == 60
    assert config.verification.timeout_seconds == 600
    assert "node_modules/" in config.workspace.ignore
    assert config.approval.auto_approve is False
    assert (config.executor_provider, config.executor_model) == ("openai", "gpt-4.1-mini")


def test_config_file_values(tmp_path: Path) -> None:
    text = "planner:\n  provider: gemini\n  model: gemini-2.5-flash\nexecutor:\n  kind: command\n  command: ./run.sh\n"
    config = load_config(write(tmp_path / "config.yaml", text), environ={})
    assert config.planner.provider == "gemini"
    assert config.executor.command == "./run.sh"
    assert config.executor_model == "gemini-2.5-flash"


def test_unknown_provider_is_an_error_with_line(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "planner:\n  provider: anthropic\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: planner\.provider: Input should be 'openai' or 'gemini'"):
        load_config(path, environ={})


def test_command_executor_requires_command(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "\nexecutor:\n  kind: command\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: executor: kind 'command' requires executor\.command"):
        load_config(path, environ={})


def test_heartbeat_must_be_below_lease(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "executor:\n  lease_seconds: 10\n  heartbeat_seconds: 10\n")
    with pytest.raises(ConfigError, match="heartbeat_seconds \\(10\\) must be less than lease_seconds \\(10\\)"):
        load_config(path, environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "planner:\n  model: from-file\n")
    environ = {
        "CONDUCTOR_PLANNER_MODEL": "from-env",
        "CONDUCTOR_PLANNER_PROVIDER": "gemini",
        "CONDUCTOR_PLANNER_FORKS": "5",
        "CONDUCTOR_EXECUTOR_KIND": "command",
        "CONDUCTOR_EXECUTOR_COMMAND": "claude -p",
        "CONDUCTOR_LLM_OPENAI_BASE_URL": "http://localhost:11434/v1",
        "CONDUCTOR_LLM_TEMPERATURE": "0.2",
        "CONDUCTOR_APPROVAL_AUTO_APPROVE": "true",
        "CONDUCTOR_SIGNING_KEY_FILE": "/keys/k",  # not a config key: ignored
        "CONDUCTOR_WORKSPACE": "/somewhere",  # no key part: ignored
        "HOME": "/nowhere",
    }
    config = load_config(path, environ=environ)
    assert config.planner.model == "from-env"
    assert config.planner.provider == "gemini"
    assert config.planner.forks == 5
    assert config.executor.kind == "command"
    assert config.executor.command == "claude -p"
    assert config.llm.openai_base_url == "http://localhost:11434/v1"
    assert config.llm.temperature == 0.2
    assert config.approval.auto_approve is True


def test_empty_environment_value_clears_optional_key(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "executor:\n  model: small\n")
    assert load_config(path, environ={"CONDUCTOR_EXECUTOR_MODEL": ""}).executor.model is None


def test_bad_environment_value_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "config.yaml", environ={"CONDUCTOR_EXECUTOR_PARALLEL": "many"})
    assert str(info.value).startswith(
        "CONDUCTOR_EXECUTOR_PARALLEL='many': executor.parallel: Input should be a valid integer"
    )


def test_bad_boolean_environment_value_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CONDUCTOR_APPROVAL_AUTO_APPROVE='perhaps'"):
        load_config(tmp_path / "config.yaml", environ={"CONDUCTOR_APPROVAL_AUTO_APPROVE": "perhaps"})


def test_unknown_config_like_variable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "config.yaml", environ={"CONDUCTOR_PLANNER_MODLE": "x"})
    message = str(info.value)
    assert message.startswith("CONDUCTOR_PLANNER_MODLE: not a config variable")
    assert "CONDUCTOR_PLANNER_MODEL" in message


def test_list_keys_cannot_come_from_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CONDUCTOR_VERIFICATION_COMMANDS: not a config variable"):
        load_config(tmp_path / "config.yaml", environ={"CONDUCTOR_VERIFICATION_COMMANDS": "pytest"})


def test_env_variable_names() -> None:
    names = env_variables()
    assert names["CONDUCTOR_LLM_OPENAI_BASE_URL"] == ("llm", "openai_base_url")
    assert names["CONDUCTOR_APPROVAL_AUTO_APPROVE"] == ("approval", "auto_approve")
    assert "CONDUCTOR_WORKSPACE_IGNORE" not in names


def test_trust_section(tmp_path: Path) -> None:
    assert load_config(tmp_path / "config.yaml", environ={}).trust.model_dump() == {
        "keys": [], "require_signatures": False,
    }
    text = (
        "trust:\n  keys:\n    - public_key: keys/ci.pub\n      executors: ['conductor-worker@*']\n"
        "    - public_key: /etc/conductor/release.pub\n  require_signatures: true\n"
    )
    trust = load_config(write(tmp_path / "config.yaml", text), environ={}).trust
    assert [(k.public_key, k.executors) for k in trust.keys] == [
        ("keys/ci.pub", ["conductor-worker@*"]), ("/etc/conductor/release.pub", ["*"]),
    ]
    assert trust.require_signatures is True
    environ = {"CONDUCTOR_TRUST_REQUIRE_SIGNATURES": "false"}
    assert load_config(tmp_path / "config.yaml", environ=environ).trust.require_signatures is False
    assert "CONDUCTOR_TRUST_KEYS" not in env_variables()


def test_trust_section_errors_name_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "trust:\n  keys:\n    - executors: ['*']\n    - public_key: k.pub\n"
                 "      executors: []\n      pattern: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "config.yaml:3: trust.keys[0].public_key: required key is missing" in message
    assert "config.yaml:5: trust.keys[1].executors: List should have at least 1 item" in message
    assert "config.yaml:6: trust.keys[1].pattern: unknown key (known: public_key, executors)" in message


def test_override_returns_new_validated_config() -> None:
    base = Config()
    changed = base.override({"planner.model": "gpt-x", "planner.forks": 2, "executor.kind": None})
    assert changed.planner.model == "gpt-x"
    assert changed.planner.forks == 2
    assert changed.executor.kind == "llm"  # None means "flag not given"
    assert base.planner.model == "gpt-4.1-mini"


def test_override_rejects_bad_values_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"override planner\.forks=0: planner\.forks: Input should be greater"):
        Config().override({"planner.forks": 0})
    with pytest.raises(ConfigError, match="override planner.modle: unknown config key"):
        Config().override({"planner.modle": "x"})
    with pytest.raises(ConfigError, match="requires executor.command"):
        Config().override({"executor.kind": "command"})


def test_config_is_immutable() -> None:
    with pytest.raises(ValueError):
        Config().planner.model = "x"  # type: ignore[misc]


# --- numeric bounds -------------------------------------------------------------------------------


def _numeric_fields() -> list[tuple[str, str, object]]:
    """(section, key, FieldInfo) of every int or float setting of config.yaml."""
    from conductor.config import _section_model

    found = []
    for section in Config.model_fields:
        for key, info in _section_model(section).model_fields.items():
            if {int, float} & {info.annotation, *getattr(info.annotation, "__args__", ())}:
                found.append((section, key, info))
    return found


def _bounds(info: object) -> dict[str, object]:
    bounds: dict[str, object] = {}
    for item in getattr(info, "metadata", []):
        for name in ("ge", "gt", "le", "lt", "allow_inf_nan"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    return bounds


def test_every_numeric_setting_has_a_lower_and_an_upper_bound_and_floats_are_finite() -> None:
    """A new number without bounds would let a setting overflow a date or a sleep at run time."""
    fields = _numeric_fields()
    assert len(fields) >= 11
    for section, key, info in fields:
        bounds = _bounds(info)
        assert {"ge", "gt"} & set(bounds), f"{section}.{key} has no lower bound"
        assert {"le", "lt"} & set(bounds), f"{section}.{key} has no upper bound"
        if float in {info.annotation, *getattr(info.annotation, "__args__", ())}:  # type: ignore[attr-defined]
            assert bounds.get("allow_inf_nan") is False, f"{section}.{key} accepts inf/nan"


# The documented upper bound of every number in config.yaml (docs/cli.md, "Configuration").
UPPER_BOUNDS = {
    ("planner", "forks"): 16, ("planner", "handoff_timeout_seconds"): 86_400, ("executor", "parallel"): 64,
    ("executor", "max_attempts"): 100,
    ("executor", "lease_seconds"): 86_400, ("executor", "heartbeat_seconds"): 86_400,
    ("executor", "poll_seconds"): 3_600.0, ("verification", "timeout_seconds"): 86_400,
    ("llm", "timeout_seconds"): 3_600.0, ("llm", "max_retries"): 20, ("llm", "temperature"): 2.0,
    ("llm", "input_usd_per_million"): 10_000.0, ("llm", "output_usd_per_million"): 10_000.0,
    ("llm", "max_output_tokens"): 1_000_000, ("budget", "plan_usd"): 1_000_000.0, ("budget", "fork_usd"): 1_000_000.0,
    ("budget", "plan_tokens"): 10**12, ("budget", "fork_tokens"): 10**12,
}


def test_the_bounds_are_the_documented_ones() -> None:
    assert {(section, key) for section, key, _ in _numeric_fields()} == set(UPPER_BOUNDS)
    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text("utf-8").splitlines()
    for (section, key), bound in UPPER_BOUNDS.items():
        rows = [line.replace(" ", "") for line in docs if line.startswith(f"| `{section}.{key}`")
                and "–" in line]
        assert len(rows) == 1 and f"–{int(bound):,}" in rows[0], (section, key, rows)


@pytest.mark.parametrize(("section", "key"), list(UPPER_BOUNDS))
def test_the_upper_bound_loads_and_past_it_is_refused_naming_file_key_and_line(
    tmp_path: Path, section: str, key: str
) -> None:
    bound = UPPER_BOUNDS[(section, key)]
    if (section, key) != ("executor", "heartbeat_seconds"):  # the heartbeat must stay below the lease
        path = write(tmp_path / "config.yaml", yaml.safe_dump({section: {key: bound}}))
        assert getattr(getattr(load_config(path, environ={}), section), key) == bound
    for past in (bound + 1, 10**23, float("inf")):
        path = write(tmp_path / "config.yaml", f"{section}:\n  {key}: {'.inf' if past == float('inf') else past}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, environ={})
        assert str(info.value).startswith(f"{path}:2: {section}.{key}: Input should be "), str(info.value)
        assert "; " not in str(info.value)


def test_out_of_range_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "none.yaml", environ={"CONDUCTOR_EXECUTOR_LEASE_SECONDS": "1000000000000"})
    assert str(info.value) == ("CONDUCTOR_EXECUTOR_LEASE_SECONDS='1000000000000': executor.lease_seconds: "
                               "Input should be less than or equal to 86400")
    with pytest.raises(ConfigError, match=r"CONDUCTOR_EXECUTOR_POLL_SECONDS='inf': executor\.poll_seconds: "
                                          r"Input should be a finite number"):
        load_config(tmp_path / "none.yaml", environ={"CONDUCTOR_EXECUTOR_POLL_SECONDS": "inf"})


def test_override_refuses_more_forks_or_parallel_tasks_than_the_bounds() -> None:
    with pytest.raises(ConfigError, match=r"override planner\.forks=17: planner\.forks: Input should be less than "
                                          r"or equal to 16"):
        Config().override({"planner.forks": 17})
    with pytest.raises(ConfigError, match=r"executor\.parallel: Input should be less than or equal to 64"):
        Config().override({"executor.parallel": 10**6})
