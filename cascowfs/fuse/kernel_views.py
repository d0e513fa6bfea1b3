"""Snapshots read by the kernel: what ``MNT/snapshots/<id>/`` holds, served by a read-only
overlayfs of the snapshot's layers.

Served through the daemon, every readdir and open of a snapshot costs a round trip to Python
(pyfuse3 offers neither ``cache_readdir`` nor passthrough). A snapshot's layer chain already
shows exactly its tree (``fsck --deep`` checks it), so the kernel can serve the reads, as ZFS
serves ``.zfs/snapshot/<name>``: a *view* of a snapshot is an overlay of its chain, mounted on
first access, expired when idle, detached on prune.

* **What is mounted where.** The snapshot's own directory stays the daemon's: its attributes,
  its ``user.cascowfs.*`` names, ``rmdir`` (prune) and every refused change behave as without
  views (the kernel refuses ``rmdir`` and ``rename`` of a mount point with EBUSY before
  asking the daemon). Each directory and regular file *in* it gets the matching part of the
  overlay bound onto it (``open_tree(OPEN_TREE_CLONE)`` from an overlay that is never attached
  itself): everything below the root is read by the kernel. Symlinks and special files at
  the root stay the daemon's. A root of more than ``MAX_BOUND`` entries gets no view.
* **Attach.** The first lookup or opendir in a snapshot that reaches the daemon is answered
  as before, and asks for a view; a lookup of the snapshot itself does not (``stat``,
  ``getfattr``, ``ls -l MNT/snapshots``, and the lookup ``rmdir`` makes first). A worker
  thread then holds the chain's layers (``StateManager.hold_snapshot_layers``: a merge cannot
  delete them under the view) and binds the root's entries. Not inside the request: binding
  resolves paths in MNT, which the kernel makes wait for the very dentry the request is
  answering. A path walk that starts after the binding crosses into the view; what was
  opened before stays on the daemon's.
* **Expire.** Every ``idle_seconds`` each bound entry gets ``umount2(MNT_EXPIRE)``: the first
  call marks it, any use clears the mark, a second call on a still-marked one unmounts it,
  one in use (an open file, a working directory) answers EBUSY. The next read of an expired
  entry that reaches the daemon binds it again; a view with nothing bound lets go of its
  layers.
* **Detach.** Prune and shutdown detach lazily (``MNT_DETACH``): a process reading a file it
  opened keeps reading it. ``rmdir MNT/snapshots/<id>`` prunes and detaches while the kernel
  holds ``MNT/snapshots`` and the snapshot's directory locked for it, and an attach or expiry
  in progress may be waiting for those very locks in a path lookup: so the rmdir waits for
  neither. It detaches the entries bound so far (their mount points are cached dentries, so
  their paths resolve under the locks) and marks the snapshot pruned. An attach in progress
  then fails at its next lookup, or detaches what it bound meanwhile through the descriptor
  ``clone_into`` returned (the path is gone with the directory). The view's layers are let
  go once no attach or expiry runs.
* **Fallback.** A view the kernel refuses is logged and the snapshot stays on the daemon's
  view; ``CASCOWFS_SNAPSHOT_VIEWS=fuse`` in the daemon's environment keeps every snapshot
  there.

Views are told apart in the mount table by their source, ``cascowfs-snapshot:<store>``: a
daemon killed with views mounted leaves them under its dead FUSE mount, and the next mount or
``cascowfs umount --branches`` detaches them (``detach_views``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .. import overlay
from ..errors import CascowfsError
from .sysmount import MNT_DETACH, store_source, umount2

if TYPE_CHECKING:
    from ..state import StateManager

log = logging.getLogger("cascowfs.views")

VIEW_SOURCE = "cascowfs-snapshot:"
ENV_SWITCH = "CASCOWFS_SNAPSHOT_VIEWS"  # "fuse": every snapshot is served by the daemon
ENV_IDLE = "CASCOWFS_SNAPSHOT_VIEWS_IDLE"  # seconds between expiry rounds
IDLE_SECONDS = 60.0  # a view unused for one to two of these is unmounted
MAX_BOUND = 256  # entries of a snapshot root a view binds at most (one mount each)
MNT_EXPIRE = 4


def kernel_views_wanted() -> bool:
    """Does the environment allow kernel views (``CASCOWFS_SNAPSHOT_VIEWS`` unset or
    ``kernel``)?"""
    return os.environ.get(ENV_SWITCH, "kernel") != "fuse"


def idle_seconds() -> float:
    """Seconds between two rounds of idle expiry (``CASCOWFS_SNAPSHOT_VIEWS_IDLE``, else
    ``IDLE_SECONDS``)."""
    try:
        value = float(os.environ.get(ENV_IDLE, IDLE_SECONDS))
    except ValueError:
        return IDLE_SECONDS
    return value if value > 0 else IDLE_SECONDS


def view_source(store: Path) -> str:
    """The mount-table source of the views of ``store``'s snapshots."""
    return VIEW_SOURCE + store_source(store)


def detach_views(store: Path | None = None, under: Path | None = None) -> int:
    """Lazily detach the snapshot views of ``store`` (None: of any store) mounted under
    ``under`` (None: anywhere); returns how many. Used after a kill -9 and before unmounting
    MNT, which the views mounted on it would keep busy."""
    want = view_source(store) if store is not None else None
    base = str(under).rstrip("/") + "/" if under is not None else "/"
    count = 0
    for m in reversed(overlay.all_mounts()):
        if m.fstype != "overlay" or not m.source.startswith(VIEW_SOURCE):
            continue
        if (want is not None and m.source != want) or not (m.target + "/").startswith(base):
            continue
        try:
            umount2(m.target, MNT_DETACH)
            count += 1
        except OSError as exc:  # gone meanwhile, or its dead FUSE mount went first
            log.debug("detaching snapshot view %s: %s", m.target, exc)
    return count


@dataclass
class View:
    id: str
    chain: list[str]  # the layers it holds
    names: list[bytes]  # the root's entries it binds
    mnt_fd: int  # the overlay, attached nowhere: the source of every binding
    bound: set[bytes] = field(default_factory=set)  # the entries bound now
    let_go: bool = False  # its layers released and its descriptor closed (``_forget``)


class KernelViews:
    """The kernel views of one daemon's snapshots. ``wanted`` runs on the trio thread; the
    rest in worker threads, one at a time (they resolve paths in MNT, which the trio thread
    answers)."""

    def __init__(self, sm: StateManager, mnt: Path, idle_seconds: float = IDLE_SECONDS) -> None:
        self.sm = sm
        self.mnt = mnt
        self.idle_seconds = idle_seconds
        self.source = view_source(sm.store)
        self._lock = threading.Lock()  # the tables below
        self._mounting = threading.Lock()  # one attach, expiry or detach at a time
        self._views: dict[str, View] = {}
        self._pending: set[str] = set()
        self._refused: set[str] = set()  # no view for these: served by the daemon
        self._pruned: set[str] = set()  # pruned by an rmdir that did not wait (see Detach)
        # set by ``stop``: the daemon is going away, and soon answers no path walk in MNT
        self._stopping = threading.Event()

    def target(self, id: str) -> Path:
        return self.mnt / "snapshots" / id

    def _point(self, id: str, name: bytes) -> str:
        return os.fsdecode(os.fsencode(self.target(id)) + b"/" + name)

    def mounted(self) -> list[str]:
        with self._lock:
            return sorted(self._views)

    def may_hold(self, id: str) -> bool:
        """Whether snapshot ``id`` may have a view: one attached, or an attach asked for.
        A snapshot pruned while this says False gets none: its attach would find it gone."""
        with self._lock:
            return id in self._views or id in self._pending

    def wanted(self, id: str) -> bool:
        """Should snapshot ``id``'s view be attached, or its expired entries bound again,
        now? (True: the caller runs ``attach``, which clears the pending mark)."""
        with self._lock:
            if id in self._pending or id in self._refused:
                return False
            view = self._views.get(id)
            if view is not None and len(view.bound) == len(view.names):
                return False
            self._pending.add(id)
            return True

    def attach(self, id: str) -> None:
        """Mount the view of snapshot ``id`` (or bind its expired entries again); a failure
        leaves the snapshot on the daemon's view."""
        with self._mounting:
            if self._stopping.is_set():
                with self._lock:
                    self._pending.discard(id)
                return
            with self._lock:
                view = self._views.get(id)
            try:
                if view is None:
                    view = self._new_view(id)
                    with self._lock:
                        if view is not None:
                            self._views[id] = view
                if view is not None:
                    self._bind(view)
            except (CascowfsError, OSError) as exc:
                with self._lock:
                    self._refused.add(id)
                    pruned = id in self._pruned  # its directory went while binding
                gone = pruned or not self.sm.has_snapshot(id)  # or before this began
                log.log(
                    logging.DEBUG if gone else logging.WARNING,
                    "snapshot %s stays on the FUSE view: %s",
                    id,
                    exc,
                )
                if view is not None:
                    self._forget(view)
            finally:
                with self._lock:
                    self._pending.discard(id)
        if view is not None and not self.sm.has_snapshot(id):  # pruned meanwhile
            self.detach(id)

    def _new_view(self, id: str) -> View | None:
        root = self.sm.root_entry(id)
        names = [n for n, e in self.sm.read_tree(root.ref).items() if e.is_dir or e.is_file]
        if len(names) > MAX_BOUND:
            raise CascowfsError(f"its root holds {len(names)} entries, more than {MAX_BOUND}")
        if not names:
            return None  # nothing below the root: nothing to serve faster
        chain, lowers = self.sm.hold_snapshot_layers(id)
        try:
            # an overlay needs two lower layers when it has no upper one
            stack = lowers if len(lowers) > 1 else [*lowers, self.sm.empty_dir]
            mnt_fd = overlay.overlay_mount_fd(
                self.target(id), stack, readonly=True, source=self.source
            )
        except BaseException:
            self.sm.release_layers(chain)
            raise
        return View(id, chain, names, mnt_fd)

    def _bind(self, view: View) -> None:
        dir_fd = os.open(self.target(view.id), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in view.names:
                if name in view.bound:
                    continue
                mount_fd = overlay.clone_into(view.mnt_fd, name, dir_fd, name)
                try:
                    with self._lock:
                        pruned = view.id in self._pruned
                        if not pruned:
                            view.bound.add(name)
                    if pruned:  # by an rmdir meanwhile, which detached what it found bound
                        overlay.unmount_by_fd(mount_fd)
                        return
                finally:
                    os.close(mount_fd)
        finally:
            os.close(dir_fd)

    def _forget(self, view: View) -> None:
        """Detach what ``view`` has bound, and let go of its layers (once)."""
        with self._lock:
            if self._views.get(view.id) is view:
                del self._views[view.id]
            names, view.bound = sorted(view.bound), set()
            if view.let_go:
                return
            view.let_go = True
        self._unmount(view.id, names)
        os.close(view.mnt_fd)
        self.sm.release_layers(view.chain)

    def _unmount(self, id: str, names: list[bytes]) -> None:
        for name in names:
            try:
                overlay.unmount(Path(self._point(id, name)))
            except (CascowfsError, OSError) as exc:  # gone with its dentry already
                log.debug("detaching the view of %s at %r: %s", id, name, exc)

    def detach(self, id: str) -> None:
        """Detach the view of snapshot ``id`` (lazily: open files keep reading)."""
        with self._mounting:
            self._detach_held(id)

    def prune(self, id: str) -> None:
        """Prune snapshot ``id``, then detach the entries of its view, for an ``rmdir`` of its
        directory, which the kernel holds locked until this returns: without waiting for an
        attach or expiry in progress (module docstring, Detach). ``detach(id)`` afterwards
        lets go of the view's layers."""
        self.sm.prune(id)
        names: list[bytes] = []
        with self._lock:
            self._pruned.add(id)
            view = self._views.get(id)
            if view is not None:
                names, view.bound = sorted(view.bound), set()
        self._unmount(id, names)

    def _detach_held(self, id: str) -> None:
        with self._lock:
            view = self._views.get(id)
            self._refused.discard(id)  # a snapshot made again under this id: a new chance
            self._pruned.discard(id)
        if view is not None:
            self._forget(view)

    def stop(self) -> None:
        """Mount, bind and expire nothing more: each resolves paths in MNT, and a daemon that
        stopped answering them would leave the thread, and every caller, waiting for good.
        Returns once none of them runs any more (``detach_all`` then detaches the views)."""
        self._stopping.set()
        with self._mounting:
            pass

    def detach_all(self) -> None:
        for id in self.mounted():
            self.detach(id)
        detach_views(self.sm.store, self.mnt)  # any left by an attach that raced the shutdown

    def expire(self) -> None:
        """One round of idle expiry: an entry unused since the last round is unmounted; a
        view with nothing bound any more lets go of its layers."""
        with self._mounting:
            if self._stopping.is_set():
                return
            with self._lock:
                views = list(self._views.values())
            for view in views:
                for name in sorted(view.bound):
                    if _expired(self._point(view.id, name)):
                        view.bound.discard(name)
                if not view.bound:
                    log.debug("view of snapshot %s expired", view.id)
                    self._forget(view)

    async def expire_forever(self) -> None:
        while True:
            await trio.sleep(self.idle_seconds)
            await trio.to_thread.run_sync(self.expire)


def _expired(point: str) -> bool:
    """``umount2(MNT_EXPIRE)`` of the binding at ``point``: True once it is gone."""
    try:
        umount2(point, MNT_EXPIRE)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return False  # marked now, or used since; in use
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            log.warning("expiring the snapshot view at %s: %s", point, exc)
            return False
        # EINVAL, ENOENT: not mounted any more (its dentry was invalidated)
    return True
