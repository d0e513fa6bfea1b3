"""The daemon's lifecycle on real mounts: readiness, SIGTERM, kill -9 with a writer inside a
branch, remount, --background, refusals; the store is fsck-clean afterwards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cascowfs import Client
from cascowfs.cli import exit_status
from fusehelpers import (PYTHON, REPO, Cascow, cascow_base, mounted, mounts_under, needs_fuse,
                         processes_mentioning, run_cli)
from support.mounts import abort_fuse

pytestmark = needs_fuse


def _populate(fs: Cascow) -> None:
    src = fs.base / "src"
    (src / "pkg").mkdir(parents=True)
    for i in range(50):
        (src / "pkg" / f"mod{i}.py").write_text(f"value = {i}\n" * 50)
    (src / "README").write_text("hello\n")


def _fsck(fs: Cascow) -> None:
    proc = run_cli("fsck", str(fs.store), check=False)
    assert proc.returncode == 0, f"fsck: {proc.stdout}\n{proc.stderr}"


def _mounted_types(fs: Cascow) -> list[str]:
    """The types mounted under the test's directory, but the branches' layer images."""
    return sorted(t for _, t in mounts_under(fs.base) if t != "erofs")


def test_proc_mounts_and_root_xattrs():
    with mounted() as fs:
        line = [l for l in Path("/proc/mounts").read_text().splitlines()
                if f" {fs.mnt} " in l][0]
        source, point, fstype, options = line.split()[:4]
        assert (source, fstype) == (str(fs.store), "fuse.cascowfs")
        assert "default_permissions" in options and "allow_other" in options
        assert int(os.getxattr(fs.mnt, "user.cascowfs.pid")) == fs.pid
        assert os.getxattr(fs.mnt, "user.cascowfs.store").decode() == str(fs.store)
        assert sorted(os.listdir(fs.mnt)) == ["branches", "ctl", "episodes", "events", "metrics", "observations", "snapshots"]


def test_sigterm_unmounts_and_branches_survive_a_restart():
    with mounted(populate=_populate) as fs:
        assert fs.ctl(f"import base {fs.base / 'src'}")[0] == 0
        code, reply = fs.ctl("branch keep base")
        tree = Path(reply[3:])
        (tree / "work.txt").write_text("in progress\n")
        fs.proc.send_signal(signal.SIGTERM)
        assert fs.proc.wait(timeout=30) == 0
        fs.notify.wait_for("STOPPING=1", 5)
        assert _mounted_types(fs) == ["overlay"]  # FUSE gone, the branch still mounted
        assert (tree / "work.txt").read_text() == "in progress\n"
        fs.start()
        assert (fs.mnt / "branches" / "keep" / "status").read_text() == "A work.txt\n"
        assert os.readlink(fs.mnt / "branches" / "keep" / "tree") == str(tree)
        assert fs.ctl("commit keep after-restart")[0] == 0
        assert (fs.mnt / "snapshots" / "after-restart" / "work.txt").read_text() == "in progress\n"


def test_kill9_while_a_process_writes_in_a_branch():
    with mounted(populate=_populate) as fs:
        assert fs.ctl(f"import base {fs.base / 'src'}")[0] == 0
        code, reply = fs.ctl("branch busy base")
        tree = Path(reply[3:])
        client = Client(fs.mnt)
        client.branch("early", "base")  # its ctl file is open when the daemon dies
        # The agent works in the resolved tree (what `readlink tree` gives), not through MNT.
        writer = subprocess.Popen(
            ["bash", "-c", "i=0; while :; do echo $i > out-$i.txt; cat pkg/mod1.py >/dev/null; "
                           "i=$((i+1)); sleep 0.005; done"],
            cwd=tree, stderr=subprocess.PIPE)
        try:
            time.sleep(0.3)
            fs.kill9()
            with pytest.raises(OSError) as info:
                os.listdir(fs.mnt)
            assert info.value.errno == errno.ENOTCONN  # the dead FUSE mount
            before = len(list(tree.glob("out-*.txt")))
            time.sleep(0.5)
            after = len(list(tree.glob("out-*.txt")))
            assert writer.poll() is None, writer.stderr.read()
            assert after > before, "the writer stopped when the daemon died"
            # mount again: clears the dead mount, serves every snapshot and branch
            fs.start()
            client.discard("early")  # the client reconnects by itself
            client.close()
            assert os.listdir(fs.mnt / "branches") == ["busy"]
            assert sorted(os.listdir(fs.mnt / "snapshots")) == ["base"]
            assert (fs.mnt / "snapshots" / "base" / "README").read_text() == "hello\n"
            time.sleep(0.2)
            assert writer.poll() is None
            status = (fs.mnt / "branches" / "busy" / "status").read_text()
            assert "A out-0.txt" in status
            assert fs.ctl("commit busy mid-write")[0] == 0  # commit while it keeps writing
            assert (fs.mnt / "snapshots" / "mid-write" / "out-0.txt").read_text() == "0\n"
        finally:
            writer.kill()
            writer.wait()
        fs.stop()  # the daemon goes, the branch stays mounted: that is the state fsck expects
        assert _mounted_types(fs) == ["overlay"]
        _fsck(fs)
        fs.start()  # and it comes back once more, branch re-created from the store
        assert os.listdir(fs.mnt / "branches") == ["busy"]
        assert (Path(os.readlink(fs.mnt / "branches" / "busy" / "tree")) / "out-0.txt").exists()


def test_background_mount_is_ready_when_the_command_returns():
    with cascow_base() as base:
        store, mnt = base / "store", base / "mnt"
        mnt.mkdir()
        try:
            t0 = time.monotonic()
            run_cli("mount", "--background", str(store), str(mnt),
                    "--log-file", str(base / "log"), timeout=60)
            assert sorted(os.listdir(mnt)) == ["branches", "ctl", "episodes", "events", "metrics", "observations", "snapshots"]
            pid = int(os.getxattr(mnt, "user.cascowfs.pid"))
            assert pid != os.getpid() and processes_mentioning(str(store)) == [pid]
            assert time.monotonic() - t0 < 30
            run_cli("umount", str(mnt))
            assert processes_mentioning(str(store)) == []
            assert mounts_under(base) == []
        finally:
            for pid in processes_mentioning(str(store)):
                os.kill(pid, signal.SIGKILL)
            for point, _ in mounts_under(base):
                subprocess.run(["umount", "-l", point])


def test_background_mount_reports_failure():
    with cascow_base() as base:
        proc = run_cli("mount", "--background", str(base / "store"), str(base / "nonexistent"),
                       check=False)
        assert proc.returncode != 0
        assert "not a directory" in proc.stderr
        assert processes_mentioning(str(base / "store")) == []


def test_second_daemon_is_refused():
    with mounted() as fs:
        other = fs.base / "other"
        other.mkdir()
        proc = run_cli("mount", str(fs.store), str(other), check=False, timeout=30)
        assert proc.returncode == exit_status(errno.EBUSY), proc.stderr  # store locked
        assert "EBUSY" in proc.stderr, proc.stderr
        proc = run_cli("mount", "--background", "--json", str(fs.store), str(other),
                       check=False, timeout=30)  # refused in the child: reported the same
        assert proc.returncode == exit_status(errno.EBUSY), proc.stderr
        assert json.loads(proc.stderr)["error"] == "EBUSY", proc.stderr
        proc = run_cli("mount", str(fs.base / "store2"), str(fs.mnt), check=False, timeout=30)
        assert proc.returncode == exit_status(errno.EBUSY), proc.stderr
        assert "already served" in proc.stderr, proc.stderr
        assert not (fs.base / "store2").exists()
        assert [p for p, _ in mounts_under(fs.base)] == [str(fs.mnt)]


def test_umount_refuses_a_busy_mount_unless_lazy():
    with mounted() as fs:
        holder = subprocess.Popen(["sleep", "60"], cwd=fs.mnt / "snapshots")
        try:
            time.sleep(0.1)
            proc = run_cli("umount", str(fs.mnt), check=False)
            assert proc.returncode == exit_status(errno.EBUSY) and "EBUSY" in proc.stderr
            assert fs.running
        finally:
            holder.kill()
            holder.wait()
        run_cli("umount", str(fs.mnt))
        assert fs.proc.wait(timeout=30) == 0


def _nice_of_every_thread(pid: int) -> dict[str, int]:
    nice = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        nice[tid] = int(fields[16])  # field 19 of proc(5), counted from the state (field 3)
    return nice


@pytest.mark.parametrize("asked", [None, "3"])
def test_daemon_serves_at_the_priority_asked(asked):
    """Every thread of the daemon runs at the nice value asked (the default: DAEMON_NICE),
    background threads included, since they are started after the priority is set."""
    from cascowfs.daemon import DAEMON_NICE

    extra = () if asked is None else ("--nice", asked)
    with mounted(*extra, populate=_populate) as fs:
        assert fs.ctl(f"import base {fs.base / 'src'}")[0] == 0
        assert fs.ctl("branch work base")[0] == 0  # every kind of thread has started by now
        nice = _nice_of_every_thread(fs.pid)
        assert len(nice) > 3, nice
        expected = DAEMON_NICE if asked is None else int(asked)
        assert set(nice.values()) == {expected}, nice


def test_a_priority_that_cannot_be_raised_is_a_warning():
    """Without CAP_SYS_NICE the daemon serves anyway, at the priority it was started with,
    and says so in its log."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    started_at = os.getpriority(os.PRIO_PROCESS, 0)
    code = ("import logging, os; logging.basicConfig(); "
            "from cascowfs.daemon import set_priority; set_priority(-20); "
            "print(os.getpriority(os.PRIO_PROCESS, 0))")
    proc = subprocess.run([setpriv, "--bounding-set=-sys_nice", PYTHON, "-c", code],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(started_at)
    warning = f"cannot run at nice -20 (Permission denied); serving at nice {started_at}"
    assert warning in proc.stderr


def test_nice_outside_the_kernel_range_is_refused():
    with cascow_base() as base:
        proc = run_cli("mount", str(base / "store"), str(base / "mnt"), "--nice", "-21",
                       check=False)
        assert proc.returncode == 2
        assert "-21 is outside -20..19" in proc.stderr
        assert not (base / "store").exists(), "a refused mount touched the store"


def test_forked_workers_do_not_hold_the_fuse_channel():
    """A big import forks worker processes inside the daemon. None may keep /dev/fuse open:
    a child holding the channel would keep a killed daemon's mount hanging instead of dead."""
    import threading

    with mounted() as fs:
        src = fs.base / "big"
        src.mkdir()
        for i in range(24):  # above the engine's threshold for a process pool
            (src / f"f{i}").write_bytes(os.urandom(3 << 20))
        result: list = []
        worker = threading.Thread(target=lambda: result.append(fs.ctl(f"import big {src}")))
        worker.start()
        last: dict[str, bool] = {}
        while worker.is_alive():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        if fh.read().rsplit(")", 1)[1].split()[1] != str(fs.pid):
                            continue
                    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                except OSError:
                    continue
                last[pid] = "/dev/fuse" in fds  # may be True for an instant right after fork
            time.sleep(0.005)
        worker.join()
        assert result == [(0, "ok big")]
        if not last:
            pytest.skip("the engine imported without forking workers")
        assert not any(last.values()), last


def test_an_aborted_connection_fails_requests_with_enotconn_and_ends_the_daemon():
    """``abort_fuse``, what the tests use on a daemon stuck on its own mount: found through the
    mount table's device, it fails every request and the daemon ends."""
    with mounted() as fs:
        abort_fuse(fs.mnt)
        with pytest.raises(OSError) as info:
            os.stat(fs.mnt / "ctl")
        assert info.value.errno == errno.ENOTCONN
        assert fs.proc is not None
        fs.proc.wait(timeout=60)
