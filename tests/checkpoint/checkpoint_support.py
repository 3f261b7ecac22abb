"""Helpers shared by the checkpoint tests (a uniquely named module, importable from the tests)."""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Harness:
    """A store plus what a test needs to reach behind it (raw bytes, its kind)."""

    kind: str
    store: Any
    raw_get: Callable[[str, str | None], bytes | None]
    raw_set: Callable[[str, str | None, bytes], None]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.store.save)

    async def call(self, name: str, *args: Any) -> Any:
        result = getattr(self.store, name)(*args)
        if inspect.isawaitable(result):
            result = await result
        return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_redis_url(password: str | None = None) -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{free_port()}/0"
