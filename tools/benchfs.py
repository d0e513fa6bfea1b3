#!/usr/bin/env python3
"""Scratch filesystems for benchmarks, and a description of the machine they ran on.

``scratch_fs("ext4")`` / ``scratch_fs("btrfs")`` make a fresh sparse image file, attach it to a
loop device, make a journaled ext4 (or btrfs) on it, mount it, and yield the mount point. On
the way out -- normal return, exception, SIGTERM or SIGINT -- every mount below the mount point
(overlay, fuse, nested) is detached, the filesystem unmounted, the loop device released and the
image deleted. Inode tables and the journal are initialised up front (``lazy_itable_init=0``)
so that no background kernel thread writes while a benchmark is timing.

Why not ``/``: on these VMs ``/`` is ext4 *without* a journal, where creating files soon after a
large delete is up to 10x slower (ext4 avoids recently freed inodes); every figure in
``docs/benchmarks.md`` comes from a fresh filesystem made here.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from cascowfs import overlay

DEFAULT_SIZE = 24 << 30  # sparse; only written blocks take space on /
IMAGE_PARENT = os.environ.get("CASCOWFS_BENCH_IMAGES", "/var/tmp")


def _run(*cmd: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE if quiet else None)


def available(kind: str) -> str | None:
    """None when a scratch filesystem of this kind can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mounts)"
    if not shutil.which("losetup"):
        return "losetup not installed"
    fstypes = Path("/proc/filesystems").read_text().split()
    if kind not in fstypes and kind != "ext4":
        # btrfs may be a module that loads on first mount; try modprobe quietly.
        _run("modprobe", kind, check=False)
        if kind not in Path("/proc/filesystems").read_text().split():
            return f"{kind} not in /proc/filesystems"
    if not shutil.which(f"mkfs.{kind}"):
        return f"mkfs.{kind} not installed"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control"
    return None


def mounts_below(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below path, deepest first (from /proc/self/mountinfo)."""
    root = os.path.realpath(path)
    out = []
    for m in overlay.all_mounts():  # any byte a mount point may hold, parsed right
        if m.target == root or m.target.startswith(root + "/"):
            out.append(m.target)
    return sorted(set(out), key=lambda p: (-p.count("/"), p))


def detach_all_below(path: str | os.PathLike[str], include_self: bool = False) -> list[str]:
    """Detach (MNT_DETACH) every mount strictly below path (and path itself if asked)."""
    root = os.path.realpath(path)
    done = []
    for mp in mounts_below(root):
        if mp == root and not include_self:
            continue
        r = _run("umount", "-l", mp, check=False)
        if r.returncode == 0:
            done.append(mp)
    return done


class _Signals:
    """Turn SIGTERM/SIGHUP into SystemExit while a scratch fs exists, so finally blocks run."""

    depth = 0
    saved: dict = {}

    @classmethod
    def enter(cls) -> None:
        if cls.depth == 0 and threading_main():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                cls.saved[sig] = signal.signal(sig, cls._raise)
        cls.depth += 1

    @classmethod
    def leave(cls) -> None:
        cls.depth -= 1
        if cls.depth == 0 and threading_main():
            for sig, h in cls.saved.items():
                signal.signal(sig, h)
            cls.saved.clear()

    @staticmethod
    def _raise(signum, frame):  # noqa: ARG004
        raise SystemExit(128 + signum)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def scratch_fs(kind: str = "ext4", size: int = DEFAULT_SIZE, label: str = "bench",
               mountpoint: str | None = None) -> Iterator[Path]:
    """A fresh loop-mounted filesystem of `kind` (ext4 with journal, or btrfs)."""
    why = available(kind)
    if why:
        raise RuntimeError(f"cannot make a scratch {kind}: {why}")
    workdir = Path(tempfile.mkdtemp(prefix=f"cascowfs-{label}-{kind}-", dir=IMAGE_PARENT))
    image = workdir / "image"
    mnt = Path(mountpoint) if mountpoint else workdir / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    dev = None
    mounted = False
    _Signals.enter()
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        # direct-io: the loop device does not cache the image a second time in the page cache,
        # so drop_caches really makes a read cold and memory use stays honest.
        dev = _run("losetup", "--find", "--show", "--direct-io=on", str(image)).stdout.strip()
        if kind == "ext4":
            _run("mkfs.ext4", "-q", "-F", "-L", label[:16], "-O", "has_journal",
                 "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
            opts = "noatime"
        elif kind == "btrfs":
            _run("mkfs.btrfs", "-q", "-f", "-L", label[:16], dev)
            opts = "noatime"
        else:
            raise ValueError(kind)
        _run("mount", "-t", kind, "-o", opts, dev, str(mnt))
        mounted = True
        yield mnt
    finally:
        try:
            if mounted:
                detach_all_below(mnt)
                for attempt in range(50):
                    r = _run("umount", str(mnt), check=False)
                    if r.returncode == 0:
                        break
                    time.sleep(0.1)
                else:
                    _run("umount", "-l", str(mnt), check=False)
        finally:
            if dev:
                for attempt in range(50):
                    if _run("losetup", "-d", dev, check=False).returncode == 0:
                        break
                    time.sleep(0.1)
            shutil.rmtree(workdir, ignore_errors=True)
            _Signals.leave()


def fs_description(path: str | os.PathLike[str]) -> dict:
    """Type, source, mount options and size of the filesystem holding path."""
    real = os.path.realpath(path)
    best = None
    # any mount point's name may hold bytes that are not UTF-8 (a test's hostile names)
    with open("/proc/self/mountinfo", errors="surrogateescape", newline="\n") as f:
        for line in f:
            parts = line.split(" ")
            mp = parts[4]
            if real == mp or real.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) >= len(best[4]):
                    best = parts
    desc: dict = {"path": str(path)}
    if best:
        sep = best.index("-")
        desc.update(mountpoint=best[4], fstype=best[sep + 1], source=best[sep + 2],
                    options=best[5] + "," + best[sep + 3])
        if desc["fstype"] == "ext4" and desc["source"].startswith("/dev/"):
            r = _run("dumpe2fs", "-h", desc["source"], check=False)
            feats = [ln.split(":", 1)[1].split() for ln in r.stdout.splitlines()
                     if ln.startswith("Filesystem features:")]
            if feats:
                desc["journal"] = "has_journal" in feats[0]
        if desc["source"].startswith("/dev/loop"):
            desc["backing"] = "loop device, direct-io, sparse image on /"
    st = os.statvfs(path)
    desc["size_gb"] = round(st.f_blocks * st.f_frsize / 1e9, 1)
    return desc


def machine() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    virt = _run("systemd-detect-virt", check=False).stdout.strip() if shutil.which(
        "systemd-detect-virt") else ""
    root = fs_description("/")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "virt": virt or "?", "root_fs": root,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def leaks(parent: str | None = None) -> list[str]:
    """Mounts and loop devices of scratch filesystems (made under `parent`) still around."""
    mine = os.path.realpath(parent or IMAGE_PARENT) + "/cascowfs-"
    table = Path("/proc/mounts").read_text(errors="surrogateescape")
    out = [line for line in table.splitlines() if mine in line]
    r = _run("losetup", "-a", check=False)
    out += [ln for ln in r.stdout.splitlines() if mine in ln]
    return out


if __name__ == "__main__":
    json.dump(machine(), sys.stdout, indent=1)
    print()
    for kind in ("ext4", "btrfs"):
        why = available(kind)
        if why:
            print(f"{kind}: unavailable ({why})")
            continue
        t0 = time.perf_counter()
        with scratch_fs(kind, label="selftest") as m:
            t1 = time.perf_counter()
            print(json.dumps(fs_description(m)))
        print(f"{kind}: made+mounted in {t1 - t0:.2f}s, torn down in "
              f"{time.perf_counter() - t1:.2f}s")
    print("leaks:", leaks())
