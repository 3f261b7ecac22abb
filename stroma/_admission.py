"""Admission of concurrent attempts under a shared cost or token budget.

Checking the budget before each attempt is not enough when attempts run concurrently (a
``parallel()`` stage, or many tasks sharing one context): fifty attempts could all pass the
check and then all spend. The gate bounds that: an attempt may start alongside others only
while the budget left covers every attempt in flight at the largest per-attempt cost (and token
count) seen so far in the run. Until one attempt has finished, attempts run one at a time.

The resulting bound, documented in the README: when every attempt costs at most the largest
attempt seen before it, a run overspends a cost or token limit by at most one attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from stroma.cost import ExecutionBudget


class BudgetGate:
    """Per-run gate; only used when the budget limits cost or tokens."""

    __slots__ = ("_changed", "cost_limit", "inflight", "max_cost", "max_tokens", "token_limit")

    def __init__(self, budget: ExecutionBudget) -> None:
        self.cost_limit = budget.max_cost_usd
        self.token_limit = budget.max_tokens_total
        self.inflight = 0
        self.max_cost: float | None = None
        self.max_tokens: int | None = None
        self._changed: asyncio.Event | None = None

    @property
    def active(self) -> bool:
        return self.cost_limit is not None or self.token_limit is not None

    def _admissible(self, spent_cost: float, spent_tokens: int) -> bool:
        if self.inflight == 0:
            return True
        if self.max_cost is None or self.max_tokens is None:
            return False
        slots = self.inflight + 1
        if self.cost_limit is not None and spent_cost + slots * self.max_cost > self.cost_limit:
            return False
        return not (self.token_limit is not None and spent_tokens + slots * self.max_tokens > self.token_limit)

    async def enter(self, read_spent: Callable[[], tuple[float, int]]) -> bool:
        """Wait until an attempt may start; returns ``True`` if it had to wait.

        *read_spent* returns ``(cost, tokens)`` spent by the run so far; it is read again after
        every wake-up, since others spend while this one waits.
        """
        waited = False
        while True:
            cost, tokens = read_spent()
            if self._admissible(cost, tokens):
                self.inflight += 1
                return waited
            waited = True
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def leave(self, cost: float, tokens: int) -> None:
        """An admitted attempt finished having spent *cost* and *tokens*; wake the waiters."""
        if self.max_cost is None or cost > self.max_cost:
            self.max_cost = cost
        if self.max_tokens is None or tokens > self.max_tokens:
            self.max_tokens = tokens
        self.release()

    def release(self) -> None:
        """An admitted attempt did not run after all; wake the waiters."""
        self.inflight = max(0, self.inflight - 1)
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()
