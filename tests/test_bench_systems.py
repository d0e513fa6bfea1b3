"""The benchmark's cascowfs system (``tools/bench/systems.py``): a daemon that outlives a
failed ``cascowfs umount`` is waited for, then signalled, before the scratch filesystem under
it goes (torn down under a live daemon, its loop device would stay attached)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cascowfs.forks import process_gone
from tools.bench import systems

# a process that ends at once on SIGTERM, and one that ignores it
ENDS_ON_TERM = "import time; time.sleep(600)"
IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
    "print('ready', flush=True); time.sleep(600)"


@pytest.mark.parametrize("script", [ENDS_ON_TERM, IGNORES_TERM])
def test_a_daemon_still_running_is_signalled_until_it_exits(monkeypatch, script):
    monkeypatch.setattr(systems, "DAEMON_GRACE_S", 0.2)
    monkeypatch.setattr(systems, "DAEMON_TERM_S", 0.5)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        if script == IGNORES_TERM:
            child.stdout.readline()  # its handler is in place
        systems._stop_daemon(child.pid)
        assert process_gone(child.pid)
        assert child.wait(timeout=10) == (-15 if script == ENDS_ON_TERM else -9)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_daemon_that_exits_on_its_own_is_not_signalled(monkeypatch):
    monkeypatch.setattr(systems, "DAEMON_GRACE_S", 30.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        systems._stop_daemon(child.pid)
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        child.wait()
