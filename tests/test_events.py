"""The event ring behind MNT/events and the log formats, without a mount: any name a caller
can send stays one line of valid JSON, the ring keeps the last EVENTS_KEPT, a reader gets
each line once."""

from __future__ import annotations

import json
import logging
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs.events import EVENTS_KEPT, EventRing, EventsReader, OperationEvent, printable
from cascowfs.logs import JsonFormatter, TextFormatter, current_command, formatter
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


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="xml"):
        formatter("xml")
