"""Labels on the trio thread (``fuse/inline_labels.py``) over a real store: the same result,
order and durability as ``StateManager.label``, one kernel ``fdatasync`` shared by the labels
that wait together, a worker thread wherever the trio thread would have to wait, and a
label's place in WAL order kept even when its caller is cancelled or its flush fails.

The kernel ``fdatasync`` itself (``fuse/kernel_fdatasync.py``) is the real one, on real
files; only the flush-failure test gives the labels a flush that fails."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import conftest
import pytest
import trio
from fusehelpers import mounted, needs_fuse
from support.skips import needs_overlay

from cascowfs.client import Client
from cascowfs.errors import InvalidArgumentError, NotFoundError, StoreIOError
from cascowfs.fuse.inline_labels import InlineLabels
from cascowfs.fuse.kernel_fdatasync import KernelFdatasync
from cascowfs.state import StateManager
from cascowfs.tuning import Tuning

pytestmark = needs_overlay  # stores probe their layer images by mounting one


@contextmanager
def _store_with_snapshot(tmp_path: Path, **kw) -> Iterator[StateManager]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    with conftest.open_store(tmp_path / "store", **kw) as sm:
        sm.import_tree(src, "s1")
        yield sm


@pytest.fixture
def store(tmp_path):
    with _store_with_snapshot(tmp_path) as sm:
        yield sm


class CountingFdatasync:
    """The kernel fdatasync of the WAL, counting its calls."""

    def __init__(self, sm: StateManager) -> None:
        self.kernel = KernelFdatasync.open(sm.wal.fileno())
        if self.kernel is None:
            pytest.skip("this kernel has no AIO fdatasync")
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        assert self.kernel is not None
        await self.kernel()

    def close(self) -> None:
        assert self.kernel is not None
        self.kernel.close()


def _applied_labels(sm: StateManager, id: str) -> dict[str, str]:
    sm.label_applies.wait_applied()
    with sm.db.read() as txn:
        return sm.catalog.snapshot(txn, id).labels


async def test_a_kernel_fdatasync_flushes_a_file_and_refuses_a_pipe(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    flusher = KernelFdatasync.open(fd)
    if flusher is None:
        pytest.skip("this kernel has no AIO fdatasync")
    try:
        for i in range(20):
            os.pwrite(fd, b"record %d\n" % i, 16 * i)
            await flusher()
            # the flush took its completion's signal whole: the next flush waits for its own
            with pytest.raises(BlockingIOError):
                os.eventfd_read(flusher._eventfd)
    finally:
        flusher.close()
        os.close(fd)
    read_end, write_end = os.pipe()
    try:
        assert KernelFdatasync.open(write_end) is None  # EINVAL: flush in a worker thread
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_concurrent_labels_compose_and_share_flushes(store):
    flush = CountingFdatasync(store)
    labels = InlineLabels(store, flush)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(labels.label, "s1", {f"k{i}": str(i), "last": str(i)})
    finally:
        flush.close()
    got = store.snapshot("s1").labels
    assert {k: v for k, v in got.items() if k.startswith("k")} == {
        f"k{i}": str(i) for i in range(40)
    }
    assert got["last"] in {str(i) for i in range(40)}  # one label's, whole
    assert _applied_labels(store, "s1") == got
    assert 1 <= flush.calls < 40, "labels that wait together share one flush"


async def test_without_kernel_aio_labels_flush_in_a_worker_thread(store):
    labels = InlineLabels(store, None)
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(labels.label, "s1", {f"k{i}": "v"})
    assert {k for k in _applied_labels(store, "s1") if k.startswith("k")} == {
        f"k{i}" for i in range(10)
    }


async def test_a_label_of_a_missing_snapshot_fails_before_anything_and_holds_nothing(store):
    labels = InlineLabels(store, None)
    with pytest.raises(NotFoundError):
        await labels.label("nope", {"k": "v"})
    with pytest.raises(InvalidArgumentError):
        await labels.label("s1", {"k": "v" * 5000})  # over the value cap
    with store.quiesced():  # would wait for ever for a gate ticket left behind
        pass


async def test_while_the_store_is_held_a_label_waits_in_a_thread_not_on_the_trio_thread(store):
    labels = InlineLabels(store, None)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.quiesced():
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(labels.label, "s1", {"k": "v"})
        await trio.sleep(0.2)
        ticks = 0
        with trio.move_on_after(0.2):
            while True:  # the trio thread keeps running while the label waits
                ticks += 1
                await trio.sleep(0.01)
        assert ticks > 5
        release.set()
    holder.join()
    assert _applied_labels(store, "s1")["k"] == "v"


async def test_a_label_cancelled_during_its_flush_still_takes_its_place(store):
    flush = CountingFdatasync(store)
    let_flush = trio.Event()

    async def held_flush() -> None:
        await let_flush.wait()
        await flush()

    labels = InlineLabels(store, held_flush)
    try:
        with trio.fail_after(30):  # a label that lost its place would block the next for good
            await _cancel_one_then_label_again(labels, let_flush)
    finally:
        flush.close()
    got = _applied_labels(store, "s1")
    assert got["first"] == "1" and got["second"] == "2"


async def _cancel_one_then_label_again(labels: InlineLabels, let_flush: trio.Event) -> None:
    async with trio.open_nursery() as nursery:

        async def cancelled_label() -> None:
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel_then_let_flush, scope, let_flush)
                await labels.label("s1", {"first": "1"})
            assert scope.cancel_called

        nursery.start_soon(cancelled_label)
    await labels.label("s1", {"second": "2"})


async def _cancel_then_let_flush(scope: trio.CancelScope, let_flush: trio.Event) -> None:
    await trio.sleep(0.05)  # the label waits for its flush by now
    scope.cancel()
    await trio.sleep(0.05)
    let_flush.set()


async def test_a_label_whose_flush_fails_is_durable_once_its_transaction_commits(store):
    async def failing() -> None:
        raise OSError(errno.EIO, "injected")

    labels = InlineLabels(store, failing)
    await labels.label("s1", {"k": "v"})  # LMDB's own commit made it durable
    assert _applied_labels(store, "s1")["k"] == "v"

    real_submit = store.db.submit

    def failing_transaction(fn, what, **kwargs):
        def fail(txn):
            raise StoreIOError("disk gone")

        return real_submit(fail, what, **kwargs)

    store.db.submit = failing_transaction  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreIOError, match="syncing the write-ahead log: injected"):
            await labels.label("s1", {"k2": "v"})
    finally:
        store.db.submit = real_submit  # type: ignore[method-assign]
    assert "k2" not in store.snapshot("s1").labels


async def test_labels_alone_still_checkpoint_the_wal(tmp_path):
    with _store_with_snapshot(tmp_path, tuning=Tuning(checkpoint_every=5)) as sm:
        labels = InlineLabels(sm, None)
        due = 0
        for i in range(12):
            if await labels.label("s1", {"n": str(i)}):
                due += 1
                await trio.to_thread.run_sync(sm.housekeep)
                assert sm.wal.records_since_checkpoint < 5
        assert due >= 2


@needs_fuse
def test_every_label_ctl_acknowledged_survives_a_kill9_right_after():
    """Through the daemon, agents on four threads: whatever ``ctl`` answered ``ok`` is in the
    WAL, so the next mount replays what LMDB had not applied yet."""

    def populate(fs) -> None:
        (fs.base / "src").mkdir()
        (fs.base / "src" / "f").write_text("x\n")

    with mounted(populate=populate) as fs:
        with Client(fs.mnt) as client:
            client.import_tree(fs.base / "src", "s1")
        acknowledged: dict[str, str] = {}
        lock = threading.Lock()

        def agent(n: int) -> None:
            fd = os.open(fs.mnt / "ctl", os.O_RDWR)
            try:
                for i in range(60):
                    os.write(fd, f"label s1 a{n}={i}\n".encode())
                    assert os.read(fd, 4096) == b"ok s1\n"
                    with lock:
                        acknowledged[f"a{n}"] = str(i)
            finally:
                os.close(fd)

        agents = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
        for t in agents:
            t.start()
        for t in agents:
            t.join()
        fs.kill9()
        fs.start()
        with Client(fs.mnt) as client:
            assert client.snapshot("s1").labels == acknowledged
