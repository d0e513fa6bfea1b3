"""Who may run beside a remote prune: nobody.

Pushes and pulls take a *shared* lock, a prune an *exclusive* one. A lock is an object
``locks/<kind>-<random>`` holding its holder's host, pid and time; taking one is writing
it and then listing the others: if one of a kind that conflicts is there (and fresh), the
new lock is deleted again, and the caller tries again later or gets EBUSY naming the
holder. Two takers that
race both see each other (S3 lists are strongly consistent), so at worst both back off.
A lock older than ``stale_after`` seconds is the leftover of a killed process and is
ignored (a live holder rewrites its lock as it goes, well before that: ``refresh``, called
between the steps of its work, so a holder that hangs lets its lock go stale too).

A lock's age is the remote's word, not the holder's: the listing's time of its last write
against that of the taker's own lock, written a moment before, both set by the remote (the
S3 server, the directory's file system). So machines whose clocks disagree judge a lock
alike, and a lock whose body does not say its time (not JSON, not an object: no lock this
version wrote) ages as any other; it holds the others back as any lock does, named in the
EBUSY. The body's time is only for people reading it. A taker that fails in any way deletes
its own lock.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import BusyError, CascowfsError, NotFoundError
from .objectstore import LOCK_BYTES_MAX, Listed, ObjectStore, TooLargeError

STALE_AFTER = 30 * 60.0
SHARED_WAIT = 10 * 60.0
SHARED, EXCLUSIVE = "shared", "exclusive"


class RemoteLock:
    def __init__(self, store: ObjectStore, kind: str, stale_after: float | None = None) -> None:
        self.store = store
        self.kind = kind
        self.stale_after = STALE_AFTER if stale_after is None else stale_after
        self.key = f"locks/{kind}-{secrets.token_hex(8)}"
        self._written = 0.0

    def _write(self) -> None:
        self._written = time.monotonic()
        body = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self.store.put(self.key, json.dumps(body).encode())

    def take(self, wait: float = 0.0) -> None:
        """Take the lock; while a conflicting one is held, try again for up to ``wait``
        seconds, then EBUSY."""
        deadline = time.monotonic() + wait
        pause = 0.05
        while True:
            try:
                return self._try()
            except BusyError:
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(1.0, pause * 2)

    def _try(self) -> None:
        self._write()
        try:
            self._check_others()
        except BaseException:
            with contextlib.suppress(CascowfsError):  # the first error is the one to tell
                self.release()
            raise

    def _check_others(self) -> None:
        listing = self.store.list("locks/")
        now = _remote_now(listing, self.key)
        for listed in listing:
            if listed.key == self.key:
                continue
            other = listed.key.removeprefix("locks/").split("-", 1)[0]
            if self.kind == SHARED and other == SHARED:
                continue
            if now - listed.modified >= self.stale_after:
                continue  # stale: its holder has not rewritten it for too long
            holder = self._holder(listed)
            if holder is None:
                continue  # stale, or released meanwhile
            raise BusyError(
                f"remote {self.store.spec.describe()}: {listed.key} is held ({holder}); "
                f"a {'prune' if EXCLUSIVE in (self.kind, other) else 'transfer'} must wait"
            )

    def _holder(self, listed: Listed) -> str | None:
        """Who holds the fresh lock ``listed``, or None if it is gone."""
        try:
            raw = self.store.get(listed.key, max_bytes=LOCK_BYTES_MAX)
        except NotFoundError:  # released between the listing and the read
            return None
        except TooLargeError:  # no lock this version wrote: not read, held all the same
            return "a lock that does not decode: held until it is stale or deleted"
        try:
            body = json.loads(raw)
            written = body["time"]
            if type(written) not in (int, float) or not math.isfinite(written):
                raise TypeError(f"time {written!r}")
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            # no lock this version wrote (or JSON nested thousands deep): held all the same
            return "a lock that does not decode: held until it is stale or deleted"
        return f"pid {body.get('pid')} on {body.get('host')}"

    def refresh(self) -> None:
        """Rewrite the lock if a third of its life has gone. Cheap when it has not (a look at
        the clock): a holder calls it at every step of its work (a pack sent or read, an
        index read, a key deleted)."""
        if time.monotonic() - self._written > self.stale_after / 3:
            self._write()

    def release(self) -> None:
        self.store.delete(self.key)

    def delete_stale(self, factor: float = 2.0) -> int:
        """Delete the other locks not written for ``factor`` times ``stale_after`` (a killed
        holder's: every taker reads each listed lock, forever, if nobody deletes it); returns
        how many. Only for the holder of the exclusive lock, beside which no lock is held."""
        assert self.kind == EXCLUSIVE
        self._write()  # the remote's time now, and a fresh lock
        listing = self.store.list("locks/")
        now = _remote_now(listing, self.key)
        deleted = 0
        for listed in listing:
            if listed.key != self.key and now - listed.modified > factor * self.stale_after:
                self.store.delete(listed.key)
                deleted += 1
        return deleted


def _remote_now(listing: list[Listed], own: str) -> float:
    """The remote's time now: when it wrote lock ``own`` (a moment ago). The local clock only
    if the listing lacks it (a remote that lists what it did not keep)."""
    for listed in listing:
        if listed.key == own:
            return listed.modified
    return time.time()


@contextmanager
def locked(store: ObjectStore, kind: str, stale_after: float | None = None) -> Iterator[RemoteLock]:
    """The lock held for the block. A shared one waits out a prune (short, and rare); a
    prune backs off at once (it can run later)."""
    lock = RemoteLock(store, kind, stale_after)
    lock.take(SHARED_WAIT if kind == SHARED else 0.0)
    try:
        yield lock
    finally:
        lock.release()
