"""Argument types and the parser class of the ``stroma`` command.

Every bad argument ends the command with one line on stderr, ``stroma: error: ...``, and exit
status 2 (:class:`UsageError`); never a traceback or a usage dump.
"""

from __future__ import annotations

import argparse
import math
import urllib.parse
from typing import Any, NoReturn

from stroma.errors import StromaError

__all__ = ["Parser", "UsageError", "budget_usd", "http_url", "positive_int"]


class UsageError(StromaError, ValueError):
    """A bad command-line argument (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        raise UsageError(message + hint)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)


def http_url(text: str) -> str:
    """An ``http://`` or ``https://`` URL with a host (and a valid port, if any); returned without a trailing slash."""
    candidate = text.strip()
    try:
        parsed = urllib.parse.urlsplit(candidate)
        port_ok = parsed.port is None or 0 < parsed.port < 65536
    except ValueError:
        port_ok = False
        parsed = urllib.parse.urlsplit("")
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or not port_ok
        or any(ch.isspace() for ch in candidate)
        or parsed.query
        or parsed.fragment
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL with a host, e.g. http://localhost:4318")
    return candidate.rstrip("/")


def budget_usd(text: str) -> float:
    """A finite amount of US dollars, 0 or more (``0.05``, ``$0.05``; 0 means nothing may be
    spent, the same rule as ``ExecutionBudget(max_cost_usd=0)``)."""
    try:
        value = float(text.strip().removeprefix("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD, e.g. 0.05") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"the budget must be an amount in USD of 0 or more, got {text!r}")
    return value


def positive_int(limit: int) -> Any:
    """A type for integers from 1 to *limit*."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be between 1 and {limit}, got {value}")
        return value

    parse.__name__ = "number"
    return parse
