"""``CheckpointManager``: the one async front through which the runner and middleware use a store.

It accepts any store, sync or async, shipped with Stroma or not:

- async methods are awaited on the calling task;
- sync methods run in a worker thread so file or network I/O never blocks the event loop, unless
  the store declares ``blocking = False`` (the in-memory store), in which case they are called
  directly on the loop. Sync stores must therefore be thread-safe.

Every call is bounded by ``timeout_seconds``. A sync call that overruns it is abandoned, not
waited for: the caller gets the timeout's ``CheckpointError`` at once, and the event loop can close
(``asyncio.run`` / ``run_sync`` return) while the call is still running. Each sync call therefore
runs on its own daemon thread rather than the loop's default executor, whose shutdown would wait for
it; a store call that never returns keeps its thread (idle, blocked in the store) for the life of
the process, and does not keep the process from exiting. Store failures surface as
:class:`~stroma.errors.CheckpointError` naming the store kind, the run and the step (scenario 15:
fail closed); ``asyncio.CancelledError`` and other ``BaseException`` pass through untouched and are
never retried (design §3 item 8). Malformed arguments (an empty run id, a state that is not a
model) raise ``TypeError`` / ``ValueError`` before the store is called.

Atomicity under cancellation is the store's: every store shipped with Stroma keeps the old or the
new checkpoint when the writing task is cancelled, never a mix. A cancelled write may still have
landed (a Redis ``EXEC`` already sent; a sync store's write already running in its worker thread,
which completes there in the background, as it does after a timeout), so after a cancellation the
step's checkpoint is "old or new": resuming re-validates whichever it is.

Run manifest (used by the runner for resume and change detection, reliability scenarios 14 and 16):
a JSON object stored once per run with :meth:`CheckpointManager.save_manifest`. Stroma's stores keep
it beside the run's checkpoints (``delete`` / :meth:`CheckpointManager.clear` removes both). The
manager does not interpret it, except for this conventional shape, which :func:`manifest_entry`
builds and the fallback below reads::

    {"steps": [{"step_id": "fetch", "schema_name": "app.Doc", "schema_fingerprint": "sha256:…"}, …],
     "status": "completed",          # free-form; e.g. the RunStatus value
     "result": {…}}                  # e.g. the final state once the run finished

For a third-party store without the optional methods, the manager keeps the manifest as an ordinary
checkpoint under the reserved step id ``"\\x00stroma:manifest"`` (user step ids may not start with
``"\\x00stroma:"``), and ``completed_steps`` lists the manifest's ``steps`` that have a checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from stroma._ids import RESERVED_PREFIX
from stroma.checkpoint import _codec
from stroma.checkpoint._protocols import AsyncCheckpointStore, CheckpointStore, require_model_class
from stroma.errors import CheckpointError, ConfigurationError, describe_validation_error

DEFAULT_TIMEOUT_SECONDS: Final = 30.0
MANIFEST_STEP_ID: Final = RESERVED_PREFIX + "manifest"
_REQUIRED: Final = ("save", "load", "delete")
_OPTIONAL: Final = ("save_typed", "load_typed", "save_manifest", "load_manifest", "completed_steps")

M = TypeVar("M", bound=BaseModel)


class _ManifestRecord(BaseModel):
    """How a manifest is kept in a store that has no manifest methods of its own."""

    manifest: dict[str, Any]


def manifest_entry(step_id: str, schema: type[BaseModel]) -> dict[str, str]:
    """One element of a manifest's ``"steps"`` list: the step id and its output schema's identity."""
    _codec.check_step_id(step_id)
    require_model_class(schema)
    return {
        "step_id": step_id,
        "schema_name": _codec.schema_name(schema),
        "schema_fingerprint": _codec.schema_fingerprint(schema),
    }


def _manifest_step_ids(manifest: Mapping[str, Any] | None) -> list[str]:
    steps = (manifest or {}).get("steps")
    if not isinstance(steps, list):
        return []
    ids: list[str] = []
    for entry in steps:
        step_id = entry.get("step_id") if isinstance(entry, Mapping) else entry
        if isinstance(step_id, str) and step_id and step_id not in ids:
            ids.append(step_id)
    return ids


async def _on_daemon_thread(method: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Run a blocking store call on a new daemon thread and await its outcome.

    Unlike ``asyncio.to_thread`` (the loop's default executor, which ``asyncio.run`` joins on exit),
    a call the caller has given up on (timeout, cancellation) does not hold up the loop's shutdown
    or the interpreter's exit. The call sees the caller's context variables, as with ``to_thread``.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(error: BaseException | None, value: Any) -> None:
        if outcome.done():  # the caller timed out or was cancelled: drop the late answer
            return
        if error is None:
            outcome.set_result(value)
        else:
            outcome.set_exception(error)

    def work() -> None:
        error: BaseException | None = None
        value: Any = None
        try:
            value = context.run(method, *args)
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this call any more
            loop.call_soon_threadsafe(settle, error, value)

    threading.Thread(target=work, name="stroma-checkpoint-call", daemon=True).start()
    return await outcome


class CheckpointManager:
    """Save, resume and clear step checkpoints, and keep each run's manifest, over any store.

    ``CheckpointManager(store)`` keeps the established signature. *timeout_seconds* bounds each
    store call (``None``: unbounded); it must be > 0. Raises ``TypeError`` when *store* lacks
    ``save``, ``load`` or ``delete`` and :class:`~stroma.errors.ConfigurationError` for a bad
    timeout. Safe to share between tasks of one event loop.
    """

    def __init__(
        self,
        store: CheckpointStore | AsyncCheckpointStore,
        *,
        timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        missing = [name for name in _REQUIRED if not callable(getattr(store, name, None))]
        if missing:
            raise TypeError(f"{type(store).__name__} is not a checkpoint store: it has no {', '.join(missing)} method")
        if timeout_seconds is not None and (
            isinstance(timeout_seconds, bool)
            or not isinstance(timeout_seconds, (int, float))
            or not timeout_seconds > 0
        ):
            raise ConfigurationError(
                f"timeout_seconds must be a number of seconds > 0 or None, got {timeout_seconds!r}"
            )
        self._store = store
        self._timeout = None if timeout_seconds is None else float(timeout_seconds)
        self._has = {name: callable(getattr(store, name, None)) for name in _OPTIONAL}
        self._blocking = bool(getattr(store, "blocking", True))
        self._async_funcs: dict[Callable[..., Any], bool] = {}
        kind = getattr(store, "store_kind", None)
        self._kind = kind if isinstance(kind, str) and kind else type(store).__name__

    @property
    def store(self) -> CheckpointStore | AsyncCheckpointStore:
        """The wrapped store."""
        return self._store

    @property
    def store_kind(self) -> str:
        """Short store name for telemetry: ``"memory"``, ``"sqlite"``, ``"redis"``, else the class name."""
        return self._kind

    def __repr__(self) -> str:
        return f"CheckpointManager({self._store!r})"

    # --- plumbing --------------------------------------------------------------------------------

    async def _invoke(self, method: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._is_async(method):
            return await method(*args)
        if self._blocking:
            result = await _on_daemon_thread(method, args)
        else:
            result = method(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _bounded(self, work: Awaitable[Any], action: str, run_id: str, step_id: str | None) -> Any:
        if self._timeout is None:
            return await work

        def timed_out() -> CheckpointError:
            return CheckpointError(
                f"the {self._kind} checkpoint store did not {_codec.operation(action, run_id, step_id)} within "
                f"{self._timeout:g} s (timeout_seconds); the store may be stalled or unreachable",
                run_id=run_id,
                node_id=step_id,
            )

        if sys.version_info >= (3, 11):
            scope = asyncio.timeout(self._timeout)
            try:
                async with scope:
                    return await work
            except TimeoutError as exc:
                if scope.expired():
                    raise timed_out() from exc
                raise
        try:
            return await asyncio.wait_for(work, self._timeout)
        except asyncio.TimeoutError as exc:
            raise timed_out() from exc

    def _is_async(self, method: Callable[..., Any]) -> bool:
        """``inspect.iscoroutinefunction(method)``, decided once per function of the store's class
        (a store's methods do not change kind; a method replaced on the instance is looked at anew)."""
        func = getattr(method, "__func__", None)
        if func is None:
            return inspect.iscoroutinefunction(method)
        known = self._async_funcs.get(func)
        if known is None:
            if len(self._async_funcs) >= 64:  # bounded: methods swapped in at run time are not kept forever
                self._async_funcs.clear()
            known = self._async_funcs[func] = inspect.iscoroutinefunction(method)
        return known

    async def _call(self, name: str, *args: Any, action: str, run_id: str, step_id: str | None) -> Any:
        method = getattr(self._store, name)
        try:
            if not self._blocking and not self._is_async(method):
                # An in-process store answers at once: no thread, and no timeout timer (a cancelled
                # timer holds its context, the current span included, until the loop runs again).
                result = method(*args)
                if result is None or not inspect.isawaitable(result):
                    return result
                return await self._bounded(result, action, run_id, step_id)
            return await self._bounded(self._invoke(method, args), action, run_id, step_id)
        except CheckpointError:
            raise
        except Exception as exc:  # a third-party store's failure: fail closed, keep the cause
            raise self._store_failed(exc, action, run_id, step_id) from exc

    def _store_failed(self, exc: Exception, action: str, run_id: str, step_id: str | None) -> CheckpointError:
        return CheckpointError(
            f"the {self._kind} checkpoint store failed to {_codec.operation(action, run_id, step_id)}: "
            f"{type(exc).__name__}: {exc}",
            run_id=run_id,
            node_id=step_id,
        )

    @staticmethod
    def _check_ids(run_id: str, node_id: str) -> None:
        _codec.check_run_id(run_id)
        _codec.check_step_id(node_id)
        if node_id.startswith(RESERVED_PREFIX):
            raise ValueError(f"step ids starting with {RESERVED_PREFIX!r} are reserved for Stroma")

    # --- step checkpoints ------------------------------------------------------------------------

    async def checkpoint(
        self, run_id: str, node_id: str, state: BaseModel, *, schema: type[BaseModel] | None = None
    ) -> None:
        """Store *state* as the checkpoint of step *node_id* in run *run_id*, replacing the previous one.

        With *schema*, *state* is stored as that model (revalidated if it is another class).
        Raises :class:`~stroma.errors.CheckpointError` when the store fails, times out, or the state
        cannot be stored safely (not JSON, does not validate as *schema*).
        """
        self._check_ids(run_id, node_id)
        if not isinstance(state, BaseModel):
            raise TypeError(f"state must be a pydantic BaseModel instance, got {type(state).__name__}")
        if schema is None:
            save = self._store.save
            if self._blocking or self._is_async(save):
                await self._call("save", run_id, node_id, state, action="save", run_id=run_id, step_id=node_id)
                return
            # An in-process store (the common case, once per step): called in place, as _call
            # would, without another coroutine frame.
            try:
                result = save(run_id, node_id, state)
            except CheckpointError:
                raise
            except Exception as exc:
                raise self._store_failed(exc, "save", run_id, node_id) from exc
            if result is not None and inspect.isawaitable(result):
                try:
                    await self._bounded(result, "save", run_id, node_id)
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise self._store_failed(exc, "save", run_id, node_id) from exc
            return
        require_model_class(schema)
        if self._has["save_typed"]:
            await self._call(
                "save_typed", run_id, node_id, state, schema, action="save", run_id=run_id, step_id=node_id
            )
            return
        state = _codec.coerce_to_schema(state, schema, run_id, node_id)
        await self._call("save", run_id, node_id, state, action="save", run_id=run_id, step_id=node_id)

    async def resume(self, run_id: str, node_id: str, schema: type[M]) -> M | None:
        """Return the step's checkpoint validated as *schema*, or ``None`` when there is none.

        The schema comes from the caller (the step's output contract), never from stored data.
        Raises :class:`~stroma.errors.CheckpointError` when the stored data is corrupt, tampered
        with, was written by a different schema, does not validate, or the store fails.
        """
        self._check_ids(run_id, node_id)
        require_model_class(schema)
        if self._has["load_typed"]:
            result = await self._call(
                "load_typed", run_id, node_id, schema, action="load", run_id=run_id, step_id=node_id
            )
        else:
            result = await self._call("load", run_id, node_id, action="load", run_id=run_id, step_id=node_id)
        return None if result is None else self._as_schema(result, schema, run_id, node_id)

    @staticmethod
    def _as_schema(result: object, schema: type[M], run_id: str, node_id: str) -> M:
        if isinstance(result, BaseModel):
            return _codec.coerce_to_schema(result, schema, run_id, node_id)
        if isinstance(result, Mapping):
            try:
                return schema.model_validate(result)
            except ValidationError as exc:
                raise CheckpointError(
                    f"{_codec.record(run_id, node_id)} does not validate as "
                    f"{_codec.schema_name(schema)}: {describe_validation_error(None, exc)}",
                    run_id=run_id,
                    node_id=node_id,
                ) from exc
        raise CheckpointError(
            f"the checkpoint store returned a {type(result).__name__} for {_codec.record(run_id, node_id)}, "
            "not a model",
            run_id=run_id,
            node_id=node_id,
        )

    async def clear(self, run_id: str) -> None:
        """Remove every checkpoint of *run_id* and its manifest; ``CheckpointError`` on store failure."""
        _codec.check_run_id(run_id)
        await self._call("delete", run_id, action="delete the checkpoints", run_id=run_id, step_id=None)

    # --- run metadata ----------------------------------------------------------------------------

    async def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest (a JSON object; see the module docs), replacing the previous one.

        Raises ``TypeError`` when *manifest* is not a mapping with ``str`` keys and
        :class:`~stroma.errors.CheckpointError` when it is not JSON or the store fails.
        """
        _codec.check_run_id(run_id)
        if not isinstance(manifest, Mapping) or not all(isinstance(key, str) for key in manifest):
            raise TypeError("a run manifest must be a mapping with str keys (a JSON object)")
        if self._has["save_manifest"]:
            await self._call("save_manifest", run_id, manifest, action="save", run_id=run_id, step_id=None)
            return
        record = _ManifestRecord(manifest=dict(manifest))
        await self._call("save", run_id, MANIFEST_STEP_ID, record, action="save", run_id=run_id, step_id=None)

    async def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``; ``CheckpointError`` when corrupt or on store failure."""
        _codec.check_run_id(run_id)
        if self._has["load_manifest"]:
            result = await self._call("load_manifest", run_id, action="load", run_id=run_id, step_id=None)
            return None if result is None else dict(result)
        if self._has["load_typed"]:
            result = await self._call(
                "load_typed",
                run_id,
                MANIFEST_STEP_ID,
                _ManifestRecord,
                action="load",
                run_id=run_id,
                step_id=None,
            )
        else:
            result = await self._call("load", run_id, MANIFEST_STEP_ID, action="load", run_id=run_id, step_id=None)
        if result is None:
            return None
        return dict(self._as_schema(result, _ManifestRecord, run_id, MANIFEST_STEP_ID).manifest)

    async def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's steps that have a checkpoint, in the order they were first saved.

        For a store without ``completed_steps``: the manifest's ``steps`` (in manifest order) that
        have a checkpoint. Raises ``CheckpointError`` on store failure.
        """
        _codec.check_run_id(run_id)
        if self._has["completed_steps"]:
            result = await self._call(
                "completed_steps", run_id, action="list the completed steps", run_id=run_id, step_id=None
            )
            return [str(step) for step in result]
        done: list[str] = []
        for step_id in _manifest_step_ids(await self.load_manifest(run_id)):
            found = await self._call("load", run_id, step_id, action="load", run_id=run_id, step_id=step_id)
            if found is not None:
                done.append(step_id)
        return done
