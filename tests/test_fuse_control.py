"""Every row of docs/interface.md's errno table, through both file interfaces (branch files, ctl),
plus bad names, malformed ctl lines, concurrency and permissions — all on a real mount."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fusehelpers import Cascow, make_source_tree, mounted, needs_fuse

pytestmark = needs_fuse

NOBODY = 65534


@pytest.fixture(scope="module")
def fs():
    def populate(fs: Cascow) -> None:
        make_source_tree(fs.base / "src", stdlib_slice=20)

    with mounted(populate=populate) as fs:
        code, reply = fs.ctl(f"import base {fs.base / 'src'}")
        assert code == 0, reply
        yield fs


def err(fn, *args) -> int:
    """The errno a call fails with (0 if it succeeds)."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def write(path: Path, data: bytes | str) -> None:
    """What `echo data > path` does: open(O_WRONLY|O_TRUNC), one write(2)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)


def state(fs: Cascow) -> tuple:
    """Everything a bad request must leave untouched."""
    branches = sorted(os.listdir(fs.mnt / "branches"))
    return (
        sorted(os.listdir(fs.mnt / "snapshots")),
        branches,
        [(fs.mnt / "branches" / b / "parent").read_text() for b in branches],
        [(fs.mnt / "branches" / b / "status").read_text() for b in branches],
    )


def fresh_branch(fs: Cascow, name: str, parent: str = "base") -> Path:
    code, reply = fs.ctl(f"branch {name} {parent}")
    assert code == 0, reply
    return Path(reply.split(" ", 1)[1])


# -- create a branch ------------------------------------------------------------------------
def test_create_branch_errors(fs):
    b = fs.mnt / "branches"
    fresh_branch(fs, "taken")
    before = state(fs)
    assert err(os.mkdir, b / "taken") == errno.EEXIST
    assert fs.ctl("branch taken base")[0] == errno.EEXIST
    assert fs.ctl("branch nosnap nosuch")[0] == errno.ENOENT
    assert not (b / "nosnap").exists()
    assert state(fs) == before
    # mkdir then echo <id> > parent: ENOENT for an unknown snapshot, branch stays on empty
    os.mkdir(b / "viaparent")
    assert err(write, b / "viaparent" / "parent", "nosuch\n") == errno.ENOENT
    assert (b / "viaparent" / "parent").read_text() == ""
    write(b / "viaparent" / "parent", "base\n")
    assert (b / "viaparent" / "parent").read_text() == "base\n"
    assert sorted(os.listdir(b / "viaparent" / "tree")) == \
        sorted(os.listdir(fs.mnt / "snapshots" / "base"))
    fs.ctl("discard viaparent")
    fs.ctl("discard taken")


BAD_NAMES = {
    "dotdot": b"..",
    "dot": b".",
    "slash": b"a/b",
    "nul": b"a\0b",
    "300 chars": b"x" * 300,
    "129 chars": b"x" * 129,
    "non-utf8": b"caf\xe9",
    "leading dash": b"-x",
    "leading dot": b".hidden",
    "space": b"'a b'",
    "empty": b"''",
}


@pytest.mark.parametrize("label", list(BAD_NAMES))
def test_bad_names_via_ctl_are_einval(fs, label):
    bad = BAD_NAMES[label]
    before = state(fs)
    for line in (b"branch " + bad + b" base", b"branch ok-name " + bad, b"commit " + bad,
                 b"discard " + bad, b"prune " + bad, b"rebase " + bad + b" base"):
        code, reply = fs.ctl(line)
        assert code == errno.EINVAL, (line, reply)
        assert reply.startswith("error EINVAL "), reply
    assert state(fs) == before


def test_bad_names_via_mkdir(fs):
    """What the kernel lets through reaches us and gets EINVAL; the rest the kernel answers
    itself (documented in docs/interface.md)."""
    b = fs.mnt / "branches"
    before = state(fs)
    assert err(os.mkdir, b / ("x" * 300)) == errno.EINVAL  # FUSE allows names up to 1024
    assert err(os.mkdir, b / ("x" * 129)) == errno.EINVAL
    assert err(os.mkdir, os.fsencode(b) + b"/caf\xe9") == errno.EINVAL
    assert err(os.mkdir, b / ".hidden") == errno.EINVAL
    assert err(os.mkdir, b / "a b") == errno.EINVAL
    assert err(os.mkdir, b / "..") == errno.EEXIST  # the kernel: ".." always exists
    assert err(os.mkdir, b / ".") == errno.EEXIST
    assert err(os.mkdir, b / "a" / "b") == errno.ENOENT  # the kernel: no directory "a"
    # FUSE passes names up to 1024 bytes (PATH_MAX on newer kernels): EINVAL from us or
    # ENAMETOOLONG from the kernel, never a branch
    assert err(os.mkdir, b / ("x" * 1100)) in (errno.EINVAL, errno.ENAMETOOLONG)
    with pytest.raises(ValueError):  # NUL cannot even be passed to mkdir(2)
        os.mkdir(os.fsencode(b) + b"/a\0b")
    assert state(fs) == before


def test_rebase_of_modified_branch_is_ebusy(fs):
    tree = fresh_branch(fs, "modified")
    assert fs.ctl("commit modified other")[0] == 0  # a second snapshot to re-base onto
    (tree / "new-file").write_text("change\n")
    parent = fs.mnt / "branches" / "modified" / "parent"
    assert err(write, parent, "base\n") == errno.EBUSY
    assert fs.ctl("rebase modified base")[0] == errno.EBUSY
    assert parent.read_text() == "other\n"
    assert "A new-file" in (fs.mnt / "branches" / "modified" / "status").read_text()
    # unmodified: re-base works, and the tree follows
    (tree / "new-file").unlink()
    write(parent, "base\n")
    assert parent.read_text() == "base\n"
    assert sorted(os.listdir(tree)) == sorted(os.listdir(fs.mnt / "snapshots" / "base"))
    fs.ctl("discard modified")
    fs.ctl("prune other")


# -- commit ---------------------------------------------------------------------------------
def test_commit_errors(fs):
    tree = fresh_branch(fs, "cb")
    commit = fs.mnt / "branches" / "cb" / "commit"
    (tree / "f").write_text("1")
    before = state(fs)
    assert err(write, commit, "base\n") == errno.EEXIST
    assert fs.ctl("commit cb base")[0] == errno.EEXIST
    assert err(write, commit, "bad/id\n") == errno.EINVAL
    assert err(write, commit, "-bad\n") == errno.EINVAL
    assert err(write, commit, "x" * 300 + "\n") == errno.EINVAL
    assert err(write, commit, b"caf\xe9\n") == errno.EINVAL
    assert err(write, commit, "id1 id2\n") == errno.EINVAL
    assert fs.ctl("commit cb bad/id")[0] == errno.EINVAL
    assert fs.ctl("commit cb good k")[0] == errno.EINVAL  # label without '='
    assert fs.ctl("commit cb good =v")[0] == errno.EINVAL
    assert fs.ctl("commit nosuchbranch")[0] == errno.ENOENT
    assert state(fs) == before
    assert commit.read_text() == ""
    # a generated id; labels without id; the reply names the id
    code, reply = fs.ctl("commit cb step=1")
    assert code == 0 and reply.startswith("ok ")
    generated = reply[3:]
    assert commit.read_text() == generated + "\n"
    assert os.getxattr(fs.mnt / "snapshots" / generated, "user.cascowfs.label.step") == b"1"
    # an empty line: generated id too
    (tree / "g").write_text("2")
    write(commit, "\n")
    second = commit.read_text().strip()
    assert second and second != generated
    assert (fs.mnt / "branches" / "cb" / "parent").read_text() == second + "\n"
    fs.ctl("discard cb")
    assert fs.ctl(f"prune {second}")[0] == 0
    assert fs.ctl(f"prune {generated}")[0] == 0


def test_an_open_file_of_a_discarded_branch_leaves_its_namesake_alone(fs):
    """A branch discarded and made again under its name is another branch: files opened on
    the first (commit, parent, status) answer ENOENT instead of acting on the second."""
    fresh_branch(fs, "reused")
    files = {which: fs.mnt / "branches" / "reused" / which for which in
             ("commit", "parent", "status", "status.z")}
    fds = {which: os.open(path, os.O_RDWR if which in ("commit", "parent") else os.O_RDONLY)
           for which, path in files.items()}
    try:
        assert fs.ctl("discard reused")[0] == 0
        theirs = fresh_branch(fs, "reused")
        (theirs / "theirs").write_text("B")
        assert err(os.write, fds["commit"], b"stolen who=A\n") == errno.ENOENT
        assert err(os.write, fds["parent"], b"\n") == errno.ENOENT
        for which in ("status", "status.z"):
            assert err(os.pread, fds[which], 4096, 0) == errno.ENOENT
        assert "stolen" not in os.listdir(fs.mnt / "snapshots")
        assert (theirs / "theirs").read_text() == "B"
        assert files["status"].read_text() == "A theirs\n"  # the branch itself: its own files
        write(files["commit"], "theirs-1\n")
        assert (fs.mnt / "snapshots" / "theirs-1" / "theirs").read_text() == "B"
    finally:
        for fd in fds.values():
            os.close(fd)
    fs.ctl("discard reused")
    fs.ctl("prune theirs-1")


def test_a_refused_write_sent_again_at_close_keeps_its_errno(fs):
    """Python's buffered files send a refused write again when they are closed: the second
    send of the same bytes gets the first one's errno, not "one line per open file"."""
    tree = fresh_branch(fs, "buffered")
    (tree / "f").write_text("1")
    branch = fs.mnt / "branches" / "buffered"
    cases = [("parent", "nosuch\n", FileNotFoundError), ("parent", "base\n", BlockingIOError),
             ("commit", "base\n", FileExistsError)]
    for which, line, refused in cases:
        with pytest.raises(OSError) as exc:
            (branch / which).write_text(line)
        errors = {errno.EBUSY: BlockingIOError}
        assert errors.get(exc.value.errno, type(exc.value)) is refused, exc.value
    fd = os.open(branch / "parent", os.O_WRONLY)
    try:
        assert err(os.write, fd, b"nosuch\n") == errno.ENOENT
        assert err(os.write, fd, b"base\n") == errno.EINVAL  # other bytes: a second line
    finally:
        os.close(fd)
    fs.ctl("discard buffered")


def test_concurrent_commits_of_one_branch(fs):
    """Two commits of one branch at once: one wins, the other gets EBUSY, nothing breaks.

    One goes through ``ctl``, the other through the branch's ``commit`` file (another inode,
    so the kernel runs the two writes at the same time).
    """
    tree = fresh_branch(fs, "racy")
    commit_file = fs.mnt / "branches" / "racy" / "commit"
    busy = 0
    made: list[str] = []
    for attempt in range(6):
        for i in range(6):  # enough data that a commit takes a while
            (tree / f"blob-{attempt}-{i}").write_bytes(os.urandom(4 << 20))
        results: dict[str, tuple[int, str]] = {}
        barrier = threading.Barrier(2)

        def via_ctl() -> None:
            barrier.wait()
            results["ctl"] = fs.ctl(f"commit racy r{attempt}-ctl")

        def via_file() -> None:
            barrier.wait()
            results["file"] = (err(write, commit_file, f"r{attempt}-file\n"), "")

        threads = [threading.Thread(target=via_ctl), threading.Thread(target=via_file)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(code for code, _ in results.values())
        assert codes in ([0, 0], [0, errno.EBUSY]), results
        made += [f"r{attempt}-{k}" for k, (code, _) in results.items() if code == 0]
        if errno.EBUSY in codes:
            busy += 1
            break
    assert busy, "never saw two commits of one branch overlap"
    # the last snapshot holds exactly the branch's content
    last = commit_file.read_text().strip()
    assert last in made
    assert (fs.mnt / "branches" / "racy" / "status").read_text() == ""
    assert sorted(os.listdir(fs.mnt / "snapshots" / last)) == sorted(os.listdir(tree))
    fs.ctl("discard racy")
    for ident in made:
        if ident != last:
            assert fs.ctl(f"prune {ident}")[0] == 0
    assert fs.ctl(f"prune {last}")[0] == 0


def test_each_open_ctl_file_gets_a_lane_of_its_own(fs):
    """While one ctl file is open, opening ctl again gives another inode (a lane), so the
    kernel, which runs one write(2) at a time per inode, lets the two commands overlap; one
    at a time, opens keep reusing the same lane."""
    ctl = fs.mnt / "ctl"
    alone = {os.stat(ctl).st_ino for _ in range(5)}
    fds = [os.open(ctl, os.O_RDWR) for _ in range(3)]
    try:
        held = [os.fstat(fd).st_ino for fd in fds]
        assert len(set(held)) == 3, held
        for i, fd in enumerate(fds):  # every lane is a full ctl
            os.write(fd, f"branch lane{i} base\n".encode())
            assert os.read(fd, 4096).decode().startswith("ok ")
    finally:
        for fd in fds:
            os.close(fd)
    assert len(alone) == 1
    assert os.stat(ctl).st_ino in held  # idle lanes are reused, not multiplied
    assert os.listdir(fs.mnt).count("ctl") == 1
    for i in range(3):
        assert fs.ctl(f"discard lane{i}")[0] == 0


def test_agents_opening_ctl_at_once_each_get_a_lane(fs):
    """Agents started together look ``ctl`` up before any of them opens it; each must still
    get a lane of its own, or its commands would wait for the others' for as long as it
    keeps the file open."""
    agents, rounds = 6, 15
    barrier = threading.Barrier(agents)
    held: list[list[int]] = [[] for _ in range(rounds)]

    def agent() -> None:
        for r in range(rounds):
            barrier.wait()
            fd = os.open(fs.mnt / "ctl", os.O_RDWR)
            try:
                held[r].append(os.fstat(fd).st_ino)
                barrier.wait()  # every agent has it open now
            finally:
                os.close(fd)

    threads = [threading.Thread(target=agent) for _ in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    shared = [inos for inos in held if len(set(inos)) != agents]
    assert not shared, f"{len(shared)} of {rounds} rounds shared a lane: {shared[:3]}"


def test_a_long_ctl_command_does_not_hold_up_another(fs):
    tree = fresh_branch(fs, "long")
    for i in range(24):
        (tree / f"big-{i}").write_bytes(os.urandom(8 << 20))
    started = threading.Event()
    finished: list[float] = []

    def commit() -> None:
        started.set()
        assert fs.ctl("commit long long-snap")[0] == 0
        finished.append(time.monotonic())

    worker = threading.Thread(target=commit)
    worker.start()
    started.wait()
    time.sleep(0.05)  # let the commit's write(2) reach the daemon
    t0 = time.monotonic()
    code, reply = fs.ctl("branch quick base")
    quick_done = time.monotonic()
    worker.join()
    assert code == 0, reply
    assert finished[0] - t0 > 0.3, "commit too fast to prove anything"
    assert quick_done < finished[0], "the second command waited for the first"
    assert fs.ctl("discard quick")[0] == 0
    assert fs.ctl("discard long")[0] == 0
    assert fs.ctl("prune long-snap")[0] == 0


def test_long_commit_does_not_stall_snapshot_reads(fs):
    tree = fresh_branch(fs, "slow")
    for i in range(24):
        (tree / f"big-{i}").write_bytes(os.urandom(8 << 20))
    files = [p for p in (fs.mnt / "snapshots" / "base" / "json").iterdir() if p.is_file()]
    latencies: list[float] = []
    done = threading.Event()
    commit_time: list[float] = []

    def commit() -> None:
        t0 = time.monotonic()
        assert fs.ctl("commit slow slow-snap")[0] == 0
        commit_time.append(time.monotonic() - t0)
        done.set()

    worker = threading.Thread(target=commit)
    worker.start()
    i = 0
    while not done.is_set():
        t0 = time.monotonic()
        # uncached work: a fresh ctl-free lookup+read of snapshot data and a listing
        os.stat(files[i % len(files)])
        os.listdir(fs.mnt / "snapshots")
        (fs.mnt / "branches" / "slow" / "parent").read_text()
        latencies.append(time.monotonic() - t0)
        i += 1
    worker.join()
    print(f"commit {commit_time[0]:.3f}s, {len(latencies)} probes, max {max(latencies):.4f}s")
    assert commit_time[0] > 0.3, "commit too fast to prove anything"
    assert len(latencies) > 5
    assert max(latencies) < commit_time[0] / 2, (max(latencies), commit_time)
    fs.ctl("discard slow")
    fs.ctl("prune slow-snap")


# -- discard and prune ----------------------------------------------------------------------
def test_discard_errors(fs):
    assert err(os.rmdir, fs.mnt / "branches" / "nosuch") == errno.ENOENT
    assert fs.ctl("discard nosuch")[0] == errno.ENOENT
    fresh_branch(fs, "gone")
    assert fs.ctl("discard gone") == (0, "ok gone")
    assert not (fs.mnt / "branches" / "gone").exists()
    assert fs.ctl("discard gone")[0] == errno.ENOENT


def test_prune_errors(fs):
    fresh_branch(fs, "holder")
    assert err(os.rmdir, fs.mnt / "snapshots" / "base") == errno.EBUSY
    assert fs.ctl("prune base")[0] == errno.EBUSY
    assert (fs.mnt / "snapshots" / "base").is_dir()
    assert err(os.rmdir, fs.mnt / "snapshots" / "nosuch") == errno.ENOENT
    assert fs.ctl("prune nosuch")[0] == errno.ENOENT
    fs.ctl("discard holder")
    # a snapshot nobody uses goes; rmdir and ctl alike
    fresh_branch(fs, "tmp")
    assert fs.ctl("commit tmp p1")[0] == 0
    assert fs.ctl("commit tmp p2")[0] == 0
    fs.ctl("discard tmp")
    os.rmdir(fs.mnt / "snapshots" / "p1")
    assert fs.ctl("prune p2") == (0, "ok p2")
    assert not (fs.mnt / "snapshots" / "p1").exists()
    assert not (fs.mnt / "snapshots" / "p2").exists()


# -- snapshots are read-only ----------------------------------------------------------------
def test_every_write_into_a_snapshot_is_erofs(fs):
    snap = fs.mnt / "snapshots" / "base"
    f = snap / "json" / "__init__.py"
    d = snap / "json"
    before = f.read_bytes()
    assert err(os.open, f, os.O_WRONLY) == errno.EROFS
    assert err(os.open, f, os.O_RDWR) == errno.EROFS
    assert err(os.open, f, os.O_RDONLY | os.O_TRUNC) == errno.EROFS
    assert err(os.open, f, os.O_WRONLY | os.O_APPEND) == errno.EROFS
    assert err(os.open, d / "new", os.O_WRONLY | os.O_CREAT) == errno.EROFS
    assert err(os.truncate, f, 0) == errno.EROFS
    assert err(os.unlink, f) == errno.EROFS
    assert err(os.rename, f, d / "moved") == errno.EROFS
    assert err(os.link, f, d / "hard") == errno.EROFS
    assert err(os.symlink, "x", d / "sym") == errno.EROFS
    assert err(os.mkdir, d / "sub") == errno.EROFS
    assert err(os.rmdir, d) == errno.EROFS
    assert err(os.mknod, d / "fifo", 0o600 | 0o010000) == errno.EROFS
    assert err(os.chmod, f, 0o777) == errno.EROFS
    assert err(os.chown, f, 1, 1) == errno.EROFS
    assert err(os.utime, f, (0, 0)) == errno.EROFS
    assert err(os.setxattr, f, "user.x", b"1") == errno.EROFS
    assert err(os.removexattr, d, "user.origin") == errno.EROFS
    assert err(os.chmod, snap, 0o700) == errno.EROFS
    assert err(os.mkdir, fs.mnt / "snapshots" / "handmade") == errno.EROFS
    assert err(os.rename, snap, fs.mnt / "snapshots" / "renamed") == errno.EROFS
    assert f.read_bytes() == before


# -- ctl ------------------------------------------------------------------------------------
MALFORMED = [
    b"", b"\n", b"   \n", b"hello", b"branch", b"branch onlyname", b"branch a b c",
    b"commit", b"discard", b"discard a b", b"prune", b"prune a b", b"rebase", b"rebase a b c",
    b"import", b"import id", b"import id relative/path", b"gc now",
    b"branch a base\nbranch b base", b"\xff\xfe", b"branch \"unterminated base",
    b"BRANCH a base", b"x" * 70000, b"\0", b"commit a id key", b"commit a id =value",
]


def test_malformed_ctl_lines_are_einval(fs):
    before = state(fs)
    fd = os.open(fs.mnt / "ctl", os.O_RDWR)
    try:
        for line in MALFORMED:
            if line == b"":
                continue  # write(2) of nothing never reaches a filesystem
            assert err(os.write, fd, line) == errno.EINVAL, line
        replies = os.read(fd, 1 << 20).decode().splitlines()
    finally:
        os.close(fd)
    assert len(replies) == len(MALFORMED) - 1
    assert all(r.startswith("error EINVAL ") for r in replies), replies
    assert state(fs) == before
    # and the daemon is still fine
    assert fs.ctl("branch after-garbage base")[0] == 0
    assert fs.ctl("discard after-garbage")[0] == 0


def test_ctl_replies_on_the_same_open_file(fs):
    with open(fs.mnt / "ctl", "r+b", buffering=0) as ctl:
        ctl.write(b"branch r1 base\n")
        with pytest.raises(OSError) as info:
            ctl.write(b"branch r1 base\n")
        assert info.value.errno == errno.EEXIST
        ctl.write(b"discard r1\n")
        lines = ctl.read().decode().splitlines()
        assert lines[0] == f"ok {fs.base}/store/branches/r1/tree" or lines[0].startswith("ok /")
        assert lines[1].startswith("error EEXIST ")
        assert lines[2] == "ok r1"
        assert ctl.read() == b""  # nothing more until the next command
    # a shell reading its replies: exec 3<>ctl
    out = fs.sh('exec 3<>"$MNT/ctl"; echo "branch r2 base" >&3; read -r reply <&3; '
                'echo "discard r2" >&3; read -r reply2 <&3; echo "$reply|$reply2"').stdout
    first, second = out.strip().split("|")
    assert first.startswith("ok /") and first.endswith("/r2/tree")
    assert second == "ok r2"


def test_a_write_only_open_of_ctl_is_answered_by_its_writes(fs):
    root = fs.mnt / "snapshots" / "base"
    fd = os.open(fs.mnt / "ctl", os.O_WRONLY)
    try:
        with open(fs.mnt / "ctl", "r+b", buffering=0) as beside:
            for n in range(3):
                assert os.write(fd, f"label base wo={n}\n".encode()) > 0
            assert os.getxattr(root, "user.cascowfs.label.wo") == b"2"  # applied on return
            assert err(os.write, fd, b"label no-such-snapshot wo=1\n") == errno.ENOENT
            assert "no-such-snapshot" in fs.log_text()  # the message no reply carries
            assert err(os.write, fd, b"label base bad/key=1\n") == errno.EINVAL
            assert os.getxattr(root, "user.cascowfs.label.wo") == b"2"
            # replies belong to their open file: none of the write-only one's shows here
            beside.write(b"label base wo=\n")
            assert beside.read() == b"ok base\n"
    finally:
        os.close(fd)
    assert err(os.getxattr, root, "user.cascowfs.label.wo") == errno.ENODATA
    # what a shell's redirection does: open(O_WRONLY|O_CREAT|O_TRUNC), one write
    fs.sh('echo "label base sh=1" > "$MNT/ctl"')
    assert os.getxattr(root, "user.cascowfs.label.sh") == b"1"
    assert fs.sh('echo "label no-such-snapshot sh=1" > "$MNT/ctl"', check=False).returncode != 0
    fs.ctl("label base sh=")


def test_ctl_and_control_files_are_not_cached(fs):
    parent = fs.mnt / "branches" / "nc" / "parent"
    fresh_branch(fs, "nc")
    assert parent.read_text() == "base\n"
    with open(parent, "rb", buffering=0) as fh:
        assert fh.read() == b"base\n"
        assert fs.ctl("commit nc nc-1")[0] == 0
        assert os.pread(fh.fileno(), 100, 0) == b"nc-1\n"  # same open file, fresh content
    st = os.stat(parent)
    assert st.st_size == len("nc-1\n")
    fs.ctl("discard nc")
    assert not parent.parent.exists()
    fs.ctl("prune nc-1")


# -- permissions ----------------------------------------------------------------------------
NONROOT_SCRIPT = r"""
import errno, json, os, sys
mnt = sys.argv[1]
def e(fn, *a):
    try:
        fn(*a)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"
def w(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
out = {
    "mkdir": e(os.mkdir, f"{mnt}/branches/evil"),
    "rmdir branch": e(os.rmdir, f"{mnt}/branches/victim"),
    "rmdir snapshot": e(os.rmdir, f"{mnt}/snapshots/base"),
    "ctl branch": e(w, f"{mnt}/ctl", b"branch evil base\n"),
    "ctl discard": e(w, f"{mnt}/ctl", b"discard victim\n"),
    "ctl reset": e(w, f"{mnt}/ctl", b"reset victim base\n"),
    "ctl garbage": e(w, f"{mnt}/ctl", b"garbage\n"),
    "commit": e(w, f"{mnt}/branches/victim/commit", b"evil\n"),
    "parent": e(w, f"{mnt}/branches/victim/parent", b"base\n"),
    "read status": e(lambda: open(f"{mnt}/branches/victim/status").read()),
    "read parent": e(lambda: open(f"{mnt}/branches/victim/parent").read()),
    "list": e(os.listdir, f"{mnt}/snapshots"),
    "read snapshot": e(lambda: open(f"{mnt}/snapshots/base/json/__init__.py").read()),
    "tree": e(os.readlink, f"{mnt}/branches/victim/tree"),
    "read watched status": e(lambda: open(f"{mnt}/branches/watched/status").read()),
    "read watched status.z": e(lambda: open(f"{mnt}/branches/watched/status.z").read()),
}
print(json.dumps(out))
"""


def _as_nobody(fs: Cascow, groups: list[int] | None = None) -> dict:
    # the system interpreter: the test's own may live under /root, out of nobody's reach
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.run([python, "-c", NONROOT_SCRIPT, str(fs.mnt)], capture_output=True,
                          text=True, user=NOBODY, group=NOBODY, extra_groups=groups or [],
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_only_root_may_change_state(fs):
    fresh_branch(fs, "victim")
    watched = fresh_branch(fs, "watched")
    (watched / "private").mkdir(mode=0o700)
    (watched / "private" / "secret-name").write_text("x")
    before = state(fs)
    out = _as_nobody(fs)
    for op in ("mkdir", "rmdir branch", "rmdir snapshot", "ctl branch", "ctl discard",
               "ctl reset", "ctl garbage", "commit", "parent"):
        assert out[op] == "EPERM", (op, out)
    # MNT/events says what was tried on what, a change refused through ctl too
    events = [json.loads(line) for line in (fs.mnt / "events").read_text().splitlines()]
    refused = [(e["op"], e["names"]) for e in events if e["result"] == "EPERM"]
    assert ("reset", ["victim"]) in refused, refused
    for op in ("read parent", "list", "read snapshot", "tree"):
        assert out[op] == "ok", (op, out)
    # status names every changed path, those under directories nobody may list too
    for op in ("read status", "read watched status", "read watched status.z"):
        assert out[op] == "EACCES", (op, out)
    assert stat.S_IMODE(os.stat(fs.mnt / "branches" / "watched" / "status").st_mode) == 0o440
    assert state(fs) == before
    fs.ctl("discard victim")
    fs.ctl("discard watched")


def test_admin_group_may_change_state():
    admin_gid = 4242

    def populate(fs: Cascow) -> None:
        (fs.base / "src").mkdir()
        (fs.base / "src" / "f").write_text("x")

    with mounted("--admin-group", str(admin_gid), populate=populate) as fs:
        assert fs.ctl(f"import base {fs.base / 'src'}")[0] == 0
        fresh_branch(fs, "victim")
        (fs.mnt / "branches" / "watched").mkdir()  # on the empty snapshot: base stays unused
        out = _as_nobody(fs, groups=[admin_gid])
        assert out["read watched status"] == out["read watched status.z"] == "ok"
        # in script order: mkdir evil, rmdir victim, rmdir (now unused) base, ...
        assert out["mkdir"] == "ok"
        assert out["rmdir branch"] == "ok"
        assert out["rmdir snapshot"] == "ok"
        assert out["ctl branch"] == "EEXIST"
        assert out["ctl discard"] == "ENOENT"
        assert out["ctl garbage"] == "EINVAL"
        assert not (fs.mnt / "branches" / "victim").exists()
        assert not (fs.mnt / "snapshots" / "base").exists()
        assert (fs.mnt / "branches" / "evil").is_dir()
        assert _as_nobody(fs)["ctl garbage"] == "EPERM"  # not a member: still refused
