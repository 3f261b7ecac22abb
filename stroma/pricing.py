"""Model prices: user overrides first, then the maintained ``genai-prices`` table.

This runs once per step attempt, so it is built for speed: a model string is resolved once and
the result (including "no price known") is cached; after that, pricing an attempt is a dict
lookup and two multiplications (well under a microsecond, against ~70 µs for one
``genai_prices.calc_price`` call, which searches the whole table).

Resolution order for a model string:

1. a user override for that exact string (:func:`set_price`, or ``KNOWN_MODELS[name] = (...)``);
2. a user override for the bare model name, when the string is ``"provider:model"`` or
   ``"provider/model"``;
3. ``genai-prices``: ``"provider:model"`` and ``"provider/model"`` are tried with the provider
   id, then the whole string without a provider, then (only when the prefix is not a known
   provider) the bare model name; a plain ``"gpt-4o"`` lets genai-prices pick the provider.

How genai-prices' price structure maps onto per-token prices:

* Only input and output token prices (``input_mtok``, ``output_mtok``) and a per-request fee
  (``requests_kcount``) are used: a step reports input and output tokens, nothing finer (no
  cache, audio or image tokens).
* **Tiered prices** (e.g. Gemini and Claude above 128k/200k input tokens) are kept whole: the
  rate of the highest tier whose threshold the call's *input* tokens exceed applies to all of
  the call's tokens, as genai-prices computes it. Deriving a per-token price from a 1M-token
  ``calc_price`` would charge every call at the top tier, so it is not done.
* **Date-dependent prices** are those active when the model is first priced; the cached entry
  expires at the next announced price change. **Time-of-day prices** (off-peak discounts) are
  re-resolved at most a minute after they were looked up.
* Request-context variants (e.g. service tiers) are not applied: standard prices are used.

``genai-prices``' network auto-update is never enabled here; the bundled table is used. Any
unexpected error from genai-prices makes the model unpriced and is logged once: pricing never
fails a run. Unknown models are unpriced, never silently $0 (the step loop marks them).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Final, Literal

import genai_prices

from stroma.errors import ConfigurationError, exception_types
from stroma.telemetry._bounds import MAX_LABEL_CHARS, bound_text

__all__ = [
    "KNOWN_MODELS",
    "LEGACY_MODEL_NAMES",
    "ModelPrice",
    "clear_price_overrides",
    "cost_usd",
    "estimate_cost_usd",
    "preload",
    "price_for",
    "remove_price",
    "set_price",
]

_log = logging.getLogger(__name__)

PriceSource = Literal["override", "genai-prices"]

CACHE_LIMIT: Final = 4096
"""Distinct model strings whose resolution is cached (oldest entries are dropped first)."""

_TIME_OF_DAY_TTL_S: Final = 60.0

LEGACY_MODEL_NAMES: Final = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4-turbo",
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
    "gemini-1.5-pro",
    "gemini-1.5-flash",
)
"""The model names the established package listed in ``KNOWN_MODELS``; iteration yields those
that still resolve (their prices now come from genai-prices)."""


def _per_token(per_million: float | Decimal) -> float:
    """USD per token from USD per million tokens, without binary rounding drift."""
    exact = per_million if isinstance(per_million, Decimal) else Decimal(repr(float(per_million)))
    return float(exact.scaleb(-6))


def _per_million(per_token: float) -> float:
    return float(Decimal(repr(per_token)).scaleb(6))


@dataclass(frozen=True)
class ModelPrice:
    """The price of one model, in USD.

    Attributes:
        input_per_token: USD per input token (the base tier when prices are tiered).
        output_per_token: USD per output token (the base tier when prices are tiered).
        source: ``"override"`` (set by the user) or ``"genai-prices"``.
        per_request: USD charged per call that used any tokens (a few providers bill this).
        input_tiers: ``(threshold, usd_per_token)`` pairs, ascending; a call whose input tokens
            exceed a threshold pays that tier's input rate on all its input tokens.
        output_tiers: the same for output tokens (the tier is still chosen by *input* tokens).
        model_id: the genai-prices model id matched, when the source is genai-prices.
        provider_id: the genai-prices provider id matched, when the source is genai-prices.
        valid_until: Unix time after which a cached genai-prices entry is looked up again
            (date- or time-of-day-dependent prices); ``None`` = never.
    """

    input_per_token: float
    output_per_token: float
    source: PriceSource = "override"
    per_request: float = 0.0
    input_tiers: tuple[tuple[int, float], ...] = ()
    output_tiers: tuple[tuple[int, float], ...] = ()
    model_id: str | None = None
    provider_id: str | None = None
    valid_until: float | None = field(default=None, compare=False, repr=False)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD cost of one call with these token counts (negative counts count as 0)."""
        input_tokens = max(input_tokens, 0)
        output_tokens = max(output_tokens, 0)
        if not (input_tokens or output_tokens):
            return 0.0
        input_rate = self.input_per_token
        output_rate = self.output_per_token
        if self.input_tiers:
            input_rate = _tier_rate(self.input_tiers, input_tokens, input_rate)
        if self.output_tiers:
            output_rate = _tier_rate(self.output_tiers, input_tokens, output_rate)
        return input_tokens * input_rate + output_tokens * output_rate + self.per_request

    @property
    def per_million(self) -> tuple[float, float]:
        """``(input, output)`` USD per million tokens, base tier (the ``KNOWN_MODELS`` form)."""
        return (_per_million(self.input_per_token), _per_million(self.output_per_token))


def _tier_rate(tiers: tuple[tuple[int, float], ...], input_tokens: int, base: float) -> float:
    for threshold, rate in reversed(tiers):
        if input_tokens > threshold:
            return rate
    return base


# --- overrides and cache (module state; reset with clear_price_overrides) --------------------

_lock = threading.Lock()
_overrides: dict[str, ModelPrice] = {}
_cache: dict[str, ModelPrice | None] = {}


class _Generation:
    """Bumped whenever overrides change, so a lookup racing a change never caches stale data."""

    value = 0


_logged: set[str] = set()
_LOGGED_LIMIT: Final = 256


def _log_once(key: str, message: str, *args: object, exc: BaseException | None = None) -> None:
    with _lock:
        if key in _logged or len(_logged) >= _LOGGED_LIMIT:
            return
        _logged.add(key)
    if exc is None:
        _log.warning(message, *args)
    else:
        # the exception's type chain, never its message or traceback: Stroma's log lines name
        # error types only (README, "Seeing runs in Jaeger and Grafana")
        _log.warning(message + " (%s)", *args, exception_types(exc))


MAX_MODEL_CHARS: Final = MAX_LABEL_CHARS
"""Longest model name that can be priced; a longer one is unpriced (and not cached)."""

MAX_PRICE_PER_1M: Final = 1_000_000.0
"""Largest price override accepted, in USD per 1M tokens ($1 per token). With token counts
bounded per attempt (:data:`stroma._loop.step_io.MAX_TOKENS`) this keeps every cost finite."""


def _valid_price(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return False
    if isinstance(value, Decimal):
        # is_finite() never raises; math.isfinite() raises ValueError on a signalling NaN
        return value.is_finite() and 0 <= value <= MAX_PRICE_PER_1M
    return math.isfinite(value) and 0 <= value <= MAX_PRICE_PER_1M


def _check_price(model: object, input_per_1m: object, output_per_1m: object) -> None:
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        shown = repr(model) if not isinstance(model, str) else repr(bound_text(model, 64))
        raise ConfigurationError(
            f"price override: model must be a non-empty string of at most {MAX_MODEL_CHARS} characters, got {shown}"
        )
    for name, value in (("input_per_1m", input_per_1m), ("output_per_1m", output_per_1m)):
        if not _valid_price(value):
            raise ConfigurationError(
                f"price override for {model!r}: {name} must be a finite number from 0 to {MAX_PRICE_PER_1M:,.0f} "
                f"(USD per 1M tokens), got {value!r}"
            )


def set_price(model: str, *, input_per_1m: float, output_per_1m: float) -> None:
    """Price *model* yourself (custom, fine-tuned or self-hosted models), in USD per 1M tokens.

    An override beats genai-prices, and also applies to ``"provider:model"`` and
    ``"provider/model"`` strings whose model part equals *model*. Raises
    :class:`~stroma.errors.ConfigurationError` for an empty model name or a negative,
    non-finite (including ``Decimal`` NaN), non-numeric (a string is refused, not parsed) or
    absurd price (above :data:`MAX_PRICE_PER_1M`). Overrides are process-wide; see
    :func:`clear_price_overrides`.
    """
    _check_price(model, input_per_1m, output_per_1m)
    price = ModelPrice(
        input_per_token=_per_token(input_per_1m),
        output_per_token=_per_token(output_per_1m),
        source="override",
    )
    with _lock:
        _overrides[model] = price
        _cache.clear()
        _Generation.value += 1


def remove_price(model: str) -> bool:
    """Drop the override for *model*; returns whether there was one."""
    with _lock:
        removed = _overrides.pop(model, None) is not None
        if removed:
            _cache.clear()
            _Generation.value += 1
    return removed


def clear_price_overrides() -> None:
    """Drop every override and the resolution cache (prices come from genai-prices again)."""
    with _lock:
        _overrides.clear()
        _cache.clear()
        _Generation.value += 1


def price_for(model: str) -> ModelPrice | None:
    """The price of *model*, or ``None`` when it has no known price.

    Accepts ``"gpt-4o"``, ``"provider:model"`` and ``"provider/model"`` (see the module
    docstring for the order). The first call for a given string searches the overrides and the
    genai-prices table; later calls are a cache lookup. A name longer than
    :data:`MAX_MODEL_CHARS` has no price (and is not cached). Never raises.
    """
    price = _cache.get(model) if isinstance(model, str) else None
    if price is None:
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS or model in _cache:
            # no model name is that long: unpriced, and never cached (the cache holds the names)
            return None
        return _resolve_and_cache(model)
    if price.valid_until is not None and time.time() >= price.valid_until:
        return _resolve_and_cache(model)
    return price


def preload(models: Iterable[str] = ()) -> None:
    """Load the genai-prices table now (once per process) and resolve *models*, so the first
    priced call of a run does not pay for it (30-60 ms on a quiet machine). Never raises."""
    global _table_collected
    try:
        genai_prices.data_snapshot.get_snapshot()
    except Exception as exc:
        _log_once("preload", "genai-prices could not load its price table; models may be unpriced", exc=exc)
        return
    if not _table_collected:
        # Loading the table allocates tens of thousands of objects; the interpreter's next full
        # garbage collection would then land inside the first attempt (~100 ms measured). Pay it
        # here, once, while the run is being set up.
        _table_collected = True
        gc.collect()
    for model in models:
        price_for(model)


_table_collected = False


def cost_usd(model: str | None, input_tokens: int, output_tokens: int) -> tuple[float, bool]:
    """``(cost in USD, priced)`` for one call.

    * no tokens used: ``(0.0, True)``, whatever the model (nothing was spent);
    * tokens used and a price known: ``(cost, True)``;
    * tokens used but no model, or a model with no known price: ``(0.0, False)``; the caller
      marks the usage unpriced (design §3, improvement 6).

    Negative token counts count as 0. A cost that is not finite (an absurd table price) makes
    the usage unpriced and is logged once. Never raises.
    """
    try:
        if input_tokens <= 0 and output_tokens <= 0:
            return 0.0, True
        if model is None:
            return 0.0, False
        price = price_for(model)
        if price is None:
            return 0.0, False
        cost = price.cost(input_tokens, output_tokens)
        if not math.isfinite(cost) or cost < 0:
            # never let an infinite or negative cost reach totals, budgets, metrics or checkpoints
            raise ArithmeticError("the computed cost is not a finite amount >= 0")
        return cost, True
    except Exception as exc:
        _log_once("cost_usd", "pricing failed for model %r; usage marked unpriced", model, exc=exc)
        return 0.0, False


def estimate_cost_usd(model: str | None, input_tokens: int, output_tokens: int = 0) -> float:
    """USD cost of a call, from the price table; ``0.0`` for a model with no known price.

    Kept for compatibility. A ``0.0`` here cannot tell "free" from "unknown": the step loop
    uses :func:`stroma.pricing.cost_usd`, which also says whether the model was priced, and
    marks unpriced usage.
    """
    return cost_usd(model, input_tokens, output_tokens)[0]


# --- resolution -------------------------------------------------------------------------------


def _split_ref(model: str) -> tuple[str, str] | None:
    """``("provider", "model")`` for ``"provider:model"`` / ``"provider/model"``, else ``None``."""
    positions = [i for i in (model.find(":"), model.find("/")) if i > 0]
    if not positions:
        return None
    cut = min(positions)
    provider, bare = model[:cut].strip(), model[cut + 1 :].strip()
    if not provider or not bare:
        return None
    return provider, bare


def _resolve_and_cache(model: str) -> ModelPrice | None:
    generation = _Generation.value
    price = _resolve(model)
    with _lock:
        if generation == _Generation.value:
            if model not in _cache and len(_cache) >= CACHE_LIMIT:
                _cache.pop(next(iter(_cache)))
            _cache[model] = price
    return price


def _resolve(model: str) -> ModelPrice | None:
    split = _split_ref(model)
    override = _overrides.get(model)
    if override is None and split is not None:
        override = _overrides.get(split[1])
    if override is not None:
        return override
    candidates: list[tuple[str, str | None]] = [(model, None)]
    if split is not None:
        provider, bare = split
        candidates = [(bare, provider), (model, None)]
        if not _is_known_provider(provider):
            candidates.append((bare, None))
    for ref, provider_id in candidates:
        try:
            return _from_genai_prices(ref, provider_id)
        except LookupError:
            continue
        except Exception as exc:
            _log_once(
                f"genai:{type(exc).__name__}",
                "genai-prices failed while pricing %r; the model is treated as unpriced",
                model,
                exc=exc,
            )
            return None
    _log.debug("no price known for model %r; its usage will be marked unpriced", model)
    return None


def _is_known_provider(provider: str) -> bool:
    try:
        genai_prices.data_snapshot.get_snapshot().find_provider(None, provider, None)
    except LookupError:
        return False
    except Exception:
        return True  # cannot tell: do not guess a price from another provider
    return True


def _from_genai_prices(ref: str, provider_id: str | None) -> ModelPrice:
    """Resolve *ref* with genai-prices. Raises ``LookupError`` for unknown models."""
    now = datetime.now(tz=timezone.utc)
    calc = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1, output_tokens=1),
        ref,
        provider_id=provider_id,
        genai_request_timestamp=now,
    )
    prices = calc.model_price
    input_price = getattr(prices, "input_mtok", None)
    output_price = getattr(prices, "output_mtok", None)
    if input_price is None and output_price is None:
        raise LookupError(f"{ref!r} has no token prices in genai-prices")
    input_base, input_tiers = _rates(input_price)
    output_base, output_tiers = _rates(output_price)
    per_kilo_requests = getattr(prices, "requests_kcount", None)
    per_request = float(per_kilo_requests / 1000) if isinstance(per_kilo_requests, Decimal) else 0.0
    return ModelPrice(
        input_per_token=input_base,
        output_per_token=output_base,
        source="genai-prices",
        per_request=per_request,
        input_tiers=input_tiers,
        output_tiers=output_tiers,
        model_id=str(calc.model.id),
        provider_id=str(calc.provider.id),
        valid_until=_valid_until(calc.model.prices, now),
    )


def _rates(price: Any) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Base per-token rate and tiers from a genai-prices ``Decimal`` or ``TieredPrices``."""
    if price is None:
        return 0.0, ()
    if isinstance(price, Decimal):
        return _per_token(price), ()
    tiers = tuple(sorted((int(tier.start), _per_token(tier.price)) for tier in price.tiers))
    return _per_token(price.base), tiers


def _valid_until(conditional_prices: Any, now: datetime) -> float | None:
    """When a price resolved at *now* may change: the next start date, or a minute for
    time-of-day prices. ``None`` when the model has a single, unconditional price."""
    if not isinstance(conditional_prices, list):
        return None
    candidates: list[float] = []
    for conditional in conditional_prices:
        constraint = getattr(conditional, "constraint", None)
        start = getattr(constraint, "start_date", None)
        if isinstance(start, date):
            start_at = datetime(start.year, start.month, start.day, tzinfo=timezone.utc)
            if start_at > now:
                candidates.append(start_at.timestamp())
        elif hasattr(constraint, "start_time"):
            candidates.append(now.timestamp() + _TIME_OF_DAY_TTL_S)
    return min(candidates) if candidates else None


# --- KNOWN_MODELS: the established dict-like entry point -------------------------------------


class _KnownModels(MutableMapping[str, tuple[float, float]]):
    """``KNOWN_MODELS``: model prices as ``(input, output)`` USD per 1M tokens.

    * ``KNOWN_MODELS["my-model"] = (1.0, 2.0)`` registers an override (:func:`set_price`);
    * ``KNOWN_MODELS["gpt-4o"]`` is the resolved price (override or genai-prices; the base
      tier for tiered prices); ``KeyError`` when unpriced;
    * ``"some-model" in KNOWN_MODELS`` is true for any priced model;
    * iteration yields the overrides, then the established package's model names that resolve
      (genai-prices knows thousands of models; list them with its own CLI);
    * ``del KNOWN_MODELS[name]`` removes an override (genai-prices entries cannot be removed);
      ``KNOWN_MODELS.clear()`` removes every override.
    """

    def __getitem__(self, model: str) -> tuple[float, float]:
        price = price_for(model)
        if price is None:
            raise KeyError(model)
        return price.per_million

    def __setitem__(self, model: str, value: tuple[float, float]) -> None:
        try:
            input_per_1m, output_per_1m = value
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"KNOWN_MODELS[{model!r}] must be an (input, output) pair of USD per 1M tokens, got {value!r}"
            ) from None
        set_price(model, input_per_1m=input_per_1m, output_per_1m=output_per_1m)

    def __delitem__(self, model: str) -> None:
        if not remove_price(model):
            raise KeyError(f"{model!r} has no price override (genai-prices entries cannot be removed)")

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and price_for(model) is not None

    def __iter__(self) -> Iterator[str]:
        overrides = list(_overrides)
        yield from overrides
        for name in LEGACY_MODEL_NAMES:
            if name not in overrides and price_for(name) is not None:
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def clear(self) -> None:
        clear_price_overrides()

    def __repr__(self) -> str:
        return f"KNOWN_MODELS({dict(self.items())!r})"


KNOWN_MODELS: MutableMapping[str, tuple[float, float]] = _KnownModels()
"""Model prices in USD per 1M tokens, ``(input, output)``; assign to register an override."""
