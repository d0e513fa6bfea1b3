#!/usr/bin/env python3
"""The tree-search benchmark: cascowfs through its file interface, against its peers.

One run = one corpus (``tools/fetch_corpus.py``), on fresh loop-mounted filesystems
(``benchfs.scratch_fs``: a new journaled ext4 for every system, btrfs for the btrfs peer),
sections in this order, each optional:

1. **Single agent** (``--seq-ops``) and **MCTS mix** (``--ops``, ``--agents``), every system
   (``--systems cascowfs,overlay,btrfs,git,cp``), same corpus, same edit scripts: an agent picks
   a snapshot from its frontier, *branches* 2-4 copies, applies an agent-size edit to each (1-5
   small source edits, sometimes a new file, a delete, a rename, rarely a 256 KiB-1 MiB
   generated file; always <= 20 files, <= 1 MiB), *commits* the best one (sometimes two,
   sometimes none), *discards* every branch and *prunes* its oldest snapshots beyond six.
   Decisions and edits come from a per-agent seeded RNG, so every system replays exactly the
   same script (git and cp, slow, replay a prefix: ``--slow-ops``). Agents are processes,
   started together. Reported: P50/P95/P99/max and throughput per op, drift over the run,
   storage used, machine load. ``--profile`` re-runs a mix with py-spy on the daemon.
2. **Read path** (unless ``--no-read-path``): inside a cascowfs branch of the imported tree
   against the plain ext4 copy it was imported from (plus a bare overlay on that copy and the
   FUSE snapshot view): stat walk (``find -printf``), read every file (``find | xargs cat``),
   ``grep -r``, ``python -m compileall``; cold (drop_caches) and warm.
3. **Growth** (``--growth N`` chain: one lineage of N commits; ``--growth-wide N``: N snapshots
   each from base): store size against one copy, sampled along the way, cascowfs and btrfs.
4. **Mount** (``--mount-snapshots S --mount-branches B``): mount time of a store holding S
   snapshots and B live branches, after a clean unmount and after kill -9 (WAL replay).

cascowfs is driven only through the files of a mounted store: ``cascowfs mount STORE MNT
--background``, ``echo "branch NAME ID" > MNT/ctl``, work in ``MNT/branches/NAME/tree``,
``echo "ID reward=..." > MNT/branches/NAME/commit``, ``rmdir MNT/branches/NAME``,
``rmdir MNT/snapshots/ID``, ``cascowfs umount MNT --branches``.

Examples (results as JSON; ``tools/bench_report.py`` turns them into docs/benchmarks.md)::

    .venv/bin/python tools/bench_mcts.py --corpus django --ops 10000 --seq-ops 1000 \
        --slow-ops 400 --growth 1000 --growth-wide 1000 --mount-snapshots 10000 --profile \
        --out bench-results/django.json
    .venv/bin/python tools/bench_mcts.py --corpus synthetic --ops 40 --agents 2   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchfs  # noqa: E402
import fetch_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CASCOWFS = str(VENV_BIN / "cascowfs") if (VENV_BIN / "cascowfs").exists() else "cascowfs"
OPS = ("branch", "commit", "discard", "prune")
SCRATCH_BYTES = benchfs.DEFAULT_SIZE
CTL_PER_AGENT = True  # --ctl-open


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None,
        env: dict | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}: "
                           f"{(r.stderr.strip() or r.stdout.strip())[-500:]}")
    return r.stdout


def _same_dev(path: str, dev: int) -> bool:
    """False for another filesystem, and for what the store's background work (layer merges,
    the trash) removed while we walked."""
    try:
        return os.lstat(path).st_dev == dev
    except FileNotFoundError:
        return False


def du_bytes(path: str | os.PathLike[str]) -> int:
    """Allocated bytes (st_blocks) below path, hard links counted once, sparse files honest."""
    seen: set[tuple[int, int]] = set()
    total = 0
    dev = os.lstat(path).st_dev
    for dirpath, dirnames, filenames in os.walk(path):
        # never cross into another filesystem: a live branch's overlay mount point sits
        # inside the store and would count the whole merged tree again
        dirnames[:] = [d for d in dirnames if _same_dev(os.path.join(dirpath, d), dev)]
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
    return total


def fs_used(path: str | os.PathLike[str]) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# -- the edit script --------------------------------------------------------------------------
def corpus_files(tree: Path) -> list[str]:
    """Regular text-ish files up to 64 KiB, relative, sorted: the candidates for edits."""
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not os.path.isfile(p) or os.path.islink(p) or not 0 < st.st_size <= 65536:
                continue
            if n.endswith((".py", ".c", ".h", ".txt", ".html", ".js", ".css", ".rst", ".S",
                           ".sh", ".json", "Makefile", "Kconfig", ".po")):
                out.append(os.path.relpath(p, tree))
    return sorted(out)


class EditScript:
    """Deterministic agent-size edits over a hot set of the corpus's files."""

    def __init__(self, files: list[str], agent: int, seed: int) -> None:
        pick = random.Random(seed)  # same hot set for every agent: they work on one repo
        self.hot = pick.sample(files, min(len(files), 200)) if files else []
        self.agent = agent
        self.k = 0

    def next(self, rng: random.Random) -> list[tuple]:
        acts: list[tuple] = []
        budget = 1 << 20
        for _ in range(rng.randint(1, 5)):
            acts.append(("modify", rng.choice(self.hot), rng.random(),
                         f"# agent {self.agent} edit {self.k} value={rng.randrange(10**6)}\n"))
        if rng.random() < 0.3:
            d = os.path.dirname(rng.choice(self.hot))
            size = rng.randint(500, 8000)
            acts.append(("create", os.path.join(d, f"gen_a{self.agent}_{self.k}.py"), size,
                         rng.randrange(1 << 30)))
            budget -= size
        if rng.random() < 0.1:
            acts.append(("delete", rng.choice(self.hot)))
        if rng.random() < 0.1:
            src = rng.choice(self.hot)
            acts.append(("rename", src, src + f".r{self.agent}_{self.k}"))
        if rng.random() < 0.03:
            size = rng.randint(256 << 10, min(budget - 64 << 10, 1 << 20) - 1)
            acts.append(("big", f"generated_a{self.agent}_{self.k}.dat", size,
                         rng.randrange(1 << 30)))
        self.k += 1
        return acts

    @staticmethod
    def apply(root: str, acts: list[tuple]) -> int:
        """Apply to the tree at root; returns the bytes written. Files missing in this lineage
        (deleted or renamed by an ancestor) are skipped."""
        written = 0
        for act in acts:
            kind, rel = act[0], act[1]
            p = os.path.join(root, rel)
            try:
                if kind == "modify":
                    with open(p, "rb") as f:
                        data = f.read()
                    pos = data.find(b"\n", int(len(data) * act[2]))
                    pos = len(data) if pos < 0 else pos + 1
                    data = data[:pos] + act[3].encode() + data[pos:]
                    with open(p, "wb") as f:
                        f.write(data)
                    written += len(data)
                elif kind == "create":
                    r = random.Random(act[3])
                    body = "".join(f"def f{i}(x):\n    return x + {r.randrange(1000)}\n"
                                   for i in range(act[2] // 40))
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    with open(p, "w") as f:
                        f.write(body)
                    written += len(body)
                elif kind == "delete":
                    os.unlink(p)
                elif kind == "rename":
                    os.rename(p, os.path.join(root, act[2]))
                elif kind == "big":
                    r = random.Random(act[3])
                    body = r.randbytes(act[2] // 2).hex().encode()
                    with open(p, "wb") as f:
                        f.write(body)
                    written += len(body)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                pass
        return written


# -- systems ----------------------------------------------------------------------------------
class System:
    """One way of keeping branch/snapshot trees. Snapshot "base" is the imported corpus."""

    name = "?"
    label = "?"
    fstype = "ext4"
    slow = False  # replays only a prefix of the script (--slow-ops)

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
    def branch(self, name: str, parent: str) -> str: ...  # returns the working tree path
    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None: ...
    def discard(self, name: str) -> None: ...
    def prune(self, sid: str) -> None: ...
    def snapshot_path(self, sid: str) -> str | None: return None
    def agent_init(self, agent: int) -> None: ...
    def storage(self) -> int: return du_bytes(self.root)
    def close(self) -> None: ...


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


def sys_mount(src: str, target: str, fstype: str, opts: str) -> None:
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), 0, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} {target} ({opts[:200]}): {os.strerror(e)}")


def sys_umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")


class CascowSystem(System):
    name = "cascowfs"
    label = "cascowfs (file interface)"

    @classmethod
    def unavailable(cls) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        return benchfs.available("ext4")

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.store = root / "store"
        self.mnt = root / "mnt"
        self.store.mkdir()
        self.mnt.mkdir()
        self.ctl = str(self.mnt / "ctl")
        self.mounted = False
        self.ctl_fd: int | None = None  # an agent's own open of ctl (CTL_PER_AGENT)

    def mount(self) -> float:
        t0 = time.perf_counter()
        run(CASCOWFS, "mount", self.store, self.mnt, "--background",
            "--log-file", self.root / "daemon.log")
        os.stat(self.ctl)
        self.mounted = True
        return time.perf_counter() - t0

    def umount(self, branches: bool = True) -> None:
        if self.mounted:
            args = [CASCOWFS, "umount", self.mnt] + (["--branches"] if branches else [])
            run(*args)
            self.mounted = False

    def daemon_pid(self) -> int:
        return int(os.getxattr(self.mnt, "user.cascowfs.pid"))

    def agent_init(self, agent: int) -> None:
        if CTL_PER_AGENT:  # as cascowfs.client.Client does: one open of ctl, kept
            self.ctl_fd = os.open(self.ctl, os.O_RDWR)

    def cmd(self, line: str) -> str:
        """One command through ``ctl``, its reply read back from the same open file (``ok`` and
        the result): the agent's own open (``--ctl-open per-agent``) or a fresh one. Every
        operation goes this way: each open of ``ctl`` gets a lane of its own
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
        sys_mount("overlay", str(b / "m"), "overlay",
                  f"lowerdir={':'.join(chain)},upperdir={b}/u,workdir={b}/w,volatile")
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
        self.env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@x",
                        GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@x",
                        GIT_CONFIG_NOSYSTEM="1", HOME=str(root))

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
        run("btrfs", "-q", "subvolume", "snapshot", "-r", self.root / "import",
            self.root / "snap" / "base")
        run("btrfs", "-q", "subvolume", "delete", self.root / "import")
        os.sync()

    def branch(self, name: str, parent: str) -> str:
        run("btrfs", "-q", "subvolume", "snapshot", self.root / "snap" / parent,
            self.root / "br" / name)
        return str(self.root / "br" / name)

    def commit(self, name: str, sid: str, labels: dict[str, str]) -> None:
        run("btrfs", "-q", "subvolume", "snapshot", "-r", self.root / "br" / name,
            self.root / "snap" / sid)

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


SYSTEMS: dict[str, type[System]] = {c.name: c for c in (
    CascowSystem, OverlayFloor, BtrfsSystem, GitSystem, CopySystem)}


@contextlib.contextmanager
def system_on_scratch(cls: type[System], label: str) -> Iterator[tuple[System, Path, dict]]:
    """A fresh scratch filesystem with the corpus copied to <fs>/src, and the system on it."""
    with benchfs.scratch_fs(cls.fstype, size=SCRATCH_BYTES, label=label) as fsroot:
        sysroot = fsroot / cls.name
        sysroot.mkdir()
        system = cls(sysroot)
        try:
            yield system, fsroot, benchfs.fs_description(fsroot)
        finally:
            system.close()


# -- the MCTS mix -----------------------------------------------------------------------------
def agent_loop(system: System, agent: int, nops: int, seed: int, files: list[str],
               barrier: Any, q: Any, tag: str = "", frontier_max: int = 6) -> None:
    recs: list[tuple[str, float, float]] = []  # (op, start, seconds)
    errors: list[str] = []
    edit_s: list[float] = []
    try:
        system.agent_init(agent)
        rng = random.Random(seed * 1009 + agent)
        script = EditScript(files, agent, seed)
        frontier = ["base"]
        owned: list[str] = []
        k = 0
        ops = 0
        barrier.wait()

        def timed(op: str, fn: Callable, *a: Any) -> tuple[bool, Any]:
            nonlocal ops
            ops += 1
            t0 = time.perf_counter()
            try:
                return True, fn(*a)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{op}: {str(exc)[:300]}")
                return False, None
            finally:
                recs.append((op, t0, time.perf_counter() - t0))

        while ops < nops:
            parent = rng.choice(frontier[-4:]) if rng.random() < 0.8 else rng.choice(frontier)
            width = rng.randint(2, 4)
            live = []
            for _ in range(width):
                name = f"{tag}a{agent}b{k}"
                k += 1
                ok, tree = timed("branch", system.branch, name, parent)
                edit = script.next(rng)
                if not ok:
                    continue
                live.append(name)
                t0 = time.perf_counter()
                try:
                    EditScript.apply(tree, edit)
                except OSError as exc:
                    errors.append(f"edit: {exc}")
                edit_s.append(time.perf_counter() - t0)
            r = rng.random()
            keep = 0 if r < 0.2 else (2 if r > 0.85 else 1)
            for name in live[:keep]:
                sid = f"{tag}a{agent}s{k}"
                k += 1
                ok, _ = timed("commit", system.commit, name, sid,
                              {"reward": f"{rng.random():.3f}", "agent": str(agent)})
                if ok:
                    frontier.append(sid)
                    owned.append(sid)
            for name in live:
                timed("discard", system.discard, name)
            while len(owned) > frontier_max:
                victim = owned.pop(0)
                frontier.remove(victim)
                timed("prune", system.prune, victim)
        q.put({"agent": agent, "recs": recs, "errors": errors, "edit_s": edit_s,
               "live_snapshots": owned})
    except BaseException:  # noqa: BLE001
        q.put({"agent": agent, "recs": recs, "errors": errors + [traceback.format_exc()],
               "edit_s": edit_s, "live_snapshots": []})


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
    return False


def busy_foreign_processes() -> list[str]:
    """Other heavy processes on the machine right now (e.g. a parallel test run): their
    presence makes latencies worse, so every run records them."""
    out = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if _descends_from(int(pid), me):
            continue
        if state == "R" and "bench_mcts" not in cmd and cmd:
            out.append(cmd.strip())
        elif "pytest" in cmd and "bench" not in cmd:
            out.append(cmd.strip())
    return sorted(set(out))[:10]


def product_version() -> dict:
    """Which cascowfs was measured: the repository HEAD, whether cascowfs/ differs from it, and
    a digest of the package's sources (the engine changes while benchmarks run)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((REPO / "cascowfs").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip()
    return {"head": git("rev-parse", "--short", "HEAD"),
            "head_subject": git("log", "-1", "--format=%s")[:100],
            "cascowfs_dirty": bool(git("status", "--porcelain", "--", "cascowfs")),
            "sources_sha256": h.hexdigest()[:12]}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[i]


def summarize(lat: list[float]) -> dict:
    return {"n": len(lat), "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
            "max": max(lat) if lat else float("nan"),
            "mean": statistics.fmean(lat) if lat else float("nan")}


def drift(recs: list[tuple[str, float, float]], windows: int = 10) -> dict:
    """P95 per op in consecutive windows of the run (in start order)."""
    recs = sorted(recs, key=lambda r: r[1])
    out: dict[str, list[float]] = {}
    if len(recs) < windows * 4:
        return out
    size = len(recs) // windows
    for w in range(windows):
        part = recs[w * size:(w + 1) * size]
        for op in OPS:
            xs = [r[2] for r in part if r[0] == op]
            out.setdefault(op, []).append(pct(xs, 95) if xs else float("nan"))
    return out


def run_mix(system: System, agents: int, nops: int, seed: int, files: list[str],
            tag: str = "") -> dict:
    """N agent processes replaying the script on one system; names and ids carry `tag` so that
    several runs on one store never collide."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    barrier = ctx.Barrier(agents + 1)
    per = max(1, nops // agents)
    procs = [ctx.Process(target=agent_loop, args=(system, a, per, seed, files, barrier, q, tag))
             for a in range(agents)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    results = [q.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    recs = [r for res in results for r in res["recs"]]
    errors = [e for res in results for e in res["errors"]]
    out = {"agents": agents, "ops": len(recs), "wall_s": wall,
           "throughput_ops_s": len(recs) / wall if wall else 0, "errors": errors[:20],
           "error_count": len(errors), "ops_detail": {}, "latencies": {},
           "edit": summarize([x for res in results for x in res["edit_s"]]),
           "live_snapshots": sum(len(res["live_snapshots"]) for res in results)}
    for op in OPS:
        lat = [r[2] for r in recs if r[0] == op]
        s = summarize(lat)
        s["throughput_ops_s"] = len(lat) / wall if wall else 0
        out["ops_detail"][op] = s
        out["latencies"][op] = [round(x, 6) for x in lat]
    out["drift_p95"] = drift(recs)
    # start time, op, latency (for latency-over-time plots), relative to the run start
    t_first = min((r[1] for r in recs), default=0)
    out["timeline"] = [(round(r[1] - t_first, 4), r[0], round(r[2], 6))
                       for r in sorted(recs, key=lambda r: r[1])]
    return out


def bench_system(cls: type[System], src_tree: Path, args: argparse.Namespace,
                 files: list[str], corpus_info: dict) -> dict:
    why = cls.unavailable()
    if why:
        log(f"{cls.name}: SKIPPED ({why})")
        return {"system": cls.name, "label": cls.label, "skipped": why}
    nops = args.slow_ops if cls.slow and args.slow_ops else args.ops
    res: dict[str, Any] = {"system": cls.name, "label": cls.label}
    with system_on_scratch(cls, f"mcts-{cls.name}") as (system, fsroot, fsdesc):
        res["fs"] = fsdesc
        src = fsroot / "src"
        run("cp", "-a", f"{src_tree}/.", src)
        system.start()
        used0 = fs_used(fsroot)
        benchfs.drop_caches()
        t0 = time.perf_counter()
        system.setup(src)
        os.sync()
        res["import_s"] = time.perf_counter() - t0
        res["import_after_start"] = True
        res["import_mb_s"] = corpus_info["bytes"] / 1e6 / res["import_s"]
        res["storage_after_import"] = system.storage()
        res["fs_used_after_import"] = fs_used(fsroot) - used0
        log(f"{cls.name}: imported in {res['import_s']:.2f}s ({res['import_mb_s']:.0f} MB/s)")
        seq_ops = min(args.seq_ops // 4, args.slow_ops) if cls.slow else args.seq_ops
        for key, agents, n, seed in (("seq", 1, seq_ops, args.seed + 100),
                                     ("mix", args.agents, nops, args.seed)):
            if n <= 0 or (key == "mix" and args.ops <= 0):
                continue
            log(f"{cls.name}: {key}: {n} ops, {agents} agent(s)")
            load0 = os.getloadavg()[0]
            mix = run_mix(system, agents, n, seed, files, tag=key)
            mix["loadavg_1m_before_after"] = [load0, os.getloadavg()[0]]
            mix["other_busy_processes"] = busy_foreign_processes()
            res[key] = mix
            res[f"storage_after_{key}"] = system.storage()
            res[f"fs_used_after_{key}"] = fs_used(fsroot) - used0
            d = mix["ops_detail"]
            log(f"{cls.name}: {key}: {mix['ops']} ops in {mix['wall_s']:.1f}s, errors "
                f"{mix['error_count']}; " + ", ".join(
                    f"{op} p50 {d[op]['p50']*1e3:.1f} p95 {d[op]['p95']*1e3:.1f} ms"
                    for op in OPS if d[op]["n"]))
            if mix["error_count"]:
                log(f"{cls.name}: first errors: {mix['errors'][:3]}")
        if cls is CascowSystem and args.profile:
            res["profile"] = profile_cascowfs(system, args, files)
    return res


def profile_cascowfs(system: CascowSystem, args: argparse.Namespace, files: list[str]) -> dict:
    """Re-run a short mix with py-spy attached to the daemon; returns the top frames."""
    pyspy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    if not os.path.exists(pyspy):
        return {"skipped": "py-spy not installed"}
    out = Path(args.out).with_suffix(".profile.txt")
    raw = Path(args.out).with_suffix(".pyspy.raw")
    pid = system.daemon_pid()
    prof = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate",
                             "500", "--threads", "--idle", "-o", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        agents = args.profile_agents or args.agents
        mix = run_mix(system, agents, max(400, args.ops // 4), args.seed + 1, files, tag="prof")
    finally:
        prof.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            prof.wait(timeout=30)
        if prof.poll() is None:
            prof.kill()
            prof.wait()
    summary = summarize_pyspy(raw) if raw.exists() else {}
    out.write_text(json.dumps(summary, indent=1))
    return {"ops": mix["ops"], "agents": agents, "raw": str(raw), "summary": summary,
            "ops_detail": {op: {k: v for k, v in d.items()} for op, d in
                           mix["ops_detail"].items()}}


IDLE_LEAVES = ("Condition.wait (threading.py", "EpollIOManager.get_events",
               "_thread_cache.py:211)", "Queue.get (queue.py", "Event.wait (threading.py",
               "select (selectors.py")


def summarize_pyspy(raw: Path, top: int = 25) -> dict:
    """From py-spy's collapsed stacks (all threads, idle included): drop samples of threads
    waiting for work (idle leaves), then count per frame inclusive and self samples. Blocking
    calls such as fsync, lock waits and mount(2) stay in (they are what an op waits on)."""
    incl: dict[str, int] = {}
    self_: dict[str, int] = {}
    total = busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n_i = int(n)
        frames = [f for f in stack.split(";") if f and not f.startswith("thread ")
                  and not f.startswith("process ")]
        if not frames:
            continue
        total += n_i
        if any(k in frames[-1] for k in IDLE_LEAVES):
            continue
        busy += n_i
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n_i
        self_[frames[-1]] = self_.get(frames[-1], 0) + n_i
    ours = {f: n for f, n in incl.items() if "cascowfs/" in f}
    return {"samples": total, "busy": busy,
            "inclusive": sorted(ours.items(), key=lambda kv: -kv[1])[:top],
            "self": sorted(self_.items(), key=lambda kv: -kv[1])[:top]}


# -- the read path ----------------------------------------------------------------------------
def _time_shell(cmd: str, cwd: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if r.returncode not in (0, 1):  # grep exits 1 on no match
        raise RuntimeError(f"{cmd} in {cwd}: exit {r.returncode}")
    return dt


READ_TESTS = {
    "stat walk (find -printf %s)": "find . -printf '%s\\n' > /dev/null",
    "read every file (find | xargs cat)": "find . -type f -print0 | xargs -0 cat > /dev/null",
    "grep -r": "grep -r -c cascowfs_no_match_token . > /dev/null",
    "python -m compileall": f"{sys.executable} -m compileall -q -f -j 1 . > /dev/null",
}


def bench_read_path(src_tree: Path, args: argparse.Namespace, corpus_info: dict) -> dict:
    why = CascowSystem.unavailable()
    if why:
        return {"skipped": why}
    has_py = sum(f.endswith(".py") for f in corpus_files(src_tree)) >= 20
    tests = {k: v for k, v in READ_TESTS.items() if has_py or "compileall" not in k}
    res: dict[str, Any] = {"repeat": args.read_repeat, "tests": {}}
    with system_on_scratch(CascowSystem, "read") as (system, fsroot, fsdesc):
        res["fs"] = fsdesc
        native = fsroot / "native"
        run("cp", "-a", f"{src_tree}/.", native)
        system.setup(native)
        tree = system.branch("reader", "base")
        floor = fsroot / "floor"
        for d in ("u", "w", "m"):
            (floor / d).mkdir(parents=True)
        sys_mount("overlay", str(floor / "m"), "overlay",
                  f"lowerdir={native},upperdir={floor}/u,workdir={floor}/w,volatile")
        try:
            places = {"native ext4": str(native), "cascowfs branch": tree,
                      "bare overlay on ext4": str(floor / "m"),
                      "cascowfs snapshot (FUSE)": system.snapshot_path("base")}
            for test, cmd in tests.items():
                row: dict[str, Any] = {}
                for place, path in places.items():
                    if "compileall" in test and "snapshot" in place:
                        continue  # read-only: compileall cannot write its .pyc files
                    cold, warm = [], []
                    reps = args.read_repeat if "compileall" not in test else args.compile_repeat
                    for _ in range(max(1, reps)):
                        benchfs.drop_caches()
                        cold.append(_time_shell(cmd, path))
                        warm.append(_time_shell(cmd, path))
                    row[place] = {"cold": statistics.median(cold), "warm": statistics.median(warm),
                                  "cold_all": cold, "warm_all": warm}
                base = row["native ext4"]
                for place, v in row.items():
                    v["cold_ratio"] = v["cold"] / base["cold"]
                    v["warm_ratio"] = v["warm"] / base["warm"]
                res["tests"][test] = row
                log(f"read path: {test}: " + ", ".join(
                    f"{p} {v['cold']*1e3:.0f}/{v['warm']*1e3:.0f} ms "
                    f"(x{v['cold_ratio']:.2f}/x{v['warm_ratio']:.2f})" for p, v in row.items()))
            # discard after the branch read the whole tree (SPEC §6 aim)
            t0 = time.perf_counter()
            system.discard("reader")
            res["discard_after_full_read_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sys_umount(str(floor / "m"))
            res["floor_umount_after_full_read_s"] = time.perf_counter() - t0
        finally:
            with contextlib.suppress(OSError):
                sys_umount(str(floor / "m"), MNT_DETACH)
    return res


# -- growth and mount time --------------------------------------------------------------------
def bench_growth(src_tree: Path, args: argparse.Namespace, files: list[str],
                 corpus_info: dict) -> dict:
    out: dict[str, Any] = {"snapshots": args.growth, "wide_snapshots": args.growth_wide}
    for cls, shape in ((CascowSystem, "chain"), (BtrfsSystem, "chain"),
                       (CascowSystem, "wide"), (BtrfsSystem, "wide")):
        n = args.growth if shape == "chain" else args.growth_wide
        key = cls.name if shape == "chain" else f"{cls.name}-wide"
        if n <= 0 or cls.name not in args.growth_systems.split(","):
            continue
        why = cls.unavailable()
        if why:
            out[key] = {"skipped": why}
            continue
        out[key] = _growth_one(cls, shape, n, src_tree, args, files)
    return out


def _growth_one(cls: type[System], shape: str, n: int, src_tree: Path,
                args: argparse.Namespace, files: list[str]) -> dict:
    """chain: one branch, n commits in a row (an n-deep lineage); wide: n snapshots, each a
    branch of base with one small edit (depth 1)."""
    step = max(1, n // 20)
    with system_on_scratch(cls, f"growth-{cls.name}") as (system, fsroot, fsdesc):
        src = fsroot / "src"
        run("cp", "-a", f"{src_tree}/.", src)
        one_copy = du_bytes(src)
        used0 = fs_used(fsroot)
        system.setup(src)
        rng = random.Random(args.seed)
        script = EditScript(files, 0, args.seed)
        series = [(0, system.storage(), fs_used(fsroot) - used0)]
        breakdown = []
        commit_s = []
        tree = system.branch("grow", "base") if shape == "chain" else None
        prev = "base"
        failed = None
        t_start = time.perf_counter()
        for i in range(1, n + 1):
            if args.growth_timeout and time.perf_counter() - t_start > args.growth_timeout:
                failed = f"time budget of {args.growth_timeout} s used up after {i - 1} snapshots"
                log(f"growth {cls.name}: {failed}")
                series.append((i - 1, system.storage(), fs_used(fsroot) - used0))
                break
            acts = [a for a in script.next(rng) if a[0] in ("modify", "create")][:3]
            try:
                if shape == "wide":
                    tree = system.branch(f"w{i}", "base")
                EditScript.apply(tree, acts)
                t0 = time.perf_counter()
                system.commit("grow" if shape == "chain" else f"w{i}", f"g{i}", {})
                commit_s.append(time.perf_counter() - t0)
                if shape == "wide":
                    system.discard(f"w{i}")
            except OSError as exc:
                failed = f"snapshot {i}: {exc}"
                log(f"growth {cls.name}: stopped at {failed}")
                series.append((i - 1, system.storage(), fs_used(fsroot) - used0))
                break
            prev = f"g{i}"
            if i % step == 0 or i == n:
                series.append((i, system.storage(), fs_used(fsroot) - used0))
                if cls is CascowSystem:
                    assert isinstance(system, CascowSystem)
                    bd = {d.name: du_bytes(d) for d in system.store.iterdir() if d.is_dir()}
                    bd["layer_count"] = len(os.listdir(system.store / "layers"))
                    breakdown.append((i, bd))
        if shape == "chain":
            system.discard("grow")
        final = system.storage()
        res = {"shape": shape, "snapshots": n,
            "fs": fsdesc, "one_copy_bytes": one_copy, "series": series,
            "breakdown": breakdown, "failed": failed,
            "final_storage": final, "ratio_to_one_copy": final / one_copy,
            "commit": summarize(commit_s),
            "commit_drift_p95": [pct(commit_s[w * len(commit_s) // 10:
                                               (w + 1) * len(commit_s) // 10], 95)
                                 for w in range(10)] if len(commit_s) >= 10 else [],
            "last": prev,
        }
        log(f"growth {cls.name} {shape}: {n} snapshots -> {final/1e6:.1f} MB "
            f"(one copy {one_copy/1e6:.1f} MB, x{final/one_copy:.2f}); commit p95 "
            f"{pct(commit_s, 95)*1e3:.1f} ms")
        return res


def bench_mount(src_tree: Path, args: argparse.Namespace, files: list[str]) -> dict:
    why = CascowSystem.unavailable()
    if why:
        return {"skipped": why}
    nsnap, nbr = args.mount_snapshots, args.mount_branches
    res: dict[str, Any] = {"snapshots": nsnap, "branches": nbr}
    with system_on_scratch(CascowSystem, "mount") as (system, fsroot, fsdesc):
        assert isinstance(system, CascowSystem)
        res["fs"] = fsdesc
        src = fsroot / "src"
        run("cp", "-a", f"{src_tree}/.", src)
        system.setup(src)
        rng = random.Random(args.seed)
        script = EditScript(files, 0, args.seed)
        # Short chains (8 commits per branch, each branch from base) keep every snapshot's
        # layer chain below the engine's flattening threshold: this measures mount time, not
        # flattening (see the growth run for deep chains).
        t0 = time.perf_counter()
        tree = None
        for i in range(1, nsnap + 1):
            if (i - 1) % 8 == 0:
                if tree is not None:
                    system.discard("grow")
                tree = system.branch("grow", "base")
            EditScript.apply(tree, [a for a in script.next(rng) if a[0] == "modify"][:1])
            system.commit("grow", f"m{i}", {})
            if i % 1000 == 0:
                log(f"mount test: {i} snapshots ({time.perf_counter() - t0:.0f}s)")
        if tree is not None:
            system.discard("grow")
        res["build_s"] = time.perf_counter() - t0
        ids = [f"m{i}" for i in range(1, nsnap + 1)] or ["base"]
        for j in range(nbr):
            system.branch(f"live{j}", rng.choice(ids))
        res["store_bytes"] = system.storage()
        clean, crash = [], []
        for _ in range(3):
            system.umount(branches=False)  # branches stay mounted, as after a daemon restart
            clean.append(system.mount())
        for _ in range(3):
            pid = system.daemon_pid()
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                try:
                    os.kill(pid, 0)
                    time.sleep(0.01)
                except ProcessLookupError:
                    break
            system.mounted = False
            crash.append(system.mount())  # clears the dead FUSE mount, replays the WAL
        res["mount_clean_s"] = clean
        res["mount_after_kill9_s"] = crash
        log(f"mount with {nsnap} snapshots + {nbr} branches: clean "
            f"{[round(x*1e3) for x in clean]} ms, after kill -9 {[round(x*1e3) for x in crash]} ms")
    return res


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="django", help="django | linux | synthetic")
    ap.add_argument("--synthetic-files", type=int, default=200)
    ap.add_argument("--systems", default="cascowfs,overlay,btrfs,git,cp")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--ops", type=int, default=2000,
                    help="ops of the concurrent MCTS mix per system (all agents; 0: skip)")
    ap.add_argument("--seq-ops", type=int, default=500,
                    help="ops of the single-agent run (per-op SPEC lines); slow peers do 1/4 "
                    "(at most --slow-ops)")
    ap.add_argument("--slow-ops", type=int, default=200,
                    help="ops for the slow peers (git, cp): a prefix of the same script")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-read-path", action="store_true")
    ap.add_argument("--read-repeat", type=int, default=3)
    ap.add_argument("--compile-repeat", type=int, default=1)
    ap.add_argument("--growth", type=int, default=0,
                    help="snapshots in the chain growth run: one lineage (0: skip)")
    ap.add_argument("--growth-wide", type=int, default=0,
                    help="snapshots in the wide growth run: each from base (0: skip)")
    ap.add_argument("--growth-systems", default="cascowfs,btrfs")
    ap.add_argument("--growth-timeout", type=float, default=0,
                    help="stop a growth run after this many seconds (0: never)")
    ap.add_argument("--mount-snapshots", type=int, default=0, help="0: skip the mount test")
    ap.add_argument("--mount-branches", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="py-spy the daemon in a second mix")
    ap.add_argument("--profile-agents", type=int, default=0, help="agents of that mix "
                    "(default: --agents)")
    ap.add_argument("--ctl-open", choices=("per-agent", "per-command"), default="per-agent",
                    help="cascowfs agents keep one open of ctl, as cascowfs.client does, or "
                    "open it for every command, as `echo CMD > ctl` in a shell does")
    ap.add_argument("--scratch-gb", type=int, default=24, help="size of each sparse scratch fs")
    ap.add_argument("--out", default=None, help="result JSON (default bench-results/...)")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        log("needs root (loop devices, mounts)")
        return 2
    global SCRATCH_BYTES, CTL_PER_AGENT
    SCRATCH_BYTES = args.scratch_gb << 30
    CTL_PER_AGENT = args.ctl_open == "per-agent"
    if args.corpus.startswith("synthetic"):
        tree = fetch_corpus.make_synthetic(files=args.synthetic_files)
        cname = f"synthetic-{args.synthetic_files}"
    else:
        tree = fetch_corpus.fetch(args.corpus)
        cname = "django" if args.corpus in ("django", "M", "medium") else "linux"
    cinfo = fetch_corpus.info(cname)
    if args.out is None:
        args.out = str(REPO / "bench-results" / f"{cname}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    files = corpus_files(tree)
    log(f"corpus {cname}: {cinfo['entries']} entries, {cinfo['bytes']/1e6:.1f} MB, "
        f"{len(files)} editable files")
    result: dict[str, Any] = {
        "corpus": cinfo, "machine": benchfs.machine(), "argv": sys.argv if argv is None
        else ["tools/bench_mcts.py"] + list(argv),
        "config": vars(args), "systems": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "product": product_version(),
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(result) + "\n")

    for name in [s for s in args.systems.split(",") if s]:
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name}; known: {', '.join(SYSTEMS)}")
        try:
            result["systems"][name] = bench_system(SYSTEMS[name], tree, args, files, cinfo)
        except Exception as exc:  # noqa: BLE001
            log(f"{name}: FAILED: {exc}")
            result["systems"][name] = {"system": name, "label": SYSTEMS[name].label,
                                       "failed": f"{exc}\n{traceback.format_exc()}"}
        save()
    if not args.no_read_path:
        result["read_path"] = bench_read_path(tree, args, cinfo)
        save()
    if args.growth:
        result["growth"] = bench_growth(tree, args, files, cinfo)
        save()
    if args.mount_snapshots:
        result["mount"] = bench_mount(tree, args, files)
        save()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    leaks = benchfs.leaks()
    if leaks:
        log(f"LEAKS: {leaks}")
    log(f"results in {args.out}")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
