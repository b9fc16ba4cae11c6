"""Conductor: an orchestration runtime for AI coding agents, governed by policy-as-code.

Importing this package is cheap: SDKs (openai, google-genai, watchdog) are imported lazily by the
modules that use them, so ``conductor --help`` never pays for them.
"""

__version__ = "0.1.0"
