"""The one exception tree of Conductor; each class carries the CLI exit code it maps to.

Exit codes (documented in docs/cli.md):

====  =====================================================================
code  meaning
====  =====================================================================
0     success
1     the plan ran but did not succeed (no fork verified, a step failed)
2     usage error (bad flags or arguments; raised by click)
3     ConfigError: config.yaml, policy.yaml or a plan file is invalid
4     PolicyViolation / UnsafePath: a change or path is outside the policy
5     IntegrityError: checksum mismatch, broken audit chain, bad JSON
6     BackendError: the LLM provider failed or answered nonsense
7     CredentialsMissing: no API key for the configured provider
8     ExecutorError: an executor could not run
9     NotFound: no project, plan, fork or step by that name
10    StateConflict: the files on disk disagree with what Conductor expects
11    Halted: the plan waits for approval or for an external executor
12    GitError: git is missing, too old, or failed on Conductor's own repository
13    SandboxUnavailable: sandbox.mode is required and no sandbox can be made here
14    BudgetExceeded: an LLM call would not fit the budget; it was not made (resume with more)
70    internal error (a bug; the traceback is written to a log file)
130   interrupted (Ctrl-C)
====  =====================================================================
"""

from __future__ import annotations


class ConductorError(Exception):
    """Base class of every error Conductor raises on purpose.

    Attributes:
        exit_code: the process exit code the CLI uses for this error.
    """

    exit_code = 1


class ConfigError(ConductorError):
    """A configuration, policy or plan file is malformed or has unknown keys.

    The message names the file, the key and (for YAML) the line.
    """

    exit_code = 3


class PolicyViolation(ConductorError):
    """A change or request breaks the effective policy."""

    exit_code = 4


class UnsafePath(PolicyViolation):
    """A path is absolute, escapes the workspace, or plays tricks (NUL, ``..``, ``.git``)."""


class IntegrityError(ConductorError):
    """Stored data does not match its checksum, chain or schema."""

    exit_code = 5


class ChecksumMismatch(IntegrityError):
    """A file's recorded checksum differs from the checksum of its content."""


class InvalidDocument(IntegrityError):
    """A JSON document is not strict JSON, or does not match its schema."""


class AuditChainError(IntegrityError):
    """The hash chain of an audit log is broken."""


class SignatureError(IntegrityError):
    """A signature does not verify, is missing where one is required, or comes from an untrusted key."""


class KeyFileError(ConfigError):
    """A signing or public key file is missing, malformed, or readable by others (mode looser than 0600)."""


class BackendError(ConductorError):
    """An LLM provider failed, timed out, or returned output that does not parse.

    Attributes:
        usage: the tokens the failed call used, when the provider answered (a refusal, an answer cut at
            the token limit or one that does not match the schema is still billed); ``None`` when no
            answer came (HTTP error, timeout, connection failure). A ``conductor.models.Usage``.
    """

    exit_code = 6

    def __init__(self, message: str, *, usage: object | None = None) -> None:
        super().__init__(message)
        self.usage = usage


class CredentialsMissing(BackendError):
    """No API key is configured for the selected provider."""

    exit_code = 7


class ExecutorError(ConductorError):
    """An executor could not run a task (command missing, crashed, timed out)."""

    exit_code = 8


class NotFound(ConductorError):
    """No project, plan, fork or step by that name."""

    exit_code = 9


class StateConflict(ConductorError):
    """Files on disk disagree with what Conductor expects, and it refuses to guess."""

    exit_code = 10


class LeaseLost(StateConflict):
    """A completion or heartbeat carries a stale fencing token: the task was reclaimed meanwhile."""


class MergeConflict(StateConflict):
    """A change cannot be applied because its target changed since the change's base."""


class Halted(ConductorError):
    """The plan cannot go on now: it waits for an approval or an external executor."""

    exit_code = 11


class GitError(ConductorError):
    """git is missing or older than Conductor needs, or a git command on Conductor's state failed.

    The message has the git command and git's own words.
    """

    exit_code = 12


class SandboxUnavailable(ConductorError):
    """``sandbox.mode`` is ``required`` and no sandbox can be made on this machine (the message says why)."""

    exit_code = 13


class BudgetExceeded(ConductorError):
    """An LLM call's worst case (prompt bound + ``max_output_tokens``) does not fit what is left of a
    budget; the call was not made and the step stays resumable (``conductor.llm.ledger``).

    Attributes:
        scope: ``"plan"`` or ``"fork"``; unit: ``"usd"`` or ``"tokens"``; limit: the budget;
        used: spent plus held by calls in flight, before this call; needed: this call's worst case.
    """

    exit_code = 14

    def __init__(self, message: str, *, scope: str = "plan", unit: str = "tokens", limit: float = 0.0,
                 used: float = 0.0, needed: float = 0.0) -> None:
        super().__init__(message)
        self.scope, self.unit, self.limit, self.used, self.needed = scope, unit, limit, used, needed


EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a plan ran: raised in the main thread like Ctrl-C's ``KeyboardInterrupt``, so the
    run ends the same way (steps in flight give their tasks back), then exits :data:`EXIT_TERMINATED`."""
