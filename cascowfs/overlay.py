"""Kernel overlayfs mounts for branches, through the new mount API (fsopen/fsconfig).

``fsconfig(lowerdir+)`` takes one layer path per call: no 4 KiB option-string limit, and no
escaping of ':' or ',' in store paths. Branch mounts use ``volatile`` (an unmount must not sync
the whole store filesystem; a branch is not durable until commit anyway) and ``redirect_dir=on``
so that directories can be renamed inside a branch as on any local filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from . import syscalls
from .errors import StoreIOError

_libc = ctypes.CDLL(None, use_errno=True)

_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100
_MNT_DETACH = 2
_MS_RDONLY = 1
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4

MAX_LOWER_LAYERS = 500  # the kernel's limit (OVL_MAX_STACK)
# the mount table's source of what stands in for a branch's overlay that could not be mounted
PLACEHOLDER_SOURCE = "cascowfs-unmounted"


def _fs_messages(fs_fd: int) -> str:
    """The kernel's own explanation of a failed fsconfig (read from the fs context fd)."""
    lines = []
    while True:
        try:
            msg = os.read(fs_fd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


class MountError(StoreIOError):
    pass


def mount_overlay(
    target: Path,
    lowers: list[Path],
    upper: Path | None = None,
    work: Path | None = None,
    *,
    readonly: bool = False,
) -> None:
    """Mount an overlay at ``target``: ``lowers`` top first; no upper means read-only."""
    _attach("overlay", target, overlay_mount_fd(target, lowers, upper, work, readonly=readonly))


def overlay_mount_fd(
    shown: Path,
    lowers: list[Path],
    upper: Path | None = None,
    work: Path | None = None,
    *,
    readonly: bool = False,
    source: str = "cascowfs",
) -> int:
    """A new overlay mount, attached nowhere yet: its descriptor (``fsmount``), for
    ``move_mount`` or ``clone_into``. ``shown`` names it in errors; ``source`` is the mount
    table's first column (what tells our mounts apart).

    Every overlay is ``nosuid`` and ``nodev``: a branch's tree holds what code in another
    branch, maybe root in it, committed (a set-user-id copy of a shell, a file capability,
    a device node of mode 0666), and any local user may reach a branch's tree. Without
    them, ``nobody`` ran such a shell as root, read ``/root`` through a capability and
    used a device, all from a branch of that snapshot."""
    if not lowers:
        raise ValueError("an overlay needs at least one lower layer")
    if len(lowers) > MAX_LOWER_LAYERS:
        raise MountError(f"{len(lowers)} lower layers exceed the kernel's {MAX_LOWER_LAYERS}")
    if upper is not None and work is None:
        raise ValueError("an overlay with an upper layer needs a work directory")
    options: list[tuple[str, bytes | None]] = [("source", os.fsencode(source))]
    options += [("lowerdir+", os.fsencode(layer)) for layer in lowers]
    if upper is not None and work is not None:
        # overlayfs unescapes backslashes in these two paths (not in lowerdir+)
        options.append(("upperdir", os.fsencode(upper).replace(b"\\", b"\\\\")))
        options.append(("workdir", os.fsencode(work).replace(b"\\", b"\\\\")))
        options.append(("volatile", None))
    options += [("redirect_dir", b"on"), ("index", b"off"), ("metacopy", b"off")]
    attrs = (_MOUNT_ATTR_RDONLY if readonly else 0) | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
    mnt_fd = _new_mount_fd("overlay", shown, options, attrs)
    # Overlayfs that cannot create its work directory (no block or inode left) mounts
    # read-only rather than fail: a branch must be writable, so that is a full disk.
    if upper is not None and not readonly and os.fstatvfs(mnt_fd).f_flag & os.ST_RDONLY:
        os.close(mnt_fd)
        raise MountError(
            f"overlay mount at {shown} failed: No space left on device (overlayfs could not "
            "create its work directory, and would have mounted it read-only)",
            errno=errno.ENOSPC,
        )
    return mnt_fd


def mount_erofs(target: Path, source: Path) -> None:
    """Mount the EROFS image (or block device) ``source`` read-only at ``target``."""
    options: list[tuple[str, bytes | None]] = [("source", os.fsencode(source)), ("ro", None)]
    _attach("erofs", target, _new_mount_fd("erofs", target, options, _MOUNT_ATTR_RDONLY))


def _new_mount_fd(
    fstype: str, shown: Path, options: list[tuple[str, bytes | None]], attrs: int
) -> int:
    """A new mount of ``fstype`` configured by ``options`` (a value of None sets a flag),
    attached nowhere yet: its descriptor. ``shown`` names it in errors."""
    # Opening a context and setting its options only copies them (a layer's path is looked
    # up, its dentries cached by the mounts before): those calls keep the GIL; making the
    # superblock and the mount may wait, and release it.
    fs_fd = syscalls.call("fsopen", fstype.encode(), _FSOPEN_CLOEXEC, keep_gil=True)
    try:
        try:
            for key, value in options:
                kind = _FSCONFIG_SET_FLAG if value is None else _FSCONFIG_SET_STRING
                syscalls.call("fsconfig", fs_fd, kind, key.encode(), value, 0, keep_gil=True)
            syscalls.call("fsconfig", fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
            return syscalls.call("fsmount", fs_fd, _FSMOUNT_CLOEXEC, attrs)
        except OSError as exc:
            detail = _fs_messages(fs_fd)
            raise MountError(
                f"{fstype} mount at {shown} failed: {exc.strerror}"
                + (f" ({detail})" if detail else ""),
                errno=exc.errno,
            ) from None
    finally:
        os.close(fs_fd)


def mount_placeholder(target: Path) -> None:
    """Mount an empty read-only tmpfs at ``target``, a branch's mount point whose overlay
    could not be mounted: no write, root's included, lands in the bare directory, which the
    overlay would hide once mounted over it. It takes no space on the store's disk."""
    options: list[tuple[str, bytes | None]] = [
        ("source", PLACEHOLDER_SOURCE.encode()),
        ("size", b"4k"),
        ("mode", b"0555"),
    ]
    _attach("tmpfs", target, _new_mount_fd("tmpfs", target, options, _MOUNT_ATTR_RDONLY))


def attach(fstype: str, target: Path, mnt_fd: int) -> None:
    """Attach the new mount ``mnt_fd`` (``overlay_mount_fd``) at ``target``; the descriptor
    stays the caller's to close. It needs no space: a mount made ahead is attached after the
    change it shows is recorded (``StateManager._repoint``)."""
    try:
        syscalls.call(
            "move_mount", mnt_fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH
        )
    except OSError as exc:
        raise MountError(
            f"attaching {fstype} at {target} failed: {exc.strerror}", errno=exc.errno
        ) from None


def _attach(fstype: str, target: Path, mnt_fd: int) -> None:
    """``attach``, the descriptor closed."""
    try:
        attach(fstype, target, mnt_fd)
    finally:
        os.close(mnt_fd)


def clone_into(mnt_fd: int, name: bytes, target_dir_fd: int, target_name: bytes) -> int:
    """Bind what ``name`` is inside mount ``mnt_fd`` (a directory or a file) onto
    ``target_name`` in directory ``target_dir_fd``: ``open_tree(OPEN_TREE_CLONE)`` of it and
    ``move_mount``, so the source mount itself need never be attached anywhere. Returns a
    descriptor of the new mount, which the caller closes; ``unmount_by_fd`` detaches it
    where ``target_name`` no longer leads to it (its directory removed meanwhile)."""
    child = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=mnt_fd)
    try:
        tree_fd = syscalls.call(
            "open_tree", child, b"", _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH
        )
    finally:
        os.close(child)
    try:
        syscalls.call(
            "move_mount", tree_fd, b"", target_dir_fd, target_name, _MOVE_MOUNT_F_EMPTY_PATH
        )
    except BaseException:
        os.close(tree_fd)
        raise
    return tree_fd


def unmount_by_fd(mount_fd: int) -> bool:
    """``unmount`` of the mount whose root descriptor ``mount_fd`` holds, reached through
    ``/proc/self/fd``, which leads to the mount itself and not to a name."""
    return unmount(Path(f"/proc/self/fd/{mount_fd}"))


def unmount(target: Path, *, lazy: bool = True) -> bool:
    """Unmount ``target``; lazy (MNT_DETACH) so that processes inside are not disturbed and the
    call does not wait for the dentry cache to drain. Returns False if nothing was mounted."""
    res = _libc.umount2(os.fsencode(target), _MNT_DETACH if lazy else 0)
    if res != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise MountError(f"unmounting {target} failed: {os.strerror(err)}", errno=err)
    return True


def unmount_stacked(target: Path) -> None:
    """Unmount every mount stacked at ``target`` (a rolled-forward step may have mounted a
    branch over its old mount)."""
    while unmount(target):
        pass


def unmount_under(prefix: Path) -> None:
    """Unmount every mount whose mount point lies under ``prefix``."""
    for m in mounts_under(prefix):
        unmount(Path(m.target))


@dataclass(frozen=True)
class MountRecord:
    mount_id: int
    target: str
    fstype: str
    source: str
    options: str
    device: str = ""  # major:minor (a FUSE mount's minor names its fusectl connection)


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field  # the usual case, and overlay option strings are long
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class OverlayDirs:
    """The directories an overlay mount stacks, as ``mount_overlay`` gave them."""

    lowers: tuple[str, ...]  # top first
    upper: str | None


def overlay_dirs(m: MountRecord) -> OverlayDirs:
    """The lower and upper directories that overlay mount ``m``'s options name.

    mountinfo escapes a comma inside a value (``\\054``), so the options split at every
    comma; overlayfs shows ``upperdir`` as it was given, backslashes doubled (``mount_overlay``)."""
    lowers: list[str] = []
    upper = None
    for option in m.options.split(","):
        key, _, value = option.partition("=")
        if key == "lowerdir+":
            lowers.append(unescape_mountinfo(value))
        elif key == "upperdir":
            upper = unescape_mountinfo(value).replace("\\\\", "\\")
    return OverlayDirs(tuple(lowers), upper)


def all_mounts() -> list[MountRecord]:
    """Every mount of this mount namespace, in mount order (from /proc/self/mountinfo)."""
    found = []
    # Fields are separated by single spaces; the kernel escapes space, tab, newline and
    # backslash in paths but no other byte, so a path may hold a carriage return or a vertical
    # tab, which str.split() and universal newlines would take for separators.
    with open(
        "/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape", newline="\n"
    ) as fh:
        for line in fh:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            if len(lf) < 5 or len(rf) < 2:
                continue
            found.append(
                MountRecord(
                    int(lf[0]),
                    unescape_mountinfo(lf[4]),
                    rf[0],
                    unescape_mountinfo(rf[1]),
                    rf[2] if len(rf) > 2 else "",
                    lf[2],
                )
            )
    return found


def mounts_under(prefix: Path) -> list[MountRecord]:
    """Mounts whose mount point lies under ``prefix``."""
    base = str(prefix).rstrip("/") + "/"
    return [m for m in all_mounts() if (m.target + "/").startswith(base)]


def mount_holding(path: Path) -> MountRecord | None:
    """The mount that ``path`` (resolved) lies on: of the mount points above it, the deepest,
    and of those mounted there, the last."""
    here = str(path).rstrip("/") + "/"
    holding, depth = None, -1
    for m in all_mounts():
        top = m.target.rstrip("/") + "/"
        if here.startswith(top) and len(top) >= depth:
            holding, depth = m, len(top)
    return holding
