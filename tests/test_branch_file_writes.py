"""Writes to a branch's ``parent`` and ``commit`` files take exactly what ``ctl`` takes.

One write is one line (a trailing newline, or CR LF, is dropped), UTF-8 without NUL, at most
64 KiB: the same parser as ``ctl``'s ``rebase``/``commit`` commands, and a property test holds
the two to the same answer for any bytes. Unlike ``ctl`` (a stream of commands), these files
hold one value, so an open file takes one write: a shell's ``printf 'a\\nb\\n' > parent``
writes each line separately, and the second is refused with EINVAL instead of acting on the
result of the first.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs.errors import InvalidArgumentError
from cascowfs.wire import parse_command, parse_commit_write, parse_parent_write
from conftest import hypothesis_settings
from fusehelpers import Cascow, mounted, needs_fuse

# bytes that matter to the parser: line ends, NUL, quotes, separators, invalid UTF-8
_PAYLOAD = st.lists(st.sampled_from([b"s1", b"k=v", b" ", b"\t", b"\n", b"\r", b"\0", b"'",
                                     b'"', b"\\", b"\xff", b"\xc3\xa9", b"=", b"-x", b"\x0b",
                                     b"a" * 130]), max_size=8).map(b"".join)


def _outcome(parse, *args):
    try:
        return parse(*args)
    except InvalidArgumentError:
        return "EINVAL"


@hypothesis_settings(500)
@given(_PAYLOAD)
def test_parent_write_is_parsed_as_ctl_rebase(data):
    assert _outcome(parse_parent_write, "b", data) == _outcome(parse_command, b"rebase b " + data)


@hypothesis_settings(500)
@given(_PAYLOAD)
def test_commit_write_is_parsed_as_ctl_commit(data):
    assert _outcome(parse_commit_write, "b", data) == _outcome(parse_command, b"commit b " + data)


# -- through a real mount -----------------------------------------------------------------
@pytest.fixture(scope="module")
def fs():
    def populate(fs: Cascow) -> None:
        (fs.base / "src").mkdir()
        (fs.base / "src" / "f").write_text("one\n")

    with mounted(populate=populate) as fs:
        for line in (f"import s1 {fs.base / 'src'}", "branch tmp s1", "commit tmp s2",
                     "discard tmp"):
            assert fs.ctl(line)[0] == 0, line
        yield fs


def _writes(path: Path, *chunks: bytes) -> list[int]:
    """The errno (0: success) of each write(2) of ``chunks`` to one open file of ``path``."""
    codes = []
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        for chunk in chunks:
            try:
                os.write(fd, chunk)
                codes.append(0)
            except OSError as exc:
                codes.append(exc.errno)
    finally:
        os.close(fd)
    return codes


def _fresh_branch(fs: Cascow, name: str) -> Path:
    assert fs.ctl(f"branch {name} s1")[0] == 0
    return fs.mnt / "branches" / name


def _snapshots(fs: Cascow) -> list[str]:
    return sorted(os.listdir(fs.mnt / "snapshots"))


@needs_fuse
@pytest.mark.parametrize("data", [b"s2\ns1\n", b"s2\n\n", b"\ns2", b"s2\rs1", b"s2\0",
                                  b"s\xff2\n", b"s2 s1\n", b"s2" * 40_000, b"x" * (1 << 20)])
def test_a_bad_single_write_to_parent_or_commit_changes_nothing(fs, data):
    branch = _fresh_branch(fs, "bad")
    try:
        before = _snapshots(fs)
        assert _writes(branch / "parent", data) == [errno.EINVAL]
        assert _writes(branch / "commit", data) == [errno.EINVAL]
        assert (branch / "parent").read_text() == "s1\n"
        assert (branch / "commit").read_text() == ""
        assert _snapshots(fs) == before
    finally:
        fs.ctl("discard bad")


def _applied(fs: Cascow, branch: Path, which: str, value: str) -> bool:
    """Whether a write of ``value`` to ``branch``'s ``which`` file took effect."""
    if which == "parent":
        return (branch / "parent").read_text() == value + "\n"
    return value in _snapshots(fs)


@needs_fuse
@pytest.mark.parametrize("which,values", [("parent", ["s2", "s1", "s2", "s1"]),
                                          ("commit", ["c1", "c2", "c3", "c4"])])
def test_a_branch_file_takes_one_write_per_open_file(fs, which, values):
    name = f"once-{which}"
    branch = _fresh_branch(fs, name)
    first, second, shell_first, shell_second = values
    try:
        if which == "commit":  # (parent re-bases only an unmodified branch)
            (Path(os.readlink(branch / "tree")) / "g").write_text("changed\n")
        codes = _writes(branch / which, f"{first}\n".encode(), f"{second}\n".encode())
        assert codes == [0, errno.EINVAL]
        assert _applied(fs, branch, which, first) and not _applied(fs, branch, which, second)
        # the shell writes each line separately: the second line is refused, visibly
        proc = fs.sh(f"printf '{shell_first}\\n{shell_second}\\n' > {branch}/{which}",
                     check=False)
        assert proc.returncode != 0 and "Invalid argument" in proc.stderr
        assert _applied(fs, branch, which, shell_first)
        assert not _applied(fs, branch, which, shell_second)
    finally:
        fs.ctl(f"discard {name}")
        for ident in values if which == "commit" else []:
            fs.ctl(f"prune {ident}")
