#!/usr/bin/env python3
"""Big and sparse files through a real mount: the daemon's memory, the store's growth.

On a fresh loop-mounted journaled ext4 (``benchfs.scratch_fs``) this mounts a store, then

1. imports a directory holding one file of random bytes (4 GiB by default), makes a branch
   of it, changes a few bytes in the middle of the file (overlayfs copies it up whole),
   commits, and makes a branch of the commit (which waits for the commit's delta layer);
   each file read back is hashed against the source;
2. imports a directory holding a 16 GiB sparse file (a few bytes of data) and records the
   store's growth (allocated blocks, branches aside) and the import's time.

The daemon's RSS and anonymous RSS are sampled every 20 ms from ``/proc/PID/status`` and
its ``VmHWM`` read at the end. The limits the figures are held to: peak RSS < 512 MiB,
sparse growth < 1 MiB. Writes ``bench-results/bigfiles.json`` and prints a table.

    sudo .venv/bin/python tools/bench_bigfiles.py [--size-gib 4] [--sparse-gib 16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchfs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
CASCOWFS = str(VENV_BIN / "cascowfs") if (VENV_BIN / "cascowfs").exists() else "cascowfs"
MIB = 1 << 20
PIECE = 8 * MIB
RSS_LIMIT = 512 * MIB
SPARSE_GROWTH_LIMIT = MIB


def log(msg: str) -> None:
    print(f"[bigfiles {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | os.PathLike[str]) -> str:
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}: "
                           f"{(r.stderr.strip() or r.stdout.strip())[-500:]}")
    return r.stdout


class Memory:
    """Peak VmRSS and RssAnon of a process, per phase, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def status(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
        return out

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                now = self.status()
            except (FileNotFoundError, ProcessLookupError):
                return
            peak = self.peaks.setdefault(self.phase, {"VmRSS": 0, "RssAnon": 0})
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Mount:
    def __init__(self, root: Path) -> None:
        self.store, self.mnt = root / "store", root / "mnt"
        self.store.mkdir()
        self.mnt.mkdir()
        run(CASCOWFS, "mount", self.store, self.mnt, "--background",
            "--log-file", root / "daemon.log")
        self.pid = int(os.getxattr(self.mnt, "user.cascowfs.pid"))
        self.fd = os.open(self.mnt / "ctl", os.O_RDWR)

    def cmd(self, line: str) -> str:
        os.write(self.fd, line.encode() + b"\n")
        reply = os.read(self.fd, 4096).decode()
        if reply != "ok\n" and not reply.startswith("ok "):
            raise RuntimeError(f"{line}: unexpected reply {reply!r}")
        return reply[3:].rstrip("\n")

    def close(self) -> None:
        os.close(self.fd)
        run(CASCOWFS, "umount", self.mnt, "--branches")


def write_random(path: Path, size: int) -> str:
    digest = hashlib.blake2b()
    with open(path, "wb") as f:
        for _ in range(size // PIECE):
            piece = os.urandom(PIECE)
            digest.update(piece)
            f.write(piece)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            digest.update(piece)
    return digest.hexdigest()


def store_bytes(store: Path) -> int:
    """Allocated bytes of the store, its branches directory (mounts, uppers) aside."""
    total = 0
    for dirpath, dirs, files in os.walk(store):
        if Path(dirpath) == store and "branches" in dirs:
            dirs.remove("branches")
        total += sum(os.lstat(os.path.join(dirpath, n)).st_blocks * 512 for n in files)
    return total


def timed(memory: Memory, phase: str, action):
    memory.phase = phase
    t0 = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - t0
    log(f"{phase}: {elapsed:.1f} s")
    return result, elapsed


def big_file(root: Path, fs: Mount, memory: Memory, size: int) -> dict:
    src = root / "big-src"
    src.mkdir()
    log(f"writing {size >> 20} MiB of random bytes")
    write_random(src / "big", size)
    change = os.urandom(4096)
    with open(src / "big", "r+b") as f:
        original = os.pread(f.fileno(), len(change), size // 2)
        os.pwrite(f.fileno(), change, size // 2)
    changed = file_digest(src / "big")  # what the commit holds
    with open(src / "big", "r+b") as f:
        os.pwrite(f.fileno(), original, size // 2)
    imported = file_digest(src / "big")  # what the import holds
    benchfs.drop_caches()
    times = {}
    _, times["import"] = timed(memory, "import", lambda: fs.cmd(f"import big {src}"))
    snap = fs.mnt / "snapshots" / "big" / "big"
    got, times["snapshot read"] = timed(memory, "snapshot read", lambda: file_digest(snap))
    assert got == imported, "the snapshot does not read back as imported"
    tree, times["branch"] = timed(memory, "branch", lambda: Path(fs.cmd("branch b big")))

    def change_in_branch() -> None:
        with open(tree / "big", "r+b") as f:  # overlayfs copies the whole file up first
            os.pwrite(f.fileno(), change, size // 2)

    _, times["change in branch"] = timed(memory, "change in branch", change_in_branch)
    _, times["commit"] = timed(memory, "commit", lambda: fs.cmd("commit b big2"))
    again, times["branch of commit"] = timed(memory, "branch of commit",
                                             lambda: Path(fs.cmd("branch c big2")))
    got, times["branch read"] = timed(memory, "branch read", lambda: file_digest(again / "big"))
    assert got == changed, "the branch of the commit does not read back as committed"
    got, _ = timed(memory, "snapshot read 2",
                   lambda: file_digest(fs.mnt / "snapshots" / "big2" / "big"))
    assert got == changed, "the committed snapshot does not read back as committed"
    for name in ("b", "c"):
        fs.cmd(f"discard {name}")
    return {"size": size, "seconds": {k: round(v, 2) for k, v in times.items()}}


def sparse_file(root: Path, fs: Mount, memory: Memory, size: int) -> dict:
    src = root / "sparse-src"
    src.mkdir()
    with open(src / "disk.img", "wb") as f:
        f.write(b"boot sector")
        f.seek(size // 2)
        f.write(b"middle")
        f.truncate(size)
    fs.cmd("gc")
    before = store_bytes(fs.store)
    _, seconds = timed(memory, "sparse import", lambda: fs.cmd(f"import sparse {src}"))
    fs.cmd("gc")
    growth = store_bytes(fs.store) - before
    layer_blocks = sum(os.stat(layer / "disk.img").st_blocks * 512
                       for layer in (fs.store / "layers").iterdir()
                       if (layer / "disk.img").exists())
    return {"size": size, "import_seconds": round(seconds, 2), "store_growth": growth,
            "layer_allocated": layer_blocks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="random file (GiB)")
    ap.add_argument("--sparse-gib", type=int, default=16, help="sparse file (GiB)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "bigfiles.json")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30)) // PIECE * PIECE
    why = benchfs.available("ext4") or (None if os.path.exists("/dev/fuse") else "no /dev/fuse")
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    commit = run("git", "-C", REPO, "rev-parse", "--short", "HEAD").strip()
    with benchfs.scratch_fs("ext4", size=4 * size + (8 << 30), label="bigfiles") as root:
        fs = Mount(root)
        memory = Memory(fs.pid)
        try:
            big = big_file(root, fs, memory, size)
            sparse = sparse_file(root, fs, memory, args.sparse_gib << 30)
            hwm = memory.status()["VmHWM"]
        finally:
            memory.stop()
            fs.close()
        fsdesc = benchfs.fs_description(root)
    result = {
        "commit": commit, "machine": benchfs.machine(), "fs": fsdesc,
        "big_file": big, "sparse_file": sparse,
        "daemon_memory": {"VmHWM": hwm, "peaks": memory.peaks},
        "limits": {"rss": RSS_LIMIT, "sparse_growth": SPARSE_GROWTH_LIMIT},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'phase':<20} {'seconds':>8} {'peak RSS MiB':>13} {'peak anon MiB':>14}")
    seconds = dict(big["seconds"], **{"sparse import": sparse["import_seconds"]})
    for phase, peak in memory.peaks.items():
        secs = seconds.get(phase)
        print(f"{phase:<20} {secs if secs is not None else '':>8} {peak['VmRSS'] / MIB:>13.0f} "
              f"{peak['RssAnon'] / MIB:>14.0f}")
    print(f"daemon VmHWM: {hwm / MIB:.0f} MiB (limit {RSS_LIMIT // MIB} MiB); "
          f"{args.sparse_gib} GiB sparse import: {sparse['import_seconds']} s, store growth "
          f"{sparse['store_growth'] / 1024:.0f} KiB (limit {SPARSE_GROWTH_LIMIT // 1024} KiB)")
    print(f"written to {args.out}")
    ok = hwm < RSS_LIMIT and sparse["store_growth"] < SPARSE_GROWTH_LIMIT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
