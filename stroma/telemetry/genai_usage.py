"""Usage from the GenAI model-call spans a step's code emits (issue 10, part 1).

Model clients and agent frameworks that are instrumented with OpenTelemetry (the official
``opentelemetry-instrumentation-genai-*`` packages, SDKs with native spans, Pydantic AI, ...)
emit one ``CLIENT`` span per model call carrying ``gen_ai.usage.*``. A step that makes such
calls needs no code to be charged for them: :class:`GenAIUsageProcessor` sees those spans end
under an ``attempt`` span and hands their usage to that attempt, which charges it like usage the
step returned (budget checks, cost, metrics, ``stroma show``).

What counts, per attempt:

* **leaf inference spans** only: kind ``CLIENT``, ``gen_ai.operation.name`` one of ``chat``,
  ``text_completion``, ``generate_content``, ``embeddings``, and no inference span below it. A
  LangChain span wrapping an OpenAI span, or an instrumentation span wrapping an SDK's native
  span, is one call, counted once (at the innermost span). Wrapper operations
  (``invoke_agent``, ``invoke_workflow``, ``execute_tool``) and ``gen_ai.aggregated_usage.*``
  totals are never counted.
* tokens from ``gen_ai.usage.input_tokens`` / ``gen_ai.usage.output_tokens``. Input tokens
  already include cached ones: ``gen_ai.usage.cache_read.input_tokens`` and
  ``gen_ai.usage.cache_write.input_tokens`` (or the older ``cache_creation``) are never added on
  top; they only split the input for pricing (cache reads and writes at the model's cache rates
  from genai-prices; a price set with :func:`stroma.pricing.set_price` has no cache rates, so
  all input is charged at its input rate).
* the model from ``gen_ai.response.model``, else ``gen_ai.request.model`` (``"unknown"`` counts
  as missing: the usage is then unpriced, as for any model without a price); the provider from
  ``gen_ai.provider.name``, else ``gen_ai.system`` (used to look the price up).
* a vendor's own cost attribute (``gen_ai.usage.cost``, ``operation.cost``) is kept on the
  call's event for comparison; Stroma's price is what is charged.

Precedence (``TelemetrySettings.usage_source`` / ``STROMA_USAGE_SOURCE``): ``"auto"`` (default)
charges usage the step reported itself (returned or :func:`stroma.report_usage`) when it
reported any, else the spans' usage; ``"spans"`` charges the spans' usage whenever the attempt
has model-call spans, else what the step reported; ``"explicit"`` never charges span usage.
Either way the usage is counted once, and every counted call is listed as a
``stroma.model_call`` event on its attempt span.

Correlation is by span ids, never by attributes: the attempt span's id is registered when it
starts; a span whose parent is registered is registered too (so calls at any depth below the
attempt are found), and entries are dropped when their span ends. A span whose parent is not
registered, started while a registered span is the current one on its thread, belongs there too:
some instrumentations parent spans on their framework's run tree instead of the current context
(LangChain's puts a model call made in a LangGraph node under its workflow span). Known limits, with what the
user sees:

* a span started on a thread that did not receive the step's context (a bare ``Thread``, or an
  executor without ``contextvars.copy_context()``) has no parent and is not attributed: the
  step's usage is then 0 unless it reports it (``asyncio.to_thread`` and LangChain's executors
  copy the context and are fine);
* a streamed response whose span ends after its attempt ended (the stream is consumed outside
  the step) is not charged to any attempt; Stroma logs a warning once and counts it in
  ``stroma.telemetry.errors`` (component ``genai late span``): consume streams inside the step;
* a sampler that drops the attempt span drops its children too (processors never see unsampled
  spans): usage from spans needs the attempt span to be recorded;
* spans are only seen on SDK tracer providers Stroma attached the processor to: the one Stroma
  records with and the application's global SDK provider (attached, never replaced). An
  application without its own provider calls :func:`stroma.telemetry.install_global` once, so
  that instrumentations record with Stroma's provider.

The processor's callbacks never raise: a fault is logged once and counted (conventions).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Final, Literal

import genai_prices
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind

# a module reference, not names: stroma.pricing imports stroma.telemetry while it initialises
from stroma import pricing
from stroma.telemetry import names as n
from stroma.telemetry.records import SpanRecord

__all__ = [
    "INFERENCE_OPERATIONS",
    "PROCESSOR",
    "GenAIUsageProcessor",
    "ModelCall",
    "UsageSource",
    "attach",
    "calls_in_current_attempt",
    "settle",
    "track",
]

logger = logging.getLogger("stroma.telemetry")

UsageSource = Literal["auto", "explicit", "spans"]
USAGE_SOURCES: Final = ("auto", "explicit", "spans")

INFERENCE_OPERATIONS: Final = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
"""``gen_ai.operation.name`` values of a model call (wrappers such as ``invoke_agent`` are not)."""

MAX_TRACKED_SPANS: Final = 100_000
"""Open spans tracked at once below attempts; past it new spans are not attributed (counted)."""

_OPERATION: Final = "gen_ai.operation.name"
_INPUT: Final = "gen_ai.usage.input_tokens"
_OUTPUT: Final = "gen_ai.usage.output_tokens"
_CACHE_READ: Final = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")
_CACHE_WRITE: Final = (
    "gen_ai.usage.cache_write.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
)
_RESPONSE_MODEL: Final = "gen_ai.response.model"
_REQUEST_MODEL: Final = "gen_ai.request.model"
_PROVIDER: Final = "gen_ai.provider.name"
_SYSTEM: Final = "gen_ai.system"
_VENDOR_COST: Final = ("gen_ai.usage.cost", "operation.cost")

# gen_ai.provider.name values whose genai-prices provider id differs
_PROVIDER_IDS: Final = {
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "azure.ai.openai": "azure",
    "aws.bedrock": "aws",
}


@dataclass(frozen=True)
class ModelCall:
    """One model call counted for an attempt (one leaf inference span)."""

    model: str | None
    provider: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost: float
    priced: bool
    vendor_cost: float | None
    span_id: str
    error_type: str | None = None


class _Attempt:
    __slots__ = ("calls", "settled", "step_id")

    def __init__(self, step_id: str) -> None:
        self.calls: list[ModelCall] = []
        self.settled = False
        self.step_id = step_id


class _Node:
    __slots__ = ("attempt", "inference_below", "parent")

    def __init__(self, attempt: _Attempt, parent: int) -> None:
        self.attempt = attempt
        self.parent = parent  # 0 for the attempt span itself
        self.inference_below = False


_nodes: dict[int, _Node] = {}
_warned: set[str] = set()


def _log_fault(component: str, exc: BaseException) -> None:
    if component not in _warned:
        _warned.add(component)
        logger.warning("stroma telemetry: %s failed (%s)", component, type(exc).__name__)


fault_reporter: Callable[[str, BaseException], None] = _log_fault
"""Where faults go; :mod:`stroma.telemetry.runtime` points it at its fault log (counted in
``stroma.telemetry.errors``) when it is imported."""


def _fault(component: str, exc: BaseException | None = None) -> None:
    fault_reporter(component, exc if exc is not None else RuntimeError(component))


class GenAIUsageProcessor:
    """An OpenTelemetry ``SpanProcessor`` that attributes leaf GenAI inference spans to attempts.

    One instance (:data:`PROCESSOR`) serves every provider it is attached to. ``on_start`` and
    ``on_end`` run on the thread that starts or ends a span, cost a dict lookup for spans outside
    any attempt, and never raise.
    """

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        try:
            parent = span.parent
            node = None if parent is None else _nodes.get(parent.span_id)
            parent_id = 0 if parent is None else parent.span_id
            if node is None:
                # Some instrumentations parent spans on their framework's own run tree (the
                # LangChain one parents a model call under its LangGraph workflow span, outside
                # the attempt); the span current on the starting thread still says where it runs.
                if not _nodes:
                    return
                parent_id = trace_api.get_current_span().get_span_context().span_id
                node = _nodes.get(parent_id)
            if node is None or node.attempt.settled:
                return
            if len(_nodes) >= MAX_TRACKED_SPANS:
                _fault("genai span map full")
                return
            _nodes[span.context.span_id] = _Node(node.attempt, parent_id)
        except Exception as exc:
            _fault("genai usage", exc)

    def _on_ending(self, span: Any) -> None:
        return None

    def on_end(self, span: Any) -> None:
        try:
            node = _nodes.pop(span.context.span_id, None)
            if node is None or node.parent == 0 or node.inference_below:
                return
            if span.kind is not SpanKind.CLIENT:
                return
            attributes = span.attributes
            if attributes is None or attributes.get(_OPERATION) not in INFERENCE_OPERATIONS:
                return
            attributes = dict(attributes)  # one copy: lookups on the SDK's mapping proxy are slow
            # a leaf model call: every span above it is a wrapper of this call
            parent = node.parent
            while parent:
                above = _nodes.get(parent)
                if above is None or above.inference_below:
                    break
                above.inference_below = True
                parent = above.parent
            call = _call_from(attributes, format(span.context.span_id, "016x"))
            if not span.status.is_ok:
                error_type = attributes.get(n.ERROR_TYPE)
                call = replace(call, error_type=str(error_type) if error_type is not None else "error")
            attempt = node.attempt
            if attempt.settled:
                _late(attempt, call)
                return
            attempt.calls.append(call)
        except Exception as exc:
            _fault("genai usage", exc)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


PROCESSOR: Final = GenAIUsageProcessor()
"""The processor Stroma attaches to the tracer providers it knows about."""

_attached: weakref.WeakSet[Any] = weakref.WeakSet()
_attach_lock = threading.Lock()
_global_seen: list[Any] = [None]


def _after_fork_in_child() -> None:
    # the parent's attempts never end in the child; its lock may be held by a thread not copied
    global _attach_lock
    _attach_lock = threading.Lock()
    _nodes.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def attach(tracer_provider: Any) -> bool:
    """Add :data:`PROCESSOR` to *tracer_provider* (an SDK one) once; ``True`` if it is attached.

    A provider that is not an SDK ``TracerProvider`` (no ``add_span_processor``) is left alone.
    Never replaces a provider or its other processors.
    """
    add = getattr(tracer_provider, "add_span_processor", None)
    if add is None:
        return False
    with _attach_lock:
        try:
            if tracer_provider in _attached:
                return True
            add(PROCESSOR)
            _attached.add(tracer_provider)
        except Exception as exc:
            _fault("genai usage attach", exc)
            return False
    return True


def _attach_global() -> None:
    provider = trace_api.get_tracer_provider()
    if provider is not _global_seen[0]:
        _global_seen[0] = provider
        attach(provider)


def track(record: SpanRecord) -> None:
    """Start collecting the model calls below the attempt span of *record* (call after it starts).

    Also attaches the processor to the application's global SDK provider if that changed since
    the last attempt (model clients usually record with the global provider).
    """
    context = record.span_context
    if context is None or record.span is None:
        return
    _attach_global()
    _nodes[context.span_id] = _Node(_Attempt(str(record.attributes.get(n.STEP_ID, ""))), 0)


def calls_in_current_attempt() -> int | None:
    """Model calls counted so far for the attempt whose span is current, or ``None`` when the
    current span is not a tracked attempt (telemetry off, or called outside an attempt).

    Adapters use it to fall back on usage a framework reports in its own objects (LangChain's
    ``AIMessage.usage_metadata``) only when no model-call span was seen.
    """
    node = _nodes.get(trace_api.get_current_span().get_span_context().span_id)
    if node is None or node.parent != 0:
        return None
    return len(node.attempt.calls)


def collect(record: SpanRecord) -> list[ModelCall]:
    """The model calls counted for *record*'s attempt; stops collecting for it."""
    context = record.span_context
    if context is None:
        return []
    node = _nodes.pop(context.span_id, None)
    if node is None:
        return []
    node.attempt.settled = True
    return node.attempt.calls


def settle(source: str, record: SpanRecord, usage: Any) -> None:
    """Merge the model calls below attempt *record* into *usage* (its ``AttemptUsage``).

    Called once when the attempt ends, before it is charged. Adds one ``stroma.model_call`` event
    per counted call to *record*, sets ``stroma.usage.source`` (``"spans"`` or ``"explicit"``)
    when the attempt had calls, and, when span usage is charged, replaces *usage*'s tokens and
    model and sets ``usage.cost`` to the ``(USD, priced)`` summed per call.
    """
    try:
        calls = collect(record)
        if not calls:
            return
        for call in calls:
            record.add_event(n.EVENT_MODEL_CALL, _event_attributes(call))
        explicit = bool(usage.input_tokens or usage.output_tokens)
        if source == "explicit" or (source == "auto" and explicit):
            record.attributes[n.USAGE_SOURCE] = n.USAGE_SOURCE_EXPLICIT
            return
        usage.input_tokens = sum(call.input_tokens for call in calls)
        usage.output_tokens = sum(call.output_tokens for call in calls)
        # the attempt's model: the last call that used tokens (a failed call often used none)
        models = [call.model for call in calls if call.model is not None and (call.input_tokens or call.output_tokens)]
        models = models or [call.model for call in calls if call.model is not None]
        if models:
            usage.model = models[-1]
        usage.cost = (sum(call.cost for call in calls), all(call.priced for call in calls))
        record.attributes[n.USAGE_SOURCE] = n.USAGE_SOURCE_SPANS
    except Exception as exc:
        _fault("genai usage", exc)


# --- reading a span -------------------------------------------------------------------------------


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return max(int(value), 0)


def _first(attributes: Any, keys: tuple[str, ...]) -> object:
    for key in keys:
        value = attributes.get(key)
        if value is not None:
            return value
    return None


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if value and value.lower() != "unknown" else None


def _call_from(attributes: Any, span_id: str) -> ModelCall:
    model = _text(attributes.get(_RESPONSE_MODEL)) or _text(attributes.get(_REQUEST_MODEL))
    provider = _text(attributes.get(_PROVIDER)) or _text(attributes.get(_SYSTEM))
    input_tokens = _int(attributes.get(_INPUT))
    output_tokens = _int(attributes.get(_OUTPUT))
    cache_read = _int(_first(attributes, _CACHE_READ))
    cache_write = _int(_first(attributes, _CACHE_WRITE))
    vendor = _first(attributes, _VENDOR_COST)
    vendor_cost = float(vendor) if isinstance(vendor, (int, float)) and not isinstance(vendor, bool) else None
    cost, priced = price_call(model, provider, input_tokens, output_tokens, cache_read, cache_write)
    return ModelCall(
        model, provider, input_tokens, output_tokens, cache_read, cache_write, cost, priced, vendor_cost, span_id
    )


def _event_attributes(call: ModelCall) -> dict[str, str | bool | int | float]:
    attributes: dict[str, str | bool | int | float] = {
        _INPUT: call.input_tokens,
        _OUTPUT: call.output_tokens,
        n.COST_AMOUNT: float(call.cost),
        n.MODEL_CALL_SPAN_ID: call.span_id,
    }
    if call.model is not None:
        attributes[_RESPONSE_MODEL] = call.model
    if call.provider is not None:
        attributes[_PROVIDER] = call.provider
    if call.cache_read_tokens:
        attributes[_CACHE_READ[0]] = call.cache_read_tokens
    if call.cache_write_tokens:
        attributes[_CACHE_WRITE[0]] = call.cache_write_tokens
    if not call.priced:
        attributes[n.COST_UNPRICED] = True
    if call.vendor_cost is not None:
        attributes[n.MODEL_CALL_VENDOR_COST] = call.vendor_cost
    if call.error_type is not None:
        attributes[n.ERROR_TYPE] = call.error_type
    return attributes


def _late(attempt: _Attempt, call: ModelCall) -> None:
    _fault("genai late span")
    key = attempt.step_id
    if key in _warned or len(_warned) > 256:
        return
    _warned.add(key)
    logger.warning(
        "a model call of step %s (%s, %d input and %d output tokens) ended after its attempt and was not "
        "charged; consume streamed responses inside the step, or report the usage with stroma.report_usage()",
        key,
        call.model or "unknown model",
        call.input_tokens,
        call.output_tokens,
    )


# --- pricing one call -----------------------------------------------------------------------------


def _model_ref(model: str, provider: str | None) -> str:
    if provider is None:
        return model
    return f"{_PROVIDER_IDS.get(provider, provider)}:{model}"


_cache_rates: dict[tuple[str, str], tuple[float, float] | None] = {}


def price_call(
    model: str | None,
    provider: str | None,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> tuple[float, bool]:
    """``(USD, priced)`` for one call; *input_tokens* include the cache reads and writes.

    Without cache tokens this is :func:`stroma.pricing.cost_usd` on ``"provider:model"``. With
    them, the uncached part is charged at the input rate and the cached parts at genai-prices'
    cache-read and cache-write rates (the input rate where a model has none). Never raises.
    """
    if model is None:
        return pricing.cost_usd(None, input_tokens, output_tokens)
    ref = _model_ref(model, provider)
    if not (cache_read_tokens or cache_write_tokens):
        return pricing.cost_usd(ref, input_tokens, output_tokens)
    try:
        price = pricing.price_for(ref)
        if price is None:
            return pricing.cost_usd(None, input_tokens, output_tokens)
        if price.source != "genai-prices" or price.model_id is None or price.provider_id is None:
            return price.cost(input_tokens, output_tokens), True
        rates = _cache_rates_for(price.model_id, price.provider_id)
        if rates is None or price.input_tiers or price.output_tiers:
            return _genai_prices_total(price, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        read_rate, write_rate = rates
        cached = min(cache_read_tokens + cache_write_tokens, input_tokens)
        read = min(cache_read_tokens, cached)
        write = cached - read
        uncached = input_tokens - cached
        # ModelPrice.cost adds the per-request fee only when it sees tokens: add it here otherwise
        base = price.cost(uncached, output_tokens) if uncached or output_tokens else price.per_request
        rate_read = price.input_per_token if read_rate < 0 else read_rate
        rate_write = price.input_per_token if write_rate < 0 else write_rate
        return base + read * rate_read + write * rate_write, True
    except Exception as exc:
        _fault("genai usage pricing", exc)
        return pricing.cost_usd(ref, input_tokens, output_tokens)


def _cache_rates_for(model_id: str, provider_id: str) -> tuple[float, float] | None:
    """(cache-read, cache-write) USD per token; -1 where the model has none; None if tiered."""
    key = (model_id, provider_id)
    if key in _cache_rates:
        return _cache_rates[key]
    calc = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1, output_tokens=1), model_id, provider_id=provider_id
    )
    prices = calc.model_price
    rates: tuple[float, float] | None = None
    read = getattr(prices, "cache_read_mtok", None)
    write = getattr(prices, "cache_write_mtok", None)
    if (read is None or isinstance(read, Decimal)) and (write is None or isinstance(write, Decimal)):
        rates = (
            -1.0 if read is None else float(read.scaleb(-6)),
            -1.0 if write is None else float(write.scaleb(-6)),
        )
    if len(_cache_rates) >= 1024:
        _cache_rates.clear()
    _cache_rates[key] = rates
    return rates


def _genai_prices_total(price: Any, input_tokens: int, output_tokens: int, read: int, write: int) -> tuple[float, bool]:
    usage = genai_prices.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=read, cache_write_tokens=write
    )
    calc = genai_prices.calc_price(usage, price.model_id, provider_id=price.provider_id)
    return float(calc.total_price), True
