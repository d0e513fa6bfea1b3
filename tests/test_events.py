"""The event ring behind MNT/events and the log formats, without a mount: any name a caller
can send stays one line of valid JSON, the ring keeps the last EVENTS_KEPT, a reader gets
each line once."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs.events import EVENTS_KEPT, EventRing, EventsReader, OperationEvent, printable
from cascowfs.daemon import reopen_log_files, setup_logging
from cascowfs.logs import JsonFormatter, TextFormatter, current_command, formatter, one_line
from conftest import hypothesis_settings

pytestmark = pytest.mark.unit

# What a name can be: bytes from a file call (decoded as the daemon does), or any text,
# lone surrogates included.
names = st.one_of(
    st.binary(max_size=64).map(os.fsdecode),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=64),
)


def event(op: str = "commit", names_: tuple[str, ...] = ("b",), id: str | None = "s1"):
    return OperationEvent(1_700_000_000_123_456_789, op, names_, "ok", 1.5, id)


@hypothesis_settings(300)
@given(st.lists(names, max_size=4), names, st.one_of(st.none(), names))
def test_any_names_give_one_line_of_strict_json(given_names, op, id):
    line = OperationEvent(5, op, given_names, "EINVAL", 0.25, id).json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    parsed = json.loads(line)
    assert parsed["names"] == [printable(n) for n in given_names]
    assert parsed["op"] == printable(op)
    # strict: no lone surrogate survives into the parsed text
    json.dumps(parsed, ensure_ascii=False).encode("utf-8", "strict")


@hypothesis_settings(200)
@given(st.text(max_size=64))
def test_valid_unicode_names_are_kept_as_they_are(name):
    assert json.loads(event(names_=(name,)).json_line())["names"] == [name]


def test_bytes_that_are_not_utf8_are_shown_escaped():
    assert printable(os.fsdecode(b"a\xffb")) == "a\\xffb"
    assert printable("lone \ud800") == "lone \\ud800"


def test_event_fields_and_time():
    parsed = json.loads(event().json_line())
    assert parsed == {
        "time": "2023-11-14T22:13:20.123456Z",
        "time_ns": 1_700_000_000_123_456_789,
        "op": "commit",
        "names": ["b"],
        "result": "ok",
        "latency_ms": 1.5,
        "id": "s1",
    }


def test_ring_keeps_the_last_events_oldest_first():
    ring = EventRing()
    for i in range(EVENTS_KEPT + 7):
        ring.append(event(id=f"s{i}"))
    lines, _ = ring.lines_since(ring.oldest())
    ids = [json.loads(line)["id"] for line in lines.splitlines()]
    assert ids == [f"s{i}" for i in range(7, EVENTS_KEPT + 7)]
    assert ring.bytes_appended == sum(len(event(id=f"s{i}").json_line()) for i in range(1007))


def test_reader_gets_each_line_once_and_new_ones_after_eof():
    ring = EventRing(kept=3)
    for i in range(5):
        ring.append(event(id=f"s{i}"))
    reader = EventsReader.opened(ring)
    first = reader.read(10)  # a short read keeps the rest for the next one
    rest = reader.read(1 << 20)
    assert [json.loads(x)["id"] for x in (first + rest).splitlines()] == ["s2", "s3", "s4"]
    assert reader.read(1 << 20) == b""
    ring.append(event(id="s5"))
    assert json.loads(reader.read(1 << 20))["id"] == "s5"


def test_reader_left_behind_resumes_at_the_oldest_kept():
    ring = EventRing(kept=2)
    reader = EventsReader.opened(ring)
    for i in range(5):
        ring.append(event(id=f"s{i}"))
    assert [json.loads(x)["id"] for x in reader.read(1 << 20).splitlines()] == ["s3", "s4"]


def refused(uid: int = 65534, id: str = "x") -> OperationEvent:
    return OperationEvent(1_700_000_000_123_456_789, "branch", ("x",), "EPERM", 0.1, id, uid)


def test_a_flood_of_outsiders_events_pushes_no_real_one_out():
    """Callers outside root and the admin group (events with a uid) are kept under a cap of
    their own, the oldest dropped first and counted; the others keep the whole ring."""
    ring = EventRing(kept=5, outsiders_kept=3)
    ring.append(event(id="real0"))
    for i in range(1000):
        ring.append(refused(id=f"r{i}"))
    ring.append(event(id="real1"))
    ring.append(refused(id="r1000"))
    lines = [json.loads(line) for line in ring.lines_since(ring.oldest())[0].splitlines()]
    assert [e["id"] for e in lines] == ["real0", "r998", "r999", "real1", "r1000"]
    assert "uid" not in lines[0] and "dropped" not in lines[0]
    assert (lines[-1]["uid"], lines[-1]["dropped"]) == (65534, 998)
    assert ring.outsiders_dropped == 998 and ring.oldest() == 0
    for i in range(5):
        ring.append(event(id=f"later{i}"))
    assert ring.oldest() == 999  # real0 went: the oldest kept is r998, event 999


def test_a_reader_gets_both_kinds_of_event_once_in_order():
    ring = EventRing(kept=3, outsiders_kept=2)
    reader = EventsReader.opened(ring)
    seen = []
    for i in range(12):
        ring.append(refused(id=f"e{i}") if i % 3 else event(id=f"e{i}"))
        seen += [json.loads(x)["id"] for x in reader.read(1 << 20).splitlines()]
    assert seen == [f"e{i}" for i in range(12)]
    assert reader.read(1 << 20) == b""


def test_an_outsiders_event_shows_its_uid_and_the_drops_before_it():
    shown = refused().as_dict()
    assert (shown["uid"], shown["dropped"]) == (65534, 0)
    assert set(event().as_dict()) == {"time", "time_ns", "op", "names", "result",
                                      "latency_ms", "id"}


def record(level: int, message: str, *args, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("cascowfs.test", level, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


@hypothesis_settings(200)
@given(names, names)
def test_json_log_lines_stay_one_valid_line(message, command):
    token = current_command.set(command)
    try:
        line = JsonFormatter().format(record(logging.WARNING, "%s", message))
    finally:
        current_command.reset(token)
    assert "\n" not in line and line.isascii()
    parsed = json.loads(line)
    assert parsed["message"] == printable(message)
    assert parsed["command"] == printable(command)


def test_warnings_inside_an_operation_name_its_command_in_both_formats():
    token = current_command.set("commit b s1")
    try:
        warning = record(logging.WARNING, "disk says no")
        info = record(logging.INFO, "fine")
        assert json.loads(JsonFormatter().format(warning))["command"] == "commit b s1"
        assert "command" not in json.loads(JsonFormatter().format(info))
        assert TextFormatter().format(warning).endswith("[command: 'commit b s1']")
        assert "command" not in TextFormatter().format(info)
    finally:
        current_command.reset(token)
    outside = record(logging.ERROR, "no operation")
    assert "command" not in json.loads(JsonFormatter().format(outside))


def test_operation_line_carries_its_event_but_its_own_time():
    fields = json.loads(event().json_line())
    rec = record(logging.INFO, "commit ok", event=fields, command="commit b s1")
    parsed = json.loads(JsonFormatter().format(rec))
    assert parsed["op"] == "commit" and parsed["latency_ms"] == 1.5
    assert parsed["command"] == "commit b s1"
    assert parsed["time"] != fields["time"]  # when it was logged, not when the op began



FORGED = "x\n2026-12-07 13:30:00,000 cascowfs.ops INFO prune ok in 1.0 ms: prune s1"


@hypothesis_settings(200)
@given(names, names)
def test_text_log_lines_stay_one_printable_line(message, name):
    """Whatever a caller named, a record is one line a terminal shows as it is, and each
    character of the name is kept (shown escaped at worst)."""
    line = TextFormatter().format(record(logging.WARNING, "commit %s: %s", name, message))
    assert line.isprintable() and line.encode("utf-8")  # no newline, control or surrogate
    assert line.endswith(f"commit {one_line(name)}: {one_line(message)}")


def test_text_log_shows_controls_and_bytes_that_are_not_utf8_escaped():
    fmt = TextFormatter()
    line = fmt.format(record(logging.INFO, "commit %s", FORGED))
    assert "\n" not in line and line.endswith("commit x\\n2026-12-07 13:30:00,000 cascowfs.ops "
                                               "INFO prune ok in 1.0 ms: prune s1")
    name = os.fsdecode(b"e\xff")
    line = fmt.format(record(logging.INFO, f"path {name}\x1b[2J\r\t\u202e\u2028 ok"))
    assert line.endswith("path e\\xff\\x1b[2J\\r\\t\\u202e\\u2028 ok")
    assert one_line("plain é ✓ text") == "plain é ✓ text"


def test_text_log_tracebacks_follow_their_record_indented():
    try:
        raise ValueError(FORGED + "\x1b[2J" + os.fsdecode(b"\xff"))
    except ValueError:
        rec = logging.LogRecord("cascowfs.test", logging.ERROR, __file__, 1, "failed", (),
                                sys.exc_info())
    first, *rest = TextFormatter().format(rec).split("\n")
    assert first.endswith("cascowfs.test ERROR failed") and len(rest) > 2
    assert all(line.startswith("    ") and line.isprintable() for line in rest), rest
    assert rest[-2:] == ["    ValueError: x", "    " + FORGED.split("\n")[1] + "\\x1b[2J\\xff"]


def test_log_file_keeps_what_is_not_utf8(tmp_path, capfd):
    """The file handler writes a lone surrogate a formatter let through as a backslash escape
    (as stderr would), before and after SIGHUP reopens the file, instead of losing the line."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    path = tmp_path / "daemon.log"
    try:
        setup_logging(logging.INFO, str(path), "text")
        (handler,) = root.handlers
        test_log = logging.getLogger("cascowfs.test")
        test_log.info("committed %s", os.fsdecode(b"e\xff"))
        handler.setFormatter(logging.Formatter("%(message)s"))  # lets surrogates through
        test_log.info("raw %s", os.fsdecode(b"f\xfe"))
        reopen_log_files()
        test_log.info("reopened %s", os.fsdecode(b"g\xfd"))
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        handler.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith("INFO committed e\\xff")
    assert lines[1:] == ["raw f\\udcfe", "SIGHUP: reopened log file " + str(path),
                         "reopened g\\udcfd"]
    assert "Logging error" not in capfd.readouterr().err


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="xml"):
        formatter("xml")
