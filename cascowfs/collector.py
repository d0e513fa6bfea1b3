"""Mark-and-sweep collection of CAS objects (store formats 5 and later).

An object lives while a live root reaches it: a snapshot's root, a branch's base tree, or the
tree a layer record shows. Nothing is counted when operations run; a collection cycle instead

1. starts *protecting*: from now on every object an operation stores (new or already there) is
   remembered (``ContentStore.protect``), and waits until every operation that was running
   when it started has finished (those may have stored objects before protection began);
2. *marks* what the live roots reach, on one LMDB read snapshot taken after that wait, in a
   child process (``python -m cascowfs.collector``) so that the daemon's GIL and LMDB's one
   writer are not held for it, and lists every unmarked object of that snapshot, parents
   before children;
3. *sweeps* that list a slice per write transaction, skipping the protected objects and every
   listed object one of them reaches.

Why this is exact: any reference an operation creates after the snapshot either names an
object it stored (protected), or is copied from something live at that moment (a branch's base
or parent snapshot, which cannot be pruned under it); by induction from the snapshot, whose
live roots reach only marked objects, nothing live ever names an unprotected unmarked object.
Deleting parents before children means an object that a later store finds already present
never points at something already gone. What it costs, against refcounts: no per-operation
work at all (refcounts make a commit on the linux tree queue ~200 updates on random LMDB
pages, and its prune as many again), for a marking pass over the live objects per cycle in
another process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable

import lmdb

from .cas import ID_SIZE, TYPE_CHUNK, ContentStore, children_of
from .catalog import STORE_FORMAT, Catalog, Counter
from .crashpoints import crash_point
from .errors import CascowfsError, StoreIOError
from .gate import OpGate
from .metadb import MetaDB, open_reader
from .progress import progress_bar
from .tuning import Tuning

log = logging.getLogger("cascowfs.collector")

# The marking child runs at this niceness: it holds no lock the daemon needs, and the agents'
# work comes first.
MARKER_NICE = 10


def reach(
    txn: lmdb.Transaction,
    objects_db,
    starts: Iterable[bytes],
    within: set[bytes] | None = None,
    release: Callable[[], None] = lambda: None,
) -> set[bytes]:
    """``starts`` and every object they reach, through objects of ``within`` only if it is
    given: from the live roots, the marking; from what was stored again since a cycle's
    snapshot, what its sweep must keep. A missing object is reached but has no children.
    ``release`` is called every ``RELEASE_EVERY`` objects read (each read maps its value)."""
    reached: set[bytes] = set()
    stack = list(starts)
    while stack:
        oid = stack.pop()
        if oid in reached:
            continue
        reached.add(oid)
        if len(reached) % RELEASE_EVERY == 0:
            release()
        value = txn.get(oid, db=objects_db)
        if value is None:
            continue
        children = [
            c for c in children_of(value) if c not in reached and (within is None or c in within)
        ]
        if value[:1] == TYPE_CHUNK:
            # a chunk's one child is its pack, which has none: not read, so that marking
            # does not bring every pack of the store into this process's memory
            reached.update(children)
        else:
            stack.extend(children)
    return reached


# objects walked between two releases of the pages the walk mapped (``release``): a read may
# map a whole large folio of the data file around the value (cas.MAPPED_PER_TOUCH)
RELEASE_EVERY = 64


def garbage(
    txn: lmdb.Transaction, dbs: dict, release: Callable[[], None] = lambda: None
) -> list[bytes]:
    """Every object the live roots do not reach, parents before children (see the module
    docstring: an object found present must never point at one already deleted).
    ``release`` is called every ``RELEASE_EVERY`` objects of the walk over every id (which
    maps every object's value: ``MetaDB.release_mapped_pages``)."""
    objects_db = dbs["objects"]
    live = reach(txn, objects_db, Catalog(dbs).live_roots(txn), release=release)
    dead = []
    keys = txn.cursor(db=objects_db).iternext(keys=True, values=False)
    for n, key in enumerate(keys, 1):
        if bytes(key) not in live:
            dead.append(bytes(key))
        if n % RELEASE_EVERY == 0:
            release()
    release()
    return parents_first(txn, objects_db, dead)


def parents_first(txn: lmdb.Transaction, objects_db, ids: list[bytes]) -> list[bytes]:
    """``ids`` in an order where each comes before every other one of ``ids`` it reaches
    (reverse post-order of a depth-first walk, the walk staying inside ``ids``)."""
    wanted = set(ids)
    done: set[bytes] = set()
    post: list[bytes] = []
    for start in ids:
        if start in done:
            continue
        done.add(start)
        stack = [(start, iter(_children_within(txn, objects_db, start, wanted)))]
        while stack:
            oid, children = stack[-1]
            for child in children:
                if child not in done:
                    done.add(child)
                    stack.append((child, iter(_children_within(txn, objects_db, child, wanted))))
                    break
            else:
                stack.pop()
                post.append(oid)
    post.reverse()
    return post


def _children_within(
    txn: lmdb.Transaction, objects_db, oid: bytes, wanted: set[bytes]
) -> list[bytes]:
    value = txn.get(oid, db=objects_db)
    return [c for c in children_of(value) if c in wanted] if value is not None else []


def sweep(
    db: MetaDB,
    content: ContentStore,
    dead: list[bytes],
    slice_size: int,
    *,
    stop: Callable[[], bool] = lambda: False,
    done: Callable[[int], None] = lambda n: None,
) -> tuple[int, bool]:
    """Delete ``dead`` (parents first) ``slice_size`` objects per write transaction, keeping
    what was stored since the cycle began protecting and every object of ``dead`` those
    reach. Returns the number deleted and whether the sweep finished (``stop()`` ends it
    early; what is left stays garbage for a later cycle)."""
    objects = db.db("objects")
    candidates = set(dead)
    removed = 0

    def delete(part: list[bytes]) -> Callable[[lmdb.Transaction], int]:
        def run(txn: lmdb.Transaction) -> int:
            keep = reach(txn, objects, content.protected_among(candidates), candidates)
            return sum(1 for oid in part if oid not in keep and txn.delete(oid, db=objects))

        return run

    crash_point("collect.marked")
    for i in range(0, len(dead), slice_size):
        if stop():
            return removed, False
        part = dead[i : i + slice_size]
        removed += db.write(delete(part), "collecting garbage")
        db.release_mapped_pages()  # deleting a value maps it
        done(len(part))
        crash_point("collect.swept")
    return removed, True


# -- the marking child ------------------------------------------------------------------------
def garbage_from_child(meta_dir: str, cancelled: Callable[[], bool] = lambda: False) -> list[bytes]:
    """Run ``garbage`` in a child process on its own read snapshot of ``meta_dir``; stop
    it (and raise) if ``cancelled()`` turns true meanwhile (the store is closing)."""
    # the child must import this very package, however the daemon found it
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p
        ),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascowfs.collector", meta_dir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    while True:
        if cancelled():
            proc.kill()
            proc.communicate()
            raise StoreIOError("collection cancelled: the store is closing")
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.returncode != 0:
        raise StoreIOError(
            f"the collector's marking process failed ({proc.returncode}): "
            f"{err.decode(errors='replace').strip()[-500:]}"
        )
    if len(out) % ID_SIZE:
        raise StoreIOError("the collector's marking process gave a truncated list")
    return [out[i : i + ID_SIZE] for i in range(0, len(out), ID_SIZE)]


def _child_main(meta_dir: str) -> None:
    os.nice(max(0, MARKER_NICE - os.nice(0)))
    env, dbs = open_reader(meta_dir)
    try:
        with env.begin(buffers=False) as txn:
            dead = garbage(txn, dbs)
    finally:
        env.close()
    sys.stdout.buffer.write(b"".join(dead))


class Collector:
    """Collection cycles of one open store, and the thread that runs them in the background:
    a while (``Tuning.collect_after_seconds``) after garbage appeared, a cycle whose marking
    runs in a child process. It waits for nothing else, and nothing waits for it."""

    def __init__(
        self,
        db: MetaDB,
        catalog: Catalog,
        content: ContentStore,
        gate: OpGate,
        closing: threading.Event,
        tuning: Tuning,
    ) -> None:
        self._db = db
        self._catalog = catalog
        self._content = content
        self._gate = gate
        self._closing = closing
        self._tuning = tuning
        self._wanted = threading.Event()
        self._lock = threading.Lock()  # one collection cycle at a time
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cascowfs-collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the background thread (the store's ``closing`` event is set): a cycle under
        way stops after its current slice, and its garbage stays pending."""
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()

    def note_garbage(self, txn: lmdb.Transaction) -> None:
        """Objects may have become unreachable (a root dropped, an op failed): a collection
        is pending until a cycle whose snapshot includes this change has swept. Wakes the
        collector (at worst for nothing, if this transaction is then undone)."""
        self._catalog.set_counter(
            txn, Counter.GARBAGE_SEQ, self._catalog.counter(txn, Counter.GARBAGE_SEQ) + 1
        )
        self._wanted.set()

    def pending(self, txn: lmdb.Transaction | None = None) -> bool:
        """Has garbage appeared since the last completed collection's snapshot? (A store of
        an older format, looked at read-only, may hold garbage its refcount queue would have
        deleted.)"""
        if txn is None:
            with self._db.read() as txn:
                return self.pending(txn)
        if self._catalog.format(txn) != str(STORE_FORMAT).encode():
            return True
        return self._catalog.counter(txn, Counter.GARBAGE_SEQ) > self._catalog.counter(
            txn, Counter.COLLECTED_SEQ
        )

    def collect(self, *, in_child: bool = False, progress: bool = False) -> int:
        """One collection cycle: delete every object no live root reaches. ``in_child``: the
        background cycle, which marks in a child process, not in this thread, and stops at
        close. Returns the number of objects deleted."""
        with self._lock:
            self._content.protect()
            try:
                self._gate.wait_for_running()  # they may have stored objects unprotected
                with self._db.read() as txn:
                    seen = self._catalog.counter(txn, Counter.GARBAGE_SEQ)
                if in_child:
                    try:
                        dead = garbage_from_child(str(self._db.path), self._closing.is_set)
                    finally:
                        self._db.release_dead_readers()  # a child killed by close
                else:
                    with self._db.read() as txn:
                        dead = garbage(txn, self._db.dbs, self._db.release_mapped_pages)
                # the background cycle's sweep stops at close; what is left stays pending
                stop = self._closing.is_set if in_child else (lambda: False)
                with progress_bar(progress, len(dead), "collecting", unit="obj") as bar:
                    removed, finished = sweep(
                        self._db, self._content, dead, self._tuning.sweep_slice, stop=stop, done=bar
                    )
            finally:
                self._content.unprotect()

            def mark_collected(txn: lmdb.Transaction) -> None:
                if self._catalog.counter(txn, Counter.COLLECTED_SEQ) < seen:
                    self._catalog.set_counter(txn, Counter.COLLECTED_SEQ, seen)

            if finished:
                self._db.write(mark_collected, "recording a collection")
            return removed

    def _loop(self) -> None:
        if self.pending():
            self._wanted.set()  # garbage a previous run left uncollected
        while True:
            self._wanted.wait()
            if self._closing.wait(self._tuning.collect_after_seconds):
                return
            self._wanted.clear()  # garbage from here on gets another cycle
            try:
                self.collect(in_child=True)
            except (CascowfsError, OSError) as exc:
                if self._closing.is_set():
                    return  # cancelled; the pending mark is durable, the next open retries
                # the pending mark is durable: the next cycle, or the next open, retries
                log.warning(
                    "%s: collecting garbage failed (retried later): %s", self._db.path.parent, exc
                )
                self._wanted.set()


if __name__ == "__main__":
    _child_main(sys.argv[1])
