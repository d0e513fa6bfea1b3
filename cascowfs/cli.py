"""``cascowfs``: the command line, for people (agents use the files or ``cascowfs.Client``).

Verbs that act on a running filesystem take the mount point and go through its files exactly
like a shell script would (``Client``); verbs that act on a store at rest (``fsck``, offline
``import``/``gc``/``diff``) open it with the StateManager and refuse while a daemon holds it.
Exit status: 0 success, 1 the operation failed (message on stderr, with the errno name), 2 usage.
"""

from __future__ import annotations

import argparse
import base64
import errno
import grp
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, forks
from .client import Client
from .errors import CascowfsError, ExistsError, InvalidArgumentError, StoreLockedError
from .fuse.sysmount import (
    FUSE_TYPE,
    MNT_DETACH,
    is_cascowfs_mount,
    mount_at,
    store_of_source,
    umount2,
)
from .model import Change
from .names import parse_labels
from .overlay import all_mounts
from .pathquote import quote

log = logging.getLogger("cascowfs.cli")


# -- verbs ------------------------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    from . import daemon

    admin_gid = _group_id(args.admin_group) if args.admin_group else None

    def start(ready: Callable[[], None] | None) -> int:
        daemon.setup_logging(logging.INFO, args.log_file)
        if args.debug:  # ours only: pyfuse3's own debug output is one line per request
            logging.getLogger("cascowfs").setLevel(logging.DEBUG)
        nice = daemon.DAEMON_NICE if args.nice is None else args.nice
        return daemon.run(args.store, args.mountpoint, admin_gid=admin_gid, nice=nice, ready=ready)

    if args.background:
        # Fail fast on the obvious mistakes before forking, so they reach the terminal.
        if not is_cascowfs_mount(args.mountpoint) and not Path(args.mountpoint).is_dir():
            raise InvalidArgumentError(f"mount point {args.mountpoint} is not a directory")
        return daemon.run_background(start, args.log_file)
    return start(None)


def cmd_init(args: argparse.Namespace) -> int:
    from .state import StateManager, is_store

    store = Path(args.store).absolute()
    if is_store(store):
        raise ExistsError(f"{store} is already a cascowfs store")
    StateManager.open(store, create=True).close()
    print(store)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = Path(args.mountpoint).absolute()
    entry = mount_at(mnt)
    if entry is None or entry.fstype != FUSE_TYPE:
        raise InvalidArgumentError(f"{mnt} is not a cascowfs mount")
    store = store_of_source(entry.source)  # in the mount table even when the daemon is dead
    pid = None
    try:
        pid = int(os.getxattr(mnt, "user.cascowfs.pid"))
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
    from .fuse.kernel_views import detach_views

    detach_views(under=mnt)  # snapshots' kernel views would keep MNT busy
    try:
        umount2(mnt, MNT_DETACH if args.lazy or pid is None else 0)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise CascowfsError(
                f"{mnt} is busy (a process uses it; see fuser -m, or --lazy)", errno=errno.EBUSY
            ) from None
        raise
    if pid is not None and not _wait_gone(pid, args.timeout):
        raise CascowfsError(
            f"daemon pid {pid} did not exit within {args.timeout}s", errno=errno.ETIMEDOUT
        )
    if args.branches:
        if store is None:
            raise CascowfsError(
                f"--branches: the mount names no store (source {entry.source!r})",
                errno=errno.ENOENT,
            )
        _unmount_branches(store)
    return 0


def _unmount_branches(store: Path) -> None:
    """Unmount every branch overlay of ``store``. Opening the store first replays what a crash
    left half done; a store that cannot be opened (a failed disk, a store gone) still has its
    branch mounts detached. One that another daemon holds keeps them: they are its branches."""
    from . import overlay
    from .fuse.kernel_views import detach_views
    from .state import StateManager

    try:
        sm = StateManager.open(store, create=False)
    except StoreLockedError:
        raise
    except CascowfsError as exc:
        detach_views(store)
        overlay.unmount_under(store / "branches")
        print(
            f"cascowfs umount: {exc.message}; its branch mounts were detached without it",
            file=sys.stderr,
        )
        return
    detach_views(store)  # a killed daemon's snapshot views, wherever they are mounted
    sm.close(unmount_branches=True)


def cmd_branch(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        print(client.branch(args.name, args.parent))
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels)
    ident = args.id
    if ident is not None and "=" in ident:  # `commit MNT b key=value`: generated id
        labels = {**parse_labels([ident]), **labels}
        ident = None
    with Client(args.mountpoint) as client:
        print(client.commit(args.name, ident, labels))
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        for name in args.names:
            client.discard(name)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        for ident in args.ids:
            client.prune(ident)
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        client.rebase(args.name, args.parent)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    failed = 0
    with Client(args.mountpoint) as client:
        snaps = []
        for ident in client.snapshots() if args.what != "branches" else []:
            try:
                snaps.append(client.snapshot(ident))
            except CascowfsError as exc:  # one unreadable record must not hide the others
                print(f"cascowfs ls: {ident}: {exc.errno_name}: {exc.message}", file=sys.stderr)
                failed += 1
        branches = (
            [client.branch_info(n) for n in client.branches()] if args.what != "snapshots" else []
        )
    if args.json:
        print(
            json.dumps(
                {
                    "snapshots": [_snap_dict(s) for s in snaps],
                    "branches": [
                        {
                            "name": b.name,
                            "parent": b.parent,
                            "tree": str(b.tree),
                            "last_commit": b.last_commit,
                        }
                        for b in branches
                    ],
                },
                indent=2,
            )
        )
        return 1 if failed else 0
    if args.what != "branches":
        if args.what == "all":
            print("snapshots:")
        for s in sorted(snaps, key=lambda s: s.created_ns):
            print(
                f"  {s.id:<24} parent={s.parent or '-':<20} files={s.files:<7} "
                f"size={s.size:<10} {_time(s.created_ns)} {_labels_text(s)}".rstrip()
            )
    if args.what != "snapshots":
        if args.what == "all":
            print("branches:")
        for b in branches:
            print(f"  {b.name:<24} parent={b.parent or '-':<20} tree={quote(str(b.tree))}")
    return 1 if failed else 0


def cmd_log(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        start = args.start
        if start in client.branches():
            start = client.parent(start)
        seen = set()
        while start and start not in seen:
            seen.add(start)
            info = client.snapshot(start)
            if args.json:
                print(json.dumps(_snap_dict(info)))
            else:
                print(
                    f"{info.id}  {_time(info.created_ns)}  files={info.files} size={info.size}"
                    f"  root={info.root[:16]}  {_labels_text(info)}".rstrip()
                )
            if info.parent and info.parent not in client.snapshots():
                print(f"{info.parent}  (pruned)")
                break
            start = info.parent
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        _print_changes(client.status(args.name), args)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    a = None if args.a in ("-", "") else args.a
    b = None if args.b in ("-", "") else args.b
    target = Path(args.target)
    if is_cascowfs_mount(target):
        with Client(target) as client:
            changes = client.diff(a, b)
    else:
        with _offline(target) as sm:
            changes = sm.diff(a, b)
    _print_changes(changes, args)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels)
    target = Path(args.target)
    src = os.path.abspath(args.src)
    mnt = target if is_cascowfs_mount(target) else _mount_of_store(target)
    if mnt is not None:
        with Client(mnt) as client:
            print(client.import_tree(src, args.id, labels))
        return 0
    with _offline(target) as sm:
        print(sm.import_tree(src, args.id, labels or None, progress=_progress(args)))
    return 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on long work: asked for, or by default when a person watches stderr."""
    return bool(args.progress) or sys.stderr.isatty()


def cmd_fsck(args: argparse.Namespace) -> int:
    from .fsck import fsck_store

    report = fsck_store(Path(args.store), progress=_progress(args), deep=args.deep)
    for problem in report.problems:
        print(problem)
    if report.ok:
        waiting = (
            f" ({report.awaiting_collection} unreachable object(s) await the next collection)"
            if report.awaiting_collection
            else ""
        )
        print(f"clean{waiting}", file=sys.stderr)
        return 0
    print(f"{len(report.problems)} problem(s)", file=sys.stderr)
    return 1


def cmd_gc(args: argparse.Namespace) -> int:
    target = Path(args.target)
    mnt = target if is_cascowfs_mount(target) else _mount_of_store(target)
    if mnt is not None:
        with Client(mnt) as client:
            stats = client.gc()
    else:
        with _offline(target) as sm:
            stats = sm.gc(progress=_progress(args))
    print(" ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return 0


# -- helpers ----------------------------------------------------------------------------------
class _offline:
    """A StateManager on a store no daemon serves (StoreLockedError otherwise)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.sm: Any = None

    def __enter__(self) -> Any:
        from .state import StateManager

        try:
            self.sm = StateManager.open(self.store, create=False)
        except StoreLockedError as exc:
            raise StoreLockedError(f"{exc.message}; use its mount point instead") from None
        return self.sm

    def __exit__(self, *exc: object) -> None:
        self.sm.close()


def _mount_of_store(store: Path) -> Path | None:
    """The mount point of the daemon serving ``store``, if one is running."""
    want = str(store.absolute())
    for entry in all_mounts():
        if entry.fstype != FUSE_TYPE:
            continue
        try:
            if os.getxattr(entry.target, "user.cascowfs.store").decode() == want:
                return Path(entry.target)
        except OSError:
            continue
    return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if forks.process_gone(pid):  # a zombie child of ours (tests) counts as gone
            return True
        time.sleep(0.02)
    return False


def _group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgumentError(f"no such group {name!r}") from None


def _nice_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not -20 <= value <= 19:
        raise argparse.ArgumentTypeError(f"{value} is outside -20..19")
    return value


def _time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _print_changes(changes: list[Change], args: argparse.Namespace) -> None:
    """Changes as quoted lines (default), NUL-terminated records (-z) or JSON lines (--json)."""
    if args.z:
        sys.stdout.flush()
        sys.stdout.buffer.write(b"".join(change.record_z() for change in changes))
        sys.stdout.buffer.flush()
        return
    for change in changes:
        print(json.dumps(_change_dict(change)) if args.json else change.line())


def _change_dict(change: Change) -> dict:
    """``path`` is the name as str when it is UTF-8; otherwise null, and ``path_b64`` holds
    its bytes (base64), so JSON output stays exact for any name."""
    try:
        return {"change": change.kind, "path": change.raw_path.decode("utf-8")}
    except UnicodeDecodeError:
        return {
            "change": change.kind,
            "path": None,
            "path_b64": base64.b64encode(change.raw_path).decode("ascii"),
        }


def _change_format_options(parser: argparse.ArgumentParser) -> None:
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "-z", action="store_true", help="NUL-terminated records '<A|M|D> <raw path>', no quoting"
    )
    form.add_argument(
        "--json", action="store_true", help='one JSON object per line: {"change": "A", "path": ...}'
    )


def _snap_dict(s: Any) -> dict:
    out = {
        "id": s.id,
        "parent": s.parent,
        "root": s.root,
        "created_ns": s.created_ns,
        "size": s.size,
        "files": s.files,
        "labels": s.labels,
    }
    if s.error:
        out["error"] = s.error
    return out


def _labels_text(s: Any) -> str:
    """``key=value`` words, each value quoted like a path when it needs it (one line always)."""
    words = [f"{key}={quote(val)}" for key, val in sorted(s.labels.items())]
    if s.error:
        words.append(f"error={quote(s.error)}")
    return " ".join(words)


# -- argument parsing -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascowfs",
        description="Millisecond branching of a working directory: CAS snapshots, overlayfs "
        "branches, a WAL. See docs/interface.md for the file contract.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help: str,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(fn=fn)
        return p

    p = verb(
        "init",
        cmd_init,
        "create a new store in STORE (missing or empty)",
        "Create and initialise a store. STORE must be missing or an empty directory: a "
        "non-empty one is refused (ENOTEMPTY), an existing store too (EEXIST). Every verb "
        "but init and mount refuses a path that is not a store.",
    )
    p.add_argument("store", help="store directory")

    p = verb(
        "mount",
        cmd_mount,
        "serve STORE at MNT (foreground unless --background)",
        "Open STORE (a missing or empty directory becomes a new store; anything else that "
        "is not a store is refused), replay its write-ahead log, re-adopt branch "
        "mounts, then mount the filesystem at MNT and serve it. A dead mount left by a "
        "killed daemon is cleared first. Signals readiness to systemd (sd_notify).",
    )
    p.add_argument("store", help="store directory")
    p.add_argument("mountpoint", metavar="MNT", help="mount point (an existing directory)")
    p.add_argument(
        "--background", "-b", action="store_true", help="detach; return once the mount is ready"
    )
    p.add_argument(
        "--admin-group",
        metavar="GROUP",
        help="members of GROUP may also create/commit/discard/prune (root always may)",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="log here (default: stderr; with --background and no --log-file logs are discarded)",
    )
    p.add_argument("--debug", "-d", action="store_true", help="log every failed request")
    p.add_argument(
        "--nice",
        type=_nice_value,
        metavar="N",
        help="serve at this scheduling priority, -20..19 (default -10: every agent's "
        "operation waits on the daemon; raising it needs root or CAP_SYS_NICE)",
    )

    p = verb("umount", cmd_umount, "unmount MNT and wait for its daemon to exit")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument(
        "--branches",
        action="store_true",
        help="also unmount every branch overlay, also after the daemon was killed "
        "(full teardown; branches survive as state and are mounted again by "
        "the next `mount`)",
    )
    p.add_argument("--lazy", "-l", action="store_true", help="detach even if busy")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemon")

    p = verb(
        "branch",
        cmd_branch,
        "create branch NAME on snapshot PARENT; prints its tree",
        "Create a branch (an overlayfs mount) on snapshot PARENT, or on the empty "
        "snapshot if PARENT is omitted. Prints the branch's writable tree path.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name")
    p.add_argument("parent", nargs="?")

    p = verb(
        "commit",
        cmd_commit,
        "freeze branch NAME into snapshot ID; prints the id",
        "Commit a branch into a new snapshot (ID omitted: a generated one), with optional "
        "KEY=VALUE labels. The branch continues on the new snapshot.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name")
    p.add_argument("id", nargs="?")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    p = verb("discard", cmd_discard, "drop branches")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("names", nargs="+", metavar="NAME")

    p = verb("prune", cmd_prune, "drop snapshots (EBUSY while a branch is based on one)")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = verb("rebase", cmd_rebase, "re-base an unmodified branch on another snapshot")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name")
    p.add_argument("parent", nargs="?", help="omitted: the empty snapshot")

    p = verb("ls", cmd_ls, "list snapshots and branches")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("what", nargs="?", choices=("all", "snapshots", "branches"), default="all")
    p.add_argument("--json", action="store_true")

    p = verb("log", cmd_log, "the ancestry of a snapshot (or of a branch's parent)")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("start", metavar="ID|BRANCH")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = verb(
        "status",
        cmd_status,
        "a branch's changes against its parent (A|M|D PATH)",
        "One line per change, the path quoted as git quotes it when it holds a byte "
        "outside printable ASCII, a quote or a backslash (docs/interface.md).",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name")
    _change_format_options(p)

    p = verb(
        "diff",
        cmd_diff,
        "changes from snapshot A to snapshot B (A|M|D PATH)",
        "TARGET is a mount point or a store no daemon serves. '-' names the empty "
        "snapshot. Paths are quoted as in `status`.",
    )
    p.add_argument("target", metavar="MNT|STORE")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    _change_format_options(p)

    p = verb(
        "import",
        cmd_import,
        "import directory SRC as snapshot ID",
        "Import a directory tree as a new snapshot. TARGET is a mount point, or a store: "
        "if a daemon serves the store the import goes through its ctl file, otherwise "
        "the store is opened directly.",
    )
    p.add_argument("target", metavar="STORE|MNT")
    p.add_argument("src", metavar="SRC")
    p.add_argument("id", metavar="ID")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--progress", action="store_true", help="show a progress bar (offline)")

    p = verb("fsck", cmd_fsck, "check a store's invariants (exit 1 on any problem)")
    p.add_argument("store")
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also mount every snapshot's layers read-only and compare them with its tree",
    )

    p = verb("gc", cmd_gc, "reclaim unreferenced objects and layers now")
    p.add_argument("target", metavar="STORE|MNT")
    p.add_argument("--progress", action="store_true", help="show a progress bar (offline)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb != "mount":
        logging.basicConfig(level=logging.WARNING, format="cascowfs: %(message)s")
    try:
        return args.fn(args)
    except CascowfsError as exc:
        print(f"cascowfs {args.verb}: {exc.errno_name}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        print(f"cascowfs {args.verb}: {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
