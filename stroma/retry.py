"""Retry delays, built from ``backoff``'s wait generators.

The delay before retry *k* (k = 1, 2, ...) of a step is drawn uniformly from::

    [0, min(max_backoff_seconds, backoff_seconds * 2 ** (k - 1))]

that is exponential backoff with base 2, capped, with "full jitter" (AWS architecture blog,
"Exponential Backoff And Jitter"). Full jitter spreads retries of many concurrent steps over the
whole window instead of synchronising them on the same instants. The sequence comes from
``backoff.expo`` (the cap) and ``backoff.full_jitter`` (the draw); no formula is written here.

This module only computes delays; sleeping, counting attempts and deciding whether to retry
belong to the step loop (``stroma.middleware.execute_step``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import backoff

__all__ = ["BackoffSettings", "max_delay", "retry_delays"]


class BackoffSettings(Protocol):
    """What :func:`retry_delays` reads from a policy (``FailurePolicy`` satisfies it)."""

    @property
    def backoff_seconds(self) -> float: ...

    @property
    def max_backoff_seconds(self) -> float: ...


def _caps(settings: BackoffSettings) -> Iterator[float]:
    """The upper bounds of successive delays: ``min(cap, base * 2**(k-1))`` for k = 1, 2, ..."""
    factor = float(settings.backoff_seconds)
    # With no base delay every bound is 0; a zero cap also keeps backoff.expo from counting its
    # exponent up forever (0 * 2**n never reaches a positive cap, and 2**n overflows a float).
    cap = float(settings.max_backoff_seconds) if factor > 0 else 0.0
    waits = backoff.expo(base=2, factor=factor, max_value=cap)
    next(waits)  # backoff's wait generators first yield None (they are primed for .send())
    while True:
        try:
            value = next(waits)
        except OverflowError:
            # Only reachable with a subnormal base delay: the exponent grew past float range
            # before reaching the cap, so every later bound is the cap.
            yield from itertools.repeat(cap)
            return
        yield float(value)


def retry_delays(settings: BackoffSettings, *, jitter: bool = True) -> Iterator[float]:
    """Seconds to sleep before each retry, for retries 1, 2, 3, ...

    Args:
        settings: a ``FailurePolicy`` (anything with ``backoff_seconds`` and
            ``max_backoff_seconds``, in seconds).
        jitter: draw each delay uniformly from ``[0, bound]`` (default); ``False`` yields the
            bounds themselves, for deterministic tests and documentation.

    Returns:
        An infinite iterator; take as many delays as retries are made. Each call returns a
        fresh iterator, so a step called again starts from the first delay.
    """
    caps = _caps(settings)
    if not jitter:
        return caps
    return (float(backoff.full_jitter(bound)) for bound in caps)


def max_delay(settings: BackoffSettings, retry_number: int) -> float:
    """The upper bound of the delay before retry *retry_number* (1-based), in seconds.

    Equal to ``min(max_backoff_seconds, backoff_seconds * 2 ** (retry_number - 1))``; the lower
    bound is always 0. Raises ``ValueError`` when *retry_number* < 1.
    """
    if retry_number < 1:
        raise ValueError(f"retry_number must be >= 1, got {retry_number!r}")
    return next(itertools.islice(_caps(settings), retry_number - 1, None))
