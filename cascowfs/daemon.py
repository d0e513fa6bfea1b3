"""The mount lifecycle: open the store, serve it over FUSE, shut down cleanly.

Order matters, and is the point of this module:

1. A dead FUSE mount left at the mount point by a killed daemon ("Transport endpoint is not
   connected") is lazily unmounted; a live one is refused.
2. The daemon raises its scheduling priority (``DAEMON_NICE``) before any thread starts, so
   every thread it starts inherits it.
3. ``StateManager.open`` locks the store, replays the WAL and re-adopts (or re-creates) every
   branch's overlay mount. Only then is anything mounted: nobody can see a half-recovered state.
4. ``pyfuse3.init`` mounts; then systemd hears ``READY=1`` (``Type=notify``) and a
   ``--background`` parent is released, so "the command returned" means "the mount is usable".
   From then on the trio loop itself sends systemd's ``WATCHDOG=1`` (a hung loop gets the
   daemon restarted) and keeps ``STATUS=`` current.
5. SIGTERM/SIGINT end the main loop; the FUSE mount is unmounted (lazily if busy, so no
   dead mount is left behind) and the store is closed. A stop is bounded: 30 s after the
   signal the FUSE connection is aborted, and if a worker thread still runs a query a few
   seconds later the process exits without it (``_exit_leaving_requests``). Branch overlay
   mounts stay: a branch is not killed because the daemon was, and processes working inside
   keep working. SIGHUP only reopens the log file (logrotate sends it); SIGUSR1 writes every
   thread's stack to stderr.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from . import __version__, forks, logs
from .errors import BusyError, CascowfsError, InvalidArgumentError
from .fuse.inline_labels import InlineLabels
from .fuse.kernel_fdatasync import KernelFdatasync
from .fuse.kernel_views import KernelViews, detach_views, idle_seconds, kernel_views_wanted
from .fuse.operations import CascowOperations
from .fuse.sysmount import (
    FUSE_TYPE,
    MNT_DETACH,
    abort_connection,
    clear_dead_mount,
    fuse_mount_at,
    mount_at,
    store_of_source,
    store_source,
    umount2,
)
from .overlay import all_mounts
from .state import StateManager

log = logging.getLogger("cascowfs.daemon")

# Every agent's operation waits on this one process, and its threads share one GIL: a thread
# preempted by an agent's process while it holds the GIL (pyfuse3 replies to the kernel with
# the GIL held, and the reply wakes that very agent) stalls all the others
# (docs/architecture.md, "Decisions and why").
DAEMON_NICE = -10

# pyfuse3 keeps this many tasks waiting on /dev/fuse. With its default of one, a request that
# finds no task waiting starts a new one, which allocates a fresh 1 MiB receive buffer and
# exits (freeing it) as soon as more than one task waits again (docs/architecture.md,
# "Decisions and why").
FUSE_WORKER_TASKS = 8

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). A
# commit's thread, mostly in system calls, takes the GIL back after each one and would wait up
# to that long behind the FUSE thread every time (docs/architecture.md, "Decisions and why").
GIL_SWITCH_SECONDS = 0.00025  # vs 1 ms and 5 ms: faster in 3 of 3 interleaved pairs of L mixes


def mount_options(store: Path) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks file modes
    opts |= {
        f"fsname={store_source(store)}",  # /proc/mounts: "STORE MNT fuse.cascowfs ..."
        "subtype=cascowfs",
        "allow_other",  # any process of the VM may use it (the daemon runs as root)
        "nosuid",  # snapshots are data to read, not programs to gain privileges from
        "nodev",
    }
    return opts


NOTIFY_WAIT_SECONDS = 5.0


def sd_notify(message: str, wait: float = NOTIFY_WAIT_SECONDS) -> bool:
    """Send a sd_notify(3) datagram to $NOTIFY_SOCKET, if systemd (or a test) set one.

    A datagram socket whose reader has stopped reading fills up (10 datagrams by default), and
    a send to it then blocks: the daemon's event loop would stall for good. So a send waits at
    most ``wait`` seconds (0: not at all, for the periodic status line) and is then dropped."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(wait)
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify(%r) failed: %s", message, exc)
        return False
    return True


def prepare_mountpoint(mnt: Path) -> None:
    """Clear a dead mount of a killed daemon; refuse a live one. Runs before the store is
    opened, so a refused mount leaves no trace."""
    if clear_dead_mount(mnt):
        log.warning("%s: lazily unmounted a dead FUSE mount left by a previous daemon", mnt)
    entry = mount_at(mnt)
    if entry is not None and entry.fstype == FUSE_TYPE:
        try:
            pid = os.getxattr(mnt, "user.cascowfs.pid").decode()
        except OSError:
            pid = "?"
        raise BusyError(f"{mnt} is already served by a running cascowfs daemon (pid {pid})")
    if not mnt.is_dir():
        raise InvalidArgumentError(f"mount point {mnt} is not a directory")


def clear_stale_mounts(store: Path) -> None:
    """Detach what a killed daemon of ``store`` left mounted elsewhere: its dead FUSE mount
    (with the snapshot views on it, which no path walk can reach through a dead mount), and
    any other view of the store's snapshots. Called with the store's lock held: no live daemon
    owns them."""
    for m in all_mounts():
        if m.fstype == FUSE_TYPE and store_of_source(m.source) == store:
            if clear_dead_mount(m.target):
                log.warning("%s: lazily unmounted a dead FUSE mount of the store", m.target)
    if detach_views(store):
        log.warning("%s: detached snapshot views left by a previous daemon", store)


def _fuse_fds() -> list[int]:
    """This process's descriptors on /dev/fuse (the FUSE session's channel)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                out.append(int(name))
        except OSError:
            continue
    return out


def _open_state(store: Path) -> StateManager:
    return StateManager.open(store, progress=sys.stderr.isatty())  # a rebuild after a reboot


# How often STATUS= is refreshed for `systemctl status` (only sent when it changed).
STATUS_SECONDS = 2.0
# A stop waits this long, from the signal, for serving to end before it aborts the FUSE
# connection (``_abort_if_still_serving``): long enough for an operation under way to finish
# and answer, short beside systemd's stop timeout (90 s).
STOP_GRACE_SECONDS = 30.0
# After the abort, how long serving may take to end, and then how long a state change still
# running may take to finish, before the process ends without them (``_exit_leaving_requests``).
ABORT_SETTLE_SECONDS = 5.0


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asks for (sd_watchdog_enabled(3)): ``WATCHDOG_USEC``
    set, and ``WATCHDOG_PID`` unset or this process. None: no watchdog for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def status_line(sm: StateManager, mnt: Path) -> str:
    """What `systemctl status` shows: counts read from one LMDB read transaction (O(1) each)
    and the kind of the latest logged operation."""
    with sm.db.read() as txn:
        branches = sm.catalog.branch_count(txn)
        snapshots = sm.catalog.snapshot_count(txn)
    return (
        f"serving {mnt}: {branches} branches, {snapshots} snapshots, "
        f"last op {sm.wal.last_kind or 'none'}"
    )


async def _ping_watchdog(interval: float) -> None:
    """WATCHDOG=1 from the trio loop itself: a stopped or wedged loop stops the pings and
    systemd restarts the daemon."""
    while True:
        sd_notify("WATCHDOG=1", wait=0)
        await trio.sleep(interval)


async def _report_status(status: Callable[[], str]) -> None:
    last = ""
    while True:
        await trio.sleep(STATUS_SECONDS)
        try:
            line = await trio.to_thread.run_sync(status)  # an LMDB read may wait on a map resize
        except CascowfsError as exc:
            line = f"status unavailable: {exc.message}"
        if line != last:
            sd_notify(f"STATUS={line}", wait=0)
            last = line


async def _serve(
    ops: CascowOperations,
    mnt: Path,
    ready: Callable[[], None],
    status: Callable[[], str] | None = None,
) -> None:
    served = threading.Event()  # set once serving ended: ``_abort_if_still_serving``
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, ops, mnt, served)
        interval = watchdog_interval()
        if interval is not None:
            nursery.start_soon(_ping_watchdog, interval)
        if status is not None and os.environ.get("NOTIFY_SOCKET"):
            nursery.start_soon(_report_status, status)
        if ops.views is not None:
            nursery.start_soon(ops.views.expire_forever)
        ready()
        try:
            await pyfuse3.main(min_tasks=FUSE_WORKER_TASKS)
        finally:
            served.set()
        nursery.cancel_scope.cancel()


async def _watch_signals(ops: CascowOperations, mnt: Path, served: threading.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reopen_log_files()
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            # the bound counts from the signal: the wait for invalidations is inside it
            _abort_if_still_serving(
                mnt, served, STOP_GRACE_SECONDS, lambda: _exit_leaving_requests(ops.sm, mnt)
            )
            await ops.stop(STOP_GRACE_SECONDS)
            pyfuse3.terminate()
            return


def _abort_if_still_serving(
    mnt: Path,
    served: threading.Event,
    grace: float,
    leave: Callable[[], None] | None = None,
) -> None:
    """The last resort of a stop: a request handler that waits in the kernel on the mount
    (a path walk, an invalidation) after ``pyfuse3.terminate`` would keep the daemon, and
    every caller of the mount, waiting for good. If serving has not ended ``grace`` seconds
    on, abort the FUSE connection: those requests fail with ENOTCONN and serving ends. A
    handler running in a worker thread (a query; trio cannot cancel a thread) still keeps the
    loop waiting: if serving has not ended ``ABORT_SETTLE_SECONDS`` after the abort, ``leave``
    ends the process without it."""

    def watch() -> None:
        if served.wait(grace):
            return
        log.warning("%s: still serving %.0f s after the stop; aborting its connection", mnt, grace)
        try:
            abort_connection(mnt)
        except OSError as exc:
            log.error("%s: aborting the FUSE connection failed: %s", mnt, exc)
        if not served.wait(ABORT_SETTLE_SECONDS) and leave is not None:
            leave()

    threading.Thread(target=watch, name="cascowfs-stop-watch", daemon=True).start()


def _exit_leaving_requests(sm: StateManager, mnt: Path) -> None:
    """End the process while request handlers still run in worker threads, once no state
    change runs. Those handlers are queries (state changes are waited for), which write
    nothing: the WAL holds every operation that returned, and every label applied. The FUSE
    mount is detached (no dead mount stays) and the process exits as a crash would at a quiet
    moment, which the store is made for. The LMDB environment is not closed: a reader thread
    inside it would fault; the next open frees its reader slot. A state change that outlives
    ``ABORT_SETTLE_SECONDS`` too is left in its middle, and the next mount replays it."""
    log.warning("%s: serving still waits for worker threads; exiting without them", mnt)
    quiet = threading.Event()

    def hold_quiet() -> None:
        with sm.quiesced():
            quiet.set()
            threading.Event().wait()  # until the process exits

    threading.Thread(target=hold_quiet, name="cascowfs-stop-quiet", daemon=True).start()
    if not quiet.wait(ABORT_SETTLE_SECONDS):
        log.error(
            "%s: a state change still runs; exiting in its middle (the next mount replays the WAL)",
            mnt,
        )
    try:
        mount = fuse_mount_at(mnt)
        if mount is not None and mount.fstype == FUSE_TYPE:
            umount2(mount.target, MNT_DETACH)
        log.info("unmounted %s", mnt)
    except OSError as exc:
        log.error("%s: unmounting after the abort failed: %s", mnt, exc)
    log.info("store %s left with %d threads running", sm.store, threading.active_count() - 1)
    logging.shutdown()
    os._exit(0)


def set_priority(nice: int) -> None:
    """Run this process (and every thread started afterwards) at ``nice``. Raising the
    priority needs root or CAP_SYS_NICE; without them the daemon serves as it was started."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError as exc:
        log.warning(
            "cannot run at nice %d (%s); serving at nice %d",
            nice,
            exc.strerror,
            os.getpriority(os.PRIO_PROCESS, 0),
        )


def run(
    store: str | Path,
    mnt: str | Path,
    *,
    admin_gid: int | None = None,
    nice: int | None = DAEMON_NICE,
    ready: Callable[[], None] | None = None,
    open_state: Callable[[Path], StateManager] | None = None,
) -> int:
    """Serve ``store`` at ``mnt`` until unmounted or signalled (blocking). Returns an exit code.
    ``nice``: the scheduling priority to serve at (None: as started)."""
    store = Path(os.path.realpath(store))  # as StateManager.open spells it
    mnt = Path(mnt).absolute()
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # its default action would kill
    # Until the serving loop watches signals (after a recovery that may take minutes), SIGHUP
    # reopens the log too: its default action would kill the daemon mid-recovery.
    signal.signal(signal.SIGHUP, lambda signum, frame: reopen_log_files())
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    prepare_mountpoint(mnt)
    if nice is not None:
        set_priority(nice)  # before StateManager.open starts the background threads
    log.info("opening store %s (WAL replay, branch mounts)", store)
    sm = (open_state or _open_state)(store)
    views = KernelViews(sm, mnt, idle_seconds()) if kernel_views_wanted() else None
    wal_fdatasync = KernelFdatasync.open(sm.wal.fileno())
    try:
        clear_stale_mounts(store)
        ops = CascowOperations(
            sm,
            store,
            admin_gid=admin_gid,
            info={
                "pid": str(os.getpid()),
                "store": str(store),
                "version": __version__,
            },
            views=views,
            labels=InlineLabels(sm, wal_fdatasync),
        )
        try:
            pyfuse3.init(ops, str(mnt), mount_options(store))
        except RuntimeError as exc:  # libfuse reports details on stderr
            raise CascowfsError(f"mounting {mnt} failed: {exc}") from None
        # a child holding the channel would keep a killed daemon's mount alive
        for fd in _fuse_fds():
            forks.close_in_children(fd)
        log.info("serving %s at %s (pid %d)", store, mnt, os.getpid())
        try:

            def announce() -> None:
                sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={status_line(sm, mnt)}")
                if ready is not None:
                    ready()

            trio.run(_serve, ops, mnt, announce, lambda: status_line(sm, mnt))
        finally:
            # As root libfuse unmounts lazily if the mount is busy; after an external umount
            # (our `cascowfs umount`) the connection is gone and this is a no-op.
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mnt)
    finally:
        try:
            if views is not None:
                # `cascowfs umount` detaches the views' mounts from outside; their layers are
                # still held, and an image no branch stacks must not outlive the mount
                views.detach_all()
            if wal_fdatasync is not None:
                wal_fdatasync.close()
        finally:
            sm.close()
        log.info("store %s closed", store)
    return 0


def setup_logging(level: int, log_file: str | None = None, log_format: str = "json") -> None:
    """Log at ``level`` to ``log_file`` (None: stderr) in ``log_format`` (``logs.py``). The
    file is UTF-8, and what is not (a lone surrogate a formatter let through) is written as a
    backslash escape, as stderr writes it, rather than lost with a logging error."""
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def reopen_log_files() -> None:
    """Reopen every log file at its path (logrotate has moved it away), and nothing else. A
    background daemon's stdout and stderr, where faulthandler and libfuse write, point at the
    log file too: they follow it."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) or handler.stream is None:
            continue
        try:
            fresh = open(
                handler.baseFilename, "a", encoding=handler.encoding, errors=handler.errors
            )
        except OSError as exc:
            log.warning(
                "SIGHUP: cannot reopen %s (%s); logging on to the old file",
                handler.baseFilename,
                exc.strerror,
            )
            continue
        old = handler.setStream(fresh)
        if old is None:
            continue
        was = os.fstat(old.fileno())
        for fd in (1, 2):
            try:
                st = os.fstat(fd)
            except OSError:  # closed
                continue
            if (st.st_dev, st.st_ino) == (was.st_dev, was.st_ino):
                os.dup2(fresh.fileno(), fd)
        old.close()
        log.info("SIGHUP: reopened log file %s", handler.baseFilename)


def run_background(start: Callable[[Callable[[], None]], int], log_file: str | None) -> int:
    """Fork; the child detaches and serves, the parent returns once the mount is ready.

    Forking happens before anything opens the store or starts threads (LMDB and trio must not
    cross a fork). The parent exits 0 only after the child has reported READY, so
    ``cascowfs mount --background S M && ls M`` never races the mount.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        chunks = []
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(rfd)
        message = b"".join(chunks).decode(errors="replace")
        if message.startswith("READY"):
            return 0
        _, status = os.waitpid(pid, 0)
        number, _, refusal = message.partition(" ")
        if number.isdigit():  # the child's CascowfsError: the caller reports it by its errno
            raise CascowfsError(refusal.strip(), errno=int(number))
        print(message.strip() or f"cascowfs: daemon exited with status {status}", file=sys.stderr)
        return 1
    # child
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640) if log_file else devnull
    os.dup2(out, 1)
    os.dup2(out, 2)
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(wfd, b"READY\n")
        os.close(wfd)
        reported = True

    code = 1
    try:
        code = start(ready)
    except CascowfsError as exc:
        log.error("%s", exc.message)
        if not reported:
            os.write(wfd, f"{exc.errno} {exc.message}\n".encode())
    except BaseException as exc:  # noqa: BLE001 - report anything to the waiting parent
        log.exception("daemon failed")
        if not reported:
            os.write(wfd, f"cascowfs: daemon failed: {exc}\n".encode())
    finally:
        logging.shutdown()
        os._exit(code)
    return code  # not reached
