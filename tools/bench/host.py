"""The machine under the benchmark: commands, mount(2)/umount2(2), disk usage."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
VENV_BIN = Path(sys.executable).parent
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    *cmd: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None, env: dict | None = None
) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))}: exit {r.returncode}: "
            f"{(r.stderr.strip() or r.stdout.strip())[-500:]}"
        )
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


def sys_mount(src: str, target: str, fstype: str, opts: str) -> None:
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), 0, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} {target} ({opts[:200]}): {os.strerror(e)}")


def sys_umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}")
