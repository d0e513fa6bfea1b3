"""Layers: the native lower layers branches mount, a cache of the CAS.

A layer shows a tree (with the layers under it in a chain): a full layer the whole tree, a
delta layer its difference from the tree the layers under it show. This module writes them
from the CAS, places them in STORE/layers/, keeps their records (their refcounts are
``layer_refs.py``'s), writes a commit's delta layer after the commit (in a thread of its own, or
when a mount needs it first), rebuilds layers a power cut may have torn, and syncs them to
the disk in the background (``durability.py``).

``STORE/layers/<id>`` is an EROFS image (a file, ``images.py``), mounted read-only at
``STORE/mounts/<id>`` once for every overlay that stacks it, or a layer directory (store
format 7, or where the kernel mounts no EROFS image).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import lmdb

from . import durability, images, overlay
from . import layers as layerfs
from .cas import ContentStore
from .catalog import Catalog, Counter, LayerRecord
from .crashpoints import crash_point
from .errors import CascowfsError, StoreIOError, disk_errors
from .gate import OpGate
from .metadb import MetaDB
from .progress import progress_bar
from .trash import Trash
from .trees import TreeStore

log = logging.getLogger("cascowfs.layers")


class LayerBuilder:
    def __init__(
        self,
        store: Path,
        db: MetaDB,
        catalog: Catalog,
        trees: TreeStore,
        content: ContentStore,
        trash: Trash,
        gate: OpGate,
        image_mode: str = images.DIRECTORIES,
        empty_trash_soon: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.image_mode = image_mode  # ``images.detect``: how layer images mount here
        self.layers_dir = store / "layers"
        self.mounts_dir = store / "mounts"
        self.staging_dir = store / "staging"
        self.empty_dir = store / "empty"
        self._db = db
        self._catalog = catalog
        self._trees = trees
        self._content = content
        self._trash = trash
        self._gate = gate
        self._empty_trash_soon = empty_trash_soon
        # Delta layers of commits not written yet (``build``), each with the lock its one
        # writer holds; and the queue of the thread that writes them.
        self._unbuilt: dict[str, threading.Lock] = {}
        self._builds: queue.Queue[str | None] = queue.Queue()
        self._builder: threading.Thread | None = None
        self._syncer: threading.Thread | None = None
        # Image mounts: made and swept under one lock; a layer pinned by ``mounted`` (an
        # overlay about to be mounted on it) is never swept.
        self._mount_lock = threading.Lock()
        self._pinned: collections.Counter[str] = collections.Counter()
        self._last_sweep = -math.inf  # ``unmount_unused``'s last start (time.monotonic)
        # an image layer an overlay stacks, as its options name it
        self._stacked_image = re.compile(re.escape(f"lowerdir+={self.mounts_dir}/") + r"([^,/]+)")

    # -- paths and records -------------------------------------------------------------
    def path(self, lid: str) -> Path:
        """Where layer ``lid`` is stored: its image file or its directory."""
        return self.layers_dir / lid

    def exists(self, lid: str) -> bool:
        return os.path.lexists(self.layers_dir / lid)

    def is_image(self, lid: str) -> bool:
        return os.path.isfile(self.layers_dir / lid)

    def lower_paths(self, chain: list[str]) -> list[Path]:
        """The directories an overlay of ``chain`` stacks (top first): an image layer's
        mount point, a directory layer itself. Nothing is mounted here (``mounted``)."""
        return [
            self.mounts_dir / lid if self.is_image(lid) else self.layers_dir / lid for lid in chain
        ] or [self.empty_dir]

    # -- image mounts ------------------------------------------------------------------
    @contextmanager
    def mounted(self, chain: list[str], *, repair: bool = True) -> Iterator[list[Path]]:
        """The lower directories of ``chain`` (``lower_paths``), every image among them
        mounted and kept mounted inside the block: mount the overlay that stacks them there.
        Once an overlay stacks an image's mount it keeps it: ``unmount_unused`` leaves it.
        ``repair``: an image that does not mount is rebuilt from the CAS and mounted again
        (fsck passes False, to report it)."""
        self.keep_mounted(chain)
        try:
            yield self.mount_chain(chain, repair=repair)
        finally:
            self.let_go(chain)

    def keep_mounted(self, chain: list[str]) -> None:
        """Keep ``chain``'s image mounts from ``unmount_unused`` until ``let_go`` (a snapshot
        view holds its chain so for its whole life)."""
        with self._mount_lock:
            self._pinned.update(chain)

    def let_go(self, chain: list[str]) -> None:
        with self._mount_lock:
            self._pinned.subtract(chain)
            self._pinned += collections.Counter()  # drops the zeros

    def mount_chain(self, chain: list[str], *, repair: bool = True) -> list[Path]:
        """Mount every image of ``chain`` not mounted yet; the lower directories (top first).
        Only ``keep_mounted`` or an overlay stacking them keeps them mounted afterwards."""
        lowers = [
            self._mount_image(lid, repair) if self.is_image(lid) else self.layers_dir / lid
            for lid in chain
        ]
        return lowers or [self.empty_dir]

    def _mount_image(self, lid: str, repair: bool) -> Path:
        """Image layer ``lid`` mounted; its lower directory (the layer's own, if rebuilding
        it made it a directory)."""
        target = self.mounts_dir / lid
        with self._mount_lock:
            if self._is_mount_point(target):
                return target
            with disk_errors(f"mounting layer {lid}"):
                target.mkdir(mode=0o700, exist_ok=True)
            try:
                if self.image_mode == images.DIRECTORIES:
                    raise images.ImageError(f"layer {lid} is an image; images do not mount here")
                images.mount(self.path(lid), target, self.image_mode)
                return target
            except StoreIOError as exc:
                if not repair:
                    raise
                log.warning("%s: %s", self.store, exc)
        self.rebuild({lid}, "whose image does not mount", False, lambda name: None)
        if not self.is_image(lid):
            return self.layers_dir / lid
        with self._mount_lock:
            images.mount(self.path(lid), target, self.image_mode)
        return target

    @functools.cached_property
    def _mounts_device(self) -> int:
        return os.stat(self.mounts_dir).st_dev

    def _is_mount_point(self, target: Path) -> bool:
        """Whether something is mounted at ``target``, a directory in mounts/: one ``lstat``
        (``os.path.ismount`` also resolves the parent's path, an ``lstat`` per component, and
        a branch asks this for every image layer of its chain)."""
        try:
            return os.lstat(target).st_dev != self._mounts_device
        except FileNotFoundError:
            return False

    def _unmount_image(self, lid: str) -> None:
        """Detach image ``lid``'s mount (overlays stacking it keep it alive until they go)."""
        overlay.unmount_stacked(self.mounts_dir / lid)

    def unmount_images(self, lids: list[str]) -> None:
        """Detach the mounts of layers no record names any more (best-effort: the next
        ``unmount_unused`` takes what is left)."""
        for lid in lids:
            try:
                self._unmount_image(lid)
            except StoreIOError as exc:
                log.warning("%s: %s", self.store, exc)

    def unmount_unused(self, *, unless_swept_within: float = 0.0) -> None:
        """Detach every image mount no overlay stacks (on this machine: branches, snapshot
        views, fsck) and no ``mounted`` block holds, and remove the mount points of layers
        that are gone. ``unless_swept_within``: skip it if a sweep started less than that
        many seconds ago (a later sweep does what this one would have done)."""
        with self._mount_lock:
            now = time.monotonic()
            if now - self._last_sweep < unless_swept_within:
                return
            self._last_sweep = now
            everything = overlay.all_mounts()
            stacked = {
                lid
                for m in everything
                if m.fstype == "overlay"
                for lid in self._stacked_image.findall(m.options)
            }
            keep = stacked | set(self._pinned)
            base = f"{self.mounts_dir}/"
            for m in everything:
                lid = m.target[len(base) :] if m.target.startswith(base) else None
                if lid is not None and lid not in keep:
                    overlay.unmount(Path(m.target))
            with os.scandir(self.layers_dir) as it:  # the file types without a stat each
                images_here = {e.name for e in it if e.is_file(follow_symlinks=False)}
            for entry in os.listdir(self.mounts_dir):
                if entry not in keep and entry not in images_here:
                    try:
                        os.rmdir(self.mounts_dir / entry)
                    except OSError:
                        pass  # still a mount point (a stacked mount left over): the next round

    def _make_mount_point(self, lid: str) -> None:
        """An image layer's mount point, made when the image is placed: mounting it later
        (a branch on a full disk) then allocates nothing. Under the mount lock: a sweep
        (``unmount_unused``) that ran while the image was not in layers/ yet removes mount
        points without images, and could remove this one between mkdir's EEXIST and its
        check that a directory is there."""
        if self.is_image(lid):
            with self._mount_lock:
                (self.mounts_dir / lid).mkdir(mode=0o700, exist_ok=True)

    def record(
        self,
        txn: lmdb.Transaction,
        lid: str,
        top: str,
        span: int,
        *,
        below: str | None = None,
        built: bool = True,
    ) -> None:
        """Record a layer showing tree ``top`` (with the layers under it). ``span`` counts the
        commits a delta layer covers; 0 marks a full layer, which nothing is merged into.
        ``seq`` orders layers for syncing (``durability``). An unbuilt layer (``built``
        False) is not on disk yet: ``build`` writes it as the delta from tree ``below``
        (None: nothing) to ``top``, and gives it its ``seq`` then."""
        if built:
            rec = LayerRecord(refs=0, top=top, span=span, seq=self._next_seq(txn))
        else:
            rec = LayerRecord(refs=0, top=top, span=span, built=False, below=below)
        self._catalog.put_layer(txn, lid, rec)

    def _next_seq(self, txn: lmdb.Transaction) -> int:
        seq = self._catalog.counter(txn, Counter.LAYER_SEQ) + 1
        self._catalog.set_counter(txn, Counter.LAYER_SEQ, seq)
        return seq

    # -- writing and placing -----------------------------------------------------------
    def write(self, staged: Path, top: str, below: str | None, *, full: bool, image: bool) -> None:
        """Write a layer from the CAS into ``staged``: the whole tree of superroot ``top``
        (a full layer), or its difference from the tree of ``below`` (a delta); a compressed
        image if ``image`` (``as_image``) and layers are images here, else a directory."""
        root = self._trees.root_of(top)
        assert root is not None  # every superroot shows a tree
        if full:
            layerfs.materialize(self._trees, self._content, root, staged)
        else:
            layerfs.materialize_delta(
                self._trees, self._content, self._trees.root_of(below), root, staged
            )
        if image:
            self.seal(staged)

    def seal(self, staged: Path, *, unfit: list[str] | None = None) -> None:
        """Turn the layer directory ``staged`` into its compressed EROFS image, written beside
        it and renamed to ``staged``; the directory goes. Where images do not mount, where the tree
        holds what mkfs.erofs cannot write, or where it fails, the layer stays the directory.
        ``unfit``: what the writer of ``staged`` found that mkfs.erofs cannot write (an
        import's scan: ``images.why_not_an_entry``); None: a walk of ``staged`` finds it
        (``images.why_not_an_image``)."""
        if self.image_mode == images.DIRECTORIES:
            return
        why = images.why_not_an_image(staged) if unfit is None else next(iter(unfit), None)
        if why is not None:
            log.info("%s: %s; its layer stays a directory", self.store, why)
            return
        tree = _tree_of(staged)
        image = staged.with_name(staged.name + ".image")
        os.rename(staged, tree)
        try:
            images.build(tree, image, compress=True)
        except images.ImageError as exc:
            log.warning("%s: %s; the layer stays a directory", self.store, exc)
            self._trash.put(image)
            os.rename(tree, staged)
            return
        except BaseException:
            self._trash.put(image)
            self._trash.put(tree)
            raise
        os.rename(image, staged)
        # deleted in the background: a child rm at nice 19 starves behind a busy machine
        self._trash.put(tree)
        self._empty_trash_soon()

    @contextmanager
    def sealing(self, staged: Path, *, unfit: list[str] | None = None) -> Iterator[None]:
        """Seal the finished layer directory ``staged`` (``seal``) on a thread of its own
        while the block runs, and wait for it at the block's end: an import's mkfs.erofs
        writes the image while the import encodes its trees and stores its objects. The
        block's own error wins over the seal's; ``staged`` is settled either way."""
        failed: list[BaseException] = []

        def seal() -> None:
            try:
                self.seal(staged, unfit=unfit)
            except BaseException as exc:  # re-raised on the block's thread
                failed.append(exc)

        thread = threading.Thread(target=seal, name="cascowfs-layer-seal", daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join()
        if failed:
            raise failed[0]

    def place(self, staged: Path, lid: str, what: str) -> None:
        """Move a finished layer into layers/ *before* the transaction that records it (or,
        for a commit's delta, records it written): a layer recorded as written is then always
        on disk for whoever mounts it next (a new branch may mount it the moment the
        transaction commits); an unrecorded one is swept as trash."""
        with disk_errors(what):
            os.rename(staged, self.layers_dir / lid)
            self._make_mount_point(lid)

    # -- commits' delta layers, written after the commit -------------------------------
    def expect(self, lid: str) -> None:
        """Layer ``lid`` is about to be recorded unbuilt: registered before the transaction,
        so that whoever sees the record can tell that it is not on disk yet."""
        self._unbuilt[lid] = threading.Lock()

    def forget(self, lid: str) -> None:
        """The transaction that would have recorded ``lid`` unbuilt failed."""
        self._unbuilt.pop(lid, None)

    def is_unbuilt(self, lid: str) -> bool:
        return lid in self._unbuilt

    def queue(self, lid: str) -> None:
        """Have the builder thread write ``lid``."""
        self._builds.put(lid)

    def find_unbuilt(self) -> None:
        """Queue the commits' layers recorded as not written yet, before anything mounts a
        chain. A directory of one was placed by a process killed before recording it written:
        it may not have reached the disk whole, so it goes and is written again."""
        with self._db.read() as txn:
            unbuilt = self._catalog.unbuilt_layer_ids(txn)
        for lid in unbuilt:
            self._unmount_image(lid)
            self._trash.put(self.layers_dir / lid)
            self._unbuilt[lid] = threading.Lock()
            self._builds.put(lid)

    def build_chain(self, chain: list[str]) -> None:
        """Make sure every layer of ``chain`` is on disk (before it is mounted)."""
        for lid in chain:
            if lid in self._unbuilt:
                self.build(lid)

    def build(self, lid: str) -> None:
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
            with self._db.read() as txn:
                rec = self._catalog.find_layer(txn, lid)
            if rec is None:
                self._unbuilt.pop(lid, None)
                return
            staged = self.staging_dir / f"layer-{lid}"
            with disk_errors(f"writing layer {lid}"):
                for leftover in (staged, _tree_of(staged), self.layers_dir / lid):
                    self._trash.put(leftover)  # of an attempt that failed
                self._unmount_image(lid)
                try:
                    self.write(staged, rec.top, rec.below, full=False, image=as_image(1))
                except OSError:
                    self._trash.put(staged)  # a full disk: the next attempt starts afresh
                    raise
            crash_point("commit.written")
            self.place(staged, lid, f"writing layer {lid}")
            crash_point("commit.placed")

            def mark_built(txn: lmdb.Transaction) -> bool:
                cur = self._catalog.find_layer(txn, lid)
                if cur is None:
                    return False
                # a built layer's record is as an import's
                self._catalog.put_layer(
                    txn, lid, replace(cur, built=True, below=None, seq=self._next_seq(txn))
                )
                return True

            if not self._db.write(mark_built, f"recording layer {lid}"):
                # dropped while it was being written
                self._trash.put_after_apply([self.layers_dir / lid], self.store)
            self._unbuilt.pop(lid, None)

    def start_building(self) -> None:
        self._builder = threading.Thread(
            target=self._build_loop, name="cascowfs-layer-build", daemon=True
        )
        self._builder.start()

    def stop_building(self) -> None:
        """Write the layers queued so far, then end the thread: a clean close leaves none
        unbuilt."""
        self._builds.put(None)
        if self._builder is not None:
            self._builder.join()

    def join(self) -> None:
        """Wait until every layer queued so far is written."""
        self._builds.join()

    def _build_loop(self) -> None:
        while True:
            lid = self._builds.get()
            try:
                if lid is None:
                    return
                with self._gate.running():  # fsck and gc see no layer half-written
                    self.build(lid)
            except (CascowfsError, OSError) as exc:
                # a failing disk: the layer stays unbuilt, and whoever mounts it tries again
                log.warning(
                    "%s: writing layer %s failed (retried when needed): %s", self.store, lid, exc
                )
            except Exception:  # never let the thread die: settle() waits for its queue
                log.exception("%s: writing layer %s failed", self.store, lid)
            finally:
                self._builds.task_done()

    # -- durability --------------------------------------------------------------------
    def sync(self) -> None:
        """syncfs the store, then mark every layer recorded before the call as on the disk
        (a layer is written in full before the transaction that gives it its ``seq``: the
        one that records it, or for a commit's delta the one that records it built)."""
        with self._db.read() as txn:
            recorded = self._catalog.counter(txn, Counter.LAYER_SEQ)
            synced = self._catalog.counter(txn, Counter.LAYERS_SYNCED)
        if recorded <= synced:
            return
        with disk_errors("syncing the layers"):
            durability.syncfs(self.layers_dir)

        def mark(txn: lmdb.Transaction) -> None:
            if self._catalog.counter(txn, Counter.LAYERS_SYNCED) < recorded:
                self._catalog.set_counter(txn, Counter.LAYERS_SYNCED, recorded)

        self._db.write(mark, "marking layers synced")

    def start_syncing(self, every: float, closing: threading.Event) -> None:
        def loop() -> None:
            while not closing.wait(every):
                try:
                    self.sync()
                except (CascowfsError, OSError):
                    pass  # a failing disk: the layers stay marked unsynced, the next round retries

        self._syncer = threading.Thread(target=loop, name="cascowfs-layer-sync", daemon=True)
        self._syncer.start()

    def stop_syncing(self) -> None:
        """End the sync thread (the ``closing`` event it was started with is set)."""
        if self._syncer is not None:
            self._syncer.join()

    def unsynced(self) -> set[str]:
        """Layers recorded after the last syncfs: their files may not have reached the disk."""
        with self._db.read() as txn:
            synced = self._catalog.counter(txn, Counter.LAYERS_SYNCED)
            return {lid for lid, rec in self._catalog.layers(txn) if rec.seq > synced}

    def rebuild(
        self, lids: set[str], why: str, progress: bool, unmount_branch: Callable[[str], None]
    ) -> None:
        """Layers are a cache of the CAS: rebuild these in place, under the same ids, so every
        chain that names one is whole again. A full layer shows its tree; a delta layer is the
        difference from the tree the layers under it show, which is the same in every chain
        that holds it. A branch mounted on one of them is unmounted (``unmount_branch``;
        reconciliation mounts it again). Each is on the disk before it takes its name."""
        if not lids:
            return
        with self._db.read() as txn:
            records = {lid: self._catalog.layer(txn, lid) for lid in lids}
            below: dict[str, str | None] = {}
            branches_on: set[str] = set()
            chains: list[tuple[str | None, list[str]]] = [
                (None, rec.layers) for _, rec in self._catalog.snapshots(txn)
            ]
            chains += [(name, rec.layers) for name, rec in self._catalog.branches(txn)]
            for branch, chain in chains:
                for at, lid in enumerate(chain):
                    if lid not in records:
                        continue
                    if branch is not None:
                        branches_on.add(branch)
                    if lid not in below:
                        below[lid] = (
                            self._catalog.layer(txn, chain[at + 1]).top
                            if at + 1 < len(chain)
                            else None
                        )
        log.warning("%s: rebuilding %d layer(s) %s", self.store, len(lids), why)
        for name in branches_on:
            unmount_branch(name)
        with progress_bar(progress, len(records), f"rebuilding layers {why}", unit="layer") as bar:
            for lid, rec in records.items():
                if rec.span != 0 and lid not in below:
                    continue  # a delta in no chain: nothing mounts it, nothing says what is below
                staged = self.staging_dir / f"rebuild-{lid}"
                with disk_errors(f"rebuilding layer {lid}"):
                    self.write(
                        staged,
                        rec.top,
                        below.get(lid),
                        full=rec.span == 0,
                        image=as_image(rec.span),
                    )
                    # The layer keeps its ``seq``, which a syncfs may have covered already:
                    # ``sync`` would never run one for it again, and a power cut would leave
                    # torn files that no later open rebuilds. So its files reach the disk
                    # before its name does (one syncfs a layer: rebuilds are rare).
                    durability.syncfs(self.staging_dir)
                    self._unmount_image(lid)
                    self._trash.put(self.layers_dir / lid)  # a missing one is ignored
                    os.rename(staged, self.layers_dir / lid)
                    self._make_mount_point(lid)
                bar(1)
            with disk_errors("rebuilding layers"):
                durability.fsync_dir(self.layers_dir)
        lost = sorted(lid for lid in lids if not self.exists(lid))
        if lost:
            raise StoreIOError(
                f"layers {', '.join(lost)} are lost and no chain says what they held"
            )


def as_image(span: int) -> bool:
    """Whether a layer of ``span`` is written as a (compressed) image: a full layer (span 0)
    or a merged one holds most of what a chain shows, lives long and is read cold. A commit's
    own delta (span 1) stays a directory: it is small, short-lived (merged or dropped within
    minutes in a tree search) and written right behind the commit, where an exec of
    mkfs.erofs and a mount per commit compete with the next operations for the CPU."""
    return span != 1


def _tree_of(staged: Path) -> Path:
    """Where a layer's directory is written before its image is made from it."""
    return staged.with_name(staged.name + ".tree")
