"""Run by test_checkpoint_lifecycle.py in a subprocess: SQLite stores used, then the process forks.

argv: database path, result path. Writes ``{"child": {...}, "parent": {...}}`` as JSON. The child
bounds every call with a 10 s manager timeout; the test bounds the whole script.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import warnings

from pydantic import BaseModel

from stroma.checkpoint import AsyncSQLiteStore, CheckpointManager, SQLiteStore


class Doc(BaseModel):
    text: str


async def use(manager: CheckpointManager, step_id: str) -> dict[str, object]:
    started = time.perf_counter()
    try:
        await manager.checkpoint("fork-run", step_id, Doc(text=step_id))
        loaded = await manager.resume("fork-run", step_id, Doc)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    return {"ok": loaded == Doc(text=step_id), "error": None, "seconds": time.perf_counter() - started}


def main(db_path: str, result_path: str) -> None:
    async_store = AsyncSQLiteStore(db_path + ".async")
    sync_store = SQLiteStore(db_path + ".sync")
    async_manager = CheckpointManager(async_store, timeout_seconds=10)
    sync_manager = CheckpointManager(sync_store, timeout_seconds=10)
    # Both stores open their connection (and the async one its worker thread) before the fork.
    parent_before = [asyncio.run(use(async_manager, "before")), asyncio.run(use(sync_manager, "before"))]
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: "process is multi-threaded"
        pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        child = [asyncio.run(use(async_manager, "child")), asyncio.run(use(sync_manager, "child"))]
        os.write(write_fd, json.dumps(child).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    parent_after = [asyncio.run(use(async_manager, "after")), asyncio.run(use(sync_manager, "after"))]
    steps = [asyncio.run(manager.completed_steps("fork-run")) for manager in (async_manager, sync_manager)]
    async_store.close()
    sync_store.close()
    result = {
        "child": json.loads(b"".join(chunks) or b"null"),
        "parent": parent_before + parent_after,
        "steps": steps,
    }
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
