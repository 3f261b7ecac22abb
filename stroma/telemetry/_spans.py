"""Step and attempt spans recorded cheaply and handed to the SDK's span processors when they end.

Starting a span with the OpenTelemetry SDK's ``Tracer.start_span`` and ending it with
``Span.end`` costs most of a traced step: a lock, a ``BoundedAttributes`` that cleans every
attribute value one call at a time, a second cleaning pass for the attributes added at the end,
and a ``ReadableSpan`` copy. A step and its attempts set a dozen plain ``str``/``int``/``float``
attributes that need no cleaning, so :class:`QuietSpan` does what the SDK does with less work:

* at start it takes the same decisions as ``Tracer.start_span`` with the tracer's own objects
  (id generator, sampler and its attributes and trace state, trace flags, the SDK's internal span
  metrics) and becomes the current span like any other, so spans started inside the step —
  GenAI instrumentation, the user's own — get it as their parent;
* while open it keeps what the user's code writes on it (``trace.get_current_span()``) with the
  SDK's rules: attributes, events and links go into the SDK's own ``BoundedAttributes`` and
  ``BoundedList`` under the tracer's ``SpanLimits``; status, name and exceptions as ``Span`` does;
* at the end it builds the ``ReadableSpan`` the SDK would build and calls the tracer's
  ``span_processor.on_end`` with it, so exporters see the same span. Where nothing was dropped
  its attributes and events are a plain ``dict`` and ``list`` rather than the SDK's bounded
  containers: ``ReadableSpan`` shows both as a read-only mapping and a tuple, with the same
  dropped counts (0), so what is exported is the same.

It is only used when the result cannot differ (:meth:`QuietTracer.usable`): an SDK ``Tracer`` of
the pinned version, enabled, whose span processors do nothing in ``on_start`` and
``_on_ending`` — except Stroma's GenAI usage processor, whose ``on_start`` gets the quiet span
(it reads only ``parent`` and ``context``). A provider with any other processor that works in
``on_start`` (it may write on the live span) gets the SDK's own spans, unchanged. Sampling is
the sampler's: a dropped span is the SDK's ``NonRecordingSpan``.

The SDK attributes this relies on are checked by ``tests/telemetry/test_quiet_spans.py``, which
also exports the same runs through both paths and compares every field that goes on the wire.
"""

from __future__ import annotations

import logging
import traceback
import types
from collections.abc import Iterable, Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    ConcurrentMultiSpanProcessor,
    Event,
    ReadableSpan,
    SynchronousMultiSpanProcessor,
    Tracer,
)
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from stroma.telemetry import genai_usage

logger = logging.getLogger("opentelemetry.sdk.trace")

__all__ = ["QuietSpan", "QuietTracer"]

_INTERNAL = SpanKind.INTERNAL
_UNSET = Status(StatusCode.UNSET)
_PLAIN = (str, bool, int, float)
_FLAGS = {value: TraceFlags(value) for value in range(4)}
_RANDOM = TraceFlags.RANDOM_TRACE_ID
_SAMPLED = TraceFlags.SAMPLED
_EVENT_CACHE_SIZE = 256
_MULTI = (SynchronousMultiSpanProcessor, ConcurrentMultiSpanProcessor)
# what a span without events or links holds (the SDK makes a new empty BoundedList per span; a
# ReadableSpan only ever shows it as a new tuple, so one empty list serves every span)
_NONE: BoundedList[Any] = BoundedList(0)


def _noop_pass(self: Any, span: Any, parent_context: Any = None) -> None:
    pass


def _noop_doc(self: Any, span: Any, parent_context: Any = None) -> None:
    """A method that does nothing."""


def _noop_return(self: Any, span: Any, parent_context: Any = None) -> None:
    return None


def _noop_doc_return(self: Any, span: Any, parent_context: Any = None) -> None:
    """A method that does nothing."""
    return None


_NOOP_CODES = frozenset(f.__code__.co_code for f in (_noop_pass, _noop_doc, _noop_return, _noop_doc_return))


def does_nothing(method: Any) -> bool:
    """Whether *method* (a processor's ``on_start`` or ``_on_ending``) has an empty body.

    Compared by bytecode with empty functions compiled by the running interpreter: a body that
    is ``pass``, ``...``, a docstring or ``return None``. Anything else counts as work.
    """
    function = getattr(method, "__func__", method)
    if not isinstance(function, types.FunctionType):
        return False
    code = function.__code__
    return code.co_code in _NOOP_CODES and not code.co_freevars and function.__closure__ is None


class QuietTracer:
    """Quiet spans for one SDK tracer (see the module docstring)."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self._seen: Any = None
        self._quiet = False
        self._genai = False
        self._events: dict[tuple[Any, ...], BoundedAttributes] = {}
        self._sdk = type(tracer) is Tracer and isinstance(getattr(tracer, "span_processor", None), _MULTI)

    def usable(self) -> bool:
        """Whether a quiet span exports exactly what the SDK's span would (checked per span:
        processors can be added to a provider at any time)."""
        if not self._sdk:
            return False
        tracer = self.tracer
        processors = tracer.span_processor._span_processors
        if processors is not self._seen:
            self._genai = any(p is genai_usage.PROCESSOR for p in processors)
            self._quiet = all(
                p is genai_usage.PROCESSOR
                or (does_nothing(getattr(p, "on_start", None)) and does_nothing(getattr(p, "_on_ending", None)))
                for p in processors
            )
            self._seen = processors
        return self._quiet and tracer._is_enabled()

    def start(self, name: str, attributes: dict[str, Any], start_ns: int) -> Any:
        """A span named *name* under the current span, as ``Tracer.start_span`` would start it
        (kind ``INTERNAL``, no links): a :class:`QuietSpan`, or the SDK's ``NonRecordingSpan``
        when the sampler does not record it."""
        tracer = self.tracer
        parent: SpanContext | None = trace_api.get_current_span().get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = tracer.id_generator.generate_trace_id()
            random_trace_id = tracer.id_generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        decision = _static_decision(tracer.sampler, parent)
        if decision is None:
            result = tracer.sampler.should_sample(None, trace_id, name, _INTERNAL, attributes, ())
            decision, given, trace_state = result.decision, result.attributes, result.trace_state
        else:  # what the static sampler returns, without building its result
            given, trace_state = attributes, None if parent is None else parent.trace_state
        flags = _SAMPLED if decision.is_sampled() else 0
        if random_trace_id:
            flags |= _RANDOM
        context = SpanContext(
            trace_id,
            tracer.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=_FLAGS[flags],
            trace_state=trace_state,
        )
        ended = tracer._tracer_metrics.start_span(parent, decision)
        if not decision.is_recording():
            return trace_api.NonRecordingSpan(context=context)
        span = QuietSpan(self, name, context, parent, given, start_ns, ended)
        if self._genai:
            genai_usage.PROCESSOR.on_start(span, parent_context=None)
        return span

    def event_attributes(self, attributes: Mapping[str, Any] | None) -> BoundedAttributes:
        """Event attributes as ``Span.add_event`` stores them (immutable, so plain ones are shared)."""
        limits = self.tracer._span_limits
        key: tuple[Any, ...] | None = None
        if attributes is not None and len(attributes) <= 4:
            # the value's type is part of the key: 1, 1.0 and True are equal but export apart
            key = tuple((k, v, type(v)) for k, v in attributes.items())
            if all(type(k) is str and t in _PLAIN for k, _, t in key):
                cached = self._events.get(key)
                if cached is not None:
                    return cached
            else:
                key = None
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        if key is not None:
            if len(self._events) >= _EVENT_CACHE_SIZE:
                self._events.clear()
            self._events[key] = bounded
        return bounded


def _static_decision(sampler: Any, parent: SpanContext | None) -> Decision | None:
    """The decision of *sampler* for a span under *parent* (a valid span context or ``None``)
    when it is a static one (``ALWAYS_ON``, ``ALWAYS_OFF``, or what a ``ParentBased`` sampler,
    the SDK's default, delegates to here); ``None`` for any other sampler (it is then asked)."""
    if type(sampler) is ParentBased:
        if parent is None:
            sampler = sampler._root
        elif parent.is_remote:
            sampled = parent.trace_flags.sampled
            sampler = sampler._remote_parent_sampled if sampled else sampler._remote_parent_not_sampled
        else:
            sampled = parent.trace_flags.sampled
            sampler = sampler._local_parent_sampled if sampled else sampler._local_parent_not_sampled
    if type(sampler) is StaticSampler:
        decision: Decision = sampler._decision
        return decision
    return None


def _plain(attributes: Iterable[tuple[Any, Any]], max_length: int | None) -> bool:
    """Whether cleaning would keep every pair as it is (non-empty ``str`` keys, plain values)."""
    for key, value in attributes:
        kind = type(value)
        if type(key) is not str or not key or kind not in _PLAIN:
            return False
        if kind is str and max_length is not None and len(value) > max_length:
            return False
    return True


class QuietSpan(trace_api.Span):
    """A recording span that is handed to the span processors only when it ends."""

    __slots__ = (
        "_attributes",
        "_ended_metrics",
        "_events",
        "_links",
        "_owner",
        "_start",
        "_status",
        "context",
        "end_time",
        "name",
        "parent",
        "start_time",
    )

    def __init__(
        self,
        owner: QuietTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: Mapping[str, Any],
        start_ns: int,
        ended_metrics: Any,
    ) -> None:
        self._owner = owner
        self.name = name
        self.context = context
        self.parent = parent
        self.start_time = start_ns
        self.end_time: int | None = None
        self._ended_metrics = ended_metrics
        self._status = _UNSET
        self._events: Any = None
        self._links: Any = None
        limits = owner.tracer._span_limits
        maximum = limits.max_span_attributes
        # start attributes: a plain copy when cleaning cannot change them, else the SDK's own
        self._start: dict[str, Any] | None = None
        self._attributes: BoundedAttributes | None = None
        if (maximum is None or len(attributes) <= maximum) and _plain(
            attributes.items(), limits.max_span_attribute_length
        ):
            self._start = dict(attributes)
        else:
            self._materialize(attributes)

    def _materialize(self, attributes: Mapping[str, Any] | None) -> BoundedAttributes:
        limits = self._owner.tracer._span_limits
        bounded = BoundedAttributes(
            limits.max_span_attributes,
            attributes,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )
        self._attributes = bounded
        self._start = None
        return bounded

    def _bounded(self) -> BoundedAttributes:
        return self._attributes if self._attributes is not None else self._materialize(self._start)

    def _closed(self, what: str) -> bool:
        if self.end_time is None:
            return False
        logger.warning("Tried calling %s on an ended span.", what)
        return True

    # --- opentelemetry.trace.Span, for the user's code while the span is current -----------------

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.end_time is not None:
            logger.warning("Setting attribute on ended span.")
            return
        self._bounded()._set_items(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        if self.end_time is not None:
            logger.warning("Setting attribute on ended span.")
            return
        self._bounded()[key] = value

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        event = Event(name=name, attributes=self._owner.event_attributes(attributes), timestamp=timestamp)
        if self._closed("_add_event"):
            return
        events = self._events
        if events is None:
            events = self._events = [event]
        elif type(events) is list:
            events.append(event)
        else:
            events.append(event)
            return
        # a plain list while under the limit (nothing dropped: exported the same); the SDK's
        # BoundedList, which drops the oldest, from the event that reaches it
        maximum = self._owner.tracer._span_limits.max_events
        if maximum is not None and len(events) >= maximum:
            bounded: BoundedList[Event] = BoundedList(maximum)
            bounded.extend(events)
            self._events = bounded

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if not (context and (context.is_valid or (attributes or context.trace_state))):
            return
        limits = self._owner.tracer._span_limits
        bounded = BoundedAttributes(
            limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        if self._closed("_add_link"):
            return
        if self._links is None:
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        if not self._closed("update_name"):
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if not self._closed("set_status"):
            self._set_status(status, description)

    def _set_status(self, status: Status | StatusCode, description: str | None) -> None:
        ok = self._status.status_code is StatusCode.OK
        if isinstance(status, Status):
            if ok or status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`", description
                )
            self._status = status
        elif isinstance(status, StatusCode):
            if ok or status is StatusCode.UNSET:
                return
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        """End the span with what is on it now (what ``Span.end`` does if the user's code ends
        it; Stroma's own end is :meth:`finish`)."""
        self.finish((), None, end_time if end_time is not None else time_ns())

    # --- Stroma's end ----------------------------------------------------------------------------

    def finish(self, later: Sequence[tuple[str, Any]] | Any, error: tuple[str, Status] | None, end_ns: int) -> None:
        """Add the attributes *later* (pairs) and, with *error* ``(error.type, status)``, the
        error type and status, end the span at *end_ns* and hand it to the span processors."""
        if self.end_time is not None:
            logger.warning("Calling end() on an ended span.")
            return
        # ended from here on: a write from another thread now is refused (as on an ended span)
        # rather than racing with the copy below
        self.end_time = end_ns
        owner = self._owner
        tracer = owner.tracer
        limits = tracer._span_limits
        start = self._start
        if start is not None:
            maximum = limits.max_span_attributes
            if not isinstance(later, list):
                later = list(later)
            if (maximum is None or len(start) + len(later) + 1 <= maximum) and _plain(
                later, limits.max_span_attribute_length
            ):
                final = start
                for key, value in later:
                    if key in final:
                        del final[key]
                    final[key] = value
                if error is not None:
                    final.pop("error.type", None)
                    final["error.type"] = error[0]
                # what the SDK's container would hold, nothing dropped (a ReadableSpan shows either
                # as a read-only mapping and exports the same)
                attributes: Mapping[str, Any] = final
            else:
                attributes = self._replay(start, later, error)
        else:
            attributes = self._bounded()
            if later:
                attributes._set_items(dict(later))
            if error is not None:
                attributes["error.type"] = error[0]
            attributes._immutable = True
        if error is not None:
            self._set_status(error[1], None)
        self._ended_metrics()
        span = ReadableSpan(
            name=self.name,
            context=self.context,
            parent=self.parent,
            resource=tracer.resource,
            attributes=attributes,
            events=self._events if self._events is not None else _NONE,
            links=self._links if self._links is not None else _NONE,
            kind=_INTERNAL,
            status=self._status,
            start_time=self.start_time,
            end_time=end_ns,
            instrumentation_info=tracer.instrumentation_info,
            instrumentation_scope=tracer._instrumentation_scope,
        )
        tracer.span_processor.on_end(span)

    def _replay(
        self, start: dict[str, Any], later: list[tuple[str, Any]], error: tuple[str, Status] | None
    ) -> BoundedAttributes:
        # the SDK's own cleaning, in the SDK's order, when a value needs it or a limit is reached
        attributes = self._materialize(None)
        attributes._set_items(start)
        attributes._set_items(dict(later))
        if error is not None:
            attributes["error.type"] = error[0]
        attributes._immutable = True
        return attributes
