"""Child processes: running the engine in a child that may be killed, finding leftovers.

``run_child(code, *args, crash_at=None)``  ``python -c code args`` with ``CASCOWFS_CRASH_AT``
``child_env(crash_at=None)``                the environment such a child gets
``run_until_killed(code, args, meanwhile)`` a child run until SIGKILL once it printed "open"
``read_first_line(proc)``                   a child's first line, nothing after it taken
``descendant_processes(pid)``               (pid, state, command) of live descendants of ``pid``
``alive(pid)``                               whether ``pid`` runs (exists and is no zombie)
``processes_mentioning(text)``            pids (not ours) whose command line holds ``text``
``other_pytest_running()``                  whether a pytest not started by this one runs
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def child_env(crash_at: str | None = None) -> dict[str, str]:
    """The environment for a child process: ours, armed at ``crash_at`` (or at nothing)."""
    from cascowfs.crashpoints import ENV_VAR

    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if crash_at:
        env[ENV_VAR] = crash_at
    return env


def run_child(code: str, *args: str, crash_at: str | None = None, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    """Run ``python -c code args...`` (cwd: the repo), optionally armed to SIGKILL itself at a
    crash point; returns the finished process (never leaves it running)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                          env=child_env(crash_at), capture_output=True, text=True, timeout=timeout)


def run_until_killed(code: str, args: list[str], meanwhile: Callable[[], None]) -> str:
    """Run ``python -c code args...``; once it has printed "open", call ``meanwhile`` (it
    waits, it may fail the disk under the child), then SIGKILL the child. The child must still
    have been running and must not have printed a traceback. Returns all it printed after
    "open"."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_first_line(proc).strip() == "open", proc.stderr.read()
        meanwhile()
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the child died before it was killed:\n{err}"
    assert "Traceback" not in err, err
    return out


def read_first_line(proc: subprocess.Popen) -> str:
    """The first line ``proc`` writes to its stdout pipe, read a byte at a time.
    ``proc.stdout.readline()`` would read ahead whatever else the pipe holds, and
    ``communicate()``, which reads the pipe itself, would never return those lines."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode()


def descendant_processes(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command) of every live (non-zombie) descendant of ``pid``."""
    parent_of: dict[int, int] = {}
    info: dict[int, tuple[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parent_of[int(entry)] = int(rest[1])
        info[int(entry)] = (rest[0], cmd)
    out = []
    for p, state_cmd in info.items():
        q = parent_of.get(p)
        while q is not None and q not in (0, 1, pid):
            q = parent_of.get(q)
        if q == pid and state_cmd[0] != "Z":
            out.append((p, *state_cmd))
    return out


def other_pytest_running() -> bool:
    me = os.getpid()
    mine = {p for p, _, _ in descendant_processes(me)} | {me}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"pytest" in cmd:
            return True
    return False


def processes_mentioning(text: str) -> list[int]:
    """Pids (other than ours) whose command line contains ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
