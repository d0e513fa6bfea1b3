"""The mount table, read from /proc/self/mountinfo.

``all_mounts()`` / ``mounts_below(path)``  every mount / those at or below a path (``Mount``)
``force_unmount_below(path)``              lazy umount of everything there (clean-up only)
``mounts_under(path)`` / ``lazy_umount(path)``  the same as (point, fstype) pairs (for the
                                               FUSE tests)
``abort_fuse(mnt)``                        end a FUSE mount's connection (a stuck daemon)

All of it reads the table through the package's one parser (``overlay.all_mounts``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cascowfs import overlay

Mount = overlay.MountRecord  # (mount_id, target, fstype, source, options, device)
all_mounts = overlay.all_mounts


def mounts_below(base: Path | str) -> list[Mount]:
    """Mounts at or below ``base``."""
    return overlay.mounts_under(Path(base))


def force_unmount_below(base: Path | str) -> list[str]:
    """Lazily unmount everything at or below ``base`` (deepest first); returns the targets."""
    targets = sorted({m.target for m in mounts_below(base)}, key=len, reverse=True)
    for t in targets:
        lazy_umount(t)
    return targets


def mounts_under(base: Path) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or below ``base`` (reads mountinfo, no stat)."""
    return [(m.target, m.fstype) for m in overlay.mounts_under(base)]


def lazy_umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], check=False, capture_output=True)


def abort_fuse(mnt: Path | str) -> None:
    """Abort the FUSE connection of the mount at ``mnt``, which frees a daemon whose own
    threads wait in the kernel for requests it will not answer, so that kill -9 can end it
    (``sysmount.abort_connection``)."""
    from cascowfs.fuse.sysmount import abort_connection

    abort_connection(mnt)
