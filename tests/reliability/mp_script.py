"""Runs a three-step pipeline in each of two ``multiprocessing`` children; nobody calls flush.

``python mp_script.py fork|spawn [parent-first]``. The parent prints the children's run ids
after joining them; with ``parent-first`` it runs the pipeline itself before starting them
(so the children inherit providers and exit hooks built in the parent) and prints its own too.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys

from exit_script import main


def child(queue: multiprocessing.Queue[str]) -> None:
    queue.put(asyncio.run(main(print_run_id=False)))


if __name__ == "__main__":
    mp = multiprocessing.get_context(sys.argv[1])
    parent = asyncio.run(main(print_run_id=False)) if sys.argv[2:] == ["parent-first"] else ""
    queue: multiprocessing.Queue[str] = mp.Queue()
    children = [mp.Process(target=child, args=(queue,)) for _ in range(2)]
    for process in children:
        process.start()
    for process in children:
        process.join(60)
        assert process.exitcode == 0, process.exitcode
    print(parent, *sorted(queue.get(timeout=5) for _ in children), flush=True)
