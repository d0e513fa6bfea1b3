"""The catalog: every LMDB record of the store other than CAS objects, typed.

The metadata database holds eight named databases. ``objects`` belongs to the CAS
(``cas.py``); this module owns the others and is the one place that knows how their
records are laid out:

- ``snapshots``: snapshot id -> ``SnapshotRecord`` (its tree, its parent, its layer chain);
- ``branches``: branch name -> ``BranchRecord`` (the snapshot it continues and the chain its
  overlay mount stacks);
- ``layers``: layer id -> ``LayerRecord`` (the tree a layer directory shows, how many chains
  name it, and for a commit's delta layer not written yet what it is the difference from);
- ``meta``: the store format, the page cache id and the ``Counter``s;
- ``ops``: the operations whose APPLY transaction committed (``wal.py``'s protocol);
- ``children``, ``labels`` and ``label_order``: indexes of the snapshot records, kept by
  ``put_snapshot``, ``replace_snapshot`` and ``delete_snapshot`` in the transaction that
  changes the record: the snapshot tree's edges (``<parent>\0<child>``; a snapshot without
  parent under the empty id), every label (``<key>\0<id>`` -> value), and every label again
  in the order ``find`` sorts by (``<key>\0<sort bytes>\0<id>``, ``sort_bytes``), so that
  ``find`` and ``children`` read only what they ask for. LMDB refuses keys over 511 bytes,
  so a text value whose sort bytes run past ``ORDER_KEPT`` keeps only those first bytes in
  the key, then ``\1`` in place of the ``\0``: such keys sort after the value that is
  exactly their prefix and before every greater one, and ``ordered`` reads their whole
  values from ``labels`` to place them among each other.

Records are JSON objects with sorted keys and no spaces, so that a store written by any
version since format 5 reads and rewrites byte for byte the same; the dataclasses are frozen,
and a change is a new record (``dataclasses.replace``) put in the same write transaction.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import lmdb

from .errors import NotFoundError, StoreIOError
from .names import label_number

log = logging.getLogger("cascowfs.catalog")


# Bump when records or objects change shape. 3: refcount changes are queued; 4: the queue is
# keyed by object (3 kept it in arrival order), and large directories are stored as pages;
# 5: objects carry no refcounts, a mark-and-sweep collector deletes what no live root reaches;
# 6: tree objects may be stored compressed (format 5's plain ones still read); 7: chunk lists
# may hold holes (format 6's zero chunks still read, and layers skip them); 8: a branch's upper
# and work directories sit in its private directory (recovery.py moves them there); 9: layers
# may be EROFS images (format 7's layer directories still mount, and are never rewritten);
# 10: the children and labels indexes, and snapshots may carry a large observation; 11: layer
# refcounts count chain nodes (``layer_refs.py``), not the chains naming the layer.
STORE_FORMAT = 11
INDEXED_FORMAT = 10  # the first format whose stores keep the children and labels indexes
CHAIN_NODES_FORMAT = 11  # the first format whose stores keep chain nodes


class Counter(Enum):
    """Monotonic counters kept in ``meta`` (decimal text; a missing one reads 0)."""

    LAYER_SEQ = b"layer_seq"  # the last ``seq`` given to a layer written to disk
    LAYERS_SYNCED = b"layers_synced"  # every layer of a ``seq`` up to this one was synced
    GARBAGE_SEQ = b"garbage_seq"  # bumped whenever objects may have become unreachable
    COLLECTED_SEQ = b"collected_seq"  # the garbage_seq the last finished collection covered


@dataclass(frozen=True)
class Observation:
    """A snapshot's large observation: a file's bytes in the CAS beside its tree, with the
    owner and mode of the file it was read from (``MNT/observations/<id>`` shows them)."""

    ref: str  # hex content id (empty for empty content)
    size: int
    mode: int  # permission bits
    uid: int
    gid: int


@dataclass(frozen=True)
class SnapshotRecord:
    root: str  # hex id of the superroot: a one-entry tree holding the root directory
    parent: str | None
    created_ns: int
    layers: list[str]  # the lower layers a branch on it mounts, top first
    files: int
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    obs: Observation | None = None


@dataclass(frozen=True)
class BranchRecord:
    parent: str | None  # the snapshot the branch continues (its last commit, or its base)
    base_root: str | None  # the superroot its upper directory is a difference from
    layers: list[str]  # the chain its overlay mount stacks (the base's, as it was then)
    created_ns: int
    last_commit: str | None = None


@dataclass(frozen=True)
class LayerRecord:
    """A layer directory showing tree ``top`` (with the layers under it in a chain).

    ``span`` counts the commits a delta layer covers; 0 marks a full layer. ``seq`` orders
    layers for syncing (``durability.py``); a commit's delta layer not written yet
    (``built`` False) has seq 0 and is the difference from tree ``below`` (None: nothing)."""

    refs: int
    top: str
    span: int
    seq: int = 0
    built: bool = True
    below: str | None = None


# A label's sort bytes: numbers first, by value (an IEEE double made to sort as bytes), then
# every other value by its UTF-8 bytes, which sort as its code points do.
NUMBER_TAG, TEXT_TAG, AFTER_TEXT = b"\x01", b"\x02", b"\x03"


def sort_bytes(value: str) -> bytes:
    """Where ``value`` sorts among a label's values (``label_order``)."""
    number = label_number(value)
    if number is None:
        return TEXT_TAG + value.encode("utf-8", "surrogateescape")
    return NUMBER_TAG + number_bytes(number)


def number_bytes(number: float) -> bytes:
    """8 bytes that sort as ``number`` does (-0.0 as 0.0)."""
    raw = struct.pack(">d", number + 0.0)
    if raw[0] & 0x80:  # negative: every bit flipped, so that larger magnitudes sort first
        return bytes(b ^ 0xFF for b in raw)
    return bytes([raw[0] | 0x80]) + raw[1:]


# Sort bytes an order key keeps: with a key of 64 bytes, an id of 128 and two separators the
# key stays under LMDB's 511 bytes.
ORDER_KEPT = 300
_WHOLE, _CUT = b"\0", b"\1"  # after the sort bytes: all of them, or their first ORDER_KEPT


def _order_key(key: str, value: str, id: str) -> bytes:
    # A text value holds no control character and an id neither, so the last NUL or \1 ends
    # the sort bytes (a number's eight bytes may hold either, but a NUL always follows them).
    sort = sort_bytes(value)
    if len(sort) > ORDER_KEPT:
        return key.encode() + b"\0" + sort[:ORDER_KEPT] + _CUT + id.encode()
    return key.encode() + b"\0" + sort + _WHOLE + id.encode()


def _split_order_key(raw: bytes, skip: int) -> tuple[bytes, bool, str]:
    """The sort bytes kept in order key ``raw`` (its first ``skip`` bytes are ``<key>\0``),
    whether they were cut, and the id."""
    end = max(raw.rfind(_WHOLE), raw.rfind(_CUT))
    return raw[skip:end], raw[end : end + 1] == _CUT, raw[end + 1 :].decode()


def _pair(first: str, second: str) -> bytes:
    """An index key: ids, names and label keys never hold a NUL, so it splits unambiguously."""
    return first.encode() + b"\0" + second.encode()


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def encode_snapshot(rec: SnapshotRecord) -> bytes:
    d: dict[str, Any] = {
        "root": rec.root,
        "parent": rec.parent,
        "created_ns": rec.created_ns,
        "labels": rec.labels,
        "layers": rec.layers,
        "files": rec.files,
        "size": rec.size,
    }
    if rec.obs is not None:  # the only records with the key: others read as format 9 wrote them
        d["obs"] = asdict(rec.obs)
    return _dump(d)


def decode_snapshot(raw: bytes) -> SnapshotRecord:
    d = json.loads(raw)
    return SnapshotRecord(
        root=d["root"],
        parent=d["parent"],
        created_ns=d["created_ns"],
        layers=list(d["layers"]),
        files=d["files"],
        size=d["size"],
        labels=dict(d.get("labels") or {}),
        obs=Observation(**d["obs"]) if d.get("obs") else None,
    )


def encode_branch(rec: BranchRecord) -> bytes:
    return _dump(
        {
            "parent": rec.parent,
            "base_root": rec.base_root,
            "layers": rec.layers,
            "created_ns": rec.created_ns,
            "last_commit": rec.last_commit,
        }
    )


def decode_branch(raw: bytes) -> BranchRecord:
    d = json.loads(raw)
    return BranchRecord(
        parent=d["parent"],
        base_root=d["base_root"],
        layers=list(d["layers"]),
        created_ns=d["created_ns"],
        last_commit=d.get("last_commit"),
    )


def encode_layer(rec: LayerRecord) -> bytes:
    d: dict[str, Any] = {"refs": rec.refs, "top": rec.top, "span": rec.span, "seq": rec.seq}
    if not rec.built:  # the only records with these keys: a written layer's record drops them
        d.update(built=False, below=rec.below)
    return _dump(d)


def decode_layer(raw: bytes) -> LayerRecord:
    d = json.loads(raw)
    return LayerRecord(
        refs=d["refs"],
        top=d["top"],
        span=d["span"],
        seq=d.get("seq", 0),
        built=d.get("built", True),
        below=d.get("below"),
    )


class Catalog:
    """Typed access to the records, inside transactions the caller opens (``MetaDB.read`` /
    ``MetaDB.write``), so an operation composes several changes into one atomic step.

    ``dbs`` maps database names to handles: ``MetaDB.dbs``, or ``metadb.open_reader``'s in
    another process."""

    def __init__(self, dbs: Mapping[str, Any]) -> None:
        self._snapshots = dbs["snapshots"]
        self._branches = dbs["branches"]
        self._layers = dbs["layers"]
        self._chains = dbs["chains"]
        self._meta = dbs["meta"]
        self._ops = dbs["ops"]
        self._children = dbs["children"]
        self._labels = dbs["labels"]
        self._label_order = dbs["label_order"]

    # -- snapshots --------------------------------------------------------------------
    def snapshot(self, txn: lmdb.Transaction, id: str) -> SnapshotRecord:
        rec = self.find_snapshot(txn, id)
        if rec is None:
            raise NotFoundError(f"no snapshot {id!r}")
        return rec

    def find_snapshot(self, txn: lmdb.Transaction, id: str) -> SnapshotRecord | None:
        raw = txn.get(id.encode(), db=self._snapshots)
        return decode_snapshot(raw) if raw is not None else None

    def has_snapshot(self, txn: lmdb.Transaction, id: str) -> bool:
        return txn.get(id.encode(), db=self._snapshots) is not None

    def snapshots(
        self, txn: lmdb.Transaction, *, skip_damaged: bool = False
    ) -> Iterator[tuple[str, SnapshotRecord]]:
        """Every snapshot record. ``skip_damaged``: a record that does not decode is left out
        with a log line (listings), so that one damaged record does not hide the others."""
        for key, raw in txn.cursor(db=self._snapshots):
            try:
                rec = decode_snapshot(raw)
            except (ValueError, KeyError, TypeError) as exc:
                if not skip_damaged:
                    raise
                log.warning("snapshot record %r does not decode, not listed: %r", bytes(key), exc)
                continue
            yield bytes(key).decode(), rec

    def snapshot_ids(self, txn: lmdb.Transaction) -> list[str]:
        return [
            bytes(k).decode()
            for k in txn.cursor(db=self._snapshots).iternext(keys=True, values=False)
        ]

    def snapshot_count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._snapshots)["entries"]

    def branch_count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._branches)["entries"]

    def put_snapshot(self, txn: lmdb.Transaction, id: str, rec: SnapshotRecord) -> None:
        self.replace_snapshot(txn, id, self.find_snapshot(txn, id), rec)

    def replace_snapshot(
        self, txn: lmdb.Transaction, id: str, old: SnapshotRecord | None, new: SnapshotRecord
    ) -> None:
        """``put_snapshot`` for a caller that has read the record already: ``old`` is snapshot
        ``id``'s record as this transaction reads it (None: it has none), which the indexes
        are moved from, so it is not read again."""
        txn.put(id.encode(), encode_snapshot(new), db=self._snapshots)
        self._reindex(txn, id, old, new)

    def delete_snapshot(self, txn: lmdb.Transaction, id: str, old: SnapshotRecord | None) -> None:
        """Delete snapshot ``id``, whose record as this transaction reads it is ``old`` (None:
        it has none): its index entries go with it, and the caller's read is not repeated."""
        self._reindex(txn, id, old, None)
        txn.delete(id.encode(), db=self._snapshots)

    # -- the indexes of snapshot records ------------------------------------------------
    def _reindex(
        self,
        txn: lmdb.Transaction,
        id: str,
        old: SnapshotRecord | None,
        new: SnapshotRecord | None,
    ) -> None:
        """Move snapshot ``id``'s index entries from record ``old``'s to ``new``'s (None: no
        record), touching only the entries that differ: every LMDB call gives up the GIL and
        waits to get it back, and a relabel in a tree search changes two keys of a few."""
        old_parent = (old.parent or "") if old is not None else None
        new_parent = (new.parent or "") if new is not None else None
        if old_parent != new_parent:
            if old_parent is not None:
                txn.delete(_pair(old_parent, id), db=self._children)
            if new_parent is not None:
                txn.put(_pair(new_parent, id), b"", db=self._children)
        old_labels = old.labels if old is not None else {}
        new_labels = new.labels if new is not None else {}
        for key, val in old_labels.items():
            if new_labels.get(key) != val:
                txn.delete(_order_key(key, val, id), db=self._label_order)
                if key not in new_labels:
                    txn.delete(_pair(key, id), db=self._labels)
        for key, val in new_labels.items():
            if old_labels.get(key) != val:
                txn.put(_pair(key, id), val.encode("utf-8", "surrogateescape"), db=self._labels)
                txn.put(_order_key(key, val, id), b"", db=self._label_order)

    def rebuild_indexes(self, txn: lmdb.Transaction) -> None:
        """Index every snapshot record afresh (the upgrade to format 10)."""
        txn.drop(self._children, delete=False)
        txn.drop(self._labels, delete=False)
        txn.drop(self._label_order, delete=False)
        for id, rec in self.snapshots(txn, skip_damaged=True):
            self._reindex(txn, id, None, rec)

    def index_mismatches(self, txn: lmdb.Transaction) -> list[str]:
        """Index entries that disagree with the snapshot records: missing, stale or with
        another value (fsck)."""
        want_children: set[bytes] = set()
        want_labels: dict[bytes, bytes] = {}
        want_order: set[bytes] = set()
        for id, rec in self.snapshots(txn, skip_damaged=True):
            want_children.add(_pair(rec.parent or "", id))
            for key, val in rec.labels.items():
                want_labels[_pair(key, id)] = val.encode("utf-8", "surrogateescape")
                want_order.add(_order_key(key, val, id))
        have_children = {
            bytes(k) for k in txn.cursor(db=self._children).iternext(keys=True, values=False)
        }
        have_labels = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._labels)}
        have_order = {
            bytes(k) for k in txn.cursor(db=self._label_order).iternext(keys=True, values=False)
        }
        out = [
            f"children index entry {key!r} is {'missing' if key in want_children else 'stale'}"
            for key in sorted(want_children ^ have_children)
        ]
        out += [
            f"label order entry {key!r} is {'missing' if key in want_order else 'stale'}"
            for key in sorted(want_order ^ have_order)
        ]
        out += [
            f"labels index entry {key!r} is {have_labels.get(key)!r}, the record says "
            f"{want_labels.get(key)!r}"
            for key in sorted(want_labels.keys() | have_labels.keys())
            if want_labels.get(key) != have_labels.get(key)
        ]
        return out

    def children(self, txn: lmdb.Transaction, parent: str | None) -> list[str]:
        """The ids of the snapshots whose parent is ``parent`` (None: those without one),
        sorted."""
        return [id for id, _ in self._with_prefix(txn, self._children, parent or "")]

    def orphans(self, txn: lmdb.Transaction) -> list[str]:
        """The snapshots whose recorded parent is no snapshot any more (pruned), sorted: with
        those recorded without one, the roots of the snapshot tree. One pass over the
        ``children`` index."""
        out = []
        known: dict[bytes, bool] = {}
        for key in txn.cursor(db=self._children).iternext(keys=True, values=False):
            parent, _, child = bytes(key).partition(b"\0")
            if not parent:
                continue
            gone = known.get(parent)
            if gone is None:
                gone = known[parent] = txn.get(parent, db=self._snapshots) is None
            if gone:
                out.append(child.decode())
        return sorted(out)

    def children_or_orphans(self, txn: lmdb.Transaction, parent: str) -> list[str]:
        """The snapshots recorded with parent ``parent``, sorted: a pruned one's too (orphans
        keep the parent they were committed on). NotFoundError if ``parent`` is no snapshot
        and no snapshot names it."""
        found = self.children(txn, parent)
        if not found and not self.has_snapshot(txn, parent):
            raise NotFoundError(f"no snapshot {parent!r}")
        return found

    def labelled(self, txn: lmdb.Transaction, key: str) -> Iterator[tuple[str, str]]:
        """(snapshot id, value) of every snapshot carrying label ``key``, by id."""
        for id, raw in self._with_prefix(txn, self._labels, key):
            yield id, raw.decode("utf-8", "surrogateescape")

    def ordered(
        self, txn: lmdb.Transaction, key: str, low: bytes, high: bytes, *, descending: bool
    ) -> Iterator[tuple[bytes, str]]:
        """(sort bytes, snapshot id) of label ``key``'s values whose sort bytes lie in
        [``low``, ``high``), ascending (ties by id) or descending (ties by id descending)."""
        prefix = key.encode() + b"\0"
        cursor = txn.cursor(db=self._label_order)
        if descending:  # past every key whose value may lie under ``high``
            past = high if len(high) <= ORDER_KEPT else high[:ORDER_KEPT] + b"\2"
            placed = cursor.prev() if cursor.set_range(prefix + past) else cursor.last()
            entries = cursor.iterprev(keys=True, values=False) if placed else iter(())
        else:
            placed = cursor.set_range(prefix + low[:ORDER_KEPT])
            entries = cursor.iternext(keys=True, values=False) if placed else iter(())
        cut_run: list[tuple[bytes, str]] = []  # keys cut at the same bytes: whole values
        kept_run = b""
        for raw in entries:
            if not raw.startswith(prefix):
                break
            kept, was_cut, id = _split_order_key(raw, len(prefix))
            if cut_run and (not was_cut or kept != kept_run):
                yield from self._placed(cut_run, low, high, descending)
                cut_run = []
            # ``kept`` is the value, or a prefix of it, and moves one way along the keys: past
            # the range, no later key's value can come back into it
            if descending:
                if kept < (low[:ORDER_KEPT] if was_cut else low):
                    break
            elif kept >= high:
                break
            if was_cut:
                kept_run = kept
                whole = self.label(txn, key, id)
                cut_run.append((sort_bytes(whole) if whole is not None else kept, id))
            elif low <= kept < high:
                yield kept, id
        if cut_run:
            yield from self._placed(cut_run, low, high, descending)

    @staticmethod
    def _placed(
        run: list[tuple[bytes, str]], low: bytes, high: bytes, descending: bool
    ) -> Iterator[tuple[bytes, str]]:
        """Keys cut at the same bytes, in the order of their whole sort bytes, then ids."""
        for sort, id in sorted(run, reverse=descending):
            if low <= sort < high:
                yield sort, id

    def label(self, txn: lmdb.Transaction, key: str, id: str) -> str | None:
        raw = txn.get(_pair(key, id), db=self._labels)
        return bytes(raw).decode("utf-8", "surrogateescape") if raw is not None else None

    @staticmethod
    def _with_prefix(txn: lmdb.Transaction, db: Any, prefix: str) -> Iterator[tuple[str, bytes]]:
        start = prefix.encode() + b"\0"
        skip = len(start)
        cursor = txn.cursor(db=db)
        if not cursor.set_range(start):
            return
        for key, value in cursor:  # bytes already: the environment hands out no buffers
            if not key.startswith(start):
                return
            yield key[skip:].decode(), value

    # -- branches ---------------------------------------------------------------------
    def branch(self, txn: lmdb.Transaction, name: str) -> BranchRecord:
        raw = txn.get(name.encode(), db=self._branches)
        if raw is None:
            raise NotFoundError(f"no branch {name!r}")
        return decode_branch(raw)

    def find_branch(self, txn: lmdb.Transaction, name: str) -> BranchRecord | None:
        raw = txn.get(name.encode(), db=self._branches)
        return decode_branch(raw) if raw is not None else None

    def branches(self, txn: lmdb.Transaction) -> Iterator[tuple[str, BranchRecord]]:
        for key, raw in txn.cursor(db=self._branches):
            yield bytes(key).decode(), decode_branch(raw)

    def branch_names(self, txn: lmdb.Transaction) -> list[str]:
        return [
            bytes(k).decode()
            for k in txn.cursor(db=self._branches).iternext(keys=True, values=False)
        ]

    def put_branch(self, txn: lmdb.Transaction, name: str, rec: BranchRecord) -> None:
        txn.put(name.encode(), encode_branch(rec), db=self._branches)

    def delete_branch(self, txn: lmdb.Transaction, name: str) -> None:
        txn.delete(name.encode(), db=self._branches)

    # -- layers -----------------------------------------------------------------------
    def layer(self, txn: lmdb.Transaction, lid: str) -> LayerRecord:
        rec = self.find_layer(txn, lid)
        if rec is None:
            raise StoreIOError(f"layer {lid} has no record")
        return rec

    def find_layer(self, txn: lmdb.Transaction, lid: str) -> LayerRecord | None:
        raw = txn.get(lid.encode(), db=self._layers)
        return decode_layer(raw) if raw is not None else None

    def layers(self, txn: lmdb.Transaction) -> Iterator[tuple[str, LayerRecord]]:
        for key, raw in txn.cursor(db=self._layers):
            yield bytes(key).decode(), decode_layer(raw)

    def layer_ids(self, txn: lmdb.Transaction) -> set[str]:
        return {
            bytes(k).decode() for k in txn.cursor(db=self._layers).iternext(keys=True, values=False)
        }

    def layer_count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._layers)["entries"]

    def unbuilt_layer_ids(self, txn: lmdb.Transaction) -> list[str]:
        """The commits' delta layers recorded as not written yet."""
        # only such a record has the key (a store of 10k snapshots has ~10k records)
        return [
            bytes(k).decode()
            for k, v in txn.cursor(db=self._layers)
            if b'"built"' in v and not decode_layer(v).built
        ]

    def put_layer(self, txn: lmdb.Transaction, lid: str, rec: LayerRecord) -> None:
        txn.put(lid.encode(), encode_layer(rec), db=self._layers)

    def delete_layer(self, txn: lmdb.Transaction, lid: str) -> None:
        txn.delete(lid.encode(), db=self._layers)

    # -- chain nodes (``layer_refs.py``) ----------------------------------------------
    def chain_refs(self, txn: lmdb.Transaction, key: bytes) -> int:
        """The refcount of the chain node ``key`` (0: there is none)."""
        raw = txn.get(key, db=self._chains)
        return int(raw) if raw is not None else 0

    def set_chain_refs(self, txn: lmdb.Transaction, key: bytes, refs: int) -> None:
        """Store node ``key``'s refcount; at 0 the node goes."""
        if refs > 0:
            txn.put(key, str(refs).encode(), db=self._chains)
        else:
            txn.delete(key, db=self._chains)

    def chain_nodes(self, txn: lmdb.Transaction) -> dict[bytes, int]:
        return {bytes(key): int(raw) for key, raw in txn.cursor(db=self._chains)}

    def clear_chains(self, txn: lmdb.Transaction) -> None:
        txn.drop(self._chains, delete=False)

    # -- meta -------------------------------------------------------------------------
    def format(self, txn: lmdb.Transaction) -> bytes | None:
        """The store format number as stored (None: a store that never recorded one)."""
        raw = txn.get(b"format", db=self._meta)
        return bytes(raw) if raw is not None else None

    def set_format(self, txn: lmdb.Transaction, number: int) -> None:
        txn.put(b"format", str(number).encode(), db=self._meta)

    def page_cache(self, txn: lmdb.Transaction) -> str:
        return bytes(txn.get(b"page_cache", b"", db=self._meta)).decode()

    def set_page_cache(self, txn: lmdb.Transaction, cache: str) -> None:
        txn.put(b"page_cache", cache.encode(), db=self._meta)

    def counter(self, txn: lmdb.Transaction, which: Counter) -> int:
        return int(txn.get(which.value, b"0", db=self._meta))

    def set_counter(self, txn: lmdb.Transaction, which: Counter, value: int) -> None:
        txn.put(which.value, str(value).encode(), db=self._meta)

    # -- applied operations -----------------------------------------------------------
    def mark_applied(self, txn: lmdb.Transaction, op: str) -> None:
        txn.put(op.encode(), b"applied", db=self._ops)

    def is_applied(self, txn: lmdb.Transaction, op: str) -> bool:
        return txn.get(op.encode(), db=self._ops) is not None

    def forget_applied(self, txn: lmdb.Transaction) -> None:
        txn.drop(self._ops, delete=False)

    # -- what keeps objects alive -----------------------------------------------------
    def live_roots(self, txn: lmdb.Transaction) -> Iterator[bytes]:
        """Every object that roots the live set: snapshot roots and observations, branch
        bases, layer tops, and the trees that layers not written yet are the difference from."""
        # reads only the root fields: the marking child walks every record of the store
        for _, raw in txn.cursor(db=self._snapshots):
            d = json.loads(raw)
            yield bytes.fromhex(d["root"])
            obs = d.get("obs")
            if obs and obs["ref"]:
                yield bytes.fromhex(obs["ref"])
        for db, key in (
            (self._branches, "base_root"),
            (self._layers, "top"),
            (self._layers, "below"),
        ):
            for _, raw in txn.cursor(db=db):
                hexid = json.loads(raw).get(key)
                if hexid:
                    yield bytes.fromhex(hexid)
