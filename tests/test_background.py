"""The background worker (``background.py``): typed jobs run in the order queued, a failing
one does not stop the ones after it, stop runs what was queued first,
and a job equal to one waiting is not queued twice."""

from __future__ import annotations

import errno
import threading

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


def test_a_job_equal_to_one_waiting_is_not_queued_again():
    done: list[Job] = []
    worker = BackgroundWorker(done.append)
    for i in range(100):  # a burst of commits and discards, each asking for a round
        worker.put(EmptyTrash())
        worker.put(MergeLayers(f"s{i % 2}"))
    worker.start()
    worker.stop()
    assert done == [EmptyTrash(), MergeLayers("s0"), MergeLayers("s1")]


def test_a_job_asked_for_while_an_equal_one_runs_runs_again():
    started, release = threading.Event(), threading.Event()
    done: list[Job] = []

    def run(job: Job) -> None:
        if not done:
            started.set()
            release.wait()
        done.append(job)

    worker = BackgroundWorker(run)
    worker.start()
    worker.put(EmptyTrash())
    started.wait()
    worker.put(EmptyTrash())  # the running round may have passed what this one asks for
    worker.put(EmptyTrash())
    release.set()
    worker.stop()
    assert done == [EmptyTrash(), EmptyTrash()]


def test_stop_skips_the_jobs_of_the_kind_asked_that_have_not_started():
    done: list[Job] = []
    worker = BackgroundWorker(done.append)
    for job in (MergeLayers("s1"), EmptyTrash(), MergeLayers("s2")):
        worker.put(job)
    worker.stop(skipping=EmptyTrash)  # before the thread starts: none has started
    worker.start()
    worker.join()  # the skipped job counts as done
    assert done == [MergeLayers("s1"), MergeLayers("s2")]
