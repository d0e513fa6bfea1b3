"""StateManager: the one entry point for every state change (SPEC §4).

Store layout (all on one filesystem, so renames are atomic and overlay upper/work dirs work)::

    STORE/lock                  flock: one StateManager per store
    STORE/meta/                 LMDB: objects, snapshots, branches, layers, ops
    STORE/wal/log               write-ahead log (wal.py)
    STORE/layers/<layer>/       native lower layers, a cache of the CAS (layers.py)
    STORE/branches/<name>/      upper/, work/ and tree/ (the overlay mount point)
    STORE/staging/<op>/         work in progress of one operation
    STORE/trash/                whatever is being deleted in the background
    STORE/empty/                the lower layer of branches on the empty snapshot

Every mutation follows PREPARE (WAL) -> side effects in staging, a new layer moved into
layers/ -> APPLY (one LMDB transaction, which also marks the op applied) -> SWITCH (mount,
unmount, directories into the trash) -> FINALIZE. ``open`` replays unfinished ops (before APPLY:
roll back; after: roll forward) and then reconciles the disk and the mount table with the
recorded state. docs/architecture.md explains each step and which PREPAREs are flushed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import lmdb

from . import collector
from . import durability
from . import forks
from . import layers as layerfs
from . import overlay
from .cas import ContentStore, identify_content
from .crashpoints import crash_point
from .errors import (BusyError, CascowfsError, ExistsError, NotFoundError, StoreIOError,
                     StoreLockedError, from_os_error)
from .metadb import MetaDB
from .model import BranchInfo, Change, Entry, SnapshotInfo
from .names import check_branch_name, check_labels, check_snapshot_id
from .progress import progress_bar
from .scan import ObjectSink, apply_upper, finalize, scan_directory, Progress
from .trees import TreeStore, tree_objects
from .wal import PendingOp, WriteAheadLog

log = logging.getLogger("cascowfs.state")

CHECKPOINT_EVERY = 1024  # WAL records between checkpoints
# Bump when records or objects change shape. 3: refcount changes are queued; 4: the queue is
# keyed by object (3 kept it in arrival order), and large directories are stored as pages;
# 5: objects carry no refcounts, a mark-and-sweep collector deletes what no live root reaches;
# 6: tree objects may be stored compressed (format 5's plain ones still read); 7: chunk lists
# may hold holes (format 6's zero chunks still read, and layers skip them).
STORE_FORMAT = 7
UPGRADES_IN_PLACE = {2, 3, 4, 5, 6}  # older formats a writable open upgrades
# A collection cycle starts this long after garbage appeared (a prune, a discard, a failed
# op), so that one cycle takes what a burst of operations dropped.
COLLECT_AFTER_SECONDS = 5.0
SWEEP_SLICE = 300  # object deletions per transaction of a collection's sweep
# Delta layers merge in groups of this many equal spans: each change is rewritten log_F(n)
# times over a lineage of n commits, and a chain is at most (F - 1) log_F(n) + 1 layers deep.
# 2 (a binary counter) rewrote every change twice as often as 4 for 5 layers less at n = 1,000;
# 8 against 4 took the layers of a 1,000-commit lineage of linux-source from 158 to 132 MB
# (the store from 1.32x to 1.30x one copy) for at most 24 layers instead of 16.
MERGE_FAN_IN = 8
# A chain deeper than this (made by a version whose merges fell behind fast lineages) has all
# its delta layers merged into one at its next merge: the counter alone never shortens it.
MERGE_ALL_ABOVE = 64
FLATTEN_TRIES = 5  # a flatten racing background merges of the same chain starts over


class _OpGate:
    """Mutations run side by side ("running"); gc and WAL checkpoints need every other one
    finished ("exclusive"), and never wait for it inside an operation. A collection cycle
    waits for the operations running when it starts ("wait_for_running")."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._exclusive = False
        self._next_ticket = 0
        self._tickets: set[int] = set()  # one per operation running

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            ticket = self._next_ticket
            self._next_ticket += 1
            self._tickets.add(ticket)
        try:
            yield
        finally:
            with self._cond:
                self._tickets.discard(ticket)
                self._cond.notify_all()

    def wait_for_running(self) -> None:
        """Wait until every operation running now has finished (new ones may start)."""
        with self._cond:
            horizon = self._next_ticket
            while any(t < horizon for t in self._tickets):
                self._cond.wait()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Wait until no operation runs; hold new ones back meanwhile."""
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._tickets:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def try_sole(self) -> bool:
        """From inside a running operation: become exclusive if it is the only one running
        (then call ``release_sole``); False at once otherwise."""
        with self._cond:
            if self._exclusive or len(self._tickets) != 1:
                return False
            self._exclusive = True
            return True

    def release_sole(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


def _now_ns() -> int:
    return time.time_ns()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dump(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def _count(raw: bytes | None) -> int:
    return int.from_bytes(raw, "little") if raw else 0


class StateManager:
    """Snapshots, branches and their lifecycle over one store directory.

    Thread-safe: mutations of different branches run side by side (one lock per branch); their
    LMDB transactions go through MetaDB's committer thread, which shares one sync among those
    that arrive together. Reads (``snapshot``, ``read_tree``, ``read_file`` ...) use short read transactions and
    may run concurrently with a mutation. Objects no live root reaches are collected by a
    thread of their own (``collector.py``).
    """

    def __init__(self, store: Path) -> None:
        self.store = store
        self.layers_dir = store / "layers"
        self.branches_dir = store / "branches"
        self.staging_dir = store / "staging"
        self.trash_dir = store / "trash"
        self.empty_dir = store / "empty"
        self._ops = _OpGate()
        self._branch_locks: dict[str, threading.Lock] = {}
        self._branch_locks_guard = threading.Lock()
        self._collect_wanted = threading.Event()
        self._collect_thread: threading.Thread | None = None
        self._collect_lock = threading.Lock()  # one collection cycle at a time
        self._sync_thread: threading.Thread | None = None
        self._trash_lock = threading.Lock()
        self._trash_filled = threading.Event()  # set by _to_trash, cleared by _empty_trash
        self._trash_filled.set()  # whatever an earlier run left there
        self._file_caches: dict[str, dict] = {}  # status: entries with content ids only
        self._commit_caches: dict[str, dict] = {}  # commit: entries whose content is stored
        self._built_dirs: dict[str, dict] = {}  # commit: directories the last commit encoded
        self._lock_fd = -1
        self._worker: threading.Thread | None = None
        self._jobs: queue.Queue = queue.Queue()
        # Delta layers of commits not written yet (``_build_layer``), each with the lock its
        # one writer holds; and the queue of the thread that writes them.
        self._unbuilt: dict[str, threading.Lock] = {}
        self._builds: queue.Queue = queue.Queue()
        self._builder: threading.Thread | None = None
        self._closing = threading.Event()  # set by close; cuts the background threads' waits short
        self._read_only = False

    # ------------------------------------------------------------------------------------
    # opening, recovery, closing
    # ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, store: str | Path, *, progress: bool = False, recover: bool = True) -> "StateManager":
        """Open (creating if needed) the store, lock it, replay the WAL and reconcile mounts.

        ``recover=False`` opens without touching anything (fsck uses it to look at a store as
        it was left)."""
        self = cls(Path(store).absolute())
        self._read_only = not recover
        with self._disk_errors(f"opening store {self.store}"):
            for d in (self.store, self.layers_dir, self.branches_dir, self.staging_dir,
                      self.trash_dir, self.empty_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.store / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise StoreLockedError(f"store {self.store} is in use (by pid {holder or '?'})") from None
        forks.close_in_children(self._lock_fd)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self.db = MetaDB(self.store / "meta")
            self.content = ContentStore(self.db)
            self.trees = TreeStore(self.content)
            self.wal = WriteAheadLog(self.store / "wal" / "log")
            self._check_format()
            if recover:
                self._recover(progress)
        except BaseException:
            if hasattr(self, "wal"):
                self.wal.close()
            if hasattr(self, "db"):
                self.db.close()
            self._release_lock()
            raise
        self._worker = threading.Thread(target=self._work, name="cascowfs-background", daemon=True)
        self._worker.start()
        if recover:
            self._builder = threading.Thread(target=self._build_loop, name="cascowfs-layer-build",
                                             daemon=True)
            self._builder.start()
            self._collect_thread = threading.Thread(target=self._collect_loop,
                                                    name="cascowfs-collector", daemon=True)
            self._collect_thread.start()
            self._sync_thread = threading.Thread(target=self._sync_layers_loop,
                                                 name="cascowfs-layer-sync", daemon=True)
            self._sync_thread.start()
            self._jobs.put(("trash",))
        return self

    def close(self, *, unmount_branches: bool = False) -> None:
        """Release the store. Branch mounts stay (they outlive the daemon) unless asked."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._collect_wanted.set()
        if self._collect_thread is not None:
            self._collect_thread.join()
        self._builds.put(None)  # after the layers queued so far: a clean close leaves none unbuilt
        if self._builder is not None:
            self._builder.join()
        if not self._read_only:
            self._jobs.put(("trash",))
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join()
        if self._sync_thread is not None:
            self._sync_thread.join()
        if not self._read_only:
            try:
                self._sync_layers()
            except (CascowfsError, OSError):
                pass  # the layers stay marked unsynced: if the page cache goes, they are rebuilt
        with self._ops.exclusive():
            if unmount_branches:
                overlay.unmount_under(self.branches_dir)
            self.wal.close()
            self.db.close()
        self._release_lock()

    def settle(self) -> None:
        """Wait until the background threads have done everything queued so far (commits'
        layers, layer merges, emptying the trash), then collect the objects no live root
        reaches."""
        self._builds.join()
        self._jobs.join()
        if not self._read_only:
            self.collect()

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """No state change runs inside this block (fsck of a live store, tests)."""
        with self._ops.exclusive():
            yield

    def __enter__(self) -> "StateManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            forks.forget(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _check_format(self) -> None:
        with self.db.read() as txn:
            raw = txn.get(b"format", db=self.db.db("meta"))
            found = int(raw) if raw is not None else None
            empty = txn.stat(self.db.db("snapshots"))["entries"] == 0
        if found == STORE_FORMAT:
            return
        if found not in UPGRADES_IN_PLACE and not (found is None and empty):
            raise StoreIOError(f"store {self.store} has format {raw and raw.decode() or 'unknown'}; "
                               f"this cascowfs reads format {STORE_FORMAT}")
        if self._read_only:
            return  # formats 2-4 differ only in refcounts, which this version ignores; 5-6 read as is

        def upgrade(txn: lmdb.Transaction) -> None:
            if found is not None and found < 5:
                # Object refcounts (and their queue) are no longer kept; objects they would
                # have deleted are garbage now, which the first collection takes.
                self.db.drop_legacy(txn)
                self._note_garbage(txn)
            txn.put(b"format", str(STORE_FORMAT).encode(), db=self.db.db("meta"))

        self.db.write(upgrade, "upgrading the store format")

    def _recover(self, progress: bool) -> None:
        cache = durability.page_cache_id(self.store)
        with self.db.read() as txn:
            last_cache = bytes(txn.get(b"page_cache", b"", db=self.db.db("meta"))).decode()
        # A branch mount outlives any daemon, but never its page cache: while one is there,
        # nothing was lost, whatever the ids say.
        cache_lost = bool(cache and last_cache and last_cache != cache
                          and not overlay.mounts_under(self.store))
        self._find_unbuilt_layers()
        pending = self.wal.pending()
        with self.db.read() as txn:
            applied = {op.op for op in pending if txn.get(op.op.encode(), db=self.db.db("ops"))}
        orphans_possible = False
        for op in pending:
            if op.op in applied:
                self._roll_forward(op)
            else:
                orphans_possible = orphans_possible or op.kind in ("import", "commit", "flatten")
        self._reconcile(cache_lost, progress)
        if orphans_possible:
            self.collect(progress=progress)
        self._checkpoint()
        if cache_lost:
            self._sync_layers()  # the rebuilt layers: a second power cut must not tear them
        if cache != last_cache:
            self.db.write(lambda txn: txn.put(b"page_cache", cache.encode(), db=self.db.db("meta")),
                          "recording the page cache id")

    def _find_unbuilt_layers(self) -> None:
        """Queue the commits' layers recorded as not written yet, before anything mounts a
        chain. A directory of one was placed by a process killed before recording it written:
        it may not have reached the disk whole, so it goes and is written again."""
        with self.db.read() as txn:
            # only an unbuilt record has the key (a store of 10k snapshots has ~10k records)
            unbuilt = [bytes(k).decode() for k, v in txn.cursor(db=self.db.db("layers"))
                       if b'"built"' in v and not layer_written(json.loads(v))]
        for lid in unbuilt:
            self._to_trash(self.layers_dir / lid)
            self._unbuilt[lid] = threading.Lock()
            self._builds.put(lid)

    def _roll_forward(self, op: PendingOp) -> None:
        """Finish the SWITCH step of an op whose APPLY committed (idempotent)."""
        layer = op.args.get("layer")
        if layer:
            staged = self.staging_dir / op.op
            target = self.layers_dir / layer
            if staged.exists() and not target.exists():
                os.rename(staged, target)
                _fsync_dir(self.layers_dir)
        if op.kind == "rebase":
            # The branch was unmodified (rebase checks) and its upper still carries the old
            # base's root attributes: start it afresh on the new layers, as rebase would have.
            with self.db.read() as txn:
                raw = txn.get(op.args["name"].encode(), db=self.db.db("branches"))
            if raw is not None:
                overlay.unmount_stacked(self._tree_path(op.args["name"]))
                self._mount_branch(op.args["name"], json.loads(raw), fresh_upper=True)
        # The other mount-side effects (discard, branch) are settled by _reconcile from state.

    def _reconcile(self, cache_lost: bool = False, progress: bool = False) -> None:
        """Make disk and mounts agree with the recorded state. If the page cache was lost
        since the last open (a reboot, a remount), first undo what that may have torn (nothing
        is mounted yet): branches restart from their parent snapshots, layers recorded since
        the last syncfs are rebuilt."""
        # staging: nothing in flight survives a restart
        for entry in os.listdir(self.staging_dir):
            self._to_trash(self.staging_dir / entry)
        if cache_lost:
            self._reset_branches_to_their_parents()
            self._rebuild_layers(self._unsynced_layers(),
                                 "not synced before the page cache was lost", progress)
        with self.db.read() as txn:
            records = {bytes(k).decode() for k, _ in txn.cursor(db=self.db.db("layers"))}
            branches = {bytes(k).decode(): json.loads(v) for k, v in txn.cursor(db=self.db.db("branches"))}
        for entry in os.listdir(self.layers_dir):
            if entry not in records:
                self._to_trash(self.layers_dir / entry)
        missing = [lid for lid in records
                   if lid not in self._unbuilt and not (self.layers_dir / lid).is_dir()]
        if missing:
            self._rebuild_layers(set(missing), "missing from layers/", progress)
        # mounts: keep exactly one correct mount per live branch
        expected = {str(self._tree_path(name)): rec for name, rec in branches.items()}
        seen: dict[str, int] = {}
        for m in overlay.mounts_under(self.store):
            rec = expected.get(m.target)
            if rec is not None and seen.get(m.target, 0) == 0 and self._mount_matches(m, rec):
                seen[m.target] = 1
                continue
            overlay.unmount(Path(m.target))
        for name in os.listdir(self.branches_dir):
            if name not in branches:
                self._to_trash(self.branches_dir / name)
        for name, rec in branches.items():
            if str(self._tree_path(name)) not in seen:
                self._mount_branch(name, rec, fresh_upper=False)

    def _mount_matches(self, m: overlay.MountRecord, rec: dict) -> bool:
        want = ",".join(f"lowerdir+={p}" for p in self._lower_paths(rec["layers"]))
        return m.fstype == "overlay" and want in m.options

    def _checkpoint(self) -> None:
        """Forget finished operations: WAL first, then the applied markers (never the reverse,
        or a pending op would lose its 'applied' mark and be rolled back)."""
        self.wal.checkpoint()
        self.db.write(lambda txn: txn.drop(self.db.db("ops"), delete=False), "checkpoint")

    def _when_alone(self) -> None:
        """Housekeeping that needs no other operation in flight: checkpoint the WAL. Skipped
        (for a later op) when others run."""
        if self.wal.records_since_checkpoint < CHECKPOINT_EVERY:
            return
        if not self._ops.try_sole():
            return
        try:
            self._checkpoint()
        finally:
            self._ops.release_sole()

    # ------------------------------------------------------------------------------------
    # background work: emptying the trash
    # ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            try:
                if job[0] == "trash":
                    self._empty_trash()
                elif job[0] == "merge":
                    self.merge_layers(job[1])
            except (CascowfsError, OSError):
                pass  # a snapshot pruned meanwhile, a failing disk: retried at the next need
            finally:
                self._jobs.task_done()

    def _sync_layers_loop(self) -> None:
        while not self._closing.wait(durability.LAYER_SYNC_SECONDS):
            try:
                self._sync_layers()
            except (CascowfsError, OSError):
                pass  # a failing disk: the layers stay marked unsynced, the next round retries

    def _sync_layers(self) -> None:
        """syncfs the store, then mark every layer recorded before the call as on the disk
        (a layer is written in full before the transaction that gives it its ``seq``: the
        one that records it, or for a commit's delta the one that records it built)."""
        with self.db.read() as txn:
            recorded = self._meta_counter(txn, b"layer_seq")
            synced = self._meta_counter(txn, b"layers_synced")
        if recorded <= synced:
            return
        with self._disk_errors("syncing the layers"):
            durability.syncfs(self.layers_dir)

        def mark(txn: lmdb.Transaction) -> None:
            if self._meta_counter(txn, b"layers_synced") < recorded:
                self._set_meta_counter(txn, b"layers_synced", recorded)

        self.db.write(mark, "marking layers synced")

    def _collect_loop(self) -> None:
        """Its own thread: a while after garbage appeared, run a collection cycle (its marking
        in a child process). Waits for nothing else, and nothing waits for it."""
        if self._collection_pending():
            self._collect_wanted.set()  # garbage a previous run left uncollected
        while True:
            self._collect_wanted.wait()
            if self._closing.wait(COLLECT_AFTER_SECONDS):
                return
            self._collect_wanted.clear()  # garbage from here on gets another cycle
            try:
                self.collect(in_child=True)
            except (CascowfsError, OSError) as exc:
                if self._closing.is_set():
                    return  # cancelled; the pending mark is durable, the next open retries
                # the pending mark is durable: the next cycle, or the next open, retries
                log.warning("%s: collecting garbage failed (retried later): %s", self.store, exc)
                self._collect_wanted.set()

    def _forget_file_caches(self, name: str) -> None:
        self._file_caches.pop(name, None)
        self._commit_caches.pop(name, None)
        self._built_dirs.pop(name, None)

    def _note_garbage(self, txn: lmdb.Transaction) -> None:
        """Objects may have become unreachable (a root dropped, an op failed): a collection
        is pending until a cycle whose snapshot includes this change has swept. Wakes the
        collector (at worst for nothing, if this transaction is then undone)."""
        self._set_meta_counter(txn, b"garbage_seq", self._meta_counter(txn, b"garbage_seq") + 1)
        self._collect_wanted.set()

    def _to_trash(self, path: Path) -> None:
        if os.path.lexists(path):
            os.rename(path, self.trash_dir / f"{secrets.token_hex(6)}-{path.name}")
            self._trash_filled.set()

    def _empty_trash(self, *, force: bool = False) -> None:
        """Detach the mounts in the trash and delete it. Every discard queues a round, but a
        round takes all there is: rounds queued meanwhile find nothing new and skip reading
        the mount table (``force``: gc empties it anyway)."""
        with self._trash_lock:  # gc and the background thread may both empty it
            if not (force or self._trash_filled.is_set()):
                return
            self._trash_filled.clear()
            try:
                overlay.unmount_under(self.trash_dir)  # never delete through a live mount
                entries = [self.trash_dir / e for e in os.listdir(self.trash_dir)]
                if entries:
                    layerfs.remove_trees(entries)
            except BaseException:
                self._trash_filled.set()  # the next round tries again
                raise

    # ------------------------------------------------------------------------------------
    # small helpers
    # ------------------------------------------------------------------------------------
    def _tree_path(self, name: str) -> Path:
        return self.branches_dir / name / "tree"

    def _lower_paths(self, chain: list[str]) -> list[Path]:
        return [self.layers_dir / lid for lid in chain] or [self.empty_dir]

    @contextmanager
    def _disk_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise from_os_error(exc, what) from exc

    def _snapshot_record(self, txn: lmdb.Transaction, id: str) -> dict:
        raw = txn.get(id.encode(), db=self.db.db("snapshots"))
        if raw is None:
            raise NotFoundError(f"no snapshot {id!r}")
        return json.loads(raw)

    def _branch_record(self, txn: lmdb.Transaction, name: str) -> dict:
        raw = txn.get(name.encode(), db=self.db.db("branches"))
        if raw is None:
            raise NotFoundError(f"no branch {name!r}")
        return json.loads(raw)

    def _root_of(self, superroot_hex: str | None) -> Entry | None:
        if not superroot_hex:
            return None
        return self.trees.get(bytes.fromhex(superroot_hex))[b""]

    def _layer_refs(self, txn: lmdb.Transaction, chain: list[str], delta: int) -> list[str]:
        """Adjust layer refcounts; layers that drop to zero lose their record and their
        reference on the tree they show. Returns those layers (their directories can go)."""
        db = self.db.db("layers")
        dropped = []
        for lid in chain:
            raw = txn.get(lid.encode(), db=db)
            if raw is None:
                raise StoreIOError(f"layer {lid} is named by a chain but has no record")
            rec = json.loads(raw)
            rec["refs"] += delta
            if rec["refs"] <= 0:
                txn.delete(lid.encode(), db=db)
                self._note_garbage(txn)
                dropped.append(lid)
            else:
                txn.put(lid.encode(), _dump(rec), db=db)
        return dropped

    def _new_layer(self, txn: lmdb.Transaction, lid: str, top: str, span: int, *,
                   below: str | None = None, built: bool = True) -> None:
        """Record a layer showing tree ``top`` (with the layers under it). ``span`` counts the
        commits a delta layer covers; 0 marks a full layer, which nothing is merged into.
        ``seq`` orders layers for syncing (``durability``). An unbuilt layer (``built``
        False) is not on disk yet: ``_build_layer`` writes it as the delta from tree
        ``below`` (None: nothing) to ``top``, and gives it its ``seq`` then."""
        rec = {"refs": 0, "top": top, "span": span, "seq": 0}
        if built:
            rec["seq"] = self._next_layer_seq(txn)
        else:  # the only records with these keys: mark_built drops them
            rec.update(built=False, below=below)
        txn.put(lid.encode(), _dump(rec), db=self.db.db("layers"))

    def _next_layer_seq(self, txn: lmdb.Transaction) -> int:
        seq = self._meta_counter(txn, b"layer_seq") + 1
        self._set_meta_counter(txn, b"layer_seq", seq)
        return seq

    def _meta_counter(self, txn: lmdb.Transaction, key: bytes) -> int:
        return int(txn.get(key, b"0", db=self.db.db("meta")))

    def _set_meta_counter(self, txn: lmdb.Transaction, key: bytes, value: int) -> None:
        txn.put(key, str(value).encode(), db=self.db.db("meta"))

    def _layer_record(self, txn: lmdb.Transaction, lid: str) -> dict:
        raw = txn.get(lid.encode(), db=self.db.db("layers"))
        if raw is None:
            raise StoreIOError(f"layer {lid} has no record")
        return json.loads(raw)

    def _mark_applied(self, txn: lmdb.Transaction, op: str) -> None:
        txn.put(op.encode(), b"applied", db=self.db.db("ops"))

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
        sid, objects = tree_objects({b"": replace(root, name=b"")})
        sink.add(objects)
        return sid

    def _mount_branch(self, name: str, rec: dict, *, fresh_upper: bool) -> None:
        bdir = self.branches_dir / name
        upper, work, tree = bdir / "upper", bdir / "work", bdir / "tree"
        self._build_layers(rec["layers"])
        with self._disk_errors(f"mounting branch {name}"):
            bdir.mkdir(exist_ok=True)
            tree.mkdir(exist_ok=True)
            if fresh_upper or not upper.is_dir():
                self._to_trash(upper)
                upper.mkdir()
                layerfs.set_root_metadata(upper, self._root_of(rec.get("base_root")))
            # a volatile mount refuses a work dir it used before a crash: always start it empty
            self._to_trash(work)
            work.mkdir()
            overlay.mount_overlay(tree, self._lower_paths(rec["layers"]), upper, work)
        self._forget_file_caches(name)

    # ------------------------------------------------------------------------------------
    # import
    # ------------------------------------------------------------------------------------
    def import_tree(self, src: str | Path, id: str | None = None,
                    labels: dict[str, str] | None = None, *, progress: bool = False) -> str:
        """Import a plain directory as a new snapshot (its own full layer)."""
        src = Path(src)
        labels = check_labels(labels)
        if not src.is_dir():
            raise NotFoundError(f"import source {src} is not a directory")
        with self._ops.running():
            id = self._claim_id(id)
            layer = secrets.token_hex(5)
            op = self.wal.prepare("import", id=id, layer=layer)
            crash_point("import.prepared")
            staged = self.staging_dir / op
            total = _tree_bytes(src) if progress else 0
            try:
                with progress_bar(progress, total, f"import {id}") as bar:
                    sink = ObjectSink(self._write_objects)
                    with self._disk_errors(f"import of {src}"):
                        node = scan_directory(src, sink, mirror_to=staged, progress=Progress(bar))
                        root = finalize(node, sink)
                        superroot = self._superroot(root, sink)
                        sink.flush()
                crash_point("import.chunks")

                def apply(txn: lmdb.Transaction) -> None:
                    self._new_layer(txn, layer, superroot.hex(), 0)
                    self._layer_refs(txn, [layer], +1)
                    self._put_snapshot(txn, id, superroot.hex(), None, [layer], labels, root)
                    self._mark_applied(txn, op)

                self._place_layer(staged, layer, f"import of {src}")
                self.db.write(apply, f"import of {src}")
            except BaseException:
                self._abandon(op, layer)
                raise
            crash_point("import.applied")
            crash_point("import.switched")
            self._finish(op)
            return id

    def _place_layer(self, staged: Path, layer: str, what: str) -> None:
        """Move a finished layer into layers/ *before* the transaction that records it (or,
        for a commit's delta, records it written): a layer recorded as written is then always
        on disk for whoever mounts it next (a new branch may mount it the moment the
        transaction commits); an unrecorded one is swept as trash."""
        with self._disk_errors(what):
            os.rename(staged, self.layers_dir / layer)

    def _write_layer(self, staged: Path, top: str, below: str | None, *, full: bool) -> None:
        """Write a layer from the CAS into ``staged``: the whole tree of superroot ``top``
        (a full layer), or its difference from the tree of ``below`` (a delta)."""
        if full:
            layerfs.materialize(self.trees, self.content, self._root_of(top), staged)
        else:
            layerfs.materialize_delta(self.trees, self.content, self._root_of(below),
                                      self._root_of(top), staged)

    def _abandon(self, op: str, layer: str | None = None) -> None:
        """Roll back an op that failed before APPLY: its staging (and its layer, if already
        placed) goes, orphans are swept."""
        try:
            self._to_trash(self.staging_dir / op)
            if layer is not None:
                self._to_trash(self.layers_dir / layer)
            self._jobs.put(("trash",))
            self.wal.finalize(op)
            self.db.write(self._note_garbage, "noting a failed operation's objects")
        except (OSError, CascowfsError):
            pass  # the disk is failing; the next open rolls the op back from the WAL

    def _finish(self, op: str) -> None:
        """The last step of an applied op. It is durable already and must be reported done:
        what fails here (a failing disk) is left for replay and reconciliation to redo."""
        try:
            self.wal.finalize(op)
        except CascowfsError as exc:
            log.warning("%s: op %s is done, but its FINALIZE record is not: %s", self.store, op, exc)
        try:
            self._when_alone()
        except (CascowfsError, OSError) as exc:
            log.warning("%s: housekeeping after op %s failed (retried later): %s", self.store, op, exc)

    def _trash_after_apply(self, layers: list[str], *paths: Path) -> None:
        """Move what an applied op dropped (``layers``, by id, and ``paths``) into the trash.
        The op is durable already, so a failure here must not fail it: the next open trashes
        whatever no record names."""
        for path in [*paths, *(self.layers_dir / lid for lid in layers)]:
            try:
                self._to_trash(path)
            except OSError as exc:
                log.warning("%s: %s stays until the next open: %s", self.store, path, exc)

    @contextmanager
    def _branch_op(self, name: str, *, wait: bool = True) -> Iterator[None]:
        """One operation at a time on a branch; operations on other branches run beside it."""
        with self._branch_locks_guard:
            lock = self._branch_locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=wait):
            raise BusyError(f"another operation on branch {name!r} (a commit) is in progress")
        try:
            with self._ops.running():
                yield
        finally:
            lock.release()

    def _claim_id(self, id: str | None) -> str:
        if id is None or id == "":
            return f"snap-{secrets.token_hex(6)}"
        id = check_snapshot_id(id)
        with self.db.read() as txn:
            if txn.get(id.encode(), db=self.db.db("snapshots")) is not None:
                raise ExistsError(f"snapshot {id!r} already exists")
        return id

    def _put_snapshot(self, txn: lmdb.Transaction, id: str, superroot: str, parent: str | None,
                      chain: list[str], labels: dict[str, str], root: Entry) -> None:
        if txn.get(id.encode(), db=self.db.db("snapshots")) is not None:
            raise ExistsError(f"snapshot {id!r} already exists")
        rec = {"root": superroot, "parent": parent, "created_ns": _now_ns(), "labels": labels,
               "layers": chain, "files": root.tree_files, "size": root.tree_bytes}
        txn.put(id.encode(), _dump(rec), db=self.db.db("snapshots"))

    # ------------------------------------------------------------------------------------
    # branches
    # ------------------------------------------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None) -> BranchInfo:
        """A new branch: a writable overlay mount on ``parent`` (None: the empty snapshot)."""
        name = check_branch_name(name)
        if parent is not None:
            parent = check_snapshot_id(parent)
        with self._branch_op(name):
            with self.db.read() as txn:
                if txn.get(name.encode(), db=self.db.db("branches")) is not None:
                    raise ExistsError(f"branch {name!r} already exists")
                snap = self._snapshot_record(txn, parent) if parent is not None else None
            if snap is not None:  # before anything is recorded: a full disk fails it cleanly
                self._build_layers(snap["layers"])
            rec = {"parent": parent, "base_root": snap["root"] if snap else None,
                   "layers": snap["layers"] if snap else [], "created_ns": _now_ns(),
                   "last_commit": None}
            op = self.wal.prepare("branch", name=name, parent=parent, durable=False)  # state-reconciled
            crash_point("branch.prepared")
            bdir = self.branches_dir / name
            try:
                with self._disk_errors(f"creating branch {name}"):
                    self._to_trash(bdir)  # leftovers of an earlier branch of that name
                    bdir.mkdir()
                    (bdir / "upper").mkdir()
                    (bdir / "work").mkdir()
                    (bdir / "tree").mkdir()
                    layerfs.set_root_metadata(bdir / "upper", self._root_of(rec["base_root"]))

                def apply(txn: lmdb.Transaction) -> None:
                    if txn.get(name.encode(), db=self.db.db("branches")) is not None:
                        raise ExistsError(f"branch {name!r} already exists")
                    if parent is not None:  # not pruned meanwhile; its chain as it is now
                        rec["layers"] = self._snapshot_record(txn, parent)["layers"]
                    self._layer_refs(txn, rec["layers"], +1)
                    txn.put(name.encode(), _dump(rec), db=self.db.db("branches"))
                    self._mark_applied(txn, op)

                self.db.write(apply, f"creating branch {name}")
            except BaseException:
                try:
                    self._to_trash(bdir)
                    self.wal.finalize(op)
                except (OSError, CascowfsError):
                    pass  # the disk is failing; the next open reconciles from state
                raise
            crash_point("branch.applied")
            self._build_layers(rec["layers"])  # a chain re-read in the transaction
            with self._disk_errors(f"mounting branch {name}"):
                overlay.mount_overlay(bdir / "tree", self._lower_paths(rec["layers"]),
                                      bdir / "upper", bdir / "work")
            crash_point("branch.switched")
            self._finish(op)
            return self._branch_info(name, rec)

    def rebase(self, name: str, parent: str | None) -> BranchInfo:
        """Point an unmodified branch at another snapshot (BusyError if it has changes)."""
        name = check_branch_name(name)
        if parent is not None:
            parent = check_snapshot_id(parent)
        with self._branch_op(name):
            with self.db.read() as txn:
                old = self._branch_record(txn, name)
                if parent is not None:
                    self._snapshot_record(txn, parent)  # NotFoundError before anything is logged
            if self.status(name):
                raise BusyError(f"branch {name!r} has uncommitted changes; commit or discard them first")
            op = self.wal.prepare("rebase", name=name, parent=parent)
            crash_point("rebase.prepared")

            def apply(txn: lmdb.Transaction) -> tuple[dict, list[str]]:
                result = self._repoint_branch(txn, name, old, parent)
                self._mark_applied(txn, op)
                return result

            rec, dropped = self.db.write(apply, f"re-basing branch {name}")
            crash_point("rebase.applied")
            overlay.unmount(self._tree_path(name))
            self._mount_branch(name, rec, fresh_upper=True)
            self._trash_after_apply(dropped)
            crash_point("rebase.switched")
            self._finish(op)
            self._jobs.put(("trash",))
            return self._branch_info(name, rec)

    def _repoint_branch(self, txn: lmdb.Transaction, name: str, old: dict, parent: str | None
                        ) -> tuple[dict, list[str]]:
        """Record branch ``name`` (record ``old``) as showing snapshot ``parent`` (None: an
        empty tree) on that snapshot's layers as they are now. Returns the new record and the
        layers that lost their last reference (their directories can go)."""
        snap = self._snapshot_record(txn, parent) if parent is not None else None
        rec = dict(old, parent=parent, base_root=snap["root"] if snap else None,
                   layers=snap["layers"] if snap else [])
        self._layer_refs(txn, rec["layers"], +1)
        if old["base_root"]:
            self._note_garbage(txn)
        dropped = self._layer_refs(txn, old["layers"], -1)
        txn.put(name.encode(), _dump(rec), db=self.db.db("branches"))
        return rec, dropped

    def _reset_branches_to_their_parents(self) -> None:
        """After the page cache was lost. A branch's upper directory belongs to a volatile
        overlay: nothing in it is ever synced (not even by an fsync inside the branch), so any
        file there may be torn, including files the branch has since committed. Every branch
        therefore restarts from its parent snapshot (its last commit, or the snapshot it was
        made from) with an empty upper directory, as overlayfs asks of a volatile upper."""
        with self.db.read() as txn:
            names = [bytes(k).decode() for k, _ in txn.cursor(db=self.db.db("branches"))]
        if names:
            log.warning("%s: the page cache was lost since the last open (a reboot, a remount): "
                        "%d branch(es) restart from their parent snapshots, uncommitted changes "
                        "dropped", self.store, len(names))
        for name in names:
            def apply(txn: lmdb.Transaction) -> list[str]:
                old = self._branch_record(txn, name)
                return self._repoint_branch(txn, name, old, old["parent"])[1]

            dropped = self.db.write(apply, f"resetting branch {name}")
            overlay.unmount_stacked(self._tree_path(name))  # a re-base rolled forward mounts it
            self._to_trash(self.branches_dir / name / "upper")  # mounting makes a fresh one
            self._trash_after_apply(dropped)

    def commit(self, name: str, id: str | None = None, labels: dict[str, str] | None = None) -> str:
        """Freeze the branch into a new snapshot; the branch then continues on top of it."""
        name = check_branch_name(name)
        labels = check_labels(labels)
        with self._branch_op(name, wait=False):
            return self._commit(name, id, labels)

    def _commit(self, name: str, id: str | None, labels: dict[str, str]) -> str:
        with self.db.read() as txn:
            rec = self._branch_record(txn, name)
            parent = self._snapshot_record(txn, rec["parent"]) if rec["parent"] else None
        id = self._claim_id(id)
        layer = secrets.token_hex(5)
        # Not flushed: before APPLY a commit leaves nothing on disk (its layer is written
        # after it), unless the sink writes objects early (a commit of more than its batch
        # size); then the record is flushed first, so that recovery sweeps them.
        op = self.wal.prepare("commit", name=name, id=id, layer=layer, durable=False)
        crash_point("commit.prepared")
        try:
            sink = ObjectSink(self._write_objects_of_logged_op)
            # Files unchanged since this branch's last commit are in its parent snapshot
            # (which cannot be pruned under the branch): their entries are reused, not re-read.
            # The cache is replaced only once this commit has applied.
            stored = self._commit_caches.get(name, {})
            used: dict = {}
            with self._disk_errors(f"commit of branch {name}"):
                node = apply_upper(self.trees, self._root_of(rec["base_root"]),
                                   self.branches_dir / name / "upper", sink,
                                   file_cache=stored, keep=used)
                # remembered: the new delta layer is written from these directories
                built: dict = {}
                root = finalize(node, sink, remember=self.trees.remember,
                                reuse=self._built_dirs.get(name), built=built, stored=self.trees)
                superroot = self._superroot(root, sink)
            crash_point("commit.staged")
            objects = self.content.pack_missing(sink.take())

            def apply(txn: lmdb.Transaction) -> None:
                # the parent's chain as it is now: a background merge may have rewritten it,
                # which is fine, since the new delta is relative to the parent's tree
                chain = self._snapshot_record(txn, rec["parent"])["layers"] if parent else []
                self.content.put_objects(txn, objects)
                self._new_layer(txn, layer, superroot.hex(), 1,
                                below=parent["root"] if parent else None, built=False)
                self._layer_refs(txn, [layer] + chain, +1)
                self._put_snapshot(txn, id, superroot.hex(), rec["parent"], [layer] + chain, labels, root)
                txn.put(name.encode(), _dump(dict(rec, parent=id, last_commit=id)),
                        db=self.db.db("branches"))
                self._mark_applied(txn, op)

            # Registered before the transaction: whoever sees the layer recorded can tell
            # that it is not on disk yet.
            self._unbuilt[layer] = threading.Lock()
            self.db.write(apply, f"commit of branch {name}")
        except BaseException:
            self._unbuilt.pop(layer, None)
            self._abandon(op, layer)
            raise
        crash_point("commit.applied")
        self._commit_caches[name] = used
        self._built_dirs[name] = built
        crash_point("commit.switched")
        self._finish(op)
        self._builds.put(layer)
        self._jobs.put(("merge", id))
        return id

    # ------------------------------------------------------------------------------------
    # commits' delta layers, written after the commit
    # ------------------------------------------------------------------------------------
    def _build_loop(self) -> None:
        while True:
            lid = self._builds.get()
            try:
                if lid is None:
                    return
                with self._ops.running():  # fsck and gc see no layer half-written
                    self._build_layer(lid)
            except (CascowfsError, OSError) as exc:
                # a failing disk: the layer stays unbuilt, and whoever mounts it tries again
                log.warning("%s: writing layer %s failed (retried when needed): %s",
                            self.store, lid, exc)
            except Exception:  # never let the thread die: settle() waits for its queue
                log.exception("%s: writing layer %s failed", self.store, lid)
            finally:
                self._builds.task_done()

    def _build_layers(self, chain: list[str]) -> None:
        """Make sure every layer of ``chain`` is on disk (before it is mounted)."""
        for lid in chain:
            if lid in self._unbuilt:
                self._build_layer(lid)

    def _build_layer(self, lid: str) -> None:
        """Write a commit's delta layer from the CAS, place it, record it built.

        A commit records its snapshot without writing its layer: the snapshot is whole in the
        CAS, and the layer is a cache of it that only a mount needs (a branch on the snapshot,
        usually made well after the background thread has written it; else by the branch's
        own call here). A layer dropped before it was written (a merge replaced it, its
        snapshot was pruned) never is."""
        lock = self._unbuilt.get(lid)
        if lock is None:
            return
        with lock:
            if lid not in self._unbuilt:
                return  # written meanwhile
            with self.db.read() as txn:
                raw = txn.get(lid.encode(), db=self.db.db("layers"))
            if raw is None:
                self._unbuilt.pop(lid, None)
                return
            rec = json.loads(raw)
            staged = self.staging_dir / f"layer-{lid}"
            with self._disk_errors(f"writing layer {lid}"):
                for leftover in (staged, self.layers_dir / lid):  # of an attempt that failed
                    self._to_trash(leftover)
                try:
                    self._write_layer(staged, rec["top"], rec["below"], full=False)
                except OSError:
                    self._to_trash(staged)  # a full disk: the next attempt starts afresh
                    raise
            crash_point("commit.written")
            self._place_layer(staged, lid, f"writing layer {lid}")
            crash_point("commit.placed")

            def mark_built(txn: lmdb.Transaction) -> bool:
                cur = txn.get(lid.encode(), db=self.db.db("layers"))
                if cur is None:
                    return False
                cur = json.loads(cur)
                del cur["built"], cur["below"]  # a built layer's record is as an import's
                cur["seq"] = self._next_layer_seq(txn)
                txn.put(lid.encode(), _dump(cur), db=self.db.db("layers"))
                return True

            if not self.db.write(mark_built, f"recording layer {lid}"):
                self._trash_after_apply([lid])  # dropped while it was being written
            self._unbuilt.pop(lid, None)

    def _layers_to_merge(self, txn: lmdb.Transaction, chain: list[str]) -> tuple[int, int]:
        """How many top layers of a chain merge into one, and the merged span ((0, 0): none).

        Delta layers merge like a counter in base ``MERGE_FAN_IN``: once the top
        ``MERGE_FAN_IN`` layers all have span s, they merge into one of span
        ``MERGE_FAN_IN`` * s, taking along any run of ``MERGE_FAN_IN`` - 1 layers of that
        span right under them (a carry), and so on. So a lineage of n commits is shown by at
        most (F - 1) log_F(n) + 1 delta layers, and the store holds each change log_F(n) times
        instead of every commit copying everything its branch ever changed."""
        span = self._layer_record(txn, chain[0])["span"] if chain else 0
        if not span:  # nothing is merged into a full layer
            return 0, 0
        count, group = 0, MERGE_FAN_IN
        while count + group <= len(chain) and all(
                self._layer_record(txn, lid)["span"] == span
                for lid in chain[count:count + group]):
            count += group
            span *= MERGE_FAN_IN
            group = MERGE_FAN_IN - 1  # the merged layer is the carry's first member
        return (count, span) if count else (0, 0)

    def discard(self, name: str) -> None:
        """Drop a branch: its mount goes at once (lazily), its files in the background."""
        name = check_branch_name(name)
        with self._branch_op(name):
            with self.db.read() as txn:
                rec = self._branch_record(txn, name)
            op = self.wal.prepare("discard", name=name, durable=False)  # state-reconciled
            crash_point("discard.prepared")

            def apply(txn: lmdb.Transaction) -> list[str]:
                txn.delete(name.encode(), db=self.db.db("branches"))
                if rec["base_root"]:
                    self._note_garbage(txn)
                dropped = self._layer_refs(txn, rec["layers"], -1)
                self._mark_applied(txn, op)
                return dropped

            dropped = self.db.write(apply, f"discarding branch {name}")
            crash_point("discard.applied")
            # The mount travels with its directory into the trash; the background thread
            # detaches it there: tearing down an overlay whose dentries cover a whole tree
            # costs ~0.2 s of the unmounting thread's time even with MNT_DETACH.
            self._trash_after_apply(dropped, self.branches_dir / name)
            self._forget_file_caches(name)
            crash_point("discard.switched")
            self._finish(op)
            self._jobs.put(("trash",))

    def prune(self, id: str) -> None:
        """Drop a snapshot (BusyError while a branch is based on it)."""
        id = check_snapshot_id(id)
        with self._ops.running():
            with self.db.read() as txn:
                rec = self._snapshot_record(txn, id)
                self._check_unused(txn, id)
            op = self.wal.prepare("prune", id=id, durable=False)  # state-reconciled
            crash_point("prune.prepared")

            def apply(txn: lmdb.Transaction) -> list[str]:
                self._check_unused(txn, id)  # no branch was based on it meanwhile
                cur = self._snapshot_record(txn, id)  # a background merge may have swapped its chain
                txn.delete(id.encode(), db=self.db.db("snapshots"))
                self._note_garbage(txn)
                dropped = self._layer_refs(txn, cur["layers"], -1)
                self._mark_applied(txn, op)
                return dropped

            dropped = self.db.write(apply, f"pruning snapshot {id}")
            crash_point("prune.applied")
            self._trash_after_apply(dropped)
            crash_point("prune.switched")
            self._finish(op)
            self._jobs.put(("trash",))

    def _check_unused(self, txn: lmdb.Transaction, id: str) -> None:
        for bname, raw in txn.cursor(db=self.db.db("branches")):
            if json.loads(raw)["parent"] == id:
                raise BusyError(f"snapshot {id!r} is the parent of branch {bytes(bname).decode()!r}")

    # ------------------------------------------------------------------------------------
    # flattening and rebuilding layers
    # ------------------------------------------------------------------------------------
    def flatten(self, id: str) -> None:
        """Replace a snapshot's layer chain by one full layer written from the CAS (recovery
        uses it to rebuild lost layers; chains themselves stay short by merging)."""
        for _ in range(FLATTEN_TRIES - 1):
            try:
                return self._rewrite_chain(id, merge=False)
            except BusyError:
                continue  # a background merge rewrote the chain meanwhile: flatten the new one
        self._rewrite_chain(id, merge=False)

    def merge_layers(self, id: str) -> None:
        """Bring a snapshot's chain into the counter's shape (queued in the background after
        every commit, so a commit never waits for it): first onto its parent's chain as that
        is now, then merging its top layers as ``_layers_to_merge`` says."""
        self._rewrite_chain(id, merge=True)

    def _deltas_on_top(self, txn: lmdb.Transaction, chain: list[str]) -> tuple[int, int]:
        """How many delta layers lie on the chain's first full layer, and their total span."""
        spans = []
        for lid in chain:
            span = self._layer_record(txn, lid)["span"]
            if not span:
                break
            spans.append(span)
        return len(spans), sum(spans)

    def _caught_up_chain(self, txn: lmdb.Transaction, rec: dict) -> list[str]:
        """A commit's chain with the part under its own delta replaced by its parent's chain
        as it is now. A commit takes its parent's chain as it is at the time; when commits
        follow each other faster than the merges run, that chain is not merged yet, and
        merging only the top of each new chain would leave the lineage one layer deeper per
        commit (deep enough, at 500, that no branch could mount it). Any chain showing the
        parent's tree will do under a delta relative to that tree."""
        chain = rec["layers"]
        if len(chain) < 2 or not rec.get("parent") or self._layer_record(txn, chain[0])["span"] != 1:
            return chain
        try:
            parent = self._snapshot_record(txn, rec["parent"])
        except NotFoundError:  # pruned meanwhile: its chain lives on only in this one
            return chain
        if self._layer_record(txn, chain[1])["top"] != parent["root"]:
            return chain
        return chain[:1] + parent["layers"]

    def _rewrite_chain(self, id: str, *, merge: bool) -> None:
        with self._ops.running():
            with self.db.read() as txn:
                rec = self._snapshot_record(txn, id)
                chain = rec["layers"]
                layers = self._caught_up_chain(txn, rec) if merge else chain
                if not merge:
                    count, span = len(chain), 0
                elif len(layers) > MERGE_ALL_ABOVE:
                    count, span = self._deltas_on_top(txn, layers)
                else:
                    count, span = self._layers_to_merge(txn, layers)
                if merge and count < 2:
                    if layers != chain:
                        self._replace_chain(id, chain, layers)
                    return
                below = self._layer_record(txn, layers[count])["top"] if count < len(layers) else None
            layer = secrets.token_hex(5)
            # Not flushed, as a commit's: before APPLY a rewrite leaves only staging and an
            # unrecorded layer, which recovery sweeps whether or not it finds the record.
            op = self.wal.prepare("flatten", id=id, layer=layer, durable=False)
            crash_point("flatten.prepared")
            staged = self.staging_dir / op
            try:
                with self._disk_errors(f"rewriting the layers of snapshot {id}"):
                    self._write_layer(staged, rec["root"], below, full=not merge)
                crash_point("flatten.staged")

                def apply(txn: lmdb.Transaction) -> list[str]:
                    cur = self._snapshot_record(txn, id)
                    self._new_layer(txn, layer, cur["root"], span)
                    dropped = self._swap_chain(txn, id, cur, chain, [layer] + layers[count:])
                    self._mark_applied(txn, op)
                    return dropped

                self._place_layer(staged, layer, f"rewriting the layers of snapshot {id}")
                dropped = self.db.write(apply, f"rewriting the layers of snapshot {id}")
            except BaseException:
                self._abandon(op, layer)
                raise
            crash_point("flatten.applied")
            self._trash_after_apply(dropped)
            self._finish(op)
        self._jobs.put(("trash",))

    def _replace_chain(self, id: str, old: list[str], new: list[str]) -> None:
        """Point a snapshot at another chain of existing layers showing its tree (one
        transaction, no new files: nothing for the WAL to cover)."""
        dropped = self.db.write(
            lambda txn: self._swap_chain(txn, id, self._snapshot_record(txn, id), old, new),
            f"rewriting the layers of snapshot {id}")
        self._trash_after_apply(dropped)
        self._jobs.put(("trash",))

    def _swap_chain(self, txn: lmdb.Transaction, id: str, cur: dict, old: list[str],
                    new: list[str]) -> list[str]:
        """Replace snapshot ``id``'s chain ``old`` (as read before the rewrite) by ``new``;
        returns the layers no chain names any more."""
        # a chain taken from the parent may have lost layers to the parent's own rewrite
        if cur["layers"] != old or any(txn.get(lid.encode(), db=self.db.db("layers")) is None
                                       for lid in new):
            raise BusyError(f"the layers of snapshot {id} changed meanwhile")
        self._layer_refs(txn, new, +1)
        dropped = self._layer_refs(txn, old, -1)
        txn.put(id.encode(), _dump(dict(cur, layers=new)), db=self.db.db("snapshots"))
        return dropped

    def _unsynced_layers(self) -> set[str]:
        """Layers recorded after the last syncfs: their files may not have reached the disk."""
        with self.db.read() as txn:
            synced = self._meta_counter(txn, b"layers_synced")
            return {bytes(k).decode() for k, v in txn.cursor(db=self.db.db("layers"))
                    if json.loads(v).get("seq", 0) > synced}

    def _rebuild_layers(self, lids: set[str], why: str, progress: bool) -> None:
        """Layers are a cache of the CAS: rebuild these in place, under the same ids, so every
        chain that names one is whole again. A full layer shows its tree; a delta layer is the
        difference from the tree the layers under it show, which is the same in every chain
        that holds it. A branch mounted on one of them is unmounted (reconciliation mounts it
        again)."""
        if not lids:
            return
        with self.db.read() as txn:
            records = {lid: self._layer_record(txn, lid) for lid in lids}
            below: dict[str, str | None] = {}
            branches_on: set[str] = set()
            for kind in ("snapshots", "branches"):
                for key, raw in txn.cursor(db=self.db.db(kind)):
                    chain = json.loads(raw)["layers"]
                    for at, lid in enumerate(chain):
                        if lid not in records:
                            continue
                        if kind == "branches":
                            branches_on.add(bytes(key).decode())
                        if lid not in below:
                            below[lid] = (self._layer_record(txn, chain[at + 1])["top"]
                                          if at + 1 < len(chain) else None)
        log.warning("%s: rebuilding %d layer(s) %s", self.store, len(lids), why)
        for name in branches_on:
            overlay.unmount_stacked(self._tree_path(name))
        with progress_bar(progress, len(records), f"rebuilding layers {why}", unit="layer") as bar:
            for lid, rec in records.items():
                if rec["span"] != 0 and lid not in below:
                    continue  # a delta in no chain: nothing mounts it, nothing says what is below
                staged = self.staging_dir / f"rebuild-{lid}"
                with self._disk_errors(f"rebuilding layer {lid}"):
                    self._write_layer(staged, rec["top"], below.get(lid), full=rec["span"] == 0)
                    self._to_trash(self.layers_dir / lid)  # a missing one is ignored
                    os.rename(staged, self.layers_dir / lid)
                bar(1)
            with self._disk_errors("rebuilding layers"):
                _fsync_dir(self.layers_dir)
        lost = sorted(lid for lid in lids if not (self.layers_dir / lid).is_dir())
        if lost:
            raise StoreIOError(f"layers {', '.join(lost)} are lost and no chain says what they held")

    # ------------------------------------------------------------------------------------
    # gc
    # ------------------------------------------------------------------------------------
    def collect(self, *, in_child: bool = False, progress: bool = False) -> int:
        """One collection cycle (``collector.py``): delete every object no live root reaches.
        ``in_child``: the background cycle, which marks in a child process, not in this
        thread, and stops at close.
        Returns the number of objects deleted."""
        with self._collect_lock:
            self.content.protect()
            try:
                self._ops.wait_for_running()  # they may have stored objects unprotected
                with self.db.read() as txn:
                    seen = self._meta_counter(txn, b"garbage_seq")
                if in_child:
                    try:
                        dead = collector.garbage_from_child(str(self.db.path), self._closing.is_set)
                    finally:
                        self.db.release_dead_readers()  # a child killed by close
                else:
                    with self.db.read() as txn:
                        dead = collector.garbage(txn, self.db.dbs, self.db.release_mapped_pages)
                # the background cycle's sweep stops at close; what is left stays pending
                stop = self._closing.is_set if in_child else (lambda: False)
                with progress_bar(progress, len(dead), "collecting", unit="obj") as bar:
                    removed, finished = collector.sweep(self.db, self.content, dead, SWEEP_SLICE,
                                                        stop=stop, done=bar)
            finally:
                self.content.unprotect()

            def mark_collected(txn: lmdb.Transaction) -> None:
                if self._meta_counter(txn, b"collected_seq") < seen:
                    self._set_meta_counter(txn, b"collected_seq", seen)

            if finished:
                self.db.write(mark_collected, "recording a collection")
            return removed

    def _collection_pending(self, txn: lmdb.Transaction | None = None) -> bool:
        """Has garbage appeared since the last completed collection's snapshot? (A store of
        an older format, looked at read-only, may hold garbage its refcount queue would have
        deleted.)"""
        if txn is None:
            with self.db.read() as txn:
                return self._collection_pending(txn)
        if txn.get(b"format", db=self.db.db("meta")) != str(STORE_FORMAT).encode():
            return True
        return self._meta_counter(txn, b"garbage_seq") > self._meta_counter(txn, b"collected_seq")

    def gc(self, progress: bool = False) -> dict:
        """Reclaim unreachable objects and unrecorded layers, empty the trash."""
        with self._ops.exclusive():
            objects = self.collect(progress=progress)
            with self.db.read() as txn:
                layer_ids = {bytes(k).decode() for k, _ in txn.cursor(db=self.db.db("layers"))}
            stray = [e for e in os.listdir(self.layers_dir) if e not in layer_ids]
            for entry in stray:
                self._to_trash(self.layers_dir / entry)
            self._empty_trash(force=True)
        return {"objects_removed": objects, "layers_removed": len(stray)}

    # ------------------------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------------------------
    def status(self, name: str) -> list[Change]:
        """The branch's changes against its parent, as a reader of the branch sees them."""
        name = check_branch_name(name)
        with self.db.read() as txn:
            rec = self._branch_record(txn, name)
            parent = self._snapshot_record(txn, rec["parent"]) if rec["parent"] else None
        sink = ObjectSink()
        cache = self._file_caches.setdefault(name, {})
        with self._disk_errors(f"status of branch {name}"):
            node = apply_upper(self.trees, self._root_of(rec["base_root"]),
                               self.branches_dir / name / "upper", sink,
                               prepare=identify_content, file_cache=cache, keep=cache)
        extra: dict[bytes, dict[bytes, Entry]] = {}  # the directories built, for the diff
        view = finalize(node, sink, remember=extra.__setitem__)
        return self.trees.diff(self._root_of(parent["root"]) if parent else None, view, extra)

    def diff(self, a: str | None, b: str | None) -> list[Change]:
        """Changes from snapshot ``a`` to snapshot ``b`` (None: the empty snapshot)."""
        roots = []
        for sid in (a, b):
            roots.append(self.root_entry(sid) if sid is not None else None)
        return self.trees.diff(roots[0], roots[1])

    def snapshots(self) -> list[SnapshotInfo]:
        with self.db.read() as txn:
            return [_snapshot_info(bytes(k).decode(), json.loads(v))
                    for k, v in txn.cursor(db=self.db.db("snapshots"))]

    def snapshot(self, id: str) -> SnapshotInfo:
        id = check_snapshot_id(id)
        with self.db.read() as txn:
            return _snapshot_info(id, self._snapshot_record(txn, id))

    def has_snapshot(self, id: str) -> bool:
        with self.db.read() as txn:
            return txn.get(id.encode(), db=self.db.db("snapshots")) is not None

    def branches(self) -> list[BranchInfo]:
        with self.db.read() as txn:
            return [self._branch_info(bytes(k).decode(), json.loads(v))
                    for k, v in txn.cursor(db=self.db.db("branches"))]

    def branch(self, name: str) -> BranchInfo:
        name = check_branch_name(name)
        with self.db.read() as txn:
            return self._branch_info(name, self._branch_record(txn, name))

    def _branch_info(self, name: str, rec: dict) -> BranchInfo:
        return BranchInfo(name, rec["parent"], self._tree_path(name), rec["created_ns"],
                          rec.get("last_commit"))

    def layer_chain(self, id: str) -> list[Path]:
        """Lower layer directories a branch on snapshot ``id`` is mounted on (top first)."""
        with self.db.read() as txn:
            return self._lower_paths(self._snapshot_record(txn, id)["layers"])

    # -- reading snapshot trees (the FUSE layer serves snapshots from these) -----------------
    def root_entry(self, id: str) -> Entry:
        id = check_snapshot_id(id)
        with self.db.read() as txn:
            rec = self._snapshot_record(txn, id)
        return self._root_of(rec["root"])

    def read_tree(self, tree_id: bytes) -> dict[bytes, Entry]:
        return self.trees.get(tree_id)

    def read_file(self, content_id: bytes, offset: int, size: int) -> bytes:
        return self.content.read(content_id, offset, size)


def layer_written(rec: dict) -> bool:
    """Whether a layer record's directory is on disk: all are but a commit's delta layer until
    it is written (``StateManager._build_layer``)."""
    return rec.get("built", True)


def _snapshot_info(id: str, rec: dict) -> SnapshotInfo:
    return SnapshotInfo(id, rec["root"], rec["parent"], rec["created_ns"], rec["size"],
                        rec["files"], dict(rec.get("labels") or {}))


def _tree_bytes(src: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
