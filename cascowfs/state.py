"""StateManager: the one entry point for every state change (docs/architecture.md, Module map).

Store layout (all on one filesystem, so renames are atomic and overlay upper/work dirs work)::

    STORE/lock                  flock: one StateManager per store
    (every path root's alone, but the three on the way to a branch's tree: privacy.py)
    STORE/meta/                 LMDB: objects, snapshots, branches, layers, ops (catalog.py);
                                its data.mdb is what makes a directory a store (``is_store``)
    STORE/wal/log               write-ahead log (wal.py)
    STORE/layers/<layer>/       native lower layers, a cache of the CAS (layer_builder.py)
    STORE/branches/<name>/      tree/ (the overlay mount point) and private/ (root's alone:
                                the overlay's upper/ and work/)
    STORE/staging/<op>/         work in progress of one operation
    STORE/trash/                whatever is being deleted in the background (trash.py)
    STORE/empty/                the lower layer of branches on the empty snapshot

Every mutation follows PREPARE (WAL) -> side effects in staging, a new layer moved into
layers/ -> APPLY (one LMDB transaction, which also marks the op applied) -> SWITCH (mount,
unmount, directories into the trash) -> FINALIZE. The operations (import, branch, rebase and
reset, commit, discard, prune, label, and the layer rewrite behind flatten and merges) sit side
by side in this module, each inside ``_logged_op``. ``open`` replays unfinished ops and
reconciles the disk and the mount table with the recorded state (recovery.py); collection
(collector.py), layer writing (layer_builder.py) and the trash (trash.py) run in threads of
their own.
docs/architecture.md explains each step and which PREPAREs are flushed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import lmdb

from . import forks, images, merge_plan, overlay, privacy, recovery
from . import layers as layerfs
from .background import BackgroundWorker, EmptyTrash, Job, MergeLayers
from .beneath import Identity, identity
from .cas import ContentStore, identify_content, prepare_content
from .catalog import STORE_FORMAT, BranchRecord, Catalog, Observation, SnapshotRecord
from .collector import Collector
from .commit_caches import CommitCaches
from .crashpoints import crash_point
from .direct_image import DirectImage
from .episodes import Episode, FindQuery, episode_of, find, parent_loops
from .errors import (
    BusyError,
    CascowfsError,
    ExistsError,
    InvalidArgumentError,
    NotFoundError,
    StoreLockedError,
    disk_errors,
    from_os_error,
)
from .extents import read_pieces
from .fuse.sysmount import FUSE_TYPE, store_of_source
from .gate import NamedLocks, OpGate
from .label_applies import LabelApplies, LoggedLabel
from .layer_builder import LayerBuilder, as_image
from .layer_pins import LayerPins
from .layer_refs import LayerRefs
from .metadb import MetaDB
from .model import BranchInfo, Change, Entry, SnapshotInfo
from .names import (
    check_branch_name,
    check_label_changes,
    check_labels,
    check_snapshot_id,
)
from .progress import progress_bar
from .scan import (
    DirNode,
    ObjectSink,
    Progress,
    apply_upper,
    finalize,
    listings_into,
    scan_directory,
)
from .trash import Trash
from .trees import TreeStore, tree_objects
from .tuning import DEFAULT_TUNING, Tuning
from .wal import WriteAheadLog

log = logging.getLogger("cascowfs.state")

__all__ = [
    "STORE_FORMAT",
    "StateManager",
    "Tuning",
    "check_store_dir",
    "is_store",
    "resolve_import_source",
]

# How often an op that mounts a branch before its APPLY is made again when a merge dropped a
# layer of the chain it mounted meanwhile (``_retrying_on_chain``).
CHAIN_ATTEMPTS = 3


class ChainChangedError(BusyError):
    """The layers an op mounted a branch on are gone since (a merge of the snapshot's chain
    dropped one before the op's APPLY): the op changed nothing and may be made again."""


# What a store directory holds; a directory holding nothing else (and no metadata database)
# is what an interrupted creation leaves, which a creating open finishes.
STORE_ENTRIES = frozenset(
    {"lock", "meta", "wal", "layers", "branches", "staging", "trash", "empty"}
)
NOT_A_STORE = "not a cascowfs store; run cascowfs init"
BRANCH_PRIVATE = "private"  # a branch's directory for its upper and work directories
BRANCH_TREE = "tree"  # a branch's overlay mount point, in its directory
# Every discard and commit asks for a trash round, back to back in a busy mix, and a sweep of
# the image mounts reads the whole mount table: at most one a second (an unused image mount
# costs a mount table entry until then; ``settle`` and the shutdown sweep anyway).
IMAGE_SWEEP_INTERVAL_S = 1.0


def is_store(path: Path) -> bool:
    """A directory is a cascowfs store once its metadata database exists (the format record
    inside it is checked when the store is opened)."""
    return (path / "meta" / "data.mdb").is_file()


def check_store_dir(store: Path, *, create: bool) -> None:
    """Refuse, before anything is written, to open what is not a store: ENOENT if ``store`` is
    missing, EINVAL if it is something else. ``create`` also accepts a missing directory, an
    empty one or one an interrupted creation left; a non-empty other directory is ENOTEMPTY
    (a source tree given for a store must not gain a store's directories)."""
    if is_store(store):
        return
    try:
        entries = set(os.listdir(store))
    except FileNotFoundError:
        if create:
            return
        raise NotFoundError(f"{store}: {NOT_A_STORE}") from None
    except NotADirectoryError:
        if create:
            raise CascowfsError(f"{store} is not a directory", errno=errno.ENOTDIR) from None
        raise InvalidArgumentError(f"{store}: {NOT_A_STORE}") from None
    if not create:
        raise InvalidArgumentError(f"{store}: {NOT_A_STORE}")
    if not entries <= STORE_ENTRIES:
        raise CascowfsError(
            f"{store} is neither empty nor a cascowfs store; give a new or empty directory",
            errno=errno.ENOTEMPTY,
        )


def unmount_store_mounts(store: Path) -> None:
    """Unmount the branch overlays of ``store``, those of discarded branches in its trash,
    and the layer images they stacked."""
    for where in ("branches", "trash", "mounts"):
        overlay.unmount_under(store / where)


def _now_ns() -> int:
    return time.time_ns()


class StateManager:
    """Snapshots, branches and their lifecycle over one store directory.

    Thread-safe: mutations of different branches run side by side (one lock per branch); their
    LMDB transactions go through MetaDB's committer thread, which shares one sync among those
    that arrive together. Reads (``snapshot``, ``read_tree``, ``read_file`` ...) use short
    read transactions and may run concurrently with a mutation. Objects no live root reaches
    are collected by a thread of their own (``collector.py``).
    """

    # set by ``open``, which builds a StateManager only once it holds the store's lock
    db: MetaDB
    catalog: Catalog
    content: ContentStore
    trees: TreeStore
    wal: WriteAheadLog
    label_applies: LabelApplies
    collector: Collector
    layers: LayerBuilder
    layer_refs: LayerRefs

    def __init__(self, store: Path, tuning: Tuning) -> None:
        self.store = store
        self.tuning = tuning
        self.layers_dir = store / "layers"
        self.branches_dir = store / "branches"
        self.staging_dir = store / "staging"
        self.trash_dir = store / "trash"
        self.empty_dir = store / "empty"
        self.mounts_dir = store / "mounts"  # layer images' mount points
        self.trash = Trash(self.trash_dir)
        self.pins = LayerPins()  # layers that kernel views of snapshots stack
        self._ops = OpGate()
        self._label_gate_tickets: dict[str, int] = {}  # begun labels' gate tickets, by op
        self._branch_locks = NamedLocks()
        self._status_caches = CommitCaches()  # status: what the branch's last one learned
        self._commit_caches = CommitCaches()  # commit: what the branch's last one learned
        self._lock_fd = -1
        self._umask_before: int | None = None  # this process's umask before the store's own
        self._background = BackgroundWorker(self._run_job)
        self._closing = threading.Event()  # set by close; cuts the background threads' waits short
        self._read_only = False
        # branches whose overlay could not be mounted (a full disk), with why: a read-only
        # placeholder stands at their mount point until an operation on them mounts them
        self._unmounted: dict[str, CascowfsError] = {}
        # branches whose own upper and work directories a failed re-base or reset could not
        # put back (``_strand``), with that op and where they wait; each is in ``_unmounted``
        # too, so that its next commit, re-base or reset puts them back first
        self._stranded: dict[str, tuple[str, Path]] = {}
        # a store of format 7 or older opened read-only: its branches' uppers are where that
        # format kept them (recovery.check_format)
        self.legacy_branch_layout = False

    # ------------------------------------------------------------------------------------
    # opening and closing
    # ------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        store: str | Path,
        *,
        progress: bool = False,
        recover: bool = True,
        tuning: Tuning = DEFAULT_TUNING,
        create: bool = True,
    ) -> StateManager:
        """Open the store, lock it, replay the WAL and reconcile mounts.

        ``create``: a missing or empty directory becomes a new store; without it anything but
        an existing store is refused and nothing is written (``check_store_dir``).
        ``recover=False`` opens without touching anything (fsck uses it to look at a store as
        it was left)."""
        # checked as given, so that a refusal names the path the caller gave
        check_store_dir(Path(store).absolute(), create=create)
        # The real path: mounts are found by their paths in the mount table, and a store
        # opened through a symlink or ``..`` would not find its own branches' mounts
        self = cls(Path(os.path.realpath(store)), tuning)
        self._read_only = not recover
        with disk_errors(f"opening store {self.store}"):
            for d in (
                self.store,
                self.layers_dir,
                self.branches_dir,
                self.staging_dir,
                self.trash_dir,
                self.empty_dir,
                self.mounts_dir,
            ):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.store / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        holder = _take_store_lock(self._lock_fd)
        if holder is not None:
            os.close(self._lock_fd)
            raise StoreLockedError(f"store {self.store} is in use (by pid {holder or '?'})")
        forks.close_in_children(self._lock_fd)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            with disk_errors(f"opening store {self.store}"):
                self._umask_before = privacy.make_private(self.store)
            self.db = MetaDB(self.store / "meta")
            self.catalog = Catalog(self.db.dbs)
            self.content = ContentStore(self.db)
            self.trees = TreeStore(self.content)
            self.wal = WriteAheadLog(self.store / "wal" / "log", read_only=not recover)
            self.label_applies = LabelApplies(self.db, self.catalog, self.wal)
            self.collector = Collector(
                self.db, self.catalog, self.content, self._ops, self._closing, tuning
            )
            self.layers = LayerBuilder(
                self.store,
                self.db,
                self.catalog,
                self.trees,
                self.content,
                self.trash,
                self._ops,
                images.detect(tuning.layer_images, self.staging_dir),
                lambda: self._background.put(EmptyTrash()),
            )
            self.layer_refs = LayerRefs(self.catalog, self.collector.note_garbage)
            log.info("%s: layers mount as %s", self.store, self.layers.image_mode)
            recovery.check_format(self, read_only=not recover)
            if recover:
                recovery.recover(self, progress)
        except BaseException:
            if hasattr(self, "wal"):
                self.wal.close()
            if hasattr(self, "db"):
                self.db.close()
            self._release_lock()
            raise
        self._background.start()
        if recover:
            self.layers.start_building()
            self.collector.start()
            self.layers.start_syncing(tuning.layer_sync_seconds, self._closing)
            self._background.put(EmptyTrash())
        return self

    def close(self, *, unmount_branches: bool = False) -> None:
        """Release the store. Branch mounts stay (they outlive the daemon) unless asked; the
        trash's mounts go, its files stay for the next open's round."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.collector.stop()
        self.layers.stop_building()
        # The trash is not emptied on the way out: it may hold thousands of trees a busy
        # machine has not deleted yet; the next open empties it in the background.
        self.trash.stop()
        self._background.stop(skipping=EmptyTrash)
        self.layers.stop_syncing()
        if not self._read_only:
            try:
                self.layers.sync()
            except (CascowfsError, OSError):
                pass  # the layers stay marked unsynced: if the page cache goes, they are rebuilt
        with self._ops.exclusive():
            self.label_applies.wait_applied()  # their FINALIZE records go to the WAL
            if unmount_branches:
                unmount_store_mounts(self.store)
            elif not self._read_only:
                overlay.unmount_under(self.trash_dir)  # discarded branches not detached yet
                self.layers.unmount_unused()
            self.wal.close()
            self.db.close()
        self._release_lock()

    def settle(self) -> None:
        """Wait until the background threads have done everything queued so far (commits'
        layers, layer merges, emptying the trash), then collect the objects no live root
        reaches."""
        self.layers.join()
        self._background.join()
        self.label_applies.wait_applied()
        if not self._read_only:
            self.layers.unmount_unused()  # what the trash rounds' rate left for later
            self.collect()

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """No state change runs inside this block (fsck of a live store, tests), and every
        label that returned is applied."""
        with self._ops.exclusive():
            self.label_applies.wait_applied()
            yield

    def __enter__(self) -> StateManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            forks.forget(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._umask_before is not None:
            os.umask(self._umask_before)
            self._umask_before = None

    def _run_job(self, job: Job) -> None:
        if isinstance(job, EmptyTrash):
            self.trash.empty()
            # images only the trashed overlays stacked; one sweep a second at most
            self.layers.unmount_unused(unless_swept_within=IMAGE_SWEEP_INTERVAL_S)
        elif isinstance(job, MergeLayers):
            self.merge_layers(job.id)

    # ------------------------------------------------------------------------------------
    # what recovery, fsck and the operations share
    # ------------------------------------------------------------------------------------
    def mount_matches(self, m: overlay.MountRecord, name: str, rec: BranchRecord) -> bool:
        """Whether mount ``m`` is branch ``name``'s overlay, on the layers ``rec`` records and
        over the branch's upper directory."""
        if m.fstype != "overlay":
            return False
        dirs = overlay.overlay_dirs(m)
        lowers = tuple(str(p) for p in self.lower_paths(rec.layers))
        return dirs.lowers == lowers and dirs.upper == str(self.upper_path(name))

    def own_mounts(self) -> list[overlay.MountRecord]:
        """Mounts below the store: not one at the store's own path, which holds it (a store
        on a volume of its own; opening the store unmounted the volume with the strays)."""
        return [m for m in overlay.mounts_under(self.store) if m.target != str(self.store)]

    def branch_side_mounts(self) -> list[overlay.MountRecord]:
        """The store's mounts but its layer images' (branches, and strays anywhere else)."""
        images_at = f"{self.mounts_dir}/"
        return [m for m in self.own_mounts() if not m.target.startswith(images_at)]

    def checkpoint(self) -> None:
        """Forget finished operations: WAL first, then the applied markers (never the reverse,
        or a pending op would lose its 'applied' mark and be rolled back). A label's record
        is all that holds it until its transaction commits: kept while one may be in flight.
        So is the record of a re-base or reset whose branch's directories wait in staging
        (``_strand``): the next open puts them back from it."""
        self.label_applies.wait_applied()
        if self.label_applies.failed or self._stranded:
            return  # the next open redoes them from the log
        self.wal.checkpoint()
        self.db.write(self.catalog.forget_applied, "checkpoint")

    def _when_alone(self) -> None:
        """Housekeeping that needs no other operation in flight: checkpoint the WAL. Skipped
        (for a later op) when others run."""
        if not self._checkpoint_due():
            return
        if not self._ops.try_sole():
            return
        try:
            self.checkpoint()
        finally:
            self._ops.release_sole()

    def _checkpoint_due(self) -> bool:
        return self.wal.records_since_checkpoint >= self.tuning.checkpoint_every

    def _forget_file_caches(self, name: str) -> None:
        self._status_caches.forget(name)
        self._commit_caches.forget(name)

    def tree_path(self, name: str) -> Path:
        """Branch ``name``'s overlay mount point."""
        return self.branches_dir / name / BRANCH_TREE

    def upper_path(self, name: str) -> Path:
        """Branch ``name``'s upper directory (inside its private directory: privacy.py)."""
        if self.legacy_branch_layout:
            return self.branches_dir / name / "upper"
        return self.branches_dir / name / BRANCH_PRIVATE / "upper"

    def make_branch_dirs(self, name: str) -> tuple[Path, Path]:
        """Branch ``name``'s directory (searchable by all), its tree mount point and its
        private directory (root's alone); returns its upper and work directories' paths."""
        bdir = self.branches_dir / name
        bdir.mkdir(exist_ok=True)
        privacy.make_passage(bdir)
        (bdir / BRANCH_TREE).mkdir(exist_ok=True)
        private = bdir / BRANCH_PRIVATE
        private.mkdir(mode=privacy.PRIVATE_DIR, exist_ok=True)
        os.chmod(private, privacy.PRIVATE_DIR)
        return private / "upper", private / "work"

    def unmount_branch(self, name: str) -> None:
        """Unmount every mount stacked at branch ``name``'s mount point."""
        overlay.unmount_stacked(self.tree_path(name))

    def lower_paths(self, chain: list[str]) -> list[Path]:
        """The layer directories an overlay of ``chain`` stacks (top first)."""
        return self.layers.lower_paths(chain)

    def root_of(self, superroot_hex: str | None) -> Entry | None:
        """The root directory entry of the tree of superroot ``superroot_hex`` (None: none)."""
        return self.trees.root_of(superroot_hex)

    def _write_objects(self, objects: list[tuple[bytes, bytes]]) -> None:
        objects = self.content.pack_missing(objects)
        self.db.write(lambda txn: self.content.put_objects(txn, objects), "writing chunks")

    def _write_objects_of_logged_op(self, objects: list[tuple[bytes, bytes]]) -> None:
        """Objects written before APPLY are orphans if the op dies: recovery sweeps them only
        for an op it finds in the WAL, so its record must be durable first."""
        self.wal.sync()
        self._write_objects(objects)

    def _superroot(self, root: Entry, sink: ObjectSink) -> bytes:
        """The snapshot digest covers the root directory's own metadata too: it is the id of a
        one-entry tree holding the root entry under the empty name."""
        sid, objects = tree_objects({b"": root._replace(name=b"")})
        sink.add(objects)
        return sid

    def mount_branch(self, name: str, rec: BranchRecord, *, fresh_upper: bool = False) -> None:
        """Mount branch ``name`` on the layers its record names (writing any not written yet),
        over its upper directory, or an empty one (``fresh_upper``)."""
        self.layers.build_chain(rec.layers)
        with disk_errors(f"mounting branch {name}"):
            upper, work = self.make_branch_dirs(name)
            # a volatile mount refuses a work dir it used before a crash: always start it empty
            self.trash.put(work)
            if fresh_upper or not upper.is_dir():
                self.trash.put(upper)
                self._make_upper(upper, rec.base_root)
            work.mkdir()
            with self.layers.mounted(rec.layers) as lowers:
                overlay.mount_overlay(self.tree_path(name), lowers, upper, work)
        self._now_mounted(name)

    def _now_mounted(self, name: str) -> None:
        """Branch ``name`` has a fresh overlay: no longer unmounted, and what its commits
        cached of the old one's upper is gone with it."""
        self._unmounted.pop(name, None)
        self._forget_file_caches(name)

    def leave_unmounted(self, name: str, why: CascowfsError) -> None:
        """Branch ``name``'s overlay could not be mounted (``why``: a full disk): a read-only
        placeholder takes its mount point, so that nothing written there is hidden by the
        overlay later, and the next commit, reset or rebase of it mounts it again
        (``_mounted_again``); ``status`` and fsck report it meanwhile. Where the placeholder
        cannot be mounted either (a mount table at ``fs.mount-max``), the mount point goes:
        a write there is ENOENT, not a file in a bare directory of the store that root's
        tools would take for the branch's (``make_branch_dirs`` makes it again)."""
        log.warning(
            "%s: branch %s is not mounted (%s); the next commit, reset or rebase of it mounts "
            "it once there is room",
            self.store,
            name,
            why,
        )
        self._unmounted[name] = why
        try:
            overlay.unmount_stacked(self.tree_path(name))
            overlay.mount_placeholder(self.tree_path(name))
        except (OSError, CascowfsError) as exc:
            log.warning("%s: no placeholder at branch %s's mount point: %s", self.store, name, exc)
            with contextlib.suppress(OSError):  # not empty, or still a mount: left as it is
                os.rmdir(self.tree_path(name))

    def _mounted_again(self, name: str, rec: BranchRecord) -> None:
        """Mount branch ``name`` if it was left unmounted (``leave_unmounted``); if it still
        cannot be, fail with why (under the branch's lock). A branch a failed re-base or reset
        left stranded (``_strand``) is still mounted: its own directories are put back."""
        if name not in self._unmounted:
            return
        if name in self._stranded:
            self._restore_stranded(name)
            return
        try:
            overlay.unmount_stacked(self.tree_path(name))
            self.mount_branch(name, rec)
        except CascowfsError as exc:
            self.leave_unmounted(name, exc)
            raise self._not_mounted(name) from None

    def _not_mounted(self, name: str) -> CascowfsError:
        why = self._unmounted[name]
        if name in self._stranded:
            return type(why)(
                f"branch {name}'s own directories are not back in place: {why.message}",
                errno=why.errno,
            )
        return type(why)(f"branch {name} is not mounted: {why.message}", errno=why.errno)

    def _strand(self, name: str, op: str, staged: Path, why: CascowfsError) -> None:
        """A re-base or reset ``op`` of branch ``name`` failed before its APPLY, and putting
        the branch's own upper and work directories back from ``staged`` failed too (a rename
        on a failing disk). Its overlay still works on them where they are, so ``staged``
        must neither go to the trash (the branch's changes would be deleted under it) nor
        have its op FINALIZEd (the next open puts them back from its record:
        ``recovery._roll_back_repoint``). Until they are back, what reads the branch's
        upper directory (commit, status) or moves it (re-base, reset) would find the op's
        fresh one instead: those wait for ``_restore_stranded``, and checkpoints keep the
        record."""
        log.warning(
            "%s: branch %s's own directories could not be put back after failed op %s (%s); "
            "they wait in %s until its next commit, reset or rebase, or the next open",
            self.store,
            name,
            op,
            why,
            staged,
        )
        self._stranded[name] = (op, staged)
        self._unmounted[name] = why

    def _restore_stranded(self, name: str) -> None:
        """Put back branch ``name``'s directories that ``_strand`` left in staging (under the
        branch's lock), then finish the failed op as ``_repoint`` would have; fail with the
        disk's error if they still cannot be."""
        op, staged = self._stranded[name]
        try:
            self.swap_back(name, staged)
        except CascowfsError as exc:
            self._unmounted[name] = exc
            raise self._not_mounted(name) from None
        self._forget_stranded(name)

    def _forget_stranded(self, name: str) -> None:
        """Branch ``name``'s directories are back in place (or the branch is discarded): its
        failed op's staging goes, and the op is FINALIZEd as refused."""
        op, staged = self._stranded.pop(name)
        self._unmounted.pop(name, None)
        self._drop_staged(staged)
        self._refused(op)

    @contextmanager
    def _new_branch_mount(
        self, name: str, chain: list[str], upper: Path, work: Path
    ) -> Iterator[int]:
        """Branch ``name``'s overlay on ``chain`` over ``upper``, made but attached nowhere:
        its descriptor, for ``_attach_branch`` after the APPLY (a new branch's:
        ``_attach_new_branch``, before it). Making it is what may fail (overlayfs creates
        directories in ``work``): before the APPLY, a full disk refuses the op with nothing
        changed. The chain's images stay mounted inside the block."""
        self.layers.keep_mounted(chain)
        try:
            try:
                lowers = self.layers.mount_chain(chain)
                with disk_errors(f"mounting branch {name}"):
                    mnt_fd = overlay.overlay_mount_fd(self.tree_path(name), lowers, upper, work)
            except CascowfsError as exc:
                # a merge dropped a layer of the chain and its directory went (ENOENT): the
                # op is made again on the chain as it is now (``_retrying_on_chain``)
                if self._chain_dropped(chain):
                    raise ChainChangedError(
                        f"mounting branch {name}: the layers of its snapshot changed meanwhile"
                    ) from exc
                raise
            try:
                yield mnt_fd
            finally:
                os.close(mnt_fd)
        finally:
            self.layers.let_go(chain)

    def _attach_branch(self, name: str, mnt_fd: int) -> None:
        """After an APPLY: the overlay ``_new_branch_mount`` made takes branch ``name``'s
        mount point, replacing what is mounted there (its old overlay, or the placeholder of
        ``leave_unmounted``). Neither step takes space; if one fails anyway, the branch is
        left unmounted, never shown on the old layers."""
        try:
            overlay.unmount(self.tree_path(name))
            overlay.attach("overlay", self.tree_path(name), mnt_fd)
        except CascowfsError as exc:
            self.leave_unmounted(name, exc)
            return
        self._now_mounted(name)

    def _attach_new_branch(self, name: str, mnt_fd: int) -> None:
        """Attach a new branch's overlay (``_new_branch_mount``) at its mount point, before
        the APPLY that records the branch: a mount the kernel refuses (ENOSPC from a mount
        table at ``fs.mount-max``, any other error) fails the creation with nothing recorded
        (the op's undo trashes its directory). Attached after the APPLY, a refused mount left
        the branch recorded and its tree a bare directory of the store, into which writes
        went that its overlay would hide once mounted; a kill before the APPLY leaves a mount
        no record names, which reconciliation unmounts."""
        try:
            overlay.attach("overlay", self.tree_path(name), mnt_fd)
        except CascowfsError as exc:
            why = exc.message
            if exc.errno == errno.ENOSPC:  # move_mount takes no disk space: the mount table
                why += (
                    " (a mount table is full: this mount namespace, or one it propagates to,"
                    " holds fs.mount-max mounts)"
                )
            raise type(exc)(
                f"creating branch {name}: its overlay could not be mounted: {why}",
                errno=exc.errno,
            ) from exc

    def _make_upper(self, upper: Path, base_root: str | None) -> None:
        """An empty upper directory whose root shows ``base_root``'s root."""
        upper.mkdir()
        layerfs.set_root_metadata(upper, self.root_of(base_root))

    def stage_branch_dirs(self, snap: SnapshotRecord | None) -> Path:
        """Write ``snap``'s layers (None: the empty snapshot) and make an empty upper over it
        and a work directory in staging, for an op that mounts a branch anew: on a full disk
        it fails here, with nothing logged, rather than leave the branch unmounted."""
        self.layers.build_chain(snap.layers if snap else [])
        staged = self.staging_dir / f"dirs-{secrets.token_hex(5)}"
        try:
            with disk_errors("making a branch's directories"):
                staged.mkdir()
                self._make_upper(staged / "upper", snap.root if snap else None)
                (staged / "work").mkdir()
        except BaseException:
            self._drop_staged(staged)
            raise
        return staged

    def _swap_in_staged(self, name: str, staged: Path) -> None:
        """Put the upper and work directories ``stage_branch_dirs`` made in ``staged`` in
        place of branch ``name``'s, whose own go into ``staged`` (``old-upper``,
        ``old-work``): its mount still works on them, wherever they are. Renames within
        small directories: no space needed. On a failure the caller puts back what moved
        (``swap_back``)."""
        with disk_errors(f"re-basing branch {name}"):
            for kind, final in self._overlay_dirs(name):
                if os.path.lexists(final):
                    os.rename(final, staged / f"old-{kind}")
                os.rename(staged / kind, final)

    def _overlay_dirs(self, name: str) -> tuple[tuple[str, Path], tuple[str, Path]]:
        """Branch ``name``'s upper and work directories, each with the name
        ``stage_branch_dirs`` gives its fresh one in staging."""
        upper = self.upper_path(name)
        return ("upper", upper), ("work", upper.parent / "work")

    def swap_back(self, name: str, staged: Path) -> None:
        """Undo ``_swap_in_staged`` (idempotent: recovery redoes it after a kill -9 before
        the op's APPLY), so the branch's mount works on its own directories again."""
        with disk_errors(f"restoring branch {name}'s directories"):
            for kind, final in self._overlay_dirs(name):
                old = staged / f"old-{kind}"
                if not os.path.lexists(old):
                    continue
                if os.path.lexists(final):
                    os.rename(final, staged / kind)
                os.rename(old, final)

    def _drop_staged(self, staged: Path) -> None:
        """Trash what ``stage_branch_dirs`` made, for an op that fails: on a failing disk the
        move fails too, and must not hide the op's own error (the next open empties
        staging)."""
        self.trash.put_after_apply([staged], self.store)

    # ------------------------------------------------------------------------------------
    # import
    # ------------------------------------------------------------------------------------
    def import_tree(
        self,
        src: str | Path,
        id: str | None = None,
        labels: dict[str, str] | None = None,
        *,
        progress: bool = False,
        reader: privacy.Caller | None = None,
    ) -> str:
        """Import a plain directory as a new snapshot (its own full layer), reading it with
        ``reader``'s credentials if given (``privacy.reading_as``)."""
        labels = check_labels(labels)
        # root reads anything: its path follows only root's links (``resolve_trusting``)
        trusting = 0 if reader is None or reader.uid == 0 else None
        src, resolved = resolve_import_source(Path(src), self.store, trusting)
        with self._ops.running():
            id = self._claim_id(id)
            layer = secrets.token_hex(5)
            with self._logged_op(
                "import", id=id, layer=layer, undo=lambda op: self._abandon(op, layer)
            ) as op:
                staged = self.staging_dir / op
                direct = DirectImage.plan(
                    src, staged, reader=reader, image_mode=self.layers.image_mode
                )
                total = _tree_bytes(src) if progress else 0
                with progress_bar(progress, total, f"import {id}") as bar:
                    sink = ObjectSink(self._write_objects)
                    unfit: list[str] = []  # what keeps the layer a directory
                    with disk_errors(f"import of {src}"):
                        # mkfs.erofs reads the source beside the scan, or the scan's mirror
                        # once the scan is done (direct_image.py)
                        with direct.building() if direct else nullcontext():
                            node = self._scan_import(
                                src, resolved, sink, Progress(bar), reader, unfit, direct, staged
                            )
                            with (
                                nullcontext()
                                if direct
                                else self.layers.sealing(staged, unfit=unfit)
                            ):
                                root = finalize(node, sink)
                                superroot = self._superroot(root, sink)
                                sink.flush()
                                crash_point("import.sealing")
                        if direct and not direct.usable(unfit):
                            self.layers.write(staged, superroot.hex(), None, full=True, image=True)
                crash_point("import.chunks")

                def apply(txn: lmdb.Transaction) -> None:
                    self.layers.record(txn, layer, superroot.hex(), 0)
                    self.layer_refs.hold(txn, [layer])
                    self._put_snapshot(txn, id, superroot.hex(), None, [layer], labels, root)
                    self.catalog.mark_applied(txn, op)

                self.layers.place(staged, layer, f"import of {src}")
                self.db.write(apply, f"import of {src}")
            crash_point("import.applied")
            crash_point("import.switched")
            self._finish(op)
            return id

    @staticmethod
    def _scan_import(
        src: Path,
        resolved: Identity,
        sink: ObjectSink,
        progress: Progress,
        reader: privacy.Caller | None,
        unfit: list[str],
        direct: DirectImage | None,
        staged: Path,
    ) -> DirNode:
        """An import's scan of ``src`` (the directory of identity ``resolved``): mirrored into
        ``staged`` unless ``direct`` writes the image from the source itself; EACCES names
        what ``reader`` may not read."""
        try:
            return scan_directory(
                src,
                sink,
                mirror_to=None if direct else staged,
                progress=progress,
                reader=reader,
                unfit_for_image=unfit,
                seen=direct.observe if direct else None,
                resolved=resolved,
            )
        except PermissionError as exc:
            if reader is None or exc.filename is None:
                raise
            raise privacy.unreadable_by(reader, src, exc.filename) from None

    def receive_snapshot(
        self,
        id: str,
        superroot: str,
        parent: str | None,
        labels: dict[str, str],
        created_ns: int,
        fetch: Callable[[Callable[[list[tuple[bytes, bytes]]], None]], None],
        obs: Observation | None = None,
    ) -> str:
        """Record snapshot ``id`` of tree ``superroot`` whose objects ``fetch`` hands over (a
        pull, ``remote/transfer.py``): to the function it is given, in batches, children
        before the objects naming them; those of its large observation ``obs`` too (the
        caller checks what it pulled: ``remote/checks.py``). Logged like an import: atomic
        across kill -9, the objects of a pull that dies swept. Its layer is written afterwards,
        from the CAS: a delta over ``parent``'s chain when this store has ``parent``, else a
        full layer."""
        id = check_snapshot_id(id)
        labels = check_labels(labels)
        with self._ops.running():
            id = self._claim_id(id)
            loop = self.parent_loop(id, parent)
            if loop is not None:
                raise InvalidArgumentError(
                    f"snapshot {id} cannot have parent {parent}: it would be its own ancestor "
                    f"({' -> '.join(loop)})"
                )
            layer = secrets.token_hex(5)

            def undo(op: str) -> None:
                self.layers.forget(layer)
                self._abandon(op, layer)

            with self._logged_op("pull", id=id, layer=layer, durable=False, undo=undo) as op:
                sink = ObjectSink(self._write_objects_of_logged_op)
                fetch(sink.add)
                sink.flush()
                crash_point("pull.fetched")
                root = self.root_of(superroot)  # StoreIOError if the tree did not arrive
                assert root is not None

                def apply(txn: lmdb.Transaction) -> None:
                    base = None
                    if parent is not None and self.catalog.has_snapshot(txn, parent):
                        base = self.catalog.snapshot(txn, parent)
                    chain = base.layers if base is not None else []
                    below = base.root if base is not None else None
                    self.layers.record(
                        txn, layer, superroot, 1 if base else 0, below=below, built=False
                    )
                    chain = [layer] + chain
                    self.layer_refs.hold(txn, chain)
                    self._put_snapshot(
                        txn, id, superroot, parent, chain, labels, root, obs, created_ns
                    )
                    self.catalog.mark_applied(txn, op)

                self.layers.expect(layer)
                self.db.write(apply, f"pull of snapshot {id}")
            crash_point("pull.applied")
            self._finish(op)
            self.layers.queue(layer)
            return id

    def parent_loop(self, id: str, parent: str | None) -> list[str] | None:
        """The snapshots from ``id`` through its parents back to ``id`` if giving ``id``
        parent ``parent`` would close a loop: ``parent`` is ``id`` or one of its descendants
        here (a pulled snapshot can name a parent this store does not have, so a new ``id``
        can have some). Else None."""
        with self.db.read() as txn:
            if parent != id and not self.catalog.children(txn, id):
                return None  # nothing here descends from ``id``: no parent closes a loop

            def parent_of(sid: str) -> str | None:
                if sid == id:
                    return parent
                if not self.catalog.has_snapshot(txn, sid):
                    return None
                return self.catalog.snapshot(txn, sid).parent

            loops = parent_loops([id], parent_of)
        return loops[0] if loops and loops[0][0] == id else None

    def has_object(self, oid: bytes) -> bool:
        return self.content.find(oid) is not None

    # ------------------------------------------------------------------------------------
    # the skeleton every logged operation shares
    # ------------------------------------------------------------------------------------
    @contextmanager
    def _logged_op(
        self,
        kind: str,
        *,
        durable: bool = True,
        undo: Callable[[str], None] | None = None,
        **args: str | None,
    ) -> Iterator[str]:
        """PREPARE an op of ``kind`` and yield its id to the block, which does the op's side
        effects and its APPLY transaction. If the block fails, ``undo(op)`` rolls the op back
        (an op with nothing to undo before APPLY passes none: recovery settles what it left
        from the recorded state, and the op is FINALIZEd as refused). After the block:
        SWITCH, then ``_finish``."""
        op = self.wal.prepare(kind, durable=durable, **args)
        crash_point(f"{kind}.prepared")
        try:
            yield op
        except BaseException:
            if undo is not None:
                undo(op)
            else:
                self._refused(op)
            raise

    def _refused(self, op: str) -> None:
        """FINALIZE an op whose block failed before its APPLY committed (a prune that lost
        the race to another prune of its snapshot, a reset on a full disk): it changed
        nothing the recorded state does not settle, and left unfinished in the log it would
        be replayed at the next open and reported by fsck of a cleanly stopped store. On a
        failing disk the record may not be written: the next open settles the op then."""
        try:
            with self.db.read() as txn:
                if self.catalog.is_applied(txn, op):
                    return  # failed after its APPLY: replay rolls it forward
            self.wal.finalize(op)
        except (OSError, CascowfsError):
            pass

    def _abandon(self, op: str, layer: str | None = None) -> None:
        """Roll back an op that failed before APPLY: its staging (and its layer, if already
        placed) goes, orphans are swept."""
        try:
            self.trash.put(self.staging_dir / op)
            if layer is not None:
                self.layers.unmount_images([layer])
                self.trash.put(self.layers_dir / layer)
            self._background.put(EmptyTrash())
            self.wal.finalize(op)
            self.db.write(self.collector.note_garbage, "noting a failed operation's objects")
        except (OSError, CascowfsError):
            pass  # the disk is failing; the next open rolls the op back from the WAL

    def _finish(self, op: str) -> None:
        """The last step of an applied op. It is durable already and must be reported done:
        what fails here (a failing disk) is left for replay and reconciliation to redo."""
        try:
            self.wal.finalize(op)
        except CascowfsError as exc:
            log.warning(
                "%s: op %s is done, but its FINALIZE record is not: %s", self.store, op, exc
            )
        self._housekeep(f"op {op}")

    def _housekeep(self, after: str) -> None:
        """``_when_alone`` after an operation that is done already: what fails there (a
        failing disk) is logged and retried after a later one."""
        try:
            self._when_alone()
        except (CascowfsError, OSError) as exc:
            log.warning(
                "%s: housekeeping after %s failed (retried later): %s", self.store, after, exc
            )

    def trash_after_apply(self, layers: list[str], *, branch: str | None = None) -> None:
        """Move what an applied op dropped (``layers``, by id, and the directory of
        ``branch``, its mount with it) into the trash. The op is durable already, so a
        failure here must not fail it: the next open trashes whatever no record names."""
        layers = self.pins.unheld(layers)  # a layer a snapshot's view stacks waits for it
        self.layers.unmount_images(layers)  # overlays still stacking one keep it
        if branch is not None:
            self.trash.put_after_apply(
                [self.branches_dir / branch], self.store, mount_points=(BRANCH_TREE,)
            )
        self.trash.put_after_apply([self.layers.path(lid) for lid in layers], self.store)

    def trash_branch_dir(self, name: str) -> None:
        """Move branch ``name``'s directory, and the mount it may hold, into the trash."""
        self.trash.put(self.branches_dir / name, mount_points=(BRANCH_TREE,))

    @contextmanager
    def _branch_op(self, name: str, *, wait: bool = True) -> Iterator[None]:
        """One operation at a time on a branch; operations on other branches run beside it."""
        with self._branch_locks.holding(name, wait=wait) as held:
            if not held:
                raise BusyError(f"another operation on branch {name!r} (a commit) is in progress")
            with self._ops.running():
                yield

    def _claim_id(self, id: str | None) -> str:
        if id is None or id == "":
            return f"snap-{secrets.token_hex(6)}"
        id = check_snapshot_id(id)
        with self.db.read() as txn:
            if self.catalog.has_snapshot(txn, id):
                raise ExistsError(f"snapshot {id!r} already exists")
        return id

    def _put_snapshot(
        self,
        txn: lmdb.Transaction,
        id: str,
        superroot: str,
        parent: str | None,
        chain: list[str],
        labels: dict[str, str],
        root: Entry,
        obs: Observation | None = None,
        created_ns: int | None = None,
    ) -> None:
        if self.catalog.has_snapshot(txn, id):
            raise ExistsError(f"snapshot {id!r} already exists")
        self.catalog.replace_snapshot(
            txn,
            id,
            None,
            SnapshotRecord(
                root=superroot,
                parent=parent,
                created_ns=_now_ns() if created_ns is None else created_ns,
                layers=chain,
                files=root.tree_files,
                size=root.tree_bytes,
                labels=labels,
                obs=obs,
            ),
        )

    # ------------------------------------------------------------------------------------
    # branches
    # ------------------------------------------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None) -> BranchInfo:
        """A new branch: a writable overlay mount on ``parent`` (None: the empty snapshot)."""
        name = check_branch_name(name)
        if parent is not None:
            parent = check_snapshot_id(parent)
        return self._retrying_on_chain(lambda: self._create_branch(name, parent))

    def _retrying_on_chain(self, attempt: Callable[[], BranchInfo]) -> BranchInfo:
        """``attempt``, an op that mounts a branch on a snapshot's chain before its APPLY, made
        again while a merge of that chain dropped one of its layers in between (a window of
        milliseconds; a refused attempt changed nothing)."""
        for _ in range(CHAIN_ATTEMPTS - 1):
            try:
                return attempt()
            except ChainChangedError:
                pass
        return attempt()

    def _create_branch(self, name: str, parent: str | None) -> BranchInfo:
        with self._branch_op(name):
            with self.db.read() as txn:
                if self.catalog.find_branch(txn, name) is not None:
                    raise ExistsError(f"branch {name!r} already exists")
                snap = self.catalog.snapshot(txn, parent) if parent is not None else None
            if snap is not None:  # before anything is recorded: a full disk fails it cleanly
                self.layers.build_chain(snap.layers)
            rec = BranchRecord(
                parent=parent,
                base_root=snap.root if snap else None,
                layers=snap.layers if snap else [],
                created_ns=_now_ns(),
            )

            def undo(op: str) -> None:
                try:  # attached before an APPLY that failed (its snapshot pruned meanwhile)
                    self.unmount_branch(name)
                except (OSError, CascowfsError) as exc:  # goes with its directory, then
                    log.warning("%s: unmounting new branch %s: %s", self.store, name, exc)
                try:
                    self.trash_branch_dir(name)
                    self.wal.finalize(op)
                except (OSError, CascowfsError):
                    pass  # the disk is failing; the next open reconciles from state

            # not flushed: state-reconciled
            with ExitStack() as mount:
                with self._logged_op(
                    "branch", name=name, parent=parent, durable=False, undo=undo
                ) as op:
                    with disk_errors(f"creating branch {name}"):
                        self.trash_branch_dir(name)  # leftovers of an earlier branch
                        upper, work = self.make_branch_dirs(name)
                        self._make_upper(upper, rec.base_root)
                        work.mkdir()
                    mnt_fd = mount.enter_context(
                        self._new_branch_mount(name, rec.layers, upper, work)
                    )
                    self._attach_new_branch(name, mnt_fd)
                    crash_point("branch.mounted")

                    def apply(txn: lmdb.Transaction) -> None:
                        if self.catalog.find_branch(txn, name) is not None:
                            raise ExistsError(f"branch {name!r} already exists")
                        if parent is not None:  # not pruned meanwhile
                            self._check_chain(txn, parent, rec.layers)
                        self.layer_refs.hold(txn, rec.layers)
                        self.catalog.put_branch(txn, name, rec)
                        self.catalog.mark_applied(txn, op)

                    self.db.write(apply, f"creating branch {name}")
                crash_point("branch.applied")
                self._now_mounted(name)
            crash_point("branch.switched")
            self._finish(op)
            return self._branch_info(name, rec)

    def rebase(
        self, name: str, parent: str | None, *, branch_created_ns: int | None = None
    ) -> BranchInfo:
        """Point an unmodified branch at another snapshot (BusyError if it has changes).
        ``branch_created_ns``: the branch meant, as ``_branch_record`` checks it."""
        return self._retrying_on_chain(
            lambda: self._repoint(name, parent, "rebase", branch_created_ns)
        )

    def reset(self, name: str, parent: str) -> BranchInfo:
        """Drop the branch's changes and point it at snapshot ``parent``, in one step: a
        rollback of a tree search's agent to any node."""
        parent = check_snapshot_id(parent)
        return self._retrying_on_chain(lambda: self._repoint(name, parent, "reset"))

    def _repoint(
        self, name: str, parent: str | None, kind: str, branch_created_ns: int | None = None
    ) -> BranchInfo:
        """Re-base branch ``name`` on ``parent`` (None: the empty snapshot) on a fresh upper
        directory; a ``rebase`` refuses a branch with changes, a ``reset`` drops them. The
        PREPARE is flushed: a crash after APPLY may leave the old overlay mounted on the old
        directories, which only replay (``recovery._roll_forward_repoint``) knows to replace."""
        name = check_branch_name(name)
        if parent is not None:
            parent = check_snapshot_id(parent)
        with self._branch_op(name):
            with self.db.read() as txn:
                old = self._branch_record(txn, name, branch_created_ns)
                # NotFoundError before anything is logged
                target = self.catalog.snapshot(txn, parent) if parent is not None else None
            if name in self._stranded:  # its own directories first, or they would be lost
                self._restore_stranded(name)
            if kind == "rebase":
                self._mounted_again(name, old)  # its changes show once it is
            if kind == "rebase" and self.status(name):
                raise BusyError(
                    f"branch {name!r} has uncommitted changes; commit or discard them first"
                )
            staged = self.stage_branch_dirs(target)
            chain = target.layers if target else []
            (_, upper), (_, work) = self._overlay_dirs(name)
            stranded = False  # its own directories could not be put back (``_strand``)

            def undo(op: str) -> None:
                if not stranded:
                    self._refused(op)

            try:
                with ExitStack() as mount:
                    # ``staged`` names where the branch's own directories wait for the APPLY:
                    # recovery puts them back if it never comes (``swap_back``); ``created``
                    # tells it this branch from one made later under its name
                    with self._logged_op(
                        kind,
                        name=name,
                        parent=parent,
                        staged=staged.name,
                        created=str(old.created_ns),
                        undo=undo,
                    ) as op:
                        try:
                            self._swap_in_staged(name, staged)
                            mnt_fd = mount.enter_context(
                                self._new_branch_mount(name, chain, upper, work)
                            )
                            crash_point(f"{kind}.mounted")

                            def apply(txn: lmdb.Transaction) -> tuple[BranchRecord, list[str]]:
                                if parent is not None:
                                    self._check_chain(txn, parent, chain)
                                result = self.repoint_branch(txn, name, old, parent, chain)
                                self.catalog.mark_applied(txn, op)
                                return result

                            rec, dropped = self.db.write(apply, f"re-basing branch {name}")
                        except BaseException:
                            try:
                                self.swap_back(name, staged)
                            except CascowfsError as exc:  # the op's own error goes on up
                                stranded = True
                                self._strand(name, op, staged, exc)
                            raise
                    crash_point(f"{kind}.applied")
                    self._attach_branch(name, mnt_fd)
            except BaseException:
                if not stranded:
                    self._drop_staged(staged)
                raise
            self.trash_after_apply(dropped)
            self._drop_staged(staged)  # the old upper and work directories
            crash_point(f"{kind}.switched")
            self._finish(op)
            self._background.put(EmptyTrash())
            return self._branch_info(name, rec)

    def repoint_branch(
        self,
        txn: lmdb.Transaction,
        name: str,
        old: BranchRecord,
        parent: str | None,
        chain: list[str] | None = None,
    ) -> tuple[BranchRecord, list[str]]:
        """Record branch ``name`` (record ``old``) as showing snapshot ``parent`` (None: an
        empty tree) on ``chain`` (``_check_chain``), or that snapshot's layers as they are
        now. Returns the new record and the layers that lost their last reference (their
        directories can go)."""
        snap = self.catalog.snapshot(txn, parent) if parent is not None else None
        if chain is None:
            chain = snap.layers if snap else []
        rec = replace(old, parent=parent, base_root=snap.root if snap else None, layers=chain)
        self.layer_refs.hold(txn, rec.layers)
        if old.base_root:
            self.collector.note_garbage(txn)
        dropped = self.layer_refs.release(txn, old.layers)
        self.catalog.put_branch(txn, name, rec)
        return rec, dropped

    def _chain_dropped(self, chain: list[str], txn: lmdb.Transaction | None = None) -> bool:
        """Whether a layer of ``chain`` has no record any more (a merge dropped it); read in
        ``txn``, or a read transaction of its own."""
        if txn is None:
            with self.db.read() as txn:
                return self._chain_dropped(chain, txn)
        return any(self.catalog.find_layer(txn, lid) is None for lid in chain)

    def _check_chain(self, txn: lmdb.Transaction, parent: str, chain: list[str]) -> None:
        """Inside the APPLY of an op that mounted a branch on ``chain``, snapshot ``parent``'s
        chain when the op read it: the snapshot must still exist (NotFoundError), and so must
        every layer of the chain, which a merge of it since may have dropped (BusyError). A
        chain the merge replaced but whose layers live on still shows the snapshot's tree."""
        cur = self.catalog.snapshot(txn, parent)
        if cur.layers != chain and self._chain_dropped(chain, txn):
            raise ChainChangedError(f"the layers of snapshot {parent} changed meanwhile; try again")

    def _branch_record(
        self, txn: lmdb.Transaction, name: str, created_ns: int | None
    ) -> BranchRecord:
        """Branch ``name``'s record. A caller holding a file of the branch (its ``commit`` or
        ``parent``) gives the branch's ``created_ns`` as it was when the file was opened: if
        the branch was discarded since and another made with its name, that other one is not
        the caller's to change (NotFoundError). Read under the branch's lock, so no discard
        comes between the check and the operation."""
        rec = self.catalog.branch(txn, name)
        if created_ns is not None and rec.created_ns != created_ns:
            raise NotFoundError(
                f"branch {name!r} was discarded after this file of it was opened (another "
                "branch has its name now)"
            )
        return rec

    def commit(
        self,
        name: str,
        id: str | None = None,
        labels: dict[str, str] | None = None,
        obs: int | None = None,
        *,
        branch_created_ns: int | None = None,
    ) -> str:
        """Freeze the branch into a new snapshot; the branch then continues on top of it.
        ``obs``: an open regular file (the caller's, read from its start, left open) whose
        bytes are stored beside the snapshot as its large observation. ``branch_created_ns``:
        the branch meant, as ``_branch_record`` checks it."""
        name = check_branch_name(name)
        labels = check_labels(labels)
        if obs is not None:
            check_observation(obs)
        with self._branch_op(name, wait=False):
            return self._commit(name, id, labels, obs, branch_created_ns)

    def _commit(
        self,
        name: str,
        id: str | None,
        labels: dict[str, str],
        obs: int | None,
        branch_created_ns: int | None,
    ) -> str:
        with self.db.read() as txn:
            rec = self._branch_record(txn, name, branch_created_ns)
            parent = self.catalog.snapshot(txn, rec.parent) if rec.parent else None
        self._mounted_again(name, rec)  # a commit takes what the branch shows
        id = self._claim_id(id)
        layer = secrets.token_hex(5)

        def undo(op: str) -> None:
            self.layers.forget(layer)
            self._abandon(op, layer)

        # Not flushed: before APPLY a commit leaves nothing on disk (its layer is written
        # after it), unless the sink writes objects early (a commit of more than its batch
        # size); then the record is flushed first, so that recovery sweeps them.
        with self._logged_op(
            "commit", name=name, id=id, layer=layer, durable=False, undo=undo
        ) as op:
            sink = ObjectSink(self._write_objects_of_logged_op)
            # Files unchanged since this branch's last commit are in its parent snapshot
            # (which cannot be pruned under the branch): their entries are reused, not re-read.
            # The cache is replaced only once this commit has applied.
            last = self._commit_caches.of(name)
            stored = last.stored if last is not None else {}
            used: dict = {}
            with disk_errors(f"commit of branch {name}"):
                node = apply_upper(
                    self.trees,
                    self.root_of(rec.base_root),
                    self.upper_path(name),
                    sink,
                    file_cache=stored,
                    keep=used,
                )
                # remembered: the new delta layer is written from these directories
                built: dict = {}
                root = finalize(
                    node,
                    sink,
                    remember=self.trees.remember,
                    reuse=last.built if last is not None else None,
                    built=built,
                    stored=self.trees,
                )
                superroot = self._superroot(root, sink)
                observation = _store_observation(obs, sink) if obs is not None else None
            crash_point("commit.staged")
            objects = self.content.pack_missing(sink.take())

            def apply(txn: lmdb.Transaction) -> None:
                # the parent's chain as it is now: a background merge may have rewritten it,
                # which is fine, since the new delta is relative to the parent's tree
                chain = self.catalog.snapshot(txn, rec.parent).layers if rec.parent else []
                self.content.put_objects(txn, objects)
                self.layers.record(
                    txn,
                    layer,
                    superroot.hex(),
                    1,
                    below=parent.root if parent else None,
                    built=False,
                )
                self.layer_refs.hold(txn, [layer] + chain)
                self._put_snapshot(
                    txn, id, superroot.hex(), rec.parent, [layer] + chain, labels, root, observation
                )
                self.catalog.put_branch(txn, name, replace(rec, parent=id, last_commit=id))
                self.catalog.mark_applied(txn, op)

            self.layers.expect(layer)  # before the transaction that records it unbuilt
            self.db.write(apply, f"commit of branch {name}")
        crash_point("commit.applied")
        self._commit_caches.keep(name, used, built)
        crash_point("commit.switched")
        self._finish(op)
        self.layers.queue(layer)
        self._background.put(MergeLayers(id))
        return id

    def discard(self, name: str) -> None:
        """Drop a branch: its mount goes at once (lazily), its files in the background."""
        name = check_branch_name(name)
        with self._branch_op(name):
            with self.db.read() as txn:
                rec = self.catalog.branch(txn, name)
            # not flushed: state-reconciled
            with self._logged_op("discard", name=name, durable=False) as op:

                def apply(txn: lmdb.Transaction) -> list[str]:
                    self.catalog.delete_branch(txn, name)
                    if rec.base_root:
                        self.collector.note_garbage(txn)
                    dropped = self.layer_refs.release(txn, rec.layers)
                    self.catalog.mark_applied(txn, op)
                    return dropped

                dropped = self.db.write(apply, f"discarding branch {name}")
            crash_point("discard.applied")
            self._unmounted.pop(name, None)
            # the mount travels with its directory into the trash (trash.py says why)
            self.trash_after_apply(dropped, branch=name)
            if name in self._stranded:
                self._forget_stranded(name)  # its own directories are garbage now
            self._forget_file_caches(name)
            crash_point("discard.switched")
            self._finish(op)
            self._background.put(EmptyTrash())

    def prune(self, id: str) -> None:
        """Drop a snapshot (BusyError while a branch is based on it)."""
        id = check_snapshot_id(id)
        with self._ops.running(), self.label_applies.pruning(id):
            with self.db.read() as txn:
                self.catalog.snapshot(txn, id)  # NotFoundError before anything is logged
                self._check_unused(txn, id)
            # not flushed: state-reconciled
            with self._logged_op("prune", id=id, durable=False) as op:

                def apply(txn: lmdb.Transaction) -> list[str]:
                    self._check_unused(txn, id)  # no branch was based on it meanwhile
                    # a background merge may have swapped its chain
                    cur = self.catalog.snapshot(txn, id)
                    self.catalog.delete_snapshot(txn, id, cur)
                    self.collector.note_garbage(txn)
                    dropped = self.layer_refs.release(txn, cur.layers)
                    self.catalog.mark_applied(txn, op)
                    return dropped

                dropped = self.db.write(apply, f"pruning snapshot {id}")
            crash_point("prune.applied")
            self.label_applies.forget(id)
            self.trash_after_apply(dropped)
            crash_point("prune.switched")
            self._finish(op)
            self._background.put(EmptyTrash())

    def _check_unused(self, txn: lmdb.Transaction, id: str) -> None:
        for bname, branch in self.catalog.branches(txn):
            if branch.parent == id:
                raise BusyError(f"snapshot {id!r} is the parent of branch {bname!r}")

    # ------------------------------------------------------------------------------------
    # labels after commit
    # ------------------------------------------------------------------------------------
    def label(self, id: str, changes: dict[str, str]) -> dict[str, str]:
        """Set snapshot ``id``'s labels in ``changes`` (an empty value removes one); returns
        the labels it has afterwards. The tree stays as it is: labels are metadata, which a
        tree search rewrites on every back-propagation, so a label is durable once its WAL
        record is, and LMDB applies it behind (``label_applies.py``)."""
        id = check_snapshot_id(id)
        changes = check_label_changes(changes)
        with self._ops.running():
            labels = self.label_applies.label(id, changes)
            self._housekeep("a label")
        return labels

    # ``label`` in steps, for the FUSE layer's trio thread, which must not block: see
    # ``LabelApplies`` (``log``, ``queue``, ``settle_unflushed``) for the middle ones.
    def begin_label(self, id: str, changes: dict[str, str]) -> LoggedLabel | None:
        """Check a label and write its record, not flushed; None where that would wait (a
        gc or WAL checkpoint holds the store, a prune of the snapshot runs): call ``label``.
        ``end_label`` it once its transaction is queued, or if anything after this fails."""
        id = check_snapshot_id(id)
        changes = check_label_changes(changes)
        ticket = self._ops.try_enter()
        if ticket is None:
            return None
        try:
            logged = self.label_applies.log(id, changes, wait=False)
        except BaseException:
            self._ops.leave(ticket)
            raise
        if logged is None:
            self._ops.leave(ticket)
            return None
        self._label_gate_tickets[logged.op] = ticket
        return logged

    def end_label(self, logged: LoggedLabel) -> bool:
        """The label's operation is over; True if housekeeping is due (``housekeep``, off
        the trio thread)."""
        self._ops.leave(self._label_gate_tickets.pop(logged.op))
        return self._checkpoint_due()

    def housekeep(self) -> None:
        """``_when_alone`` for a caller outside any operation (blocking)."""
        with self._ops.running():
            self._housekeep("labels")

    # ------------------------------------------------------------------------------------
    # flattening and rebuilding layers
    # ------------------------------------------------------------------------------------
    def flatten(self, id: str) -> None:
        """Replace a snapshot's layer chain by one full layer written from the CAS (recovery
        uses it to rebuild lost layers; chains themselves stay short by merging)."""
        for _ in range(self.tuning.flatten_tries - 1):
            try:
                return self._rewrite_chain(id, merge=False)
            except BusyError:
                continue  # a background merge rewrote the chain meanwhile: flatten the new one
        self._rewrite_chain(id, merge=False)

    def merge_layers(self, id: str) -> None:
        """Bring a snapshot's chain into the counter's shape (queued in the background after
        every commit, so a commit never waits for it): first onto its parent's chain as that
        is now, then merging its top layers as ``merge_plan.plan`` says."""
        self._rewrite_chain(id, merge=True)

    def _caught_up_chain(self, txn: lmdb.Transaction, rec: SnapshotRecord) -> list[str]:
        """A commit's chain with the part under its own delta replaced by its parent's chain
        as it is now. A commit takes its parent's chain as it is at the time; when commits
        follow each other faster than the merges run, that chain is not merged yet, and
        merging only the top of each new chain would leave the lineage one layer deeper per
        commit (deep enough, at 500, that no branch could mount it). Any chain showing the
        parent's tree will do under a delta relative to that tree."""
        chain = rec.layers
        if len(chain) < 2 or not rec.parent or self.catalog.layer(txn, chain[0]).span != 1:
            return chain
        try:
            parent = self.catalog.snapshot(txn, rec.parent)
        except NotFoundError:  # pruned meanwhile: its chain lives on only in this one
            return chain
        if self.catalog.layer(txn, chain[1]).top != parent.root:
            return chain
        return chain[:1] + parent.layers

    def _rewrite_chain(self, id: str, *, merge: bool) -> None:
        with self._ops.running():
            with self.db.read() as txn:
                rec = self.catalog.snapshot(txn, id)
                chain = rec.layers
                layers = self._caught_up_chain(txn, rec) if merge else chain
                if merge:
                    count, span = merge_plan.plan(
                        [self.catalog.layer(txn, lid).span for lid in layers],
                        self.tuning.merge_fan_in,
                        self.tuning.merge_all_above,
                    )
                else:
                    count, span = len(chain), 0
                if merge and count < 2:
                    if layers != chain:
                        self._replace_chain(id, chain, layers)
                    return
                below = self.catalog.layer(txn, layers[count]).top if count < len(layers) else None
            layer = secrets.token_hex(5)
            # Not flushed, as a commit's: before APPLY a rewrite leaves only staging and an
            # unrecorded layer, which recovery sweeps whether or not it finds the record.
            with self._logged_op(
                "flatten",
                id=id,
                layer=layer,
                durable=False,
                undo=lambda op: self._abandon(op, layer),
            ) as op:
                staged = self.staging_dir / op
                with disk_errors(f"rewriting the layers of snapshot {id}"):
                    self.layers.write(staged, rec.root, below, full=not merge, image=as_image(span))
                crash_point("flatten.staged")

                def apply(txn: lmdb.Transaction) -> list[str]:
                    cur = self.catalog.snapshot(txn, id)
                    self.layers.record(txn, layer, cur.root, span)
                    dropped = self._swap_chain(txn, id, cur, chain, [layer] + layers[count:])
                    self.catalog.mark_applied(txn, op)
                    return dropped

                self.layers.place(staged, layer, f"rewriting the layers of snapshot {id}")
                dropped = self.db.write(apply, f"rewriting the layers of snapshot {id}")
            crash_point("flatten.applied")
            self.trash_after_apply(dropped)
            self._finish(op)
        self._background.put(EmptyTrash())

    def _replace_chain(self, id: str, old: list[str], new: list[str]) -> None:
        """Point a snapshot at another chain of existing layers showing its tree (one
        transaction, no new files: nothing for the WAL to cover)."""
        dropped = self.db.write(
            lambda txn: self._swap_chain(txn, id, self.catalog.snapshot(txn, id), old, new),
            f"rewriting the layers of snapshot {id}",
        )
        self.trash_after_apply(dropped)
        self._background.put(EmptyTrash())

    def _swap_chain(
        self, txn: lmdb.Transaction, id: str, cur: SnapshotRecord, old: list[str], new: list[str]
    ) -> list[str]:
        """Replace snapshot ``id``'s chain ``old`` (as read before the rewrite) by ``new``;
        returns the layers no chain names any more."""
        # a chain taken from the parent may have lost layers to the parent's own rewrite
        if cur.layers != old or any(self.catalog.find_layer(txn, lid) is None for lid in new):
            raise BusyError(f"the layers of snapshot {id} changed meanwhile")
        self.layer_refs.hold(txn, new)
        dropped = self.layer_refs.release(txn, old)
        self.catalog.replace_snapshot(txn, id, cur, replace(cur, layers=new))
        return dropped

    # ------------------------------------------------------------------------------------
    # gc
    # ------------------------------------------------------------------------------------
    def collect(self, *, in_child: bool = False, progress: bool = False) -> int:
        """One collection cycle (``collector.py``): delete every object no live root reaches.
        ``in_child``: the background cycle, which marks in a child process, not in this
        thread, and stops at close. Returns the number of objects deleted."""
        return self.collector.collect(in_child=in_child, progress=progress)

    def collection_pending(self, txn: lmdb.Transaction | None = None) -> bool:
        """Has garbage appeared since the last completed collection's snapshot?"""
        return self.collector.pending(txn)

    def pending_merges(self) -> int:
        """Layer merges queued in the background and not started yet."""
        return self._background.waiting(MergeLayers)

    def gc(self, progress: bool = False) -> dict:
        """Reclaim unreachable objects and unrecorded layers, empty the trash."""
        with self._ops.exclusive():
            objects = self.collect(progress=progress)
            with self.db.read() as txn:
                layer_ids = self.catalog.layer_ids(txn)
            stray = [
                e
                for e in os.listdir(self.layers_dir)
                if e not in layer_ids and not self.pins.keeps(e)
            ]
            self.layers.unmount_images(stray)
            for entry in stray:
                self.trash.put(self.layers.path(entry))
            self.trash.empty(force=True)
        return {"objects_removed": objects, "layers_removed": len(stray)}

    # ------------------------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------------------------
    def status(self, name: str) -> list[Change]:
        """The branch's changes against its parent, as a reader of the branch sees them (a
        branch left unmounted shows none: the error says why it is not mounted)."""
        name = check_branch_name(name)
        if name in self._unmounted:
            raise self._not_mounted(name)
        with self.db.read() as txn:
            rec = self.catalog.branch(txn, name)
            parent = self.catalog.snapshot(txn, rec.parent) if rec.parent else None
        sink = ObjectSink()
        # the entries (content ids only) of files the last status found unchanged; what this
        # one finds replaces them, so that files changed or gone since do not pile up
        last = self._status_caches.of(name)
        used: dict = {}
        with disk_errors(f"status of branch {name}"):
            node = apply_upper(
                self.trees,
                self.root_of(rec.base_root),
                self.upper_path(name),
                sink,
                prepare=identify_content,
                file_cache=last.stored if last is not None else {},
                keep=used,
            )
        self._status_caches.keep(name, used, {})
        extra: dict[bytes, dict[bytes, Entry]] = {}  # the directories built, for the diff
        view = finalize(node, sink, remember=listings_into(extra))
        return self.trees.diff(self.root_of(parent.root) if parent else None, view, extra)

    def diff(self, a: str | None, b: str | None) -> list[Change]:
        """Changes from snapshot ``a`` to snapshot ``b`` (None: the empty snapshot)."""
        roots = []
        for sid in (a, b):
            roots.append(self.root_entry(sid) if sid is not None else None)
        return self.trees.diff(roots[0], roots[1])

    def snapshots(self) -> list[SnapshotInfo]:
        labelled = self.label_applies.overlay()  # before the records: label_applies.py
        with self.db.read() as txn:
            return [
                _snapshot_info(id, rec, labelled.get(id))
                for id, rec in self.catalog.snapshots(txn, skip_damaged=True)
            ]

    def snapshot_ids(self) -> list[str]:
        """Every snapshot's id, in byte order, without decoding a record."""
        with self.db.read() as txn:
            return self.catalog.snapshot_ids(txn)

    def snapshot(self, id: str) -> SnapshotInfo:
        id = check_snapshot_id(id)
        labels = self.label_applies.labels_of(id)  # before the record: label_applies.py
        with self.db.read() as txn:
            return _snapshot_info(id, self.catalog.snapshot(txn, id), labels)

    def find(self, query: FindQuery) -> list[str]:
        """The snapshot ids ``query`` selects (episodes.py), in its order."""
        self.label_applies.wait_applied()  # the label indexes are LMDB's
        with self.db.read() as txn:
            return find(self.catalog, txn, query)

    def children(self, id: str | None) -> list[str]:
        """The snapshots whose parent is ``id``, sorted; None: the roots, those without a
        parent or whose parent was pruned (as ``cascowfs tree`` shows them)."""
        with self.db.read() as txn:
            if id is None:
                return sorted(self.catalog.children(txn, None) + self.catalog.orphans(txn))
            return self.catalog.children_or_orphans(txn, check_snapshot_id(id))

    def episodes(self) -> list[Episode]:
        """Every snapshot as an episode record (``MNT/episodes``)."""
        labelled = self.label_applies.overlay()  # before the records: label_applies.py
        with self.db.read() as txn:
            return [
                episode_of(id, _with_labels(rec, labelled.get(id)))
                for id, rec in self.catalog.snapshots(txn, skip_damaged=True)
            ]

    def observation(self, id: str) -> Observation | None:
        """Snapshot ``id``'s large observation (None: it has none)."""
        with self.db.read() as txn:
            return self.catalog.snapshot(txn, check_snapshot_id(id)).obs

    def has_snapshot(self, id: str) -> bool:
        with self.db.read() as txn:
            return self.catalog.has_snapshot(txn, id)

    def branches(self) -> list[BranchInfo]:
        with self.db.read() as txn:
            return [self._branch_info(name, rec) for name, rec in self.catalog.branches(txn)]

    def branch(self, name: str) -> BranchInfo:
        name = check_branch_name(name)
        with self.db.read() as txn:
            return self._branch_info(name, self.catalog.branch(txn, name))

    def _branch_info(self, name: str, rec: BranchRecord) -> BranchInfo:
        return BranchInfo(name, rec.parent, self.tree_path(name), rec.created_ns, rec.last_commit)

    def hold_snapshot_layers(self, id: str) -> tuple[list[str], list[Path]]:
        """The layer chain of snapshot ``id`` (ids) and the lower directories an overlay of
        it stacks (top first), written if need be and held (``LayerPins``) until
        ``release_layers``: a merge that replaces the chain meanwhile leaves them in place."""
        id = check_snapshot_id(id)
        while True:
            with self.db.read() as txn:
                chain = self.catalog.snapshot(txn, id).layers
            self.pins.hold(chain)
            self.layers.keep_mounted(chain)  # its images stay mounted until release_layers
            try:
                # read again: a chain dropped before the hold may be in the trash already
                with self.db.read() as txn:
                    held = self.catalog.snapshot(txn, id).layers == chain
                if held:
                    self.layers.build_chain(chain)
                    return chain, self.layers.mount_chain(chain)
            except BaseException:
                self.release_layers(chain)
                raise
            self.release_layers(chain)

    def release_layers(self, chain: list[str]) -> None:
        """Let go of layers ``hold_snapshot_layers`` held; dropped ones go to the trash."""
        self.layers.let_go(chain)
        free = self.pins.release(chain)
        if free:
            self.layers.unmount_images(free)  # overlays still stacking one keep it
            self.trash.put_after_apply([self.layers.path(lid) for lid in free], self.store)
            self._background.put(EmptyTrash())

    def layer_chain(self, id: str) -> list[Path]:
        """The lower directories a branch on snapshot ``id`` is mounted on (top first), its
        images mounted. To mount an overlay on them, use ``mounted_chain``: outside it an
        image mount no overlay stacks may be swept."""
        with self.mounted_chain(id) as lowers:
            return lowers

    @contextmanager
    def mounted_chain(self, id: str) -> Iterator[list[Path]]:
        """``layer_chain`` of snapshot ``id``, kept mounted inside the block (an overlay
        mounted on them there keeps them mounted as long as it lives)."""
        # held: a background merge may replace the chain and drop its layers meanwhile
        chain, _ = self.hold_snapshot_layers(id)
        try:
            with self.layers.mounted(chain) as lowers:
                yield lowers
        finally:
            self.release_layers(chain)

    # -- reading snapshot trees (the FUSE layer serves snapshots from these) -----------------
    def root_entry(self, id: str) -> Entry:
        id = check_snapshot_id(id)
        with self.db.read() as txn:
            rec = self.catalog.snapshot(txn, id)
        root = self.root_of(rec.root)
        assert root is not None  # every snapshot records its tree
        return root

    def read_tree(self, tree_id: bytes) -> dict[bytes, Entry]:
        return self.trees.get(tree_id)

    def read_tree_quick(self, tree_id: bytes) -> dict[bytes, Entry] | None:
        """``read_tree`` if it is quick (``TreeStore.get_quick``), else None."""
        return self.trees.get_quick(tree_id)

    def read_file(self, content_id: bytes, offset: int, size: int) -> bytes:
        return self.content.read(content_id, offset, size)


def _with_labels(rec: SnapshotRecord, labels: dict[str, str] | None) -> SnapshotRecord:
    """``rec`` with ``labels`` (a label not applied yet: ``LabelApplies.labels_of``)."""
    return rec if labels is None else replace(rec, labels=labels)


def _snapshot_info(id: str, rec: SnapshotRecord, labels: dict[str, str] | None) -> SnapshotInfo:
    rec = _with_labels(rec, labels)
    return SnapshotInfo(
        id,
        rec.root,
        rec.parent,
        rec.created_ns,
        rec.size,
        rec.files,
        dict(rec.labels),
        obs=rec.obs.size if rec.obs is not None else None,
    )


def check_observation(fd: int) -> None:
    """EINVAL unless ``fd`` is an open regular file (a FIFO or a device would never end)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise InvalidArgumentError("an observation must be a regular file")


def _store_observation(fd: int, sink: ObjectSink) -> Observation:
    """Cut the file ``fd`` into the CAS through ``sink`` (in bounded batches, as a commit's
    own files); its record for the snapshot."""
    st = os.fstat(fd)
    content = prepare_content(read_pieces(fd, st.st_size), emit=sink.add)
    sink.add(content.objects)
    return Observation(
        content.content_id.hex(), content.size, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    )


# How long an open waits for a lock whose recorded holder is dead: the worker processes it
# forked keep the lock's open file until they notice their parent died and exit.
ORPHANED_LOCK_WAIT_SECONDS = 5.0


def _take_store_lock(fd: int) -> str | None:
    """Take the store lock on ``fd`` without waiting for a live holder; returns None once
    taken, else the holder's pid as recorded in the lock file. A holder that is dead (a daemon
    killed by SIGKILL) may still hold the lock through its forked workers for a moment: that
    is waited out, for at most ``ORPHANED_LOCK_WAIT_SECONDS``."""
    deadline = time.monotonic() + ORPHANED_LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        dead = holder.isdigit() and forks.process_gone(int(holder))
        if not dead or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


def resolve_import_source(
    src: Path, store: Path, trusting: int | None = None
) -> tuple[Path, Identity]:
    """The directory an import of ``src`` reads: ``src`` with its symlinks resolved (with
    ``trusting``, only root's and that uid's: ``privacy.resolve_trusting``), and its
    ``identity``. ENOENT if it is missing, ENOTDIR if it is not a directory (a file, FIFO,
    device or socket), EACCES through a link not trusted, EINVAL if it lies inside ``store``
    or inside a mount serving it, or holds either: such an import would read the staging
    directory it writes, or ask its own daemon for every file. A branch's tree is the
    exception: it is a mount of its own, showing what the branch holds and no store file."""
    what = f"import source {src}"
    try:
        named = privacy.resolve_trusting(src, trusting)
    except OSError as exc:
        raise from_os_error(exc, what) from None
    except CascowfsError as exc:
        raise type(exc)(f"import source {exc.message}", errno=exc.errno) from None
    try:
        st = os.fstat(named)
        real = Path(os.readlink(f"/proc/self/fd/{named}"))  # the path it was found at
    finally:
        os.close(named)
    if not stat.S_ISDIR(st.st_mode):
        raise CascowfsError(f"{what} is not a directory", errno=errno.ENOTDIR)
    store_real = Path(os.path.realpath(store))
    if _within(real, store_real):
        parts = real.relative_to(store_real).parts
        if parts[:1] == ("branches",) and parts[2:3] == ("tree",):
            return real, identity(st)
        raise InvalidArgumentError(
            f"import source {src} lies inside the store it would be imported into ({store})"
        )
    if _within(store_real, real):
        raise InvalidArgumentError(
            f"import source {src} holds the store it would be imported into ({store})"
        )
    for m in overlay.all_mounts():
        if m.fstype != FUSE_TYPE or store_of_source(m.source) != store:
            continue
        if _within(real, Path(m.target)):
            raise InvalidArgumentError(
                f"import source {src} lies inside {m.target}, a mount "
                f"of the store it would be imported into"
            )
        if _within(Path(m.target), real):
            raise InvalidArgumentError(
                f"import source {src} holds {m.target}, a mount "
                f"of the store it would be imported into"
            )
    return real, identity(st)


def _within(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _tree_bytes(src: Path) -> int:
    """The bytes of the files below ``src``, roughly: what cannot be read counts nothing.
    From a stack of directories, not ``os.walk``, which recurses (in Python 3.11) and so
    fails on a tree deeper than the recursion limit."""
    total = 0
    dirs = [os.fspath(src)]
    while dirs:
        try:
            with os.scandir(dirs.pop()) as it:
                for entry in it:
                    try:
                        if not entry.is_dir():  # as os.walk: a link to a directory is one
                            total += entry.stat(follow_symlinks=False).st_size
                        elif not entry.is_symlink():
                            dirs.append(entry.path)
                    except OSError:
                        pass
        except OSError:
            pass
    return total
