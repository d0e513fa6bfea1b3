"""The last operations the daemon ran, as JSON Lines: what ``MNT/events`` serves.

A reader of ``MNT/events`` may be a person running ``tail -f``, a monitor polling, or a
pipeline feeding a log store; each wants every line once, in order, and valid JSON whatever a
caller named. So every operation becomes one encoded line at once, with a sequence number,
in a ring of the last ``EVENTS_KEPT``; an open file remembers the sequence number it has read
up to and, reading again at its end, gets the lines appended since (what ``tail -f`` does).

Names come from callers (``mkdir MNT/branches/<anything>`` arrives as raw bytes, decoded with
``surrogateescape``), so they may hold newlines, quotes or bytes that are not UTF-8. Every line
is pure ASCII JSON on one line: ``json.dumps`` escapes quotes and controls, and a byte that is
not UTF-8 is shown as the text ``\\xNN`` (``printable``), since a lone surrogate escape
(``\\udcff``) is refused by strict JSON parsers.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

EVENTS_KEPT = 1000


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

    def as_dict(self) -> dict:
        return {
            "time": rfc3339(self.time_ns),
            "time_ns": self.time_ns,
            "op": printable(self.op),
            "names": [printable(n) for n in self.names],
            "result": self.result,
            "latency_ms": round(self.latency_ms, 3),
            "id": printable(self.id) if self.id is not None else None,
        }

    def json_line(self) -> bytes:
        return json.dumps(self.as_dict(), separators=(",", ":")).encode("ascii") + b"\n"


class EventRing:
    """The last ``EVENTS_KEPT`` events, encoded, numbered from 0 in the order appended.

    Appended to by the FUSE thread and read from it; the lock keeps ``lines_since`` exact if a
    worker thread ever appends."""

    def __init__(self, kept: int = EVENTS_KEPT) -> None:
        self._lines: deque[bytes] = deque(maxlen=kept)
        self._next = 0  # sequence number of the next event
        self._lock = threading.Lock()
        self.bytes_appended = 0  # bytes of every line ever appended: grows like a log file
        self.changed_ns = time.time_ns()

    def append(self, event: OperationEvent) -> None:
        line = event.json_line()
        with self._lock:
            self._lines.append(line)
            self._next += 1
            self.bytes_appended += len(line)
            self.changed_ns = time.time_ns()

    def oldest(self) -> int:
        """The sequence number of the oldest event kept."""
        with self._lock:
            return self._next - len(self._lines)

    def lines_since(self, seq: int) -> tuple[bytes, int]:
        """The lines from sequence number ``seq`` on (those still kept), and the number to
        ask from next time."""
        with self._lock:
            first = self._next - len(self._lines)
            skip = max(seq - first, 0)
            lines = [self._lines[i] for i in range(skip, len(self._lines))]
            return b"".join(lines), self._next


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
