"""cascowfs and its peers behind one interface (``System``): branch, commit, discard, prune.

cascowfs is driven only through the files of a mounted store: ``cascowfs mount STORE MNT
--background``, commands written to ``MNT/ctl``, work in the tree a branch's reply names,
``cascowfs umount MNT --branches``. The peers: bare overlayfs (the floor: mount(2) of a layer
chain), btrfs subvolume snapshots, git worktrees, ``cp -a``. Each system lives on a fresh
scratch filesystem of its own (``system_on_scratch``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from cascowfs.forks import process_gone
from tools import benchfs

from .host import MNT_DETACH, VENV_BIN, du_bytes, fs_used, log, run, sys_mount, sys_umount

CASCOWFS = str(VENV_BIN / "cascowfs") if (VENV_BIN / "cascowfs").exists() else "cascowfs"


class System:
    """One way of keeping branch/snapshot trees. Snapshot "base" is the imported corpus."""

    name = "?"
    label = "?"
    fstype = "ext4"
    slow = False  # replays only a prefix of the script (--slow-ops)
    # labels after commit and reset: cascowfs only; the others replay the same script without
    # the label ops, and roll a branch back by discarding it and branching afresh
    episodes = False

    @classmethod
    def unavailable(cls) -> str | None:
        return benchfs.available(cls.fstype)

    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self) -> None:
        """Whatever must run before the system can take its import (a daemon); not timed with
        the import, since a started system imports many trees, and the start has its own
        figure (the mount times of the growth run)."""

    def setup(self, src: Path) -> None: ...
    def branch(self, name: str, parent: str) -> str:  # returns the working tree path
        raise NotImplementedError

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None: ...
    def discard(self, name: str) -> None: ...
    def prune(self, sid: str) -> None: ...
    def set_labels(self, sid: str, labels: dict[str, str]) -> None:
        raise NotImplementedError

    def reset(self, name: str, parent: str) -> None:
        raise NotImplementedError

    def snapshot_path(self, sid: str) -> str | None:
        return None

    def agent_init(self, agent: int) -> None: ...
    def storage(self) -> int:
        return du_bytes(self.root)

    def close(self) -> None: ...


class CascowSystem(System):
    name = "cascowfs"
    label = "cascowfs (file interface)"
    episodes = True

    @classmethod
    def unavailable(cls) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        return benchfs.available("ext4")

    # one open of ctl per agent, kept (``--ctl-open per-agent``), or one per command
    ctl_per_agent = True

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.store = root / "store"
        self.mnt = root / "mnt"
        self.store.mkdir()
        self.mnt.mkdir()
        self.ctl = str(self.mnt / "ctl")
        self.mounted = False
        self.ctl_fd: int | None = None  # an agent's own open of ctl (ctl_per_agent)
        self.label_fd: int | None = None  # and its write-only one, for labels

    def mount(self) -> float:
        t0 = time.perf_counter()
        run(
            CASCOWFS,
            "mount",
            self.store,
            self.mnt,
            "--background",
            "--log-file",
            self.root / "daemon.log",
        )
        os.stat(self.ctl)
        self.mounted = True
        return time.perf_counter() - t0

    def imaged_from_source(self) -> bool:
        """Whether the daemon logged an import whose layer image mkfs.erofs wrote straight
        from the source (no mirror directory first)."""
        log_file = self.root / "daemon.log"
        return log_file.exists() and "image was written from the source" in log_file.read_text(
            errors="replace"
        )

    def umount(self, branches: bool = True) -> None:
        """``cascowfs umount``; if it fails, the daemon still gets to exit before this
        returns (``_stop_daemon``): the scratch filesystem can go then."""
        if self.mounted:
            pid = None
            with contextlib.suppress(OSError, ValueError):
                pid = self.daemon_pid()
            args = [CASCOWFS, "umount", str(self.mnt)] + (["--branches"] if branches else [])
            try:
                run(*args)
            except RuntimeError:
                if pid is not None:
                    _stop_daemon(pid)
                raise
            self.mounted = False

    def daemon_pid(self) -> int:
        return int(os.getxattr(self.mnt, "user.cascowfs.pid"))

    def agent_init(self, agent: int) -> None:
        if self.ctl_per_agent:  # one open of ctl per agent, kept for the whole run
            self.ctl_fd = os.open(self.ctl, os.O_RDWR)
            self.label_fd = os.open(self.ctl, os.O_WRONLY)

    def cmd(self, line: str) -> str:
        """One command through ``ctl``, its reply read back from the same open file (``ok`` and
        the result): the agent's own open (``--ctl-open per-agent``) or a fresh one. Every
        operation but ``label`` goes this way: each open of ``ctl`` gets a lane of its own
        (docs/interface.md), so the agents' commands run side by side, while the namespace calls
        (``rmdir`` in ``branches/``, a first lookup of ``branches/N/commit``) queue behind each
        other on those directories' locks."""
        fd = self.ctl_fd if self.ctl_fd is not None else os.open(self.ctl, os.O_RDWR)
        try:
            os.write(fd, line.encode() + b"\n")
            reply = os.read(fd, 4096).decode()
        finally:
            if fd != self.ctl_fd:
                os.close(fd)
        if reply != "ok\n" and not reply.startswith("ok "):
            raise RuntimeError(f"{line}: unexpected reply {reply!r}")
        return reply[3:].rstrip("\n")

    def start(self) -> None:
        if not self.mounted:
            self.mount()

    def setup(self, src: Path) -> None:
        self.start()
        self.cmd(f"import base {src}")

    def branch(self, name: str, parent: str) -> str:
        return self.cmd(f"branch {name} {parent}")  # the reply is the working tree's path

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None:
        self.cmd(" ".join(["commit", name, sid] + [f"{k}={v}" for k, v in labels.items()]))

    def discard(self, name: str) -> None:
        self.cmd(f"discard {name}")

    def prune(self, sid: str) -> None:
        self.cmd(f"prune {sid}")

    def set_labels(self, sid: str, labels: dict[str, str]) -> None:
        """Back-propagation as docs/interface.md advises it: a label whose write returns is
        done and durable, so it goes through a write-only open of ``ctl``, which keeps no
        replies, and costs no read of one (``cascowfs.Client.label`` does the same)."""
        line = " ".join(["label", sid] + [f"{k}={v}" for k, v in labels.items()])
        fd = self.label_fd if self.label_fd is not None else os.open(self.ctl, os.O_WRONLY)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            if fd != self.label_fd:
                os.close(fd)

    def reset(self, name: str, parent: str) -> None:
        self.cmd(f"reset {name} {parent}")

    def find(self, query: str) -> list[str]:
        return self.cmd(f"find {query}").split()

    def snapshot_path(self, sid: str) -> str:
        return str(self.mnt / "snapshots" / sid)

    def storage(self) -> int:
        return du_bytes(self.store)

    def close(self) -> None:
        try:
            self.umount(branches=True)
        except Exception as exc:  # noqa: BLE001
            log(f"cascowfs umount failed: {exc}; detaching lazily")
            benchfs.detach_all_below(self.root)
            with contextlib.suppress(Exception):
                sys_umount(str(self.mnt), MNT_DETACH)


# How long a daemon that failed to unmount in time gets to finish its shutdown on its own,
# then after SIGTERM: the scratch filesystem and its loop device go only once it has exited.
DAEMON_GRACE_S = 300.0
DAEMON_TERM_S = 30.0


def _stop_daemon(pid: int) -> None:
    """Wait for daemon ``pid`` to exit; SIGTERM it after ``DAEMON_GRACE_S``, SIGKILL it
    (crash-safe: the next mount replays its log) only if that does not end it either."""
    for sig, wait_s in (
        (None, DAEMON_GRACE_S),
        (signal.SIGTERM, DAEMON_TERM_S),
        (signal.SIGKILL, DAEMON_TERM_S),
    ):
        if sig is not None:
            log(f"cascowfs daemon {pid} still running: sending {sig.name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if process_gone(pid):
                return
            time.sleep(0.1)
    log(f"cascowfs daemon {pid} did not exit")


class OverlayFloor(System):
    """Bare overlayfs: mount(2)/umount2(2) of the snapshot's layer chain. Commit copies the
    upper into a new layer (cp -a; no CAS, no WAL, no dedup) so the mix can go on."""

    name = "overlay"
    label = "bare overlayfs (floor)"
    MAX_CHAIN = 400

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.L = root / "L"
        self.B = root / "B"
        self.L.mkdir()
        self.B.mkdir()
        self.chain: dict[str, list[str]] = {}
        self.bchain: dict[str, list[str]] = {}
        self.refs: dict[str, int] = {}

    def _ref(self, chain: list[str], d: int) -> list[str]:
        freed = []
        for layer in chain:
            self.refs[layer] = self.refs.get(layer, 0) + d
            if self.refs[layer] == 0:
                del self.refs[layer]
                freed.append(layer)
        return freed

    def setup(self, src: Path) -> None:
        run("cp", "-a", f"{src}/.", self.L / "base")
        self.chain["base"] = ["base"]
        self._ref(["base"], 1)
        os.sync()

    def agent_init(self, agent: int) -> None:
        os.chdir(self.L)  # relative lowerdir names keep the option string under 4 KiB

    def branch(self, name: str, parent: str) -> str:
        b = self.B / name
        b.mkdir()
        (b / "u").mkdir()
        (b / "w").mkdir()
        (b / "m").mkdir()
        chain = self.chain[parent]
        sys_mount(
            "overlay",
            str(b / "m"),
            "overlay",
            f"lowerdir={':'.join(chain)},upperdir={b}/u,workdir={b}/w,volatile",
        )
        self.bchain[name] = chain
        self._ref(chain, 1)
        return str(b / "m")

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None:
        b = self.B / name
        chain = self.bchain[name]
        if len(chain) >= self.MAX_CHAIN:  # flatten: copy the merged view
            run("cp", "-a", f"{b}/m/.", self.L / sid)
            new = [sid]
        else:
            run("cp", "-a", f"{b}/u", self.L / sid)
            new = [sid] + chain
        self.chain[sid] = new
        self._ref(new, 1)

    def discard(self, name: str) -> None:
        b = self.B / name
        sys_umount(str(b / "m"))
        shutil.rmtree(b)
        for layer in self._ref(self.bchain.pop(name), -1):
            shutil.rmtree(self.L / layer)

    def prune(self, sid: str) -> None:
        for layer in self._ref(self.chain.pop(sid), -1):
            shutil.rmtree(self.L / layer)

    def snapshot_path(self, sid: str) -> str | None:
        return str(self.L / sid) if self.chain.get(sid) == [sid] else None

    def close(self) -> None:
        benchfs.detach_all_below(self.root)


class CopySystem(System):
    name = "cp"
    label = "cp -a / rm -rf"
    slow = True

    def setup(self, src: Path) -> None:
        (self.root / "S").mkdir()
        (self.root / "B").mkdir()
        run("cp", "-a", f"{src}/.", self.root / "S" / "base")
        os.sync()

    def branch(self, name: str, parent: str) -> str:
        run("cp", "-a", self.root / "S" / parent, self.root / "B" / name)
        return str(self.root / "B" / name)

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None:
        run("cp", "-a", self.root / "B" / name, self.root / "S" / sid)

    def discard(self, name: str) -> None:
        run("rm", "-rf", self.root / "B" / name)

    def prune(self, sid: str) -> None:
        run("rm", "-rf", self.root / "S" / sid)

    def snapshot_path(self, sid: str) -> str:
        return str(self.root / "S" / sid)


class GitSystem(System):
    name = "git"
    label = "git worktree add / add -A -f + commit / worktree remove"
    slow = True

    @classmethod
    def unavailable(cls) -> str | None:
        return "git not installed" if not shutil.which("git") else benchfs.available("ext4")

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.repo = root / "repo"
        self.wt = root / "wt"
        self.sha: dict[str, str] = {}
        self.env = dict(
            os.environ,
            GIT_AUTHOR_NAME="bench",
            GIT_AUTHOR_EMAIL="b@x",
            GIT_COMMITTER_NAME="bench",
            GIT_COMMITTER_EMAIL="b@x",
            GIT_CONFIG_NOSYSTEM="1",
            HOME=str(root),
        )

    def git(self, *args: str | os.PathLike[str], cwd: Path | str | None = None) -> str:
        return run("git", *args, cwd=cwd or self.repo, env=self.env)

    def setup(self, src: Path) -> None:
        run("cp", "-a", f"{src}/.", self.repo)
        self.wt.mkdir()
        self.git("init", "-q")
        self.git("config", "gc.auto", "0")
        # -f: a snapshot holds every file, as with the other systems, even where the tree's
        # own .gitignore says otherwise (Debian's linux-source ignores "/*").
        self.git("add", "-A", "-f")
        self.git("commit", "-q", "-m", "base")
        self.sha["base"] = self.git("rev-parse", "HEAD").strip()
        self.git("update-ref", "refs/snap/base", self.sha["base"])
        os.sync()

    def branch(self, name: str, parent: str) -> str:
        sha = self.sha.get(parent) or self.git("rev-parse", f"refs/snap/{parent}").strip()
        self.git("worktree", "add", "-q", "--detach", self.wt / name, sha)
        return str(self.wt / name)

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None:
        w = self.wt / name
        self.git("add", "-A", "-f", cwd=w)
        self.git("commit", "-q", "--allow-empty", "-m", sid, cwd=w)
        self.git("update-ref", f"refs/snap/{sid}", "HEAD", cwd=w)
        self.sha[sid] = self.git("rev-parse", "HEAD", cwd=w).strip()

    def discard(self, name: str) -> None:
        self.git("worktree", "remove", "--force", self.wt / name)

    def prune(self, sid: str) -> None:
        self.git("update-ref", "-d", f"refs/snap/{sid}")
        self.sha.pop(sid, None)


class BtrfsSystem(System):
    name = "btrfs"
    label = "btrfs subvolume snapshot / snapshot -r / delete"
    fstype = "btrfs"

    baseline = 0

    def setup(self, src: Path) -> None:
        self.baseline = fs_used(self.root)  # whatever else is on the fs (the src copy)
        (self.root / "snap").mkdir()
        (self.root / "br").mkdir()
        run("btrfs", "-q", "subvolume", "create", self.root / "import")
        # --reflink=never: a real copy, as every other system makes (cp would otherwise clone
        # the extents of src/ on the same btrfs, and import would cost nothing).
        run("cp", "-a", "--reflink=never", f"{src}/.", self.root / "import")
        run(
            "btrfs",
            "-q",
            "subvolume",
            "snapshot",
            "-r",
            self.root / "import",
            self.root / "snap" / "base",
        )
        run("btrfs", "-q", "subvolume", "delete", self.root / "import")
        os.sync()

    def branch(self, name: str, parent: str) -> str:
        run(
            "btrfs",
            "-q",
            "subvolume",
            "snapshot",
            self.root / "snap" / parent,
            self.root / "br" / name,
        )
        return str(self.root / "br" / name)

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None:
        run(
            "btrfs",
            "-q",
            "subvolume",
            "snapshot",
            "-r",
            self.root / "br" / name,
            self.root / "snap" / sid,
        )

    def discard(self, name: str) -> None:
        run("btrfs", "-q", "subvolume", "delete", self.root / "br" / name)

    def prune(self, sid: str) -> None:
        run("btrfs", "-q", "subvolume", "delete", self.root / "snap" / sid)

    def snapshot_path(self, sid: str) -> str:
        return str(self.root / "snap" / sid)

    def storage(self) -> int:
        """Filesystem blocks used beyond what was there before setup (extents are shared
        between snapshots, so a directory walk would count them many times)."""
        return fs_used(self.root) - self.baseline


SYSTEMS: dict[str, type[System]] = {
    c.name: c for c in (CascowSystem, OverlayFloor, BtrfsSystem, GitSystem, CopySystem)
}


@contextlib.contextmanager
def system_on_scratch(
    cls: type[System], label: str, size: int
) -> Iterator[tuple[System, Path, dict]]:
    """A fresh scratch filesystem of ``size`` bytes, and the system on it."""
    with benchfs.scratch_fs(cls.fstype, size=size, label=label) as fsroot:
        sysroot = fsroot / cls.name
        sysroot.mkdir()
        system = cls(sysroot)
        try:
            yield system, fsroot, benchfs.fs_description(fsroot)
        finally:
            system.close()
