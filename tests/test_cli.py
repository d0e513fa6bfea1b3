"""The `cascowfs` command line: --help for every verb, every verb against a live mount, the
offline verbs against the store at rest, and errors as exit status + errno name."""

from __future__ import annotations

import json
import os
from pathlib import Path


from fusehelpers import Cascow, mounted, needs_fuse, run_cli

VERBS = ["init", "mount", "umount", "branch", "commit", "discard", "prune", "rebase", "ls", "log",
         "status", "diff", "import", "fsck", "gc"]


def test_help_for_every_verb():
    out = run_cli("--help").stdout
    for verb in VERBS:
        assert verb in out
        proc = run_cli(verb, "--help")
        assert proc.stdout.startswith(f"usage: cascowfs {verb}"), proc.stdout


def test_usage_errors_exit_2():
    assert run_cli(check=False).returncode == 2
    assert run_cli("frobnicate", check=False).returncode == 2
    assert run_cli("commit", check=False).returncode == 2


def _src(fs: Cascow) -> Path:
    src = fs.base / "src"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "a.py").write_text("a = 1\n")
    (src / "lib" / "b.py").write_text("b = 2\n")
    (src / "README").write_text("readme\n")
    return src


@needs_fuse
def test_every_verb_on_a_live_mount_and_offline():
    with mounted() as fs:
        mnt, store = str(fs.mnt), str(fs.store)
        src = _src(fs)
        # import through the store path: a daemon serves it, so the CLI goes through ctl
        assert run_cli("import", store, str(src), "base", "source=test").stdout.strip() == "base"
        assert run_cli("import", mnt, str(src), "base2").stdout.strip() == "base2"
        tree = Path(run_cli("branch", mnt, "work", "base").stdout.strip())
        assert tree == Path(os.readlink(fs.mnt / "branches" / "work" / "tree"))
        empty = Path(run_cli("branch", mnt, "scratch").stdout.strip())
        assert os.listdir(empty) == []
        (tree / "lib" / "a.py").write_text("a = 10\n")
        (tree / "lib" / "c.py").write_text("c = 3\n")
        (tree / "README").unlink()
        assert run_cli("status", mnt, "work").stdout.splitlines() == \
            ["D README", "M lib/a.py", "A lib/c.py"]
        assert run_cli("commit", mnt, "work", "step1", "reward=1", "plan=edit a").stdout.strip() \
            == "step1"
        generated = run_cli("commit", mnt, "work", "note=generated").stdout.strip()
        assert generated and generated != "step1"
        assert os.getxattr(fs.mnt / "snapshots" / generated, "user.cascowfs.label.note") == \
            b"generated"
        # ls, log, diff
        listing = json.loads(run_cli("ls", mnt, "--json").stdout)
        assert {s["id"] for s in listing["snapshots"]} == {"base", "base2", "step1", generated}
        step1 = [s for s in listing["snapshots"] if s["id"] == "step1"][0]
        assert step1["parent"] == "base" and step1["labels"] == {"reward": "1", "plan": "edit a"}
        assert {b["name"]: b["parent"] for b in listing["branches"]} == \
            {"work": generated, "scratch": None}
        text = run_cli("ls", mnt).stdout
        assert "step1" in text and "work" in text and "plan=edit a" in text
        log = run_cli("log", mnt, "work").stdout.splitlines()
        assert [line.split()[0] for line in log] == [generated, "step1", "base"]
        mount_diff = run_cli("diff", mnt, "base", "step1").stdout
        assert mount_diff.splitlines() == ["D README", "M lib/a.py", "A lib/c.py"]
        assert run_cli("diff", mnt, "base", "base2").stdout == ""
        assert len(run_cli("diff", mnt, "-", "base").stdout.splitlines()) == 4
        # rebase, discard, prune, gc
        run_cli("rebase", mnt, "scratch", "base2")
        assert (empty / "README").read_text() == "readme\n"
        run_cli("discard", mnt, "scratch")
        run_cli("prune", mnt, "base2")
        assert sorted(os.listdir(fs.mnt / "snapshots")) == sorted(["base", "step1", generated])
        gc = run_cli("gc", mnt).stdout
        assert "objects_removed=" in gc
        # errors: exit 1 with the errno name
        for args, name in ((("commit", mnt, "work", "step1"), "EEXIST"),
                           (("prune", mnt, "nosuch"), "ENOENT"),
                           (("prune", mnt, generated), "EBUSY"),
                           (("branch", mnt, "bad/name", "base"), "EINVAL"),
                           (("discard", mnt, "nosuch"), "ENOENT"),
                           (("status", mnt, "nosuch"), "ENOENT"),
                           (("fsck", store), "EBUSY"),  # the daemon holds the store
                           (("umount", str(fs.base)), "EINVAL")):
            proc = run_cli(*args, check=False)
            assert proc.returncode == 1 and name in proc.stderr, (args, proc.stderr)
        # offline: the same diff from the engine itself, fsck, gc, import
        fs.stop()
        assert run_cli("diff", store, "base", "step1").stdout == mount_diff
        run_cli("fsck", store)
        run_cli("fsck", "--deep", store)  # every snapshot's layers equal its tree
        assert "objects_removed=" in run_cli("gc", store).stdout
        assert run_cli("import", store, str(src), "offline").stdout.strip() == "offline"
        fs.start()
        assert (fs.mnt / "snapshots" / "offline" / "README").read_text() == "readme\n"
