"""A client that files every call in the cost ledger and keeps it within a budget: reserve, then reconcile.

``MeteredClient(RecordingClient(provider))``: a call the recordings can answer is replayed and filed as
``cached`` (free); any other call first reserves its worst case (:func:`conductor.llm.ledger.worst_case`)
— and is not made at all when that does not fit (:class:`~conductor.errors.BudgetExceeded`) — then is
settled at the usage the provider reported.
"""

from __future__ import annotations

from conductor.errors import BackendError, ConfigError
from conductor.llm.base import LLMClient, LLMReply, T
from conductor.llm.ledger import BudgetLimits, Ledger, current_scope, worst_case
from conductor.llm.recording import RecordingClient
from conductor.models import Usage


class MeteredClient:
    """An :class:`~conductor.llm.base.LLMClient` in front of ``inner`` that files every call in ``ledger``.

    Args:
        inner: usually a :class:`RecordingClient` (its replays are free and never reserved); any client.
        ledger: where calls are filed; shared by every thread and process of the project.
        limits: the budget; ``BudgetLimits()`` files calls without limiting them.

    Raises:
        ConfigError: a USD limit is set and the model has no price (checked here, before any call).
    """

    def __init__(self, inner: LLMClient, ledger: Ledger, limits: BudgetLimits | None = None) -> None:
        self.inner = inner
        self.settings = inner.settings
        self.ledger = ledger
        self.limits = limits or BudgetLimits()
        priced = self.settings.input_usd_per_million is not None or self.settings.output_usd_per_million is not None
        if self.limits.needs_price and not priced:
            raise ConfigError(f"a USD budget is set, but model {self.settings.model!r} has no price: set "
                              f"llm.prices.{self.settings.model} (or llm.input/output_usd_per_million) in config.yaml")

    def generate(self, *, system: str, prompt: str, schema: type[T]) -> LLMReply[T]:
        """Replay, or reserve → call → settle (see the module docstring).

        Raises:
            BudgetExceeded: the call's worst case does not fit the budget; it was not made.
            BackendError, IntegrityError, OSError: from ``inner``; the reservation is settled at the
                usage the error reports (an unusable answer is billed) or released.
        """
        scope = current_scope()
        if isinstance(self.inner, RecordingClient):
            replay = self.inner.replay(system=system, prompt=prompt, schema=schema)
            if replay is not None:
                self.ledger.record_cached(scope, self.settings, replay)
                return replay
        cost = worst_case(self.settings, system=system, prompt=prompt, schema=schema)
        reservation = self.ledger.reserve(scope, self.settings, cost, self.limits)
        try:
            reply = self.inner.generate(system=system, prompt=prompt, schema=schema)
        except BackendError as exc:
            if isinstance(exc.usage, Usage):
                self.ledger.settle(reservation, scope, self.settings, exc.usage, error=str(exc)[:500])
            else:
                self.ledger.release(reservation, scope, self.settings, f"no answer: {str(exc)[:500]}")
            raise
        except Exception as exc:  # KeyboardInterrupt and a kill leave it held, as a crash does
            self.ledger.release(reservation, scope, self.settings, f"{type(exc).__name__}: {str(exc)[:500]}")
            raise
        if reply.cached:  # an identical call in another thread was made meanwhile, and replayed here
            self.ledger.release(reservation, scope, self.settings, "replayed a recording made meanwhile")
            self.ledger.record_cached(scope, self.settings, reply)
        else:
            self.ledger.settle(reservation, scope, self.settings, reply.usage, recording=reply.recording)
        return reply
