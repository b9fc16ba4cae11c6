"""The bad-input corpus: hostile or broken inputs, each driven through the real code path and asserting
the specific error class and message (file, field, line), and that no other work is lost.

Run: ``python -m pytest -q tests/corpus``. Known bugs outside the corpus's reach are ``xfail(strict=True)``
tests whose reason names the module to fix. Families and cases (parametrize ids):

* ``test_bad_task_files`` (``claim_task`` → ``failed/`` with ``checksum_mismatch`` | ``invalid_task``; the
  other tasks stay pending and claimable): tampered_field, checksum_removed, checksum_not_a_string,
  attempt_as_string, attempt_as_float, attempt_as_bool, timeout_as_string, score_as_string,
  allowed_files_as_string, attempt_zero, missing_required_field, unknown_field, unknown_schema_version,
  schema_missing, task_id_mismatching_file_name, plan_id_of_another_plan, duplicate_keys, nan, infinity,
  negative_infinity, number_overflowing_a_double, integer_with_5000_digits, integer_beyond_double_precision
  (xfail), unpaired_surrogate, invalid_utf8, utf8_bom, trailing_garbage, truncated, empty_file,
  whitespace_only, oversize_file, json_array_not_object, json_null, deeply_nested_text,
  deeply_nested_field, symlink_task_file; a directory (xfail) and a fifo (xfail) named like a task.
* ``test_bad_paths`` (plan step ``allowed_files`` → ConfigError; task ``allowed_files`` → verifier rejection;
  LLM edit → ``disallowed_edit``): absolute, dotdot, dotdot_nested, nul, backslash, drive_letter, dotgit,
  dotgit_upper, dotgit_mixed_case_hook, dotgit_trailing_dot, dotgit_trailing_space, dotgit_fullwidth,
  nfd_decomposed, empty, dot_slash_only; result ``files_changed`` no walk can produce → ``invalid_result``;
  names a walk can produce → ground truth wins; ``./`` normalised; NFD protected pattern; NFD file name;
  ``.ɡit`` lookalike (an ordinary name); symlinked folder into ``.git``; ``allowed_files`` entries with stray
  whitespace (trailing, leading, around a ``/``, no-break and ideographic spaces) → ConfigError at load, and a
  verifier rejection in a task.
* ``test_bad_workspaces``: unsafe symlink targets (``check_link_target``), a step adding a symlink out of the
  workspace or into ``.git`` (xfail), writing through an escaping symlink, a forged change set writing
  through its own symlink, applying through a symlink into ``.git``, changed ``.git/hooks/post-checkout`` and
  ``.git/config``, gitignored file, config-ignored cache, non-UTF-8 file name, binary change, mode-only
  change (outside allowed, protected, allowed and merged: xfail), fifo from a command (xfail) and from a
  handoff executor.
* ``test_bad_results``: tampered result, checksum removed, attempt as string, unknown field, schema version,
  not JSON, missing; result for another task, attempt, fencing token, task checksum, plan and fork; task
  file swapped after completion; claiming an unchanged file (high and medium confidence); hiding a change;
  completion after the task was reclaimed / while re-queued (``LeaseLost``); a late executor recorded as
  ``task.abandoned``; a second completion.
* ``test_bad_audit_logs`` (``verify_chain`` problem text and line; ``events()`` names the file): edited line,
  edited line with recomputed hash, deleted line, deleted first line, inserted line, reordered lines,
  duplicated line, torn last line, non-canonical line, malformed hash, wrong hash, seq as string, empty
  line, not-JSON line, NaN in a line, invalid UTF-8 in a line; append refusing a torn or edited last line.
* ``test_bad_yaml`` (``load_policy`` / ``load_config`` / ``plan_from_file`` → ``<file>:<line>: <key>: <problem>``;
  hostile cases under a ``timeout`` marker, nothing timed): unclosed flow list, tab indentation, unknown key,
  unknown nested key, wrong type, quoted number, boolean for a number, float for an integer, string for a
  list, negative limit, duplicate key, not UTF-8, python tag, plan bad indentation, unknown step key, string
  for a list, word for a number, quoted number in a step policy, JSON NaN, JSON duplicate key; numbers out of
  range (23-digit limit, one past a bound, a timeout over a day, ``.inf``, ``.nan``, ``1e400``, a 5,000-digit
  and a 20,000-bit integer, a lease of 10^12 s, 17 forks, 100,000 parallel tasks); alias bombs (policy,
  config, plan, through merge keys), recursive anchors, undefined alias, deep nesting (flow list, flow
  mapping, block list, JSON plan, through aliases); aliases within the bound still load.
* ``test_bad_terminal_text`` (the real CLI): a goal, strategy name, title, plan constraint and an executor's
  explanation carrying OSC/CSI escape sequences, C1 controls, bidi overrides and rich markup; ``build``,
  ``status``, ``explain``, ``events``, ``replay`` and ``policy`` print them escaped and as typed.
"""
