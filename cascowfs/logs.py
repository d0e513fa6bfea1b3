"""The daemon's log lines: JSON Lines (the default) or text, and the command behind each.

A log store (journald's JSON export, Loki, Elasticsearch, ``jq``) reads one JSON object per
line without a parser of ours, so ``json`` is the default format: ``time``, ``level``,
``logger``, ``message``, and for an operation's own line its event's fields (``op``,
``names``, ``result``, ``latency_ms``, ``id``, as ``MNT/events`` shows them). ``text`` keeps
the one-line ``time logger LEVEL message`` form for a person reading a terminal.

A message holds names callers chose (a branch, a snapshot id, a path in a committed tree), and
a name may hold a newline, an escape sequence or bytes that are not UTF-8. Neither format lets
one forge a line or lose it: JSON escapes them, and the text format shows every character that
is not printable as ``repr`` would (``\\n``, ``\\x1b``, ``\\u202e``) and a byte that was not
UTF-8 as ``\\xNN`` (``one_line``); a traceback's lines follow its record indented, so a line
that starts at its first column always starts a record.

An operation runs in a worker thread that logs deep inside the engine, far from the command
that started it; ``current_command`` (a context variable, which trio hands on to the worker
thread) carries the command there, and every line logged at WARNING or above while it is set
names it, in both formats.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar

from .events import printable, rfc3339

LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# The ctl command (or file call) the current operation runs: its str() is the command, read
# when a line is logged (the operation learns it once it has parsed the caller's words).
current_command: ContextVar[object | None] = ContextVar("cascowfs_command", default=None)


def _command_of(record: logging.LogRecord) -> str | None:
    """The command a line names: given with it (``extra``), or the running operation's for
    a warning or an error."""
    given = getattr(record, "command", None)
    if given is not None:
        return given
    running = current_command.get() if record.levelno >= logging.WARNING else None
    return str(running) if running is not None else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line, ASCII only (controls, quotes and bytes that were not UTF-8
    all escaped), so a hostile name can neither break a line nor make it invalid JSON."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {
            "time": rfc3339(int(record.created * 1e9)),
            "level": record.levelname,
            "logger": record.name,
            "message": printable(record.getMessage()),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):  # an operation's line; "time" stays the line's own
            out.update((k, v) for k, v in event.items() if k != "time")
        command = _command_of(record)
        if command is not None:
            out["command"] = printable(command)
        if record.exc_info:
            out["exception"] = printable(self.formatException(record.exc_info))
        return json.dumps(out, separators=(",", ":"))


_SHOWN_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` with nothing a terminal or a line-based reader acts on: each character that is
    not printable (``str.isprintable``: controls, line and paragraph separators, format
    characters) escaped as ``repr`` shows it, and a byte that was not UTF-8 as ``\\xNN``
    (``printable``)."""
    text = printable(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _shown(c) for c in text)


def _shown(char: str) -> str:
    if char in _SHOWN_CONTROLS:
        return _SHOWN_CONTROLS[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


class TextFormatter(logging.Formatter):
    """The text format, one line a record (``one_line``) but for a traceback's, which follow
    it indented; a warning or error inside an operation ends with its command. ``fmt``: the
    daemon's ``TEXT_FORMAT``, or the CLI's ``cascowfs: %(message)s``."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        command = _command_of(record)
        if command is not None and getattr(record, "command", None) is None:
            line += f" [command: {printable(command)!r}]"
        blocks = []
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            line += "".join(f"\n    {one_line(part)}" for part in block.split("\n"))
        return line


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` (one of ``LOG_FORMATS``)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}; known: {', '.join(LOG_FORMATS)}")
