"""The import's readahead: how far ahead it runs, that it stops, and that the kernel reads."""

import os
import shutil
import subprocess
import threading
import time

import pytest

from cascowfs.readahead import Readahead, advise_willneed


class Recorder:
    def __init__(self) -> None:
        self.advised: list[bytes] = []
        self.changed = threading.Condition()

    def __call__(self, path: bytes) -> None:
        with self.changed:
            self.advised.append(path)
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.advised) >= count, timeout=5), self.advised


def test_stays_within_its_window_of_what_was_consumed():
    paths = [b"f%d" % i for i in range(10)]
    recorder = Recorder()
    with Readahead(window=25, advise=recorder) as readahead:
        readahead.add(paths, [10] * 10)
        recorder.wait_for(3)  # 0, 10 and 20 bytes ahead are inside the window; 30 is not
        time.sleep(0.2)
        assert recorder.advised == paths[:3]
        readahead.consumed(10)
        recorder.wait_for(4)
        time.sleep(0.2)
        assert recorder.advised == paths[:4]
    assert recorder.advised == paths[:4]  # leaving stopped it, although files were left


def test_advises_every_path_in_order_when_the_consumer_keeps_up():
    paths = [b"f%d" % i for i in range(50)]
    recorder = Recorder()
    with Readahead(window=4 << 20, advise=recorder) as readahead:
        readahead.add(paths, [1 << 20] * 50)
        for done in range(50):
            recorder.wait_for(done + 1)
            readahead.consumed(1 << 20)
        recorder.wait_for(50)
    assert recorder.advised == paths


def test_waits_for_paths_that_come_later_and_keeps_their_order():
    recorder = Recorder()
    with Readahead(window=1 << 20, advise=recorder) as readahead:
        time.sleep(0.1)  # nothing to do yet: it waits, it does not stop
        readahead.add([b"a", b"b"], [10, 10])
        recorder.wait_for(2)
        readahead.add([b"c"], [10])
        recorder.wait_for(3)
    assert recorder.advised == [b"a", b"b", b"c"]


def test_a_later_path_still_waits_for_the_window():
    recorder = Recorder()
    with Readahead(window=25, advise=recorder) as readahead:
        readahead.add([b"a", b"b", b"c"], [10, 10, 10])
        recorder.wait_for(3)
        readahead.add([b"d"], [10])
        time.sleep(0.2)
        assert recorder.advised == [b"a", b"b", b"c"]  # 30 bytes ahead: outside the window
        readahead.consumed(10)
        recorder.wait_for(4)
    assert recorder.advised == [b"a", b"b", b"c", b"d"]


def _resident_bytes(path: str) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore (util-linux) is missing")
def test_advice_makes_the_kernel_read_the_file(tmp_path):
    path = tmp_path / "data"
    size = 4 << 20
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_bytes(str(path)) > size // 2:
        pytest.skip("this filesystem keeps the file cached after DONTNEED")
    advise_willneed(os.fsencode(path))
    # The most seen resident: a machine reclaiming cold pages on its own (DAMON here) may take
    # back a few pages read ahead and never touched before the last look.
    deadline = time.monotonic() + 5
    most = _resident_bytes(str(path))
    while most < size and time.monotonic() < deadline:
        time.sleep(0.05)
        most = max(most, _resident_bytes(str(path)))
    assert most >= size * 9 // 10


def test_advice_neither_blocks_on_a_fifo_nor_fails_on_a_missing_path(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    advise_willneed(os.fsencode(fifo))  # a blocking open would hang here: no writer ever comes
    advise_willneed(os.fsencode(tmp_path / "gone"))
