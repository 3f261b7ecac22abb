"""Reading a run back from Jaeger's HTTP query API, as records :func:`~stroma.cli.render.build_tree` takes.

Two calls, both of Jaeger's public HTTP API (Jaeger v2; v1's query service serves the same):

1. find the run's trace: the legacy search ``GET /api/traces?service=S&tags={"stroma.run.id": ID}``
   (skipped when the trace id is already known, e.g. from the local run store). When one run id
   has several traces (a run resumed under the same id), the most recent one is used;
2. fetch it as OTLP JSON: ``GET /api/v3/traces/{trace_id}`` (int64 values arrive as strings).

Each span becomes a record with ``kind`` ``run``/``step``/``attempt`` (from Stroma's attributes,
so an application's own spans in the same trace are kept as other kinds), ``id`` = span id and
``parent`` = parent span id. Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from stroma.errors import StromaError
from stroma.runstore import RunLookupError
from stroma.telemetry import names as n

__all__ = ["JaegerError", "fetch_run_records", "find_trace_id", "otlp_json_to_records"]

_TIMEOUT_S = 10.0
_MAX_BYTES = 64 * 1024 * 1024


class JaegerError(StromaError):
    """Jaeger could not be reached or answered something unexpected."""


def _get_json(base: str, path: str, timeout: float) -> Any:
    """GET ``base + path`` as JSON; ``LookupError`` on 404, :class:`JaegerError` otherwise."""
    url = base + path
    endpoint = path.partition("?")[0]
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise LookupError(url) from exc
        raise JaegerError(f"Jaeger at {base} answered HTTP {exc.code} for {endpoint}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JaegerError(f"cannot reach Jaeger at {base}: {reason}") from exc
    if len(body) > _MAX_BYTES:
        raise JaegerError(f"Jaeger at {base} answered {endpoint} with more than {_MAX_BYTES >> 20} MiB")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise JaegerError(
            f"{base} answered {endpoint} with something that is not JSON; give Jaeger's query URL"
        ) from exc


def find_trace_id(base_url: str, run_id: str, *, service: str, timeout: float = _TIMEOUT_S) -> str:
    """The trace id of run *run_id* (the most recent, if the run id has several traces).

    Raises :class:`~stroma.runstore.RunLookupError` when Jaeger has no such run for *service*,
    :class:`JaegerError` when Jaeger cannot be reached.
    """
    query = urllib.parse.urlencode({"service": service, "tags": json.dumps({n.RUN_ID: run_id}), "limit": "20"})
    base = base_url.rstrip("/")
    try:
        answer = _get_json(base, f"/api/traces?{query}", timeout)
    except LookupError:
        # Jaeger answers a search that finds nothing with 200 and no data: a 404 is another server.
        raise JaegerError(
            f"{base} has no Jaeger query API (/api/traces answered 404); give Jaeger's query URL, "
            "e.g. http://localhost:16686"
        ) from None
    if not isinstance(answer, dict):
        raise JaegerError(f"{base} answered a trace search with something that is not Jaeger's JSON")
    best: tuple[int, str] | None = None
    for trace in answer.get("data") or ():
        trace_id = trace.get("traceID")
        if not trace_id:
            continue
        started = min((int(span.get("startTime") or 0) for span in trace.get("spans") or ()), default=0)
        if best is None or started > best[0]:
            best = (started, str(trace_id))
    if best is None:
        raise RunLookupError(
            f"no run {run_id!r} in Jaeger at {base_url} for service {service!r} "
            "(give the full run id; check --service and that the run was exported)"
        )
    return best[1]


def _otlp_value(value: Mapping[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_otlp_value(item) for item in (value["arrayValue"].get("values") or ())]
    return None


def _attributes(items: Any) -> dict[str, Any]:
    return {item["key"]: _otlp_value(item.get("value") or {}) for item in items or () if "key" in item}


def _kind(name: str, attributes: Mapping[str, Any]) -> str:
    if n.STEP_ATTEMPT_NUMBER in attributes:
        return n.SPAN_ATTEMPT
    if n.STEP_ID in attributes and name.startswith(n.SPAN_STEP + " "):
        return n.SPAN_STEP
    if n.RUN_ID in attributes and name.startswith(n.SPAN_RUN + " "):
        return n.SPAN_RUN
    return "span"


def otlp_json_to_records(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Records from an OTLP JSON trace (``{"result": {"resourceSpans": [...]}}`` or the bare form)."""
    root = document.get("result", document)
    records: list[dict[str, Any]] = []
    for resource_spans in root.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                attributes = _attributes(span.get("attributes"))
                name = str(span.get("name", ""))
                status = span.get("status") or {}
                error_type = attributes.pop(n.ERROR_TYPE, None)
                if error_type is None and status.get("code") in (2, "STATUS_CODE_ERROR"):
                    error_type = status.get("message") or "error"
                records.append(
                    {
                        "kind": _kind(name, attributes),
                        "name": name,
                        "attributes": attributes,
                        "events": [
                            {"name": event.get("name", ""), "attributes": _attributes(event.get("attributes"))}
                            for event in span.get("events") or ()
                        ],
                        "error_type": error_type,
                        "start_ns": int(span.get("startTimeUnixNano") or 0),
                        "end_ns": int(span.get("endTimeUnixNano") or 0),
                        "trace_id": span.get("traceId"),
                        "span_id": span.get("spanId"),
                        "id": span.get("spanId"),
                        "parent": span.get("parentSpanId") or None,
                    }
                )
    return records


def fetch_run_records(
    base_url: str,
    run_id: str,
    *,
    service: str,
    trace_id: str | None = None,
    timeout: float = _TIMEOUT_S,
) -> list[dict[str, Any]]:
    """The records of run *run_id* from Jaeger at *base_url*.

    With *trace_id* the search is skipped. Raises :class:`~stroma.runstore.RunLookupError`
    when the run or trace is not there and :class:`JaegerError` when Jaeger cannot be reached
    or answers something that is not a trace.
    """
    base = base_url.rstrip("/")
    if trace_id is None:
        trace_id = find_trace_id(base, run_id, service=service, timeout=timeout)
    path = f"/api/v3/traces/{urllib.parse.quote(trace_id, safe='')}"
    try:
        document = _get_json(base, path, timeout)
    except LookupError:
        raise RunLookupError(f"trace {trace_id} of run {run_id!r} is not in Jaeger at {base_url}") from None
    if not isinstance(document, dict):
        raise JaegerError(f"Jaeger at {base} answered {path} with something that is not an OTLP trace")
    records = otlp_json_to_records(document)
    if not records:
        raise RunLookupError(f"trace {trace_id} of run {run_id!r} is empty in Jaeger at {base_url}")
    run_records = [r for r in records if r["kind"] == n.SPAN_RUN and r["attributes"].get(n.RUN_ID) == run_id]
    others = [r for r in records if r["kind"] == n.SPAN_RUN and r["attributes"].get(n.RUN_ID) != run_id]
    if others and run_records:
        # A trace holding several runs (runs nested under one application span): keep this one.
        keep_ids = {r["id"] for r in run_records}
        by_id = {r["id"]: r for r in records}

        def belongs(record: dict[str, Any]) -> bool:
            seen = set()
            current: dict[str, Any] | None = record
            while current is not None and current["id"] not in seen:
                if current["id"] in keep_ids:
                    return True
                seen.add(current["id"])
                parent = current.get("parent")
                current = by_id.get(parent) if parent is not None else None
            return False

        records = [r for r in records if belongs(r)]
    return records
