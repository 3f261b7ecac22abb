"""Admission of concurrent attempts under a shared cost or token budget.

Checking the budget before each attempt is not enough when attempts run concurrently (a
``parallel()`` stage, or many tasks sharing one context): fifty attempts could all pass the
check and then all spend. The gate bounds that: an attempt may start alongside others only
while the budget left covers every attempt in flight at the largest per-attempt cost (and token
count) seen so far in the run.

Only attempts that spent something teach the gate what an attempt costs. An attempt that cost
$0 (a 429 or a dropped connection before any usage, a tool step, an unpriced call) says nothing
about what the next one will cost, so it is not taken as "attempts are free" (issue 8 B5: that
once admitted all fifty children of a stage at once). Until an attempt with a nonzero cost has
finished (for a token limit: nonzero tokens), attempts run one at a time.

The resulting bound, documented in the README: a run overspends a cost or token limit by at
most one attempt, provided every attempt costs at most the largest nonzero attempt seen before
it. The very first attempts, and any run in which every attempt so far cost nothing, run one
at a time, so the bound holds for them with no assumption at all: the attempt that crosses the
limit is the last one to start.

Event loops and threads: one gate (one context) may be used from several threads, each running
its own event loop (two ``asyncio.run`` calls sharing a context). Its counters are guarded by a
lock, and each waiter waits on a future of its own loop, woken thread-safely (issue 8 B7).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from stroma.cost import ExecutionBudget


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class BudgetGate:
    """Per-run gate; only used when the budget limits cost or tokens.

    ``max_cost`` / ``max_tokens`` are the largest nonzero cost (USD) / token count of one
    finished attempt, ``0`` until one was seen. Thread-safe; each waiter is woken on its own loop.
    """

    __slots__ = (
        "_lock",
        "_loop",
        "_shared",
        "_waiters",
        "cost_limit",
        "inflight",
        "max_cost",
        "max_tokens",
        "token_limit",
    )

    def __init__(self, budget: ExecutionBudget) -> None:
        self.cost_limit = budget.max_cost_usd
        self.token_limit = budget.max_tokens_total
        self.inflight = 0
        self.max_cost = 0.0
        self.max_tokens = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared = False  # used from more than one event loop (threads)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def active(self) -> bool:
        return self.cost_limit is not None or self.token_limit is not None

    def _admissible(self, spent_cost: float, spent_tokens: int) -> bool:
        if self.inflight == 0:
            return True
        slots = self.inflight + 1
        if self.cost_limit is not None and (self.max_cost <= 0 or spent_cost + slots * self.max_cost > self.cost_limit):
            return False
        return not (
            self.token_limit is not None
            and (self.max_tokens <= 0 or spent_tokens + slots * self.max_tokens > self.token_limit)
        )

    async def enter(self, read_spent: Callable[[], tuple[float, int]]) -> bool:
        """Wait until an attempt may start; returns ``True`` when the caller must check the
        budget again (others may have spent since it last did).

        That is when it had to wait, and always once the gate is used from several event loops:
        another thread may spend between the caller's budget check and this call. *read_spent*
        returns ``(cost, tokens)`` spent by the run so far; it is read again after every
        wake-up. Runs on the calling task's loop.
        """
        waited = False
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._loop is not loop:
                    if self._loop is not None:
                        self._shared = True
                    self._loop = loop
                cost, tokens = read_spent()
                if self._admissible(cost, tokens):
                    self.inflight += 1
                    return waited or self._shared
                waiter: asyncio.Future[None] = loop.create_future()
                entry = (loop, waiter)
                self._waiters.append(entry)
            waited = True
            try:
                await waiter
            finally:
                with self._lock:
                    if entry in self._waiters:
                        self._waiters.remove(entry)

    def leave(self, cost: float, tokens: int) -> None:
        """An admitted attempt finished having spent *cost* and *tokens*; wake the waiters."""
        with self._lock:
            self.max_cost = max(self.max_cost, cost)
            self.max_tokens = max(self.max_tokens, tokens)
        self.release()

    def release(self) -> None:
        """An admitted attempt did not run after all (or finished); wake the waiters."""
        with self._lock:
            self.inflight = max(0, self.inflight - 1)
            waiters, self._waiters = self._waiters, []
        if not waiters:
            return
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, waiter in waiters:
            if loop is current:
                _wake(waiter)
                continue
            with contextlib.suppress(RuntimeError):  # that loop is closed: its waiter went with it
                loop.call_soon_threadsafe(_wake, waiter)
