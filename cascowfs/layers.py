"""Layer directories: the native lower layers that branches are mounted on.

A layer is either a full tree (an import, or a flattened chain) or a delta in overlayfs's own
format (a committed branch's upper directory: whiteouts, opaque and redirected directories).
Layers are a cache: ``materialize`` rebuilds a full layer for any snapshot from the CAS.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from . import fsmeta
from .cas import ContentStore
from .model import Entry
from .trees import TreeStore, file_key


class _Writer:
    """Writes entries from the CAS into a layer directory, keeping hard-link groups."""

    def __init__(
        self, trees: TreeStore, content: ContentStore, progress: Callable[[int], None] | None
    ) -> None:
        self.trees = trees
        self.content = content
        self.linked: dict[bytes, bytes] = {}
        self.tick = progress or (lambda n: None)

    def _tree(self, tree_id: bytes) -> dict[bytes, Entry]:
        return self.trees.get(tree_id)

    def write_leaf(self, child: Entry, path: bytes) -> None:
        if child.link and child.link in self.linked:
            os.link(self.linked[child.link], path)
            return
        if child.is_file:
            fsmeta.write_file(
                path,
                self.content.pieces(child.ref),
                child.mode,
                child.uid,
                child.gid,
                child.mtime_ns,
                child.xattrs,
            )
            self.tick(child.size)
        else:
            if stat.S_ISLNK(child.mode):
                os.symlink(child.ref, path)
            else:
                fsmeta.make_node(path, child.mode, child.rdev)
            fsmeta.apply_metadata(
                path, child.mode, child.uid, child.gid, child.mtime_ns, child.xattrs
            )
        if child.link:
            self.linked[child.link] = path

    def write_dir(self, entry: Entry, path: bytes) -> None:
        """The whole subtree of a directory entry."""
        self._write(self._make_dir(path, None, entry))

    def write_delta(self, base: Entry | None, target: Entry, path: bytes) -> None:
        """Only what turns directory ``base`` into ``target``, in overlayfs's upper format."""
        self._write(self._make_dir(path, self._tree(base.ref) if base is not None else {}, target))

    def _write(self, top: _Dir) -> None:
        # depth first with a stack of the directories being written, not a recursion: a tree
        # may be deeper than Python's recursion limit
        stack = [top]
        while stack:
            sub = self._write_children(stack[-1])
            if sub is not None:
                stack.append(sub)
                continue
            done = stack.pop()
            _set_dir_metadata(done.path, done.target)
            if done.opaque:  # a directory replacing a file hides nothing below
                os.setxattr(done.path, b"trusted.overlay.opaque", b"y")

    def _make_dir(
        self, path: bytes, before: dict[bytes, Entry] | None, target: Entry, opaque: bool = False
    ) -> _Dir:
        """Directory ``path`` made, to hold ``target``'s listing, or (``before`` given) what
        turns listing ``before`` into it: there, whiteouts for the names it drops."""
        os.mkdir(path, 0o700)
        after = self._tree(target.ref)
        if before is not None:
            for name in before.keys() - after.keys():
                os.mknod(path + b"/" + name, stat.S_IFCHR, 0)  # whiteout
        return _Dir(path, target, before, iter(after.items()), opaque)

    def _write_children(self, d: _Dir) -> _Dir | None:
        """Write ``d``'s next entries in order up to its next subdirectory to write, which is
        made and returned, to be written before the rest; None once ``d`` has no more."""
        before = d.before
        for name, t in d.children:
            child = d.path + b"/" + name
            if before is None:  # the whole subtree
                if t.is_dir:
                    return self._make_dir(child, None, t)
                self.write_leaf(t, child)
                continue
            b = before.get(name)
            if b is t:
                continue  # the same entry object: unchanged (most of a large directory)
            if t.is_dir:
                if b is not None and b.is_dir:
                    if b == t:
                        continue  # same subtree, same attributes: the lower layer shows it
                    return self._make_dir(child, self._tree(b.ref), t)
                return self._make_dir(child, None, t, opaque=b is not None)
            elif b is None or b.is_dir or file_key(b) != file_key(t):
                self.write_leaf(t, child)
        return None


class _Dir(NamedTuple):
    """A directory a ``_Writer`` is writing: its entries still to write, in order."""

    path: bytes
    target: Entry  # the directory's entry, its metadata set once its entries are written
    before: dict[bytes, Entry] | None  # a delta's listing below (None: the whole subtree)
    children: Iterator[tuple[bytes, Entry]]
    opaque: bool  # marked opaque once written: it replaces a file


def _set_dir_metadata(path: bytes, entry: Entry) -> None:
    fsmeta.apply_metadata(path, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs)


def materialize(
    trees: TreeStore,
    content: ContentStore,
    root: Entry,
    dst: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the full tree of a snapshot from the CAS into ``dst`` (which must not exist)."""
    _Writer(trees, content, progress).write_dir(root, os.fsencode(dst))


def materialize_delta(
    trees: TreeStore, content: ContentStore, base: Entry | None, root: Entry, dst: Path
) -> None:
    """Write, as one overlay layer over layers showing ``base`` (None: nothing), what turns
    that tree into ``root``: changed entries, whiteouts for deleted ones."""
    _Writer(trees, content, None).write_delta(base, root, os.fsencode(dst))


def set_root_metadata(path: Path, root: Entry | None) -> None:
    """Make a branch's upper root show the snapshot root's own attributes (overlayfs takes the
    root's attributes from the upper directory)."""
    if root is None:
        return
    fsmeta.apply_metadata(
        os.fsencode(path), root.mode, root.uid, root.gid, root.mtime_ns, root.xattrs
    )


_RM = shutil.which("rm")
REMOVER_NICE = 19
CANCEL_POLL_S = 0.1  # how often ``remove_trees`` looks at its ``cancel`` event


def remove_trees(paths: list[Path], cancel: threading.Event | None = None) -> bool:
    """Delete whole trees in a child process at idle priority, never descending into a mount:
    deleting a big layer is seconds of syscalls that would otherwise hold the daemon's GIL.
    (Deleting a discarded branch's few dozen entries in this process instead was slower in
    the 4-agent mix: it took GIL time from the operations, while the child runs on the core
    they leave idle.) A tree that holds a mount point keeps that mount point, and the
    directories above it, until a later call.

    The child is ``rm`` itself, reniced to 19 once started: starting it through ``ionice -c
    3 nice -n 19 rm`` cost three execs, 3.4 ms of CPU a round against 1.1 ms, and in the
    4-agent mix the rounds' children used a third of a core, mostly on those execs. Not
    ``SCHED_IDLE``: an rm starved while it holds a journal handle stalls every writer of the
    filesystem (a 5.6 s stall of all operations was seen with it, under a profiler's load).

    ``cancel`` set: the child is ended and the rest stays for a later call (a shutdown does
    not wait for thousands of trees). Returns False if so."""
    if cancel is not None and cancel.is_set():
        return False
    if _RM is not None:
        child = subprocess.Popen(
            [_RM, "-rf", "--one-file-system", "--", *map(str, paths)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            os.setpriority(os.PRIO_PROCESS, child.pid, REMOVER_NICE)
        except OSError:
            pass  # done already: nothing to lower
        while True:
            try:
                child.wait(timeout=CANCEL_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    child.kill()  # a stopped rm too; what it leaves is deleted later
                    child.wait()
                    return False
    for path in paths:  # whatever rm could not remove, or all of it without rm
        if cancel is not None and cancel.is_set():
            return False
        remove_within_filesystem(path)
    return True


def remove_within_filesystem(path: Path) -> None:
    """Delete the tree at ``path`` (missing is fine) like ``rm -rf --one-file-system``: a
    directory on another device (a mount point) is not entered, and it and the directories
    above it stay.

    The tree may be a discarded branch's upper, which a process still inside the branch's
    detached overlay changes as it is deleted: it may swap a directory for a symbolic link
    to, say, /etc, between the listing and the unlink. So no name is resolved through
    another: each directory is opened by its name relative to its parent's descriptor with
    ``O_NOFOLLOW`` and is deleted only if it is the directory listed (device and inode), and
    each unlink and rmdir is relative to the descriptor of the directory holding the name.
    An entry that is not what its listing said stays, and so the directory holding it fails
    to go (ENOTEMPTY), as when something is written into the tree meanwhile. ``rm`` is as
    safe: coreutils walks with gnulib's fts (``FTS_CWDFD | FTS_PHYSICAL``), which opens each
    directory with ``openat(..., O_NOFOLLOW)`` from its parent's descriptor, and removes with
    ``unlinkat`` relative to the directory's.

    The walk holds one descriptor per level, not a recursion: a tree deeper than the open
    files left under RLIMIT_NOFILE (20,000 on the development machine) fails with
    EMFILE, what was deleted gone and the rest there."""
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _remove_at(parent, path.name)
    finally:
        os.close(parent)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Deleting:
    """A directory being deleted by ``_remove_at``: open, listed, its files unlinked."""

    fd: int
    name: str  # its name in the directory above
    subdirs: list[os.DirEntry[str]]  # on the tree's device, still to delete
    kept: bool = False  # it holds a mount point, or a directory above one: it stays


def _remove_at(parent: int, name: str) -> None:
    """``remove_within_filesystem`` of the entry ``name`` in directory ``parent``."""
    try:
        top = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        _delete(os.unlink, name, parent)
        return
    fd = _open_listed(parent, name, top)
    if fd is None:
        return
    stack = [_Deleting(fd, name, [])]
    try:
        _empty_files(stack[-1], top.st_dev)
        while stack:
            level = stack[-1]
            if level.subdirs:
                sub = level.subdirs.pop()
                fd = _open_listed(level.fd, sub.name, sub.stat(follow_symlinks=False))
                if fd is not None:
                    stack.append(_Deleting(fd, sub.name, []))
                    _empty_files(stack[-1], top.st_dev)
                continue
            stack.pop()
            os.close(level.fd)
            holder = stack[-1] if stack else None
            try:
                _delete(os.rmdir, level.name, parent if holder is None else holder.fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY) or not level.kept:
                    raise
                if holder is not None:
                    holder.kept = True
    finally:
        for level in stack:
            os.close(level.fd)


def _open_listed(parent: int, name: str, listed: os.stat_result) -> int | None:
    """A descriptor of the directory ``name`` in ``parent`` if it is still the one
    ``listed``; None if it is gone or is something else now (a link swapped in)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link now
            return None
        raise
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
        os.close(fd)
        return None
    return fd


def _empty_files(level: _Deleting, device: int) -> None:
    """List ``level``'s directory, unlink all but its directories, and note those on
    ``device`` as still to delete (a directory on another is a mount point: it stays)."""
    files: list[str] = []
    with os.scandir(level.fd) as it:  # listed whole, then changed: as fts does
        for entry in it:
            if not entry.is_dir(follow_symlinks=False):
                files.append(entry.name)
                continue
            try:
                on_device = entry.stat(follow_symlinks=False).st_dev == device
            except FileNotFoundError:
                continue
            if on_device:
                level.subdirs.append(entry)
            else:
                level.kept = True
    for name in files:
        _delete(os.unlink, name, level.fd)


def _delete(remove: Callable[..., None], name: str, dir_fd: int) -> None:
    """``remove(name)`` in the directory open as ``dir_fd``; missing is fine, and a
    read-only directory is made writable first."""
    try:
        remove(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.chmod(dir_fd, 0o700)
        remove(name, dir_fd=dir_fd)
