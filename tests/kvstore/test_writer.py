"""BoundedWriter: the one write queue (store writers, precompute uploads, the HF connector's stores)."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore.errors import TierError
from kvstore.writer import BoundedWriter


def gated_job(gate: threading.Event, done: list, tag):
    def job() -> None:
        assert gate.wait(10)
        done.append(tag)
    return job


def test_jobs_run_in_order_and_flush_waits_for_them():
    w = BoundedWriter("t", max_pending_bytes=100)
    done = []
    for i in range(20):
        w.submit(lambda i=i: done.append(i), 1)
    assert w.flush(10) and done == list(range(20))
    assert w.pending_bytes == 0 and w.idle
    assert w.close()


def test_back_pressure_waits_drop_refuses_admit_lets_through():
    w = BoundedWriter("t", max_pending_bytes=10)
    gate, done = threading.Event(), []
    assert w.submit(gated_job(gate, done, "a"), 8)
    assert w.submit(lambda: done.append("b"), 5, "drop") is False  # behind: refused at once
    assert w.submit(lambda: done.append("c"), 5, "admit")  # has nowhere else to go: queued anyway
    assert w.pending_bytes == 13
    waited = []
    t = threading.Thread(target=lambda: waited.append(w.submit(lambda: done.append("d"), 5)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # waits for room
    gate.set()
    t.join(10)
    assert waited == [True] and w.flush(10) and done == ["a", "c", "d"]
    w.close()


def test_a_single_job_larger_than_the_bound_fits_an_idle_writer():
    w = BoundedWriter("t", max_pending_bytes=10)
    done = []
    assert w.submit(lambda: done.append(1), 1000, "drop")
    assert w.flush(10) and done == [1]
    w.close()


def test_a_failing_job_is_counted_and_the_worker_goes_on():
    w = BoundedWriter("t", max_pending_bytes=10)
    done = []
    w.submit(lambda: 1 / 0, 1)
    w.submit(lambda: done.append(1), 1)
    assert w.flush(10) and done == [1] and w.failures == 1
    w.close()


def test_close_with_abort_drops_what_is_queued():
    w = BoundedWriter("t", max_pending_bytes=100, workers=2)
    gate, done = threading.Event(), []
    w.submit(gated_job(gate, done, "a"), 1)
    w.submit(gated_job(gate, done, "b"), 1)
    time.sleep(0.2)  # both workers hold a job
    w.submit(lambda: done.append("queued"), 1)
    assert not w.close(abort=True, timeout=0.2)  # the running jobs outlast the timeout
    gate.set()
    assert w.close(timeout=10)
    assert sorted(done) == ["a", "b"] and w.idle
    with pytest.raises(TierError):
        w.submit(lambda: None, 1)
