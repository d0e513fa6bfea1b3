"""``cascowfs``: the command line, for people (agents use the files or ``cascowfs.Client``).

Verbs that act on a running filesystem take the mount point and go through its files exactly
like a shell script would (``Client``); verbs that act on a store at rest (``fsck``, offline
``import``/``gc``/``diff``) open it with the StateManager and refuse while a daemon holds it.
Every verb takes ``--json``: its result as JSON (one object per line for lists) and an error as
one JSON object on stderr; ``emit`` and ``report_error`` are the one place each is rendered.
A message may name what an agent chose (a file name in a tree it writes, a mount point), so
text on stderr and the log lines go through ``logs.one_line``: nothing in it reaches a
terminal as a control (an escape sequence, a newline that would forge a line).
The exit status tells the errno class of a failure apart (``EXIT_CODES``, documented in
docs/interface.md, "Exit status").
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, cli_episodes, forks
from .client import Client
from .errors import (
    CascowfsError,
    DaemonNotRunningError,
    ExistsError,
    InvalidArgumentError,
    StoreLockedError,
)
from .fuse.sysmount import (
    FUSE_TYPE,
    MNT_DETACH,
    is_cascowfs_mount,
    mount_at,
    store_of_source,
    umount2,
)
from .logs import LOG_FORMATS, TextFormatter, one_line
from .model import Change
from .names import check_name, parse_labels
from .overlay import all_mounts
from .pathquote import quote

log = logging.getLogger("cascowfs.cli")


# -- exit status and output --------------------------------------------------------------------
EXIT_OK = 0
EXIT_OTHER = 1  # a failure of no class below; fsck: problems found
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_NOT_FOUND = 3
EXIT_EXISTS = 4
EXIT_PERMISSION = 5
EXIT_BUSY = 6
EXIT_INVALID = 7
EXIT_NO_SPACE = 8
EXIT_IO = 9
EXIT_DAEMON_NOT_RUNNING = 10
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

EXIT_CODES: dict[int, int] = {
    errno.ENOENT: EXIT_NOT_FOUND,
    errno.EEXIST: EXIT_EXISTS,
    errno.ENOTEMPTY: EXIT_EXISTS,
    errno.EPERM: EXIT_PERMISSION,
    errno.EACCES: EXIT_PERMISSION,
    errno.EROFS: EXIT_PERMISSION,
    errno.EBUSY: EXIT_BUSY,
    errno.EINVAL: EXIT_INVALID,
    errno.ENOTDIR: EXIT_INVALID,
    errno.ENAMETOOLONG: EXIT_INVALID,
    errno.ELOOP: EXIT_INVALID,
    errno.E2BIG: EXIT_INVALID,
    errno.ENOSPC: EXIT_NO_SPACE,
    errno.EDQUOT: EXIT_NO_SPACE,
    errno.EIO: EXIT_IO,
    errno.ENOTCONN: EXIT_DAEMON_NOT_RUNNING,
    errno.ECONNABORTED: EXIT_DAEMON_NOT_RUNNING,
}


def exit_status(code: int) -> int:
    """The exit status of a verb that failed with errno ``code``."""
    return EXIT_CODES.get(code, EXIT_OTHER)


def emit(args: argparse.Namespace, record: dict[str, Any], text: str | None) -> None:
    """Print one result: ``record`` as a JSON line with --json, else ``text`` (None: nothing)."""
    if args.json:
        print(json.dumps(record))
    elif text is not None:
        print(text)


def report_error(args: argparse.Namespace, code: int, message: str, what: str = "") -> int:
    """Print a failure on stderr (a JSON object with --json, else ``cascowfs VERB: ERRNO:
    message``); its exit status. ``what`` names the item of a many-item verb that failed."""
    name = errno.errorcode.get(code or 0, str(code))
    status = exit_status(code)
    if getattr(args, "json", False):
        record = {"verb": args.verb, "error": name, "errno": code, "message": message}
        if what:
            record["item"] = what
        print(json.dumps({**record, "exit": status}), file=sys.stderr)
    else:
        prefix = f"{what}: " if what else ""
        print(one_line(f"cascowfs {args.verb}: {prefix}{name}: {message}"), file=sys.stderr)
    return status


# -- verbs ------------------------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    from . import daemon

    admin_gid = _group_id(args.admin_group) if args.admin_group else None

    def start(ready: Callable[[], None] | None) -> int:
        daemon.setup_logging(logging.INFO, args.log_file, args.log_format)
        if args.debug:  # ours only: pyfuse3's own debug output is one line per request
            logging.getLogger("cascowfs").setLevel(logging.DEBUG)
        nice = daemon.DAEMON_NICE if args.nice is None else args.nice
        return daemon.run(args.store, args.mountpoint, admin_gid=admin_gid, nice=nice, ready=ready)

    if args.background:
        # Fail fast on the obvious mistakes before forking, so they reach the terminal.
        if not is_cascowfs_mount(args.mountpoint) and not Path(args.mountpoint).is_dir():
            raise InvalidArgumentError(f"mount point {args.mountpoint} is not a directory")
        status = daemon.run_background(start, args.log_file)
        if status == 0 and args.json:
            mnt = Path(args.mountpoint).absolute()
            pid = int(os.getxattr(mnt, "user.cascowfs.pid"))
            emit(
                args,
                {"mountpoint": str(mnt), "store": os.path.realpath(args.store), "pid": pid},
                None,
            )
        return status
    return start(None)


def cmd_init(args: argparse.Namespace) -> int:
    from .state import StateManager, is_store

    store = Path(args.store).absolute()
    if is_store(store):
        raise ExistsError(f"{store} is already a cascowfs store")
    StateManager.open(store, create=True).close()
    emit(args, {"store": str(store)}, str(store))
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = Path(args.mountpoint).absolute()
    entry = mount_at(mnt)
    if entry is None or entry.fstype != FUSE_TYPE:
        if args.branches:
            # After a clean stop nothing is mounted at MNT any more, and nothing says
            # which store it served: its branch overlays are reached by the store's path.
            from .state import check_store_dir

            check_store_dir(mnt, create=False)  # ENOENT or EINVAL: not a store
            _unmount_branches(mnt)
            emit(args, {"mountpoint": None, "pid": None, "branches": True}, None)
            return 0
        raise DaemonNotRunningError(
            f"{mnt} is not a cascowfs mount (its daemon stopped, or never ran); "
            "`umount --branches STORE` unmounts the branches of a stopped daemon's store"
        )
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
    emit(args, {"mountpoint": str(mnt), "pid": pid, "branches": args.branches}, None)
    return 0


def _unmount_branches(store: Path) -> None:
    """Unmount every branch overlay of ``store``. Opening the store first replays what a crash
    left half done; a store that cannot be opened (a failed disk, a store gone) still has its
    branch mounts detached. One that another daemon holds keeps them: they are its branches."""
    from .fuse.kernel_views import detach_views
    from .state import StateManager, unmount_store_mounts

    try:
        sm = StateManager.open(store, create=False)
    except StoreLockedError:
        raise
    except CascowfsError as exc:
        detach_views(store)
        unmount_store_mounts(store)
        print(
            one_line(f"cascowfs umount: {exc.message}; its branch mounts were detached without it"),
            file=sys.stderr,
        )
        return
    detach_views(store)  # a killed daemon's snapshot views, wherever they are mounted
    sm.close(unmount_branches=True)


def cmd_branch(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        tree = client.branch(args.name, args.parent)
    emit(args, {"name": args.name, "parent": args.parent, "tree": str(tree)}, str(tree))
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    words = list(args.labels)
    ident = args.id
    if ident is not None and "=" in ident:  # `commit MNT b key=value`: generated id
        words.insert(0, ident)
        ident = None
    obs = [w[len("obs=@") :] for w in words if w.startswith("obs=@")]
    if len(obs) > 1:
        raise InvalidArgumentError("one obs=@FILE per commit")
    labels = parse_labels([w for w in words if not w.startswith("obs=@")])
    with Client(args.mountpoint) as client:
        new = client.commit(args.name, ident, labels, obs=obs[0] if obs else None)
    emit(args, {"id": new, "branch": args.name, "labels": labels}, new)
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        for name in args.names:
            client.discard(name)
            emit(args, {"discarded": name}, None)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        for ident in args.ids:
            client.prune(ident)
            emit(args, {"pruned": ident}, None)
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        client.rebase(args.name, args.parent)
    emit(args, {"name": args.name, "parent": args.parent}, None)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    failed = 0
    with Client(args.mountpoint) as client:
        snaps = []
        for ident in client.snapshots() if args.what != "branches" else []:
            try:
                snaps.append(client.snapshot(ident))
            except DaemonNotRunningError:
                raise
            except CascowfsError as exc:  # one unreadable record must not hide the others
                report_error(args, exc.errno, exc.message, ident)
                failed += 1
        branches = (
            [client.branch_info(n) for n in client.branches()] if args.what != "snapshots" else []
        )
    if args.what == "all" and not args.json:
        print("snapshots:")
    for snap in sorted(snaps, key=lambda s: s.created_ns):
        emit(
            args,
            {"type": "snapshot", **_snap_dict(snap)},
            f"  {snap.id:<24} parent={snap.parent or '-':<20} files={snap.files:<7} "
            f"size={snap.size:<10} {_time(snap.created_ns)} {_labels_text(snap)}".rstrip(),
        )
    if args.what == "all" and not args.json:
        print("branches:")
    for b in branches:
        emit(
            args,
            {
                "type": "branch",
                "name": b.name,
                "parent": b.parent,
                "tree": str(b.tree),
                "last_commit": b.last_commit,
            },
            f"  {b.name:<24} parent={b.parent or '-':<20} tree={quote(str(b.tree))}",
        )
    return EXIT_OTHER if failed else 0


def cmd_log(args: argparse.Namespace) -> int:
    # a branch's name or a snapshot's id: both are names ("" would end the log at once)
    start: str | None = check_name(args.start, "snapshot id or branch name")
    with Client(args.mountpoint) as client:
        if start in client.branches():
            start = client.parent(start)
        seen = set()
        while start and start not in seen:
            seen.add(start)
            info = client.snapshot(start)
            emit(
                args,
                _snap_dict(info),
                f"{info.id}  {_time(info.created_ns)}  files={info.files} size={info.size}"
                f"  root={info.root[:16]}  {_labels_text(info)}".rstrip(),
            )
            if info.parent and info.parent not in client.snapshots():
                emit(args, {"id": info.parent, "pruned": True}, f"{info.parent}  (pruned)")
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
            new = client.import_tree(src, args.id, labels)
    else:
        with _offline(target) as sm:
            new = sm.import_tree(src, args.id, labels or None, progress=_progress(args))
    emit(args, {"id": new, "labels": labels}, new)
    return 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on long work: asked for, or by default when a person watches stderr."""
    return bool(args.progress) or sys.stderr.isatty()


def cmd_fsck(args: argparse.Namespace) -> int:
    from .fsck import fsck_store

    entry = mount_at(Path(args.store).absolute())
    if entry is not None and entry.fstype == FUSE_TYPE:  # "not a store" would mislead
        # the mount table names the store even when the daemon is dead
        store = store_of_source(entry.source) or entry.source
        raise InvalidArgumentError(
            f"{args.store} is a mount point: fsck checks the store ({store}) once it is at "
            "rest (cascowfs umount)"
        )
    report = fsck_store(Path(args.store), progress=_progress(args), deep=args.deep)
    if args.json:
        emit(
            args,
            {
                "ok": report.ok,
                "problems": report.problems,
                "snapshots": report.snapshots,
                "branches": report.branches,
                "objects": report.objects,
                "awaiting_collection": report.awaiting_collection,
            },
            None,
        )
        return 0 if report.ok else EXIT_OTHER
    for problem in report.problems:
        print(one_line(problem))
    if report.ok:
        waiting = (
            f" ({report.awaiting_collection} unreachable object(s) await the next collection)"
            if report.awaiting_collection
            else ""
        )
        print(f"clean{waiting}", file=sys.stderr)
        return 0
    print(f"{len(report.problems)} problem(s)", file=sys.stderr)
    return EXIT_OTHER


def cmd_monitor(args: argparse.Namespace) -> int:
    from .monitor.server import serve

    logging.getLogger("cascowfs").setLevel(logging.INFO)
    return serve(
        args.mountpoint,
        args.listen,
        read_only=args.read_only,
        remote_resets_as=args.remote_resets_as,
        host_names=args.host_name,
        as_json=args.json,
    )


def cmd_gc(args: argparse.Namespace) -> int:
    target = Path(args.target)
    mnt = target if is_cascowfs_mount(target) else _mount_of_store(target)
    if mnt is not None:
        with Client(mnt) as client:
            stats = client.gc()
    else:
        with _offline(target) as sm:
            stats = sm.gc(progress=_progress(args))
    emit(args, stats, " ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """push / pull: through the daemon's ctl when one serves the store, else offline."""
    from .remote import config, objectstore, transfer

    target = Path(args.target)
    mnt = target if is_cascowfs_mount(target) else _mount_of_store(target)
    if mnt is not None:
        with Client(mnt) as client:
            move = client.push if args.verb == "push" else client.pull
            moved = move(args.remote, args.ids, with_ancestors=args.with_ancestors)
        emit(args, {"snapshots": moved}, " ".join(moved))
        return 0
    with _offline(target) as sm:
        store = objectstore.open_store(config.resolve(sm.store, args.remote))
        run = transfer.push if args.verb == "push" else transfer.pull
        stats = run(
            sm, store, args.ids, with_ancestors=args.with_ancestors, progress=_progress(args)
        )
    emit(args, asdict(stats), stats.text())
    return 0


def cmd_remote(args: argparse.Namespace) -> int:
    from .episodes import label_matcher
    from .remote import config, objectstore, prune, transfer

    store = _store_dir(Path(args.target))
    if args.action == "add":
        config.add(store, args.name, args.url, args.endpoint_url)
        emit(args, {"name": args.name, "url": args.url, "endpoint_url": args.endpoint_url}, None)
    elif args.action == "rm":
        config.remove(store, args.name)
        emit(args, {"name": args.name, "removed": True}, None)
    elif args.action == "ls":
        for spec in config.load(store).values():
            endpoint = f" endpoint={spec.endpoint_url}" if spec.endpoint_url else ""
            record = {"name": spec.name, "url": spec.url, "endpoint_url": spec.endpoint_url}
            emit(args, record, f"{spec.name}\t{spec.url}{endpoint}")
    elif args.action == "ls-snapshots":
        remote = objectstore.open_store(config.resolve(store, args.remote))
        match = label_matcher(args.find or [])
        for snap in transfer.list_snapshots(remote):
            if match(snap.labels, snap.obs is not None):
                listed: dict[str, Any] = {"id": snap.id, "parent": snap.parent}
                listed.update(labels=snap.labels, obs=snap.obs is not None)
                text = f"{snap.id}\t{snap.parent or '-'}\t{_labels_text(snap)}".rstrip()
                emit(args, listed, text)
    elif args.action == "forget":
        transfer.forget(objectstore.open_store(config.resolve(store, args.remote)), args.id)
        emit(args, {"id": args.id, "forgotten": True}, None)
    elif args.action == "prune":
        remote = objectstore.open_store(config.resolve(store, args.remote))
        stats = prune.prune(remote, grace=args.grace)
        emit(args, asdict(stats), stats.text())
    return 0


def _store_dir(target: Path) -> Path:
    """The store directory of a mount point, or ``target`` itself (a store)."""
    from .state import check_store_dir

    if is_cascowfs_mount(target):
        return Path(os.getxattr(target, "user.cascowfs.store").decode())
    check_store_dir(target, create=False)
    return Path(os.path.realpath(target))


# -- helpers ----------------------------------------------------------------------------------
class _offline:
    """A StateManager on a store no daemon serves (StoreLockedError otherwise).

    Opening a store mounts its branches. A store left with them mounted (a daemon's
    ``umount``) keeps them; one left without (``umount --branches``) is left so again: an
    offline verb must not leave mounts behind that only the next daemon would remove."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.sm: Any = None
        self._had_mounts = False

    def __enter__(self) -> Any:
        from .state import StateManager

        below = os.path.realpath(self.store) + "/"
        self._had_mounts = any(m.target.startswith(below) for m in all_mounts())
        try:
            self.sm = StateManager.open(self.store, create=False)
        except StoreLockedError as exc:
            raise StoreLockedError(f"{exc.message}; use its mount point instead") from None
        return self.sm

    def __exit__(self, *exc: object) -> None:
        self.sm.close(unmount_branches=not self._had_mounts)


def _mount_of_store(store: Path) -> Path | None:
    """The mount point of the daemon serving ``store``, if one is running."""
    want = os.path.realpath(store)  # a daemon names its store by its real path
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
    if getattr(s, "error", None):  # a local snapshot whose record did not decode
        words.append(f"error={quote(s.error)}")
    return " ".join(words)


# -- argument parsing -------------------------------------------------------------------------
class UsageError(Exception):
    """A command line argparse refuses; ``main`` reports it (as JSON with --json)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    verbs: Mapping[str, argparse.ArgumentParser] = {}  # the top parser's: its verbs' parsers

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse's ``type``: a ValueError is its usage
    error)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


def build_parser() -> _Parser:
    parser = _Parser(
        prog="cascowfs",
        description="Millisecond branching of a working directory: CAS snapshots, overlayfs "
        "branches, a WAL. See docs/interface.md for the file contract.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    parser.verbs = sub.choices

    def verb(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help: str,
        description: str | None = None,
        json_help: str | None = "print the result as JSON (lists: one object per line) and "
        "an error as a JSON object on stderr",
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(fn=fn)
        if json_help is not None:
            p.add_argument("--json", action="store_true", help=json_help)
        return p

    p = verb(
        "init",
        cmd_init,
        "create a new store in STORE (missing or empty)",
        "Create and initialise a store. STORE must be missing or an empty directory: a "
        "non-empty one is refused (ENOTEMPTY), an existing store too (EEXIST). Every verb "
        "but init and mount refuses a path that is not a store.",
    )
    p.add_argument("store", metavar="STORE", help="store directory")

    p = verb(
        "mount",
        cmd_mount,
        "serve STORE at MNT (foreground unless --background)",
        "Open STORE (a missing or empty directory becomes a new store; anything else that "
        "is not a store is refused), replay its write-ahead log, re-adopt branch "
        "mounts, then mount the filesystem at MNT and serve it. A dead mount left by a "
        "killed daemon is cleared first. Signals readiness to systemd (sd_notify).",
    )
    p.add_argument("store", metavar="STORE", help="store directory")
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
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="json",
        help="json: one JSON object per line, an operation's with its latency (default); "
        "text: one line of text",
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
    p.add_argument("--timeout", type=seconds, default=60.0, help="seconds to wait for the daemon")

    p = verb(
        "branch",
        cmd_branch,
        "create branch NAME on snapshot PARENT; prints its tree",
        "Create a branch (an overlayfs mount) on snapshot PARENT, or on the empty "
        "snapshot if PARENT is omitted. Prints the branch's writable tree path.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name", metavar="NAME")
    p.add_argument("parent", metavar="PARENT", nargs="?")

    p = verb(
        "commit",
        cmd_commit,
        "freeze branch NAME into snapshot ID; prints the id",
        "Commit a branch into a new snapshot (ID omitted: a generated one), with optional "
        "KEY=VALUE labels and obs=@FILE, a large observation stored beside it. The branch "
        "continues on the new snapshot.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID", nargs="?")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    p = verb("discard", cmd_discard, "drop branches")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("names", nargs="+", metavar="NAME")

    p = verb("prune", cmd_prune, "drop snapshots (EBUSY while a branch is based on one)")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = verb("rebase", cmd_rebase, "re-base an unmodified branch on another snapshot")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name", metavar="NAME")
    p.add_argument("parent", metavar="PARENT", nargs="?", help="omitted: the empty snapshot")

    p = verb(
        "ls",
        cmd_ls,
        "list snapshots and branches",
        json_help='one JSON object per line: {"type": "snapshot"|"branch", ...}',
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("what", nargs="?", choices=("all", "snapshots", "branches"), default="all")

    p = verb(
        "log",
        cmd_log,
        "the ancestry of a snapshot (or of a branch's parent)",
        json_help="one JSON object per line",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("start", metavar="ID|BRANCH")

    p = verb(
        "status",
        cmd_status,
        "a branch's changes against its parent (A|M|D PATH)",
        "One line per change, the path quoted as git quotes it when it holds a byte "
        "outside printable ASCII, a quote or a backslash (docs/interface.md).",
        json_help=None,
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name", metavar="NAME")
    _change_format_options(p)

    p = verb(
        "diff",
        cmd_diff,
        "changes from snapshot A to snapshot B (A|M|D PATH)",
        "TARGET is a mount point or a store no daemon serves. '-' names the empty "
        "snapshot. Paths are quoted as in `status`.",
        json_help=None,
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
    p.add_argument("store", metavar="STORE")
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also mount every snapshot's layers read-only and compare them with its tree",
    )

    p = verb(
        "monitor",
        cmd_monitor,
        "serve a live page of the search at MNT, its JSON API and /metrics",
        "Serve, from this process, a page (an installable PWA) showing the search tree, the "
        "live branches and the recent operations of the mount MNT, live; clicking a node "
        "resets a branch there. Also a JSON API under /api/ and /metrics (MNT/metrics, for "
        "Prometheus). It reads MNT through its files only. See docs/monitor.md.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="IP address and port to listen on (default 127.0.0.1:8470; port 0: any free one)",
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every reset (otherwise a reset is made for root and the admin group: "
        "the local user whose connection asks)",
    )
    p.add_argument(
        "--remote-resets-as",
        metavar="USER",
        help="make resets from other machines (whose users are unknown here) as if USER (a "
        "name or uid) asked; refused otherwise",
    )
    p.add_argument(
        "--host-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name the page is reached by (repeatable); otherwise only the listening "
        "address (any of the machine's, on 0.0.0.0 or ::) and localhost, against DNS rebinding",
    )

    for name, what in (
        ("push", "send snapshots ID... to REMOTE"),
        ("pull", "fetch snapshots ID... from REMOTE"),
    ):
        p = verb(
            name,
            cmd_transfer,
            what,
            f"{what[0].upper()}{what[1:]} (a name from `cascowfs remote ls`, or a file:// or "
            "s3:// URL); only the objects the other side lacks travel (docs/remotes.md). "
            "Through the daemon's ctl when one serves the store.",
        )
        p.add_argument("target", metavar="MNT|STORE")
        p.add_argument("remote", metavar="REMOTE")
        p.add_argument("ids", nargs="+", metavar="ID")
        p.add_argument("--with-ancestors", action="store_true", help="their ancestors too")
        p.add_argument("--progress", action="store_true", help="show a progress bar (offline)")

    p = verb(
        "remote",
        cmd_remote,
        "configure remotes, list their snapshots, prune them",
        "Remotes are kept in the store (STORE/remotes.json). S3 credentials and region come "
        "the standard AWS way (environment, ~/.aws/config, profiles).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str, *words: str) -> argparse.ArgumentParser:
        """A ``remote`` action on MNT|STORE taking positional ``words`` (their metavars)."""
        a = actions.add_parser(name, help=help)
        a.add_argument("target", metavar="MNT|STORE")
        for word in words:
            a.add_argument(word.lower(), metavar=word)
        # also after the action; SUPPRESS: absent here, it leaves `remote --json ACTION` be
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the result as JSON (lists: one object per line)")  # fmt: skip
        return a

    a = action("add", "add remote NAME: file:///path or s3://BUCKET[/PREFIX]", "NAME", "URL")
    a.add_argument("--endpoint-url", help="an S3-compatible server other than AWS")
    action("rm", "forget remote NAME (its content stays)", "NAME")
    action("ls", "list the remotes")
    a = action(
        "ls-snapshots", "list REMOTE's snapshots: ID, PARENT, LABELS (tab separated)", "REMOTE"
    )
    a.add_argument(
        "--find",
        nargs="+",
        metavar="PREDICATE",
        help="only snapshots whose labels match all of: KEY=V, KEY!=V, KEY<V, KEY<=V, KEY>V, "
        "KEY>=V (numeric when both sides are numbers), has:KEY (as find takes them)",
    )
    action("forget", "delete snapshot ID's ref from REMOTE (prune reclaims)", "REMOTE", "ID")
    a = action("prune", "delete what no snapshot of REMOTE reaches", "REMOTE")
    a.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="age after which a pack no index names is deleted (default 3600)",
    )

    p = verb("gc", cmd_gc, "reclaim unreferenced objects and layers now")
    p.add_argument("target", metavar="STORE|MNT")
    p.add_argument("--progress", action="store_true", help="show a progress bar (offline)")

    cli_episodes.add_verbs(verb)
    return parser


def _values_joined(words: list[str]) -> list[str]:
    """``--sort -KEY`` as ``--sort=-KEY``: argparse takes a value that starts with ``-`` for
    an option of its own, and the documented descending sort is just that."""
    out: list[str] = []
    for word in words:
        if out and out[-1] == "--sort" and word.startswith("-") and word != "--":
            out[-1] = f"--sort={word}"
        else:
            out.append(word)
    return out


def _parsed(parser: _Parser, words: list[str]) -> argparse.Namespace:
    """``parse_args``, except that ``find``'s predicates may come after its options too
    (argparse takes a positional list only in one piece)."""
    args, extra = parser.parse_known_args(words)
    verb = parser.verbs.get(getattr(args, "verb", None) or "", parser)
    if extra and args.verb == "find":
        args.predicates += [word for word in extra if not word.startswith("-")]
        extra = [word for word in extra if word.startswith("-")]
    if extra:
        verb.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = _values_joined(list(sys.argv[1:] if argv is None else argv))
    try:
        args = _parsed(parser, words)
    except UsageError as exc:
        if "--json" in words:
            # the top parser refuses extra words after a verb's own: name the verb given
            verb = exc.parser.prog.removeprefix("cascowfs").strip() or next(
                (w for w in words if w in parser.verbs), None
            )
            record = {"verb": verb, "error": "usage", "errno": None, "message": exc.message}
            print(json.dumps({**record, "exit": EXIT_USAGE}), file=sys.stderr)
        else:
            exc.parser.print_usage(sys.stderr)
            print(one_line(f"{exc.parser.prog}: error: {exc.message}"), file=sys.stderr)
        return EXIT_USAGE
    if args.verb != "mount":
        shown = logging.StreamHandler()
        shown.setFormatter(TextFormatter("cascowfs: %(message)s"))  # one line, no controls
        logging.basicConfig(level=logging.WARNING, handlers=[shown])
    try:
        status = args.fn(args)
        if sys.stdout is not None:  # None: started with stdout closed
            sys.stdout.flush()  # a reader gone shows here, in these handlers, not at exit
        return status
    except CascowfsError as exc:
        return report_error(args, exc.errno, exc.message)
    except BrokenPipeError as exc:
        import select

        # stdout's reader went away (``cascowfs ls MNT | head -1``): stop quietly, as Unix
        # tools do, with the shell's status for SIGPIPE (128 + 13). As Python's documentation
        # of SIGPIPE says, stdout then points at /dev/null, so the flush at exit does not fail
        # again. A pipe with no reader polls as POLLERR; any other broken pipe is an error.
        try:
            out = sys.stdout.fileno()
            poll = select.poll()
            poll.register(out, select.POLLOUT)
            gone = any(events & select.POLLERR for _, events in poll.poll(0))
        except (OSError, ValueError):  # no stdout, or not a file (a test's capture)
            gone = False
        if not gone:
            return report_error(args, exc.errno or errno.EPIPE, str(exc))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out)
        os.close(devnull)
        return 141
    except OSError as exc:
        return report_error(args, exc.errno or errno.EIO, str(exc))
    except KeyboardInterrupt:
        # Offline, the interrupted operation is rolled back; a command the daemon had been
        # sent goes on there, and its result is what `ls` shows, not this exit status.
        print(
            f"cascowfs {args.verb}: interrupted; a command a daemon had received completes "
            "there all the same: look (cascowfs ls) before sending it again",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
