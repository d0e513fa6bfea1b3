"""The `cascowfs` command line: --help for every verb, every verb against a live mount, the
offline verbs against the store at rest, --json on every verb, and errors as exit status (one
per errno class, the table in docs/interface.md) + errno name."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from cascowfs import cli
from cascowfs.cli import exit_status
from cascowfs.pathquote import quote
from conftest import mounts_below, needs_overlay
from fusehelpers import CLI, PYTHON, REPO, Cascow, cascow_base, mounted, needs_fuse, run_cli

VERBS = ["init", "mount", "umount", "branch", "commit", "discard", "prune", "rebase", "ls", "log",
         "status", "diff", "import", "fsck", "gc"]


def test_help_for_every_verb():
    out = run_cli("--help").stdout
    for verb in VERBS:
        assert verb in out
        proc = run_cli(verb, "--help")
        assert proc.stdout.startswith(f"usage: cascowfs {verb}"), proc.stdout


def test_every_verbs_operands_are_named_in_capitals():
    """Usage lines name operands as docs/interface.md and each verb's description do
    (`branch MNT NAME [PARENT]`), not by the parser's attribute names."""
    import argparse

    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lower = [
        f"{verb}: {action.metavar or action.dest}"
        for verb, sub in verbs.choices.items()
        for action in sub._actions
        if not action.option_strings and action.choices is None  # choices show themselves
        and (action.metavar or action.dest) != (action.metavar or action.dest).upper()
    ]
    assert not lower, lower
    assert run_cli("branch", "--help").stdout.startswith(
        "usage: cascowfs branch [-h] [--json] MNT NAME [PARENT]")


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
        listing = _json_lines(run_cli("ls", mnt, "--json").stdout)
        snaps = [s for s in listing if s["type"] == "snapshot"]
        assert {s["id"] for s in snaps} == {"base", "base2", "step1", generated}
        step1 = [s for s in snaps if s["id"] == "step1"][0]
        assert step1["parent"] == "base" and step1["labels"] == {"reward": "1", "plan": "edit a"}
        assert {b["name"]: b["parent"] for b in listing if b["type"] == "branch"} == \
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
        # errors: the exit status of the errno's class, with the errno name
        for args, name in ((("commit", mnt, "work", "step1"), "EEXIST"),
                           (("prune", mnt, "nosuch"), "ENOENT"),
                           (("prune", mnt, generated), "EBUSY"),
                           (("branch", mnt, "bad/name", "base"), "EINVAL"),
                           (("discard", mnt, "nosuch"), "ENOENT"),
                           (("status", mnt, "nosuch"), "ENOENT"),
                           (("fsck", store), "EBUSY"),  # the daemon holds the store
                           (("fsck", mnt), "EINVAL"),  # a mount point, not a store
                           (("log", mnt, ""), "EINVAL"),  # no name: it listed nothing, exit 0
                           (("umount", str(fs.base)), "ENOTCONN"),  # nothing mounted there
                           (("umount", "--branches", str(fs.base)), "EINVAL"),  # not a store
                           (("umount", "--branches", str(fs.base / "nosuch")), "ENOENT")):
            proc = run_cli(*args, check=False)
            assert proc.returncode == exit_status(getattr(errno, name)), (args, proc.stderr)
            assert f"{name}: " in proc.stderr, (args, proc.stderr)
        for args in (("show", mnt, "nosuch"), ("log", mnt, "nosuch"),
                     ("diff", mnt, "nosuch", "step1"), ("diff", mnt, "step1", "nosuch")):
            proc = run_cli(*args, check=False)  # the message names what is missing
            assert proc.returncode == exit_status(errno.ENOENT), (args, proc.stderr)
            assert "snapshot 'nosuch'" in proc.stderr, (args, proc.stderr)
        # offline: the same diff from the engine itself, fsck, gc, import
        fs.stop()
        assert run_cli("diff", store, "base", "step1").stdout == mount_diff
        run_cli("fsck", store)
        run_cli("fsck", "--deep", store)  # every snapshot's layers equal its tree
        assert "objects_removed=" in run_cli("gc", store).stdout
        assert run_cli("import", store, str(src), "offline").stdout.strip() == "offline"
        fs.start()
        assert (fs.mnt / "snapshots" / "offline" / "README").read_text() == "readme\n"


@needs_fuse
def test_offline_verbs_leave_a_store_as_mounted_as_they_found_it():
    """After `umount --branches` no mount of the store remains; an offline verb opens the
    store, which mounts its branches, and must unmount them again (the next daemon alone
    would otherwise remove them). After a plain `umount` the branches stay mounted."""
    with mounted() as fs:
        mnt, store = str(fs.mnt), str(fs.store)
        src = _src(fs)
        run_cli("import", mnt, str(src), "base")
        run_cli("branch", mnt, "work", "base")
        fs.stop(branches=True)
        assert mounts_below(fs.store) == []
        for verb in (("diff", store, "base", "-"), ("gc", store),
                     ("import", store, str(src), "again"), ("fsck", "--deep", store)):
            # fsck reports the unmounted branch (operations.md): a problem, not a failure here
            run_cli(*verb, check=verb[0] != "fsck")
            assert mounts_below(fs.store) == [], verb
        fs.start()
        fs.stop()
        kept = mounts_below(fs.store)
        assert kept
        run_cli("gc", store)
        assert mounts_below(fs.store) == kept
        # a stopped daemon left its branches mounted and nothing at MNT: by the store's path
        assert run_cli("umount", mnt, "--branches", check=False).returncode == exit_status(
            errno.EINVAL)  # MNT is no store
        run_cli("umount", "--branches", store)
        assert mounts_below(fs.store) == []
        fs.start()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# -- exit status ------------------------------------------------------------------------------
def test_exit_status_classes_are_distinct_and_documented():
    """The table in docs/interface.md is the one the CLI uses, and every class has its own code."""
    doc = (REPO / "docs" / "interface.md").read_text()
    section = doc.split("### Exit status", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for code, errnos in re.findall(r"^\| (\d+) \| [^|]+ \| ([^|]*) \|$", section, re.M):
        for name in re.findall(r"`(E[A-Z0-9]+)`", errnos):
            documented[getattr(errno, name)] = int(code)
    assert documented == cli.EXIT_CODES
    codes = {cli.EXIT_OK, cli.EXIT_OTHER, cli.EXIT_USAGE, cli.EXIT_NOT_FOUND, cli.EXIT_EXISTS,
             cli.EXIT_PERMISSION, cli.EXIT_BUSY, cli.EXIT_INVALID, cli.EXIT_NO_SPACE, cli.EXIT_IO,
             cli.EXIT_DAEMON_NOT_RUNNING}
    assert len(codes) == 11
    for code in (cli.EXIT_OK, cli.EXIT_OTHER, cli.EXIT_USAGE):
        assert code not in cli.EXIT_CODES.values()
    assert exit_status(errno.EXDEV) == cli.EXIT_OTHER  # an errno of no class



# -- a closed pipe ----------------------------------------------------------------------------
def _to_a_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """``cascowfs ARGS`` with stdout a pipe no one reads any more (``… | head -1`` once
    ``head`` has exited), block-buffered as a user's is (the output is written at exit)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=REPO, env=env)
    finally:
        os.close(write_end)


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    """As Unix tools do: no message, the shell's status for SIGPIPE."""
    proc = _to_a_closed_pipe("init", str(tmp_path / "store"))
    assert (proc.returncode, proc.stderr) == (141, "")
    assert (tmp_path / "store" / "meta").is_dir()  # the verb itself ran


def test_a_broken_pipe_other_than_stdout_is_an_error():
    """A verb's own pipe (to a helper process, say) that breaks is a failure like any other."""
    script = ("import errno, sys\nfrom cascowfs import cli\n"
              "def fails(args):\n    raise BrokenPipeError(errno.EPIPE, 'Broken pipe')\n"
              "cli.cmd_init = fails\nsys.exit(cli.main(['init', '/nonexistent/store']))\n")
    proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == cli.EXIT_OTHER and "cascowfs init: EPIPE: " in proc.stderr, proc


@needs_fuse
def test_ls_into_head_ends_quietly():
    with mounted() as fs:
        for name in ("a", "b", "c"):
            run_cli("branch", str(fs.mnt), name)
        proc = _to_a_closed_pipe("ls", str(fs.mnt))
        assert (proc.returncode, proc.stderr) == (141, "")
        shell = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "-", *CLI, "ls",
                                str(fs.mnt)], capture_output=True, text=True, timeout=120,
                               cwd=REPO)
        assert shell.stdout == "snapshots:\n" and "EPIPE" not in shell.stderr, shell


# -- --json -----------------------------------------------------------------------------------
def test_every_verb_takes_json():
    for verb in VERBS:
        assert "--json" in run_cli(verb, "--help").stdout, verb


@pytest.mark.parametrize("argv, verb", [(["commit", "--json"], "commit"),
                                        (["frobnicate", "--json"], None),
                                        (["ls", "--json", "x", "y", "z"], "ls"),
                                        (["show", "m", "s1", "extra", "--json"], "show"),
                                        (["umount", "m", "--timeout", "-5", "--json"], "umount"),
                                        (["umount", "m", "--timeout=nan", "--json"], "umount"),
                                        (["--json"], None)])
def test_usage_errors_with_json_are_a_json_object_and_exit_2(argv, verb):
    proc = run_cli(*argv, check=False)
    assert proc.returncode == cli.EXIT_USAGE and proc.stdout == ""
    err = json.loads(proc.stderr)
    assert err["error"] == "usage" and err["exit"] == cli.EXIT_USAGE and err["message"]
    assert err["verb"] == verb, err


@needs_fuse
def test_json_output_of_every_verb_on_a_live_mount():
    with mounted() as fs:
        mnt, store = str(fs.mnt), str(fs.store)
        src = _src(fs)

        def one(*args: str) -> dict:
            lines = _json_lines(run_cli(*args, "--json").stdout)
            assert len(lines) == 1, (args, lines)
            return lines[0]

        assert one("import", mnt, str(src), "base", "k=v") == {"id": "base", "labels": {"k": "v"}}
        made = one("branch", mnt, "w", "base")
        assert made == {"name": "w", "parent": "base",
                        "tree": os.readlink(fs.mnt / "branches" / "w" / "tree")}
        (Path(made["tree"]) / "new").write_text("n\n")
        assert _json_lines(run_cli("status", mnt, "w", "--json").stdout) == \
            [{"change": "A", "path": "new"}]
        assert one("commit", mnt, "w", "s1", "reward=0.5") == \
            {"id": "s1", "branch": "w", "labels": {"reward": "0.5"}}
        generated = one("commit", mnt, "w")["id"]
        assert generated in os.listdir(fs.mnt / "snapshots")
        log = _json_lines(run_cli("log", mnt, "w", "--json").stdout)
        assert [e["id"] for e in log] == [generated, "s1", "base"]
        assert log[1]["labels"] == {"reward": "0.5"} and log[1]["parent"] == "base"
        listing = _json_lines(run_cli("ls", mnt, "snapshots", "--json").stdout)
        assert {e["type"] for e in listing} == {"snapshot"} and len(listing) == 3
        assert _json_lines(run_cli("ls", mnt, "branches", "--json").stdout) == \
            [{"type": "branch", "name": "w", "parent": generated, "tree": made["tree"],
              "last_commit": generated}]
        assert one("rebase", mnt, "w", "s1") == {"name": "w", "parent": "s1"}
        assert _json_lines(run_cli("discard", mnt, "w", "--json").stdout) == [{"discarded": "w"}]
        assert _json_lines(run_cli("prune", mnt, generated, "s1", "--json").stdout) == \
            [{"pruned": generated}, {"pruned": "s1"}]
        # a pruned parent ends the log with a JSON line too
        run_cli("branch", mnt, "v", "base")
        run_cli("commit", mnt, "v", "s2")
        run_cli("discard", mnt, "v")
        run_cli("prune", mnt, "base")
        assert _json_lines(run_cli("log", mnt, "s2", "--json").stdout)[-1] == \
            {"id": "base", "pruned": True}
        assert "objects_removed" in one("gc", mnt)
        assert _json_lines(run_cli("diff", mnt, "-", "s2", "--json").stdout)
        # errors: one JSON object on stderr, nothing on stdout
        proc = run_cli("prune", mnt, "nosuch", "--json", check=False)
        assert proc.returncode == cli.EXIT_NOT_FOUND and proc.stdout == ""
        err = json.loads(proc.stderr)
        assert err["verb"] == "prune" and err["error"] == "ENOENT" and err["errno"] == errno.ENOENT
        assert "nosuch" in err["message"] and err["exit"] == cli.EXIT_NOT_FOUND
        fs.stop()
        report = one("fsck", store)
        assert report["ok"] is True and report["problems"] == [] and report["snapshots"] == 1
        assert one("init", str(fs.base / "store2")) == {"store": str(fs.base / "store2")}
        fs.start()


# -- no daemon --------------------------------------------------------------------------------
@needs_fuse
def test_verbs_on_a_mount_point_without_a_daemon_exit_10():
    """Nothing mounted, then a FUSE mount whose daemon was killed: "daemon not running", not
    the ENOENT the plain directory answers."""
    with cascow_base() as base:
        plain = base / "mnt"
        plain.mkdir()
        for args in (("ls", str(plain)), ("branch", str(plain), "b", "s"),
                     ("commit", str(plain), "b"), ("log", str(plain), "s")):
            proc = run_cli(*args, "--json", check=False)
            assert proc.returncode == cli.EXIT_DAEMON_NOT_RUNNING, (args, proc.stderr)
            err = json.loads(proc.stderr)
            assert err["error"] == "ENOTCONN" and str(plain) in err["message"], err
    with mounted() as fs:
        run_cli("import", str(fs.mnt), str(_src(fs)), "base")
        fs.kill9()
        for args in (("ls", str(fs.mnt)), ("branch", str(fs.mnt), "b", "base"),
                     ("diff", str(fs.mnt), "-", "base")):
            proc = run_cli(*args, check=False)
            assert proc.returncode == cli.EXIT_DAEMON_NOT_RUNNING, (args, proc.stderr)
            assert "ENOTCONN: " in proc.stderr and str(fs.mnt) in proc.stderr, proc.stderr
        proc = run_cli("fsck", str(fs.mnt), check=False)  # names the store, not ENOTCONN
        assert proc.returncode == exit_status(errno.EINVAL), proc.stderr
        assert f"the store ({fs.store})" in proc.stderr, proc.stderr


def test_an_interrupt_says_that_a_sent_command_may_complete(monkeypatch, capsys):
    """Ctrl-C during a verb that wrote its command to ctl: the daemon carries it out all the
    same (the write returns first, then Python raises), so exit 130 alone would tell a
    script it did not happen."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_gc", interrupted)
    assert cli.main(["gc", "/nonexistent"]) == 130
    assert "cascowfs gc: interrupted; a command a daemon had received completes" in \
        capsys.readouterr().err


# -- names an agent chose, on root's terminal -------------------------------------------------
# ESC ] (a window title), BEL, ESC [ 2J (clear the screen), CSI as one byte that is not
# UTF-8, a newline (a forged line), U+2028 and U+0085 (lines to str.splitlines), U+202E
# (right-to-left override) and DEL: none may reach a terminal as it is.
HOSTILE = (b"x\x1b]0;PWNED\x07\x1b[2J\x9b31m\ncascowfs import: ok: imported cleanly"
           + "\u2028\u0085\u202e".encode() + b"FAKE\x7f")


def _raw_cli(*args: str) -> subprocess.CompletedProcess:
    """``cascowfs ARGS`` with stdout and stderr as the bytes a terminal would get."""
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120, cwd=REPO)


def _shown_safely(out: bytes) -> str:
    """``out`` as text, asserted to be whole lines of printable characters (no C0 or C1
    control, no DEL, no line or paragraph separator, no format character)."""
    text = out.decode("utf-8")  # strict: a byte that is not UTF-8 would be refused
    assert text.endswith("\n"), text
    lines = text[:-1].split("\n")
    assert all(line.isprintable() for line in lines), text
    return text


@contextlib.contextmanager
def _tmpfs(where: Path) -> Iterator[Path]:
    """A tmpfs at ``where`` (it takes a sparse file larger than ext4's largest)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _too_large_source(src: Path) -> bytes:
    """A file named ``HOSTILE`` in ``src`` over the size a snapshot's file may hold (a
    sparse one): importing it is refused with a message that names it."""
    from cascowfs.import_workers import MAX_FILE_BYTES

    os.mkdir(os.path.join(os.fsencode(src), b"d"))
    path = os.path.join(os.fsencode(src), b"d", HOSTILE)
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    return b"d/" + HOSTILE


def _import_refused_naming(proc: subprocess.CompletedProcess, src: Path, name: bytes) -> None:
    """The import failed with one line on stderr naming ``src``/``name``, escaped."""
    assert proc.returncode == cli.EXIT_OTHER and proc.stdout == b"", proc
    err = _shown_safely(proc.stderr)
    assert err.count("\n") == 1 and err.startswith("cascowfs import: "), err
    assert quote(os.path.join(os.fsencode(src), name)) in err, err


@needs_overlay
def test_an_offline_import_error_shows_a_hostile_name_escaped():
    with cascow_base() as base, _tmpfs(base / "src") as src:
        run_cli("init", str(base / "store"))
        name = _too_large_source(src)
        _import_refused_naming(_raw_cli("import", str(base / "store"), str(src), "s"), src, name)


@needs_fuse
def test_an_error_through_ctl_shows_a_hostile_name_escaped():
    with mounted() as fs, _tmpfs(fs.base / "src") as src:
        name = _too_large_source(src)
        _import_refused_naming(_raw_cli("import", str(fs.mnt), str(src), "s"), src, name)


@needs_fuse
def test_a_file_an_agent_changes_during_a_commit_is_named_escaped():
    """The reviewer's case: an agent appends to a file with a hostile name while root
    commits its branch; the commit fails (EBUSY) naming the file, escaped."""
    with mounted() as fs:
        tree = Path(run_cli("branch", str(fs.mnt), "agent").stdout.strip())
        target = os.path.join(os.fsencode(tree), HOSTILE)
        with open(target, "wb") as f:
            f.write(os.urandom(1 << 20) * 8)
        writer = subprocess.Popen([PYTHON, "-c", (
            "import os, sys\nfd = os.open(sys.argv[1].encode('latin-1'), os.O_WRONLY | "
            "os.O_APPEND)\nwhile True:\n    os.write(fd, b'x' * 4096)\n"),
            target.decode("latin-1")])
        try:
            for _ in range(50):
                proc = _raw_cli("commit", str(fs.mnt), "agent")
                if proc.returncode != 0:
                    break
            else:
                pytest.fail("50 commits raced no append")
        finally:
            writer.kill()
            writer.wait()
        assert proc.returncode == cli.EXIT_BUSY, proc
        err = _shown_safely(proc.stderr)
        assert err.count("\n") == 1 and err.startswith("cascowfs commit: EBUSY: "), err
        assert quote(HOSTILE).strip('"') + '": changed while it was read' in err, err


def test_a_warning_the_cli_logs_shows_a_hostile_name_escaped():
    """The CLI's log lines (``cascowfs: message``) are escaped as its errors are."""
    script = ("import logging, sys\nfrom cascowfs import cli\n"
              "def warns(args):\n"
              "    logging.getLogger('cascowfs.x').warning('left %s', sys.argv[1])\n"
              "    return 0\n"
              "cli.cmd_gc = warns\nsys.exit(cli.main(['gc', '/nonexistent']))\n")
    proc = subprocess.run([PYTHON, "-c", script, os.fsdecode(HOSTILE)], capture_output=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc
    err = _shown_safely(proc.stderr)
    assert err.count("\n") == 1 and err.startswith("cascowfs: left x\\x1b]0;PWNED\\x07"), err
    assert "\\x9b31m\\ncascowfs import: ok" in err, err
