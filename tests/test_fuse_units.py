"""Unit tests of the FUSE layer's pure parts (no mount): ctl grammar, replies, the inode
table's numbering and collision handling, snapshot metadata, sd_notify."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from cascowfs.cas import identify_content
from cascowfs.errors import InvalidArgumentError
from cascowfs import wire
from cascowfs.fuse import control
from cascowfs.fuse.inodes import (FIRST_ALLOCATED, HASHED_BASE, InodeTable, SkeletonNode,
                                  SnapDirNode)
from cascowfs.fuse.snapshot_view import LinkCounts, count_links, iso_time, root_xattrs
from cascowfs.model import Entry, SnapshotInfo


# -- ctl grammar ----------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    (b"branch b1 s1\n", wire.Command("branch", name="b1", id="s1")),
    (b"branch b1 s1", wire.Command("branch", name="b1", id="s1")),
    (b"branch b1 s1\r\n", wire.Command("branch", name="b1", id="s1")),
    (b"  branch   b1\ts1  \n", wire.Command("branch", name="b1", id="s1")),
    (b"commit b1\n", wire.Command("commit", name="b1")),
    (b"commit b1 s2\n", wire.Command("commit", name="b1", id="s2")),
    (b"commit b1 s2 reward=1 plan='two words'\n",
     wire.Command("commit", name="b1", id="s2", labels={"reward": "1", "plan": "two words"})),
    (b"commit b1 k=v\n", wire.Command("commit", name="b1", labels={"k": "v"})),
    (b"commit b1 s2 k=a=b\n", wire.Command("commit", name="b1", id="s2", labels={"k": "a=b"})),
    (b"commit b1 s2 k=\n", wire.Command("commit", name="b1", id="s2", labels={"k": ""})),
    (b"discard b1\n", wire.Command("discard", name="b1")),
    (b"prune s1\n", wire.Command("prune", id="s1")),
    (b"rebase b1 s1\n", wire.Command("rebase", name="b1", id="s1")),
    (b"rebase b1\n", wire.Command("rebase", name="b1")),
    (b"import s1 /src/dir x=y\n", wire.Command("import", id="s1", src="/src/dir",
                                                   labels={"x": "y"})),
    (b"import s1 '/with space/dir/'\n", wire.Command("import", id="s1", src="/with space/dir")),
    (b"gc\n", wire.Command("gc")),
    ("commit b1 s2 note=ünï\n".encode(), wire.Command("commit", name="b1", id="s2",
                                                         labels={"note": "ünï"})),
])
def test_parse_valid(line, expected):
    assert wire.parse_command(line) == expected


@pytest.mark.parametrize("line", [
    b"", b"\n", b"  \n", b"nope", b"Branch b s", b"branch", b"branch b", b"branch b s t",
    b"branch .. s", b"branch b ..", b"branch a/b s", b"branch b\0 s", b"branch " + b"x" * 129 + b" s",
    b"branch \xff s", b"branch -b s", b"commit", b"commit b s1 s2", b"commit b s1 =v",
    b"commit b s1 k", b"commit b s1 bad key=v", b"commit b s1 k=v\nx", b"discard",
    b"discard a b", b"prune", b"prune a b", b"rebase", b"rebase a b c", b"import",
    b"import s1", b"import s1 relative", b"gc x", b"branch 'b s\n", b"x" * 70000,
    b"branch b s\nbranch c s", b"commit b s1 k=v\x00",
])
def test_parse_invalid(line):
    with pytest.raises(InvalidArgumentError):
        wire.parse_command(line)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab=/.-_ \t\n\r'\"\\#$\x0b\x0c\u00a0\u2003ü")),
               max_size=40))
def test_words_split_like_a_shell(text):
    """The fast path for plain lines splits exactly as shlex does, and anything shlex refuses
    (an unbalanced quote) is refused with EINVAL."""
    import shlex

    try:
        expected = shlex.split(text, comments=False, posix=True)
    except ValueError:
        with pytest.raises(InvalidArgumentError):
            wire.split_words(text)
        return
    assert wire.split_words(text) == expected


def test_parse_branch_file_writes():
    assert wire.parse_parent_write("b", b"s1\n") == wire.Command("rebase", name="b", id="s1")
    assert wire.parse_parent_write("b", b"\n") == wire.Command("rebase", name="b")
    assert wire.parse_commit_write("b", b"\n") == wire.Command("commit", name="b")
    assert wire.parse_commit_write("b", b"s2 k=v\n") == \
        wire.Command("commit", name="b", id="s2", labels={"k": "v"})
    for bad in (b"s1 s2\n", b"../x\n", b"\xff\n"):
        with pytest.raises(InvalidArgumentError):
            wire.parse_parent_write("b", bad)
    with pytest.raises(InvalidArgumentError):
        wire.parse_commit_write("b", b"s1 s2\n")


def test_replies_round_trip():
    assert wire.ok_reply("/a/b") == b"ok /a/b\n"
    assert wire.ok_reply("") == b"ok\n"
    line = wire.error_reply(errno.EEXIST, "snapshot 's1'\nexists")  # one line, escaped
    assert line == b"error EEXIST snapshot 's1'\\nexists\n"
    assert wire.parse_reply(line.decode()) == (False, errno.EEXIST, "snapshot 's1'\\nexists")
    assert wire.parse_reply("ok s1\n") == (True, 0, "s1")
    assert wire.parse_reply("garbage") [0] is False


def test_error_of():
    assert control.error_of(InvalidArgumentError("bad")) == (errno.EINVAL, "bad")
    assert control.error_of(OSError(errno.ENOSPC, "full")) == (errno.ENOSPC, "full")
    assert control.error_of(RuntimeError("x"))[0] == errno.EIO


# -- inode table ----------------------------------------------------------------------------
def _file(name: bytes, ref: bytes = b"r" * 32, mtime: int = 1, link: bytes = b"") -> Entry:
    return Entry(name, stat.S_IFREG | 0o644, 0, 0, mtime, 10, ref, 0, (), link)


def test_leaf_numbers_are_shared_and_in_range():
    table = InodeTable()
    a = table.leaf(_file(b"a"), 1)
    b = table.leaf(_file(b"b"), 1)  # same content and metadata, another name
    assert a is b and HASHED_BASE <= a.ino < 2 * HASHED_BASE
    c = table.leaf(_file(b"c", mtime=2), 1)
    d = table.leaf(_file(b"a"), 2)  # nlink is part of what a reader sees
    assert len({a.ino, c.ino, d.ino}) == 3
    assert table.allocate() >= FIRST_ALLOCATED and table.allocate() < HASHED_BASE
    # one secret, one numbering
    assert InodeTable(b"k" * 32).leaf(_file(b"z"), 1).ino == \
        InodeTable(b"k" * 32).leaf(_file(b"a"), 1).ino


def _pin(digits: bytes, name: bytes = b"pin", link: bytes = b"") -> Entry:
    """A 0600 file of root's holding a 4-digit PIN."""
    ref = identify_content(digits).content_id
    return Entry(name, stat.S_IFREG | 0o600, 0, 0, 1_700_000_000_000_000_000, 4, ref, 0, (), link)


def test_leaf_numbers_tell_nothing_of_the_content_without_the_mounts_secret():
    """Whoever may list a directory sees its files' inode numbers, even of a file it may not
    read: guesses of a PIN file's content numbered by a table of one's own (all 10,000)
    match none, and another mount numbers the same file otherwise. Within one mount, equal
    files and the members of a hard-link group still share one number."""
    served = InodeTable()
    number = served.leaf(_pin(b"4711"), 1).ino
    guesser = InodeTable()
    assert number not in {guesser.leaf(_pin(b"%04d" % n), 1).ino for n in range(10_000)}
    assert InodeTable().leaf(_pin(b"4711"), 1).ino != number
    assert served.leaf(_pin(b"4711", b"copy"), 1).ino == number
    group = {served.leaf(_pin(b"4711", name, b"group"), 3).ino for name in (b"a", b"b", b"c")}
    assert len(group) == 1 and number not in group


def test_leaf_collision_falls_back_to_allocation(monkeypatch):
    monkeypatch.setattr(InodeTable, "_derived", lambda self, key: HASHED_BASE | 12345)
    table = InodeTable()
    a = table.leaf(_file(b"a", ref=b"1" * 32), 1)
    b = table.leaf(_file(b"b", ref=b"2" * 32), 1)
    assert a.ino == HASHED_BASE | 12345
    assert b.ino != a.ino and b.ino < HASHED_BASE and table.collisions == 1
    assert table.leaf(_file(b"b2", ref=b"2" * 32), 1) is b  # the fallback is remembered
    table.looked_up(b)
    table.forget(b.ino, 1)
    assert table.get(b.ino) is None
    table.looked_up(a)
    table.forget(a.ino, 1)
    # with the slot free, the second file now gets the hashed number
    assert table.leaf(_file(b"b", ref=b"2" * 32), 1).ino == HASHED_BASE | 12345


def test_lookup_counts_and_children():
    table = InodeTable()
    root = table.add_pinned(SkeletonNode(1))
    parent = SnapDirNode(table.allocate(), snap="s")
    table.adopt(root, b"s", parent)
    child = table.adopt(parent, b"sub", SnapDirNode(table.allocate(), snap="s"))
    assert table.child(parent, b"sub") is child
    table.looked_up(child, 2)
    table.forget(child.ino, 1)
    assert table.get(child.ino) is child
    table.forget(child.ino, 1)
    assert table.get(child.ino) is None and table.child(parent, b"sub") is None
    table.forget(1, 5)
    assert table.get(1) is root  # pinned
    table.detach(root, b"s")
    assert table.child(root, b"s") is None and table.get(parent.ino) is parent


def test_detach_says_whether_the_kernel_may_cache_the_name():
    """A ctl discard or prune invalidates the kernel's dentry only where it may have one: a
    name with a node here (looked up or listed, not forgotten)."""
    table = InodeTable()
    root = table.add_pinned(SkeletonNode(1))
    cached = table.adopt(root, b"cached", SnapDirNode(table.allocate(), snap="a"))
    table.looked_up(cached)
    forgotten = table.adopt(root, b"forgotten", SnapDirNode(table.allocate(), snap="b"))
    table.looked_up(forgotten)
    table.forget(forgotten.ino, 1)
    assert table.detach(root, b"cached") is True
    assert table.detach(root, b"cached") is False  # detached already
    assert table.detach(root, b"forgotten") is False
    assert table.detach(root, b"never-looked-up") is False
    assert table.get(cached.ino) is cached  # its open files and cwds live on


def test_count_links():
    trees = {
        b"root": {b"a": _file(b"a", link=b"L1"), b"d": Entry(b"d", stat.S_IFDIR | 0o755, 0, 0,
                                                              0, 0, b"sub"),
                  b"x": _file(b"x")},
        b"sub": {b"b": _file(b"b", link=b"L1"), b"c": _file(b"c", link=b"L2")},
    }
    root = Entry(b"", stat.S_IFDIR, 0, 0, 0, 0, b"root")
    assert count_links(root, trees.__getitem__) == {b"L1": 2, b"L2": 1}



def test_link_counts_keep_the_roots_read_last_within_their_limit():
    kept = LinkCounts(limit=5)
    kept.keep(b"r1", Counter({b"a": 2, b"b": 2}))
    kept.keep(b"r2", Counter({b"c": 2, b"d": 2}))
    assert kept.get(b"r1") == {b"a": 2, b"b": 2}  # r1 now the newest read
    kept.keep(b"r3", Counter({b"e": 2, b"f": 2}))  # six groups: the oldest read goes
    assert kept.get(b"r2") is None and kept.get(b"r1") and kept.get(b"r3")
    assert kept.groups == 4
    kept.keep(b"big", Counter({bytes([i]): 2 for i in range(6)}))  # over the limit alone
    assert kept.groups == 0 and kept.get(b"big") is None

# -- snapshot metadata ----------------------------------------------------------------------
def test_root_xattrs():
    info = SnapshotInfo("s2", "ab" * 32, "s1", 1_700_000_000_123_456_789, 42, 3, {"k": "v w"})
    x = root_xattrs(info)
    assert x[b"user.cascowfs.parent"] == b"s1"
    assert x[b"user.cascowfs.root"] == b"ab" * 32
    assert x[b"user.cascowfs.created"] == b"2023-11-14T22:13:20.123456789Z"
    assert x[b"user.cascowfs.created_ns"] == b"1700000000123456789"
    assert x[b"user.cascowfs.size"] == b"42" and x[b"user.cascowfs.files"] == b"3"
    assert x[b"user.cascowfs.label.k"] == b"v w"
    assert b"user.cascowfs.parent" not in root_xattrs(SnapshotInfo("s", "0", None, 0, 0, 0))
    assert iso_time(0) == "1970-01-01T00:00:00.000000000Z"


# -- daemon helpers -------------------------------------------------------------------------
@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path, monkeypatch, abstract):
    from cascowfs.daemon import sd_notify

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"cascowfs-test-{os.getpid()}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        sock.bind(str(tmp_path / "n.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    try:
        assert sd_notify("READY=1\nSTATUS=x")
        assert sock.recv(100) == b"READY=1\nSTATUS=x"
    finally:
        sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_sd_notify_to_a_reader_that_stopped_reading_drops_instead_of_blocking(tmp_path,
                                                                             monkeypatch):
    """A full notify socket (its reader gone quiet) must not stall the daemon's event loop."""
    import threading

    from cascowfs.daemon import sd_notify

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "n.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    sent: list[bool] = []
    sender = threading.Thread(
        target=lambda: sent.extend(sd_notify(f"STATUS={i}", wait=0) for i in range(200)),
        daemon=True)
    try:
        sender.start()
        sender.join(60)  # a blocking send would never return: the queue holds far fewer
        assert not sender.is_alive(), "sd_notify blocked on a full socket"
        assert sent[0] and not sent[-1] and len(sent) == 200
        assert sock.recv(100) == b"STATUS=0"
        assert sd_notify("READY=1", wait=0.01) is True  # room again for one more
    finally:
        sock.close()


def test_mountinfo_unescape():
    from cascowfs.overlay import unescape_mountinfo as _unescape

    assert _unescape(r"/tmp/a\040b\134c") == "/tmp/a b\\c"
    assert _unescape("/plain") == "/plain"
