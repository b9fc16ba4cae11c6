"""Secrets stay out of launched processes and out of everything Conductor stores or prints.

- :func:`launch_environment`: the environment of every command launched for a step (command executor,
  ``conductor worker --command``, verification commands) is an allowlist — the basics a tool needs
  (``PATH``, ``HOME``, locale, terminal, temp folder, Python's own switches), the ``CONDUCTOR_*`` task
  variables, and the names ``executor.env`` in config.yaml adds. Provider keys (``OPENAI_API_KEY``,
  ``GEMINI_API_KEY``...) are never passed on unless listed there.
- :func:`redact`: text that is stored (results, explanations, audit events, verification output) or
  printed goes through it: the values of secret-looking environment variables, ``Bearer``/``Basic``
  credentials, provider key shapes (``sk-…``, ``AIza…``) and URL user info (``https://user:token@host``)
  become ``[REDACTED]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

REDACTED = "[REDACTED]"
BASE_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR", "COLORTERM",
    "NO_COLOR", "FORCE_COLOR", "CI", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
    "PYTHONIOENCODING", "PYTHONUTF8", "SSL_CERT_FILE", "SSL_CERT_DIR",
})
NEVER_PASSED = frozenset({"CONDUCTOR_SIGNING_KEY_FILE", "CONDUCTOR_KEYS_HOME"})
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION)", re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") would redact ordinary words
_PATTERNS = (
    re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{12,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"),
    re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    re.compile(r"(?i)\b(api[_-]?key|access[_-]?token|secret)([\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._~+/-]{8,}"),
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@")


def launch_environment(environ: Mapping[str, str], extra_names: Iterable[str] = ()) -> dict[str, str]:
    """The environment a launched command gets: the allowlist of the module docstring.

    Args:
        environ: Conductor's own environment.
        extra_names: names to pass on as well (``executor.env``); exact names, no patterns.
    """
    allowed = BASE_NAMES | set(extra_names)
    return {name: value for name, value in environ.items()
            if (name in allowed or name.startswith(("LC_", "CONDUCTOR_"))) and name not in NEVER_PASSED}


def secret_values(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Values of variables whose names look secret (``*_KEY``, ``*TOKEN*``...), longest first."""
    return _secret_values(tuple(sorted(environ.items())))


@lru_cache(maxsize=8)
def _secret_values(items: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    values = {value for name, value in items if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}
    return tuple(sorted(values, key=len, reverse=True))


def redact(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """``text`` with every secret of the module docstring replaced by ``[REDACTED]``."""
    if not text:
        return text
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(_keep_label, text)
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def _keep_label(match: re.Match[str]) -> str:
    # Keep "Bearer " / "api_key=" so a reader sees what kind of secret was there.
    if match.lastindex and match.lastindex >= 2 and match.re.pattern.startswith("(?i)\\b(api"):
        return f"{match.group(1)}{match.group(2)}{REDACTED}"
    if match.lastindex and match.re.pattern.startswith("(?i)\\b(bearer"):
        return f"{match.group(1)} {REDACTED}"
    return REDACTED
