"""What `import conductor` and `conductor --help` load, checked in a fresh interpreter (cf. click's test_imports)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("openai", "google.genai", "watchdog", "httpx", "conductor.engine", "conductor.llm.openai_backend",
         "rich.live")


def loaded_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_conductor_is_light() -> None:
    modules = loaded_after("import conductor, conductor.errors, conductor.models, conductor.cli.main")
    assert not [m for m in HEAVY if m in modules]


def test_help_does_not_load_sdks_or_the_engine() -> None:
    code = ("from conductor.cli.main import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n")
    modules = loaded_after(code)
    assert not [m for m in HEAVY if m in modules]


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "conductor", "--help"], capture_output=True, text=True, check=True)
    for command in ("init", "explore", "build", "resume", "approve", "worker", "status", "events", "explain",
                    "policy", "handoff-metrics"):
        assert f"  {command}" in out.stdout


def test_help_loads_nothing_beyond_click_and_its_own_modules() -> None:
    """What a help screen needs: click, the command table, the error classes, and click's text wrapping and
    locale lookup for printing. Anything more (tempfile, shutil and the compression modules it pulls in,
    pydantic, the engine) is paid by every `conductor --help`."""
    code = ("from conductor.cli.main import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n")
    extra = loaded_after(code) - loaded_after("import click")
    allowed = {"conductor", "conductor.cli", "conductor.cli.main", "conductor.errors", "click._textwrap", "textwrap",
               "locale", "_locale"}
    assert sorted(m for m in extra - allowed if not m.startswith("encodings.")) == []  # codecs follow the locale
