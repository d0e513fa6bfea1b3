"""Push and pull snapshots, and list a remote's snapshots.

**Push.** Read every index of the remote (the ids it holds), walk the snapshot's tree
children first, skipping every object the remote holds (and with it everything under it:
an index names an object only once everything under it is named), and send what is left
in packs, each followed by its index; then write the snapshot ref with a conditional put.
An interrupted push leaves packs with indexes (seen by the next push, not sent again) and
at most one pack without (ignored by readers, reclaimed by prune).

**Pull.** Read the ref, then every index, and walk the tree from its root children first,
skipping every object the store has; the packs holding the rest are downloaded, verified
(their name, then every object's id) and handed to ``StateManager.receive_snapshot``,
which records the snapshot atomically once all of it is in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cas import payload_children, value_of_payload
from ..catalog import Observation
from ..codec import TYPE_CHUNK
from ..episodes import parent_loops
from ..errors import CascowfsError, ExistsError, InvalidArgumentError, NotFoundError, StoreIOError
from ..names import check_labels, check_snapshot_id
from ..progress import progress_bar
from . import packs
from .checks import PulledTrees
from .locks import SHARED, RemoteLock, locked
from .objectstore import INDEX_BYTES_MAX, PACK_BYTES_MAX, REF_BYTES_MAX, ObjectStore
from .packs import (
    PackBuilder,
    PackIndex,
    index_key,
    pack_key,
    read_index,
    read_pack,
)

REF_FORMAT = 1
PACKS_CACHED = 4  # whole packs a pull keeps decoded (a pack is up to ~packs.PACK_TARGET)
# Packs in flight at once, each on a thread of its own: enough to overlap the walk of the
# store with compression, hashing and the requests (zstd, BLAKE3 and sockets let go of the
# GIL), few enough to bound memory to a few packs.
UPLOADS = 4
DOWNLOADS = 4

log = logging.getLogger("cascowfs.remote")


@dataclass(frozen=True)
class RemoteSnapshot:
    """A snapshot ref: what ``snapshots/<id>`` holds."""

    id: str
    root: str
    parent: str | None
    created_ns: int
    labels: dict[str, str]
    files: int
    size: int
    obs: Observation | None = None  # its large observation, if it has one

    def encode(self) -> bytes:
        d = {
            "format": REF_FORMAT,
            "id": self.id,
            "root": self.root,
            "parent": self.parent,
            "created_ns": self.created_ns,
            "labels": self.labels,
            "files": self.files,
            "size": self.size,
        }
        if self.obs is not None:  # the only refs with the key
            d["obs"] = asdict(self.obs)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    def roots(self) -> list[bytes]:
        """The objects everything the snapshot needs lies under: its tree, its observation."""
        out = [bytes.fromhex(self.root)]
        if self.obs is not None and self.obs.ref:
            out.append(bytes.fromhex(self.obs.ref))
        return out


def ref_key(id: str) -> str:
    return f"snapshots/{id}"


def read_ref(store: ObjectStore, id: str) -> RemoteSnapshot:
    key = ref_key(check_snapshot_id(id))
    where = store.spec.describe()
    raw = store.get(key, max_bytes=REF_BYTES_MAX)
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        snap = RemoteSnapshot(
            id=d["id"],
            root=_content_id(d["root"], "root"),
            parent=d["parent"],
            created_ns=_count(d, "created_ns"),
            labels=check_labels(d["labels"]),
            files=_count(d, "files"),
            size=_count(d, "size"),
            obs=_decode_observation(d["obs"]) if "obs" in d else None,
        )
        if snap.parent is not None:
            check_snapshot_id(snap.parent)
    except RecursionError:  # JSON nested thousands deep
        raise StoreIOError(f"remote {where}: {key} does not decode: nested too deep") from None
    except (ValueError, KeyError, TypeError, InvalidArgumentError) as exc:
        raise StoreIOError(f"remote {where}: {key} does not decode: {exc}") from None
    if snap.id != id:
        raise StoreIOError(f"remote {where}: {key} describes another snapshot ({snap.id!r})")
    return snap


# A ref is another machine's word, held to what a store records (ValueError otherwise): a
# time in nanoseconds since 1970 fits a signed 64-bit integer, as in a stat.
_COUNT_MAX = (1 << 63) - 1
_ID_MAX = (1 << 32) - 2  # the largest uid or gid: (uid_t) -1 means "none"
_OBSERVATION_KEYS = {"ref", "size", "mode", "uid", "gid"}


def _count(d: dict, key: str, most: int = _COUNT_MAX) -> int:
    value = d[key]
    if type(value) is not int or not 0 <= value <= most:  # no bool, float or text
        raise ValueError(f"{key} {value!r} is no integer from 0 to {most}")
    return value


def _content_id(value: object, what: str) -> str:
    """A content id as the store spells it: 64 lowercase hex digits."""
    if not isinstance(value, str) or len(value) != 64 or bytes.fromhex(value).hex() != value:
        raise ValueError(f"{what} {value!r} is no content id")
    return value


def _decode_observation(d: object) -> Observation:
    """A ref's observation, as a commit records one."""
    if not isinstance(d, dict) or set(d) != _OBSERVATION_KEYS:
        raise ValueError(f"an observation has the keys {sorted(_OBSERVATION_KEYS)}")
    ref = "" if d["ref"] == "" else _content_id(d["ref"], "the observation's ref")
    size, mode = _count(d, "size"), _count(d, "mode", 0o7777)
    obs = Observation(ref, size, mode, _count(d, "uid", _ID_MAX), _count(d, "gid", _ID_MAX))
    if (obs.size == 0) != (not ref):
        raise ValueError(f"an observation of {obs.size} bytes with ref {ref!r}")
    return obs


def list_refs(store: ObjectStore) -> list[str]:
    """The ids of the remote's snapshot refs (keys that are no valid id are left out)."""
    out = []
    for listed in store.list("snapshots/"):
        name = listed.key.removeprefix("snapshots/")
        try:
            out.append(check_snapshot_id(name))
        except InvalidArgumentError:
            continue
    return sorted(out)


@dataclass
class RemoteIndex:
    """Where each object of the remote is: the union of every index it holds."""

    packs: dict[bytes, str] = field(default_factory=dict)  # object id -> pack name
    kinds: dict[bytes, bytes] = field(default_factory=dict)  # object id -> kind
    bodies: dict[str, int] = field(default_factory=dict)  # pack name -> its bytes decompressed
    sizes: dict[str, int] = field(default_factory=dict)  # pack name -> its bytes, as indexed
    indexes: list[PackIndex] = field(default_factory=list)
    bytes_read: int = 0

    def add(self, index: PackIndex) -> None:
        self.indexes.append(index)
        self.bodies.setdefault(index.pack, index.body_size)
        self.sizes.setdefault(index.pack, min(index.pack_size, PACK_BYTES_MAX))
        for entry in index.entries:
            self.packs.setdefault(entry.oid, index.pack)
            self.kinds[entry.oid] = entry.kind


def read_indexes(
    store: ObjectStore, cache: Path | None = None, lock: RemoteLock | None = None
) -> RemoteIndex:
    """Every index the remote lists: keys ``index/<name>`` whose name is an index's (64 hex
    digits), the others are no index and left alone. With ``cache`` (a directory), indexes
    read before are taken from there: they are immutable and named by content, so a copy is
    always right, and a push or pull then reads only the indexes new since the last one
    (``bytes_read``); an index read from the remote is kept there once it is checked. Cached
    copies of indexes the remote no longer lists (pruned) are deleted.

    The cache is only a cache: a copy that cannot be read is read from the remote, one that
    cannot be kept is not, and transfers of the daemon's threads share it (``_keep_copy``).
    ``lock``, the transfer's, is refreshed after each index read from the remote (a first
    transfer from a big remote reads thousands)."""
    where = store.spec.describe()
    out = RemoteIndex()
    cached = _cached(cache)
    for listed in store.list("index/"):
        name = listed.key.removeprefix("index/")
        if not packs.is_name(name):
            continue
        if name in cached and cache is not None:
            cached.discard(name)
            try:
                data = (cache / name).read_bytes()
            except OSError:
                data = b""  # deleted meanwhile, or unreadable: read the remote's
            if packs.name_of(data) == name:
                out.add(read_index(data, name, where))
                continue  # else a damaged copy: read the remote's
        if lock is not None:
            lock.refresh()
        data = store.get(listed.key, max_bytes=INDEX_BYTES_MAX)
        out.bytes_read += len(data)
        out.add(read_index(data, name, where))
        if cache is not None:
            _keep_copy(cache, name, data)
    for name in cached:
        with contextlib.suppress(OSError):
            os.unlink(cache / name)  # type: ignore[operator]
    return out


def index_cache(sm, spec_url: str) -> Path:
    """Where a store keeps copies of a remote's indexes (``STORE/remote-cache/<hash of the
    URL>``)."""
    return sm.store / "remote-cache" / packs.name_of(spec_url.encode())[:16]


# A temporary copy older than this is a killed transfer's: a copy is written and renamed in a
# moment.
_CACHE_TMP_AGE = 60 * 60.0


def _cached(cache: Path | None) -> set[str]:
    """The names of the index copies in ``cache``. Temporary files (dot files) are another
    transfer's, being written: left alone, unless a killed transfer left them long ago."""
    if cache is None:
        return set()
    try:
        entries = list(os.scandir(cache))
    except OSError:  # not there yet, or unreadable: no copies
        return set()
    out = set()
    for entry in entries:
        if not entry.name.startswith("."):
            out.add(entry.name)
            continue
        with contextlib.suppress(OSError):
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > _CACHE_TMP_AGE:
                os.unlink(entry.path)
    return out


def _keep_copy(cache: Path, name: str, data: bytes) -> None:
    """Keep index ``name`` (checked: a name that is no index's names no file here either).
    Written under a name of its own (transfers at once may keep the same index) and renamed
    into place; best effort: a cache that cannot be written (a full disk) fails no transfer,
    whose next run reads the index from the remote again."""
    assert packs.is_name(name), name
    tmp = cache / f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, cache / name)
    except OSError as exc:
        log.warning("index cache %s: cannot keep index %s: %s", cache, name, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@dataclass
class TransferStats:
    snapshots: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already on the other side
    objects: int = 0
    packs: int = 0
    bytes: int = 0  # pack bytes sent or received
    index_read: int = 0  # bytes of the remote's indexes read (those not cached yet)
    index_written: int = 0

    def text(self) -> str:
        return " ".join(self.snapshots)


# -- push ------------------------------------------------------------------------------------
class PackSender:
    """Packs filling up as a push walks; data (chunks) and metadata (lists, trees) apart, so
    that a prune or a pull reads trees without the file data.

    Up to ``UPLOADS`` packs are sealed (compressed, hashed) and sent at once on a small
    thread pool while the walk goes on. A pack's index is written only once the pack is in,
    and a metadata pack's index only once every pack handed over before it has its index
    too, so that an index never names an object whose children no index names yet. An
    upload that fails is raised by the next ``add`` or ``flush``; the packs queued after it
    are not sent and the metadata indexes waiting for it are never written."""

    def __init__(
        self,
        store: ObjectStore,
        known: RemoteIndex,
        stats: TransferStats,
        lock: RemoteLock,
        cache: Path | None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.known = known
        self.stats = stats
        self.lock = lock
        self.data = PackBuilder()
        self.meta = PackBuilder()
        self.on_sent: Callable[[int], None] = lambda n: None
        self._pool = ThreadPoolExecutor(UPLOADS, thread_name_prefix="cascowfs-push")
        self._pending: deque[Future[_Sent]] = deque()

    def add(self, kind: bytes, oid: bytes, payload: bytes) -> None:
        if len(payload) > packs.OBJECT_MAX:  # no pull would take it
            raise CascowfsError(
                f"remote {self.store.spec.describe()}: object {oid.hex()} holds {len(payload)} "
                f"bytes, more than the {packs.OBJECT_MAX} a remote takes",
                errno=errno.EFBIG,
            )
        if kind == TYPE_CHUNK:
            self.data.add(kind, oid, payload)
            if self.data.body_bytes >= packs.PACK_TARGET:
                self._send(self.data, after=[])
                self.data = PackBuilder()
        else:
            self.meta.add(kind, oid, payload)
            if self.meta.body_bytes >= packs.PACK_TARGET:
                self._send_both()

    def flush(self) -> None:
        """Send what the builders hold and wait until every pack and index is in."""
        self._send_both()
        while self._pending:
            self._record(self._pending.popleft())

    def close(self) -> None:
        """Stop: packs not started are dropped, those in flight finish or fail first."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _send_both(self) -> None:
        if len(self.data):
            self._send(self.data, after=[])
            self.data = PackBuilder()
        if len(self.meta):
            self._send(self.meta, after=list(self._pending))
            self.meta = PackBuilder()

    def _send(self, builder: PackBuilder, after: list[Future[_Sent]]) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= UPLOADS):
            self._record(self._pending.popleft())
        self.lock.refresh()
        self._pending.append(self._pool.submit(self._upload, builder, after))

    def _upload(self, builder: PackBuilder, after: list[Future[_Sent]]) -> _Sent:
        pack_name, pack, index_name, index = builder.seal()
        self.store.put(pack_key(pack_name), pack)
        for earlier in after:
            earlier.result()  # raises its failure: then this index is not written either
        self.store.put(index_key(index_name), index)
        return _Sent(len(builder), len(pack), index_name, index)

    def _record(self, upload: Future[_Sent]) -> None:
        sent = upload.result()
        self.known.add(read_index(sent.index, sent.index_name, self.store.spec.describe()))
        self.stats.packs += 1
        self.stats.objects += sent.objects
        self.stats.bytes += sent.pack_bytes
        self.stats.index_written += len(sent.index)
        if self.cache is not None:
            _keep_copy(self.cache, sent.index_name, sent.index)
        self.on_sent(sent.pack_bytes)


@dataclass(frozen=True)
class _Sent:
    objects: int
    pack_bytes: int
    index_name: str
    index: bytes


def push(
    sm,
    store: ObjectStore,
    ids: Iterable[str],
    *,
    with_ancestors: bool = False,
    progress: bool = False,
) -> TransferStats:
    """Send snapshots ``ids`` of ``sm`` (a ``StateManager``) to ``store``. A snapshot whose
    ref is there already with the same tree is skipped; with another tree, EEXIST."""
    ids = [check_snapshot_id(i) for i in ids]
    if with_ancestors:
        # a parent pruned here ends the line: a search prunes as it goes
        ids = _with_ancestors(ids, lambda i: _kept(sm, sm.snapshot(i).parent))
    stats = TransferStats()
    where = store.spec.describe()
    store.create()  # a push makes a directory remote; reading one that is not there is ENOENT
    with locked(store, SHARED) as lock:
        refs = set(list_refs(store))
        cache = index_cache(sm, store.spec.url)
        known = read_indexes(store, cache, lock)
        stats.index_read += known.bytes_read
        sender = PackSender(store, known, stats, lock, cache)
        bar_title = f"push to {store.spec.name}"
        with contextlib.closing(sender), progress_bar(progress, 0, bar_title) as bar:
            sender.on_sent = bar
            for id in ids:
                info = sm.snapshot(id)
                if id in refs:
                    if read_ref(store, id).root != info.root:
                        raise ExistsError(
                            f"remote {where}: snapshot {id} exists there with another tree"
                        )
                    stats.skipped.append(id)
                    continue
                ref = RemoteSnapshot(
                    id,
                    info.root,
                    info.parent,
                    info.created_ns,
                    dict(info.labels),
                    info.files,
                    info.size,
                    sm.observation(id) if info.obs is not None else None,
                )
                for root in ref.roots():
                    _send_tree(sm, root, known, sender)
                sender.flush()
                try:
                    store.put_new(ref_key(id), ref.encode())
                except ExistsError:
                    if read_ref(store, id).root != info.root:
                        raise ExistsError(
                            f"remote {where}: snapshot {id} was pushed meanwhile with another tree"
                        ) from None
                    stats.skipped.append(id)
                    continue
                stats.snapshots.append(id)
    return stats


def _send_tree(sm, root: bytes, known: RemoteIndex, sender: PackSender) -> None:
    """Every object under ``root`` the remote lacks, children before parents."""
    seen: set[bytes] = set()
    stack: list[tuple[bytes, tuple[bytes, bytes] | None]] = [(root, None)]
    while stack:
        oid, loaded = stack.pop()
        if loaded is not None:
            sender.add(loaded[0], oid, loaded[1])
            continue
        if oid in seen or oid in known.packs:
            continue
        sender.lock.refresh()  # a walk of a big tree that sends little takes a while too
        seen.add(oid)
        kind, payload = sm.content.kind_and_payload(oid)
        children = payload_children(kind, payload)
        if not children:
            sender.add(kind, oid, payload)
            continue
        stack.append((oid, (kind, payload)))
        stack.extend((child, None) for child in children)


def _kept(sm, id: str | None) -> str | None:
    return id if id is not None and sm.has_snapshot(id) else None


def _with_ancestors(ids: list[str], parent_of: Callable[[str], str | None]) -> list[str]:
    """``ids`` and their ancestors, each once, oldest first. Each snapshot is followed once,
    so a long lineage costs its length, not its square."""
    out: list[str] = []
    seen: set[str] = set()
    for id in ids:
        line = []
        cur: str | None = id
        while cur is not None and cur not in seen:
            line.append(cur)
            seen.add(cur)
            cur = parent_of(cur)
        out.extend(reversed(line))
    return out


# -- pull ------------------------------------------------------------------------------------
class PackReader:
    """Objects of the remote by id, through a small cache of downloaded, verified packs.
    ``prefetch`` starts downloads of the packs of objects needed soon, up to ``DOWNLOADS``
    at once on a thread pool, verified there too; ``close`` waits for those in flight.
    ``lock``, the reader's, is refreshed at every object read."""

    def __init__(
        self,
        store: ObjectStore,
        index: RemoteIndex,
        stats: TransferStats,
        lock: RemoteLock | None = None,
    ) -> None:
        self.store = store
        self.lock = lock
        self.where = store.spec.describe()
        self.index = index
        self.stats = stats
        self._cache: OrderedDict[str, dict[bytes, tuple[bytes, bytes]]] = OrderedDict()
        self._loading: dict[str, Future[tuple[int, dict[bytes, tuple[bytes, bytes]]]]] = {}
        self._pool = ThreadPoolExecutor(DOWNLOADS, thread_name_prefix="cascowfs-pull")
        self.on_received: Callable[[int], None] = lambda n: None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def prefetch(self, oids: Iterable[bytes]) -> None:
        for oid in oids:
            if len(self._loading) >= DOWNLOADS:
                return
            pack = self.index.packs.get(oid)
            if pack is not None and pack not in self._cache and pack not in self._loading:
                self._loading[pack] = self._pool.submit(self._load, pack)

    def _load(self, pack: str) -> tuple[int, dict[bytes, tuple[bytes, bytes]]]:
        size = self.index.sizes.get(pack, PACK_BYTES_MAX)
        try:
            data = self.store.get(pack_key(pack), max_bytes=size)
        except NotFoundError:
            raise StoreIOError(
                f"remote {self.where}: {pack_key(pack)}, named by an index, is missing"
            ) from None
        body = self.index.bodies.get(pack, packs.PACK_BODY_MAX)
        pack_objects = read_pack(data, pack, self.where, body)
        objects = {o: (kind, payload) for kind, o, payload in pack_objects}
        return len(data), objects

    def get(self, oid: bytes, snapshot: str) -> tuple[bytes, bytes]:
        if self.lock is not None:
            self.lock.refresh()
        pack = self.index.packs.get(oid)
        if pack is None:
            raise StoreIOError(
                f"remote {self.where}: object {oid.hex()} of snapshot {snapshot} is in no pack "
                "an index names"
            )
        objects = self._cache.get(pack)
        if objects is None:
            loading = self._loading.pop(pack, None)
            size, objects = loading.result() if loading is not None else self._load(pack)
            self.stats.bytes += size
            self.stats.packs += 1
            self.on_received(size)
            self._cache[pack] = objects
            if len(self._cache) > PACKS_CACHED:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(pack)
        found = objects.get(oid)
        if found is None:
            raise StoreIOError(
                f"remote {self.where}: object {oid.hex()} is not in {pack_key(pack)} as its "
                "index says"
            )
        return found


def pull(
    sm,
    store: ObjectStore,
    ids: Iterable[str],
    *,
    with_ancestors: bool = False,
    progress: bool = False,
) -> TransferStats:
    """Fetch snapshots ``ids`` from ``store`` into ``sm``, labels and parents as they were
    pushed; ``with_ancestors``: their ancestors too (oldest first), those the store lacks."""
    ids = [check_snapshot_id(i) for i in ids]
    stats = TransferStats()
    with locked(store, SHARED) as lock:
        refs: dict[str, RemoteSnapshot] = {}

        def ref(id: str) -> RemoteSnapshot:
            if id not in refs:
                lock.refresh()  # a long lineage is a read each
                refs[id] = read_ref(store, id)
            return refs[id]

        for id in ids:
            ref(id)  # ENOENT naming the remote before anything is fetched
        if with_ancestors:
            remote_ids = set(list_refs(store))
            ids = _with_ancestors(
                ids,
                lambda i: (
                    ref(i).parent
                    if ref(i).parent in remote_ids and not sm.has_snapshot(ref(i).parent)
                    else None
                ),
            )
        _refuse_parent_loops(sm, ids, ref, store.spec.describe())
        index = read_indexes(store, index_cache(sm, store.spec.url), lock)
        stats.index_read += index.bytes_read
        reader = PackReader(store, index, stats, lock)
        bar_title = f"pull from {store.spec.name}"
        with contextlib.closing(reader), progress_bar(progress, 0, bar_title) as bar:
            reader.on_received = bar
            for id in ids:
                snap = ref(id)
                if sm.has_snapshot(id):
                    if sm.snapshot(id).root != snap.root:
                        raise ExistsError(
                            f"snapshot {id} exists here with another tree than on remote "
                            f"{store.spec.describe()}"
                        )
                    stats.skipped.append(id)
                    continue

                def fetch(add, snap: RemoteSnapshot = snap) -> None:
                    stats.objects += _receive_objects(sm, snap, reader, add)

                sm.receive_snapshot(
                    id, snap.root, snap.parent, snap.labels, snap.created_ns, fetch, snap.obs
                )
                stats.snapshots.append(id)
    return stats


def _refuse_parent_loops(
    sm, ids: list[str], ref: Callable[[str], RemoteSnapshot], where: str
) -> None:
    """EIO naming the ref, before anything is fetched, if a snapshot of the pull would be its
    own ancestor: its ref names itself as parent, or a snapshot that descends from it, here
    or among the refs pulled with it (two refs naming each other)."""
    coming = {id: ref(id).parent for id in ids if not sm.has_snapshot(id)}

    def parent_of(id: str) -> str | None:
        if id in coming:
            return coming[id]
        return sm.snapshot(id).parent if sm.has_snapshot(id) else None

    for loop in parent_loops(coming, parent_of):
        first = next((i for i, sid in enumerate(loop) if sid in coming), None)
        if first is None:
            continue  # a loop of the store's own (fsck reports it), which no ref closes
        loop = [*loop[first:-1], *loop[:first], loop[first]]
        raise StoreIOError(
            f"remote {where}: {ref_key(loop[0])} would make snapshot {loop[0]} its own "
            f"ancestor (parents {' -> '.join(loop)})"
        )


def _receive_objects(sm, snap: RemoteSnapshot, reader: PackReader, add) -> int:
    """Hand every object under the snapshot's roots (``RemoteSnapshot.roots``) that ``sm``
    lacks to ``add``, children before parents, checking what was pulled (``checks.py``);
    returns how many."""
    count = 0
    seen: set[bytes] = set()
    root = bytes.fromhex(snap.root)
    pulled = PulledTrees(reader.where, snap.id, snap.obs)
    stack: list[tuple[bytes, tuple[bytes, bytes] | None]] = [(r, None) for r in snap.roots()]
    while stack:
        oid, loaded = stack.pop()
        if loaded is None:
            if oid in seen or sm.has_object(oid):
                continue
            seen.add(oid)
            kind, payload = reader.get(oid, snap.id)
            pulled.take(oid, kind, payload, superroot=oid == root)
            children = payload_children(kind, payload)
            if children:
                stack.append((oid, (kind, payload)))
                stack.extend((child, None) for child in children)
                # the stack takes the last child first; one seen is on its way to the store
                # (perhaps not there yet) and is never read again: its pack is not fetched
                reader.prefetch(
                    c for c in reversed(children) if c not in seen and not sm.has_object(c)
                )
                continue
            loaded = (kind, payload)
        add([(oid, value_of_payload(*loaded))])
        count += 1
    pulled.check_objects(sm.trees)
    pulled.check_link_groups(root, sm.trees)
    return count


def list_snapshots(store: ObjectStore) -> list[RemoteSnapshot]:
    return [read_ref(store, id) for id in list_refs(store)]


def forget(store: ObjectStore, id: str) -> None:
    """Delete snapshot ``id``'s ref: its objects stay until a prune finds them unreachable.
    The ref is not read, only listed: one that does not decode (damaged, or a newer
    version's) is what most needs forgetting, as a prune fails on it."""
    key = ref_key(check_snapshot_id(id))
    if id not in list_refs(store):
        raise NotFoundError(f"remote {store.spec.describe()}: no object {key}")
    store.delete(key)
