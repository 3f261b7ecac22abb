"""Bounds on the free-form text Stroma puts into span attributes and metric labels.

Model names and error types come from user code (a step's returned model, an exception's
class), so nothing stops them from being a megabyte long or different on every call. Two
bounds apply where they become telemetry:

* **length**: a value longer than :data:`MAX_LABEL_CHARS` characters is cut to that length,
  ending in :data:`TRUNCATION_MARKER` (span attributes and metric labels alike);
* **distinct values**: each metric label key (``stroma.model``, ``error.type``, ...) takes at
  most :data:`MAX_LABEL_VALUES` distinct values per process; later new values are reported as
  :data:`OVERFLOW_VALUE` (``"_other"``), so sums stay exact while the number of series (and
  the memory behind them) stays bounded. Span attributes keep the (length-bounded) value.
"""

from __future__ import annotations

import threading
from typing import Final

MAX_LABEL_CHARS: Final = 256
"""Longest model name or error type put on a span or metric, in characters (marker included)."""

MAX_LABEL_VALUES: Final = 200
"""Distinct values per metric label key before new ones are reported as :data:`OVERFLOW_VALUE`."""

TRUNCATION_MARKER: Final = "…[truncated]"
OVERFLOW_VALUE: Final = "_other"


def bound_text(value: str, limit: int = MAX_LABEL_CHARS) -> str:
    """*value* if it has at most *limit* characters, else its start ending in the marker."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


class LabelValues:
    """Per label key, the distinct values admitted so far (at most *limit* each).

    :meth:`admit` returns the value to use as a label: the length-bounded value while the key
    has room or already knows it, :data:`OVERFLOW_VALUE` otherwise. Thread-safe.
    """

    __slots__ = ("_limit", "_lock", "_seen")

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, value: str) -> str:
        value = bound_text(value)
        seen = self._seen.get(key)
        if seen is not None and value in seen:
            return value
        with self._lock:
            seen = self._seen.setdefault(key, set())
            if value in seen:
                return value
            if len(seen) >= self._limit:
                return OVERFLOW_VALUE
            seen.add(value)
            return value

    def clear(self) -> None:
        """Forget the admitted values (a forked child starts from zero)."""
        with self._lock:
            self._seen.clear()
