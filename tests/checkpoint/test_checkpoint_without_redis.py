"""Without the ``redis`` package: the Redis stores fail at construction with the established message.

Each case runs in a fresh interpreter in which ``import redis`` really fails (``sys.modules['redis']
= None``), so the package itself, not a mock of the store, is what is missing. Code written for
stroma 0.3.2 matches on "redis is required for SyncRedisStore" / "... for RedisStore" (issue 8, F).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
sys.modules["redis"] = None  # import redis now raises ImportError, as when it is not installed
import stroma
from stroma.checkpoint import RedisStore, SyncRedisStore
from stroma import StromaRunner

class MyStore(SyncRedisStore):
    pass

found = {}
for name, make in [
    ("RedisStore", lambda: RedisStore("redis://localhost:6379")),
    ("SyncRedisStore", lambda: SyncRedisStore("redis://localhost:6379", ttl_seconds=60)),
    ("MyStore", lambda: MyStore("redis://localhost:6379")),
    ("with_redis", lambda: StromaRunner.quick().with_redis("redis://localhost:6379")),
]:
    try:
        make()
    except ImportError as exc:
        found[name] = [type(exc).__name__, str(exc), type(exc.__cause__).__name__]
    else:
        found[name] = None
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def outcomes() -> dict[str, list[str] | None]:
    completed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result: dict[str, list[str] | None] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize(
    ("case", "store"),
    [
        ("RedisStore", "RedisStore"),
        ("SyncRedisStore", "SyncRedisStore"),
        ("MyStore", "SyncRedisStore"),
        ("with_redis", "RedisStore"),
    ],
)
def test_missing_redis_raises_the_established_import_error(
    outcomes: dict[str, list[str] | None], case: str, store: str
) -> None:
    outcome = outcomes[case]
    assert outcome is not None, f"{case} was created without the redis package"
    kind, message, cause = outcome
    assert kind in {"ImportError", "ModuleNotFoundError"}
    assert message.startswith(f"redis is required for {store}; ")
    assert "pip install 'stroma[redis]'" in message
    assert cause == "ModuleNotFoundError"  # raised from the real import failure
