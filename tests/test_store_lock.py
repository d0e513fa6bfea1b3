"""The store lock: one StateManager per store, and a restart right after a kill -9 is not
refused because the dead daemon's forked workers still hold the lock for a moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cascowfs.errors import StoreLockedError
from cascowfs.state import ORPHANED_LOCK_WAIT_SECONDS, StateManager
from conftest import open_store

# A holder that takes the lock, records its pid as StateManager.open does, and forks a child
# that keeps the lock's open file for ``argv[2]`` seconds (a worker that outlives its parent).
_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    child = os.fork()
    if child == 0:
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print("locked", child, flush=True)
    time.sleep(600)
""")


def _start_holder(store, orphan_seconds: float) -> tuple[subprocess.Popen, int]:
    """The holder and the pid of its lock-holding child."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store / "lock"),
                             str(orphan_seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    return proc, int(child)


def _new_store(store) -> None:
    with open_store(store):
        pass


def test_a_live_holder_keeps_the_store_locked(store):
    _new_store(store)
    holder, _ = _start_holder(store, 0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            StateManager.open(store)
        assert time.monotonic() - started < ORPHANED_LOCK_WAIT_SECONDS  # no wait for the living
    finally:
        holder.kill()
        holder.wait()


def test_an_open_waits_out_the_lock_a_killed_holder_left_to_its_child(store):
    _new_store(store)
    holder, _ = _start_holder(store, 1.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()  # dead, while its child still holds the lock's open file for a second
    with open_store(store) as sm:
        assert sm.snapshots() == []


def test_a_dead_holders_child_that_never_lets_go_is_reported(store):
    _new_store(store)
    holder, child = _start_holder(store, ORPHANED_LOCK_WAIT_SECONDS + 30)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    try:
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            StateManager.open(store)
    finally:
        os.kill(child, signal.SIGKILL)
