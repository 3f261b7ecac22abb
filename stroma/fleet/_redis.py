"""The one way the fleet modules open a synchronous Redis client (lease, shared budget, Celery).

Each caller decides whether redis-py may retry a command after a lost connection: only
commands that are idempotent may be retried blindly (the shared budget's scripts are; taking a
lease increments a fencing token, so it is not).
"""

from __future__ import annotations

import threading
from typing import Any


def sync_client(url: str, *, timeout_seconds: float, retries: int = 0) -> Any:
    """A ``redis.Redis`` for *url* with connect and socket timeouts of *timeout_seconds*.

    *retries* > 0 lets redis-py retry a command that failed on the connection that many times,
    with a short exponential backoff (at most 0.5 s); 0 never retries. Connections are opened on
    first use, and a forked child opens its own (redis-py's pool checks the process id).
    """
    import redis

    options: dict[str, Any] = {"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds}
    if retries > 0:
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        options["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
    return redis.Redis.from_url(url, **options)


def text(value: Any) -> str:
    """A Redis reply as text (redis-py returns ``bytes`` unless the client decodes responses)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class LazyRedis:
    """A Redis client opened on first use from *url* (or the *client* passed in), and the Lua
    scripts registered on it, each once. Thread-safe; :meth:`close` closes only a client it opened.
    """

    def __init__(self, url: str | None, client: Any, *, timeout_seconds: float, retries: int = 0) -> None:
        self._url = url
        self._client: Any = client
        self._owns_client = client is None
        self._timeout = timeout_seconds
        self._retries = retries
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}

    @property
    def client(self) -> Any:
        with self._lock:
            return self._open()

    def _open(self) -> Any:
        if self._client is None:
            if self._url is None:  # pragma: no cover - guarded by the callers' constructors
                raise RuntimeError("neither a Redis client nor a URL was given")
            self._client = sync_client(self._url, timeout_seconds=self._timeout, retries=self._retries)
        return self._client

    def script(self, name: str, source: str) -> Any:
        """The Lua script *name* (``EVALSHA``, loaded on first use), registered once."""
        with self._lock:
            found = self._scripts.get(name)
            if found is None:
                found = self._scripts[name] = self._open().register_script(source)
            return found

    def close(self) -> None:
        """Close the client this object opened (a client passed in is left open). Idempotent."""
        if not self._owns_client:
            return
        with self._lock:
            client, self._client = self._client, None
            self._scripts.clear()
        if client is not None:
            client.close()
