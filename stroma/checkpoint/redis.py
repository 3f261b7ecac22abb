"""Checkpoints in Redis: one hash per run, written in MULTI/EXEC transactions, with a TTL.

Layout: the run's key is ``<key_prefix><run_id>`` (default prefix ``stroma:checkpoint:``); the run id
is used verbatim after a fixed prefix, so two run ids never share a key whatever separators they
contain. Inside the hash, field ``s:<step_id>`` holds a step's sealed JSON envelope, ``o:<step_id>``
the writer's clock (ns) when the step was first saved (for ``completed_steps`` order) and ``m`` the
run manifest; the fixed field prefixes keep step ids such as ``"m"`` or ``"s:x"`` apart. Hence:

- ``delete(run_id)`` is one ``DEL``: no ``SCAN`` over the keyspace.
- Every write is one ``MULTI``/``EXEC`` that also sets the TTL, so a reader sees the old or the new
  checkpoint; a cancelled write was either queued completely (and applied) or discarded.
- ``ttl_seconds`` applies to the whole run and restarts at each write: a run's checkpoints expire
  together, never piecemeal. It needs a positive number of whole seconds.
- The key lives in one Redis Cluster slot.

Requires the ``redis`` extra (``pip install 'stroma[redis]'``). The client is created on first use
from ``redis_url``, with bounded socket timeouts and at most two quick reconnect retries; or pass an
existing ``client`` (then its own settings apply and Stroma never closes it). Responses may be
bytes or text (``decode_responses`` either way).

Every Redis or network failure becomes a :class:`~stroma.errors.CheckpointError` naming the
server (password masked), the run and the step, raised ``from`` the original error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel

from stroma.checkpoint import _codec
from stroma.checkpoint._protocols import require_model_class
from stroma.errors import CheckpointError, ConfigurationError

DEFAULT_KEY_PREFIX: Final = "stroma:checkpoint:"
DEFAULT_TTL_SECONDS: Final = 3600
_STEP: Final = "s:"
_ORDER: Final = "o:"
_MANIFEST: Final = "m"
ORDER_FIELD_PREFIX: Final = _ORDER
"""Prefix of the hash field holding a step's first-save clock (ns); see the module docs."""
_SCHEMES: Final = ("redis", "rediss", "unix")
_RETRIES: Final = 2
_RETRY_BASE_SECONDS: Final = 0.05
_RETRY_CAP_SECONDS: Final = 0.5


def _import_redis(store: str) -> Any:
    """The ``redis`` package, imported when a store is created; *store* names the store in the error."""
    try:
        import redis
    except ImportError as exc:
        # The message starts as the established package's did ("redis is required for RedisStore"):
        # code written for it matches on that.
        raise ImportError(
            f"redis is required for {store}; install it with: pip install 'stroma[redis]' (or: pip install redis)"
        ) from exc
    return redis


def mask_url(url: str) -> str:
    """*url* with its password (in the authority or a ``password=`` query parameter) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name.lower() == "password" for name, _ in pairs):
            query = urlencode([(name, "***" if name.lower() == "password" else value) for name, value in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _describe_client(client: Any) -> str:
    try:
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
        return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    except Exception:  # an unusual client object: describe it by type rather than fail
        return f"<{type(client).__name__}>"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _ordered_steps(mapping: Mapping[Any, Any]) -> list[str]:
    steps: list[str] = []
    first_saved: dict[str, int] = {}
    for raw_field, raw_value in mapping.items():
        field = _text(raw_field)
        if field.startswith(_STEP):
            steps.append(field[len(_STEP) :])
        elif field.startswith(_ORDER):
            try:
                first_saved[field[len(_ORDER) :]] = int(_text(raw_value))
            except ValueError:
                continue
    # A step without an order field (written by hand) sorts last; ties are broken by id.
    return sorted(steps, key=lambda step: (first_saved.get(step, 1 << 63), step))


class _RedisSettings:
    """Validated settings and the key layout shared by the sync and async stores."""

    store_kind: ClassVar[str] = "redis"

    def __init__(
        self,
        redis_url: str | None,
        ttl_seconds: int,
        *,
        client: Any,
        key_prefix: str,
        timeout_seconds: float,
    ) -> None:
        # Named as the public class (RedisStore / SyncRedisStore), also for a user's subclass of one.
        public = (RedisStore, SyncRedisStore)
        redis = _import_redis(next((cls.__name__ for cls in type(self).__mro__ if cls in public), type(self).__name__))
        if (redis_url is None) == (client is None):
            raise ConfigurationError(f"{type(self).__name__} needs exactly one of redis_url and client")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise ConfigurationError(f"ttl_seconds must be a whole number of seconds > 0, got {ttl_seconds!r}")
        if (
            isinstance(timeout_seconds, bool)
            or not isinstance(timeout_seconds, (int, float))
            or not (timeout_seconds > 0)
        ):
            raise ConfigurationError(f"timeout_seconds must be a number of seconds > 0, got {timeout_seconds!r}")
        if not isinstance(key_prefix, str) or not key_prefix:
            raise ConfigurationError(f"key_prefix must be a non-empty string, got {key_prefix!r}")
        self._password: str | None = None
        if redis_url is not None:
            if not isinstance(redis_url, str) or urlsplit(redis_url).scheme not in _SCHEMES:
                raise ConfigurationError(
                    f"redis_url must be a redis://, rediss:// or unix:// URL, got {mask_url(str(redis_url))!r}"
                )
            self._target = mask_url(redis_url)
            self._password = urlsplit(redis_url).password
        else:
            self._target = _describe_client(client)
        self._url = redis_url
        self._client: Any = client
        self._owns_client = client is None
        self._ttl = ttl_seconds
        self._timeout = float(timeout_seconds)
        self._prefix = key_prefix
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._unreachable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )

    @property
    def ttl_seconds(self) -> int:
        """Seconds a run's checkpoints live after its last write."""
        return self._ttl

    def run_key(self, run_id: str) -> str:
        """The Redis key of the hash holding everything stored for *run_id*."""
        return self._prefix + _codec.check_run_id(run_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._target!r}, ttl_seconds={self._ttl})"

    def _owned_url(self) -> str:
        # Only called when the store creates its client, which it does only when given a URL.
        if self._url is None:  # pragma: no cover - guarded by the constructor
            raise RuntimeError("a Redis store built around a client cannot create another")
        return self._url

    def _client_options(self) -> dict[str, Any]:
        return {"socket_timeout": self._timeout, "socket_connect_timeout": self._timeout}

    def _backoff(self) -> Any:
        from redis.backoff import ExponentialBackoff

        return ExponentialBackoff(cap=_RETRY_CAP_SECONDS, base=_RETRY_BASE_SECONDS)

    def _failure(self, exc: BaseException, action: str, run_id: str, step_id: str | None) -> CheckpointError:
        detail = f"{type(exc).__name__}: {exc}".rstrip(".")
        if self._password:
            detail = detail.replace(self._password, "***")
        hint = ""
        if isinstance(exc, self._unreachable):
            hint = " Is Redis running and reachable there?"
        return CheckpointError(
            f"the Redis checkpoint store at {self._target} could not "
            f"{_codec.operation(action, run_id, step_id)} ({detail}).{hint}",
            run_id=run_id,
            node_id=step_id,
        )


class RedisStore(_RedisSettings):
    """An asynchronous Redis checkpoint store (``redis.asyncio``); see the module docs for the layout.

    ``RedisStore(redis_url, ttl_seconds=3600)`` keeps the established signature. Use one store from
    one event loop (the client's connections belong to the loop that opened them) and call
    :meth:`aclose` when done. ``load()`` without a schema returns a
    :class:`~stroma.checkpoint.CheckpointData`; pass the schema (``load_typed`` or
    ``CheckpointManager.resume``) to get the step's model.

    Raises :class:`~stroma.errors.ConfigurationError` for invalid settings (at construction; no
    connection is made then), ``ImportError`` without the ``redis`` package, and
    :class:`~stroma.errors.CheckpointError` for unavailable servers and unsafe data.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        *,
        client: Any = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_seconds: float = 5.0,
    ) -> None:
        super().__init__(redis_url, ttl_seconds, client=client, key_prefix=key_prefix, timeout_seconds=timeout_seconds)

    def _redis(self) -> Any:
        if self._client is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry

            self._client = Redis.from_url(
                self._owned_url(), retry=Retry(self._backoff(), _RETRIES), **self._client_options()
            )
        return self._client

    async def _write(self, action: str, run_id: str, step_id: str | None, fields: dict[str, str]) -> None:
        key = self.run_key(run_id)
        try:
            async with self._redis().pipeline(transaction=True) as pipe:
                if step_id is not None:
                    pipe.hsetnx(key, _ORDER + step_id, time.time_ns())
                pipe.hset(key, mapping=fields)
                pipe.expire(key, self._ttl)
                await pipe.execute()
        except self._errors as exc:
            raise self._failure(exc, action, run_id, step_id) from exc

    async def _read(self, run_id: str, step_id: str | None, field: str) -> Any:
        try:
            return await self._redis().hget(self.run_key(run_id), field)
        except self._errors as exc:
            raise self._failure(exc, "load", run_id, step_id) from exc

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Store *state* atomically (refreshing the run's TTL)."""
        text = _codec.encode_step(run_id, node_id, state)
        await self._write("save", run_id, node_id, {_STEP + node_id: text})

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """Store *state* coerced to *schema*; raises ``CheckpointError`` when it does not validate."""
        require_model_class(schema)
        text = _codec.encode_step(run_id, node_id, state, schema)
        await self._write("save", run_id, node_id, {_STEP + node_id: text})

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """Return the checkpoint as a :class:`~stroma.checkpoint.CheckpointData`, or ``None``."""
        raw = await self._read(run_id, _codec.check_step_id(node_id), _STEP + node_id)
        return None if raw is None else _codec.decode_untyped(raw, run_id, node_id)

    async def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """Return the checkpoint validated as *schema*, or ``None``; ``CheckpointError`` on mismatch."""
        require_model_class(schema)
        raw = await self._read(run_id, _codec.check_step_id(node_id), _STEP + node_id)
        return None if raw is None else _codec.decode_step(raw, run_id, node_id, schema)

    async def delete(self, run_id: str) -> None:
        """Remove the run's hash (checkpoints and manifest) with one ``DEL``."""
        key = self.run_key(run_id)
        try:
            await self._redis().delete(key)
        except self._errors as exc:
            raise self._failure(exc, "delete the checkpoints", run_id, None) from exc

    async def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest atomically (refreshing the run's TTL)."""
        text = _codec.encode_manifest(run_id, manifest)
        await self._write("save", run_id, None, {_MANIFEST: text})

    async def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``."""
        raw = await self._read(run_id, None, _MANIFEST)
        return None if raw is None else _codec.decode_manifest(raw, run_id)

    async def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's checkpointed steps in first-save order (by the writers' clocks)."""
        try:
            mapping = await self._redis().hgetall(self.run_key(run_id))
        except self._errors as exc:
            raise self._failure(exc, "list the completed steps", run_id, None) from exc
        return _ordered_steps(mapping)

    async def aclose(self) -> None:
        """Close the client this store created (a client passed in is left open). Idempotent."""
        if self._owns_client:
            client, self._client = self._client, None
            if client is not None:
                await client.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class SyncRedisStore(_RedisSettings):
    """A synchronous, thread-safe Redis checkpoint store (``redis``); same layout as :class:`RedisStore`.

    The manager calls it in a worker thread. Call :meth:`close` when done. Errors as for
    :class:`RedisStore`.
    """

    blocking: ClassVar[bool] = True

    def __init__(
        self,
        redis_url: str | None = None,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        *,
        client: Any = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_seconds: float = 5.0,
    ) -> None:
        super().__init__(redis_url, ttl_seconds, client=client, key_prefix=key_prefix, timeout_seconds=timeout_seconds)
        self._client_lock = threading.Lock()

    def _redis(self) -> Any:
        with self._client_lock:  # threads may race to create the client
            if self._client is None:
                from redis import Redis
                from redis.retry import Retry

                self._client = Redis.from_url(
                    self._owned_url(), retry=Retry(self._backoff(), _RETRIES), **self._client_options()
                )
            return self._client

    def _write(self, action: str, run_id: str, step_id: str | None, fields: dict[str, str]) -> None:
        try:
            self.apply_write(run_id, step_id, fields)
        except self._errors as exc:
            raise self._failure(exc, action, run_id, step_id) from exc

    def apply_write(self, run_id: str, step_id: str | None, fields: Mapping[str, str]) -> None:
        """Write *fields* into the run's hash, with step *step_id*'s first-save order field
        (``ORDER_FIELD_PREFIX + step_id``, set if absent) and the TTL, as one transaction.

        The one place every write of this store goes through (``delete`` aside): a subclass may
        replace it to make writes conditional (:class:`stroma.fleet.FencedRedisStore`). Redis
        errors propagate; the caller turns them into a ``CheckpointError``.
        """
        key = self.run_key(run_id)
        with self._redis().pipeline(transaction=True) as pipe:
            if step_id is not None:
                pipe.hsetnx(key, _ORDER + step_id, time.time_ns())
            pipe.hset(key, mapping=dict(fields))
            pipe.expire(key, self._ttl)
            pipe.execute()

    def _read(self, run_id: str, step_id: str | None, field: str) -> Any:
        try:
            return self._redis().hget(self.run_key(run_id), field)
        except self._errors as exc:
            raise self._failure(exc, "load", run_id, step_id) from exc

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Store *state* atomically (refreshing the run's TTL)."""
        text = _codec.encode_step(run_id, node_id, state)
        self._write("save", run_id, node_id, {_STEP + node_id: text})

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """Store *state* coerced to *schema*; raises ``CheckpointError`` when it does not validate."""
        require_model_class(schema)
        text = _codec.encode_step(run_id, node_id, state, schema)
        self._write("save", run_id, node_id, {_STEP + node_id: text})

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """Return the checkpoint as a :class:`~stroma.checkpoint.CheckpointData`, or ``None``."""
        raw = self._read(run_id, _codec.check_step_id(node_id), _STEP + node_id)
        return None if raw is None else _codec.decode_untyped(raw, run_id, node_id)

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """Return the checkpoint validated as *schema*, or ``None``; ``CheckpointError`` on mismatch."""
        require_model_class(schema)
        raw = self._read(run_id, _codec.check_step_id(node_id), _STEP + node_id)
        return None if raw is None else _codec.decode_step(raw, run_id, node_id, schema)

    def delete(self, run_id: str) -> None:
        """Remove the run's hash (checkpoints and manifest) with one ``DEL``."""
        key = self.run_key(run_id)
        try:
            self._redis().delete(key)
        except self._errors as exc:
            raise self._failure(exc, "delete the checkpoints", run_id, None) from exc

    def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest atomically (refreshing the run's TTL)."""
        text = _codec.encode_manifest(run_id, manifest)
        self._write("save", run_id, None, {_MANIFEST: text})

    def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``."""
        raw = self._read(run_id, None, _MANIFEST)
        return None if raw is None else _codec.decode_manifest(raw, run_id)

    def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's checkpointed steps in first-save order (by the writers' clocks)."""
        try:
            mapping = self._redis().hgetall(self.run_key(run_id))
        except self._errors as exc:
            raise self._failure(exc, "list the completed steps", run_id, None) from exc
        return _ordered_steps(mapping)

    def close(self) -> None:
        """Close the client this store created (a client passed in is left open). Idempotent."""
        if self._owns_client:
            with self._client_lock:
                client, self._client = self._client, None
            if client is not None:
                client.close()

    def __enter__(self) -> SyncRedisStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
