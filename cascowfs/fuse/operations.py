"""The pyfuse3 request handlers: the file tree of docs/interface.md over a StateManager.

Layout and the rules it follows:

* ``ctl``, ``snapshots/``, ``branches/``, ``episodes`` and ``observations/`` form a fixed
  skeleton (pinned inodes). ``episodes`` is generated at open (JSON Lines, one snapshot a
  line), once per state and shared by the opens that see it; ``observations/<id>`` serves a
  snapshot's large observation from the CAS, read-only.
* ``snapshots/<id>/...`` is served straight from the CAS through ``StateManager.root_entry``,
  ``read_tree`` and ``read_file``; those are short LMDB read transactions and run inline on the
  trio thread (but for a large directory not in the tree cache, decoded in a thread).
  Everything is immutable, so attributes and entries are cached by the kernel for a day and
  files are opened with ``keep_cache``; any write gets EROFS.
* ``branches/<name>/`` is configfs-style: ``tree`` (symlink to the overlay mount), ``parent``,
  ``commit``, ``status``, ``status.z``. These files are ``direct_io`` so a reader never sees
  stale content.
* Every state change (and every query that may walk a directory or wait for the store's operation
  lock) runs in a worker thread via ``trio.to_thread.run_sync``, so a long commit never stalls
  the reads of other requests. A ``label`` through ``ctl`` is the exception: it stays on the
  trio thread where it would not block (``inline_labels.py``). The reads of callers outside
  the admin group run in threads of their own instead, and what open files keep is charged to
  their uid's budget (``budgets.py``).
* Engine errors are ``CascowfsError`` subclasses carrying their errno; they are turned into
  ``pyfuse3.FUSEError`` exactly once, by the ``edge`` decorator on every handler. An unexpected
  exception becomes EIO and is logged: pyfuse3 would otherwise stop its main loop.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from .. import wire
from ..episodes import episode_lines
from ..errors import CascowfsError, InvalidArgumentError, NotFoundError, PermissionDeniedError
from ..events import EventsReader
from ..model import BranchInfo, Entry, SnapshotInfo
from ..names import check_branch_name, check_snapshot_id
from ..privacy import Caller
from ..state import StateManager
from . import control
from .budgets import (
    HANDLE_BYTES,
    LISTED_BRANCH_BYTES,
    LISTED_COUNTED_INLINE,
    LISTED_NODE_BYTES,
    Budgets,
    Charge,
    Generated,
    ListedCharges,
    OverBudgetError,
    ReaderThreads,
    SharedContent,
    listed_entries_bytes,
)
from .ctl_lanes import CtlLanes
from .feeds import (
    FEED_HANDLES,
    FeedNode,
    Feeds,
    MetricsHandle,
    OperationRecord,
    read_feed,
    unparsed,
)
from .inline_labels import InlineLabels
from .inodes import (
    BRANCHES_INO,
    CTL_INO,
    EPISODES_INO,
    OBSERVATIONS_INO,
    ROOT_INO,
    SNAPSHOTS_INO,
    BranchDirNode,
    BranchFileNode,
    CtlNode,
    GeneratedFileNode,
    InodeTable,
    Node,
    SkeletonNode,
    SnapDirNode,
    SnapLeafNode,
)
from .kernel_views import KernelViews
from .snapshot_view import (
    IMMUTABLE_TIMEOUT,
    TREE_XATTR,
    XATTR_PREFIX,
    LinkCounts,
    count_links,
    entry_attrs,
    entry_xattrs,
    iso_time,
)

log = logging.getLogger("cascowfs.fuse")

T = TypeVar("T")
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
Reads = Callable[..., Awaitable[Any]]  # runs a blocking read for one caller (``_read_q``)

# Skeleton directories change when branches/snapshots come and go; a second of staleness in
# their mtime is harmless and saves a getattr round trip per path walk through MNT/branches/.
SKELETON_ATTR_TIMEOUT = 1.0
BRANCH_FILES = (b"tree", b"parent", b"commit", b"status", b"status.z")
STATUS_FILES = ("status", "status.z")  # computed on read, never written
# Mode bits: mutating entries are writable by everyone so that a non-admin caller reaches the
# daemon and gets the contract's EPERM instead of the kernel's EACCES (default_permissions).
MODE_ROOT = stat.S_IFDIR | 0o755
MODE_OPEN_DIR = stat.S_IFDIR | 0o777
MODE_BRANCH_DIR = stat.S_IFDIR | 0o755
MODE_CTL = stat.S_IFREG | 0o666
MODE_RW_FILE = stat.S_IFREG | 0o666
MODE_RO_FILE = stat.S_IFREG | 0o444
# A branch's status lists every changed path below its root, whatever the modes of the
# directories above them: only root and the admin group may read it, as they may change it.
MODE_STATUS_FILE = stat.S_IFREG | 0o440
MODE_SYMLINK = stat.S_IFLNK | 0o777

_ACCMODE = os.O_ACCMODE


def edge(fn: Handler) -> Handler:
    """Translate every error of a handler into FUSEError, once, here."""

    @functools.wraps(fn)
    async def wrapper(self: CascowOperations, *args: Any) -> Any:
        self.feeds.metrics.fuse_requests[fn.__name__] += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except CascowfsError as exc:
            log.debug("%s%r: %s %s", fn.__name__, args[:2], exc.errno_name, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.debug("%s%r: %s", fn.__name__, args[:2], exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(Handler, wrapper)


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


REPLIES_KEPT = 1024  # unread replies an open ctl file keeps, the oldest dropped first
REPLY_BYTES_KEPT = 1 << 20  # and their bytes: the newest reply is kept whatever its size


@dataclass(eq=False)
class CtlHandle:
    # write(2) requests carry no credentials in FUSE: like Unix permission checks, the caller's
    # right to change state is decided when the file is opened.
    lane: CtlNode
    charge: Charge
    admin: bool = False
    caller: Caller | None = None  # whose access an import's source is checked against
    # A write-only open can never read a reply: its write's result is the whole answer.
    keeps_replies: bool = True
    replies: deque[bytes] = field(default_factory=deque)
    partial: bytes = b""  # unread tail of a reply that a short read split
    unread: int = 0  # bytes of replies and partial


@dataclass(eq=False)
class BranchFileHandle:
    node: BranchFileNode
    admin: bool = False
    content: bytes | None = None
    written: bytes | None = None  # parent and commit take one write per open file: its bytes
    refusal: Exception | None = None  # what that write was refused with
    caller: Caller | None = None  # whose access a commit's observation file is checked against


@dataclass(eq=False)
class GeneratedHandle:
    piece: Generated  # generated at open: every read of one open file sees one version


@dataclass(eq=False)
class LeafHandle:
    entry: Entry


class SnapshotIds(Sequence[tuple[bytes, Any]]):
    """``snapshots/``'s listing as an open directory keeps it: "." and "..", then the ids
    (ASCII: ``names.py``) in one bytes object, with where each ends. Kept as a (bytes, str)
    pair each, a 128-character id held 402 bytes."""

    __slots__ = ("_head", "_ids", "_ends")

    def __init__(self, head: list[tuple[bytes, Any]], ids: list[str]) -> None:
        self._head = head
        self._ids = "".join(ids).encode("ascii")
        self._ends = array("Q", itertools.accumulate(map(len, ids)))

    def __len__(self) -> int:
        return len(self._head) + len(self._ends)

    def __getitem__(self, index: int) -> tuple[bytes, Any]:  # type: ignore[override]
        if index < len(self._head):
            return self._head[index]
        index -= len(self._head)
        name = self._ids[self._ends[index - 1] if index else 0 : self._ends[index]]
        return name, name.decode("ascii")

    def held(self) -> int:
        """Its bytes, as its open directory is charged for them: its ids and their ends,
        "." and "..", and a KiB for this object and what its parts leave unaccounted."""
        head = LISTED_NODE_BYTES * len(self._head) + 1024
        return sys.getsizeof(self._ids) + sys.getsizeof(self._ends) + head


@dataclass(eq=False)
class DirHandle:
    node: Node
    admin: bool = False  # whose listings run in the shared worker threads
    # (name, what _child needs), "."/".." first
    items: Sequence[tuple[bytes, Any]] | None = None
    held: int = 0  # the bytes ``items`` holds, charged to its uid


class CascowOperations(pyfuse3.Operations):
    """The file contract (docs/interface.md) over one StateManager."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        sm: StateManager,
        store: str | Path,
        *,
        admin_gid: int | None = None,
        info: dict[str, str] | None = None,
        views: KernelViews | None = None,
        labels: InlineLabels | None = None,
    ) -> None:
        super().__init__()
        self.sm = sm
        self.views = views  # None: every snapshot is served here (kernel_views.py)
        # snapshot -> directories of it open on this view; a view asked for meanwhile is
        # mounted once the last is closed (``_want_view``), for the caller that asked last
        self._walks: Counter[str] = Counter()
        self._view_after_walk: dict[str, pyfuse3.RequestContext] = {}
        if views is not None:  # a walk's view is not evicted (kernel_views.py, Budget)
            views.walking = lambda snap: self._walks.get(snap, 0) > 0
        self.stopping = False  # ``stop``: the daemon is shutting down
        self._invalidating = 0  # dentry invalidations in worker threads
        self.labels = labels  # None: labels run in worker threads as other commands do
        self.store = str(store)
        self.admin_gid = admin_gid
        self.info = dict(info or {})
        self.table = InodeTable()
        now = time.time_ns()
        self.started_ns = now
        self.changed_ns = {SNAPSHOTS_INO: now, BRANCHES_INO: now}
        self.root = self.table.add_pinned(SkeletonNode(ROOT_INO))
        self.ctl = self.table.add_pinned(CtlNode(CTL_INO, name=b"ctl", parent=self.root))
        self.ctl_lanes = CtlLanes(self.ctl, self.table.allocate, self.root)
        self.snapshots = self.table.add_pinned(
            SkeletonNode(SNAPSHOTS_INO, name=b"snapshots", parent=self.root)
        )
        self.branches = self.table.add_pinned(
            SkeletonNode(BRANCHES_INO, name=b"branches", parent=self.root)
        )
        self.feeds = Feeds(sm, self.table, self.root)
        self.episodes = self.table.add_pinned(
            GeneratedFileNode(EPISODES_INO, name=b"episodes", parent=self.root)
        )
        self.observations = self.table.add_pinned(
            SkeletonNode(OBSERVATIONS_INO, name=b"observations", parent=self.root)
        )
        self._skeleton: dict[bytes, Node] = {
            b"ctl": self.ctl,
            b"snapshots": self.snapshots,
            b"branches": self.branches,
            b"episodes": self.episodes,
            b"observations": self.observations,
            **self.feeds.nodes,
        }
        self._handles: dict[int, Any] = {}
        self._charges: dict[int, Charge] = {}  # fh -> what it costs its uid (budgets.py)
        self.budgets = Budgets()
        self.readers = ReaderThreads()
        self.episodes_shared = SharedContent()
        self._fh = itertools.count(1)
        # Hard-link group sizes per snapshot root tree id, for the roots read last.
        self._links = LinkCounts()
        # What the listings of the snapshot directories listed last hold, by tree id.
        self._listed = ListedCharges()

    # -- helpers -------------------------------------------------------------------------------
    async def _q(self, fn: Callable[..., T], *args: Any) -> T:
        """A StateManager call that may block (a mutation, or a query that walks a tree or
        many records): off the trio thread, so that other requests keep being served.

        Point queries (``snapshot``, ``branch``, ``root_entry``, ``read_tree``, ``read_file``)
        are one short LMDB read transaction that never waits for the operation lock; they run
        inline, since a thread hop costs more (~140 us) than the query itself.
        """
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    async def _read_q(self, admin: bool, uid: int, fn: Callable[..., T], *args: Any) -> T:
        """``_q`` for a read: an admin's in the shared threads, anyone else's in the few
        ``ReaderThreads`` (budgets.py), which state changes never wait for."""
        if admin:
            return await self._q(fn, *args)
        return await self.readers.run(uid, fn, *args)

    async def _caller_q(self, ctx: pyfuse3.RequestContext, fn: Callable[..., T], *args: Any) -> T:
        """``_read_q`` for the caller of ``ctx`` (whose groups are read only now)."""
        return await self._read_q(self._is_admin(ctx), ctx.uid, fn, *args)

    def _node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise _err(errno.ESTALE)
        return node

    def _is_admin(self, ctx: pyfuse3.RequestContext) -> bool:
        if ctx.uid == 0:
            return True
        if self.admin_gid is None:
            return False
        if ctx.gid == self.admin_gid:
            return True
        try:
            return self.admin_gid in pyfuse3.get_sup_groups(ctx.pid)
        except Exception:  # the caller may be gone already; then it is no admin of ours
            return False

    @staticmethod
    def _caller(ctx: pyfuse3.RequestContext) -> Caller:
        if ctx.uid == 0:  # reads anything: its groups do not matter
            return Caller(0, ctx.gid)
        try:
            groups = tuple(sorted(pyfuse3.get_sup_groups(ctx.pid)))
        except Exception:  # the caller is gone already: checked without its groups
            groups = ()
        return Caller(ctx.uid, ctx.gid, groups)

    def _outsider(self, ctx: pyfuse3.RequestContext) -> int | None:
        """The caller's uid if it is outside root and the admin group (its events are kept
        apart: events.py), else None."""
        return None if self._is_admin(ctx) else ctx.uid

    def _require_admin(self, ctx: pyfuse3.RequestContext, what: str) -> None:
        if not self._is_admin(ctx):
            raise PermissionDeniedError(f"{what}: only root or the admin group may change state")

    def _new_handle(self, obj: Any, charge: Charge) -> int:
        fh = next(self._fh)
        self._handles[fh] = obj
        self._charges[fh] = charge
        return fh

    def _drop_handle(self, fh: int) -> Any:
        charge = self._charges.pop(fh, None)
        if charge is not None:
            self.budgets.closed(charge)
        return self._handles.pop(fh, None)

    def _handle(self, fh: int) -> Any:
        obj = self._handles.get(fh)
        if obj is None:
            raise _err(errno.EBADF)
        return obj

    @staticmethod
    def _in_snapshot(node: Node) -> bool:
        return isinstance(node, (SnapDirNode, SnapLeafNode)) or node.ino in (
            SNAPSHOTS_INO,
            OBSERVATIONS_INO,
            EPISODES_INO,
        )

    def _want_view(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """Have the kernel serve ``node``'s snapshot from now on, if it does not yet: mounted
        by a worker thread once this request is answered (kernel_views.py says why), within
        the budget of views of ``ctx``'s caller.

        Not while a directory of the snapshot is open here: a walk under way (``cp -a``,
        ``tar``, ``find`` hold the directories above them open) would look the rest of its
        names up in the view, and see one hard-linked file as two (another device, another
        inode) on either side of the switch. Its view is mounted when the walk ends."""
        if self.views is None or not isinstance(node, SnapDirNode):
            return
        if self._walks[node.snap]:
            self._view_after_walk[node.snap] = ctx
            return
        self._view_after_walk.pop(node.snap, None)
        attach = self.views.wanted(node.snap, ctx.uid, functools.partial(self._is_admin, ctx))
        if attach is not None:  # in a thread of the views' own: it may wait for others
            self._after_reply(
                attach,
                f"mounting the kernel view of snapshot {node.snap}",
                self.views.attaching,
            )

    async def _detach_view(self, ident: str) -> None:
        """Detach snapshot ``ident``'s view, if it may have one (the thread hop is skipped
        for the many prunes of snapshots nobody read)."""
        if self.views is not None and self.views.may_hold(ident):
            await trio.to_thread.run_sync(self.views.detach, ident, limiter=self.views.detaching)

    @staticmethod
    def _after_reply(
        work: Callable[[], None], what: str, limiter: trio.CapacityLimiter | None = None
    ) -> None:
        """Run ``work`` in a worker thread (of ``limiter``'s, else trio's default pool),
        outside the request that asks for it; a failure is logged as failing at ``what``."""

        async def task() -> None:
            try:
                await trio.to_thread.run_sync(work, limiter=limiter)
            except Exception:  # a system task must not raise: it would end the daemon
                log.exception("%s", what)

        trio.lowlevel.spawn_system_task(task)

    def _refuse_change(self, node: Node) -> pyfuse3.FUSEError:
        """The errno of a namespace/metadata change we do not support under ``node``."""
        return _err(errno.EROFS if self._in_snapshot(node) else errno.EPERM)

    async def _invalidate(self, parent: int, name: bytes) -> None:
        """Drop a dentry from the kernel's cache after a change made through ctl.

        Done in a worker thread and awaited: the kernel takes the parent directory's lock, which a
        concurrent lookup may hold while it waits for *us* to answer, so the trio loop must keep
        running meanwhile; and the ctl write must not return before the change is visible.
        Not once the daemon is stopping (``stop``): the mount goes, with its cache.
        """
        if self.stopping:
            return
        self._invalidating += 1
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel had no such dentry cached
                log.warning("invalidating %r in %d: %s", name, parent, exc)
        finally:
            self._invalidating -= 1

    async def stop(self, grace: float) -> None:
        """Get ready for ``pyfuse3.terminate``, which stops reading requests: a thread still
        waiting in the kernel on one (a dentry invalidation waits for a directory lock that a
        lookup holds until we answer it) would wait for good, and every caller of the mount
        with it. So, while the loop still answers: invalidate, attach and expire nothing
        more, detach the snapshot views, and wait up to ``grace`` seconds for the
        invalidations under way."""
        self.stopping = True
        if self.views is not None:
            await trio.to_thread.run_sync(self.views.stop)
            await trio.to_thread.run_sync(self.views.detach_all)
        with trio.move_on_after(grace):
            while self._invalidating:
                await trio.sleep(0.01)

    # -- attributes ----------------------------------------------------------------------------
    def _skeleton_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.entry_timeout = IMMUTABLE_TIMEOUT
        attr.attr_timeout = SKELETON_ATTR_TIMEOUT
        attr.st_uid = 0
        attr.st_gid = self.admin_gid or 0
        attr.st_blksize = 4096
        mtime = self.changed_ns.get(node.ino, self.started_ns)
        if node.ino == ROOT_INO:
            attr.st_mode, attr.st_nlink = MODE_ROOT, 5
        elif isinstance(node, CtlNode):
            attr.st_mode, attr.st_nlink = MODE_CTL, 1
            attr.attr_timeout = IMMUTABLE_TIMEOUT  # a stream: its attributes never change
            attr.entry_timeout = 0  # every open looks it up: the answer is an idle lane
        elif isinstance(node, GeneratedFileNode):
            # size 0 like a /proc file: its content is made at open, read with direct_io
            attr.st_mode, attr.st_nlink, attr.attr_timeout = MODE_RO_FILE, 1, 0
            mtime = self.changed_ns.get(SNAPSHOTS_INO, self.started_ns)
        elif node.ino == OBSERVATIONS_INO:
            attr.st_mode, attr.st_nlink = MODE_ROOT, 1
            mtime = self.changed_ns.get(SNAPSHOTS_INO, self.started_ns)
        else:
            # nlink 1: "unknown" (counting would need a listing per stat)
            attr.st_mode, attr.st_nlink = MODE_OPEN_DIR, 1
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    def _branch_dir_attrs(self, node: BranchDirNode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.entry_timeout = IMMUTABLE_TIMEOUT  # invalidated on discard through ctl
        attr.attr_timeout = SKELETON_ATTR_TIMEOUT
        attr.st_mode, attr.st_nlink = MODE_BRANCH_DIR, 2
        attr.st_uid, attr.st_gid = 0, self.admin_gid or 0
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.created_ns
        return attr

    async def _branch_file_content(self, node: BranchFileNode) -> bytes:
        info: BranchInfo = self.sm.branch(node.branch)
        created = _branch_created_ns(node)
        if created is not None and info.created_ns != created:
            # an open file of a discarded branch does not read the one made with its name since
            raise NotFoundError(f"branch {node.branch!r} was discarded after this file was opened")
        if node.which in STATUS_FILES:
            changes = await self._q(self.sm.status, node.branch)
            if node.which == "status.z":
                return b"".join(c.record_z() for c in changes)
            return "".join(c.line() + "\n" for c in changes).encode("ascii")
        if node.which == "parent":
            return f"{info.parent}\n".encode() if info.parent else b""
        if node.which == "commit":
            return f"{info.last_commit}\n".encode() if info.last_commit else b""
        return os.fsencode(str(info.tree))  # tree

    async def _branch_file_attrs(self, node: BranchFileNode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.entry_timeout = IMMUTABLE_TIMEOUT
        attr.st_uid, attr.st_gid = 0, self.admin_gid or 0
        attr.st_nlink = 1
        attr.st_blksize = 4096
        created = _branch_created_ns(node) or 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = created
        if node.which in STATUS_FILES:
            # Computing status walks the branch's upper layer: too costly for every stat, so
            # its size is 0 like a /proc file; reads (direct_io) return the real content.
            attr.st_mode, attr.st_size, attr.attr_timeout = MODE_STATUS_FILE, 0, 0
        elif node.which == "tree":
            attr.st_mode, attr.attr_timeout = MODE_SYMLINK, IMMUTABLE_TIMEOUT
            attr.st_size = len(await self._branch_file_content(node))
        else:
            attr.st_mode, attr.attr_timeout = MODE_RW_FILE, 0
            attr.st_size = len(await self._branch_file_content(node))
        return attr

    async def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        if isinstance(node, SnapLeafNode):
            assert node.entry is not None
            return entry_attrs(node.ino, node.entry, node.nlink)
        if isinstance(node, SnapDirNode):
            assert node.entry is not None
            return entry_attrs(node.ino, node.entry)
        if isinstance(node, BranchDirNode):
            return self._branch_dir_attrs(node)
        if isinstance(node, BranchFileNode):
            return await self._branch_file_attrs(node)
        if isinstance(node, FeedNode):
            return self.feeds.attrs(node, self.admin_gid or 0)
        return self._skeleton_attrs(node)

    # -- building child nodes ------------------------------------------------------------------
    def _snap_root(self, info: SnapshotInfo) -> SnapDirNode:
        name = info.id.encode()
        version = (info.created_ns, info.root)
        node = self.table.child(self.snapshots, name)
        if isinstance(node, SnapDirNode) and node.version == version:
            node.info = info  # labels change after commit
            return node
        entry = self.sm.root_entry(info.id)
        new = SnapDirNode(
            self.table.allocate(),
            snap=info.id,
            entry=entry,
            version=version,
            root_ref=entry.ref,
            info=info,
        )
        return self.table.adopt(self.snapshots, name, new)  # type: ignore[return-value]

    def _branch_dir(self, info: BranchInfo) -> BranchDirNode:
        name = info.name.encode()
        node = self.table.child(self.branches, name)
        if isinstance(node, BranchDirNode) and node.created_ns == info.created_ns:
            return node
        new = BranchDirNode(self.table.allocate(), branch=info.name, created_ns=info.created_ns)
        return self.table.adopt(self.branches, name, new)  # type: ignore[return-value]

    def _branch_file(self, parent: BranchDirNode, name: bytes) -> BranchFileNode:
        node = self.table.child(parent, name)
        if isinstance(node, BranchFileNode):
            return node
        new = BranchFileNode(self.table.allocate(), branch=parent.branch, which=name.decode())
        return self.table.adopt(parent, name, new)  # type: ignore[return-value]

    async def _snap_entries(self, node: SnapDirNode, read: Reads) -> dict[bytes, Entry]:
        """The entries of snapshot directory ``node``: on the trio thread when cached or
        small, else by ``read`` in a thread. A directory of a million entries decodes for
        seconds, and the trio thread serves every agent: one ``ls`` of it by any user stalled
        every request for 4.2-4.9 s."""
        assert node.entry is not None
        entries = self.sm.read_tree_quick(node.entry.ref)
        if entries is None:
            entries = await read(self.sm.read_tree, node.entry.ref)
        return entries

    async def _nlink(self, parent: SnapDirNode, entry: Entry, read: Reads) -> int:
        """``entry``'s link count; ``read`` runs the walk of its snapshot that counts them."""
        if not entry.link:
            return 1
        counts = self._links.get(parent.root_ref)
        if counts is None:
            root = Entry(b"", stat.S_IFDIR, 0, 0, 0, 0, parent.root_ref)
            counts = await read(count_links, root, self.sm.read_tree)
            self._links.keep(parent.root_ref, counts)
        return max(counts.get(entry.link, 1), 1)

    async def _snap_child(
        self, parent: SnapDirNode, name: bytes, entry: Entry, read: Reads
    ) -> Node:
        if entry.is_dir:
            node = self.table.child(parent, name)
            if isinstance(node, SnapDirNode) and node.entry == entry:
                return node
            new = SnapDirNode(
                self.table.allocate(), snap=parent.snap, entry=entry, root_ref=parent.root_ref
            )
            return self.table.adopt(parent, name, new)
        return self.table.leaf(entry, await self._nlink(parent, entry, read))

    async def _lookup_node(self, parent: Node, name: bytes, ctx: pyfuse3.RequestContext) -> Node:
        """The child ``name`` of ``parent`` (no lookup count change); FUSEError(ENOENT) if none.
        ``ctx``: who looks it up (``ctl``'s lanes are promised to its thread)."""
        if name == b".":
            return parent
        if name == b"..":
            up = parent.parent or self.root
            self.table.register(up)
            return up
        if isinstance(parent, SnapDirNode):
            assert parent.entry is not None
            read = functools.partial(self._caller_q, ctx)
            entry = (await self._snap_entries(parent, read)).get(name)
            if entry is None:
                raise _err(errno.ENOENT)
            return await self._snap_child(parent, name, entry, read)
        if parent.ino == ROOT_INO:
            if name == b"ctl":
                return self.ctl_lanes.for_lookup(ctx.pid)
            node = self._skeleton.get(name)
            if node is None:
                raise _err(errno.ENOENT)
            return node
        if parent.ino == SNAPSHOTS_INO:
            ident = _valid_or_none(check_snapshot_id, name)
            if ident is None:
                raise _err(errno.ENOENT)
            return self._snap_root(self.sm.snapshot(ident))
        if parent.ino == OBSERVATIONS_INO:
            ident = _valid_or_none(check_snapshot_id, name)
            if ident is None:
                raise _err(errno.ENOENT)
            entry = self._observation_entry(ident, self.sm.snapshot(ident).created_ns)
            if entry is None:
                raise _err(errno.ENOENT)
            return self.table.leaf(entry, 1)
        if parent.ino == BRANCHES_INO:
            bname = _valid_or_none(check_branch_name, name)
            if bname is None:
                raise _err(errno.ENOENT)
            return self._branch_dir(self.sm.branch(bname))
        if isinstance(parent, BranchDirNode):
            if name not in BRANCH_FILES:
                raise _err(errno.ENOENT)
            # A branch dir the kernel still caches may have been discarded meanwhile.
            info = self.sm.branch(parent.branch)
            if info.created_ns != parent.created_ns:
                raise _err(errno.ENOENT)
            return self._branch_file(parent, name)
        raise _err(errno.ENOTDIR)

    def _observation_entry(self, id: str, created_ns: int) -> Entry | None:
        """Snapshot ``id``'s observation as a read-only file (None: it has none), owned and
        moded as the file it was read from, so the kernel checks a reader as it did there."""
        obs = self.sm.observation(id)
        if obs is None:
            return None
        return Entry(
            id.encode(),
            stat.S_IFREG | (obs.mode & 0o555),
            obs.uid,
            obs.gid,
            created_ns,
            obs.size,
            bytes.fromhex(obs.ref),
        )

    def _episodes_content(self) -> bytes:
        """``episodes`` as of now (blocking: reads every snapshot record)."""
        return b"".join(episode_lines(self.sm.episodes(), iso_time))

    async def _episodes_piece(self, ctx: pyfuse3.RequestContext) -> Generated:
        """``episodes`` as of at least the last change that ended: one content per state,
        shared by the open files that see it (budgets.py)."""
        admin = self._is_admin(ctx)

        async def make() -> bytes:
            return await self._read_q(admin, ctx.uid, self._episodes_content)

        return await self.episodes_shared.get(self.feeds.changes, admin, make)

    def _observation_entries(self) -> list[Entry]:
        out = []
        for info in self.sm.snapshots():
            entry = self._observation_entry(info.id, info.created_ns) if info.obs else None
            if entry is not None:
                out.append(entry)
        return out

    # -- lookups and attributes ----------------------------------------------------------------
    @edge
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        node = await self._lookup_node(parent, name, ctx)
        attr = await self._attrs(node)
        self.table.looked_up(node)
        if isinstance(parent, SnapDirNode):  # inside a snapshot, not the snapshot itself
            self._want_view(parent, ctx)
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Must not raise (no request to answer).
        for ino, count in inode_list:
            try:
                self.table.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d)", ino, count)

    @edge
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attrs(self._node(inode))

    @edge
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        writable = isinstance(node, CtlNode) or (
            isinstance(node, BranchFileNode) and node.which in ("parent", "commit")
        )
        only_truncate = fields.update_size and not (
            fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
            or fields.update_mtime
        )
        if writable and only_truncate and attr.st_size == 0:
            # `echo x > file` truncates first; the file's content is generated, so this is a
            # no-op, but it must succeed for the shell's redirection to work.
            return await self._attrs(node)
        raise self._refuse_change(node)

    @edge
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if (
            isinstance(node, SnapLeafNode)
            and node.entry is not None
            and stat.S_ISLNK(node.entry.mode)
        ):
            return node.entry.ref
        if isinstance(node, BranchFileNode) and node.which == "tree":
            return await self._branch_file_content(node)
        raise _err(errno.EINVAL)

    @edge
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    # -- xattrs --------------------------------------------------------------------------------
    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if isinstance(node, (SnapDirNode, SnapLeafNode)):
            assert node.entry is not None
            return entry_xattrs(node.entry, node.info if isinstance(node, SnapDirNode) else None)
        if node.ino == ROOT_INO:
            return {XATTR_PREFIX + k.encode(): v.encode() for k, v in sorted(self.info.items())}
        return {}

    @edge
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if name == TREE_XATTR and isinstance(node, SnapDirNode) and node.entry is not None:
            return node.entry.ref.hex().encode()
        value = self._xattrs(node).get(name)
        if value is None:
            raise _err(pyfuse3.ENOATTR)
        return value

    @edge
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(self._node(inode)))

    @edge
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise self._refuse_change(self._node(inode))

    @edge
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._refuse_change(self._node(inode))

    # -- directories ---------------------------------------------------------------------------
    @edge
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not isinstance(node, (SnapDirNode, SkeletonNode, BranchDirNode)):
            raise _err(errno.ENOTDIR)
        charge = self.budgets.opened(ctx.uid, "opendir")
        if isinstance(node, SnapDirNode):
            self._walks[node.snap] += 1
        self._want_view(node, ctx)
        return self._new_handle(DirHandle(node, admin=self._is_admin(ctx)), charge)

    async def _listing(
        self, handle: DirHandle, uid: int
    ) -> tuple[Sequence[tuple[bytes, Any]], int]:
        """A frozen listing, so that readdir continuations see a consistent set of names,
        and the bytes it holds (charged to ``uid``). Of ``snapshots/``, the ids only: each
        record is read as readdir reaches its name, so that an open directory keeps little
        whatever the snapshots' labels."""
        node = handle.node
        items: list[tuple[bytes, Any]] = [(b".", node), (b"..", node.parent or self.root)]
        if isinstance(node, SnapDirNode):
            read = functools.partial(self._read_q, handle.admin, uid)
            entries = await self._snap_entries(node, read)
            items += list(entries.items())
            assert node.entry is not None
            held = self._listed.get(node.entry.ref)
            if held is None:  # counted once a tree; a large one in a thread, as decoded
                if len(entries) <= LISTED_COUNTED_INLINE:
                    held = listed_entries_bytes(entries.values())
                else:
                    held = await read(listed_entries_bytes, entries.values())
                self._listed.keep(node.entry.ref, held)
            return items, held
        if node.ino == SNAPSHOTS_INO:
            ids = await self._read_q(handle.admin, uid, self.sm.snapshot_ids)
            ids.sort()
            listing = SnapshotIds(items, ids)
            return listing, listing.held()
        held = 0
        if node.ino == ROOT_INO:
            items += list(self._skeleton.items())
        elif node.ino == OBSERVATIONS_INO:
            observations = await self._read_q(handle.admin, uid, self._observation_entries)
            items += sorted((e.name, e) for e in observations)
            held = listed_entries_bytes(observations)
        elif node.ino == BRANCHES_INO:
            branches = await self._read_q(handle.admin, uid, self.sm.branches)
            items += sorted((i.name.encode(), i) for i in branches)
            held = sum(LISTED_BRANCH_BYTES + 3 * len(i.name) for i in branches)
        elif isinstance(node, BranchDirNode):
            items += [(name, name) for name in BRANCH_FILES]
        return items, held + LISTED_NODE_BYTES * len(items)

    async def _listed_node(self, parent: Node, payload: Any, read: Reads) -> Node:
        if isinstance(payload, Node):
            return payload
        if isinstance(payload, Entry) and parent.ino == OBSERVATIONS_INO:
            return self.table.leaf(payload, 1)
        if isinstance(payload, Entry):
            assert isinstance(parent, SnapDirNode)
            return await self._snap_child(parent, payload.name, payload, read)
        if isinstance(payload, str):  # a snapshot id (``_listing``)
            try:
                info = self.sm.snapshot(payload)
            except (ValueError, KeyError, TypeError) as exc:  # a damaged record: not listed
                log.warning("snapshot record %r does not decode, not listed: %r", payload, exc)
                raise NotFoundError(f"snapshot record {payload!r} does not decode") from None
            return self._snap_root(info)
        if isinstance(payload, BranchInfo):
            return self._branch_dir(payload)
        assert isinstance(parent, BranchDirNode)
        return self._branch_file(parent, payload)

    @edge
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle: DirHandle = self._handle(fh)
        if handle.items is None or start_id == 0:
            charge = self._charges[fh]
            items, held = await self._listing(handle, charge.uid)
            self.budgets.grow(charge, held - handle.held, "readdir")
            handle.items, handle.held = items, held
        read = functools.partial(self._read_q, handle.admin, self._charges[fh].uid)
        for index in range(start_id, len(handle.items)):
            name, payload = handle.items[index]
            try:
                node = await self._listed_node(handle.node, payload, read)
                attr = await self._attrs(node)
            except (CascowfsError, pyfuse3.FUSEError):
                continue  # vanished between listing and now (e.g. a branch discarded)
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                # Made (or found) for an entry that did not fit: the kernel never learns of
                # it, so never forgets it, unless it knew it already.
                self.table.unlisted(node)
                return
            if index >= 2:  # "." and ".." do not count as lookups
                self.table.looked_up(node)

    @edge
    async def releasedir(self, fh: int) -> None:
        handle = self._drop_handle(fh)
        if isinstance(handle, DirHandle) and isinstance(handle.node, SnapDirNode):
            snap = handle.node.snap
            self._walks[snap] -= 1
            if self._walks[snap] <= 0:
                del self._walks[snap]
                asked = self._view_after_walk.get(snap)
                if asked is not None:
                    self._want_view(handle.node, asked)

    @edge
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # -- control plane: namespace changes ------------------------------------------------------
    @edge
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.ino != BRANCHES_INO:
            raise self._refuse_change(parent)
        with self.feeds.operation(
            _file_call("branch", "mkdir branches", name, self._outsider(ctx))
        ) as record:
            self._require_admin(ctx, "mkdir")
            bname = check_branch_name(name)
            record.ran = True
            info = await self._q(self.sm.create_branch, bname, None)
        self.changed_ns[BRANCHES_INO] = time.time_ns()
        node = self._branch_dir(info)
        attr = self._branch_dir_attrs(node)
        self.table.looked_up(node)
        return attr

    @edge
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        if parent.ino == BRANCHES_INO:
            with self.feeds.operation(
                _file_call("discard", "rmdir branches", name, self._outsider(ctx))
            ) as record:
                self._require_admin(ctx, "rmdir")
                bname = _valid_or_none(check_branch_name, name)
                if bname is None:
                    raise NotFoundError(f"no branch {name!r}")
                record.ran = True
                await self._q(self.sm.discard, bname)
            self.table.detach(parent, name)
            self.changed_ns[BRANCHES_INO] = time.time_ns()
            return
        if parent.ino == SNAPSHOTS_INO:
            shown = os.fsdecode(name)
            record = OperationRecord(
                "prune", command=f"rmdir snapshots/{shown}", id=shown, uid=self._outsider(ctx)
            )
            with self.feeds.operation(record):
                self._require_admin(ctx, "rmdir")
                ident = _valid_or_none(check_snapshot_id, name)
                if ident is None:
                    raise NotFoundError(f"no snapshot {name!r}")
                record.ran = True
                if self.views is None:
                    await self._q(self.sm.prune, ident)
                else:  # the view's layers go once no attach runs: not inside this request
                    await self._q(self.views.prune, ident)
                    self._after_reply(
                        functools.partial(self.views.detach, ident),
                        f"letting go of the kernel view of snapshot {ident}",
                        self.views.detaching,
                    )
            self.table.detach(parent, name)
            self.changed_ns[SNAPSHOTS_INO] = time.time_ns()
            await self._invalidate(OBSERVATIONS_INO, name)
            return
        raise self._refuse_change(parent)

    @edge
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._refuse_change(self._node(parent_inode))

    @edge
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self._refuse_change(self._node(parent_inode))

    @edge
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self._refuse_change(self._node(parent_inode))

    @edge
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise self._refuse_change(self._node(new_parent_inode))

    @edge
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._node(parent_inode_old)
        new = self._node(parent_inode_new)
        raise self._refuse_change(old if self._in_snapshot(old) else new)

    @edge
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise self._refuse_change(self._node(parent_inode))

    # -- files ---------------------------------------------------------------------------------
    @edge
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writing = (flags & _ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if isinstance(node, SnapLeafNode):
            if writing:
                raise _err(errno.EROFS)
            assert node.entry is not None
            if not stat.S_ISREG(node.entry.mode):
                raise _err(errno.EINVAL)
            # keep_cache: the content behind this nodeid can never change.
            charge = self.budgets.opened(ctx.uid, "open")
            return pyfuse3.FileInfo(
                fh=self._new_handle(LeafHandle(node.entry), charge), keep_cache=True
            )
        if isinstance(node, CtlNode):
            # Replies are a stream, not a file: no seeking, no page cache.
            handle = CtlHandle(
                node,
                self.budgets.opened(ctx.uid, "open ctl"),
                admin=self._is_admin(ctx),
                caller=self._caller(ctx),
                keeps_replies=(flags & _ACCMODE) != os.O_WRONLY,
            )
            self.ctl_lanes.opened(node)
            fh = self._new_handle(handle, handle.charge)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=True)
        if isinstance(node, BranchFileNode) and node.which in ("parent", "commit", *STATUS_FILES):
            if node.which in STATUS_FILES and (writing or not self._is_admin(ctx)):
                raise _err(errno.EACCES)  # MODE_STATUS_FILE: the kernel's answer
            charge = self.budgets.opened(ctx.uid, f"open {node.which}")
            branch_handle = BranchFileHandle(
                node, admin=self._is_admin(ctx), caller=self._caller(ctx)
            )
            return pyfuse3.FileInfo(fh=self._new_handle(branch_handle, charge), direct_io=True)
        if isinstance(node, FeedNode):
            admin = self._is_admin(ctx)

            async def run(fn: Callable[[], bytes]) -> bytes:
                return await self._read_q(admin, ctx.uid, fn)

            with self.budgets.opening(ctx.uid, f"open {node.which}") as charge:
                feed, stream = await self.feeds.open(node, flags, run)
                if isinstance(feed, MetricsHandle):
                    self.budgets.grow(charge, len(feed.content), "open metrics")
            fh = self._new_handle(feed, charge)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=stream)
        if isinstance(node, GeneratedFileNode):
            if writing:
                raise _err(errno.EACCES)
            with self.budgets.opening(ctx.uid, "open episodes") as charge:
                piece = await self._episodes_piece(ctx)
                self.budgets.share(charge, piece, "open episodes")
            fh = self._new_handle(GeneratedHandle(piece), charge)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if isinstance(node, SnapDirNode) or isinstance(node, SkeletonNode):
            raise _err(errno.EISDIR)
        raise _err(errno.EINVAL)

    @edge
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        if isinstance(handle, LeafHandle):
            remaining = handle.entry.size - off
            if remaining <= 0 or size <= 0:
                return b""
            return self.sm.read_file(handle.entry.ref, off, min(size, remaining))
        if isinstance(handle, CtlHandle):
            out = _drain(handle, size)
            self.budgets.force(handle.charge, -len(out))
            return out
        if isinstance(handle, EventsReader):
            return self._read_events(fh, handle, size)
        if isinstance(handle, FEED_HANDLES):
            return read_feed(handle, off, size)
        if isinstance(handle, GeneratedHandle):
            return handle.piece.content[off : off + size]
        if isinstance(handle, BranchFileHandle):
            if handle.content is None or off == 0:
                # A read from the start shows the current state; continuations of one read
                # sequence stay consistent with its beginning.
                content = await self._branch_file_content(handle.node)
                held = len(handle.content or b"")
                self.budgets.grow(self._charges[fh], len(content) - held, "read")
                handle.content = content
            return handle.content[off : off + size]
        raise _err(errno.EBADF)

    def _read_events(self, fh: int, handle: EventsReader, size: int) -> bytes:
        """A read of ``events``: the lines it took from the ring and did not return yet are
        charged to the reader's uid; past its budget they are skipped, as the ring skips
        what a reader too slow for it did not read."""
        out = handle.read(size)
        charge = self._charges[fh]
        kept = charge.bytes - HANDLE_BYTES
        try:
            self.budgets.grow(charge, len(handle.pending) - kept, "read events")
        except OverBudgetError:
            handle.pending = b""
            self.budgets.force(charge, -kept)
        return out

    @edge
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if isinstance(handle, CtlHandle):
            return await self._ctl_write(handle, buf)
        if isinstance(handle, BranchFileHandle):
            node = handle.node
            if node.which not in ("parent", "commit"):
                raise _err(errno.EBADF)
            verb = "rebase" if node.which == "parent" else "commit"
            shown = f"write branches/{node.branch}/{node.which}"
            outsider = None if handle.admin else self._charges[fh].uid
            with self.feeds.operation(
                OperationRecord(verb, [node.branch], shown, uid=outsider)
            ) as record:
                if not handle.admin:
                    raise PermissionDeniedError("only root or the admin group may change state")
                if handle.written is not None:
                    if handle.refusal is not None and buf == handle.written:
                        # a buffered writer sends a refused write again when its file is
                        # closed: the same answer, not "one line" hiding the first
                        raise handle.refusal
                    # A shell writes each line of `printf 'a\nb\n' > parent` separately; the
                    # second would act on the result of the first. ctl is a stream of commands;
                    # these files hold one value.
                    raise InvalidArgumentError(f"{node.which} takes one line per open file")
                handle.written = buf
                try:
                    if node.which == "parent":
                        cmd = wire.parse_parent_write(node.branch, buf)
                    else:
                        cmd = wire.parse_commit_write(node.branch, buf)
                    cmd = replace(cmd, branch_created_ns=_branch_created_ns(node))
                    record.parsed(cmd)
                    record.ran = True
                    record.finished(await self._q(control.execute, self.sm, cmd, handle.caller))
                except (CascowfsError, OSError) as exc:
                    handle.refusal = exc
                    raise
            if cmd.verb == "commit":
                self.changed_ns[SNAPSHOTS_INO] = time.time_ns()
            handle.content = None
            return len(buf)
        raise _err(errno.EBADF)

    async def _ctl_write(self, handle: CtlHandle, buf: bytes) -> int:
        try:
            outsider = None if handle.admin else handle.charge.uid
            with self.feeds.operation(unparsed(buf, outsider)) as record:
                cmd = self._permitted(handle, buf, record)
                record.ran = True  # permitted: what fails from here may have changed some
                if cmd.verb == "label" and cmd.id is not None and self.labels is not None:
                    if await self.labels.label(cmd.id, cmd.labels):
                        self._after_reply(self.sm.housekeep, "housekeeping after labels")
                    result = cmd.id
                else:
                    uid = handle.charge.uid  # not an admin: a query, in the readers' threads
                    run = functools.partial(control.execute, self.sm, cmd, handle.caller)
                    result = await self._read_q(handle.admin, uid, run)
                record.finished(result)
        except Exception as exc:
            if handle.keeps_replies:
                self._keep_reply(handle, wire.error_reply(*control.error_of(exc)))
            raise
        await self._after_command(cmd)
        if handle.keeps_replies:
            self._keep_reply(handle, wire.ok_reply(result))
        return len(buf)

    def _keep_reply(self, handle: CtlHandle, reply: bytes) -> None:
        """Keep ``reply`` until it is read: past ``REPLIES_KEPT`` replies or
        ``REPLY_BYTES_KEPT`` bytes, the oldest unread go; past its uid's budget, an ENOMEM
        error reply takes its place."""
        while handle.replies and (
            len(handle.replies) >= REPLIES_KEPT or handle.unread + len(reply) > REPLY_BYTES_KEPT
        ):
            dropped = len(handle.replies.popleft())
            handle.unread -= dropped
            self.budgets.force(handle.charge, -dropped)
        try:
            self.budgets.grow(handle.charge, len(reply), "ctl reply")
        except CascowfsError as exc:
            reply = wire.error_reply(exc.errno, exc.message)
            self.budgets.force(handle.charge, len(reply))
        handle.replies.append(reply)
        handle.unread += len(reply)

    @staticmethod
    def _permitted(handle: CtlHandle, buf: bytes, record: OperationRecord) -> wire.Command:
        """The command in ``buf`` if this open file may send it: queries anyone, changes
        root and the admin group. A malformed command from anyone else is EPERM too, the
        answer every change of theirs gets. ``record`` (its ``MNT/events`` line) gets the
        command's names, a refused change's too: what was tried on what."""
        if handle.admin:
            cmd = wire.parse_command(buf)
            record.parsed(cmd)
            return cmd
        refused = PermissionDeniedError("only root or the admin group may change state")
        try:
            cmd = wire.parse_command(buf)
        except InvalidArgumentError:
            raise refused from None
        record.parsed(cmd)
        if cmd.verb not in wire.QUERY_VERBS:
            raise refused
        return cmd

    async def _after_command(self, cmd: wire.Command) -> None:
        """Make a change done through ctl visible in the kernel's dentry cache."""
        now = time.time_ns()
        if cmd.verb == "discard" and cmd.name:
            self.changed_ns[BRANCHES_INO] = now
            if self.table.detach(self.branches, cmd.name.encode()):
                await self._invalidate(BRANCHES_INO, cmd.name.encode())
        elif cmd.verb == "prune" and cmd.id:
            self.changed_ns[SNAPSHOTS_INO] = now
            await self._detach_view(cmd.id)
            if self.table.detach(self.snapshots, cmd.id.encode()):
                await self._invalidate(SNAPSHOTS_INO, cmd.id.encode())
            # an observation is a leaf, of no table's children: the kernel may cache it
            await self._invalidate(OBSERVATIONS_INO, cmd.id.encode())
        elif cmd.verb == "branch":
            self.changed_ns[BRANCHES_INO] = now
        elif cmd.verb in ("commit", "import"):
            self.changed_ns[SNAPSHOTS_INO] = now
        elif cmd.verb == "label" and cmd.id:
            # the root's xattrs show the labels: a cached node must show the new ones
            node = self.table.child(self.snapshots, cmd.id.encode())
            if isinstance(node, SnapDirNode):
                node.info = self.sm.snapshot(cmd.id)

    @edge
    async def flush(self, fh: int) -> None:
        # Nothing to do at close: ENOSYS makes the kernel stop sending FLUSH at all, which
        # saves a round trip through the daemon on every close(2) of every file here.
        raise _err(errno.ENOSYS)

    @edge
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    @edge
    async def release(self, fh: int) -> None:
        handle = self._drop_handle(fh)
        if isinstance(handle, CtlHandle):
            self.ctl_lanes.closed(handle.lane)


def _drain(handle: CtlHandle, size: int) -> bytes:
    out = bytearray(handle.partial)
    handle.partial = b""
    while handle.replies and len(out) < size:
        out += handle.replies.popleft()
    if len(out) > size:
        handle.partial = bytes(out[size:])
        del out[size:]
    handle.unread -= len(out)
    return bytes(out)


def _file_call(verb: str, where: str, name: bytes, uid: int | None) -> OperationRecord:
    """The record of a ``mkdir``/``rmdir`` of ``name``: the raw name, which no check has
    passed yet (``uid``: the caller's, if outside root and the admin group)."""
    text = os.fsdecode(name)
    return OperationRecord(verb, [text], f"{where}/{text}", uid=uid)


def _branch_created_ns(node: BranchFileNode) -> int | None:
    """The ``created_ns`` of the branch a file node was looked up in (None: not known)."""
    return node.parent.created_ns if isinstance(node.parent, BranchDirNode) else None


def _valid_or_none(check: Callable[[object], str], name: bytes) -> str | None:
    try:
        return check(name)
    except CascowfsError:
        return None
