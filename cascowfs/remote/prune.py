"""Reclaiming what no snapshot ref of a remote reaches.

The rule (docs/remotes.md): a prune holds the remote's exclusive lock (``locks.py``), so no
push or pull runs meanwhile; it marks every object reachable from a ref, reading only the
metadata packs (trees and chunk lists) it needs, then deletes each pack none of whose
objects is marked, its index first (a reader ignores a pack no index names). A pack with
any marked object stays whole, index and all (packs are not rewritten), so its index still
names the dead objects beside the live ones (a snapshot's trees share a pack), and a push
skips each of them *and everything under it* (the invariant: an index names an object only
once everything under it is named). So the mark goes on from every object a kept pack
holds, to a fixpoint: what they reach is kept too, and no index left names an object whose
children went with a deleted pack.

Packs that no index names are what an interrupted push left; they go once older than
``grace`` seconds, the time a live push may take between sending a pack and its index.
Files under ``tmp/`` (a directory remote's: what a full disk or a killed push left
half-written) go once older than ``grace`` and ``TMP_MIN_AGE``: a push or pull taking its
lock beside the prune writes it there first. Locks not rewritten for twice their stale
age are a killed holder's and go too. A key under ``packs/`` whose name is no pack's (64
hex digits) is not the remote's and never deleted. The lock is refreshed at every step (a
pack read, a key deleted), so a long prune keeps it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from ..cas import payload_children
from ..codec import TYPE_CHUNK
from ..errors import NotFoundError
from .locks import EXCLUSIVE, locked
from .objectstore import ObjectStore
from .packs import index_key, is_name, pack_key
from .transfer import (
    PackReader,
    RemoteIndex,
    TransferStats,
    list_refs,
    read_indexes,
    read_ref,
)

GRACE = 60 * 60.0
TMP_MIN_AGE = 60.0  # vs the milliseconds a lock is under tmp/ before its rename


@dataclass
class PruneStats:
    snapshots: int = 0
    packs_kept: int = 0
    packs_deleted: int = 0
    bytes_deleted: int = 0
    tmp_deleted: int = 0
    locks_deleted: int = 0

    def text(self) -> str:
        return (
            f"snapshots={self.snapshots} packs_kept={self.packs_kept} "
            f"packs_deleted={self.packs_deleted} bytes_deleted={self.bytes_deleted} "
            f"tmp_deleted={self.tmp_deleted} locks_deleted={self.locks_deleted}"
        )


def prune(
    store: ObjectStore, *, grace: float = GRACE, stale_after: float | None = None
) -> PruneStats:
    stats = PruneStats()
    with locked(store, EXCLUSIVE, stale_after) as lock:
        ids = list_refs(store)
        stats.snapshots = len(ids)
        index = read_indexes(store, lock=lock)
        roots = []
        for id in ids:
            lock.refresh()
            try:
                roots.extend(read_ref(store, id).roots())
            except NotFoundError:
                continue  # forgotten since the listing (forget takes no lock)
        reader = PackReader(store, index, TransferStats(), lock)
        with contextlib.closing(reader):
            kept = _kept_packs(index, reader, roots)
        sizes = {
            listed.key: listed
            for listed in store.list("packs/")
            if is_name(listed.key.removeprefix("packs/"))
        }
        indexed = set()
        for pack_index in index.indexes:
            lock.refresh()
            indexed.add(pack_index.pack)
            if pack_index.pack in kept:
                stats.packs_kept += 1
                continue
            store.delete(index_key(pack_index.name))
            _delete(store, pack_key(pack_index.pack), stats, sizes)
        now = time.time()
        for key, listed in sizes.items():
            if key.removeprefix("packs/") not in indexed and now - listed.modified > grace:
                lock.refresh()
                _delete(store, key, stats, sizes)
        for listed in store.list("tmp/"):
            if now - listed.modified > max(grace, TMP_MIN_AGE):
                lock.refresh()
                store.delete(listed.key)
                stats.tmp_deleted += 1
                stats.bytes_deleted += listed.size
        stats.locks_deleted = lock.delete_stale()
    return stats


def _kept_packs(index: RemoteIndex, reader: PackReader, roots: list[bytes]) -> set[str]:
    """The packs to keep: every pack holding an object reachable from ``roots``, and every
    pack holding an object reachable from an object a kept pack holds (its index names them
    all, so a push relies on everything under each), to a fixpoint."""
    held: dict[str, list[bytes]] = {}  # pack -> the objects its indexes name
    holders: dict[bytes, list[str]] = {}  # object -> every pack an index says holds it
    for pack_index in index.indexes:
        for entry in pack_index.entries:
            held.setdefault(pack_index.pack, []).append(entry.oid)
            holders.setdefault(entry.oid, []).append(pack_index.pack)
    kept: set[str] = set()
    marked: set[bytes] = set()
    stack = list(roots)
    while stack:
        oid = stack.pop()
        if oid in marked:
            continue
        marked.add(oid)
        for pack in holders.get(oid, ()):
            if pack not in kept:
                kept.add(pack)
                stack.extend(held[pack])  # its dead objects too: they stay named
        if index.kinds.get(oid, TYPE_CHUNK) == TYPE_CHUNK:
            continue  # a leaf, or missing (a pull names it; prune has nothing to keep)
        kind, payload = reader.get(oid, "(prune)")
        stack.extend(payload_children(kind, payload))
    return kept


def _delete(store: ObjectStore, key: str, stats: PruneStats, sizes: dict) -> None:
    try:
        store.delete(key)
    except NotFoundError:
        return
    stats.packs_deleted += 1
    stats.bytes_deleted += sizes[key].size if key in sizes else 0
