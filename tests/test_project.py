"""`conductor init`: project creation, never overwriting, templates loading back to defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor.config import Config, load_config
from conductor.errors import ConfigError, StateConflict, UnsafePath
from conductor.layout import ProjectLayout
from conductor.keys import private_keys_dir
from conductor.models import Behavior, PolicyLayer, SandboxRules
from conductor.policy import DEFAULT_MAX_DIFF_LINES, DEFAULT_TIMEOUT_SECONDS, load_policy, merge_policies
from conductor.project import init_project, load_project, template_text

EXPECTED = (".conductor", ".conductor/handoff", ".conductor/config.yaml", ".conductor/policy.yaml", ".conductor/.gitignore",
            ".conductor/keys/signing.pub")


def test_init_in_place_creates_everything(tmp_path: Path) -> None:
    (tmp_path / "existing.py").write_text("print(1)\n", encoding="utf-8")
    project = init_project(tmp_path)
    assert project.root == tmp_path
    assert isinstance(project, ProjectLayout)
    assert project.created == EXPECTED
    assert project.config_file.read_text(encoding="utf-8") == template_text("config.yaml")
    assert project.policy_file.read_text(encoding="utf-8") == template_text("policy.yaml")
    assert project.handoff_dir.is_dir()
    # The private key lives outside the project, where a launched command cannot read it.
    assert not (project.keys_dir / "signing.key").exists()
    private = private_keys_dir(project.conductor_dir) / "signing.key"
    assert private.stat().st_mode & 0o777 == 0o600 and not private.is_relative_to(tmp_path)
    assert ProjectLayout.find(tmp_path / ".conductor" / "handoff").root == tmp_path.resolve()


def test_gitignore_keeps_state_and_keys_out(tmp_path: Path) -> None:
    project = init_project(tmp_path)
    lines = (project.conductor_dir / ".gitignore").read_text(encoding="utf-8").splitlines()
    for entry in ("git/", "scratch/", "checkouts/", "keys/*.key", "*.lock"):
        assert entry in lines


def test_init_with_name_creates_folder(tmp_path: Path) -> None:
    project = init_project(tmp_path, "demo")
    assert project.root == tmp_path / "demo"
    assert project.config_file.is_file()


def test_init_with_name_accepts_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    assert init_project(tmp_path, "demo").created == EXPECTED


def test_init_with_name_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "file.txt").write_text("x", encoding="utf-8")
    with pytest.raises(StateConflict, match="not empty"):
        init_project(tmp_path, "demo")
    assert not (tmp_path / "demo" / ".conductor").exists()


def test_init_with_name_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "demo").write_text("x", encoding="utf-8")
    with pytest.raises(StateConflict, match="not a folder"):
        init_project(tmp_path, "demo")


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".git", "", ".conductor", "."])
def test_init_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePath):
        init_project(tmp_path, name)


def test_init_twice_does_not_overwrite(tmp_path: Path) -> None:
    first = init_project(tmp_path)
    first.config_file.write_text("planner:\n  model: my-model\n", encoding="utf-8")
    first.policy_file.unlink()
    second = init_project(tmp_path)
    assert second.created == (".conductor/policy.yaml",)  # only what was missing
    assert first.config_file.read_text(encoding="utf-8") == "planner:\n  model: my-model\n"
    third = init_project(tmp_path)
    assert third.created == ()


def test_init_with_name_twice_is_idempotent(tmp_path: Path) -> None:
    init_project(tmp_path, "demo")
    (tmp_path / "demo" / "app.py").write_text("", encoding="utf-8")
    assert init_project(tmp_path, "demo").created == ()


def test_init_refuses_conductor_file(tmp_path: Path) -> None:
    (tmp_path / ".conductor").write_text("", encoding="utf-8")
    with pytest.raises(StateConflict):
        init_project(tmp_path)


def test_config_template_loads_back_to_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(template_text("config.yaml"), encoding="utf-8")
    assert load_config(path, environ={}) == Config()


def test_config_template_mentions_every_key() -> None:
    text = template_text("config.yaml")
    for section, info in Config.model_fields.items():
        assert f"\n{section}:\n" in text
        assert info.annotation is not None
        for key in info.annotation.model_fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from the template"


def test_policy_template_loads_back_to_defaults(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(template_text("policy.yaml"), encoding="utf-8")
    policy = load_policy(path)
    assert policy == PolicyLayer(behavior=Behavior(max_diff_lines=500, timeout_seconds=300, max_diff_bytes=2097152),
                                 sandbox=SandboxRules(mode="auto", network=False))
    effective = merge_policies([("project", policy)]).effective
    assert effective.max_diff_lines == DEFAULT_MAX_DIFF_LINES
    assert effective.timeout_seconds == DEFAULT_TIMEOUT_SECONDS
    assert (effective.sandbox_mode, effective.network) == ("auto", False)
    assert "'*.lock'" in template_text("policy.yaml") or '"*.lock"' in template_text("policy.yaml")


def test_load_project_reads_both_files(tmp_path: Path) -> None:
    project = init_project(tmp_path)
    project.policy_file.write_text("behavior:\n  max_diff_lines: 42\n", encoding="utf-8")
    config, policy = load_project(project, environ={"CONDUCTOR_PLANNER_FORKS": "2"})
    assert config.planner.forks == 2
    assert policy.behavior.max_diff_lines == 42


def test_load_project_reports_bad_config(tmp_path: Path) -> None:
    project = init_project(tmp_path)
    project.config_file.write_text("planner:\n  forkz: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.yaml:2: planner\.forkz: unknown key"):
        load_project(project, environ={})


def test_load_project_without_files_uses_defaults(tmp_path: Path) -> None:
    config, policy = load_project(ProjectLayout(tmp_path), environ={})
    assert config == Config()
    assert policy == PolicyLayer()


def test_init_moves_a_key_left_in_the_project_out_of_it(tmp_path: Path) -> None:
    from conductor.keys import generate_signing_key, load_signing_key

    legacy = generate_signing_key(tmp_path / ".conductor" / "keys")  # where Conductor 0.1 kept it
    project = init_project(tmp_path)
    moved = private_keys_dir(project.conductor_dir) / "signing.key"
    assert not (project.keys_dir / "signing.key").exists()
    assert load_signing_key(moved).key_id == legacy.key_id
    assert (project.keys_dir / "signing.pub").read_bytes() == legacy.public_pem()
