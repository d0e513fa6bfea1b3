"""cascowfs/forks.py: descriptors a forked child must not keep (the store lock, the FUSE
channel), and children that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from support.processes import REPO, alive, child_env
from cascowfs import forks


def _fork_and_check_open(fd: int) -> bool:
    """Whether a child forked now still has ``fd`` open."""
    pid = os.fork()
    if pid == 0:  # the child only looks: it must not run any of pytest's code
        try:
            os.fstat(fd)
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_marked_descriptors_are_closed_in_children_until_forgotten():
    r, w = os.pipe()
    try:
        assert _fork_and_check_open(r) and _fork_and_check_open(w)
        forks.close_in_children(r)
        try:
            assert not _fork_and_check_open(r), "a child kept a descriptor marked for closing"
            assert _fork_and_check_open(w), "a child lost a descriptor not marked"
            os.fstat(r)  # the parent keeps it
        finally:
            forks.forget(r)
        assert _fork_and_check_open(r)
        forks.forget(r)  # forgetting twice is harmless
    finally:
        os.close(r)
        os.close(w)


# A parent that forks a child asking to die with it, prints the child's pid, then waits.
PARENT = """
import os, sys, time
from cascowfs import forks
parent = os.getpid()
pid = os.fork()
if pid == 0:
    forks.die_with_parent(parent)
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
time.sleep(600)
"""


def test_a_child_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(child), f"child {child} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    pid = os.fork()
    if pid == 0:  # names a parent that is not its own: as if it had died before the request
        forks.die_with_parent(os.getpid())
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
