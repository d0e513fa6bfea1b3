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
from collections.abc import Callable
from pathlib import Path

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
        os.mkdir(path, 0o700)
        for name, child in self._tree(entry.ref).items():
            if child.is_dir:
                self.write_dir(child, path + b"/" + name)
            else:
                self.write_leaf(child, path + b"/" + name)
        _set_dir_metadata(path, entry)

    def write_delta(self, base: Entry | None, target: Entry, path: bytes) -> None:
        """Only what turns directory ``base`` into ``target``, in overlayfs's upper format."""
        os.mkdir(path, 0o700)
        before = self._tree(base.ref) if base is not None else {}
        after = self._tree(target.ref)
        for name in before.keys() - after.keys():
            os.mknod(path + b"/" + name, stat.S_IFCHR, 0)  # whiteout
        for name, t in after.items():
            b = before.get(name)
            if b is t:
                continue  # the same entry object: unchanged (most of a large directory)
            child = path + b"/" + name
            if t.is_dir:
                if b is not None and b.is_dir:
                    if b == t:
                        continue  # same subtree, same attributes: the lower layer shows it
                    self.write_delta(b, t, child)
                else:
                    self.write_dir(t, child)
                    if b is not None:  # a directory replacing a file hides nothing below
                        os.setxattr(child, b"trusted.overlay.opaque", b"y")
            elif b is None or b.is_dir or file_key(b) != file_key(t):
                self.write_leaf(t, child)
        _set_dir_metadata(path, target)


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
    above it stay."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        _delete(os.unlink, os.fspath(path))
        return
    files: list[str] = []
    dirs = [os.fspath(path)]  # parents before children: removed in reverse
    crossing = False
    for d in dirs:
        with os.scandir(d) as it:
            for entry in it:
                if not entry.is_dir(follow_symlinks=False):
                    files.append(entry.path)
                elif entry.stat(follow_symlinks=False).st_dev == top.st_dev:
                    dirs.append(entry.path)
                else:
                    crossing = True  # a mount point: neither it nor its parents can go
    for f in files:
        _delete(os.unlink, f)
    for d in reversed(dirs):
        try:
            _delete(os.rmdir, d)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY) or not crossing:
                raise


def _delete(remove: Callable[[str], None], path: str) -> None:
    """``remove(path)``; missing is fine, and a read-only parent is made writable first."""
    try:
        remove(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.chmod(os.path.dirname(path), 0o700)
        remove(path)
