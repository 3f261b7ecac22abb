"""The one way the fleet modules open a synchronous Redis client (lease, shared budget, Celery).

Each caller decides whether redis-py may retry a command after a lost connection: only
commands that are idempotent may be retried blindly (the shared budget's scripts are; taking a
lease increments a fencing token, so it is not).
"""

from __future__ import annotations

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
