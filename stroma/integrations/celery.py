"""A Stroma pipeline as a Celery task: :class:`CeleryPipeline` (``pip install 'stroma[celery]'``).

::

    app = Celery("docs", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.update(celery_settings(visibility_timeout=7200))
    runner = StromaRunner.quick(run_timeout_ms=3_600_000)   # nodes declared with @runner.node
    summarize = CeleryPipeline(app, "docs.summarize", [fetch, summarize, publish], runner, redis_url=REDIS_URL)

    run_id = summarize.submit(Query(text="..."))            # the run id; the message is queued
    result = summarize.result(run_id, timeout=600)          # a CeleryRunResult

A worker started with ``celery -A <module> worker`` runs each delivery through
:class:`~stroma.runner.StromaRunner` with:

- **a checkpoint store shared by the fleet, keyed by run id**: the run's checkpoints are in Redis
  (:class:`~stroma.fleet.FencedRedisStore`), so a delivery of a run that an earlier delivery
  started resumes it: the steps that completed are restored, not run again;
- **a lease** (:class:`~stroma.fleet.RunLease`): one delivery of a run executes at a time. A
  delivery that finds the lease held is retried by Celery once the holder's lease would have
  lapsed (``task.retry``); by then the run either finished (its stored result is returned, nothing
  runs) or its holder died (the run resumes). Checkpoint writes are fenced by the lease's token:
  a worker that stalled past its lease cannot overwrite the newer delivery's checkpoints (its
  delivery is dropped with Celery's ``Ignore``; the newer one reports the result);
- **a delivery count** in Redis (``<key_prefix>deliveries:<run_id>``): a delivery that takes the
  lease counts one. A run delivered more than ``max_deliveries`` times (a poison run that kills
  its worker process every time) is not run again: it ends ``FAILED`` with an error naming the
  run and the count, returned as the task's result and recorded like any failed run (a run span
  with ``error.type=stroma.PoisonRun``, ``stroma.runs{status="failed"}``). A run that finished
  and is delivered again (its worker died before acknowledging) returns its stored result;
- **one trace per run**: :meth:`CeleryPipeline.submit` opens a ``submit <workflow>`` span
  (kind ``PRODUCER``, a new trace, linked to the span that was current, if any) and puts its
  W3C trace context in the task's arguments; each delivery's run span is its child, so every
  delivery of a run is in that one trace, and a redelivered run's run span also links to the
  earlier deliveries' run spans (the run manifest keeps them). Stroma propagates the context
  itself rather than through ``opentelemetry-instrumentation-celery``: the run needs exactly one
  parent whatever the user instruments, and no extra package is needed; with that
  instrumentation installed too, its spans are simply siblings.

What makes redelivery safe (the task is declared with these; :func:`celery_settings` gives the
app-wide ones):

- ``acks_late=True``: the message is acknowledged after the run returns, so a worker that dies
  mid-run leaves it unacknowledged and the broker delivers it again;
- ``reject_on_worker_lost=True``: when a pool child is killed (OOM killer, SIGKILL, a segfault in
  a native library), the worker re-queues the message at once instead of recording a failure;
- the broker's ``visibility_timeout`` (Redis transport) above the longest run: a message not
  acknowledged within it is delivered again, even while its first delivery still runs. The
  runner's ``RunConfig.run_timeout_ms`` bounds a run; a pipeline without one is refused, and one
  whose run timeout is not below the visibility timeout is refused at :meth:`~CeleryPipeline.submit`
  and at each delivery with a :class:`~stroma.errors.ConfigurationError` naming the task and both
  values. The lease still keeps such an early redelivery from running concurrently.

The at-least-once window: a step runs again only if its delivery died after the step's side
effect and before its checkpoint was written; give such side effects an idempotency key, e.g.
``(run_id, step_id)``. Every other completed step runs exactly once per run id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as trace_api
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from stroma._pipeline.plan import PlanCache
from stroma.checkpoint import CheckpointManager
from stroma.checkpoint.redis import DEFAULT_KEY_PREFIX as CHECKPOINT_KEY_PREFIX
from stroma.checkpoint.redis import DEFAULT_TTL_SECONDS
from stroma.config import check_run_id, new_run_id
from stroma.context import ReliabilityContext
from stroma.errors import CheckpointError, ConfigurationError, StromaError
from stroma.fleet._redis import LazyRedis
from stroma.fleet.lease import DEFAULT_LEASE_PREFIX, RunLease, RunLeaseError, RunLeaseHeld, StaleFenceError
from stroma.runner import StromaRunner
from stroma.telemetry import names as n
from stroma.telemetry import shutdown as shutdown_telemetry
from stroma.telemetry.runtime import get_telemetry
from stroma.trace import ExecutionResult, RunStatus

__all__ = ["DEFAULT_VISIBILITY_TIMEOUT", "CeleryPipeline", "CeleryRunResult", "celery_settings"]

logger = logging.getLogger("stroma")

DEFAULT_VISIBILITY_TIMEOUT: Final = 3600.0
"""Kombu's Redis transport default, in seconds, when ``broker_transport_options`` sets none."""
DEFAULT_MAX_DELIVERIES: Final = 3
REDIS_RETRIES: Final = 12
"""Retries of a delivery whose Redis failed (about five minutes of backoff in all)."""
_RESULT_FORMAT: Final = "stroma.celery/1"
_VISIBILITY_SCHEMES: Final = ("redis", "rediss", "sentinel", "sqs")


def celery_settings(*, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT) -> dict[str, Any]:
    """App-wide Celery settings for Stroma pipelines: ``app.conf.update(celery_settings(...))``.

    Late acknowledgement and re-queueing on a lost worker process (also set on each
    :class:`CeleryPipeline` task), one message reserved per worker process (a worker that dies
    holds no queue of unstarted runs hostage until the visibility timeout), results as JSON,
    and the Redis transport's ``visibility_timeout`` (seconds; keep it above the longest run).
    Existing ``broker_transport_options`` passed to ``app.conf.update`` afterwards replace these.
    """
    if isinstance(visibility_timeout, bool) or not isinstance(visibility_timeout, (int, float)):
        raise ConfigurationError(f"visibility_timeout must be a number of seconds, got {visibility_timeout!r}")
    if not visibility_timeout > 0 or not math.isfinite(visibility_timeout):
        raise ConfigurationError(f"visibility_timeout must be a number of seconds > 0, got {visibility_timeout!r}")
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_transport_options": {"visibility_timeout": float(visibility_timeout)},
    }


@dataclass(frozen=True)
class CeleryRunResult:
    """What a delivery of a :class:`CeleryPipeline` run returned (the Celery task's result).

    ``final_state`` is the JSON form of the last validated state (``None`` when there is none);
    ``deliveries`` counts the deliveries of the run that took its lease, this one included.
    """

    run_id: str
    status: RunStatus
    final_state: Any
    error: str | None = None
    failed_step: str | None = None
    total_cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_by_step: dict[str, float] = field(default_factory=dict)
    trace_id: str | None = None
    deliveries: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored as the task's result."""
        return {
            "format": _RESULT_FORMAT,
            "run_id": self.run_id,
            "status": self.status.value,
            "final_state": self.final_state,
            "error": self.error,
            "failed_step": self.failed_step,
            "total_cost_usd": self.total_cost_usd,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_by_step": [[k, v] for k, v in self.cost_by_step.items()],
            "trace_id": self.trace_id,
            "deliveries": self.deliveries,
        }

    @classmethod
    def from_json(cls, value: Any) -> CeleryRunResult:
        """Rebuild from :meth:`to_json`; raises ``ValueError`` naming what is wrong."""
        if not isinstance(value, Mapping) or value.get("format") != _RESULT_FORMAT:
            raise ValueError(f"not a Stroma Celery run result: {value!r:.200}")
        try:
            return cls(
                run_id=str(value["run_id"]),
                status=RunStatus(value["status"]),
                final_state=value.get("final_state"),
                error=value.get("error"),
                failed_step=value.get("failed_step"),
                total_cost_usd=float(value.get("total_cost_usd", 0.0)),
                input_tokens=int(value.get("input_tokens", 0)),
                output_tokens=int(value.get("output_tokens", 0)),
                cost_by_step={str(k): float(v) for k, v in value.get("cost_by_step", [])},
                trace_id=value.get("trace_id"),
                deliveries=int(value.get("deliveries", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a Stroma Celery run result is malformed ({exc}): {value!r:.200}") from exc

    @classmethod
    def of(cls, result: ExecutionResult, deliveries: int) -> CeleryRunResult:
        """From a run's :class:`~stroma.trace.ExecutionResult`."""
        state = result.final_state
        return cls(
            run_id=result.run_id,
            status=result.status,
            final_state=None if state is None else to_jsonable_python(state, fallback=repr),
            error=result.error,
            failed_step=result.failed_step,
            total_cost_usd=float(result.total_cost_usd),
            input_tokens=int(result.input_tokens),
            output_tokens=int(result.output_tokens),
            cost_by_step={k: float(v) for k, v in result.cost_by_step.items()},
            trace_id=result.trace_id,
            deliveries=deliveries,
        )


# KEYS: the delivery counter. ARGV: ttl s. Returns the count including this delivery.
_COUNT_DELIVERY = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return count
"""


class CeleryPipeline:
    """A pipeline (*nodes* run by *runner*) declared as the Celery task *name* of *app*.

    Args:
        app: the Celery app (a Redis broker is what the checks and the docs assume; other
            brokers work, without the visibility-timeout check).
        name: the task name (as in ``@app.task(name=...)``); also names the run in errors.
        nodes: the pipeline's nodes, as given to :meth:`StromaRunner.run`. The first node's
            input contract is the type of the initial state.
        runner: the runner whose registry and configuration every delivery uses; its own
            checkpoint manager is not used (each delivery gets a fenced Redis store). Its
            ``RunConfig.run_timeout_ms`` must be set (it bounds a run; see the module docs).
        redis_url: the Redis for checkpoints, leases and delivery counts (may be the broker's).
        max_deliveries: deliveries of one run that may execute before it is stopped as a
            poison run (>= 1, default 3).
        lease_seconds / renew_every: the :class:`~stroma.fleet.RunLease` settings (30 s renewed
            every 10 s by default); a killed worker's run can be resumed after ``lease_seconds``.
        checkpoint_ttl_seconds: lifetime of a run's checkpoints after their last write (default
            one hour); keep it above the longest time a run may wait in the queue to be resumed.
        key_prefix / checkpoint_key_prefix: Redis key prefixes of the lease, fence and delivery
            keys (``"stroma:"``) and of the checkpoints (as ``SyncRedisStore``).
        task_options: more options for ``app.task`` (e.g. ``queue``); ``bind``, ``acks_late``,
            ``reject_on_worker_lost`` and ``max_retries`` are set here and cannot be changed.

    Raises :class:`~stroma.errors.ConfigurationError` for invalid settings or a runner without
    a run timeout.
    """

    def __init__(
        self,
        app: Any,
        name: str,
        nodes: Sequence[Any],
        runner: StromaRunner,
        *,
        redis_url: str,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        lease_seconds: float = 30.0,
        renew_every: float | None = None,
        checkpoint_ttl_seconds: int = DEFAULT_TTL_SECONDS,
        key_prefix: str = DEFAULT_LEASE_PREFIX,
        checkpoint_key_prefix: str = CHECKPOINT_KEY_PREFIX,
        redis_timeout_seconds: float = 5.0,
        **task_options: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"CeleryPipeline needs a task name, got {name!r}")
        if not isinstance(runner, StromaRunner):
            raise ConfigurationError(f"CeleryPipeline {name!r}: runner must be a StromaRunner, got {runner!r:.80}")
        if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int) or max_deliveries < 1:
            raise ConfigurationError(
                f"CeleryPipeline {name!r}: max_deliveries must be a whole number >= 1, got {max_deliveries!r}"
            )
        fixed = {"bind", "acks_late", "reject_on_worker_lost", "max_retries", "name"} & set(task_options)
        if fixed:
            raise ConfigurationError(
                f"CeleryPipeline {name!r}: {', '.join(sorted(fixed))} are set by Stroma and cannot be passed"
            )
        if runner.config.run_timeout_ms is None:
            raise ConfigurationError(
                f"CeleryPipeline {name!r}: the runner has no RunConfig.run_timeout_ms; a run on a Celery worker "
                "needs a bound below the broker's visibility timeout (see stroma.integrations.celery)"
            )
        plan = PlanCache().plan(list(nodes), runner.registry)
        if not plan.stages:
            raise ConfigurationError(f"CeleryPipeline {name!r} has no nodes")
        # validates lease_seconds / renew_every / key_prefix the way every delivery will
        RunLease("check", client=object(), lease_seconds=lease_seconds, renew_every=renew_every, key_prefix=key_prefix)
        self.app = app
        self.name = name
        self.nodes = list(nodes)
        self.runner = runner
        self.redis_url = redis_url
        self.max_deliveries = max_deliveries
        self.lease_seconds = float(lease_seconds)
        self.renew_every = renew_every
        self.checkpoint_ttl_seconds = checkpoint_ttl_seconds
        self.key_prefix = key_prefix
        self.checkpoint_key_prefix = checkpoint_key_prefix
        self.input_schema: type[BaseModel] = plan.stages[0].steps[0].contract.input_schema
        self._redis = LazyRedis(redis_url, None, timeout_seconds=float(redis_timeout_seconds))
        pipeline = self

        def run_pipeline(task: Any, run_id: str, state: Any, trace: Mapping[str, str] | None = None) -> dict[str, Any]:
            return pipeline._deliver(task, run_id, state, trace or {})

        run_pipeline.__name__ = run_pipeline.__qualname__ = name.replace(".", "_")
        run_pipeline.__doc__ = f"Stroma pipeline {name!r} (one run per message; see stroma.integrations.celery)."
        self.task: Any = app.task(
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            max_retries=None,
            **task_options,
        )(run_pipeline)
        _connect_worker_signals()

    def __repr__(self) -> str:
        return f"CeleryPipeline({self.name!r}, steps={len(self.nodes)}, max_deliveries={self.max_deliveries})"

    # --- checks -----------------------------------------------------------------------------------

    @property
    def run_timeout_seconds(self) -> float:
        """The runner's run timeout, in seconds."""
        timeout = self.runner.config.run_timeout_ms
        return math.inf if timeout is None else timeout / 1000

    def visibility_timeout(self) -> float | None:
        """The broker's visibility timeout in seconds (``None`` for a broker without one)."""
        conf = self.app.conf
        url = str(conf.broker_url or "")
        if url.partition("://")[0] not in _VISIBILITY_SCHEMES:
            return None
        options = conf.broker_transport_options or {}
        return float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))

    def check(self) -> None:
        """Refuse a configuration where a run may outlive the broker's visibility timeout.

        Raises :class:`~stroma.errors.ConfigurationError` naming the task, the run timeout and
        the visibility timeout when the run timeout (or the lease) is not below it.
        """
        visibility = self.visibility_timeout()
        if visibility is None:
            return
        run_timeout = self.run_timeout_seconds
        if run_timeout >= visibility:
            raise ConfigurationError(
                f"Celery task {self.name!r}: its run timeout of {run_timeout:g} s is not below the broker's "
                f"visibility timeout of {visibility:g} s, so the broker would deliver a run again while it still "
                "runs; raise broker_transport_options['visibility_timeout'] above the longest run "
                "(celery_settings(visibility_timeout=...)) or lower RunConfig.run_timeout_ms"
            )
        if self.lease_seconds >= visibility:
            raise ConfigurationError(
                f"Celery task {self.name!r}: lease_seconds ({self.lease_seconds:g} s) must be below the broker's "
                f"visibility timeout of {visibility:g} s (a delivery waiting for a lease is retried after it)"
            )

    # --- submitting -------------------------------------------------------------------------------

    def submit(self, initial_state: Any, *, run_id: str | None = None, **apply_options: Any) -> str:
        """Queue one run of the pipeline on *initial_state*; return its run id at once.

        *initial_state* is validated against the first node's input schema (a model instance
        or a mapping). *run_id* names the run (default: a new one); it is also the Celery task
        id, so ``AsyncResult(run_id)`` and :meth:`result` find the result. *apply_options* go to
        ``apply_async`` (e.g. ``queue``, ``countdown``). Raises
        :class:`~stroma.errors.ConfigurationError` (see :meth:`check`) or
        ``pydantic.ValidationError`` for a state that does not fit.
        """
        self.check()
        chosen = new_run_id() if run_id is None else check_run_id(run_id, setting="CeleryPipeline.submit(run_id=...)")
        state = self.input_schema.model_validate(initial_state).model_dump(mode="json")
        for reserved in ("task_id", "args", "kwargs"):
            if reserved in apply_options:
                raise ConfigurationError(f"CeleryPipeline.submit sets {reserved!r} itself")
        carrier: dict[str, str] = {}
        span = self._submit_span(chosen)
        try:
            context = trace_api.set_span_in_context(span) if span is not None else otel_context.get_current()
            propagate.inject(carrier, context=context)
            self.task.apply_async(
                kwargs={"run_id": chosen, "state": state, "trace": carrier}, task_id=chosen, **apply_options
            )
        except BaseException as exc:
            if span is not None:
                _fail_span(span, exc)
            raise
        finally:
            if span is not None:
                _safely(span.end)
        return chosen

    def _submit_span(self, run_id: str) -> Any:
        try:
            telemetry = get_telemetry(self.runner.config.telemetry)
            if not telemetry.enabled:
                return None
            current = trace_api.get_current_span().get_span_context()
            links = [trace_api.Link(current)] if current.is_valid else None
            return telemetry.tracer.start_span(
                f"submit {self.runner.config.workflow_name}",
                context=otel_context.Context(),  # a new trace: one trace per run
                kind=trace_api.SpanKind.PRODUCER,
                links=links,
                attributes={
                    n.RUN_ID: run_id,
                    n.GEN_AI_WORKFLOW_NAME: self.runner.config.workflow_name,
                    "messaging.system": "celery",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": self.name,
                    "messaging.message.id": run_id,
                },
            )
        except Exception as exc:  # telemetry never breaks the pipeline
            logger.warning("stroma: could not start the submit span of run %s (%s)", run_id, type(exc).__name__)
            return None

    def result(self, run_id: str, *, timeout: float | None = None) -> CeleryRunResult:
        """Wait for run *run_id*'s result (Celery's result backend; *timeout* in seconds).

        Raises Celery's ``TimeoutError`` when it does not arrive in time, the task's exception
        when the task itself failed (e.g. Redis stayed unreachable), and
        :class:`~stroma.errors.ConfigurationError` when the app has no result backend.
        """
        backend = getattr(self.app, "backend", None)
        if backend is None or type(backend).__name__ == "DisabledBackend":
            raise ConfigurationError(
                f"Celery task {self.name!r}: the app has no result backend; set Celery(backend=...) to get results"
            )
        value = self.task.AsyncResult(run_id).get(timeout=timeout, propagate=True)
        return CeleryRunResult.from_json(value)

    def deliveries(self, run_id: str) -> int:
        """How many deliveries of *run_id* took its lease so far (0 if none, or expired)."""
        raw = self._redis.client.get(self._deliveries_key(run_id))
        return 0 if raw is None else int(raw)

    # --- the worker side --------------------------------------------------------------------------

    def _deliveries_key(self, run_id: str) -> str:
        return f"{self.key_prefix}deliveries:{run_id}"

    def _failed(self, run_id: str, error: str, deliveries: int) -> dict[str, Any]:
        return CeleryRunResult(run_id, RunStatus.FAILED, None, error=error, deliveries=deliveries).to_json()

    def _poisoned(self, run_id: str, message: str, deliveries: int, carrier: Mapping[str, str]) -> dict[str, Any]:
        """The FAILED result of a poison run, recorded like any failed run: a run span (in the
        run's trace, with the error) and ``stroma.runs{status="failed"}``; no step runs."""
        config = self.runner.config.model_copy(update={"run_id": run_id, "context": dict(self.runner.config.context)})
        ctx = ReliabilityContext.for_run(config, self.runner.registry, None)
        token = otel_context.attach(propagate.extract(carrier))
        try:
            with ctx.as_run() as record:
                record.fail("stroma.PoisonRun", "delivered more than max_deliveries times")
                result = ctx.build_result(RunStatus.FAILED, None, error=message)
        finally:
            otel_context.detach(token)
        return CeleryRunResult.of(result, deliveries).to_json()

    def _deliver(self, task: Any, run_id: str, state: Any, carrier: Mapping[str, str]) -> dict[str, Any]:
        try:
            self.check()
        except ConfigurationError as exc:
            return self._failed(run_id, str(exc), 0)
        lease = RunLease(
            run_id,
            client=self._redis.client,
            lease_seconds=self.lease_seconds,
            renew_every=self.renew_every,
            key_prefix=self.key_prefix,
        )
        try:
            lease.acquire()
        except RunLeaseHeld as held:
            # Running elsewhere, or its holder died: look again once that lease would have lapsed.
            wait = (held.remaining_ms if held.remaining_ms > 0 else self.lease_seconds * 1000) / 1000 + 0.05
            logger.info("stroma: run %s is held by another delivery; retrying in %.2f s", run_id, wait)
            raise task.retry(countdown=wait) from None
        except RunLeaseError as exc:
            raise _retry(task, exc) from None
        try:
            deliveries = int(
                lease.script("count_delivery", _COUNT_DELIVERY)(
                    keys=[self._deliveries_key(run_id)], args=[max(self.checkpoint_ttl_seconds, 60)]
                )
            )
            store = lease.fenced_store(ttl_seconds=self.checkpoint_ttl_seconds, key_prefix=self.checkpoint_key_prefix)
            if deliveries > self.max_deliveries and not _finished(store, run_id):
                message = (
                    f"run {run_id!r} (Celery task {self.name!r}) was delivered {deliveries} times, more than "
                    f"max_deliveries={self.max_deliveries}: its earlier deliveries ended without a result (their "
                    "worker process was lost), so it is stopped as a poison run instead of being run again"
                )
                logger.error("stroma: %s", message)
                return self._poisoned(run_id, message, deliveries, carrier)
            # (a run that finished and is delivered again, e.g. its worker died before the
            # acknowledgement, returns its stored result below whatever the count)
            lease.start_renewing()
            runner = StromaRunner(self.runner.registry, CheckpointManager(store), self.runner.config)
            initial = self.input_schema.model_validate(state)
            token = otel_context.attach(propagate.extract(carrier))
            try:
                result = asyncio.run(runner.run(self.nodes, initial, run_id=run_id))
            finally:
                otel_context.detach(token)
            return CeleryRunResult.of(result, deliveries).to_json()
        except StaleFenceError as exc:
            # A newer delivery took the run over; it reports the result. Drop this one.
            from celery.exceptions import Ignore

            logger.warning("stroma: %s", exc)
            raise Ignore() from None
        except (RunLeaseError, CheckpointError) as exc:
            # Redis failed under the run (fail closed): try again later; the run resumes.
            raise _retry(task, exc) from None
        except (StromaError, ValidationError) as exc:
            # the pipeline changed under a queued run, or its input does not fit: permanent
            return self._failed(run_id, f"{type(exc).__name__}: {exc}", self._deliveries_or_zero(run_id))
        finally:
            lease.release()

    def _deliveries_or_zero(self, run_id: str) -> int:
        try:
            return self.deliveries(run_id)
        except Exception:
            return 0


def _finished(store: Any, run_id: str) -> bool:
    """Whether the run's manifest says it finished (its stored result can be returned)."""
    manifest = store.load_manifest(run_id)
    return manifest is not None and manifest.get("status") in ("completed", "resumed")


def _retry(task: Any, exc: Exception) -> Any:
    """Celery's retry after a Redis failure: backoff 1, 2, 4 ... 30 s; after ``REDIS_RETRIES``
    retries the task fails with *exc* (the run's checkpoints stay for a later submission)."""
    retries = int(getattr(task.request, "retries", 0) or 0)
    if retries >= REDIS_RETRIES:
        return exc
    return task.retry(countdown=float(min(2**retries, 30)), exc=exc)


def _fail_span(span: Any, exc: BaseException) -> None:
    try:
        span.record_exception(exc)
        span.set_status(trace_api.Status(trace_api.StatusCode.ERROR, type(exc).__name__))
    except Exception as error:  # telemetry never breaks the pipeline
        logger.debug("stroma: span call failed (%s)", type(error).__name__)


def _safely(call: Any) -> None:
    try:
        call()
    except Exception as exc:  # telemetry never breaks the pipeline
        logger.debug("stroma: span call failed (%s)", type(exc).__name__)


_signals_lock = threading.Lock()
_signals_connected = False


def _flush_telemetry(**_: Any) -> None:
    shutdown_telemetry(timeout_s=5.0)


def _connect_worker_signals() -> None:
    """Export what a pool process recorded before it exits (prefork children skip atexit)."""
    global _signals_connected
    with _signals_lock:
        if _signals_connected:
            return
        from celery.signals import worker_process_shutdown, worker_shutdown

        worker_process_shutdown.connect(_flush_telemetry, weak=False)
        worker_shutdown.connect(_flush_telemetry, weak=False)
        _signals_connected = True
