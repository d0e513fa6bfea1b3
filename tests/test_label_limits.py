"""Labels stay within caps that keep a snapshot root's whole xattr list under the kernel's
64 KiB: property tests around the caps, EINVAL beyond them through the mount, and a store
holding a record beyond them (or one that does not decode) still lists every other snapshot."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs import Client
from cascowfs.errors import InvalidArgumentError
from cascowfs.fuse.snapshot_view import root_xattrs
from cascowfs.model import SnapshotInfo
from cascowfs.names import MAX_LABEL_VALUE_CHARS, MAX_LABELS, MAX_LABELS_BYTES, check_labels
from conftest import hypothesis_settings, open_store
from fusehelpers import mounted, needs_fuse, run_cli

XATTR_LIST_MAX = XATTR_SIZE_MAX = 65536  # the kernel's limits (include/uapi/linux/limits.h)
LONGEST_ID = "s" * 128


def _xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in os.listxattr(path)}


def _rewrite_record(store: Path, snap: str, rewrite) -> None:
    """Change a snapshot's record straight in LMDB, as an older version could have written it."""
    with open_store(store) as sm:
        def put(txn):
            db = sm.db.db("snapshots")
            txn.put(snap.encode(), rewrite(json.loads(txn.get(snap.encode(), db=db))), db=db)
        sm.db.write(put)


def _with_labels(labels: dict[str, str]):
    return lambda rec: json.dumps({**rec, "labels": labels}).encode()


@needs_fuse
def test_one_record_beyond_the_label_caps_breaks_no_listing():
    def populate(fs):
        src = fs.base / "src"
        src.mkdir()
        (src / "f").write_text("x\n")
        with open_store(fs.store) as sm:
            for snap in ("a", "bad", "broken", "c"):
                sm.import_tree(src, snap, {"n": snap})
        _rewrite_record(fs.store, "bad",
                        _with_labels({f"label{i:04d}": "v" * 20 for i in range(3000)}))
        _rewrite_record(fs.store, "broken",
                        lambda rec: json.dumps({k: v for k, v in rec.items() if k != "files"})
                        .encode())

    with mounted(populate=populate) as fs, Client(fs.mnt) as client:
        bad = fs.mnt / "snapshots" / "bad"
        shown = _xattrs(bad)  # listxattr fits: the labels are left out, the error says why
        assert "labels not shown" in shown["user.cascowfs.error"].decode()
        assert client.snapshot("bad").labels == {} and client.snapshot("bad").error
        assert client.snapshot("a").labels == {"n": "a"}
        assert client.snapshots() == ["a", "bad", "c"]  # "broken" is left out, with a log line
        assert "'broken'" in fs.log_text() and "does not decode" in fs.log_text()
        listing = run_cli("ls", str(fs.mnt)).stdout
        assert all(snap in listing for snap in ("a", "bad", "c")) and "error=" in listing
        lines = [json.loads(line) for line in run_cli("ls", "--json", str(fs.mnt)).stdout.splitlines()]
        assert {s["id"]: s["labels"] for s in lines if s["type"] == "snapshot"} == \
            {"a": {"n": "a"}, "bad": {}, "c": {"n": "c"}}
        assert run_cli("log", str(fs.mnt), "bad").stdout.startswith("bad ")
        subprocess.run(["getfattr", "-d", "-m", "-", str(bad)], check=True, capture_output=True)


# -- label caps -------------------------------------------------------------------------------
def _size(labels: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())


PER_LABEL_BYTES = MAX_LABELS_BYTES // MAX_LABELS  # a set of MAX_LABELS of these is at the cap


@hypothesis_settings(300)
@given(st.integers(MAX_LABELS - 3, MAX_LABELS + 3),
       st.integers(PER_LABEL_BYTES - 8, PER_LABEL_BYTES + 8),
       st.sampled_from(["a", "\u00e9", "\u6f22", "\U0001f600"]))
def test_labels_are_accepted_exactly_within_the_caps(count, per_label_bytes, char):
    """Label sets around both caps: accepted exactly when within them, and then the whole list
    that getfattr -d reads fits the kernel's limits with every recorded name at its longest."""
    labels = {f"k{i:03d}": char * ((per_label_bytes - 4) // len(char.encode()))
              for i in range(count)}
    fits = len(labels) <= MAX_LABELS and _size(labels) <= MAX_LABELS_BYTES
    if not fits:
        with pytest.raises(InvalidArgumentError) as exc:
            check_labels(labels)
        assert "at most" in exc.value.message
        return
    assert check_labels(labels) == labels
    served = root_xattrs(SnapshotInfo(LONGEST_ID, "f" * 64, LONGEST_ID, 2**63, 2**63, 2**63,
                                      labels))
    assert b"user.cascowfs.error" not in served
    assert sum(len(name) + 1 + len(value) for name, value in served.items()) <= XATTR_LIST_MAX
    assert max(len(value) for value in served.values()) <= XATTR_SIZE_MAX


def test_a_value_of_the_longest_length_is_accepted():
    labels = {"k": "\U0001f600" * MAX_LABEL_VALUE_CHARS}
    assert check_labels(labels) == labels


@hypothesis_settings(100)
@given(st.dictionaries(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", fullmatch=True),
                       st.text(max_size=MAX_LABEL_VALUE_CHARS), max_size=MAX_LABELS + 20))
def test_any_accepted_label_set_fits_the_kernels_xattr_list(labels):
    try:
        check_labels(labels)
    except InvalidArgumentError:
        return
    served = root_xattrs(SnapshotInfo(LONGEST_ID, "f" * 64, LONGEST_ID, 1, 1, 1, labels))
    assert b"user.cascowfs.error" not in served
    assert sum(len(name) + 1 + len(value) for name, value in served.items()) <= XATTR_LIST_MAX


@pytest.mark.parametrize("labels", [
    {"k": "x" * (MAX_LABEL_VALUE_CHARS + 1)},
    {"k": "a\rb"}, {"k": "a\tb"}, {"k": "a\x7fb"}, {"bad key": "v"}, {"k" * 65: "v"},
])
def test_bad_labels_are_refused(labels):
    with pytest.raises(InvalidArgumentError):
        check_labels(labels)


@needs_fuse
def test_commit_beyond_the_caps_is_einval_and_at_the_caps_is_listable():
    with mounted() as fs, Client(fs.mnt) as client:
        client.branch("agent")
        words = " ".join(f"k{i}=v" for i in range(MAX_LABELS + 1))
        code, reply = fs.ctl(f"commit agent over {words}")
        assert code == errno.EINVAL and f"at most {MAX_LABELS}" in reply, reply
        assert "over" not in client.snapshots()
        big = {f"k{i:03d}": "x" * ((MAX_LABELS_BYTES // MAX_LABELS) - 4) for i in range(MAX_LABELS)}
        assert _size(big) <= MAX_LABELS_BYTES
        client.commit("agent", "full", big)
        assert client.snapshot("full").labels == big
        dump = subprocess.run(["getfattr", "-d", "-m", "-", str(fs.mnt / "snapshots" / "full")],
                              check=True, capture_output=True, text=True).stdout
        assert dump.count("user.cascowfs.label.") == MAX_LABELS


@needs_fuse
def test_the_longest_labels_are_kept_found_and_survive_a_restart(tmp_path):
    """A label's key, value and snapshot id at their longest run past LMDB's 511-byte keys
    in the index ``find --sort`` reads: every path that records labels (commit, import,
    label) keeps them, and the store mounts again, after a clean stop and after kill -9."""
    key, value = "k" * 64, "\u00e9" * MAX_LABEL_VALUE_CHARS
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    with mounted() as fs:
        with Client(fs.mnt) as client:
            client.branch("agent")
            client.commit("agent", LONGEST_ID, {key: value, "note": "b" * 600})
            client.import_tree(tmp_path / "src", "imported", {"note": "b" * 599 + "c"})
            client.label(LONGEST_ID, {"more": "m" * 4096})
            client.label("imported", {"note": "b" * 600 + "a"})
            root = fs.mnt / "snapshots" / LONGEST_ID
            assert os.getxattr(root, "user.cascowfs.label.more") == b"m" * 4096
            assert client.find("note>" + "b" * 600, sort="-note") == ["imported"]
            assert client.find(sort="note", limit=2) == [LONGEST_ID, "imported"]
        fs.stop()
        fs.start()
        with Client(fs.mnt) as client:
            client.label(LONGEST_ID, {"late": "l" * 4096})
            fs.kill9()
            fs.start()
            info = client.snapshot(LONGEST_ID)
            assert info.labels == {key: value, "note": "b" * 600, "more": "m" * 4096,
                                   "late": "l" * 4096}
            assert client.find("has:late", sort="-" + key) == [LONGEST_ID]
    assert "Error" not in fs.log_text(), fs.log_text()
