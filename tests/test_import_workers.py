"""The import's file workers: they start while the walk still finds files, give results back in
order, stay on threads for small imports, and leave nothing behind when a file fails."""

import errno
import os
import signal
import stat
import time

import pytest

from cascowfs import codec, import_workers
from cascowfs.cas import prepare_content
from cascowfs.errors import BusyError
from cascowfs.import_workers import FileJob, ImportWorkers
from cascowfs.scan import ObjectSink, finalize, scan_directory

from conftest import descendant_processes


def _files(root, count: int, size: int = 3000) -> list[FileJob]:
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(count):
        path = root / f"f{i:04d}"
        path.write_bytes(os.urandom(size // 2) + b"x" * (size // 2) + b"%d" % i)
        jobs.append(FileJob(None, path.name.encode(), os.fsencode(path), os.lstat(path), None))
    return jobs


def _workers_alive(before: set[int]) -> list[int]:
    return [p for p, _, _ in descendant_processes(os.getpid()) if p not in before]


@pytest.fixture
def process_path(monkeypatch):
    monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_BYTES", 0)
    monkeypatch.setattr(import_workers, "PROCESS_BATCH_FILES", 4)


def test_workers_start_before_the_walk_ends_and_keep_the_order(tmp_path, process_path):
    jobs = _files(tmp_path / "src", 40)
    taken = []
    with ImportWorkers(prepare_content) as workers:
        for job in jobs[:20]:
            workers.add(job)
        deadline = time.monotonic() + 30
        while not taken and time.monotonic() < deadline:  # the "walk" has not ended
            taken += workers.ready()
            time.sleep(0.01)
        assert taken, "no result came back before the last file was handed over"
        for job in jobs[20:]:
            workers.add(job)
        taken += workers.rest()
    # every job once; in order within each batch, batches in dispatch order
    assert sorted(job.name for job, _ in taken) == sorted(job.name for job in jobs)
    for job, (content_id, size, _, _) in taken:
        data = open(job.path, "rb").read()
        assert (content_id, size) == (prepare_content(data).content_id, len(data))


def test_small_imports_stay_on_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_BYTES", 1 << 30)
    jobs = _files(tmp_path / "src", 12)
    before = {p for p, _, _ in descendant_processes(os.getpid())}
    with ImportWorkers(prepare_content) as workers:
        for job in jobs:
            workers.add(job)
        assert list(workers.ready()) == []  # nothing is dispatched before the walk ends
        assert _workers_alive(before) == []
        taken = list(workers.rest())
    assert [job for job, _ in taken] == sorted(jobs, key=lambda job: job.st.st_ino)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: imports stay on threads")
def test_many_small_files_go_to_worker_processes(tmp_path):
    jobs = _files(tmp_path / "src", import_workers.PROCESS_POOL_MIN_FILES, size=100)
    assert sum(job.st.st_size for job in jobs) < import_workers.PROCESS_POOL_MIN_BYTES
    before = {p for p, _, _ in descendant_processes(os.getpid())}
    with ImportWorkers(prepare_content) as workers:
        for job in jobs[:-1]:
            workers.add(job)
        assert _workers_alive(before) == []  # one file short: still a small import
        workers.add(jobs[-1])
        assert _workers_alive(before) != []
        taken = list(workers.rest())
    assert sorted(job.name for job, _ in taken) == sorted(job.name for job in jobs)


def test_a_failing_file_raises_and_leaves_no_worker(tmp_path, process_path):
    jobs = _files(tmp_path / "src", 20)
    os.unlink(jobs[13].path)  # gone between the walk and the read
    before = {p for p, _, _ in descendant_processes(os.getpid())}
    with pytest.raises(BusyError, match="f0013: removed since the walk saw it"):
        with ImportWorkers(prepare_content) as workers:
            for job in jobs:
                workers.add(job)
            list(workers.rest())
    deadline = time.monotonic() + 10
    while _workers_alive(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers_alive(before) == []


def test_threads_and_processes_build_the_same_tree(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for d in range(6):
        _files(src / f"d{d}", 15)
    (src / "d0" / "link").symlink_to("f0001")
    os.link(src / "d1" / "f0002", src / "d2" / "hard")

    def import_root(min_bytes: int, layer) -> bytes:
        monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_BYTES", min_bytes)
        monkeypatch.setattr(import_workers, "PROCESS_BATCH_FILES", 7)
        sink = ObjectSink()
        return finalize(scan_directory(src, sink, mirror_to=layer), sink).ref

    assert import_root(1 << 30, tmp_path / "a") == import_root(0, tmp_path / "b")
    for layer in ("a", "b"):
        for d in range(6):
            for name in os.listdir(src / f"d{d}"):
                mirrored = tmp_path / layer / f"d{d}" / name
                if not mirrored.is_symlink():
                    assert mirrored.read_bytes() == (src / f"d{d}" / name).read_bytes()


def test_worker_processes_pack_at_the_import_level(tmp_path, process_path):
    """The workers' packs are zstd frames at ``IMPORT_ZSTD_LEVEL`` (faster than the store's
    level; docs/architecture.md, *Decisions*), and hold exactly the files' bytes."""
    assert codec.IMPORT_ZSTD_LEVEL != codec.ZSTD_LEVEL
    src = tmp_path / "src"
    _files(src, 12, size=40_000)
    sink = ObjectSink()
    finalize(scan_directory(src, sink), sink)
    packs = [value for value in sink.pending.values() if value[:1] == codec.TYPE_PACK]
    assert packs
    raw = b""
    for value in packs:
        assert value[1:2] == b"\x01"  # a zstd frame: these files shrink
        data = codec.decompress(value[2:])
        assert value[2:] == codec.compress(data, codec.IMPORT_ZSTD_LEVEL)
        assert value[2:] != codec.compress(data, codec.ZSTD_LEVEL)
        raw += data
    for path in src.iterdir():
        assert path.read_bytes() in raw


@pytest.mark.parametrize("change", ["truncated", "rewritten", "appended"])
def test_a_file_changed_while_it_is_read_is_refused_not_recorded_torn(tmp_path, change):
    """A commit or import reads each file once; a file an agent truncates or rewrites while
    it is read would be recorded as a mix of two versions (a prefix of the old one, say)
    that the file never held. The writer here acts, for real, halfway through the read."""
    path = tmp_path / "big"
    path.write_bytes(os.urandom(8 << 20))

    def prepare_while_written(pieces, emit):
        def meddled():
            for n, piece in enumerate(pieces):
                if n == 1:
                    if change == "truncated":
                        os.truncate(path, 100)
                    elif change == "rewritten":
                        with open(path, "r+b") as f:
                            f.write(b"other")
                    else:
                        with open(path, "ab") as f:
                            f.write(b"more")
                yield piece
        return prepare_content(meddled(), emit)

    with pytest.raises(BusyError, match="big: changed while it was read"):
        import_workers.read_content(os.fsencode(path), prepare_while_written)
    # at rest, the same read is recorded
    prepared, _ = import_workers.read_content(os.fsencode(path), prepare_content)
    assert prepared.size == path.stat().st_size


@pytest.mark.parametrize("where", ["threads", "processes", "streamed"])
def test_a_file_swapped_through_its_parent_after_the_walk_is_refused(tmp_path, monkeypatch,
                                                                     where):
    """The walk records a file's mode and owner from its lstat; the workers read its bytes
    by path later. A caller who swaps a directory of its tree for a symbolic link to another
    (and back) between the two got another file's bytes under the first one's metadata: its
    own program as a set-user-id file of root's. The read now insists on the file the walk
    saw; here the swap is done, for real, between the walk's lstat and the read."""
    if where == "processes":
        monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_BYTES", 0)
        monkeypatch.setattr(import_workers, "PROCESS_BATCH_FILES", 4)
    if where == "streamed":
        monkeypatch.setattr(import_workers, "STREAMED_FILE_MIN", 0)
    system, mine = tmp_path / "system", tmp_path / "mine"
    system.mkdir()
    (system / "tool").write_bytes(b"the system's own tool")
    src = tmp_path / "src"
    jobs = _files(src / "d", 12)
    os.rename(src / "d", mine)
    (src / "d").symlink_to(system)
    seen = os.lstat(src / "d" / "tool")  # the walk, through the swapped-in link
    os.unlink(src / "d")
    os.rename(mine, src / "d")
    (src / "d" / "tool").write_bytes(b"the caller's program")  # what the path reaches now
    jobs.append(FileJob(None, b"tool", os.fsencode(src / "d" / "tool"), seen, None))
    with pytest.raises(BusyError, match="tool: replaced since the walk saw it"):
        with ImportWorkers(prepare_content) as workers:
            for job in jobs:
                workers.add(job)
            list(workers.rest())


@pytest.mark.parametrize("where", ["threads", "processes", "streamed"])
def test_a_file_whose_inode_number_came_back_for_another_is_refused(tmp_path, monkeypatch,
                                                                    where):
    """The walk lstats root's set-user-id file; the agent deletes it and creates its own at
    the name, which ext4 gives the freed inode number at once (a red team made a real commit
    record its program as root's 4755 so). Here the walk's lstat is that of root's file with
    the number the agent's file holds: the read must see the owner and mode differ."""
    if where == "processes":
        monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_BYTES", 0)
        monkeypatch.setattr(import_workers, "PROCESS_BATCH_FILES", 4)
    if where == "streamed":
        monkeypatch.setattr(import_workers, "STREAMED_FILE_MIN", 0)
    src = tmp_path / "src"
    jobs = _files(src / "d", 12)
    tool = src / "d" / "tool"
    tool.write_bytes(b"the agent's program")
    os.chown(tool, 65534, 65534)
    now = os.lstat(tool)
    fields = list(now)
    fields[0], fields[4], fields[5] = stat.S_IFREG | 0o4755, 0, 0  # mode, uid, gid: root's
    rest = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
            "st_blksize", "st_blocks", "st_rdev")
    seen = os.stat_result(fields, {name: getattr(now, name) for name in rest})
    jobs.append(FileJob(None, b"tool", os.fsencode(tool), seen, None))
    with pytest.raises(BusyError, match="tool: replaced since the walk saw it"):
        with ImportWorkers(prepare_content) as workers:
            for job in jobs:
                workers.add(job)
            list(workers.rest())

def test_a_fifo_swapped_in_for_a_file_is_refused_at_once(tmp_path):
    """Opening a FIFO for reading waits for a writer: an import that met one where the walk
    saw a file hung for good, and every gc after it."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    seen = os.lstat(path)
    path.unlink()
    os.mkfifo(path)
    def hung(signum, frame):
        raise AssertionError("the open of the FIFO waited for a writer")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # a regression would otherwise hang the run
    try:
        with pytest.raises(BusyError, match="f: no longer a regular file"):
            with ImportWorkers(prepare_content) as workers:
                workers.add(FileJob(None, b"f", os.fsencode(path), seen, None))
                list(workers.rest())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_file_over_the_largest_a_snapshot_holds_is_refused_before_it_is_read(
        tmp_path, monkeypatch, sm):
    """A sparse file of 2**63 - 1 bytes (tmpfs, xfs) listed a hole item per GiB, 8.6e9 of
    them: the daemon ran out of memory committing it. Here the limit is lowered to 1 MiB
    for a sparse file of 2 MiB, which ext4 can hold."""
    from cascowfs.errors import FileTooLargeError

    monkeypatch.setattr(import_workers, "MAX_FILE_BYTES", 1 << 20)
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(2 << 20)
    with pytest.raises(FileTooLargeError, match="big: 2097152 bytes, over") as refused:
        import_workers.read_content(os.fsencode(big), prepare_content)
    assert refused.value.errno == errno.EFBIG
    src = tmp_path / "src"
    src.mkdir()
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    with open(tree / "big", "wb") as fh:
        fh.truncate(2 << 20)
    with pytest.raises(FileTooLargeError):
        sm.commit("b", "s1")
    assert not sm.has_snapshot("s1") and (tree / "big").stat().st_size == 2 << 20
    sm.discard("b")


def test_a_file_gone_since_the_walk_is_busy_naming_it(tmp_path):
    """A file deleted between the walk and its read said `commit of branch b: No such file
    or directory`; a change under the walk is EBUSY, naming the path, like the others."""
    seen = tmp_path / "seen"
    with pytest.raises(BusyError, match="seen: removed since the walk saw it"):
        import_workers.read_content(os.fsencode(seen), prepare_content)


def test_a_disk_error_names_the_file_it_failed_on(tmp_path):
    from cascowfs.errors import from_os_error

    long = tmp_path / ("x" * 300)
    try:
        os.lstat(long)
    except OSError as exc:
        error = from_os_error(exc, "commit of branch deep")
    assert error.errno == errno.ENAMETOOLONG
    assert error.message.startswith(f"commit of branch deep: {long}: File name too long")
