"""Helpers for tests that mount cascowfs for real (a daemon on /dev/fuse, as root).

Every mount lives under its own world-traversable temporary directory (so that tests can also
act as an unprivileged user), is started as a real daemon subprocess that must report
``READY=1`` over a ``NOTIFY_SOCKET`` exactly like under systemd, and is torn down in ``finally``:
``cascowfs umount --branches``, then whatever is left is killed and lazily unmounted, and the
teardown *asserts* that no fuse/overlay mount under the directory and no daemon process remain.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterator

from support.mounts import lazy_umount, mounts_under
from support.processes import REPO, processes_mentioning

PYTHON = sys.executable
CLI = [PYTHON, "-m", "cascowfs"]
READY_TIMEOUT = 60.0


def run_cli(*args: str, check: bool = True, timeout: float = 120,
            env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"cascowfs {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


class NotifySocket:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, word: str, timeout: float, alive: "subprocess.Popen | None" = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.05)
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                if alive is not None and alive.poll() is not None:
                    raise AssertionError(f"daemon exited with {alive.returncode} before {word}")
                continue
            self.messages.append(msg)
            if word in msg.split("\n"):
                return msg
        raise AssertionError(f"no {word} within {timeout}s (got {self.messages})")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class Cascow:
    """One store and one mount point, and the daemon serving them.

    ``views``: how the daemon serves ``snapshots/<id>/`` (``CASCOWFS_SNAPSHOT_VIEWS``).
    "fuse" by default, so that a test sees the daemon's own view whenever it looks (kernel
    views attach asynchronously after a first access); "kernel" for tests of those views.
    ``view_idle``: seconds between two rounds of the views' idle expiry."""

    def __init__(self, base: Path, *, views: str = "fuse", view_idle: float | None = None) -> None:
        self.base = base
        self.views = views
        self.view_idle = view_idle
        self.store = base / "store"
        self.mnt = base / "mnt"
        self.log = base / "daemon.log"
        self.mnt.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.notify: NotifySocket | None = None

    # -- daemon ----------------------------------------------------------------------------
    def start(self, *extra: str) -> None:
        """Start a foreground daemon and wait for its sd_notify READY=1."""
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        if self.notify is None:
            self.notify = NotifySocket(self.base / "notify.sock")
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path),
                   CASCOWFS_SNAPSHOT_VIEWS=self.views)
        if self.view_idle is not None:
            env["CASCOWFS_SNAPSHOT_VIEWS_IDLE"] = str(self.view_idle)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*CLI, "mount", str(self.store), str(self.mnt), "--log-file", str(self.log), *extra],
            cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        try:
            self.notify.wait_for("READY=1", READY_TIMEOUT, alive=self.proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.log_text()}") from None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, *, branches: bool = False, timeout: float = 60) -> None:
        """``cascowfs umount`` (the supported way); asserts the daemon exited cleanly."""
        args = ["umount", str(self.mnt)] + (["--branches"] if branches else [])
        run_cli(*args, timeout=timeout)
        if self.proc is not None:
            rc = self.proc.wait(timeout=timeout)
            assert rc == 0, f"daemon exited with {rc}\n{self.log_text()}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- shell -----------------------------------------------------------------------------
    def sh(self, script: str, *, check: bool = True, user: int | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a bash script with $MNT, $STORE and $BASE set; cwd is the base directory."""
        env = dict(os.environ, MNT=str(self.mnt), STORE=str(self.store), BASE=str(self.base),
                   LC_ALL="C.UTF-8")
        kwargs: dict = {}
        if user is not None:
            kwargs.update(user=user, group=user, extra_groups=[])
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.base, env=env,
                              capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"shell failed ({proc.returncode}):\n{script}\n--- stdout ---\n"
                                 f"{proc.stdout}\n--- stderr ---\n{proc.stderr}\n--- daemon ---\n"
                                 f"{self.log_text()[-4000:]}")
        return proc

    def ctl(self, line: str) -> tuple[int, str]:
        """One ctl command on a fresh open file: (errno or 0, reply line)."""
        fd = os.open(self.mnt / "ctl", os.O_RDWR)
        try:
            try:
                os.write(fd, line.encode() if isinstance(line, str) else line)
                code = 0
            except OSError as exc:
                code = exc.errno or errno.EIO
            return code, os.read(fd, 65536).decode(errors="replace").strip()
        finally:
            os.close(fd)

    # -- teardown --------------------------------------------------------------------------
    def teardown(self) -> None:
        problems = []
        try:
            if self.running:
                try:
                    self.stop(branches=True, timeout=60)
                except Exception as exc:  # still clean up below, then report
                    problems.append(f"cascowfs umount --branches failed: {exc}")
            else:
                # the daemon is gone (killed by the test): its dead FUSE mount may remain,
                # and branch overlays do by design; unmount them the supported way
                for point, fstype in mounts_under(self.base):
                    if fstype == "fuse.cascowfs":
                        lazy_umount(point)
                if any(t in ("overlay", "erofs") for _, t in mounts_under(self.base)):
                    try:
                        from cascowfs.state import StateManager

                        StateManager.open(self.store).close(unmount_branches=True)
                    except Exception as exc:
                        problems.append(f"unmounting branches failed: {exc}")
        finally:
            leaked_procs = processes_mentioning(str(self.store))
            for pid in leaked_procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=30)
            leaked_mounts = mounts_under(self.base)
            for point, _ in sorted(leaked_mounts, reverse=True):
                lazy_umount(point)
            if self.notify is not None:
                self.notify.close()
        if leaked_procs:
            problems.append(f"daemon processes left: {leaked_procs}")
        if leaked_mounts:
            problems.append(f"mounts left: {leaked_mounts}")
        if problems:
            raise AssertionError("; ".join(problems) + f"\n--- daemon log ---\n{self.log_text()}")


@contextlib.contextmanager
def cascow_base() -> Iterator[Path]:
    """A fresh directory under /tmp that every user may traverse (for EPERM tests)."""
    base = Path(tempfile.mkdtemp(prefix="cascowfs-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def mounted(*extra: str, populate=None, **options) -> Iterator[Cascow]:
    """A running daemon over a fresh store; ``populate(store)`` may fill it offline first;
    ``options`` go to ``Cascow``."""
    with cascow_base() as base:
        fs = Cascow(base, **options)
        try:
            if populate is not None:
                populate(fs)
            fs.start(*extra)
            yield fs
        finally:
            fs.teardown()


def make_source_tree(dest: Path, *, stdlib_slice: int = 60) -> Path:
    """A real source tree: a slice of the installed Python stdlib plus the awkward cases."""
    dest.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email", "asyncio")[: max(1, stdlib_slice // 20)]:
        shutil.copytree(stdlib / name, dest / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in sorted(os.listdir(stdlib))[:stdlib_slice]:
        src = stdlib / name
        if src.is_file() and not src.is_symlink():
            shutil.copy2(src, dest / name)
    return dest


def tree_listing(root: Path) -> list[tuple[str, int, int, int, int]]:
    """(path, mode, uid, gid, mtime_ns) of every entry (symlinks not followed), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            out.append((rel, st.st_mode, st.st_uid, st.st_gid,
                        0 if os.path.isdir(path) and not path.is_symlink() else st.st_mtime_ns))
    return sorted(out)
