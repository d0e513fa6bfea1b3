"""Signals to a real daemon: SIGHUP reopens the log file and does nothing else (logrotate moves
the file away and sends it), also while the store is still being opened; SIGUSR1 writes every
thread's stack to stderr; SIGTERM and SIGINT unmount cleanly. After SIGHUP and SIGUSR1 the same
daemon still serves the mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cascowfs import daemon
from fusehelpers import REPO, Cascow, cascow_base, mounted, mounts_under, needs_fuse, run_cli

pytestmark = needs_fuse


def _wait_for_text(path: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        try:
            content = path.read_text(errors="replace")
        except FileNotFoundError:
            content = ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never reached {path}; it holds:\n{content[-2000:]}")


def _still_serving(fs: Cascow, pid: int, snapshot: str) -> None:
    assert int(os.getxattr(fs.mnt, "user.cascowfs.pid")) == pid
    code, reply = fs.ctl(f"branch after-{snapshot} {snapshot}")
    assert code == 0, reply
    assert fs.ctl(f"discard after-{snapshot}")[0] == 0


def _import_one(fs: Cascow, ident: str) -> None:
    src = fs.base / "src"
    src.mkdir(exist_ok=True)
    (src / "f").write_text("one\n")
    assert fs.ctl(f"import {ident} {src}")[0] == 0


def test_sighup_reopens_the_log_file_and_keeps_serving():
    with mounted() as fs:
        _import_one(fs, "base")
        rotated = fs.base / "daemon.log.1"
        for _ in range(2):  # a second rotation works like the first
            os.rename(fs.log, rotated)
            os.kill(fs.pid, signal.SIGHUP)
            fresh = _wait_for_text(fs.log, "reopened log file")
            assert str(fs.log) in fresh and "unmounting" not in fresh
            assert fs.running
            _still_serving(fs, fs.pid, "base")
            rotated.unlink()
        fs.stop()
        assert f"store {fs.store} closed" in fs.log.read_text()  # logged to the fresh file


def test_sighup_moves_a_background_daemons_stderr_to_the_fresh_log():
    """In the background stdout and stderr are the log file too (faulthandler writes there):
    after SIGHUP a SIGUSR1 stack dump lands in the fresh file, not the rotated one."""
    with cascow_base() as base:
        fs = Cascow(base)
        try:
            run_cli("mount", "--background", "--log-file", str(fs.log), str(fs.store),
                    str(fs.mnt))
            pid = int(os.getxattr(fs.mnt, "user.cascowfs.pid"))
            _import_one(fs, "base")
            rotated = base / "daemon.log.1"
            os.rename(fs.log, rotated)
            os.kill(pid, signal.SIGHUP)
            _wait_for_text(fs.log, "reopened log file")
            os.kill(pid, signal.SIGUSR1)
            dump = _wait_for_text(fs.log, "Current thread")
            assert "_watch_signals" in dump or "pyfuse3" in dump or "trio" in dump
            assert "Current thread" not in rotated.read_text(errors="replace")
            _still_serving(fs, pid, "base")
            run_cli("umount", "--branches", str(fs.mnt))
            assert mounts_under(base) == []
        finally:
            fs.teardown()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_unmount_cleanly(signum):
    with mounted() as fs:
        _import_one(fs, "base")
        assert fs.ctl("branch b base")[0] == 0
        os.kill(fs.pid, signum)
        assert fs.proc is not None and fs.proc.wait(timeout=60) == 0
        # the FUSE mount is gone, not dead; the branch overlay stays, as documented
        assert [t for _, t in mounts_under(fs.base) if t != "erofs"] == ["overlay"]
        assert f"{signal.Signals(signum).name}: unmounting" in fs.log.read_text()


def test_a_stop_that_hangs_aborts_the_connection_once_its_grace_is_over(caplog):
    """A request handler waiting in the kernel on the mount after the stop stopped reading
    requests would keep the daemon, and every caller of the mount, waiting for good: the
    stop's watchdog aborts the connection. Run here against a live daemon: its serving ends
    and it exits; a watchdog whose serving ended first aborts nothing."""
    with mounted() as fs:
        _import_one(fs, "base")
        served = threading.Event()
        served.set()
        daemon._abort_if_still_serving(fs.mnt, served, 0.1)
        time.sleep(0.5)
        _still_serving(fs, fs.pid, "base")
        assert "aborting its connection" not in caplog.text
        daemon._abort_if_still_serving(fs.mnt, threading.Event(), 0.1)
        assert fs.proc is not None
        fs.proc.wait(timeout=60)
        with pytest.raises(OSError) as caught:
            os.stat(fs.mnt / "snapshots")
        assert caught.value.errno == errno.ENOTCONN
        assert "still serving 0 s after the stop; aborting its connection" in caplog.text


def test_sigusr1_dumps_stacks_and_keeps_serving():
    with mounted() as fs:
        _import_one(fs, "base")
        os.kill(fs.pid, signal.SIGUSR1)
        _wait_for_text(fs.log, "Current thread")
        assert fs.running
        _still_serving(fs, fs.pid, "base")


_SLOW_OPENING_DAEMON = """
import logging, sys, time
from pathlib import Path
from cascowfs import daemon
from cascowfs.state import StateManager

store, mnt, log, gate = (Path(a) for a in sys.argv[1:5])
daemon.setup_logging(logging.INFO, str(log))

def open_when_let(path):
    gate.with_suffix(".waiting").touch()
    while not gate.exists():
        time.sleep(0.02)
    return StateManager.open(path)

sys.exit(daemon.run(store, mnt, open_state=open_when_let,
                    ready=lambda: gate.with_suffix(".ready").touch()))
"""


def test_sighup_while_the_store_opens_reopens_the_log_and_the_daemon_serves():
    """A recovery after a reboot may take minutes before the loop watches signals; a SIGHUP
    then must not kill the daemon either."""
    with cascow_base() as base:
        fs = Cascow(base)
        gate = base / "gate"
        try:
            fs.proc = subprocess.Popen(
                [sys.executable, "-c", _SLOW_OPENING_DAEMON, str(fs.store), str(fs.mnt),
                 str(fs.log), str(gate)], cwd=REPO, start_new_session=True)
            _wait_for_path(gate.with_suffix(".waiting"), fs.proc)
            os.rename(fs.log, base / "daemon.log.1")
            os.kill(fs.proc.pid, signal.SIGHUP)
            _wait_for_text(fs.log, "reopened log file")
            gate.touch()
            _wait_for_path(gate.with_suffix(".ready"), fs.proc)
            assert int(os.getxattr(fs.mnt, "user.cascowfs.pid")) == fs.proc.pid
            _import_one(fs, "base")
            fs.stop()
            assert "serving" in fs.log.read_text()
        finally:
            fs.teardown()


def _wait_for_path(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"daemon exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


_HANGING_QUERY_DAEMON = """
import logging, sys, time
from pathlib import Path
from cascowfs import daemon
from cascowfs.state import StateManager

store, mnt, log, gate = (Path(a) for a in sys.argv[1:5])
daemon.setup_logging(logging.INFO, str(log))
daemon.STOP_GRACE_SECONDS, daemon.ABORT_SETTLE_SECONDS = 2.0, 1.0
real_find = StateManager.find

def find(self, query):
    if any(p.key == "hang" for p in query.predicates):
        gate.with_suffix(".querying").touch()
        while True:  # a query that outlives every stop: a worker thread no one can cancel
            time.sleep(1)
    return real_find(self, query)

StateManager.find = find
sys.exit(daemon.run(store, mnt, ready=lambda: gate.with_suffix(".ready").touch()))
"""

_ASK = "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.write(fd, b'find has:hang'); " \
       "os.read(fd, 4096)"


def test_a_stop_ends_the_daemon_while_a_query_thread_still_runs():
    """Trio cannot cancel a worker thread, so a query still running kept a stopped daemon
    (and its stop) waiting for as long as the query ran, the aborted connection or not. Now
    the process exits once the connection is aborted and no state change runs: no FUSE mount
    stays and fsck finds the store clean. The grace is shortened here; the 60 s is the wait
    for something bounded to happen, no speed target."""
    with cascow_base() as base:
        fs = Cascow(base)
        gate = base / "gate"
        askers: list[subprocess.Popen] = []
        try:
            fs.proc = subprocess.Popen(
                [sys.executable, "-c", _HANGING_QUERY_DAEMON, str(fs.store), str(fs.mnt),
                 str(fs.log), str(gate)], cwd=REPO, start_new_session=True)
            _wait_for_path(gate.with_suffix(".ready"), fs.proc)
            _import_one(fs, "base")
            assert fs.ctl("label base reward=1")[0] == 0
            askers = [subprocess.Popen([sys.executable, "-c", _ASK, str(fs.mnt / "ctl")],
                                       stderr=subprocess.DEVNULL) for _ in range(3)]
            _wait_for_path(gate.with_suffix(".querying"), fs.proc)
            os.kill(fs.proc.pid, signal.SIGTERM)
            assert fs.proc.wait(timeout=60) == 0
            log = fs.log.read_text()
            assert "aborting its connection" in log and "exiting without them" in log
            assert "aborting the FUSE connection failed" not in log
            assert [m for m in mounts_under(base) if m[1].startswith("fuse")] == []
            for asker in askers:
                assert asker.wait(timeout=60) != 0  # its answer never came: ENOTCONN
            checked = run_cli("fsck", str(fs.store), check=False)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            fs.start()  # the same store serves again, with what the stop left
            assert fs.ctl("find reward=1") == (0, "ok base")
            fs.stop()
        finally:
            for asker in askers:
                asker.kill()
            fs.teardown()
