"""What one user outside the admin group can make the daemon hold (fuse/budgets.py): shared
generated files, listings of ids, capped unread ctl replies, a byte budget per uid, and the
threads its reads run in, against a real daemon and a user switched to with setpriv."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tracemalloc

import pyfuse3
import pytest
import trio

from cascowfs.errors import InvalidArgumentError, PermissionDeniedError
from cascowfs.events import OUTSIDER_EVENTS_KEPT, EventsReader
from cascowfs.fuse import budgets, operations
from cascowfs.fuse.feeds import SHOWN_COMMAND_CHARS
from cascowfs.fuse.inodes import BRANCHES_INO, SNAPSHOTS_INO
from cascowfs.fuse.operations import CascowOperations, CtlHandle, DirHandle
from cascowfs.fuse.snapshot_view import LinkCounts
from cascowfs.logs import JsonFormatter
from cascowfs.privacy import Caller
from cascowfs.fuse.budgets import Budgets, Generated, OverBudgetError, ReaderThreads
from fusehelpers import mounted, needs_fuse
from types import SimpleNamespace

NOBODY = 65534
BUDGET = 64 << 20  # the test daemon's, so that a few versions of episodes exhaust it
SNAPSHOTS = 400
LABELS = " ".join(f"k{i}=" + "x" * 4000 for i in range(7))  # ~28 KB a snapshot: near the caps

# Run as nobody: a list of (op, args) steps, each one's outcome printed as JSON.
USER_SCRIPT = r"""
import ctypes, errno, json, os, sys
mnt, steps = sys.argv[1], json.loads(sys.argv[2])
held, out = [], []
def outcome(op, *args):
    try:
        if op == "hold":  # open episodes n times and keep them open
            for i in range(args[0]):
                held.append(os.open(mnt + "/episodes", os.O_RDONLY))
            return "ok"
        if op == "holddir":  # open snapshots/, read 64 bytes of entries, keep it open
            libc = ctypes.CDLL(None, use_errno=True)
            buf = ctypes.create_string_buffer(64)
            for i in range(args[0]):
                fd = os.open(mnt + "/snapshots", os.O_RDONLY | os.O_DIRECTORY)
                held.append(fd)
                if libc.syscall(217, fd, buf, 64) < 0:
                    return errno.errorcode[ctypes.get_errno()]
            return "ok"
        if op == "wait":  # for the test to look at the daemon: a line, then one back
            print(json.dumps(out), flush=True)
            sys.stdin.readline()
            return "ok"
        if op == "unread":  # send n finds on one open ctl and read what is left at the end
            fd = os.open(mnt + "/ctl", os.O_RDWR)
            for i in range(args[0]):
                os.write(fd, b"find has:k0\n")
            data = b""
            while True:
                more = os.read(fd, 1 << 20)
                if not more:
                    break
                data += more
            os.close(fd)
            return data.decode()
        if op == "events":  # open events n times, read a byte of each, keep them open;
            for i in range(args[0]):  # an open may find the budget full after args[1] opens
                try:
                    fd = os.open(mnt + "/events", os.O_RDONLY)
                except OSError as exc:
                    if exc.errno == errno.ENOMEM and i >= args[1]:
                        return "ok"
                    raise
                held.append(fd)
                os.read(fd, 1)
            return "ok"
        if op == "stat":  # stat each path given
            for path in args[0]:
                os.stat(path)
            return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
for step in steps:
    out.append(outcome(*step))
print(json.dumps(out), flush=True)
"""


def _user(mnt, steps) -> subprocess.Popen:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to switch users")
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
         USER_SCRIPT, str(mnt), json.dumps(steps)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")


def _as_user(mnt, steps) -> list:
    proc = _user(mnt, steps)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return json.loads(out)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fs():
    saved = os.environ.get(budgets.ENV_BUDGET)
    os.environ[budgets.ENV_BUDGET] = str(BUDGET)
    try:
        with mounted() as fs:
            os.mkdir(fs.mnt / "branches" / "pop")
            fd = os.open(fs.mnt / "ctl", os.O_WRONLY)
            try:
                for i in range(SNAPSHOTS):
                    os.write(fd, f"commit pop s{i} {LABELS}\n".encode())
            finally:
                os.close(fd)
            yield fs
    finally:
        if saved is None:
            os.environ.pop(budgets.ENV_BUDGET, None)
        else:
            os.environ[budgets.ENV_BUDGET] = saved


@needs_fuse
def test_many_opens_of_episodes_share_one_content(fs):
    size = len((fs.mnt / "episodes").read_bytes())
    assert size > 10 << 20
    before = _rss_mb(fs.pid)
    user = _user(fs.mnt, [("hold", 40), ("wait",)])
    assert json.loads(user.stdout.readline()) == ["ok"]
    held = _rss_mb(fs.pid) - before
    user.communicate("\n", timeout=60)
    # one copy per open would be 40 x 11 MB; one shared copy, and what generating it took
    assert held < 8 * size / (1 << 20), (held, size)


@needs_fuse
def test_a_user_past_its_budget_gets_enomem_and_root_still_reads(fs):
    size = len((fs.mnt / "episodes").read_bytes())
    versions = BUDGET // size + 2
    steps = []
    for n in range(versions):  # root labels between the opens: each open sees a new version
        steps += [("hold", 1), ("wait",)]
    user = _user(fs.mnt, steps)
    outcomes = []
    for n in range(versions):
        outcomes = json.loads(user.stdout.readline())
        assert fs.ctl(f"label s0 step={n}")[0] == 0
        user.stdin.write("\n")
        user.stdin.flush()
    user.communicate(timeout=60)
    opened = outcomes[0::2]
    assert "ENOMEM" in opened, opened
    assert opened.index("ENOMEM") >= BUDGET // size - 1  # the budget, not less
    first = (fs.mnt / "episodes").read_bytes().split(b"\n", 1)[0]  # root: its own budget
    assert json.loads(first)["labels"]["step"] == str(versions - 1)
    assert "over its budget" in fs.log_text()


@needs_fuse
def test_held_directory_handles_of_snapshots_cost_little(fs):
    os.listdir(fs.mnt / "snapshots")  # the kernel's and the daemon's nodes, made once
    before = _rss_mb(fs.pid)
    user = _user(fs.mnt, [("holddir", 20), ("wait",)])
    assert json.loads(user.stdout.readline()) == ["ok"]
    held = _rss_mb(fs.pid) - before
    user.communicate("\n", timeout=60)
    # a listing of records would be 20 x 11 MB of labels; of ids, a few KB each
    assert held < 40, held
    assert len(os.listdir(fs.mnt / "snapshots")) == SNAPSHOTS


@needs_fuse
def test_unread_ctl_replies_keep_the_newest_within_the_byte_cap(fs):
    [data] = _as_user(fs.mnt, [("unread", 600)])
    replies = data.splitlines()
    one = len(replies[-1]) + 1
    assert replies[-1].startswith("ok s")
    assert len(data) <= max(1 << 20, one)
    assert len(replies) < 600  # the oldest went


@needs_fuse
def test_events_a_reader_took_and_did_not_read_count_against_its_budget(fs):
    size = len((fs.mnt / "events").read_bytes())
    assert size > 50_000  # the ring: a line for each of the fixture's commits
    # Reads never fail: lines past the budget are skipped. Each open's handle costs 1 KiB,
    # so once the lines taken fill the budget an open may be refused, whatever the sizes.
    full = BUDGET // size - 50
    assert _as_user(fs.mnt, [("events", full + 100, full), ("hold", 1)]) == ["ok", "ENOMEM"]
    assert _as_user(fs.mnt, [("hold", 1)]) == ["ok"]  # given back at close


# -- the budget's arithmetic (no mount) ------------------------------------------------------
def test_one_file_past_the_budget_opens_when_it_is_all_the_uid_holds():
    b = Budgets(limit=1000)
    big = b.opened(7, "open")
    b.grow(big, 5000, "read")
    with pytest.raises(OverBudgetError) as exc:
        b.opened(7, "open")
    assert exc.value.errno == errno.ENOMEM
    b.closed(big)
    assert b.held[7] == 0
    b.opened(7, "open")


def test_a_shared_content_is_charged_once_per_uid():
    b = Budgets(limit=10_000)
    piece = Generated(1, b"x" * 4000)
    charges = [b.opened(u, "open") for u in (5, 5, 5, 6)]
    for charge in charges:
        b.share(charge, piece, "open")
    assert b.held[5] == 3 * budgets.HANDLE_BYTES + 4000
    assert b.held[6] == budgets.HANDLE_BYTES + 4000
    for charge in charges:
        b.closed(charge)
    assert not b.held and not piece.holders


def test_an_open_that_fails_gives_back_what_it_was_charged():
    b = Budgets(limit=10_000)
    held = b.opened(5, "open")
    with pytest.raises(OverBudgetError):
        with b.opening(5, "open episodes") as charge:
            b.share(charge, Generated(1, b"x" * 20_000), "open episodes")
    assert b.held[5] == held.bytes  # the failed open's handle and share given back
    with b.opening(5, "open metrics") as kept:
        b.grow(kept, 100, "open metrics")
    assert b.held[5] == held.bytes + kept.bytes  # an open that succeeds keeps its charge


def test_reader_threads_run_one_read_per_uid_and_few_in_all():
    running: list[int] = []
    peak = {"all": 0, 5: 0}

    def read(uid: int) -> None:
        running.append(uid)
        peak["all"] = max(peak["all"], len(running))
        peak[5] = max(peak[5], running.count(5))
        time.sleep(0.02)
        running.remove(uid)

    async def main() -> None:
        readers = ReaderThreads(total=2)
        shared = trio.to_thread.current_default_thread_limiter()
        async with trio.open_nursery() as nursery:
            for uid in (5, 5, 5, 6, 7, 8):
                nursery.start_soon(readers.run, uid, read, uid)
            await trio.sleep(0.01)
            assert shared.borrowed_tokens == 0

    trio.run(main)
    assert peak == {"all": 2, 5: 1}




def test_a_uids_next_read_waits_until_its_reads_took_their_share_of_a_core():
    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def main() -> None:
        readers = ReaderThreads(total=2, cpu_share=0.1)  # 0.1 s of CPU: 0.9 s idle
        start = trio.current_time()
        await readers.run(5, burn, 0.1)
        first = trio.current_time() - start
        await readers.run(6, burn, 0.0)  # another uid: not paced by uid 5's read
        other = trio.current_time() - start
        await readers.run(5, burn, 0.0)
        second = trio.current_time() - start
        assert first < 0.9  # a read's own reply does not wait out its pause
        assert other < 0.9
        assert second >= 1.0  # 0.1 s of CPU and 0.9 s paced

    trio.run(main)

@needs_fuse
def test_link_counts_of_other_users_walk_in_few_threads(fs):
    """A hard-linked file's st_nlink walks its whole snapshot once: for another user, in the
    readers' threads."""
    code, reply = fs.ctl("branch links s0")
    assert code == 0, reply
    tree = reply.split(" ", 1)[1]
    os.chmod(tree, 0o755)
    for d in range(3000):  # each directory is a read of the walk
        os.mkdir(f"{tree}/d{d}")
        with open(f"{tree}/d{d}/f", "w") as fh:
            fh.write("x")
    os.link(f"{tree}/d0/f", f"{tree}/linked")
    ids = []
    for n in range(24):  # a root each: each one's link counts are walked once
        with open(f"{tree}/d1/f", "w") as fh:
            fh.write(str(n))
        code, reply = fs.ctl(f"commit links l{n}")
        assert code == 0, reply
        ids.append(reply.split()[1])
    tasks = f"/proc/{fs.pid}/task"
    fs.ctl("find has:k0")
    before = len(os.listdir(tasks))
    users = [_user(fs.mnt, [("wait",), ("stat", [f"{fs.mnt}/snapshots/{i}/linked"]),
                            ("wait",)]) for i in ids]
    for user in users:  # all started: stat at once
        json.loads(user.stdout.readline())
    for user in users:
        user.stdin.write("\n")
        user.stdin.flush()
    for user in users:
        assert json.loads(user.stdout.readline()) == ["ok", "ok"]
    during = len(os.listdir(tasks))
    for user in users:
        user.communicate("\n", timeout=60)
    assert os.stat(f"{fs.mnt}/snapshots/{ids[0]}/linked").st_nlink == 2
    assert during - before <= budgets.READER_THREADS, (before, during)


def test_reads_of_other_users_go_to_the_readers_threads(sm, store):
    """Queries through ctl, listings and generating episodes: a non-admin's in
    ``ReaderThreads``, root's in the shared pool."""
    ops = CascowOperations(sm, store)
    routed: list[int] = []

    async def run(uid, fn, *args):
        routed.append(uid)
        return fn(*args)

    ops.readers.run = run

    async def main() -> None:
        for uid in (1000, 0):
            ctx = SimpleNamespace(uid=uid, gid=uid, pid=os.getpid())
            admin = uid == 0
            handle = CtlHandle(ops.ctl, ops.budgets.opened(uid, "open"), admin=admin,
                               caller=Caller(uid, uid))
            await ops._ctl_write(handle, b"children\n")
            await ops._listing(DirHandle(ops.snapshots, admin=admin), uid)
            ops.feeds.changes += 1  # a new state: generated again
            await ops._episodes_piece(ctx)

    trio.run(main)
    assert routed == [1000, 1000, 1000]


def test_link_counts_kept_for_lookups_stay_within_their_limit(sm, store, tmp_path, monkeypatch):
    """Every snapshot root whose hard links a lookup counted used to be kept for good."""
    monkeypatch.setenv("CASCOWFS_SNAPSHOT_VIEWS", "fuse")  # the daemon's own view
    for n in range(3):
        src = tmp_path / f"src{n}"
        src.mkdir()
        (src / "a").write_text(str(n))
        os.link(src / "a", src / "b")
        sm.import_tree(src, f"s{n}")
    ops = CascowOperations(sm, store)
    ops._links = LinkCounts(limit=2)  # a group per snapshot: two snapshots' counts
    ctx = SimpleNamespace(uid=0, gid=0, pid=os.getpid())

    async def main() -> list[int]:
        links = []
        for n in (0, 1, 2, 0):
            root = await ops.lookup(SNAPSHOTS_INO, f"s{n}".encode(), ctx)
            links.append((await ops.lookup(root.st_ino, b"b", ctx)).st_nlink)
        return links

    assert trio.run(main) == [2, 2, 2, 2]
    assert ops._links.groups == 2  # s0 counted again after s2 took its place


def test_a_large_directory_not_cached_is_decoded_in_a_thread(sm, store, tmp_path, monkeypatch):
    """A snapshot directory of a million entries decoded for 4-5 s on the trio thread, every
    request of every agent waiting, at one `ls` by any user."""
    monkeypatch.setenv("CASCOWFS_SNAPSHOT_VIEWS", "fuse")
    src = tmp_path / "src"
    for name, count in (("big", 3000), ("small", 10)):
        (src / name).mkdir(parents=True)
        for i in range(count):
            (src / name / f"f{i}").write_bytes(b"")
    sm.import_tree(src, "base")
    ops = CascowOperations(sm, store)
    routed: list[str] = []

    async def run(uid, fn, *args):
        routed.append(fn.__name__)
        return fn(*args)

    ops.readers.run = run
    ctx = SimpleNamespace(uid=1000, gid=1000, pid=os.getpid())

    async def main() -> None:
        root = await ops.lookup(SNAPSHOTS_INO, b"base", ctx)
        big = await ops.lookup(root.st_ino, b"big", ctx)
        small = await ops.lookup(root.st_ino, b"small", ctx)
        sm.trees._cache.clear()  # as after a restart, or when other trees pushed it out
        sm.trees._cached_entries = 0
        routed.clear()
        await ops.lookup(small.st_ino, b"f1", ctx)
        assert routed == []  # small: decoded on the spot
        await ops.lookup(big.st_ino, b"f1", ctx)
        assert routed == ["read_tree"]
        await ops.lookup(big.st_ino, b"f2", ctx)
        assert routed == ["read_tree"]  # cached by the first

    trio.run(main)


def _caller(uid: int) -> SimpleNamespace:
    return SimpleNamespace(uid=uid, gid=uid, pid=os.getpid())


def _ctl(ops: CascowOperations, uid: int) -> CtlHandle:
    return CtlHandle(
        ops.ctl, ops.budgets.opened(uid, "open"), admin=uid == 0, caller=Caller(uid, uid)
    )


def test_listings_are_charged_what_they_hold(sm, store, tmp_path, monkeypatch):
    """A listing was charged 96 bytes a name: an entry of a snapshot directory, decoded,
    held 4-5 times that (its xattrs not counted), an id of snapshots/ 402 bytes at 128
    characters, and one uid held about 1 GB under its budget of 256 MiB. Charged now
    never less than the open directory holds once the tree cache let go, nor twice it."""
    monkeypatch.setenv("CASCOWFS_SNAPSHOT_VIEWS", "fuse")
    big = tmp_path / "src" / "big"
    big.mkdir(parents=True)
    for i in range(2000):
        (big / f"file-{i:05d}").write_bytes(b"")
        if i % 2:
            os.setxattr(big / f"file-{i:05d}", "user.note", b"x" * 1024)
    sm.import_tree(tmp_path / "src", "base")
    monkeypatch.setattr(sm, "snapshot_ids", lambda: [f"{'i' * 120}{n:08d}" for n in range(2000)])
    ops = CascowOperations(sm, store)

    async def run(uid, fn, *args):
        return fn(*args)

    ops.readers.run = run  # no thread and no pacing: nothing but the listing is traced

    def forget_trees() -> None:
        sm.trees._cache.clear()  # as once other trees pushed the listing out
        sm.trees._cached_entries = 0
        gc.collect()

    # what the listing allocated and still holds: not what the store's background threads
    # (the import's layers) allocate or free meanwhile
    listing_only = [tracemalloc.Filter(True, operations.__file__, all_frames=True)]

    async def held(node) -> tuple[int, int]:
        await ops._listing(DirHandle(node), NOBODY)  # whatever a first listing makes for good
        forget_trees()
        tracemalloc.start(64)
        try:
            items, charged = await ops._listing(DirHandle(node), NOBODY)
            forget_trees()
            kept = tracemalloc.take_snapshot().filter_traces(listing_only)
        finally:
            tracemalloc.stop()
        assert len(items) == 2002
        return sum(trace.size for trace in kept.traces), charged

    async def main() -> None:
        root = await ops.lookup(SNAPSHOTS_INO, b"base", _caller(NOBODY))
        directory = ops.table.get((await ops.lookup(root.st_ino, b"big", _caller(NOBODY))).st_ino)
        for node in (ops.snapshots, directory):
            traced, charged = await held(node)
            assert traced <= charged <= 2 * traced, (node, traced, charged)

    trio.run(main)


def test_a_listings_charge_is_counted_once_per_tree_a_large_ones_in_a_thread(
    sm, store, tmp_path, monkeypatch
):
    """Counting what a snapshot directory's listing holds is a pass over its entries: at
    each listing, on the trio thread, every `ls` of a directory of a million entries (any
    user's) would stall every agent's requests. It is counted once per tree, in a read
    thread for a large one, and kept by tree id."""
    monkeypatch.setenv("CASCOWFS_SNAPSHOT_VIEWS", "fuse")
    src = tmp_path / "src"
    for name, count in (("big", 300), ("small", 10)):
        (src / name).mkdir(parents=True)
        for i in range(count):
            (src / name / f"f{i}").write_bytes(b"")
    sm.import_tree(src, "base")
    monkeypatch.setattr(operations, "LISTED_COUNTED_INLINE", 100)
    ops = CascowOperations(sm, store)
    counted: list[int] = []
    routed: list[str] = []

    def count(entries):
        counted.append(len(entries))
        return budgets.listed_entries_bytes(entries)

    monkeypatch.setattr(operations, "listed_entries_bytes", count)

    async def run(uid, fn, *args):
        routed.append(fn.__name__)
        return fn(*args)

    ops.readers.run = run

    async def main() -> None:
        root = await ops.lookup(SNAPSHOTS_INO, b"base", _caller(NOBODY))
        for name in (b"small", b"big"):
            node = ops.table.get((await ops.lookup(root.st_ino, name, _caller(NOBODY))).st_ino)
            for _ in range(3):
                await ops._listing(DirHandle(node), NOBODY)
        assert counted == [10, 300]
        assert routed.count("count") == 1  # the big one's, in a read thread

    trio.run(main)


def test_refused_commands_leave_episodes_as_generated(sm, store, tmp_path):
    """Every operation that ended counted as a change, refusals too: any user's `echo gc >
    MNT/ctl` loop (EPERM) made each open of episodes generate it anew, each as large as
    every record. Only what asked the store counts now: refused changes, malformed lines
    and refused mkdir and rmdir leave the content shared; root's label makes a new one."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    sm.import_tree(src, "s0")
    ops = CascowOperations(sm, store)
    made: list[int] = []
    generate = ops._episodes_content

    def counted() -> bytes:
        made.append(ops.feeds.changes)
        return generate()

    ops._episodes_content = counted
    nobody = _caller(NOBODY)

    async def main() -> None:
        await ops._episodes_piece(_caller(0))
        for line in (b"gc\n", b"prune s0\n", b"garbage\n", b"import s1 /" + b"\x01" * 999):
            with pytest.raises(PermissionDeniedError):
                await ops._ctl_write(_ctl(ops, NOBODY), line)
        for call in (
            ops.mkdir(BRANCHES_INO, b"x", 0o755, nobody),
            ops.rmdir(BRANCHES_INO, b"x", nobody),
            ops.rmdir(SNAPSHOTS_INO, b"s0", nobody),
        ):
            with pytest.raises(pyfuse3.FUSEError) as refused:
                await call
            assert refused.value.errno == errno.EPERM
        with pytest.raises(InvalidArgumentError):  # root's malformed line: nothing ran
            await ops._ctl_write(_ctl(ops, 0), b"prune\n")
        await ops._episodes_piece(_caller(0))
        assert len(made) == 1
        await ops._ctl_write(_ctl(ops, 0), b"label s0 seen=1\n")
        piece = await ops._episodes_piece(_caller(0))
        assert len(made) == 2
        assert b'"seen"' in piece.content

    trio.run(main)


def test_refusals_of_other_users_are_logged_short_and_seldom(sm, store, caplog):
    """Each refused command was logged whole at WARNING: a 64 KiB line any user wrote to
    ctl made a 1.2 MB JSON log line, hundreds a second, which filled the disk or, under
    journald's rate limit, hid the daemon's other lines. A record now shows 300 characters
    of a command and of each name, and a uid outside the admin group gets one line a
    minute at its level, the rest at DEBUG; each keeps its event. Root's are all logged."""
    ops = CascowOperations(sm, store)
    line = b"import s1 /" + b"\x01" * 65000 + b"\n"  # parses: refused for what it is

    async def main() -> None:
        for uid in [NOBODY] * 200 + [NOBODY - 1]:
            with pytest.raises(PermissionDeniedError):
                await ops._ctl_write(_ctl(ops, uid), line)
        for _ in range(3):
            with pytest.raises(InvalidArgumentError):
                await ops._ctl_write(_ctl(ops, 0), b"import s1 relative/" + b"\x01" * 65000)

    with caplog.at_level(logging.DEBUG, logger="cascowfs.ops"):
        trio.run(main)
    records = [r for r in caplog.records if r.name == "cascowfs.ops"]
    levels = [r.levelno for r in records]
    warning, debug = logging.WARNING, logging.DEBUG
    assert levels == [warning] + [debug] * 199 + [warning] + [warning] * 3
    longest = max(len(JsonFormatter().format(r)) for r in records)
    assert longest < 16 << 10, longest  # 3 copies of 300 characters, 6 each in JSON
    events = EventsReader.opened(ops.feeds.events).read(1 << 30).splitlines()
    outsiders = [json.loads(e) for e in events if b'"uid"' in e]
    assert len(outsiders) == OUTSIDER_EVENTS_KEPT  # the ring's, every one of them kept
    assert all(e["result"] == "EPERM" and e["op"] == "import" for e in outsiders)
    assert max(len(e) for e in events) < 6 * SHOWN_COMMAND_CHARS + 1024
