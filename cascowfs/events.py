"""The last operations the daemon ran, as JSON Lines: what ``MNT/events`` serves.

A reader of ``MNT/events`` may be a person running ``tail -f``, a monitor polling, or a
pipeline feeding a log store; each wants every line once, in order, and valid JSON whatever a
caller named. So every operation becomes one encoded line at once, with a sequence number,
in a ring of the last ``EVENTS_KEPT``; an open file remembers the sequence number it has read
up to and, reading again at its end, gets the lines appended since (what ``tail -f`` does).

Any user may write to ``ctl`` and ``mkdir`` in ``branches/``, and a caller outside root and
the admin group gets EPERM for every change (or runs a query): thousands a second, which
would push every real operation out of the ring. So an outsider's event names its ``uid``
and is kept in a ring of its own, of the last ``OUTSIDER_EVENTS_KEPT``: past it, the oldest
outsider's event goes, and each outsider's line says in ``dropped`` how many went so far;
the operations of root and the admin group keep their ``EVENTS_KEPT``. A reader gets both
in the order they happened.

Names come from callers (``mkdir MNT/branches/<anything>`` arrives as raw bytes, decoded with
``surrogateescape``), so they may hold newlines, quotes or bytes that are not UTF-8. Every line
is pure ASCII JSON on one line: ``json.dumps`` escapes quotes and controls, and a byte that is
not UTF-8 is shown as the text ``\\xNN`` (``printable``), since a lone surrogate escape
(``\\udcff``) is refused by strict JSON parsers.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

T = TypeVar("T")

EVENTS_KEPT = 1000
OUTSIDER_EVENTS_KEPT = 100  # of callers outside root and the admin group


def printable(text: str) -> str:
    """``text`` as valid Unicode: a byte that a ``surrogateescape`` decoding kept (it was not
    UTF-8) becomes the text ``\\xNN``, any other lone surrogate the text ``\\uNNNN``."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(_shown_char(c) for c in text)


def _shown_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's: the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return char


def rfc3339(time_ns: int) -> str:
    """UTC time with microseconds, as ``2026-12-05T16:54:23.123456Z``."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1000:06d}Z"


@dataclass(frozen=True, slots=True)
class OperationEvent:
    """One operation as ``MNT/events`` and the operation log show it."""

    time_ns: int  # when it started
    op: str  # the command's verb: branch, commit, discard, ...
    names: Sequence[str]  # the branch names (and paths) it was given, as given
    result: str  # "ok" or the errno's name
    latency_ms: float
    id: str | None  # the snapshot it made or acted on
    uid: int | None = None  # the caller's, if outside root and the admin group
    dropped: int = 0  # an outsider's: outsiders' events the ring had dropped when it came

    def as_dict(self) -> dict:
        out = {
            "time": rfc3339(self.time_ns),
            "time_ns": self.time_ns,
            "op": printable(self.op),
            "names": [printable(n) for n in self.names],
            "result": self.result,
            "latency_ms": round(self.latency_ms, 3),
            "id": printable(self.id) if self.id is not None else None,
        }
        if self.uid is not None:
            out.update(uid=self.uid, dropped=self.dropped)
        return out

    def json_line(self) -> bytes:
        return json.dumps(self.as_dict(), separators=(",", ":")).encode("ascii") + b"\n"


class SplitRing(Generic[T]):
    """The last ``kept`` items of root and the admin group and the last ``outsiders_kept``
    of other callers, numbered from 0 in the order appended (module docstring: outsiders
    cannot push the others out). Not locked: its owner holds its own lock around it."""

    def __init__(self, kept: int, outsiders_kept: int) -> None:
        # (sequence number, item), oldest first
        self.ours: deque[tuple[int, T]] = deque(maxlen=kept)
        self.outsiders: deque[tuple[int, T]] = deque(maxlen=outsiders_kept)
        self.next = 0  # sequence number of the next item

    def append(self, item: T, *, outsider: bool) -> None:
        (self.outsiders if outsider else self.ours).append((self.next, item))
        self.next += 1

    def outsiders_full(self) -> bool:
        """Whether the next outsider's item drops the oldest one."""
        return len(self.outsiders) == self.outsiders.maxlen

    def oldest(self) -> int:
        """The sequence number of the oldest item kept."""
        return min((ring[0][0] for ring in (self.ours, self.outsiders) if ring),
                   default=self.next)  # fmt: skip

    def since(self, seq: int = 0) -> list[T]:
        """The items from sequence number ``seq`` on (those still kept), in order."""
        merged = heapq.merge(_since(self.ours, seq), _since(self.outsiders, seq))
        return [item for _, item in merged]


class EventRing:
    """The last ``kept`` events of root and the admin group and the last ``outsiders_kept``
    of other callers (those with a ``uid``), encoded, numbered from 0 in the order appended.

    Appended to by the FUSE thread and read from it; the lock keeps ``lines_since`` exact if a
    worker thread ever appends."""

    def __init__(self, kept: int = EVENTS_KEPT, outsiders_kept: int = OUTSIDER_EVENTS_KEPT):
        self._ring: SplitRing[bytes] = SplitRing(kept, outsiders_kept)
        self.outsiders_dropped = 0
        self._lock = threading.Lock()
        self.bytes_appended = 0  # bytes of every line ever appended: grows like a log file
        self.changed_ns = time.time_ns()

    def append(self, event: OperationEvent) -> OperationEvent:
        """Keep ``event``; returns it as kept (an outsider's with its ``dropped``)."""
        with self._lock:
            if event.uid is not None:
                if self._ring.outsiders_full():
                    self.outsiders_dropped += 1
                event = replace(event, dropped=self.outsiders_dropped)
            line = event.json_line()
            self._ring.append(line, outsider=event.uid is not None)
            self.bytes_appended += len(line)
            self.changed_ns = time.time_ns()
            return event

    def oldest(self) -> int:
        """The sequence number of the oldest event kept."""
        with self._lock:
            return self._ring.oldest()

    def lines_since(self, seq: int) -> tuple[bytes, int]:
        """The lines from sequence number ``seq`` on (those still kept), in order, and the
        number to ask from next time."""
        with self._lock:
            return b"".join(self._ring.since(seq)), self._ring.next


def _since(ring: deque[tuple[int, T]], seq: int) -> list[tuple[int, T]]:
    """The entries of ``ring`` from sequence number ``seq`` on, walked from the newest: a
    reader keeping up asks for a few, not for the whole ring."""
    out = []
    for entry in reversed(ring):
        if entry[0] < seq:
            break
        out.append(entry)
    out.reverse()
    return out


@dataclass(eq=False)
class EventsReader:
    """An open ``MNT/events``: it reads the events kept at open, then any appended since.
    A read never blocks; at the end it returns nothing (EOF), as a growing log file does."""

    ring: EventRing
    next_seq: int
    pending: bytes = b""

    @classmethod
    def opened(cls, ring: EventRing) -> EventsReader:
        return cls(ring, ring.oldest())

    def read(self, size: int) -> bytes:
        if len(self.pending) < size:
            more, self.next_seq = self.ring.lines_since(self.next_seq)
            self.pending += more
        out, self.pending = self.pending[:size], self.pending[size:]
        return out
