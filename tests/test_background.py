"""The background worker (``background.py``): typed jobs run in the order queued, a failing
one does not stop the ones after it, and stop runs what was queued first."""

from __future__ import annotations

import errno

import pytest

from cascowfs.background import BackgroundWorker, EmptyTrash, Job, MergeLayers
from cascowfs.errors import BusyError


def test_jobs_run_in_the_order_queued_and_join_waits_for_them():
    done: list[Job] = []
    worker = BackgroundWorker(done.append)
    worker.start()
    jobs = [MergeLayers("s1"), EmptyTrash(), MergeLayers("s2")]
    for job in jobs:
        worker.put(job)
    worker.join()
    assert done == jobs
    worker.stop()


@pytest.mark.parametrize("failure", [BusyError("merged meanwhile"),
                                     OSError(errno.EIO, "a failing disk")])
def test_a_failing_job_is_dropped_and_the_next_one_runs(failure):
    done: list[Job] = []

    def run(job: Job) -> None:
        if job == MergeLayers("gone"):
            raise failure
        done.append(job)

    worker = BackgroundWorker(run)
    worker.start()
    worker.put(MergeLayers("gone"))
    worker.put(EmptyTrash())
    worker.stop()
    assert done == [EmptyTrash()]


def test_stop_runs_what_was_queued_before_it():
    done: list[Job] = []
    worker = BackgroundWorker(done.append)
    for i in range(5):
        worker.put(MergeLayers(f"s{i}"))
    worker.start()
    worker.stop()
    assert done == [MergeLayers(f"s{i}") for i in range(5)]


def test_jobs_are_values():
    assert MergeLayers("a") == MergeLayers("a") != MergeLayers("b")
    assert EmptyTrash() == EmptyTrash()
    with pytest.raises(AttributeError):
        MergeLayers("a").id = "b"  # type: ignore[misc]
