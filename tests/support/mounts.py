"""The mount table, read from /proc/self/mountinfo.

``all_mounts()`` / ``mounts_below(path)``  every mount / those at or below a path (``Mount``)
``force_unmount_below(path)``              lazy umount of everything there (clean-up only)
``mounts_under(path)`` / ``lazy_umount(path)``  the same as (point, fstype) pairs, without
                                               importing the engine (for the FUSE tests)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cascowfs import overlay

Mount = overlay.MountRecord  # (mount_id, target, fstype, source, options)
all_mounts = overlay.all_mounts


def mounts_below(base: Path | str) -> list[Mount]:
    """Mounts at or below ``base``."""
    prefix = str(base).rstrip("/")
    return [m for m in all_mounts() if m.target == prefix or m.target.startswith(prefix + "/")]


def force_unmount_below(base: Path | str) -> list[str]:
    """Lazily unmount everything at or below ``base`` (deepest first); returns the targets."""
    targets = sorted({m.target for m in mounts_below(base)}, key=len, reverse=True)
    for t in targets:
        lazy_umount(t)
    return targets


def mounts_under(base: Path) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or below ``base`` (reads mountinfo, no stat)."""
    prefix = str(base)
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                out.append((point, right.split()[0]))
    return out


def lazy_umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], check=False, capture_output=True)
