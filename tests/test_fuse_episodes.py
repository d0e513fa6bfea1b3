"""The episode store through a real mount: ctl's label/reset/find/children, MNT/episodes,
MNT/observations, the client's methods and the CLI verbs, and hostile words on every one."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading

import pytest

from cascowfs import Client
from cascowfs.cli import exit_status
from cascowfs.errors import BusyError, InvalidArgumentError, NotFoundError
from fusehelpers import CLI, mounted, needs_fuse, run_cli

pytestmark = needs_fuse


def _populate(fs) -> None:
    src = fs.base / "src"
    src.mkdir()
    (src / "f").write_text("root\n")


@pytest.fixture(scope="module")
def fs():
    with mounted(populate=_populate) as fs:
        with Client(fs.mnt) as c:
            c.import_tree(fs.base / "src", "root", {"reward": "0"})
            tree = c.branch("agent", "root")
            for n, reward in enumerate(["0.7", "0.2", "0.9"]):
                (tree / f"step{n}").write_text(f"{n}\n")
                c.commit("agent", f"s{n}", {"reward": reward, "action": f"act-{n}"})
        yield fs


def test_label_through_ctl_client_and_cli_shows_on_the_snapshot_root(fs):
    assert fs.ctl("label s0 visits=1 'plan=fix the parser'") == (0, "ok s0")
    with Client(fs.mnt) as c:
        c.label("s0", {"visits": "2"})
        assert c.snapshot("s0").labels == {"reward": "0.7", "action": "act-0", "visits": "2",
                                           "plan": "fix the parser"}
    run_cli("label", str(fs.mnt), "s0", "plan=", "visits=3")
    root = fs.mnt / "snapshots" / "s0"
    assert os.getxattr(root, "user.cascowfs.label.visits") == b"3"
    with pytest.raises(OSError) as exc:
        os.getxattr(root, "user.cascowfs.label.plan")
    assert exc.value.errno == errno.ENODATA
    assert "user.cascowfs.obs" not in os.listxattr(root)


@pytest.mark.parametrize("line", [
    "label", "label s0", "label s0 novalue", "label ../s0 k=v", "label s0 obs=1",
    "label s0 'k=a\x01b'", "label s0 -k=1", "reset agent", "reset ../agent s0",
    "reset agent s0 extra", "find --limit x", "find 'a b'", "find --parent s0 --ancestor s0",
    "children a b", "children ../x", "commit agent obs=@relative/path", "find has:",
    "commit agent obs=@/a obs=@/b",
])
def test_hostile_commands_are_einval_and_change_nothing(fs, line):
    def state():
        with Client(fs.mnt) as c:
            return sorted(os.listdir(fs.mnt / "snapshots")), c.snapshot("s1").labels

    before = state()
    code, reply = fs.ctl(line)
    assert code == errno.EINVAL and reply.startswith("error EINVAL"), (line, reply)
    assert state() == before


def test_find_and_children_answer_in_the_order_asked(fs):
    assert fs.ctl("find reward>0.5 --sort -reward") == (0, "ok s2 s0")
    assert fs.ctl("find --ancestor root --sort reward --limit 2") == (0, "ok s1 s0")
    assert fs.ctl("find action=act-1") == (0, "ok s1")
    assert fs.ctl("find reward>5") == (0, "ok")
    assert fs.ctl("children s0") == (0, "ok s1")
    assert fs.ctl("children") == (0, "ok root")
    assert fs.ctl("find --parent nope")[1].startswith("error ENOENT")
    with Client(fs.mnt) as c:
        assert c.find("has:reward", sort="-reward", limit=1) == ["s2"]
        assert c.find(parent="s1") == ["s2"]
        assert c.children("root") == ["s0"]
        with pytest.raises(InvalidArgumentError):
            c.find("reward")
    out = run_cli("find", str(fs.mnt), "reward>=0.2", "--sort", "reward").stdout.split()
    assert out == ["s1", "s0", "s2"]
    for sort in (["--sort", "-reward"], ["--sort=-reward"]):  # as documented, and joined
        out = run_cli("find", str(fs.mnt), "reward>=0.2", *sort).stdout.split()
        assert out == ["s2", "s0", "s1"], sort
    # predicates after options, as through ctl
    out = run_cli("find", str(fs.mnt), "--sort", "-reward", "reward>=0.2", "--limit", "2",
                  "has:reward").stdout.split()
    assert out == ["s2", "s0"]
    assert run_cli("find", str(fs.mnt), "--ancestor", "s0", "reward>0").stdout.split() == [
        "s1", "s2"]
    assert run_cli("children", str(fs.mnt), "s1").stdout.split() == ["s2"]


def test_episodes_file_is_json_lines_of_every_snapshot(fs):
    lines = (fs.mnt / "episodes").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records][:4] == ["root", "s0", "s1", "s2"]
    s1 = next(r for r in records if r["id"] == "s1")
    assert set(s1) == {"id", "parent", "created", "created_ns", "labels", "files", "size",
                       "root", "obs"}
    assert s1["parent"] == "s0" and s1["labels"]["reward"] == "0.2" and s1["obs"] is None
    assert s1["root"] == Client(fs.mnt).snapshot("s1").root and s1["created"].endswith("Z")
    assert stat.S_IMODE(os.stat(fs.mnt / "episodes").st_mode) == 0o444
    with pytest.raises(OSError) as exc:
        open(fs.mnt / "episodes", "w")
    assert exc.value.errno in (errno.EACCES, errno.EROFS)


def test_episodes_cli_writes_a_file_with_the_changes(fs, tmp_path):
    out = tmp_path / "eps.jsonl"
    run_cli("episodes", str(fs.mnt), "-o", str(out), "--with-diff")
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["s1"]["changes"] == [{"change": "A", "path": "step1"}]
    assert records["root"]["changes"] == [{"change": "A", "path": "f"}]


def test_show_and_tree(fs):
    shown = json.loads(run_cli("show", str(fs.mnt), "s1", "--json").stdout)
    assert shown["children"] == ["s2"] and shown["parent"] == "s0" and shown["obs"] is None
    assert shown["labels"]["action"] == "act-1" and len(shown["root"]) == 64
    text = run_cli("show", str(fs.mnt), "s1").stdout
    assert "children:   s2" in text and "label:      action=act-1" in text
    tree = run_cli("tree", str(fs.mnt), "--labels", "reward").stdout.splitlines()
    assert tree[:4] == ["root  reward=0", "└── s0  reward=0.7", "    └── s1  reward=0.2",
                        "        └── s2  reward=0.9"]
    below = run_cli("tree", str(fs.mnt), "s1", "--labels", "none").stdout.splitlines()
    assert below == ["s1", "└── s2"]
    missing = run_cli("tree", str(fs.mnt), "nope", check=False)
    assert missing.returncode == exit_status(errno.ENOENT) and "ENOENT" in missing.stderr


def test_reset_through_client_and_cli_drops_changes(fs):
    with Client(fs.mnt) as c:
        tree = c.branch("resetme", "s1")
        (tree / "junk").write_text("x\n")
        with pytest.raises(BusyError):
            c.rebase("resetme", "s0")
        c.reset("resetme", "s0")
        assert c.parent("resetme") == "s0" and c.status("resetme") == []
        assert sorted(os.listdir(tree)) == ["f", "step0"]
        (tree / "junk").write_text("y\n")
        done = json.loads(run_cli("reset", str(fs.mnt), "resetme", "root", "--json").stdout)
        assert done == {"name": "resetme", "parent": "root"}  # as rebase says it
        assert c.parent("resetme") == "root" and sorted(os.listdir(tree)) == ["f"]
        with pytest.raises(NotFoundError):
            c.reset("resetme", "nope")
        c.discard("resetme")


def test_an_observation_is_stored_beside_the_snapshot(fs, tmp_path):
    data = os.urandom(2 << 20) + b"end of trace\n"
    trace = tmp_path / "trace.txt"
    trace.write_bytes(data)
    with Client(fs.mnt) as c:
        tree = c.branch("obs", "s2")
        (tree / "o").write_text("o\n")
        assert c.commit("obs", "with-obs", {"reward": "1"}, obs=trace) == "with-obs"
        assert c.snapshot("with-obs").obs == len(data)
        assert (fs.mnt / "observations" / "with-obs").read_bytes() == data
        assert os.listdir(fs.mnt / "observations") == ["with-obs"]
        assert os.getxattr(fs.mnt / "snapshots" / "with-obs", "user.cascowfs.obs") == \
            str(len(data)).encode()
        assert not (fs.mnt / "snapshots" / "with-obs" / "trace.txt").exists()  # not in the tree
        assert c.find("has:obs") == ["with-obs"]
        assert json.loads(run_cli("show", str(fs.mnt), "with-obs", "--json").stdout)["obs"] \
            == len(data)
        with pytest.raises(OSError) as exc:
            open(fs.mnt / "observations" / "with-obs", "r+b")
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        # the CLI's form, through the branch's commit file too
        (tree / "p").write_text("p\n")
        (tmp_path / "small").write_text("small\n")
        run_cli("commit", str(fs.mnt), "obs", "cli-obs", f"obs=@{tmp_path / 'small'}", "k=v")
        assert (fs.mnt / "observations" / "cli-obs").read_text() == "small\n"
        (tree / "q").write_text("q\n")
        with open(fs.mnt / "branches" / "obs" / "commit", "w") as fh:
            fh.write(f"file-obs obs=@{tmp_path / 'small'}\n")
        assert c.snapshot("file-obs").obs == 6
        with pytest.raises(NotFoundError):
            c.commit("obs", "missing-obs", obs=tmp_path / "missing")
        with pytest.raises(InvalidArgumentError):
            c.commit("obs", "dir-obs", obs=tmp_path)
        assert not {"missing-obs", "dir-obs"} & set(c.snapshots())
        c.reset("obs", "s2")
        c.discard("obs")
        for ident in ("file-obs", "cli-obs", "with-obs"):
            c.prune(ident)
        assert os.listdir(fs.mnt / "observations") == []
        assert not (fs.mnt / "observations" / "with-obs").exists()


def test_episodes_reflect_labels_changed_after_commit(fs):
    with Client(fs.mnt) as c:
        c.label("s2", {"visits": "40"})
        eps = {e["id"]: e for e in c.episodes()}
    assert eps["s2"]["labels"]["visits"] == "40"


def test_agents_labelling_one_node_read_their_own_labels_back_at_once(fs):
    """Four agents back-propagate through the same node through the mount (a label returns
    before LMDB applies it): right after each label, the agent's own value shows in the
    node's xattrs, in find, in the client's snapshot and in MNT/episodes; at the end every
    agent's last value is kept."""
    node = fs.mnt / "snapshots" / "s0"
    problems: list[str] = []

    def agent(n: int) -> None:
        with Client(fs.mnt) as c:
            for step in range(15):
                c.label("s0", {f"visits{n}": str(step)})
                shown = {
                    "xattr": os.getxattr(node, f"user.cascowfs.label.visits{n}").decode(),
                    "find": "s0" if "s0" in c.find(f"visits{n}={step}") else "-",
                    "snapshot": c.snapshot("s0").labels[f"visits{n}"],
                }
                if step % 5 == 0:
                    eps = {e["id"]: e for e in c.episodes()}
                    shown["episodes"] = eps["s0"]["labels"][f"visits{n}"]
                expected = {k: "s0" if k == "find" else str(step) for k in shown}
                if shown != expected:
                    problems.append(f"agent {n} step {step}: {shown}")

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    with Client(fs.mnt) as c:
        labels = c.snapshot("s0").labels
    assert [labels[f"visits{n}"] for n in range(4)] == ["14"] * 4


def test_line_separators_in_labels_and_names_keep_one_record_a_line(fs, tmp_path):
    """A label value or a file name may hold U+2028, U+2029 and U+0085: the records keep one
    a line, whether a reader splits at newlines only or as str.splitlines() does."""
    odd = "a\u2028b\u2029c\u0085d"
    with Client(fs.mnt) as c:
        tree = c.branch("seps", "s2")
        (tree / odd).write_text("x")
        c.commit("seps", "sep", {"note": odd})
        assert c.episodes()[-1]["labels"]["note"] == odd
    out = tmp_path / "eps.jsonl"
    run_cli("episodes", str(fs.mnt), "-o", str(out), "--with-diff")
    records = [json.loads(line) for line in out.read_bytes().split(b"\n") if line]
    assert records[-1]["id"] == "sep" and records[-1]["labels"]["note"] == odd
    assert records[-1]["changes"] == [{"change": "A", "path": odd}]
    printed = run_cli("episodes", str(fs.mnt)).stdout
    assert json.loads(printed.split("\n")[-2])["labels"]["note"] == odd


def test_episodes_with_diff_of_a_snapshot_whose_parent_was_pruned(fs, tmp_path):
    """Its parent's tree is gone, so no change list can be made: `changes` is null, and the
    export goes on (it ended with ENOENT, the file half written)."""
    with Client(fs.mnt) as c:
        tree = c.branch("orphaning", "s2")
        (tree / "one").write_text("1\n")
        c.commit("orphaning", "gone-parent")
        (tree / "two").write_text("2\n")
        c.commit("orphaning", "orphan")
        c.discard("orphaning")
        c.prune("gone-parent")
    out = tmp_path / "eps.jsonl"
    run_cli("episodes", str(fs.mnt), "-o", str(out), "--with-diff")
    lines = out.read_text().split("\n")[:-1]  # a label may hold U+2028: no splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    assert records["orphan"]["parent"] == "gone-parent" and records["orphan"]["changes"] is None
    assert records["s1"]["changes"] == [{"change": "A", "path": "step1"}]
    with Client(fs.mnt) as c:  # a root of the tree, and still its pruned parent's child
        assert "orphan" in c.children(None) and c.children("gone-parent") == ["orphan"]
        assert c.find(parent="gone-parent") == ["orphan"]
        roots = [r["id"] for r in map(json.loads, run_cli("tree", str(fs.mnt), "--json")
                                      .stdout.split("\n")[:-1]) if r["depth"] == 0]
        assert sorted(roots) == sorted(c.children(None))
        below = run_cli("tree", str(fs.mnt), "gone-parent", "--labels", "none").stdout
        assert below.splitlines() == ["orphan"]  # the pruned one's subtree: its children
        c.prune("orphan")


def test_episodes_are_ascii_whatever_names_and_labels_hold(fs, tmp_path):
    """A file name an agent chose and a label value may hold C1 controls, U+2028, U+0085 and
    U+202E: `MNT/episodes` and `cascowfs episodes --with-diff` (stdout and -o) escape them
    as JSON does, so a reader splitting with str.splitlines() sees one record a line and a
    terminal gets no control."""
    name = "x\x1b]0;PWNED\x07\x9b31m\nFAKE\u2028\u0085\u202e\u009b"
    note = "n\u2028\u2029\u0085\u202e\u009b"
    with Client(fs.mnt) as c:
        tree = c.branch("hostile", "s2")
        (tree / name).write_text("x")
        c.commit("hostile", "hostile-step", {"note": note})
        c.discard("hostile")
    out = tmp_path / "eps.jsonl"
    run_cli("episodes", str(fs.mnt), "-o", str(out), "--with-diff")
    printed = subprocess.run([*CLI, "episodes", str(fs.mnt), "--with-diff"],
                             capture_output=True, check=True, timeout=120).stdout
    for data in (out.read_bytes(), printed, (fs.mnt / "episodes").read_bytes()):
        assert data.isascii() and data.endswith(b"\n"), data
        text = data.decode("ascii")
        assert all(line.isprintable() for line in text[:-1].split("\n")), text
        records = [json.loads(line) for line in text.splitlines()]
        assert len(records) == text.count("\n")
        made = next(r for r in records if r["id"] == "hostile-step")
        assert made["labels"]["note"] == note
        if "changes" in made:
            assert made["changes"] == [{"change": "A", "path": name}]
