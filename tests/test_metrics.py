"""MNT/metrics, MNT/events and the operation log on a real mount, and the Grafana dashboard
over the metrics: names and labels as docs/interface.md gives them, what an operation moves,
hostile names kept valid JSON, and ``tail -f`` on the events."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusehelpers import Cascow, mounted, needs_fuse
from support.metrics import sample, scrape

pytestmark = needs_fuse

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docs" / "grafana" / "cascowfs.json"
EVENT_KEYS = {"time", "time_ns", "op", "names", "result", "latency_ms", "id"}
AGREED_FAMILIES = {
    "cascowfs_operation_seconds": "histogram",
    "cascowfs_branches": "gauge",
    "cascowfs_snapshots": "gauge",
    "cascowfs_layers": "gauge",
    "cascowfs_pending_merges": "gauge",
    "cascowfs_store_bytes": "gauge",
    "cascowfs_dedup_ratio": "gauge",
    "cascowfs_wal_replays": "counter",
    "cascowfs_errors": "counter",
    "cascowfs_fuse_requests": "counter",
}


@pytest.fixture(scope="module")
def fs():
    with mounted() as fs:
        os.mkdir(fs.mnt / "branches" / "main")
        (fs.mnt / "branches" / "main" / "tree" / "f").write_text("first\n")
        code, reply = fs.ctl("commit main base")
        assert code == 0, reply
        yield fs


def events(fs: Cascow) -> list[dict]:
    return [json.loads(line) for line in (fs.mnt / "events").read_bytes().splitlines()]


def commit(fs: Cascow, branch: str, id: str) -> None:
    (fs.mnt / "branches" / branch / "tree" / id).write_text(id)
    code, reply = fs.ctl(f"commit {branch} {id}")
    assert code == 0, reply


# -- MNT/metrics -------------------------------------------------------------------------------
def test_metrics_families_and_labels_are_the_agreed_ones(fs):
    text = (fs.mnt / "metrics").read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {n: f.type for n, f in families.items()} == AGREED_FAMILIES
    label_names = {
        f.name: {k for s in f.samples for k in s.labels if k != "le"} for f in families.values()
    }
    assert label_names["cascowfs_operation_seconds"] == {"op", "result"}
    assert label_names["cascowfs_store_bytes"] == {"kind"}
    assert {s.labels["kind"] for s in families["cascowfs_store_bytes"].samples} == {
        "logical",
        "stored",
    }
    assert label_names["cascowfs_fuse_requests"] == {"op"}
    assert "# TYPE cascowfs_operation_seconds histogram" in text


def test_commit_moves_its_histogram_and_the_snapshot_count_only(fs):
    before = scrape(fs.mnt)
    commit(fs, "main", "moved-1")
    after = scrape(fs.mnt)
    count = "cascowfs_operation_seconds_count"
    assert sample(after, count, op="commit", result="ok") == (
        sample(before, count, op="commit", result="ok") + 1
    )
    inf = sample(after, "cascowfs_operation_seconds_bucket", op="commit", result="ok", le="+Inf")
    assert inf == sample(after, count, op="commit", result="ok")
    assert sample(after, "cascowfs_operation_seconds_sum", op="commit", result="ok") > sample(
        before, "cascowfs_operation_seconds_sum", op="commit", result="ok"
    )
    assert sample(after, "cascowfs_snapshots") == sample(before, "cascowfs_snapshots") + 1
    assert sample(after, "cascowfs_branches") == sample(before, "cascowfs_branches")
    moved = {k for k in after if after[k] != before.get(k, 0.0) and "operation_seconds" in k[0]}
    assert {dict(k[1])["op"] for k in moved} == {"commit"}
    assert after[("cascowfs_store_bytes", (("kind", "logical"),))] > 0


def test_failed_operation_counts_its_errno(fs):
    before = scrape(fs.mnt)
    code, reply = fs.ctl("commit main base")  # the id is taken
    assert code == errno.EEXIST, reply
    code, reply = fs.ctl("branch main base")  # so is the name
    assert code == errno.EEXIST, reply
    after = scrape(fs.mnt)
    count = "cascowfs_operation_seconds_count"
    assert sample(after, count, op="commit", result="EEXIST") == (
        sample(before, count, op="commit", result="EEXIST") + 1
    )
    assert sample(after, count, op="branch", result="EEXIST") == (
        sample(before, count, op="branch", result="EEXIST") + 1
    )
    assert sample(after, "cascowfs_errors_total", errno="EEXIST") == (
        sample(before, "cascowfs_errors_total", errno="EEXIST") + 2
    )


def test_every_ctl_verb_is_measured_under_its_own_name(fs):
    src = fs.base / "src"
    (src / "d").mkdir(parents=True, exist_ok=True)
    (src / "d" / "x").write_text("x")
    for line in (
        f"import verbs-imported {src}",
        "branch verbs verbs-imported",
        "commit verbs verbs-c1",
        "rebase verbs verbs-imported",
        "discard verbs",
        "prune verbs-c1",
        "gc",
    ):
        code, reply = fs.ctl(line)
        assert code == 0, (line, reply)
    after = scrape(fs.mnt)
    for op in ("import", "branch", "commit", "rebase", "discard", "prune", "gc"):
        assert sample(after, "cascowfs_operation_seconds_count", op=op, result="ok") >= 1, op


def test_fuse_requests_are_counted_by_operation(fs):
    before = scrape(fs.mnt)
    for _ in range(5):
        os.stat(fs.mnt / "snapshots" / "base" / "f")
        os.listdir(fs.mnt / "snapshots")
    after = scrape(fs.mnt)
    name = "cascowfs_fuse_requests_total"
    assert sample(after, name, op="opendir") >= sample(before, name, op="opendir") + 5
    assert sample(after, name, op="readdir") >= sample(before, name, op="readdir") + 5


def test_one_open_file_reads_one_scrape(fs):
    fd = os.open(fs.mnt / "metrics", os.O_RDONLY)
    try:
        head = os.read(fd, 200)
        commit(fs, "main", "during-read")
        parts = [head]
        while chunk := os.read(fd, 200):
            parts.append(chunk)
    finally:
        os.close(fd)
    held = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(b"".join(parts).decode())
        for s in f.samples
    }
    assert sample(held, "cascowfs_snapshots") == sample(scrape(fs.mnt), "cascowfs_snapshots") - 1


def test_metrics_reads_to_eof_with_cat_and_is_read_only(fs):
    cat = subprocess.run(["cat", str(fs.mnt / "metrics")], capture_output=True, check=True)
    assert b"cascowfs_snapshots " in cat.stdout and cat.stdout.endswith(b"\n")
    st = os.stat(fs.mnt / "metrics")
    assert st.st_mode & 0o777 == 0o444 and st.st_size == 0  # generated at open, as in /proc
    for name in ("metrics", "events"):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            assert err_of(os.open, fs.mnt / name, flags) == errno.EACCES, (name, flags)
        assert err_of(os.unlink, fs.mnt / name) == errno.EPERM
    assert sorted(os.listdir(fs.mnt)) == [
        "branches", "ctl", "episodes", "events", "metrics", "observations", "snapshots"
    ]


# -- MNT/events --------------------------------------------------------------------------------
def test_fresh_read_lists_the_operations_oldest_first(fs):
    commit(fs, "main", "evt-1")
    code, _ = fs.ctl("prune no-such-snapshot")
    assert code == errno.ENOENT
    lines = events(fs)
    assert all(set(e) == EVENT_KEYS for e in lines)
    assert [e["time_ns"] for e in lines] == sorted(e["time_ns"] for e in lines)
    *_, ok, failed = lines
    assert (ok["op"], ok["names"], ok["result"], ok["id"]) == ("commit", ["main"], "ok", "evt-1")
    assert (failed["op"], failed["result"], failed["id"]) == ("prune", "ENOENT", "no-such-snapshot")
    assert ok["latency_ms"] > 0
    assert ok["time"].endswith("Z") and ok["time"][:4] == time.strftime("%Y", time.gmtime())


def test_commit_without_id_records_the_generated_one(fs):
    (fs.mnt / "branches" / "main" / "tree" / "gen").write_text("g")
    (fs.mnt / "branches" / "main" / "commit").write_text("\n")
    made = (fs.mnt / "branches" / "main" / "commit").read_text().strip()
    last = events(fs)[-1]
    assert (last["op"], last["result"], last["id"]) == ("commit", "ok", made)


def test_open_reader_gets_new_lines_at_eof(fs):
    with open(fs.mnt / "events", "rb", buffering=0) as reader:
        kept = reader.read()
        assert kept.endswith(b"\n")
        assert reader.read() == b""  # EOF until something happens
        commit(fs, "main", "followed-1")
        code, _ = fs.ctl("discard no-such-branch")
        assert code == errno.ENOENT
        new = [json.loads(line) for line in reader.read().splitlines()]
    assert [(e["op"], e["result"]) for e in new] == [("commit", "ok"), ("discard", "ENOENT")]
    assert new[0]["id"] == "followed-1"


def test_tail_follows_the_events(fs):
    tail = subprocess.Popen(
        ["tail", "-n", "0", "-s", "0.1", "-f", str(fs.mnt / "events")],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)  # tail's first read; a commit before it would not be "new"
        commit(fs, "main", "tailed-1")
        assert tail.stdout is not None
        # tail polls fstat and reads once the size grew
        ready, _, _ = select.select([tail.stdout], [], [], 30)
        assert ready, "tail -f printed nothing within 30 s"
        line = json.loads(tail.stdout.readline())
        assert (line["op"], line["id"]) == ("commit", "tailed-1")
    finally:
        tail.kill()
        tail.wait()


HOSTILE_NAMES = [
    b'quo"te',
    b"new\nline",
    b"back\\slash",
    b"\xff\xfe not utf-8",
    b"\xed\xa0\x80 surrogate",  # UTF-8 of a lone surrogate: not valid UTF-8
    b"tab\tand\x01control",
    "ünïcødé".encode(),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_names_stay_valid_json(fs, name):
    path = os.path.join(bytes(fs.mnt), b"branches", name)
    assert err_of(os.mkdir, path) == errno.EINVAL
    raw = (fs.mnt / "events").read_bytes()
    lines = raw.split(b"\n")[:-1]
    assert raw.isascii()
    parsed = [json.loads(line.decode("utf-8", "strict")) for line in lines]
    shown = os.fsdecode(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    last = parsed[-1]
    assert (last["op"], last["names"], last["result"]) == ("branch", [shown], "EINVAL")
    json.dumps(last, ensure_ascii=False).encode("utf-8", "strict")  # no lone surrogate


def test_hostile_ctl_lines_stay_valid_json(fs):
    for line in (b'commit "a\\"b', b"commit \xff", b"x" * 5000, b"gc extra\n"):
        code, _ = fs.ctl(line)
        assert code == errno.EINVAL
    tail = (fs.mnt / "events").read_bytes().splitlines()[-4:]
    parsed = [json.loads(line) for line in tail]
    assert [(e["op"], e["result"]) for e in parsed] == [
        ("commit", "EINVAL"),
        ("commit", "EINVAL"),
        ("unknown", "EINVAL"),
        ("gc", "EINVAL"),
    ]


# -- the operation log -------------------------------------------------------------------------
def op_lines(fs: Cascow) -> list[dict]:
    out = []
    for line in fs.log.read_text(errors="strict").splitlines():
        if '"logger":"cascowfs.ops"' in line:
            out.append(json.loads(line))
    return out


def test_log_has_one_json_line_per_operation_with_latency(fs):
    commit(fs, "main", "logged-1")
    code, _ = fs.ctl("branch main base")
    assert code == errno.EEXIST
    *_, ok, failed = op_lines(fs)
    assert (ok["level"], ok["op"], ok["id"], ok["command"]) == (
        "INFO",
        "commit",
        "logged-1",
        "commit main logged-1",
    )
    assert ok["latency_ms"] > 0 and "commit ok in" in ok["message"]
    assert (failed["level"], failed["result"], failed["command"]) == (
        "WARNING",
        "EEXIST",
        "branch main base",
    )
    assert "already exists" in failed["message"]
    for line in fs.log.read_text().splitlines():
        if line.startswith("{"):
            json.loads(line)


def test_text_log_format_names_the_command():
    with mounted("--log-format", "text") as fs:
        code, _ = fs.ctl("prune nothing-here")
        assert code == errno.ENOENT
        fs.stop()
        text = fs.log.read_text()
    line = next(line for line in text.splitlines() if "cascowfs.ops" in line)
    assert "WARNING" in line and "prune nothing-here" in line and "ENOENT" in line
    assert not any(line.startswith("{") for line in text.splitlines())



def test_text_log_lines_cannot_be_forged_or_lost():
    """A command holds what a caller wrote: a quoted newline that would start a forged line,
    an escape sequence, bytes that are not UTF-8. Each failed command is one line, escaped."""
    forged = "2026-12-07 13:30:00,000 cascowfs.ops INFO prune ok in 1.0 ms: prune s1"
    with mounted("--log-format", "text") as fs:
        for line in (f"prune 'x\n{forged}'".encode(), b"prune x\x1b[2J", b"prune e\xff"):
            assert fs.ctl(line)[0] == errno.EINVAL
        fs.stop()
        text = fs.log.read_text(encoding="utf-8")
    assert "Logging error" not in text and "\x1b" not in text
    assert not any(line.startswith(forged) for line in text.splitlines())
    ops = [line for line in text.splitlines() if "cascowfs.ops WARNING prune" in line]
    assert [line.split(" ms: ", 1)[1] for line in ops] == [
        f"prune 'x\\n{forged}': one command per write: got several lines",
        "prune x\\x1b[2J: invalid snapshot id 'x\\x1b[2J': must match "
        "[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
        "prune e\\xff: command is not UTF-8",
    ]


def test_wal_replays_counts_the_operation_a_kill_left(monkeypatch):
    with mounted() as fs:
        os.mkdir(fs.mnt / "branches" / "b")
        (fs.mnt / "branches" / "b" / "tree" / "f").write_text("x")
        assert sample(scrape(fs.mnt), "cascowfs_wal_replays_total") == 0
        fs.stop()
        monkeypatch.setenv("CASCOWFS_CRASH_AT", "commit.applied")
        fs.start()
        with pytest.raises(OSError):  # the daemon dies by SIGKILL inside the commit
            fs.ctl("commit b killed")
        assert fs.proc is not None
        fs.proc.wait(timeout=60)
        monkeypatch.delenv("CASCOWFS_CRASH_AT")
        fs.start()
        samples = scrape(fs.mnt)
        assert sample(samples, "cascowfs_wal_replays_total") == 1
        assert sample(samples, "cascowfs_snapshots") == 1  # applied: rolled forward


# -- the Grafana dashboard ---------------------------------------------------------------------
def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    return {name for e in exprs for name in re.findall(r"\bcascowfs_[a-z_]+", e)}


def test_dashboard_queries_only_exported_metrics(fs):
    commit(fs, "main", "dash-1")
    fs.ctl("commit main dash-1")  # an error, so that the errors counter has a sample
    exported = {name for name, _ in scrape(fs.mnt)}
    queried = dashboard_metrics()
    assert queried <= exported, queried - exported
    wanted = {"cascowfs_operation_seconds_bucket", "cascowfs_operation_seconds_count",
              "cascowfs_branches", "cascowfs_snapshots", "cascowfs_dedup_ratio",
              "cascowfs_errors_total"}
    assert wanted <= queried, wanted - queried


def err_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


# -- a flood of refusals -----------------------------------------------------------------------
NOBODY = 65534
FLOOD_SCRIPT = r"""
import errno, json, os, sys
mnt, count = sys.argv[1], int(sys.argv[2])
results = {}
def tally(fn, *args):
    try:
        fn(*args)
        results["ok"] = results.get("ok", 0) + 1
    except OSError as exc:
        name = errno.errorcode[exc.errno]
        results[name] = results.get(name, 0) + 1
fd = os.open(f"{mnt}/ctl", os.O_WRONLY)
for i in range(count):
    tally(os.write, fd, b"branch flood%d base\n" % i)
os.close(fd)
for i in range(20):
    tally(os.mkdir, f"{mnt}/branches/flood-dir{i}")
print(json.dumps(results))
"""


def test_a_flood_of_refused_changes_pushes_no_real_operation_out(fs):
    """Any user may write to ctl: a user outside root and the admin group sending thousands
    of refused commands leaves the operations of root in MNT/events; its own events are
    kept under a cap of their own, name its uid and count those dropped."""
    from cascowfs.events import EVENTS_KEPT, OUTSIDER_EVENTS_KEPT

    commit(fs, "main", "before-flood")
    sent = 3 * EVENTS_KEPT
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.run([python, "-c", FLOOD_SCRIPT, str(fs.mnt), str(sent)],
                          capture_output=True, text=True, user=NOBODY, group=NOBODY,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"EPERM": sent + 20}
    commit(fs, "main", "after-flood")
    lines = events(fs)
    assert [e["time_ns"] for e in lines] == sorted(e["time_ns"] for e in lines)
    real = [e for e in lines if "uid" not in e]
    assert [e["id"] for e in real][-2:] == ["before-flood", "after-flood"]
    # the module's first operation (mkdir branches/main) is still there
    assert (real[0]["op"], real[0]["names"]) == ("branch", ["main"]), real[0]
    assert all(set(e) == EVENT_KEYS for e in real)
    refused = [e for e in lines if "uid" in e]
    assert len(refused) == OUTSIDER_EVENTS_KEPT
    assert {(e["uid"], e["result"]) for e in refused} == {(NOBODY, "EPERM")}
    assert refused[-1]["op"] == "branch" and refused[-1]["names"] == ["flood-dir19"]
    assert refused[-1]["dropped"] == sent + 20 - OUTSIDER_EVENTS_KEPT
