"""Running Stroma on a fleet of workers: what processes share through Redis.

- :class:`SharedBudget` (:mod:`stroma.fleet.budget`): a USD and/or token limit shared by every
  process naming the same key, enforced atomically in Redis; set it as
  ``RunConfig.shared_budget`` to check it before and settle it after every attempt.
- :class:`RunLease` and :class:`FencedRedisStore` (:mod:`stroma.fleet.lease`): one worker per run
  at a time, and checkpoint writes fenced so a stale worker never overwrites a newer one's.

:mod:`stroma.integrations.celery` builds on both to run pipelines as Celery tasks.

Requires the ``redis`` extra (``pip install 'stroma[redis]'``); the client is imported on first use.
"""

from __future__ import annotations

from stroma.fleet.budget import (
    Reservation,
    SharedBudget,
    SharedBudgetError,
    SharedBudgetExceeded,
    SharedUsage,
    to_micros,
)
from stroma.fleet.lease import FencedRedisStore, RunLease, RunLeaseError, RunLeaseHeld, StaleFenceError

__all__ = [
    "FencedRedisStore",
    "Reservation",
    "RunLease",
    "RunLeaseError",
    "RunLeaseHeld",
    "SharedBudget",
    "SharedBudgetError",
    "SharedBudgetExceeded",
    "SharedUsage",
    "StaleFenceError",
    "to_micros",
]
