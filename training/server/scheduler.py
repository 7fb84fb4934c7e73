"""The one thread that runs the server's compute: each model's requests in ``seq_id`` order,
models taking turns.

Tinker's training clients number their requests (``seq_id`` 1, 2, 3, ...) and the server must
apply them in that order, even when the chunks of one large ``forward_backward`` arrive out of
order. A queue (a *key*: a model id, or a sampling session) whose next request is not the one
after the last it ran waits for it; if it has not come after ``grace_s`` seconds (a client that
died mid-call, a server restart), the queue moves on with the lowest it has. Keys are served
round-robin, one request per turn, so a tenant's long run of requests does not hold another's
back by more than one step.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["Scheduler"]


@dataclass(order=True)
class _Task:
    seq: float
    order: int
    enqueued: float = field(compare=False)
    run: Callable[[], None] = field(compare=False)


class Scheduler:
    def __init__(self, grace_s: float = 2.0) -> None:
        self.grace_s = grace_s
        self._queues: dict[str, list[_Task]] = {}
        self._last: dict[str, int] = {}
        self._keys: list[str] = []  # round-robin order
        self._turn = 0
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="homefire-scheduler",
                                        daemon=True)
        self._thread.start()

    def expect(self, key: str, last_seq: int = 0) -> None:
        """Declare ``key``'s requests numbered from ``last_seq + 1`` (a new model: 0)."""
        with self._cond:
            self._last[key] = last_seq

    def submit(self, key: str, seq: int | None, run: Callable[[], None]) -> None:
        """Queue ``run`` under ``key``; ``seq`` None runs in submission order."""
        with self._cond:
            if key not in self._queues:
                self._queues[key] = []
                self._keys.append(key)
            order = next(self._order)
            heapq.heappush(self._queues[key], _Task(
                seq=float(seq) if seq is not None else float("-inf"), order=order,
                enqueued=time.monotonic(), run=run))
            self._cond.notify()

    def _next(self) -> tuple[str, _Task] | None:
        """The next runnable task, round-robin over keys (None: nothing runnable yet)."""
        now = time.monotonic()
        for i in range(len(self._keys)):
            key = self._keys[(self._turn + i) % len(self._keys)]
            queue = self._queues[key]
            if not queue:
                continue
            task = queue[0]
            last = self._last.get(key)
            if (task.seq == float("-inf") or last is None or task.seq <= last + 1
                    or now - task.enqueued >= self.grace_s):
                if last is not None and task.seq > last + 1:
                    logger.warning("%s: request %d never came; running %d", key, last + 1,
                                   int(task.seq))
                heapq.heappop(queue)
                self._turn = (self._turn + i + 1) % len(self._keys)
                return key, task
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                picked = self._next()
                while picked is None and not self._stopping:
                    waiting = any(self._queues.values())
                    self._cond.wait(timeout=0.05 if waiting else None)
                    picked = self._next()
                if picked is None:
                    return
            key, task = picked
            try:
                task.run()
            except BaseException:  # noqa: BLE001 (a task stores its own errors; never die)
                logger.exception("request of %s failed outside its handler", key)
            with self._cond:
                if task.seq != float("-inf"):
                    self._last[key] = max(self._last.get(key, 0), int(task.seq))

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
