"""Bad policy, config and plan files: every error is a ``ConfigError`` reading ``<file>:<line>: <key>: <problem>``
(the line is left out only where the format has none to give), through the real loaders ``load_policy``,
``load_config`` and ``plan_from_file``.

Hostile YAML (alias bombs, deep nesting, recursive anchors, huge numbers) must be refused quickly and with
bounded memory: those cases carry a ``timeout`` marker (the unbounded loader took 27 s and 1.2 GB for a
322-byte bomb, or died of RecursionError); nothing here measures time."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from conductor.config import load_config
from conductor.errors import ConfigError
from conductor.policy import load_policy
from conductor.planner import plan_from_file


def _load_plan(path: Path) -> object:
    return plan_from_file(path, goal=None, forks=None)


def _load_config(path: Path) -> object:
    return load_config(path, environ={})


def billion_laughs(levels: int = 10, key: str = "") -> str:
    """The classic alias bomb: level ``n`` is a list of 9 aliases of level ``n - 1`` (9**levels items)."""
    names = [f"{key}l{index}" for index in range(levels)]
    return f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in pairwise(names))


BOMB_AT = ":5: aliases stand for more than 10000 nodes when expanded (at alias *l3): refused as an alias bomb"


STEP = "goal: g\nstrategies:\n  - name: s\n    steps:\n"

# id -> (file name, content, loader, the exact message after "<path>")
CASES: dict[str, tuple[str, str | bytes, Callable[[Path], object], str]] = {
    "policy_unclosed_flow_list": ("policy.yaml", "behavior:\n  max_diff_lines: [1\n", load_policy,
                                  ":3: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"),
    "policy_tab_indentation": ("policy.yaml", "behavior:\n\tmax_diff_lines: 5\n", load_policy,
                               ":2: found character '\\t' that cannot start any token (while scanning for the next token)"),
    "policy_unknown_key": ("policy.yaml", "file_rule:\n  protected_patterns: []\n", load_policy,
                           ":1: file_rule: unknown key (known: global_constraints, file_rules, behavior, sandbox)"),
    "policy_unknown_nested_key": ("policy.yaml", "behavior:\n  max_diff_line: 5\n", load_policy,
                                  ":2: behavior.max_diff_line: unknown key (known: max_diff_lines, timeout_seconds, "
                                  "max_diff_bytes, max_attempts)"),
    "policy_wrong_type": ("policy.yaml", "behavior:\n  max_diff_lines: lots\n", load_policy,
                          ":2: behavior.max_diff_lines: Input should be a valid integer"),
    "policy_quoted_number": ("policy.yaml", "behavior:\n  max_diff_lines: '100'\n", load_policy,
                             ":2: behavior.max_diff_lines: Input should be a valid integer"),
    "policy_boolean_for_number": ("policy.yaml", "behavior:\n  timeout_seconds: yes\n", load_policy,
                                  ":2: behavior.timeout_seconds: Input should be a valid integer"),
    "policy_float_for_integer": ("policy.yaml", "behavior:\n  max_diff_lines: 100.0\n", load_policy,
                                 ":2: behavior.max_diff_lines: Input should be a valid integer"),
    "policy_string_for_list": ("policy.yaml", "file_rules:\n  protected_patterns: '*.lock'\n", load_policy,
                               ":2: file_rules.protected_patterns: Input should be a valid list"),
    "policy_negative_limit": ("policy.yaml", "behavior:\n  max_diff_lines: -1\n", load_policy,
                              ":2: behavior.max_diff_lines: Input should be greater than or equal to 0"),
    "policy_duplicate_key": ("policy.yaml", "behavior:\n  max_diff_lines: 10\n  max_diff_lines: 900\n", load_policy,
                             ":3: duplicate key 'max_diff_lines' (first on line 2)"),
    "policy_not_utf8": ("policy.yaml", b"global_constraints: ['caf\xe9']\n", load_policy,
                        ": not UTF-8 (invalid continuation byte at byte 25)"),
    "policy_python_tag": ("policy.yaml", "global_constraints: !!python/object/apply:os.system ['true']\n", load_policy,
                          ":1: could not determine a constructor for the tag "
                          "'tag:yaml.org,2002:python/object/apply:os.system'"),
    "plan_bad_indentation": ("plan.yaml", STEP + "      - instruction: x\n    - oops\n", _load_plan,
                             ":6: expected <block end>, but found '-' (while parsing a block mapping)"),
    "plan_unknown_step_key": ("plan.yaml", STEP + "      - {instruction: x, allowed_file: [a.py]}\n", _load_plan,
                              ":5: strategies[0].steps[0].allowed_file: unknown key (known: id, title, instruction, "
                              "allowed_files, depends_on, confidence, policy)"),
    "plan_string_for_list": ("plan.yaml", "goal: g\nstrategies:\n  - name: s\n    steps: do it all\n", _load_plan,
                             ":4: strategies[0].steps: Input should be a valid list"),
    "plan_word_for_number": ("plan.yaml", STEP + "      - instruction: x\n        confidence: high\n", _load_plan,
                             ":6: strategies[0].steps[0].confidence: Input should be a valid number, "
                             "unable to parse string as a number"),
    "plan_step_policy_quoted_number": (
        "plan.yaml", STEP + "      - instruction: x\n        policy: {behavior: {max_diff_lines: '9'}}\n", _load_plan,
        ":6: strategies[0].steps[0].policy.behavior.max_diff_lines: Input should be a valid integer"),
    "plan_json_nan": ("plan.json", '{"goal": "g", "strategies": [{"name": "s", "steps": '
                      '[{"instruction": "x", "confidence": NaN}]}]}', _load_plan,
                      ": non-standard JSON constant NaN"),
    "plan_json_duplicate_key": ("plan.json", '{"goal": "g", "goal": "h", "strategies": []}', _load_plan,
                                ": duplicate key 'goal'"),
    # --- numbers out of range: exit 3 at load, never an overflow later -------------------------------
    "policy_23_digit_limit": ("policy.yaml", "behavior:\n  max_diff_lines: 12345678901234567890123\n", load_policy,
                              ":2: behavior.max_diff_lines: Input should be less than or equal to 1000000"),
    "policy_limit_just_over_the_bound": ("policy.yaml", "behavior:\n  max_diff_lines: 1000001\n", load_policy,
                                         ":2: behavior.max_diff_lines: Input should be less than or equal to 1000000"),
    "policy_timeout_over_a_day": ("policy.yaml", "behavior:\n  timeout_seconds: 86401\n", load_policy,
                                  ":2: behavior.timeout_seconds: Input should be less than or equal to 86400"),
    "policy_infinite_timeout": ("policy.yaml", "behavior:\n  timeout_seconds: .inf\n", load_policy,
                                ":2: behavior.timeout_seconds: Input should be a valid integer"),
    "policy_5000_digit_integer": ("policy.yaml", "behavior:\n  max_diff_lines: " + "9" * 5000 + "\n", load_policy,
                                  ":2: integer literal of 5000 characters is out of range (at most 32)"),
    "policy_huge_binary_integer": ("policy.yaml", "behavior:\n  max_diff_lines: 0b" + "1" * 20000 + "\n", load_policy,
                                   ":2: integer literal of 20002 characters is out of range (at most 32)"),
    "plan_step_policy_23_digit_limit": (
        "plan.yaml", STEP + "      - instruction: x\n        policy: {behavior: {max_diff_lines: 99999999999999999999999}}\n",
        _load_plan, ":6: strategies[0].steps[0].policy.behavior.max_diff_lines: Input should be less than or equal to "
        "1000000"),
    "config_lease_overflowing_the_calendar": ("config.yaml", "executor:\n  lease_seconds: 1000000000000\n", _load_config,
                                              ":2: executor.lease_seconds: Input should be less than or equal to 86400"),
    "config_too_many_forks": ("config.yaml", "planner:\n  forks: 17\n", _load_config,
                              ":2: planner.forks: Input should be less than or equal to 16"),
    "config_too_many_parallel_tasks": ("config.yaml", "executor:\n  parallel: 100000\n", _load_config,
                                       ":2: executor.parallel: Input should be less than or equal to 64"),
    "config_infinite_poll": ("config.yaml", "executor:\n  poll_seconds: .inf\n", _load_config,
                             ":2: executor.poll_seconds: Input should be a finite number"),
    "config_nan_llm_timeout": ("config.yaml", "llm:\n  timeout_seconds: .nan\n", _load_config,
                               ":2: llm.timeout_seconds: Input should be a finite number"),
    "config_overflowing_price": ("config.yaml", "llm:\n  output_usd_per_million: 1e400\n", _load_config,
                                 ":2: llm.output_usd_per_million: Input should be a finite number"),
    "config_verification_timeout_over_a_day": (
        "config.yaml", "verification:\n  timeout_seconds: 864000\n", _load_config,
        ":2: verification.timeout_seconds: Input should be less than or equal to 86400"),
    # --- hostile YAML structure ----------------------------------------------------------------------
    "alias_bomb_in_policy": ("policy.yaml", billion_laughs(), load_policy, BOMB_AT),
    "alias_bomb_in_config": ("config.yaml", billion_laughs(), _load_config, BOMB_AT),
    "alias_bomb_in_plan": ("plan.yaml", billion_laughs() + STEP + "      - instruction: x\n", _load_plan, BOMB_AT),
    "alias_bomb_through_merge_keys": (
        "config.yaml", "a: &a {k0: x, k1: x, k2: x, k3: x, k4: x, k5: x, k6: x, k7: x, k8: x}\n" + "".join(
            f"{name}: &{name} {{{', '.join(f'<<: *{prev}' if i == 0 else f'm{i}: *{prev}' for i in range(9))}}}\n"
            for prev, name in pairwise("abcdefgh")), _load_config,
        ":4: aliases stand for more than 10000 nodes when expanded (at alias *c): refused as an alias bomb"),
    "alias_used_inside_its_own_anchor": ("policy.yaml", "global_constraints: &loop [a, *loop]\n", load_policy,
                                         ":1: alias *loop is used inside its own anchor (a recursive document)"),
    "alias_of_its_own_mapping": ("config.yaml", "planner: &p {model: *p}\n", _load_config,
                                 ":1: alias *p is used inside its own anchor (a recursive document)"),
    "undefined_alias": ("policy.yaml", "behavior: *nowhere\n", load_policy, ":1: found undefined alias 'nowhere'"),
    "deeply_nested_flow_list": ("policy.yaml", "global_constraints: " + "[" * 5000 + "]" * 5000 + "\n", load_policy,
                                ":1: nested deeper than 64 levels"),
    "deeply_nested_flow_mapping": ("policy.yaml", "behavior: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", load_policy,
                                   ":1: nested deeper than 64 levels"),
    "deeply_nested_block_list": ("policy.yaml", "global_constraints:\n" + "".join(
        " " * depth + "-\n" for depth in range(1, 200)), load_policy, ":65: nested deeper than 64 levels"),
    "deeply_nested_plan_json": ("plan.json", '{"goal": "g", "strategies": ' + "[" * 5000 + "]" * 5000 + "}", _load_plan,
                                ": nested deeper than 64 levels"),
    "deep_through_aliases": ("policy.yaml", "global_constraints:\n  - &d " + "[" * 40 + "]" * 40 + "\n  - "
                             + "[" * 30 + "*d" + "]" * 30 + "\n", load_policy,
                             ":3: nested deeper than 64 levels through alias *d"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_a_config_error_naming_file_line_and_key(tmp_path: Path, case: str) -> None:
    name, content, loader, expected = CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    with pytest.raises(ConfigError) as info:
        loader(path)

    assert str(info.value) == f"{path}{expected}"




def test_aliases_within_the_bound_still_load(tmp_path: Path) -> None:
    """Reuse is fine: a merge key, and 9,000 aliases of scalars (the bound counts what aliases stand for)."""
    anchors = ", ".join(f"&c{i} c{i}" for i in range(90))
    aliases = ", ".join(f"*c{i % 90}" for i in range(9000))
    path = tmp_path / "config.yaml"
    path.write_text(f"verification:\n  commands: [{anchors}]\nworkspace:\n  ignore: [{aliases}]\n"
                    "trust:\n  keys:\n    - &key {public_key: a.pem, executors: [ci-*]}\n"
                    "    - {<<: *key, public_key: b.pem}\n")

    config = load_config(path, environ={})

    assert len(config.workspace.ignore) == 9000 and config.workspace.ignore[91] == "c1"
    assert [(k.public_key, k.executors) for k in config.trust.keys] == [("a.pem", ["ci-*"]), ("b.pem", ["ci-*"])]
