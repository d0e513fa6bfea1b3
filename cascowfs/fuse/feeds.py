"""``MNT/metrics`` and ``MNT/events``, and the record of every operation behind them.

Every state change a caller asks for (a ``ctl`` command, a write to a branch file, ``mkdir``
or ``rmdir``) runs inside ``Feeds.operation``, which times it and, when it ends, makes one
record of it: an observation of the latency histogram (and of the errors counter if it
failed), a line in ``MNT/events``, and one log line. The op is the command's verb, so a verb
added to ``wire.py`` is measured, listed and logged with no change here.

Any local user may write to ``ctl`` (and get EPERM) thousands of times a second, each line up
to 64 KiB. So a record shows at most ``SHOWN_COMMAND_CHARS`` of a command and of each name
(a 64 KiB refused ``import`` made a log line of 1.2 MB, its names and command each escaped
into JSON), and the operations of a uid outside root and the admin group are logged at most
once per ``OUTSIDER_LOG_EVERY`` seconds at their level, the others at DEBUG: under journald's
rate limit, a flood of refusals hid every other line of the daemon. Their events are all in
``MNT/events`` (in a ring of their own: events.py).

Both files are generated, never stored, and read-only (mode 0444; an open for writing is
refused with EACCES, root's included):

* ``metrics`` is generated whole when it is opened, so every read of one open file sees one
  consistent scrape. The file is ``direct_io`` with size 0, like a file in /proc: the size is
  not known before the open, and readers read to EOF (``cat``, Prometheus' text parsers,
  node_exporter's textfile collector).
* ``events`` is a stream (``direct_io``, not seekable): an open file reads the events kept
  at open, then, reading again at its end, those appended since. Its size is the number of
  bytes of events ever appended, and its mtime the time of the last one, so that a reader
  polling ``fstat`` (``tail -f`` on a FUSE file does) sees it grow and never shrink.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyfuse3

from .. import wire
from ..errors import CascowfsError
from ..events import EventRing, EventsReader, OperationEvent
from ..logs import current_command
from ..metrics import DaemonMetrics
from ..state import StateManager
from . import control
from .inodes import InodeTable, Node

log = logging.getLogger("cascowfs.ops")

METRICS_INO = 8
EVENTS_INO = 9
MODE_FEED = stat.S_IFREG | 0o444
SHOWN_COMMAND_CHARS = 300  # of a command (and of each name it gives), in its event and log line
SHOWN_MESSAGE_CHARS = 1000  # of a failure's message, in its log line
OUTSIDER_LOG_EVERY = 60.0  # seconds between two logged lines of one outsider uid's operations


@dataclass(eq=False, slots=True)
class FeedNode(Node):
    """``metrics`` or ``events`` at the mount's root."""

    which: str = ""


@dataclass(eq=False)
class MetricsHandle:
    content: bytes


@dataclass
class OperationRecord:
    """What ``Feeds.operation`` records of the operation its block runs; the block fills in
    what it learns (the parsed command, the snapshot made)."""

    op: str
    names: list[str] = field(default_factory=list)
    command: str = ""
    id: str | None = None
    uid: int | None = None  # the caller's, if outside root and the admin group (events.py)
    # set once the store is asked: from then on a failure may have changed part of it (a
    # pull of several snapshots); before (a refusal, a malformed command), nothing changed
    ran: bool = False

    def __str__(self) -> str:
        return self.command

    def parsed(self, cmd: wire.Command) -> None:
        self.op = cmd.verb
        self.names = [shown(w) for w in (cmd.name, cmd.src) if w is not None]
        self.command = shown(cmd.line())
        self.id = cmd.id

    def finished(self, result: str) -> None:
        """A commit given no id made one: its reply names it."""
        if self.op == "commit" and self.id is None:
            self.id = result or None


def unparsed(buf: bytes, uid: int | None = None) -> OperationRecord:
    """The record of a ctl write before it is parsed: its verb if it starts with one
    (``uid``: the caller's, if outside root and the admin group)."""
    text = buf.decode("utf-8", "surrogateescape").strip()
    first = text.split(maxsplit=1)[0] if text else ""
    return OperationRecord(
        first if first in wire.VERBS else "unknown", command=shown(text), uid=uid
    )


def shown(text: str, limit: int = SHOWN_COMMAND_CHARS) -> str:
    """``text`` as an event or a log line shows it: its first ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


class Feeds:
    """The two files, the metrics and the event ring of one daemon."""

    def __init__(self, sm: StateManager, table: InodeTable, root: Node) -> None:
        self.metrics = DaemonMetrics(sm)
        self.events = EventRing()
        # Operations other than queries that ended after asking the store (``ran``): a
        # generated file made after the n-th shows at least what it changed
        # (``SharedContent``). A refusal changed nothing: counted, any user's EPERM loop made
        # every open of ``episodes`` generate it anew.
        self.changes = 0
        # outsider uid -> when its operations were last logged at their level, and how many
        # went to DEBUG since
        self._logged: dict[int, tuple[float, int]] = {}
        self.nodes = {
            name: table.add_pinned(FeedNode(ino, name=name, parent=root, which=name.decode()))
            for name, ino in ((b"metrics", METRICS_INO), (b"events", EVENTS_INO))
        }

    @contextmanager
    def operation(self, record: OperationRecord) -> Iterator[OperationRecord]:
        """Time the block and record it as ``record`` says when it ends (on the FUSE thread).
        While it runs, the logs' lines name its command."""
        started_ns = time.time_ns()
        started = time.perf_counter()
        token = current_command.set(record)
        try:
            yield record
        except Exception as exc:
            code, message = control.error_of(exc)
            unexpected = not isinstance(exc, (CascowfsError, OSError))
            self._record(record, started_ns, started, code, message, unexpected)
            raise
        else:
            self._record(record, started_ns, started, 0, "", False)
        finally:
            current_command.reset(token)

    def _record(
        self,
        record: OperationRecord,
        started_ns: int,
        started: float,
        code: int,
        message: str,
        unexpected: bool,
    ) -> None:
        seconds = time.perf_counter() - started
        if (code == 0 or record.ran) and record.op not in wire.QUERY_VERBS:
            self.changes += 1
        result = errno.errorcode.get(code, str(code)) if code else "ok"
        event = OperationEvent(
            started_ns, record.op, record.names, result, seconds * 1e3, record.id, record.uid
        )
        self.metrics.observe(record.op, result, seconds)
        if record.op == "prune" and code == 0 and record.id is not None:
            self.metrics.store.forget_snapshot(record.id)
        event = self.events.append(event)
        extra = {"event": event.as_dict(), "command": record.command}
        ms = seconds * 1e3
        level = logging.INFO if code == 0 else logging.ERROR if unexpected else logging.WARNING
        quieted = ""
        if record.uid is not None:
            level, quieted = self._outsider_level(record.uid, level)
        if code == 0:
            log.log(
                level, "%s ok in %.1f ms: %s%s", record.op, ms, record.command, quieted, extra=extra
            )
        else:
            log.log(
                level,
                "%s failed with %s in %.1f ms: %s: %s%s",
                record.op,
                result,
                ms,
                record.command,
                shown(message, SHOWN_MESSAGE_CHARS),
                quieted,
                extra=extra,
                exc_info=unexpected,
            )

    def _outsider_level(self, uid: int, level: int) -> tuple[int, str]:
        """The level of the line of an operation of ``uid``, outside root and the admin
        group: ``level`` for its first in ``OUTSIDER_LOG_EVERY`` seconds, DEBUG for the
        others; and what the line adds to say how many went to DEBUG before it."""
        now = time.monotonic()
        last, quiet = self._logged.get(uid, (-OUTSIDER_LOG_EVERY, 0))
        if now - last < OUTSIDER_LOG_EVERY:
            self._logged[uid] = (last, quiet + 1)
            return logging.DEBUG, ""
        self._logged[uid] = (now, 0)
        if not quiet:
            return level, ""
        return level, (
            f" (and {quiet} more operations of uid {uid} logged at DEBUG since its last line;"
            " MNT/events lists each)"
        )

    def attrs(self, node: FeedNode, gid: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.st_mode, attr.st_nlink = MODE_FEED, 1
        attr.st_uid, attr.st_gid = 0, gid
        attr.st_blksize = 4096
        attr.attr_timeout = 0  # both change all the time
        attr.entry_timeout = 86400.0
        if node.which == "events":
            attr.st_size = self.events.bytes_appended
            mtime = self.events.changed_ns
        else:
            mtime = time.time_ns()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    async def open(
        self, node: FeedNode, flags: int, run: Callable[[Callable[[], bytes]], Awaitable[bytes]]
    ) -> tuple[MetricsHandle | EventsReader, bool]:
        """The handle of an open of ``node``, and whether it is a stream (not seekable);
        ``run`` runs a blocking call in a worker thread."""
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EACCES)
        if node.which == "events":
            return EventsReader.opened(self.events), True
        # a scrape reads the store: off the FUSE thread
        content = await run(self.metrics.exposition)
        return MetricsHandle(content), False


FEED_HANDLES = (MetricsHandle, EventsReader)


def read_feed(handle: MetricsHandle | EventsReader, off: int, size: int) -> bytes:
    if isinstance(handle, EventsReader):
        return handle.read(size)
    return handle.content[off : off + size]
