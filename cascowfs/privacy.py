"""Who may read the store, and what an import may read (docs/security.md).

The store holds every committed file's bytes in its metadata database (where no file mode
guards them) and in its layers. The mount (``MNT/snapshots``, the branches' overlayfs trees) is the
only way to them that checks those modes, so everything the store creates is private to root:
the process creating it runs under a 077 umask, and ``make_private`` takes back whatever an
older version left readable. Three directories stay searchable (0711, no listing): the store
itself, ``branches/`` and ``branches/<name>/``, the path from ``/`` to each branch's tree, a
mount point that non-root code inside the branch works in. A branch's ``upper/`` carries the
tree root's own mode (overlayfs shows it as the tree's root), so it and ``work/`` sit in the
branch's private directory, ``branches/<name>/private``.

The daemon runs as root, so an ``import`` asked through ``ctl`` by a member of the admin group
would read what only root may read. ``check_readable`` walks the source in a child forked with
the caller's credentials (the FUSE request's uid, gid and supplementary groups) and refuses the
import with EACCES naming the first path that caller cannot read. The import then reads the
source as that caller too (``reading_as``): every path it resolves in the source, and every
file it opens there, is checked by the kernel against the caller's credentials, so a source
changed after the check (a directory swapped for a symbolic link) yields EACCES, never bytes
the caller could not read.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import forks, syscalls
from .errors import CascowfsError, InvalidArgumentError, PermissionDeniedError, from_os_error
from .fuse.sysmount import FUSE_TYPE
from .overlay import all_mounts

log = logging.getLogger("cascowfs.privacy")

STORE_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PASSAGE_DIR = 0o711  # searchable, not listable: on the path to a branch's tree

# What a store's own directories and files should be, by path relative to the store; ``*``
# stands for every entry of that directory. Layers, staging, trash and uppers hold copies of
# users' trees, with those trees' own modes: their private parents keep them out of reach.
_MODES = (
    ("", PASSAGE_DIR),
    ("branches", PASSAGE_DIR),
    ("branches/*", PASSAGE_DIR),
    ("branches/*/private", PRIVATE_DIR),
    ("lock", PRIVATE_FILE),
    ("meta", PRIVATE_DIR),
    ("meta/*", PRIVATE_FILE),
    ("wal", PRIVATE_DIR),
    ("wal/*", PRIVATE_FILE),
    ("layers", PRIVATE_DIR),
    ("staging", PRIVATE_DIR),
    ("mounts", PRIVATE_DIR),  # layer images mounted: copies of users' trees, as layers
    ("trash", PRIVATE_DIR),
    ("empty", PRIVATE_DIR),
)


def make_private(store: Path) -> int:
    """Set this process's umask to 077 and bring every store-owned path to its mode (above);
    return the umask before, which closing the store puts back.

    A store made by an older version had 0755 directories and 0644 files: one log line lists
    what was tightened."""
    umask_before = os.umask(STORE_UMASK)
    older = (store / "meta").exists()
    tightened = []
    store_dev = os.stat(store).st_dev
    for pattern, mode in _MODES:
        for path in _expand(store, pattern):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
                continue
            if st.st_dev != store_dev:
                continue  # a mount over the store's own path (left by a crash): not ours to chmod
            os.chmod(path, mode)
            tightened.append(f"{path.relative_to(store)} {stat.S_IMODE(st.st_mode):o}->{mode:o}")
    if older and tightened:
        log.warning(
            "%s: made private to root (was readable by others): %s", store, ", ".join(tightened)
        )
    return umask_before


def _expand(store: Path, pattern: str) -> list[Path]:
    paths = [store]
    for part in filter(None, pattern.split("/")):
        if part == "*":
            paths = [p / name for p in paths if p.is_dir() for name in sorted(os.listdir(p))]
        else:
            paths = [p / part for p in paths]
    return paths


def make_passage(path: Path) -> None:
    """Let every user search (not list) ``path``: a directory on the way to a branch's tree."""
    os.chmod(path, PASSAGE_DIR)


@dataclass(frozen=True, slots=True)
class Caller:
    """The credentials of a FUSE request's process."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of_user(cls, user: str | int) -> Caller:
        """The credentials ``user`` (a name or a uid) logs in with: its primary group and
        every group the account database gives it. PermissionDeniedError for a user with no
        account, whose groups nobody can know."""
        try:
            entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        except KeyError:
            raise PermissionDeniedError(
                f"user {user} has no account here, so its groups are unknown", errno=errno.EPERM
            ) from None
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(entry.pw_uid, entry.pw_gid, tuple(sorted(set(groups))))

    def may_change_state(self, admin_gid: int | None) -> bool:
        """Whether these credentials may change a mount's state: root's, or a member's of its
        admin group (None: the mount has none)."""
        return self.uid == 0 or (admin_gid is not None and admin_gid in self.groups)


# Raw system calls: glibc's setgroups (like its setresuid) changes every thread of the
# process; the kernel's changes the calling thread's credentials alone. setfsuid/setfsgid
# change only the credentials that file access is checked against (``syscalls.raw``).


def _set_thread_groups(groups: tuple[int, ...]) -> None:
    array = (ctypes.c_uint32 * len(groups))(*groups)
    if syscalls.raw("setgroups", ctypes.c_size_t(len(groups)), array) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setgroups: {os.strerror(err)}")


def _set_fs_ids(uid: int, gid: int) -> None:
    """Make ``uid``/``gid`` this thread's filesystem ids; setfsuid reports no error, so the
    ids are read back (an id of -1 changes nothing and returns the current one)."""
    syscalls.raw("setfsgid", ctypes.c_uint32(gid))
    syscalls.raw("setfsuid", ctypes.c_uint32(uid))
    if (
        syscalls.raw("setfsuid", ctypes.c_uint32(0xFFFFFFFF)) != uid
        or syscalls.raw("setfsgid", ctypes.c_uint32(0xFFFFFFFF)) != gid
    ):
        raise PermissionDeniedError(
            f"could not take uid {uid} gid {gid} to read as", errno=errno.EPERM
        )


@contextmanager
def reading_as(caller: Caller | None) -> Iterator[None]:
    """Inside this block the calling thread opens, lists and looks up files with ``caller``'s
    credentials (filesystem uid and gid, supplementary groups), as the kernel checks them;
    the process's other threads keep theirs. A no-op for None (the daemon itself) and root.

    From root, a non-zero filesystem uid also drops the capabilities that pass permission
    checks (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER ...); going back to 0 restores
    them. What is opened inside stays readable after the block, as any open file does."""
    if caller is None or caller.uid == 0:
        yield
        return
    uid_before = os.geteuid()
    gid_before = os.getegid()
    groups_before = tuple(os.getgroups())  # the calling thread's: a plain system call
    try:
        _set_thread_groups(caller.groups)
        _set_fs_ids(caller.uid, caller.gid)
        yield
    finally:
        _set_fs_ids(uid_before, gid_before)
        _set_thread_groups(groups_before)


def unreadable_by(caller: Caller, src: str | Path, path: str | bytes) -> PermissionDeniedError:
    """The EACCES of an import of ``src`` that ``caller`` may not read at ``path``."""
    return PermissionDeniedError(
        f"import of {src}: {os.fsdecode(path)} is not readable by uid {caller.uid}",
        errno=errno.EACCES,
    )


def check_readable(caller: Caller, src: str) -> None:
    """Raise EACCES naming the first path under ``src`` (``src`` included) that ``caller``
    may not read: a directory it may not list and search, a file it may not read. Root
    callers read anything and pass at once."""
    if caller.uid == 0:
        return
    parent_pid = os.getpid()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (of a threaded parent): system calls only, then _exit
        status = 1
        try:
            os.close(read_end)
            forks.die_with_parent(parent_pid)
            os.setgroups(list(caller.groups))
            os.setresgid(caller.gid, caller.gid, caller.gid)
            os.setresuid(caller.uid, caller.uid, caller.uid)
            code, path = _first_refusal(os.fsencode(src))
            os.write(write_end, b"%d\0" % code + path)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        answer = b""
        while chunk := os.read(read_end, 65536):
            answer += chunk
    finally:
        os.close(read_end)
        _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0 or b"\0" not in answer:
        raise CascowfsError(f"import of {src}: checking the caller's access failed")
    raw_code, path = answer.split(b"\0", 1)
    code = int(raw_code)
    if code == errno.EACCES:
        raise unreadable_by(caller, src, path)
    if code:
        raise CascowfsError(
            f"import of {src}: {os.fsdecode(path)}: {os.strerror(code)}", errno=code
        )


def _first_refusal(top: bytes) -> tuple[int, bytes]:
    """(errno, path) of the first entry under ``top`` the current credentials may not read,
    or (0, b"") if there is none. Symbolic links are not followed below ``top``; special files
    need no permission (an import records them without opening them)."""
    try:
        st = os.stat(top)  # as this caller: every directory on the way must be searchable
    except OSError as exc:
        return exc.errno or errno.EIO, top
    if not stat.S_ISDIR(st.st_mode):
        return 0, b""  # not importable at all: the import says so, as to root
    if not os.access(top, os.R_OK | os.X_OK):
        return errno.EACCES, top
    stack = [top]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if not os.access(entry.path, os.R_OK | os.X_OK, follow_symlinks=False):
                            return errno.EACCES, entry.path
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        if not os.access(entry.path, os.R_OK, follow_symlinks=False):
                            return errno.EACCES, entry.path
        except OSError as exc:
            return exc.errno or errno.EIO, path
    return 0, b""


# What opening an observation file asks: O_NONBLOCK, so that a FIFO given for a file does
# not hang the child (the commit then refuses it: not a regular file).
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


# The most symbolic links one resolution follows, as the kernel's own path walk allows.
_MAX_LINKS = 40


def resolve_trusting(path: str | bytes | os.PathLike[str], trusted: int | None) -> int:
    """An ``O_PATH`` descriptor of what ``path`` names, resolved a name at a time; with
    ``trusted`` set, a symbolic link on the way is followed only if root or uid ``trusted``
    owns it and no one else may change the directories that lead to it (``held_by``), and
    any other is EACCES naming it.

    Root reads everything, so a path that root follows through a link someone else placed
    reads what they chose: an agent that may write a directory on the path (its branch's
    tree, a shared ``/tmp``) links ``secret`` there to ``/root/secret``, or moves a link of
    root's there (it stays root's), and root's commit stores the target as the agent's
    observation. The kernel's ``fs.protected_symlinks`` stops the first only in sticky
    world-writable directories, and the second not at all. ELOOP past 40 links; ENOENT,
    ENOTDIR as ``open(2)``."""
    raw = os.fsencode(path)
    pending = [name for name in reversed(raw.split(b"/")) if name not in (b"", b".")]
    absolute = raw.startswith(b"/")
    fd = os.open(b"/" if absolute else b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    owners = (0, trusted)
    # per directory walked into: whether only ``owners`` may change the names leading to it
    # (a relative path's start is not known: nothing is); only asked with ``trusted``
    held = [absolute]
    served: frozenset[int] | None = None  # read from the mount table once it is needed

    def still_held(directory: int, entry: os.stat_result) -> bool:
        """Whether, past ``entry`` in the open ``directory``, only ``owners`` may change
        the names on the way."""
        nonlocal served
        if not held[-1]:
            return False
        here = os.fstat(directory)
        if held_by(here, entry, owners):
            return True
        if served is None:
            served = _served_devices()
        return here.st_dev in served

    followed = 0
    try:
        while pending:
            name = pending.pop()
            below = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            st = os.fstat(below)
            if not stat.S_ISLNK(st.st_mode):
                if trusted is not None and name != b"..":
                    held.append(still_held(fd, st))
                elif trusted is not None and len(held) > 1:
                    held.pop()  # back to the parent's answer
                os.close(fd)
                fd = below
                continue
            os.close(below)
            followed += 1
            if followed > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fsdecode(raw))
            if trusted is not None and st.st_uid not in owners:
                raise _not_followed(raw, name, f"a symbolic link of uid {st.st_uid}", trusted)
            if trusted is not None and not still_held(fd, st):
                raise _not_followed(raw, name, "a symbolic link another user may move", trusted)
            target = os.readlink(name, dir_fd=fd)
            if target.startswith(b"/"):
                os.close(fd)
                fd = os.open(b"/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                held = [True]
            pending.extend(n for n in reversed(target.split(b"/")) if n not in (b"", b"."))
        return fd
    except BaseException:
        os.close(fd)
        raise


def _served_devices() -> frozenset[int]:
    """The devices of cascowfs's mounts. Their directories show modes the daemon does not go
    by (``MNT/branches`` is 0777, so that a user's ``mkdir`` reaches the daemon and gets its
    EPERM): only root and the admin group change anything in them."""
    devices = set()
    for m in all_mounts():
        major, _, minor = m.device.partition(":")
        if m.fstype == FUSE_TYPE and major.isdigit() and minor.isdigit():
            devices.add(os.makedev(int(major), int(minor)))
    return frozenset(devices)


def held_by(directory: os.stat_result, entry: os.stat_result, owners: tuple) -> bool:
    """Whether only ``owners`` (uids) may rename or replace ``entry`` in ``directory``: the
    directory is theirs and no one else may write it, or it is sticky and ``entry`` is
    theirs."""
    if directory.st_uid not in owners:
        return False
    if not directory.st_mode & 0o022:
        return True
    return bool(directory.st_mode & stat.S_ISVTX) and entry.st_uid in owners


def _not_followed(path: bytes, name: bytes, what: str, trusted: int) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"{os.fsdecode(path)}: reached through {os.fsdecode(name)!r}, {what}, which is not "
        f"followed for uid {trusted}: give the path it points to",
        errno=errno.EACCES,
    )


def _open_regular(path: str, trusted: int | None) -> int:
    """``path`` open for reading (``resolve_trusting``), refused with EINVAL before it is
    opened unless it is a regular file: opening a device can act (a tape rewinds), opening a
    FIFO wakes its writer."""
    named = resolve_trusting(path, trusted)
    try:
        if not stat.S_ISREG(os.fstat(named).st_mode):
            raise InvalidArgumentError(f"{path} is not a regular file")
        return os.open(f"/proc/self/fd/{named}", _OPEN_FLAGS)  # that very file, reopened
    finally:
        os.close(named)


def open_as(caller: Caller | None, path: str) -> int:
    """Open the regular file ``path`` for reading as ``caller`` (None: the daemon itself) and
    return the descriptor: EACCES, ENOENT ... as that caller's own open(2) would fail,
    EINVAL for a file of another type, EACCES for a path through another user's symbolic
    link when the caller is root (``resolve_trusting``). A non-root caller's open runs in a
    child forked with its credentials, which passes the descriptor back over a socket
    pair."""
    what = f"observation {path}"
    if caller is None or caller.uid == 0:
        try:
            return _open_regular(path, 0)
        except OSError as exc:
            raise from_os_error(exc, what) from None
        except CascowfsError as exc:
            raise type(exc)(f"{what}: {exc.message}", errno=exc.errno) from None
    parent_pid = os.getpid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child (of a threaded parent): system calls only, then _exit
        status = 1
        try:
            os.close(ours.fileno())
            forks.die_with_parent(parent_pid)
            os.setgroups(list(caller.groups))
            os.setresgid(caller.gid, caller.gid, caller.gid)
            os.setresuid(caller.uid, caller.uid, caller.uid)
            try:
                fd = _open_regular(path, None)  # its own rights: any link it can follow
            except OSError as exc:
                theirs.sendall(b"%d" % (exc.errno or errno.EIO))
            except CascowfsError as exc:
                theirs.sendall(b"%d" % exc.errno)
            else:
                socket.send_fds(theirs, [b"0"], [fd])
            status = 0
        finally:
            os._exit(status)
    theirs.close()
    try:
        message, fds, _, _ = socket.recv_fds(ours, 64, 1)
    finally:
        ours.close()
        _, wait_status = os.waitpid(pid, 0)
    if fds:
        os.set_inheritable(fds[0], False)
        return fds[0]
    code = int(message) if message.isdigit() else 0
    if os.waitstatus_to_exitcode(wait_status) != 0 or not code:
        raise CascowfsError(f"{what}: opening it as uid {caller.uid} failed")
    if code == errno.EACCES:
        raise PermissionDeniedError(f"{what} is not readable by uid {caller.uid}", errno=code)
    raise from_os_error(OSError(code, os.strerror(code)), what)
