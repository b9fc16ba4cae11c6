#!/usr/bin/env bash
# The offline example: no API key, no network. Creates .venv (if missing) with Conductor installed,
# copies examples/slugify to a temporary folder, and lets Conductor explore three strategies for it,
# executed by real tools (sed, python -m json.tool) through the file handoff. Prints the ranking, the
# story of the rejected step, the audit events and the handoff metrics.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv"
if [ ! -x "$venv/bin/conductor" ]; then
  echo "== installing Conductor into $venv (log: $venv/install.log)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -e "$repo[dev]" > "$venv/install.log" 2>&1 \
    || { tail -20 "$venv/install.log"; exit 1; }
fi
export PATH="$venv/bin:$PATH"

work="$(mktemp -d)/slugify"
cp -r "$repo/examples/slugify" "$work"
cd "$work"
conductor init
cp policy.yaml .conductor/policy.yaml
python - <<'PY'
import pathlib, re
config = pathlib.Path(".conductor/config.yaml")
text = config.read_text()
text = re.sub(r"(?ms)^(executor:\n.*?^  kind: )llm ", r"\1command ", text, count=1)  # the executor's kind
text = re.sub(r"(?m)^  command: null ", "  command: 'sh -c \"$CONDUCTOR_INSTRUCTION\"' ", text)
text = re.sub(r"(?m)^  commands: \[\] ", "  commands: ['python -m pytest -q -p no:cacheprovider'] ", text)
config.write_text(text)
PY
echo "== project: $work"
echo "== tests before: $(python -m pytest -q -p no:cacheprovider 2>&1 | tail -1)"
status=0
conductor explore --plan plan.yaml || status=$?
echo
echo "== why fork 3 lost"
conductor explain step_001 --fork 3
echo
echo "== audit events of fork 1"
conductor events --fork 1
conductor handoff-metrics
echo "== tests after: $(python -m pytest -q -p no:cacheprovider 2>&1 | tail -1)"
echo "== slug.py now:"
cat slug.py
exit "$status"
