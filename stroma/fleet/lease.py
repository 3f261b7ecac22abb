"""One worker per run: :class:`RunLease` (a lease with a fencing token) and :class:`FencedRedisStore`.

A lease keeps two deliveries of the same run id from executing at once; a fencing token keeps a
worker that lost its lease (it stalled past the lease, its host was partitioned) from writing
over the checkpoints of the worker that took the run over.

- :meth:`RunLease.acquire` sets ``<prefix>lease:<run_id>`` if absent, with an expiry
  (``lease_seconds``), and in the same script takes a fencing token from
  ``INCR <prefix>fence:<run_id>``: tokens only grow, so the newest holder has the largest one,
  and the fence key holds the token of the current holder. A second acquirer gets
  :class:`RunLeaseHeld` naming the run, the holder and the time left.
- While held (``with lease:`` / ``async with lease:``), a daemon **thread** renews the lease every
  ``renew_every`` seconds (default a third of the lease), only while the value is still ours
  (compare and expire, one script). A thread rather than an asyncio task, so a step that blocks
  the event loop does not lose the lease; the lease is lost only when the process dies or cannot
  reach Redis for the rest of the lease. :attr:`RunLease.lost` tells when a renewal found the
  lease gone. Release is compare-and-delete.
- :class:`FencedRedisStore` is a :class:`~stroma.checkpoint.SyncRedisStore` whose every write
  (``save``, ``save_typed``, ``save_manifest``, ``delete``) is one Lua script that compares the
  run's current fence with this lease's token and writes only when they are equal. A stale worker
  gets :class:`StaleFenceError` (a ``CheckpointError`` naming the run and both tokens) and the
  newer worker's checkpoints stay as they are.

The fence key outlives the lease (``fence_ttl_seconds``, default 7 days, refreshed at each
acquire); keep it longer than the checkpoints' TTL. The lease, fence and checkpoint keys of one run
are different keys: use one Redis server (not Cluster) for them.

Production settings: ``lease_seconds`` of a few renewal intervals (30 s renewed every 10 s suits
most workers); a dead worker's run can be taken over after at most ``lease_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from stroma.checkpoint.redis import DEFAULT_KEY_PREFIX as CHECKPOINT_KEY_PREFIX
from stroma.checkpoint.redis import DEFAULT_TTL_SECONDS, ORDER_FIELD_PREFIX, SyncRedisStore, mask_url
from stroma.config import check_run_id
from stroma.errors import CheckpointError, ConfigurationError, StromaError
from stroma.fleet._redis import LazyRedis, text

__all__ = ["FencedRedisStore", "RunLease", "RunLeaseError", "RunLeaseHeld", "StaleFenceError"]

logger = logging.getLogger("stroma")

DEFAULT_LEASE_PREFIX: Final = "stroma:"
DEFAULT_FENCE_TTL_SECONDS: Final = 7 * 86400

# KEYS: lease, fence. ARGV: owner, lease ms, fence ttl s.
# Returns {1, token} when acquired, {0, holder, ms left} when someone holds it.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder, redis.call('PTTL', KEYS[1])} end
local token = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {1, token}
"""

# KEYS: lease. ARGV: our value, lease ms. 1 renewed, 0 not ours any more.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: our value. 1 released, 0 not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: run hash, fence. ARGV: token, ttl s, order field ('' for none), now ns, then field/value pairs;
# an empty field list with ARGV[5] == '!delete' deletes the hash. {1} written, {0, current fence}.
_FENCED_WRITE = """
local current = redis.call('GET', KEYS[2])
if current ~= ARGV[1] then return {0, current or ''} end
if ARGV[5] == '!delete' then
  redis.call('DEL', KEYS[1])
  return {1}
end
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4]) end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1}
"""


class RunLeaseError(StromaError):
    """A run lease could not be taken, kept or used. Carries ``run_id``."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.run_id))


def _rebuild(cls: type[RunLeaseError], message: str, run_id: str) -> RunLeaseError:
    return cls(message, run_id=run_id)


class RunLeaseHeld(RunLeaseError):
    """Another worker holds the run's lease: the run is executing elsewhere right now.

    ``remaining_ms`` is how long the holder's lease had left when this was raised (the earliest
    moment the run could be taken over if the holder stopped renewing); -1 when unknown."""

    def __init__(self, message: str, *, run_id: str, remaining_ms: int = -1) -> None:
        super().__init__(message, run_id=run_id)
        self.remaining_ms = remaining_ms

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_held, (str(self), self.run_id, self.remaining_ms))


def _rebuild_held(message: str, run_id: str, remaining_ms: int) -> RunLeaseHeld:
    return RunLeaseHeld(message, run_id=run_id, remaining_ms=remaining_ms)


class StaleFenceError(CheckpointError):
    """A checkpoint write was refused: the run was taken over by a worker with a newer fencing
    token. The message names the run, the step and both tokens; ``run_id`` and ``node_id`` are set."""


class RunLease:
    """The exclusive, renewed right to execute run *run_id* (see the module docs).

    Args:
        run_id: the run (the same rules as ``RunConfig.run_id``).
        redis_url / client: where Redis is (exactly one; a client passed in is never closed).
        lease_seconds: how long the lease lives without renewal (> 0, default 30).
        renew_every: seconds between renewals (default ``lease_seconds / 3``; must be below
            ``lease_seconds``).
        key_prefix: prefix of the lease and fence keys (default ``"stroma:"``).
        fence_ttl_seconds: lifetime of the fence key after the last acquire (default 7 days).
        owner: who holds it, shown to the losers (default ``"<host pid>:<random>"``).

    ``token`` is the fencing token once acquired. Thread-safe. Raises
    :class:`~stroma.errors.ConfigurationError` for invalid settings.
    """

    def __init__(
        self,
        run_id: str,
        *,
        redis_url: str | None = None,
        client: Any = None,
        lease_seconds: float = 30.0,
        renew_every: float | None = None,
        key_prefix: str = DEFAULT_LEASE_PREFIX,
        fence_ttl_seconds: int = DEFAULT_FENCE_TTL_SECONDS,
        owner: str | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.run_id = check_run_id(run_id, setting="RunLease.run_id")
        if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) or not lease_seconds > 0:
            raise ConfigurationError(f"RunLease.lease_seconds must be a number > 0, got {lease_seconds!r}")
        every = lease_seconds / 3 if renew_every is None else renew_every
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 < every < lease_seconds:
            raise ConfigurationError(
                f"RunLease.renew_every must be a number of seconds > 0 and below lease_seconds "
                f"({lease_seconds}), got {renew_every!r}"
            )
        if isinstance(fence_ttl_seconds, bool) or not isinstance(fence_ttl_seconds, int) or fence_ttl_seconds <= 0:
            raise ConfigurationError(f"RunLease.fence_ttl_seconds must be whole seconds > 0, got {fence_ttl_seconds!r}")
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ConfigurationError(f"RunLease.key_prefix must be a non-empty string, got {key_prefix!r}")
        if (redis_url is None) == (client is None):
            raise ConfigurationError(f"RunLease for run {run_id!r} needs exactly one of redis_url and client")
        self.lease_seconds = float(lease_seconds)
        self.renew_every = float(every)
        self.lease_key = f"{key_prefix}lease:{run_id}"
        self.fence_key = f"{key_prefix}fence:{run_id}"
        self.owner = owner if owner is not None else f"{socket.gethostname()} {os.getpid()}:{os.urandom(4).hex()}"
        self._fence_ttl = fence_ttl_seconds
        self._target = mask_url(redis_url) if redis_url is not None else type(client).__name__
        self._timeout = float(timeout_seconds)
        # No retries: a retried acquire would take a second fencing token.
        self._redis = LazyRedis(redis_url, client, timeout_seconds=self._timeout)
        self._value: str | None = None
        self.token: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost = threading.Event()

    def __repr__(self) -> str:
        return f"RunLease({self.run_id!r}, token={self.token}, at {self._target!r})"

    @property
    def client(self) -> Any:
        """The (synchronous) Redis client of this lease, created on first use."""
        return self._redis.client

    def script(self, name: str, source: str) -> Any:
        """A registered Lua script on :attr:`client` (``EVALSHA``, loaded on first use)."""
        return self._redis.script(name, source)

    def _fail(self, exc: Exception, action: str) -> RunLeaseError:
        return RunLeaseError(
            f"could not {action} the lease of run {self.run_id!r} at {self._target} ({type(exc).__name__}); "
            "is Redis running and reachable there?",
            run_id=self.run_id,
        )

    @property
    def held(self) -> bool:
        """Acquired, not released, and no renewal has found it gone."""
        return self._value is not None and not self._lost.is_set()

    @property
    def lost(self) -> bool:
        """A renewal found the lease expired or taken over: stop working on the run."""
        return self._lost.is_set()

    def acquire(self) -> int:
        """Take the lease and a new fencing token (returned, also in :attr:`token`).

        Raises :class:`RunLeaseHeld` when another worker holds it (naming the holder and the
        milliseconds left) and :class:`RunLeaseError` when Redis cannot be reached. Does not
        start renewing: use ``with lease:`` or :meth:`start_renewing`.
        """
        if self._value is not None and not self._lost.is_set():
            raise RunLeaseError(f"the lease of run {self.run_id!r} is already held by this object", run_id=self.run_id)
        args = [self.owner, max(1, int(self.lease_seconds * 1000)), self._fence_ttl]
        try:
            reply = self.script("acquire", _ACQUIRE)(keys=[self.lease_key, self.fence_key], args=args)
        except Exception as exc:
            raise self._fail(exc, "take") from exc
        if int(reply[0]) != 1:
            holder = text(reply[1]).rpartition("|")[0]
            remaining = int(reply[2])
            raise RunLeaseHeld(
                f"run {self.run_id!r} is already running elsewhere: its lease is held by {holder!r} for another "
                f"{remaining} ms; do not execute it twice (it can be taken over once that lease expires)",
                run_id=self.run_id,
                remaining_ms=remaining,
            )
        self.token = int(reply[1])
        self._value = f"{self.owner}|{self.token}"
        self._lost.clear()
        return self.token

    def renew(self) -> bool:
        """Extend the lease by ``lease_seconds`` if it is still ours; ``False`` (and :attr:`lost`)
        when it expired or was taken over. Raises :class:`RunLeaseError` when Redis cannot be reached."""
        value = self._value
        if value is None:
            return False
        try:
            args = [value, int(self.lease_seconds * 1000)]
            renewed = int(self.script("renew", _RENEW)(keys=[self.lease_key], args=args))
        except Exception as exc:
            raise self._fail(exc, "renew") from exc
        if not renewed:
            self._lost.set()
        return bool(renewed)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Never raises for Redis errors
        (the lease then lapses by itself); idempotent."""
        self._stop.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=self._timeout + 1)
        value, self._value = self._value, None
        if value is None:
            return
        try:
            self.script("release", _RELEASE)(keys=[self.lease_key], args=[value])
        except Exception as exc:
            logger.warning(
                "releasing the lease of run %s failed (%s); it lapses in at most %.0f s",
                self.run_id,
                type(exc).__name__,
                self.lease_seconds,
            )

    def start_renewing(self) -> None:
        """Renew the lease every ``renew_every`` seconds on a daemon thread until :meth:`release`."""
        if self._renewer is not None and self._renewer.is_alive():
            return
        self._stop.clear()
        thread = threading.Thread(target=self._renew_loop, name=f"stroma-lease-{self.run_id[:32]}", daemon=True)
        self._renewer = thread
        thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                if not self.renew():
                    logger.warning("the lease of run %s was lost (expired or taken over)", self.run_id)
                    return
            except RunLeaseError as exc:
                # Keep trying: Redis may come back before the lease runs out.
                cause = type(exc.__cause__).__name__
                logger.warning("renewing the lease of run %s failed (%s)", self.run_id, cause)

    def close(self) -> None:
        """Release, then close the client this lease created (a client passed in is left open)."""
        self.release()
        self._redis.close()

    def __enter__(self) -> RunLease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    async def __aenter__(self) -> RunLease:
        await asyncio.to_thread(self.acquire)
        self.start_renewing()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.release)

    def fenced_store(
        self,
        *,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        key_prefix: str = CHECKPOINT_KEY_PREFIX,
    ) -> FencedRedisStore:
        """A :class:`FencedRedisStore` on this lease's client (checkpoint keys as a
        :class:`~stroma.checkpoint.SyncRedisStore` with the same *key_prefix* lays them out)."""
        return FencedRedisStore(self, ttl_seconds=ttl_seconds, key_prefix=key_prefix)


class FencedRedisStore(SyncRedisStore):
    """A :class:`~stroma.checkpoint.SyncRedisStore` for one run whose writes are fenced by *lease*.

    Same key layout and reads as ``SyncRedisStore``; every write (``save``, ``save_typed``,
    ``save_manifest``, ``delete``) runs one script that compares the run's fence key with
    ``lease.token`` and writes only when they are equal: a worker whose lease was taken over
    can never overwrite the checkpoints of the worker that took the run over. Refused writes
    raise :class:`StaleFenceError`; a write for another run id, or before the lease was
    acquired, raises :class:`~stroma.errors.CheckpointError`. Uses the lease's client.
    """

    def __init__(
        self,
        lease: RunLease,
        *,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        key_prefix: str = CHECKPOINT_KEY_PREFIX,
    ) -> None:
        super().__init__(client=lease.client, ttl_seconds=ttl_seconds, key_prefix=key_prefix)
        self.lease = lease

    def _fenced(self, run_id: str, step_id: str | None, args: list[Any]) -> None:
        lease = self.lease
        token = lease.token
        where = f" step {step_id!r} of" if step_id is not None else ""
        if run_id != lease.run_id:
            raise CheckpointError(
                f"this FencedRedisStore is fenced for run {lease.run_id!r}; it cannot write{where} run {run_id!r}",
                run_id=run_id,
                node_id=step_id,
            )
        if token is None:
            raise CheckpointError(
                f"cannot write{where} run {run_id!r}: its lease was never acquired (no fencing token)",
                run_id=run_id,
                node_id=step_id,
            )
        reply = lease.script("fenced_write", _FENCED_WRITE)(
            keys=[self.run_key(run_id), lease.fence_key], args=[token, self.ttl_seconds, *args]
        )
        if int(reply[0]) != 1:
            current = text(reply[1]) or "none"
            raise StaleFenceError(
                f"refused to write{where} run {run_id!r}: this worker's fencing token {token} is stale (the run's "
                f"current token is {current}; another worker took the run over). Stop working on this run.",
                run_id=run_id,
                node_id=step_id,
            )

    def apply_write(self, run_id: str, step_id: str | None, fields: Mapping[str, str]) -> None:
        """Write *fields* as ``SyncRedisStore`` does, only while this lease's token is current."""
        order = ORDER_FIELD_PREFIX + step_id if step_id is not None else ""
        args: list[Any] = [order, time.time_ns()]
        for name, value in fields.items():
            args += [name, value]
        self._fenced(run_id, step_id, args)

    def delete(self, run_id: str) -> None:
        """Remove the run's hash, only while this lease's token is current."""
        try:
            self._fenced(run_id, None, ["", 0, "!delete"])
        except self._errors as exc:
            raise self._failure(exc, "delete the checkpoints", run_id, None) from exc

    def close(self) -> None:
        """Nothing to close: the client belongs to the lease (:meth:`RunLease.close`)."""
