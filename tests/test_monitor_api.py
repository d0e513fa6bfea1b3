"""The monitor's JSON API, its guard on resets, and its parsing of what agents wrote, over a plain
directory laid out like a mount's files (no daemon: a reset reaches no ``ctl`` here, the real
one is tested in test_monitor_browser.py)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs.errors import InvalidArgumentError
from cascowfs.monitor import server as server_module
from cascowfs.monitor import tracker as tracker_module
from cascowfs.monitor.files import MountFiles, parse_episodes, parse_events
from cascowfs.monitor.peers import socket_owner
from cascowfs.monitor.server import MonitorServer, parse_listen
from cascowfs.privacy import Caller
from cascowfs.monitor.tracker import CHART_EVENTS, KEPT_EVENTS, OUTSIDER_EVENTS, Tracker
from cascowfs.names import check_branch_name, check_labels, check_snapshot_id
from support.browser import episode, fake_mount, write_lines
from support.processes import REPO
from support.properties import hypothesis_settings

EVENT = {"time": "2026-12-05T12:00:00Z", "time_ns": 1, "op": "commit", "names": ["b1"],
         "result": "ok", "latency_ms": 3.5, "id": "s1"}
NOBODY = 65534
# a caller outside root and the admin group, as the daemon writes its line
REFUSED = {**EVENT, "names": ["rootwork", "ROOT_COMMIT_9"], "result": "EPERM", "id": None,
           "uid": NOBODY, "dropped": 0}


@contextmanager
def serving(root: Path, *, read_only: bool = False) -> Iterator[tuple[MonitorServer, Tracker]]:
    """A monitor of ``root`` on a free loopback port, polled by hand (``tracker.poll_once``) on
    a clock that stands still: the tree is read exactly when an event asks for it."""
    tracker = Tracker(MountFiles(root), clock=lambda: 0.0)
    server = MonitorServer(("127.0.0.1", 0), tracker, read_only)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        tracker.poll_once()
        yield server, tracker
    finally:
        server.stopping.set()
        server.shutdown()
        thread.join()
        server.server_close()


def request(server: MonitorServer, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{server.port}",
                                                       **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(server: MonitorServer, path: str) -> object:
    status, _, body = request(server, "GET", path)
    assert status == 200, body
    return json.loads(body)


def test_state_tree_branches_and_events_follow_the_files(tmp_path):
    root = fake_mount(tmp_path / "mnt",
                      [episode("s1", None, 10, reward="0.5"), episode("s2", "s1", 20)],
                      {"b1": "s2", "b2": None}, events=[EVENT])
    with serving(root) as (server, tracker):
        state = get_json(server, "/api/state")
        assert state["snapshots"] == 2 and state["problems"] == {}
        assert state["branches"] == [{"name": "b1", "parent": "s2"}, {"name": "b2", "parent": None}]
        assert [e["op"] for e in state["events"]] == ["commit"]
        assert state["label_keys"] == ["reward"] and state["read_only"] is False
        tree = get_json(server, "/api/tree")
        assert tree["full"] and {n["id"] for n in tree["nodes"]} == {"s1", "s2"}
        assert get_json(server, "/api/branches") == state["branches"]
        assert get_json(server, "/api/events?limit=5")[0]["latency_ms"] == 3.5

        # a commit and a label change, then a prune: the page asks only for what changed
        write_lines(root / "episodes", [episode("s1", None, 10, reward="0.7"),
                                        episode("s2", "s1", 20), episode("s3", "s2", 30)])
        write_lines(root / "events", [EVENT, {**EVENT, "time_ns": 2, "id": "s3"}])
        tracker.poll_once()
        delta = get_json(server, f"/api/tree?since={tree['seq']}")
        assert not delta["full"] and delta["removed"] == []
        assert {n["id"]: n["labels"] for n in delta["nodes"]} == {"s1": {"reward": "0.7"},
                                                                  "s3": {}}
        write_lines(root / "episodes", [episode("s1", None, 10, reward="0.7")])
        write_lines(root / "events", [EVENT, {**EVENT, "time_ns": 3, "op": "prune"}])
        tracker.poll_once()
        later = get_json(server, f"/api/tree?since={delta['seq']}")
        assert later["nodes"] == [] and sorted(later["removed"]) == ["s2", "s3"]
        assert get_json(server, f"/api/tree?since={later['seq'] + 5}")["full"]


def test_a_page_further_behind_than_the_removals_kept_gets_the_whole_tree(tmp_path, monkeypatch):
    """A search prunes as it goes for as long as the monitor runs: it keeps the last
    REMOVALS_KEPT removed ids, and a page asking from before them is sent every node."""
    monkeypatch.setattr(tracker_module, "REMOVALS_KEPT", 3)
    root = fake_mount(tmp_path / "mnt", [episode("s0", None, 1)], {}, events=[])
    with serving(root) as (server, tracker):
        first = get_json(server, "/api/tree")["seq"]
        seqs = [first]
        for i in range(1, 6):  # s(i-1) pruned, s(i) committed: one removal per tree number
            write_lines(root / "episodes", [episode(f"s{i}", None, i)])
            tracker.poke()
            tracker.poll_once()
            seqs.append(get_json(server, "/api/tree")["seq"])
        assert len(tracker._removed) == 3
        recent = get_json(server, f"/api/tree?since={seqs[2]}")
        assert not recent["full"] and sorted(recent["removed"]) == ["s2", "s3", "s4"]
        old = get_json(server, f"/api/tree?since={seqs[1]}")
        assert old["full"] and [n["id"] for n in old["nodes"]] == ["s5"]


def test_only_ops_that_change_snapshots_reread_the_tree(tmp_path):
    """Reading MNT/episodes costs the daemon a line per snapshot: a branch made, a query, a
    refused commit (events that leave the tree as it was) read the branches only."""
    root = fake_mount(tmp_path / "mnt", [episode("s1", None, 10)], {}, events=[EVENT])
    with serving(root) as (server, tracker):
        write_lines(root / "episodes", [episode("s1", None, 10), episode("x", "s1", 11)])
        (root / "branches" / "b9").mkdir()
        (root / "branches" / "b9" / "parent").write_text("s1\n")
        write_lines(root / "events", [EVENT, {**EVENT, "time_ns": 5, "op": "branch"},
                                      {**EVENT, "time_ns": 6, "op": "find"},
                                      {**EVENT, "time_ns": 7, "result": "EEXIST"}])
        tracker.poll_once()
        state = get_json(server, "/api/state")
        assert state["snapshots"] == 1 and state["branches"] == [{"name": "b9", "parent": "s1"}]
        write_lines(root / "events", [EVENT, {**EVENT, "time_ns": 8, "op": "label"}])
        tracker.poll_once()
        assert get_json(server, "/api/state")["snapshots"] == 2


def test_an_event_that_started_earlier_is_still_new(tmp_path):
    """Events are appended as operations end but stamped when they began: a long commit's
    line follows a short branch's, with an earlier time, and must still be read as new."""
    root = fake_mount(tmp_path / "mnt", [episode("s1", None, 10)], {},
                      events=[{**EVENT, "time_ns": 50, "op": "branch"}])
    with serving(root) as (server, tracker):
        write_lines(root / "episodes", [episode("s1", None, 10), episode("s2", "s1", 20)])
        write_lines(root / "events", [{**EVENT, "time_ns": 50, "op": "branch"},
                                      {**EVENT, "time_ns": 40, "id": "s2"}])
        tracker.poll_once()
        state = get_json(server, "/api/state")
        assert state["snapshots"] == 2
        assert [(e["op"], e["time_ns"]) for e in state["events"]] == [("branch", 50),
                                                                       ("commit", 40)]


def test_a_refused_commands_words_are_kept_as_text(tmp_path):
    refused = {**EVENT, "op": "commit", "names": ["b1", "<b>x</b>"], "result": "EINVAL",
               "id": "../etc"}
    root = fake_mount(tmp_path / "mnt", [], {}, events=[refused])
    with serving(root) as (server, _):
        [event] = get_json(server, "/api/events")
        assert event["id"] is None and event["names"] == ["b1", "<b>x</b>"]
        assert event["result"] == "EINVAL"


def test_a_flood_of_outsiders_events_pushes_none_of_roots_out(tmp_path):
    """Any user may write ctl: thousands of refused commands of `nobody` keep root's and the
    admin group's last KEPT_EVENTS in the monitor (in /api/events and /api/state) and out of
    the latency chart; the outsiders' own are kept apart, the last OUTSIDER_EVENTS, with
    their uid. The daemon's MNT/events holds both, its outsiders' last 100, in order."""
    roots = [{**EVENT, "time_ns": t, "op": op, "id": f"s{t}"}
             for t, op in enumerate(["import", "branch", "commit", "commit", "label"], 1)]
    root = fake_mount(tmp_path / "mnt", [], {}, events=roots)
    with serving(root) as (server, tracker):
        before = get_json(server, "/api/state")
        assert [e["uid"] for e in before["events"]] == [None] * 5
        assert before["outsiders"] == {"seen": 0, "dropped": 0}
        flood, dropped = [], 0
        for t in range(100, 1100):  # 1,000 refusals, read 100 new ones at a time
            if len(flood) == 100:
                flood.pop(0)
                dropped += 1
            flood.append({**REFUSED, "time_ns": t, "dropped": dropped})
            if t % 100 == 99:
                write_lines(root / "events", roots + flood)
                tracker.poll_once()
        kept = get_json(server, "/api/events?limit=1000")
        assert len(kept) == 5 + OUTSIDER_EVENTS
        assert [e["op"] for e in kept if e["uid"] is None] == [e["op"] for e in roots]
        outsiders = [e for e in kept if e["uid"] is not None]
        assert {(e["uid"], e["result"]) for e in outsiders} == {(NOBODY, "EPERM")}
        assert outsiders[-1]["time_ns"] == 1099 and outsiders[-1]["dropped"] == 900
        state = get_json(server, "/api/state")
        assert [(e["uid"], e["names"]) for e in state["events"]] == [
            (NOBODY, ["rootwork", "ROOT_COMMIT_9"])] * 10
        assert [e["time_ns"] for e in state["latency"]] == [1, 2, 3, 4, 5]
        assert state["snapshots"] == 0, "an outsider's event never has the tree read again"
        assert state["outsiders"] == {"seen": 1000, "dropped": 900}

        # root goes on: its event is the newest in the table and the chart, and past
        # KEPT_EVENTS of its own, the oldest of root's go, not the outsiders'
        more = [{**EVENT, "time_ns": 2000 + i, "op": "find"} for i in range(KEPT_EVENTS)]
        write_lines(root / "events", roots + flood + more)
        tracker.poll_once()
        kept = get_json(server, "/api/events?limit=1000")
        assert len(kept) == KEPT_EVENTS + OUTSIDER_EVENTS
        assert [e["time_ns"] for e in kept] == list(range(1050, 1100)) + list(range(2000, 2200))
        state = get_json(server, "/api/state")
        assert state["events"][-1]["time_ns"] == 2199 and state["events"][-1]["uid"] is None
        assert len(state["latency"]) == CHART_EVENTS
        assert all(e["uid"] is None for e in state["latency"])
        assert get_json(server, "/api/events?limit=3")[-1]["time_ns"] == 2199


def test_an_outsiders_event_keeps_its_place_among_roots(tmp_path):
    """The table shows the operations in the daemon's order, outsiders' among root's."""
    lines = [{**EVENT, "time_ns": 1}, {**REFUSED, "time_ns": 2}, {**EVENT, "time_ns": 3},
             {**REFUSED, "time_ns": 4, "uid": 1000}, {**EVENT, "time_ns": 5, "op": "find"}]
    root = fake_mount(tmp_path / "mnt", [], {}, events=lines)
    with serving(root) as (server, _):
        state = get_json(server, "/api/state")
        assert [(e["time_ns"], e["uid"]) for e in state["events"]] == [
            (1, None), (2, NOBODY), (3, None), (4, 1000), (5, None)]
        assert [e["time_ns"] for e in state["latency"]] == [1, 3, 5]
        assert get_json(server, "/api/events?limit=2") == state["events"][-2:]


@pytest.mark.parametrize("fields", [
    {"uid": -1}, {"uid": True}, {"uid": False}, {"uid": 2**32 - 1}, {"uid": 2**64},
    {"uid": 10**400}, {"uid": "65534"}, {"uid": 65534.0}, {"uid": [65534]}, {"uid": {}},
    {"dropped": -1}, {"dropped": True}, {"dropped": "3"}, {"dropped": 1.5},
    {"dropped": 2**53}, {"uid": None, "dropped": 3}, {"uid": None, "dropped": 0}])
def test_a_hostile_uid_or_dropped_count_rejects_the_line(fields):
    """uid is a uid_t other than -1, dropped a count a page reads exactly; a count without a
    uid is no line the daemon writes."""
    line = {**REFUSED, **fields}
    if "uid" in fields and fields["uid"] is None:
        del line["uid"]
    parsed = parse_events(json.dumps(line).encode() + b"\n" + json.dumps(EVENT).encode())
    assert parsed.rejected == 1 and [e.uid for e in parsed.records] == [None]


def test_uid_and_dropped_are_read_as_the_daemon_writes_them():
    lines = [EVENT, {**EVENT, "uid": None}, REFUSED, {**REFUSED, "uid": 0, "dropped": 7},
             {**REFUSED, "uid": 2**32 - 2, "dropped": 2**53 - 1}, {**REFUSED, "dropped": None}]
    parsed = parse_events(b"\n".join(json.dumps(o).encode() for o in lines))
    assert parsed.rejected == 0
    assert [(e.uid, e.dropped) for e in parsed.records] == [
        (None, 0), (None, 0), (NOBODY, 0), (0, 7), (2**32 - 2, 2**53 - 1), (NOBODY, 0)]
    assert parsed.records[2].as_json() == {k: v for k, v in REFUSED.items() if k != "time"}
    assert parsed.records[0].as_json()["uid"] is None


def test_missing_files_are_reported_not_made_up(tmp_path):
    """A daemon without MNT/episodes, MNT/events or MNT/metrics: the page says so for each
    part, the tree comes from MNT/snapshots, and /metrics answers 503 with the reason."""
    root = fake_mount(tmp_path / "mnt", None, {"b1": None})
    with serving(root) as (server, _):
        state = get_json(server, "/api/state")
        assert set(state["problems"]) == {"episodes", "events"}
        assert "not served by this daemon" in state["problems"]["events"]
        assert state["events"] == [] and state["latency"] == [] and state["snapshots"] == 0
        status, headers, body = request(server, "GET", "/metrics")
        assert status == 503 and b"metrics is not served" in body


def test_metrics_are_passed_through(tmp_path):
    text = b"# TYPE cascowfs_branches gauge\ncascowfs_branches 3\n"
    root = fake_mount(tmp_path / "mnt", [], {}, events=[], metrics=text)
    with serving(root) as (server, _):
        status, headers, body = request(server, "GET", "/metrics")
        assert status == 200 and body == text
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    root = fake_mount(tmp_path / "mnt", None, {}, events=[])
    (root / "episodes").write_bytes(
        json.dumps(episode("ok", None, 1)).encode() + b"\n{not json\n"
        + json.dumps(episode("../etc", None, 2)).encode() + b"\n"
        + json.dumps({**episode("s2", None, 3), "labels": {"k": "a\nb"}}).encode() + b"\n[]\n")
    with serving(root) as (server, _):
        state = get_json(server, "/api/state")
        assert state["snapshots"] == 1
        assert state["problems"] == {"episodes_rejected": "4 malformed line(s) in MNT/episodes"}


def test_static_files_carry_a_content_security_policy(tmp_path):
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving(root) as (server, _):
        for path, ctype in (("/", "text/html"), ("/app.js", "text/javascript"),
                            ("/sw.js", "text/javascript"),
                            ("/manifest.webmanifest", "application/manifest+json"),
                            ("/icon-512.png", "image/png")):
            status, headers, body = request(server, "GET", path)
            assert status == 200 and headers["Content-Type"].startswith(ctype), path
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
        manifest = json.loads(request(server, "GET", "/manifest.webmanifest")[2])
        assert {i["sizes"] for i in manifest["icons"]} >= {"192x192", "512x512"}
        for path in ("/static/app.js", "/../server.py", "/api/nothing", "/%2e%2e/files.py"):
            assert request(server, "GET", path)[0] == 404, path


def test_requests_for_another_host_are_refused(tmp_path):
    """A DNS name rebound to 127.0.0.1 reaches the port with its own Host header."""
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving(root) as (server, _):
        for host in ("evil.example:%d" % server.port, "127.0.0.1:1", ""):
            assert request(server, "GET", "/api/state", headers={"Host": host})[0] == 421, host
        assert request(server, "GET", "/api/state",
                       headers={"Host": f"localhost:{server.port}"})[0] == 200


def _reset(server: MonitorServer, body: object, **headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, reply = request(server, "POST", "/api/reset", data,
                               {"Content-Type": "application/json", **headers})
    return status, json.loads(reply)


def test_reset_is_refused_unless_it_comes_from_the_page(tmp_path):
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving(root) as (server, _):
        good = {"branch": "b1", "id": "s1"}
        assert _reset(server, good, Origin="http://evil.example")[0] == 403
        assert _reset(server, good, Origin="null")[0] == 403
        assert _reset(server, good, Origin=f"http://localhost:{server.port}")[0] == 403
        status, _, _ = request(server, "POST", "/api/reset", json.dumps(good).encode(),
                               {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 415
        assert _reset(server, b"{")[0] == 400
        assert _reset(server, {"branch": "b1"})[0] == 400
        assert _reset(server, b"x" * 5000)[0] == 400
        status, reply = _reset(server, {"branch": "../b", "id": "s1"})
        assert status == 400 and reply["errno"] == "EINVAL"
        status, reply = _reset(server, {"branch": "b1", "id": ["s1"]})
        assert status == 400 and reply["errno"] == "EINVAL"
        # everything checked, the reset reaches the client: no daemon serves this directory
        status, reply = _reset(server, good, Origin=f"http://127.0.0.1:{server.port}")
        assert status == 503 and reply["errno"] == "ENOTCONN" and str(root) in reply["message"]



def test_malformed_requests_are_answered_not_dropped(tmp_path, capfd):
    """What a client sends may be anything; each request gets a status, none a traceback."""
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving(root) as (server, _):
        good = {"branch": "b1", "id": "s1"}
        # an Origin that does not parse is not the page's own
        status, reply = _reset(server, good, Origin="http://[::1")
        assert status == 403 and reply["message"] == "cross-origin request refused"
        assert _reset(server, good, Origin="")[0] == 403
        # JSON nested deeper than the parser's recursion: bad JSON like any other
        assert _reset(server, b"[" * 4000)[0] == 400
        assert _reset(server, b'{"branch": ' + b"[" * 4000)[0] == 400
        # digits that str.isdigit takes and int refuses
        assert _reset(server, good, **{"Content-Length": "\u00b2"})[0] == 400
        assert get_json(server, "/api/events?limit=%C2%B2") == []
        assert get_json(server, "/api/tree?since=--5")["full"]
        # a request target that does not parse
        assert request(server, "GET", "http://[::1/api/state")[0] == 400
        assert request(server, "POST", "http://[::1/api/reset", b"{}",
                       {"Content-Type": "application/json"})[0] == 404
    assert "Traceback" not in capfd.readouterr().err


def test_an_unforeseen_failure_is_a_500_and_one_line_of_log(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="cascowfs.monitor")
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving(root) as (server, tracker):
        def broken() -> dict:
            raise RuntimeError("a bug\nwith a newline")
        tracker.summary = broken
        status, _, body = request(server, "GET", "/api/state")
        assert status == 500 and json.loads(body)["ok"] is False
        assert request(server, "GET", "/api/branches")[0] == 200  # the server serves on
        # what escapes a handler before a route runs (a client gone mid-request-line)
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            server.handle_error(None, ("127.0.0.1", 1))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "/api/state" in errors[0] and "\n" not in errors[0]
    assert any("connection from 127.0.0.1" in r.getMessage() for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_head_answers_the_get_routes_without_a_body(tmp_path):
    root = fake_mount(tmp_path / "mnt", [episode("s1", None, 1)], {}, events=[])
    with serving(root) as (server, _):
        for path in ("/", "/app.js", "/api/state", "/api/tree", "/nothing"):
            get_status, get_headers, get_body = request(server, "GET", path)
            status, headers, body = request(server, "HEAD", path)
            assert (status, body) == (get_status, b""), path
            assert headers["Content-Length"] == str(len(get_body)), path
            for key in ("Content-Type", "Content-Security-Policy", "Cache-Control"):
                assert headers[key] == get_headers[key], (path, key)
        # the stream: its headers, then the end of the connection rather than events
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"HEAD /api/stream HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % server.port)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in reply
        assert reply.endswith(b"\r\n\r\n") and b"event:" not in reply
        assert request(server, "HEAD", "/", headers={"Host": "evil.example"})[0] == 421


@contextmanager
def serving_on(root: Path, address: str, **options) -> Iterator[MonitorServer]:
    """A monitor of ``root`` on ``address`` (a free port), not polled."""
    tracker = Tracker(MountFiles(root), clock=lambda: 0.0)
    server = MonitorServer((address, 0), tracker, False, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        thread.join()
        server.server_close()


def test_a_wildcard_address_takes_addresses_and_given_names_only(tmp_path):
    """On 0.0.0.0 any of the machine's addresses may be asked for, and localhost; a DNS name
    only if given (--host-name): a page of evil.example whose name is rebound to this machine
    sends its own name as Host and as Origin, and neither reads nor resets anything."""
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving_on(root, "0.0.0.0", host_names=["Monitor.Example"]) as server:
        good = {"branch": "b1", "id": "s1"}
        rebound = f"evil.example:{server.port}"
        status, _ = _reset(server, good, Host=rebound, Origin=f"http://{rebound}")
        assert status == 421
        for host in (rebound, f"monitor.example:{server.port + 1}", f"127.0.0.1:{server.port + 1}",
                     f"[::1:{server.port}", f"[::1]x{server.port}", f"2130706433:{server.port}",
                     f"127.0.0.1:{server.port}0", ""):
            assert request(server, "GET", "/api/state", headers={"Host": host})[0] == 421, host
        for host in (f"127.0.0.1:{server.port}", f"10.1.2.3:{server.port}",
                     f"LOCALHOST:{server.port}", f"[::1]:{server.port}"):
            assert request(server, "GET", "/api/state", headers={"Host": host})[0] == 200, host
        named = f"monitor.example:{server.port}"
        assert _reset(server, good, Host=named, Origin="http://evil.example")[0] == 403
        status, reply = _reset(server, good, Host=named, Origin=f"http://{named}")
        assert status == 503 and reply["errno"] == "ENOTCONN"  # accepted: no daemon serves it


@pytest.mark.parametrize("name", ["evil example", "-x", "x-", "a" * 254, "exämple.org", "x_y",
                                  "1.2.3.4:80", ""])
def test_a_host_name_must_be_a_dns_name(tmp_path, name):
    with pytest.raises(InvalidArgumentError, match="--host-name"):
        MonitorServer(("127.0.0.1", 0), Tracker(MountFiles(tmp_path)), False, host_names=[name])


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (sending nothing) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_a_silent_connection_is_closed_and_connections_are_capped(tmp_path, monkeypatch):
    """Each connection holds a thread: one that sends nothing is closed after the socket
    timeout, and past CONNECTIONS_MAX at once a new one is closed unanswered; a page's
    request is served again once one has gone."""
    monkeypatch.setattr(server_module, "SOCKET_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(server_module, "CONNECTIONS_MAX", 2)
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving_on(root, "127.0.0.1") as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # both are being served, by a thread each
            with socket.create_connection(("127.0.0.1", server.port)) as third:
                assert _closed_within(third, 0.5), "a third connection at once is closed"
            assert all(_closed_within(sock, 5.0) for sock in idle), "closed after the timeout"
        finally:
            for sock in idle:
                sock.close()
        assert get_json(server, "/api/state")["snapshots"] == 0


def test_read_only_monitor_refuses_resets(tmp_path):
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    with serving(root, read_only=True) as (server, _):
        assert get_json(server, "/api/state")["read_only"] is True
        status, reply = _reset(server, {"branch": "b1", "id": "s1"})
        assert status == 403 and "read-only" in reply["message"]


def test_stream_sends_the_state_at_once(tmp_path):
    root = fake_mount(tmp_path / "mnt", [episode("s1", None, 1)], {}, events=[])
    with serving(root) as (server, _):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", "/api/stream", headers={"Host": f"127.0.0.1:{server.port}"})
            resp = conn.getresponse()
            assert resp.getheader("Content-Type") == "text/event-stream"
            assert resp.readline() == b"event: state\n"
            data = resp.readline()
            assert data.startswith(b"data: ") and json.loads(data[6:])["snapshots"] == 1
        finally:
            conn.close()


@pytest.mark.parametrize("text", ["127.0.0.1:8470", "[::1]:0", "0.0.0.0:80"])
def test_listen_addresses(text):
    host, port = parse_listen(text)
    assert host in text and str(port) in text


@pytest.mark.parametrize("text", ["localhost:8470", "127.0.0.1", "127.0.0.1:99999", ":80",
                                  "127.0.0.1:x", "[::1]"])
def test_bad_listen_addresses_are_refused(text):
    from cascowfs.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        parse_listen(text)


def _valid(check, value) -> bool:
    try:
        check(value)
    except Exception:
        return False
    return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
episode_like = st.fixed_dictionaries(
    {}, optional={"id": json_values | st.text(max_size=20), "parent": json_values,
                  "created_ns": json_values, "files": json_values, "size": json_values,
                  "labels": st.dictionaries(st.text(max_size=10), json_values | st.text(),
                                            max_size=4)})


@hypothesis_settings(200)
@given(st.lists(episode_like | json_values, max_size=8), st.binary(max_size=200))
def test_episodes_parser_passes_on_only_valid_records(objects, noise):
    """Whatever agents and a broken daemon put in MNT/episodes, the parser never raises, and
    every record it passes on holds only a valid id, parent and labels."""
    data = b"\n".join(json.dumps(o).encode() for o in objects) + b"\n" + noise
    parsed = parse_episodes(data)
    for node in parsed.records:
        assert _valid(check_snapshot_id, node.id)
        assert node.parent is None or _valid(check_snapshot_id, node.parent)
        assert check_labels(node.labels) == node.labels
        assert min(node.created_ns, node.files, node.size) >= 0
    assert len(parsed.records) + parsed.rejected <= data.count(b"\n") + 1


event_like = st.fixed_dictionaries(
    {}, optional={"time_ns": json_values, "op": json_values | st.text(max_size=10),
                  "names": json_values, "result": json_values | st.text(max_size=10),
                  "latency_ms": json_values, "id": json_values,
                  "uid": json_values | st.integers(-1, 2**32), "dropped": json_values})


@hypothesis_settings(200)
@given(st.lists(event_like | json_values, max_size=8))
def test_events_parser_passes_on_only_valid_records(objects):
    parsed = parse_events(b"\n".join(json.dumps(o).encode() for o in objects))
    for event in parsed.records:
        assert isinstance(event.op, str) and len(event.op) <= 32 and len(event.result) <= 32
        assert event.latency_ms >= 0 and event.time_ns >= 0
        assert event.id is None or _valid(check_snapshot_id, event.id)
        assert all(isinstance(n, str) and len(n) <= 256 for n in event.names)
        if event.uid is None:
            assert event.dropped == 0
        else:
            assert type(event.uid) is int and 0 <= event.uid < 2**32 - 1
            assert type(event.dropped) is int and 0 <= event.dropped < 2**53
    assert len(parsed.records) + parsed.rejected == len(objects)


def test_branches_with_hostile_names_are_left_out(tmp_path):
    root = fake_mount(tmp_path / "mnt", [], {"good": "s1", "-x": "s1", "bad": "../s1"})
    names = [b.name for b in MountFiles(root).branches()]
    assert names == ["good"] and all(_valid(check_branch_name, n) for n in names)


def test_socket_owner_finds_the_local_end_of_a_connection(tmp_path):
    """The kernel's socket tables name the uid of a connection's local client, over IPv4 and
    IPv6, and nobody for an address no socket of this machine has."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as listener:
            listener.bind((host, 0))
            listener.listen()
            with socket.create_connection(listener.getsockname()[:2]) as client:
                accepted, _ = listener.accept()
                with accepted:
                    assert socket_owner(accepted.getpeername(), accepted.getsockname()) \
                        == os.geteuid()
                    assert socket_owner(("192.0.2.7", client.getsockname()[1]),
                                        accepted.getsockname()) is None
    # an IPv4 client seen through an IPv6 socket (::ffff:a.b.c.d) is found in the IPv4 table
    table = tmp_path / "tcp"
    table.write_text("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when "
                     "retrnsmt   uid  timeout inode\n"
                     "   0: 0100007F:D431 0100007F:2116 01 00000000:00000000 00:00000000 "
                     "00000000  1234        0 1 1 0 20 4 30 10 -1\n"
                     "   1: 0100007F:D432 0100007F:2116 0A 00000000:00000000 00:00000000 "
                     "00000000  4321        0 1 1 0 20 4 30 10 -1\n"
                     "   2: garbage\n")
    assert socket_owner(("::ffff:127.0.0.1", 0xD431, 0, 0), ("127.0.0.1", 0x2116),
                        (table,)) == 1234
    assert socket_owner(("127.0.0.1", 0xD432), ("127.0.0.1", 0x2116), (table,)) is None
    assert socket_owner(("127.0.0.1", 0xD431), ("127.0.0.1", 0x2117), (table,)) is None


def test_a_reset_from_another_machine_is_refused_unless_given_a_user(tmp_path, monkeypatch):
    """A peer with no socket on this machine has no user here: its reset is EPERM, or is sent
    as the user --remote-resets-as names."""
    monkeypatch.setattr(server_module, "socket_owner", lambda peer, ours: None)
    root = fake_mount(tmp_path / "mnt", [], {}, events=[])
    good = {"branch": "b1", "id": "s1"}
    with serving(root) as (server, _):
        status, reply = _reset(server, good)
        assert status == 403 and reply["errno"] == "EPERM", reply
        assert "--remote-resets-as" in reply["message"]
        server.remote_resets_as = Caller.of_user(os.geteuid())
        status, reply = _reset(server, good)
        assert status == 503 and reply["errno"] == "ENOTCONN", reply  # sent: no daemon here


def test_remote_resets_as_must_name_an_account(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cascowfs", "monitor", str(tmp_path),
                           "--listen", "127.0.0.1:0", "--remote-resets-as", "no-such-user-x"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0 and "no-such-user-x has no account" in proc.stderr, proc.stderr
    assert "EINVAL" in proc.stderr
