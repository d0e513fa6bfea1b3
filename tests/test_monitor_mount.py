"""The monitor against a real daemon, without a browser: it never keeps the mount busy, it says
so while the daemon is gone and recovers when it is back, and its reset is the daemon's."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse

from fusehelpers import mounted, needs_fuse, run_cli
from support.browser import monitor

pytestmark = needs_fuse


def call(url: str, method: str = "GET", path: str = "/api/state", body: object = None
         ) -> tuple[int, object]:
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(raw) if ctype == "application/json" else raw
    finally:
        conn.close()


def state_when(url: str, test, what: str, timeout: float = 30) -> dict:
    """Poll /api/state until ``test(state)`` holds (the monitor polls the mount itself)."""
    deadline = time.monotonic() + timeout
    while True:
        status, state = call(url)
        assert status == 200
        if test(state):
            return state
        assert time.monotonic() < deadline, f"{what}: {state}"
        time.sleep(0.05)


def test_monitor_never_keeps_the_mount_busy():
    """The monitor opens a file, reads it whole and closes it: `cascowfs umount` works while it
    runs (retried, since a read may be under way at that very moment), the page then says the
    daemon is gone, and it follows the mount again once a daemon serves it."""
    with mounted() as fs, monitor(fs.mnt) as mon:
        fs.sh('mkdir $MNT/branches/b1 && echo s1 > $MNT/branches/b1/commit')
        state_when(mon.url, lambda s: s["snapshots"] == 1 and s["branches"], "the first commit")
        for attempt in range(5):
            proc = run_cli("umount", str(fs.mnt), check=False)
            if proc.returncode == 0 or "busy" not in proc.stderr:
                break
        assert proc.returncode == 0, proc.stderr
        fs.proc.wait(timeout=60)
        gone = state_when(mon.url, lambda s: "daemon" in s["problems"], "no banner")
        assert "not running" in gone["problems"]["daemon"] or str(fs.mnt) in gone["problems"]["daemon"]
        assert gone["snapshots"] == 1, "the last picture is kept"
        fs.start()
        fs.sh('echo "commit b1 s2" > $MNT/ctl')
        state_when(mon.url, lambda s: "daemon" not in s["problems"] and s["snapshots"] == 2,
                   "the monitor did not follow the daemon back")


def test_reset_through_the_api_is_the_daemons():
    with mounted() as fs, monitor(fs.mnt) as mon:
        fs.sh('mkdir $MNT/branches/b1 && echo s1 > $MNT/branches/b1/commit && '
              'echo s2 > $MNT/branches/b1/commit && echo "branch b2 s2" > $MNT/ctl && '
              'touch "$(readlink $MNT/branches/b1/tree)/scratch"')
        status, reply = call(mon.url, "POST", "/api/reset", {"branch": "b1", "id": "s1"})
        assert status == 200 and reply["ok"], reply
        assert (fs.mnt / "branches" / "b1" / "parent").read_text() == "s1\n"
        assert (fs.mnt / "branches" / "b1" / "status").read_text() == ""
        state_when(mon.url, lambda s: {"name": "b1", "parent": "s1"} in s["branches"],
                   "the branch table did not follow the reset")
        status, reply = call(mon.url, "POST", "/api/reset", {"branch": "nope", "id": "s1"})
        assert status == 404 and reply["errno"] == "ENOENT", reply
        status, reply = call(mon.url, "POST", "/api/reset", {"branch": "b1", "id": "nope"})
        assert status == 404 and reply["errno"] == "ENOENT", reply
        assert (fs.mnt / "branches" / "b1" / "parent").read_text() == "s1\n"


def test_operations_and_metrics_come_from_the_daemon():
    """The last operations are the daemon's MNT/events, /metrics its MNT/metrics."""
    with mounted() as fs, monitor(fs.mnt) as mon:
        fs.sh('mkdir $MNT/branches/b1 && echo "commit b1 s1 reward=0.5" > $MNT/ctl')
        state = state_when(mon.url, lambda s: any(e["op"] == "commit" for e in s["events"]),
                           "no commit among the operations")
        commit = next(e for e in state["events"] if e["op"] == "commit")
        assert commit["result"] == "ok" and commit["latency_ms"] > 0 and commit["id"] == "s1"
        assert state["problems"] == {}
        status, body = call(mon.url, path="/metrics")
        assert status == 200 and b"cascowfs_snapshots 1" in body.replace(b".0", b"")


NOBODY = 65534
FLOOD_SECONDS = 2.0  # 8 reads of MNT/events by the monitor, each finding 100 new refusals
FLOOD_SCRIPT = r"""
import errno, json, os, sys, time
mnt, seconds = sys.argv[1], float(sys.argv[2])
results = {}
fd = os.open(f"{mnt}/ctl", os.O_WRONLY)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        os.write(fd, b"commit rootwork ROOT_COMMIT_9\n")
        name = "ok"
    except OSError as exc:
        name = errno.errorcode[exc.errno]
    results[name] = results.get(name, 0) + 1
os.close(fd)
print(json.dumps(results))
"""


def test_a_flood_of_refused_commands_leaves_roots_operations_in_the_monitor():
    """Any user may write ctl: `nobody` sending `commit rootwork ...` for two seconds, each
    refused with EPERM, leaves root's operations in /api/events and /api/state and alone in
    the latency chart; nobody's own are shown with its uid, never as root's."""
    from cascowfs.events import OUTSIDER_EVENTS_KEPT
    from cascowfs.monitor.tracker import OUTSIDER_EVENTS, SERVED_EVENTS

    with mounted() as fs, monitor(fs.mnt) as mon:
        fs.sh('mkdir -p $BASE/src && echo one > $BASE/src/a && '
              'echo "import base $BASE/src" > $MNT/ctl && echo "branch rootwork base" > $MNT/ctl'
              ' && echo "commit rootwork r1" > $MNT/ctl && echo "branch other r1" > $MNT/ctl'
              ' && echo "commit other r2" > $MNT/ctl')
        ours = [("import", "base"), ("branch", "rootwork"), ("commit", "r1"),
                ("branch", "other"), ("commit", "r2")]

        def root_ops(events: list[dict]) -> list[tuple[str, str]]:
            return [(e["op"], e["id"] if e["op"] != "branch" else e["names"][0])
                    for e in events if e["uid"] is None]

        state_when(mon.url, lambda s: root_ops(s["events"]) == ours, "root's operations")
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        proc = subprocess.run([python, "-c", FLOOD_SCRIPT, str(fs.mnt), str(FLOOD_SECONDS)],
                              capture_output=True, text=True, user=NOBODY, group=NOBODY,
                              extra_groups=[], timeout=120)
        assert proc.returncode == 0, proc.stderr
        sent = json.loads(proc.stdout)
        assert list(sent) == ["EPERM"] and sent["EPERM"] > 10 * SERVED_EVENTS, sent
        last_dropped = sent["EPERM"] - OUTSIDER_EVENTS_KEPT  # as the daemon's last line says

        def caught_up(state: dict) -> bool:
            return state["events"][-1].get("dropped") == last_dropped
        state = state_when(mon.url, caught_up, "the monitor never read the flood's end")

        status, kept = call(mon.url, path=f"/api/events?limit={SERVED_EVENTS}")
        assert status == 200
        assert root_ops(kept) == ours, "root's operations were pushed out"
        outsiders = [e for e in kept if e["uid"] is not None]
        assert len(outsiders) == OUTSIDER_EVENTS
        assert {(e["uid"], e["op"], tuple(e["names"]), e["id"], e["result"])
                for e in outsiders} == {(NOBODY, "commit", ("rootwork",), "ROOT_COMMIT_9", "EPERM")}
        assert [e["uid"] for e in state["events"]] == [NOBODY] * 10
        assert root_ops(state["latency"]) == ours and len(state["latency"]) == len(ours)

        fs.sh('echo "commit rootwork r3" > $MNT/ctl')
        state = state_when(mon.url, lambda s: s["events"][-1]["id"] == "r3", "root's next commit")
        assert state["events"][-1]["uid"] is None
        assert root_ops(state["latency"]) == [*ours, ("commit", "r3")]
        assert (fs.mnt / "branches" / "rootwork" / "parent").read_text() == "r3\n"
