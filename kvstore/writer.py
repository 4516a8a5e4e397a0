"""`BoundedWriter`: background jobs with a bound on the bytes in flight, and back-pressure.

The one write queue of the project: the store's writers to its slower tiers, the precompute job's
uploads and the transformers connector's stores all go through it.

Primitives and guarantees:
- `submit(job, nbytes, when_full=...)`: queue `job` (a callable) accounted as `nbytes` until it has
  run. While queued and running jobs hold more than `max_pending_bytes`, a submit waits (`"wait"`: back-
  pressure, nothing lost), is refused (`"drop"`: returns False, for a slow network that must never stall
  the caller) or is let through anyway (`"admit"`: for data that has nowhere else to go). A single job
  always fits, however large: an idle writer never refuses.
- Jobs run on `workers` threads, in submission order when there is one worker. A job that raises is
  logged and counted (`failures`); the worker goes on.
- `flush(timeout)`: wait until every job submitted so far has run. `close(abort=...)`: drain the queue
  (or drop it) and stop the workers. Writers still open at interpreter exit are drained, so a write that
  was accepted is not lost with the process's last statement.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from typing import Callable, Literal

from kvstore.errors import TierError

log = logging.getLogger(__name__)

WhenFull = Literal["wait", "drop", "admit"]
_open_writers: "weakref.WeakSet[BoundedWriter]" = weakref.WeakSet()


class BoundedWriter:
    def __init__(self, name: str, *, max_pending_bytes: int, workers: int = 1) -> None:
        if workers < 1 or max_pending_bytes <= 0:
            raise ValueError("a writer needs workers >= 1 and max_pending_bytes > 0")
        self.name = name
        self.max_pending_bytes = max_pending_bytes
        self.failures = 0
        self._cond = threading.Condition()
        self._queue: deque[tuple[Callable[[], None], int]] = deque()
        self._pending_bytes = 0  # queued and running
        self._jobs = 0  # queued and running
        self._closed = False
        # Daemon threads, started by the first submit: an aborted writer must not hold the interpreter at
        # exit; `_drain_at_exit` waits for the jobs of writers that were not closed.
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        self._started = False
        _open_writers.add(self)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def idle(self) -> bool:
        return self._jobs == 0

    def submit(self, job: Callable[[], None], nbytes: int, when_full: WhenFull = "wait") -> bool:
        """Queue `job`; True when queued, False when refused (`"drop"` and the writer is behind)."""
        with self._cond:
            if self._closed:
                raise TierError(f"writer {self.name} is closed")
            full = lambda: self._jobs and self._pending_bytes + nbytes > self.max_pending_bytes  # noqa: E731
            if when_full == "drop" and full():
                return False
            if when_full == "wait":
                while full() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise TierError(f"writer {self.name} was closed while a job waited for room")
            self._pending_bytes += nbytes
            self._jobs += 1
            self._queue.append((job, nbytes))
            self._cond.notify_all()
            if not self._started:
                self._started = True
                for t in self._threads:
                    t.start()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._jobs == 0, timeout)

    def close(self, abort: bool = False, timeout: float | None = None) -> bool:
        """Run what is queued (with `abort`: drop it) and stop the workers, waiting for them up to
        `timeout` (None: as long as the jobs take). True when every worker has stopped."""
        with self._cond:
            self._closed = True
            if abort:
                while self._queue:
                    _, nbytes = self._queue.popleft()
                    self._pending_bytes -= nbytes
                    self._jobs -= 1
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        _open_writers.discard(self)
        return not any(t.is_alive() for t in self._threads)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job, nbytes = self._queue.popleft()
            failed = False
            try:
                job()
            except Exception:  # never lose a worker: the job's owner counts its own failures
                log.exception("writer %s: a job failed", self.name)
                failed = True
            finally:
                with self._cond:
                    self.failures += failed
                    self._pending_bytes -= nbytes
                    self._jobs -= 1
                    self._cond.notify_all()


@atexit.register
def _drain_at_exit() -> None:
    for w in list(_open_writers):
        w.close()
