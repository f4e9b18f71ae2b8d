"""Run test jobs on threads started together (the runtime's concurrency checks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_concurrently(run: Callable[[Any], Any], jobs: list) -> list:
    """``run(job)`` for each job on its own thread, all started together; re-raises a
    thread's error."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = run(jobs[i])
        except Exception as error:  # noqa: BLE001 - handed to the main thread
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
