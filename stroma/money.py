"""Money as people read it: one way to print an amount of US dollars, library and CLI alike."""

from __future__ import annotations

import math

__all__ = ["format_usd"]

_USD_FINEST_DECIMALS = 12  # a trillionth of a dollar: finer amounts print as "<$0.000000000001"


def format_usd(usd: float) -> str:
    """Stroma's one way to print money (CLI, error messages): fixed decimals, never scientific notation.

    At least two decimals, and below $100 enough of them to show the amount to two significant
    digits (at least four decimals); trailing zeros past the cents are dropped, so a cost and a
    limit of the same amount always print the same: ``$0``, ``$0.0123``, ``$0.001``,
    ``$0.000027``, ``$0.12``, ``$25.00``, ``$1,234.50``.
    """
    if usd == 0:
        return "$0"
    if not math.isfinite(usd):
        return f"${usd}"
    size = abs(usd)
    sign = "-" if usd < 0 else ""
    if size < 10.0**-_USD_FINEST_DECIMALS:
        return f"{sign}<${10.0**-_USD_FINEST_DECIMALS:.{_USD_FINEST_DECIMALS}f}"
    if size >= 100:
        decimals = 2
    else:
        two_significant = 1 - math.floor(math.log10(size))
        decimals = min(max(4, two_significant), _USD_FINEST_DECIMALS)
    text = f"{size:,.{decimals}f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{sign}${whole}.{fraction}"
