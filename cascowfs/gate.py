"""The operation gate: which state changes may run at the same time as which.

Mutations of a store run side by side; garbage collection, WAL checkpoints and fsck of a live
store need every other one finished, and a collection cycle needs the ones running when it
starts to have finished (they may have stored objects before it began protecting them).
Operations on one branch run one at a time (``NamedLocks``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class OpGate:
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
            ticket = self._enter()
        try:
            yield
        finally:
            self.leave(ticket)

    def try_enter(self) -> int | None:
        """``running`` for a caller that must not wait (the trio thread): a ticket to
        ``leave`` with, or None while an exclusive operation holds the gate."""
        with self._cond:
            return None if self._exclusive else self._enter()

    def _enter(self) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets.add(ticket)
        return ticket

    def leave(self, ticket: int) -> None:
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


@dataclass(eq=False, slots=True)
class _NamedLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # holding it or waiting for it


class NamedLocks:
    """A lock per name, kept only while someone holds it or waits for it: a search names
    thousands of branches an hour, and a lock kept for every name ever used grew the daemon
    for as long as it ran."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, _NamedLock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextmanager
    def holding(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold ``name``'s lock; yields False, holding nothing, if ``wait`` is False and
        another holds it."""
        with self._guard:
            named = self._locks.get(name)
            if named is None:
                named = self._locks[name] = _NamedLock()
            named.users += 1
        try:
            if not named.lock.acquire(blocking=wait):
                yield False
                return
            try:
                yield True
            finally:
                named.lock.release()
        finally:
            with self._guard:
                named.users -= 1
                if not named.users:
                    del self._locks[name]
