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
* **Budget.** Every bound entry is a mount in the daemon's mount namespace, the host's,
  which the kernel caps at ``fs.mount-max`` (100,000 by default): past it every mount fails
  with ENOSPC, a branch's and a ``mount`` of root's alike, and any local user makes views by
  reading. So the mounts all views hold (each bound entry, and one per layer of its chain,
  an image the view keeps mounted) are at most ``budget.total`` (``ViewBudget``:
  ``VIEW_MOUNTS_MAX``, and never more than ``MOUNT_MAX_SHARE`` of what ``fs.mount-max``
  leaves free when the daemon starts), and those of the views a uid outside the admin group
  asked for last at most ``budget.per_uid``. A view that would pass either first takes the room of
  the least recently used views (attached or seen in use by an expiry round longest ago):
  their entries are unmounted, not lazily, so an entry in use (an open file, a working
  directory) answers EBUSY and stays, and a view whose snapshot is being walked (its root
  open on the daemon's view: ``cp -a``, ``tar``) stays whole; a caller outside the admin
  group takes only the room of views no admin asked for last. If that does not make room,
  the snapshot stays on the daemon's view (its reads are answered as without views), and
  the uid's next views are not tried for ``NO_ROOM_RETRY_SECONDS``.
* **Queue.** Attaches run one at a time in a thread of their own (``attaching``), detaches
  and expiry in another (``detaching``), never in trio's default pool that commits, branches
  and ``status`` wait for; and a detach or expiry waiting goes before every attach waiting
  (``_Turns``). Any reader asks for attaches, a heavy one each (layers held, built if need be,
  an overlay, a mount per root entry), so few may wait: one per uid outside the admin group
  and ``OUTSIDER_ATTACHES_WAITING`` of all such uids together; past that the snapshot is
  served by the daemon's view, and a later read asks again. Unbounded, one user opening
  every snapshot's root in a loop queued an attach per snapshot in that default pool, and
  every agent's commit and branch waited behind all of them.
* **Fallback.** A view the kernel refuses is logged and the snapshot stays on the daemon's
  view; ``CASCOWFS_SNAPSHOT_VIEWS=fuse`` in the daemon's environment keeps every snapshot
  there.

Views are told apart in the mount table by their source, ``cascowfs-snapshot:<store>``: a
daemon killed with views mounted leaves them under its dead FUSE mount, and the next mount or
``cascowfs umount --branches`` detaches them (``detach_views``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
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

# The budget of the mounts all views hold (module docstring, Budget). 395 snapshots of 256
# root entries, one file of each read by ``nobody``, took the host's mount table to 99,999
# of its 100,000 in 15 s; then root's branch and every other mount failed. 4,096 mounts hold
# 15 views of MAX_BOUND entries, or some 90 of a repository's 30-entry root on a 15-layer
# chain: more snapshots than are read at one time (idle expiry unmounts an entry in one to
# two minutes), and 4,096 more lines keep the mount table cheap to read for systemd,
# findmnt and the mount calls that walk it.
VIEW_MOUNTS_MAX = 4096
ENV_MAX = "CASCOWFS_SNAPSHOT_VIEWS_MAX"  # another budget (still capped by the share below)
ENV_UID_MAX = "CASCOWFS_SNAPSHOT_VIEWS_UID_MAX"  # another share of a uid (UID_SHARE below)
# ... and at most a tenth of the mounts fs.mount-max leaves free when the daemon starts: the
# rest, 90% at least, stays for branches (an overlay and its layer images each), and for
# whatever else the host mounts, which the daemon cannot see coming.
MOUNT_MAX_SHARE = 0.1
MOUNT_MAX_DEFAULT = 100_000  # the kernel's default, where /proc/sys/fs/mount-max is missing
# A uid outside the admin group holds a quarter of the budget at most (1,024 mounts: three
# views of MAX_BOUND entries, some 20 of a 30-entry root): one user cannot take the budget
# from root's agents, and four together cannot keep an admin from any: an admin's view takes
# the room of other users' idle views.
UID_SHARE = 0.25
# A uid whose view found no room is not tried again for this long: each read that reaches the
# daemon would otherwise cost a worker thread to find the budget still full.
NO_ROOM_RETRY_SECONDS = 5.0
# Attaches asked for by callers outside the admin group that may wait (or run) at once: one
# per uid, and these for all such uids together (module docstring, Queue). An admin's are
# bounded by the snapshots it reads (one pending each), and wait behind these four at most.
UID_ATTACHES_WAITING = 1
OUTSIDER_ATTACHES_WAITING = 4


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


@dataclass(frozen=True)
class ViewBudget:
    """How many mounts all views hold at most (``total``), and the views one uid outside the
    admin group asked for last (``per_uid``)."""

    total: int
    per_uid: int

    @classmethod
    def of(cls, total: int, per_uid: int | None = None) -> ViewBudget:
        total = max(0, total)
        share = int(total * UID_SHARE) if per_uid is None else per_uid
        return cls(total, max(0, min(share, total)))

    @classmethod
    def from_system(cls) -> ViewBudget:
        """``VIEW_MOUNTS_MAX`` (``CASCOWFS_SNAPSHOT_VIEWS_MAX`` if set), capped by
        ``MOUNT_MAX_SHARE`` of what ``fs.mount-max`` leaves free now; a uid's share
        ``UID_SHARE`` of it (``CASCOWFS_SNAPSHOT_VIEWS_UID_MAX`` if set)."""
        wanted = _env_count(ENV_MAX)
        free = mount_max() - mounts_now()
        total = min(VIEW_MOUNTS_MAX if wanted is None else wanted, int(free * MOUNT_MAX_SHARE))
        budget = cls.of(total, _env_count(ENV_UID_MAX))
        log.info(
            "snapshot views: %d mounts at most, %d for a uid outside the admin group (%d of "
            "fs.mount-max free)",
            budget.total,
            budget.per_uid,
            free,
        )
        return budget


def _env_count(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def mount_max() -> int:
    """``fs.mount-max``: the mounts one mount namespace may hold."""
    try:
        return int(Path("/proc/sys/fs/mount-max").read_text())
    except (OSError, ValueError):
        return MOUNT_MAX_DEFAULT


def mounts_now() -> int:
    """The mounts in this process's mount namespace."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


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
    uid: int = 0  # who asked for it last: whose share its entries count against
    admin: bool = True  # and whether that caller is root or of the admin group
    used: float = 0.0  # when last asked for, or seen in use by expiry (monotonic)


class _Turns:
    """One attach, expiry or detach at a time (each resolves paths in MNT, and the budget's
    arithmetic counts on it), and a detach or expiry waiting goes before every attach
    waiting: what any reader asks for must not hold up a prune."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = False
        self.first = 0  # turns of detaches and expiries waiting

    @contextlib.contextmanager
    def turn(self, first: bool) -> Iterator[None]:
        """The turn of an attach (``first`` False) or of a detach or expiry (True)."""
        with self._changed:
            self.first += first
            try:
                while self._busy or (not first and self.first):
                    self._changed.wait()
            finally:
                self.first -= first
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


class KernelViews:
    """The kernel views of one daemon's snapshots. ``wanted`` runs on the trio thread; the
    rest in worker threads, one at a time (they resolve paths in MNT, which the trio thread
    answers): attaches in ``attaching``'s thread, detaches and expiry in ``detaching``'s
    (module docstring, Queue)."""

    def __init__(
        self,
        sm: StateManager,
        mnt: Path,
        idle_seconds: float = IDLE_SECONDS,
        budget: ViewBudget | None = None,
    ) -> None:
        self.sm = sm
        self.mnt = mnt
        self.idle_seconds = idle_seconds
        self.budget = budget if budget is not None else ViewBudget.from_system()
        self.source = view_source(sm.store)
        self._lock = threading.Lock()  # the tables below
        self._turns = _Turns()  # one attach, expiry or detach at a time, detaches first
        # their threads, apart from trio's default pool (module docstring, Queue)
        self.attaching = trio.CapacityLimiter(1)
        self.detaching = trio.CapacityLimiter(1)
        self._views: dict[str, View] = {}
        self._pending: set[str] = set()
        self._waiting: Counter[int] = Counter()  # uid outside the admin group -> its pending
        self._waiting_of: dict[str, int] = {}  # pending snapshot -> that uid
        self._refused: set[str] = set()  # no view for these: served by the daemon
        self._pruned: set[str] = set()  # pruned by an rmdir that did not wait (see Detach)
        self._no_room: dict[int, float] = {}  # uid -> when its views may be tried again
        # whether a walk of a snapshot is under way on the daemon's view (its root open
        # there): its view is not evicted, or the walk would cross from one view to the other
        self.walking: Callable[[str], bool] = lambda id: False
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

    def wanted(self, id: str, uid: int, is_admin: Callable[[], bool]) -> Callable[[], None] | None:
        """The attach to run in ``attaching``'s thread if snapshot ``id``'s view should be
        attached, or its expired entries bound again, now, for a read by ``uid``
        (``is_admin``: whether it is root or of the admin group, asked only then); None if
        not, or if too many attaches wait (module docstring, Queue). The attach clears the
        pending mark."""
        with self._lock:
            if id in self._pending or id in self._refused:
                return None
            view = self._views.get(id)
            if view is not None and len(view.bound) == len(view.names):
                return None
            retry = self._no_room.get(uid)
            if retry is not None:
                if time.monotonic() < retry:
                    return None
                del self._no_room[uid]
        admin = is_admin()  # may read /proc: outside the lock, and only for an attach
        with self._lock:
            if not admin:
                if self._waiting[uid] >= UID_ATTACHES_WAITING or (
                    sum(self._waiting.values()) >= OUTSIDER_ATTACHES_WAITING
                ):
                    return None
                self._waiting[uid] += 1
                self._waiting_of[id] = uid
            self._pending.add(id)
        return functools.partial(self.attach, id, uid, admin)

    def _unpend(self, id: str) -> None:
        """Snapshot ``id``'s attach is over (under ``_lock``)."""
        self._pending.discard(id)
        uid = self._waiting_of.pop(id, None)
        if uid is not None:
            self._waiting[uid] -= 1
            if self._waiting[uid] <= 0:
                del self._waiting[uid]

    def attach(self, id: str, uid: int = 0, admin: bool = True) -> None:
        """Mount the view of snapshot ``id`` (or bind its expired entries again) for a read
        by ``uid`` (``admin``: root or of the admin group), if the budget has room or can be
        given some (module docstring, Budget); a failure, or no room, leaves the snapshot
        on the daemon's view."""
        with self._turns.turn(first=False):
            if self._stopping.is_set():
                with self._lock:
                    self._unpend(id)
                return
            with self._lock:
                view = self._views.get(id)
            try:
                if view is None:
                    names, chain = self._plan(id)
                    if names and not self._make_room(id, len(names) + len(chain), uid, admin):
                        self._no_room_for(uid, None, id)
                        return
                    view = self._new_view(id, names, uid, admin)
                    with self._lock:
                        if view is not None:
                            self._views[id] = view
                elif not self._make_room(id, len(view.names) - len(view.bound), uid, admin):
                    self._no_room_for(uid, view, id)
                    return
                if view is not None:
                    with self._lock:
                        view.uid, view.admin, view.used = uid, admin, time.monotonic()
                    self._bind(view)
            except (CascowfsError, OSError) as exc:
                if getattr(exc, "errno", None) == errno.ENOSPC:  # the host's mounts filled
                    self._no_room_for(uid, view, id, f"the mount table is full: {exc}")
                    return
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
                    self._unpend(id)
        if view is not None and not self.sm.has_snapshot(id):  # pruned meanwhile
            self.detach(id)

    def _plan(self, id: str) -> tuple[list[bytes], list[str]]:
        """The root entries a view of snapshot ``id`` binds, and its layer chain: each layer
        may be an image mount the view keeps (``hold_snapshot_layers``), counted as one."""
        root = self.sm.root_entry(id)
        names = [n for n, e in self.sm.read_tree(root.ref).items() if e.is_dir or e.is_file]
        if len(names) > MAX_BOUND:
            raise CascowfsError(f"its root holds {len(names)} entries, more than {MAX_BOUND}")
        with self.sm.db.read() as txn:
            chain = self.sm.catalog.snapshot(txn, id).layers
        return names, chain

    def _new_view(self, id: str, names: list[bytes], uid: int, admin: bool) -> View | None:
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
        return View(id, chain, names, mnt_fd, uid=uid, admin=admin, used=time.monotonic())

    # -- the budget (module docstring, Budget) ---------------------------------------------
    @staticmethod
    def _cost(view: View) -> int:
        """The mounts ``view`` holds at most: its bound entries, and an image per layer."""
        return len(view.bound) + (0 if view.let_go else len(view.chain))

    def _make_room(self, id: str, needed: int, uid: int, admin: bool) -> bool:
        """Whether ``needed`` more mounts for snapshot ``id``'s view, asked for by ``uid``,
        fit the budget, once the least recently used views are evicted as far as need be
        (those in use stay; a caller outside the admin group evicts only views no admin
        asked for last, its own first if it is past its share)."""
        budget = self.budget
        if needed > budget.total or (not admin and needed > budget.per_uid):
            return False
        tried = {id}
        while True:
            with self._lock:
                views = list(self._views.values())
                over = sum(self._cost(v) for v in views) + needed - budget.total
                # the view itself, if it has one, moves to this caller's share
                mine = sum(
                    self._cost(v) for v in views if v.id == id or (v.uid == uid and not v.admin)
                )
                over_share = 0 if admin else mine + needed - budget.per_uid
                if over <= 0 and over_share <= 0:
                    return True
                pool = [
                    v
                    for v in views
                    if v.id not in tried and (admin or not v.admin) and not self.walking(v.id)
                ]
                if over_share > 0:
                    pool = [v for v in pool if v.uid == uid]
                if not pool:
                    return False
                victim = min(pool, key=lambda v: v.used)
                tried.add(victim.id)
            self._evict(victim)

    def _evict(self, view: View) -> None:
        """Unmount the entries of ``view`` that are not in use (not lazily: one in use
        answers EBUSY and stays); a view with nothing bound any more lets go of its layers."""
        with self._lock:
            names = sorted(view.bound)
        gone = []
        for name in names:
            try:
                umount2(self._point(view.id, name), 0)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):  # EBUSY: in use
                    continue
            gone.append(name)
        with self._lock:
            view.bound.difference_update(gone)
            if len(gone) < len(names):
                view.used = time.monotonic()  # in use: the last to evict again
            empty = not view.bound
        log.debug("view of snapshot %s evicted: %d of %d entries", view.id, len(gone), len(names))
        if empty:
            self._forget(view)

    def _no_room_for(self, uid: int, view: View | None, id: str, why: str = "") -> None:
        """Snapshot ``id`` stays on the daemon's view for ``uid``, for want of room: what its
        view has bound stays, a view with nothing bound lets go of its layers, and ``uid``'s
        next views are tried in ``NO_ROOM_RETRY_SECONDS``."""
        with self._lock:
            self._no_room[uid] = time.monotonic() + NO_ROOM_RETRY_SECONDS
            empty = view is not None and not view.bound
        log.info(
            "snapshot %s stays on the FUSE view for uid %d: %s",
            id,
            uid,
            why
            or f"its view does not fit the budget of {self.budget.total} mounts "
            f"({self.budget.per_uid} for a uid outside the admin group)",
        )
        if empty and view is not None:
            self._forget(view)

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
        """Detach what ``view`` has bound, and let go of its layers (once), unmounting the
        layer images nothing else stacks or holds: the budget counts them only while the
        view stands, and a reader going through every snapshot would leave every image of
        the store mounted (395 image mounts after one read in each of 395 imports)."""
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
        try:
            self.sm.layers.unmount_unused()
        except (CascowfsError, OSError) as exc:  # the next sweep (a trash round) retries
            log.debug("unmounting the images of snapshot %s's view: %s", view.id, exc)

    def _unmount(self, id: str, names: list[bytes]) -> None:
        for name in names:
            try:
                overlay.unmount(Path(self._point(id, name)))
            except (CascowfsError, OSError) as exc:  # gone with its dentry already
                log.debug("detaching the view of %s at %r: %s", id, name, exc)

    def detach(self, id: str) -> None:
        """Detach the view of snapshot ``id`` (lazily: open files keep reading), before any
        attach waiting."""
        with self._turns.turn(first=True):
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
        with self._turns.turn(first=True):
            pass

    def detach_all(self) -> None:
        for id in self.mounted():
            self.detach(id)
        detach_views(self.sm.store, self.mnt)  # any left by an attach that raced the shutdown

    def expire(self) -> None:
        """One round of idle expiry: an entry unused since the last round is unmounted; a
        view with nothing bound any more lets go of its layers."""
        with self._turns.turn(first=True):
            if self._stopping.is_set():
                return
            with self._lock:
                views = list(self._views.values())
            for view in views:
                for name in sorted(view.bound):
                    if _expired(self._point(view.id, name)):
                        view.bound.discard(name)
                    else:  # used since the last round, or in use (or bound since)
                        view.used = time.monotonic()
                if not view.bound:
                    log.debug("view of snapshot %s expired", view.id)
                    self._forget(view)

    async def expire_forever(self) -> None:
        while True:
            await trio.sleep(self.idle_seconds)
            await trio.to_thread.run_sync(self.expire, limiter=self.detaching)


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
