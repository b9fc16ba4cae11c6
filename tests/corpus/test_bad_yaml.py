"""Bad policy and plan files: every error is a ``ConfigError`` reading ``<file>:<line>: <key>: <problem>``
(the line is left out only where the format has none to give), through the real loaders ``load_policy``
and ``plan_from_file``."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from conductor.errors import ConfigError
from conductor.policy import load_policy
from conductor.planner import plan_from_file
from tests.corpus.builders import run_python


def _load_plan(path: Path) -> object:
    return plan_from_file(path, goal=None, forks=None)


STEP = "goal: g\nstrategies:\n  - name: s\n    steps:\n"

# id -> (file name, content, loader, the exact message after "<path>")
CASES: dict[str, tuple[str, str | bytes, Callable[[Path], object], str]] = {
    "policy_unclosed_flow_list": ("policy.yaml", "behavior:\n  max_diff_lines: [1\n", load_policy,
                                  ":3: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"),
    "policy_tab_indentation": ("policy.yaml", "behavior:\n\tmax_diff_lines: 5\n", load_policy,
                               ":2: found character '\\t' that cannot start any token (while scanning for the next token)"),
    "policy_unknown_key": ("policy.yaml", "file_rule:\n  protected_patterns: []\n", load_policy,
                           ":1: file_rule: unknown key (known: global_constraints, file_rules, behavior)"),
    "policy_unknown_nested_key": ("policy.yaml", "behavior:\n  max_diff_line: 5\n", load_policy,
                                  ":2: behavior.max_diff_line: unknown key (known: max_diff_lines, timeout_seconds)"),
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_a_config_error_naming_file_line_and_key(tmp_path: Path, case: str) -> None:
    name, content, loader, expected = CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    with pytest.raises(ConfigError) as info:
        loader(path)

    assert str(info.value) == f"{path}{expected}"


@pytest.mark.xfail(strict=True, raises=RecursionError,
                   reason="yamlutil.py catches yaml.YAMLError only: PyYAML's recursive composer raises RecursionError "
                          "on deeply nested flow collections, which escapes load_policy instead of a ConfigError")
def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("global_constraints: " + "[" * 5000 + "]" * 5000 + "\n")

    with pytest.raises(ConfigError, match=str(path)):
        load_policy(path)


@pytest.mark.xfail(strict=True, reason="yamlutil.py _key_lines walks the node graph without remembering visited "
                   "aliases: a 'billion laughs' file of a few hundred bytes takes exponential time (x9 per level)")
def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    names = "abcdefghij"
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, name in pairwise(names))
    path = tmp_path / "policy.yaml"
    path.write_text(text)  # 10 levels: 9**10 list items if expanded
    code = f"""
        from pathlib import Path
        from conductor.errors import ConfigError
        from conductor.policy import load_policy
        try:
            load_policy(Path({str(path)!r}))
        except ConfigError as exc:
            print("ConfigError", exc)
    """

    done = run_python(code, timeout=10, cwd=tmp_path)

    assert done is not None, "load_policy was still expanding aliases after 10 s"
    assert done.stdout.startswith(f"ConfigError {path}"), done.stderr
