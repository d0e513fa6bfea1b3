"""The control plane's execution: a parsed ``MNT/ctl`` command or branch-file write run
against the StateManager, and the (errno, message) of what failed.

The commands and replies themselves (grammar, parsing, quoting) are ``wire.py``'s. Execution
is a plain blocking call into the StateManager (the operations layer runs it in a worker
thread so that reads of snapshots never wait for a commit).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import TypeVar

from ..errors import CascowfsError, InvalidArgumentError, PermissionDeniedError
from ..privacy import Caller, check_readable, open_as
from ..state import StateManager
from ..wire import Command

T = TypeVar("T")


def execute(sm: StateManager, cmd: Command, caller: Caller | None = None) -> str:
    """Run a validated command against a StateManager (blocking). Returns the reply result.

    An import reads its source, and a commit its observation file, only if ``caller`` (the
    process that opened ``ctl``; None: the daemon itself) may read it; an import then reads
    it with that caller's credentials."""
    if cmd.verb == "branch":
        info = sm.create_branch(_given(cmd.name, "branch name"), cmd.id)
        return str(info.tree)
    if cmd.verb == "commit":
        name = _given(cmd.name, "branch name")
        opened = cmd.branch_created_ns
        if cmd.obs is None:
            return str(sm.commit(name, cmd.id, cmd.labels or None, branch_created_ns=opened))
        fd = open_as(caller, cmd.obs)  # the caller's rights, not the daemon's
        try:
            return str(
                sm.commit(name, cmd.id, cmd.labels or None, obs=fd, branch_created_ns=opened)
            )
        finally:
            os.close(fd)
    if cmd.verb == "discard":
        name = _given(cmd.name, "branch name")
        sm.discard(name)
        return name
    if cmd.verb == "prune":
        id = _given(cmd.id, "snapshot id")
        sm.prune(id)
        return id
    if cmd.verb == "rebase":
        name = _given(cmd.name, "branch name")
        info = sm.rebase(name, cmd.id, branch_created_ns=cmd.branch_created_ns)
        return info.parent or ""
    if cmd.verb == "import":
        src = _given(cmd.src, "import source")
        if caller is not None:
            check_readable(caller, src)
        return str(sm.import_tree(src, cmd.id, cmd.labels or None, reader=caller))
    if cmd.verb in ("push", "pull"):
        from ..remote import config, objectstore, transfer

        remote = _given(cmd.remote, "remote")
        if caller is not None and caller.uid != 0 and "://" in remote:
            # the daemon writes and reads as root: only root names a place by URL
            raise PermissionDeniedError(
                f"remote {remote!r}: only root gives a URL; name a remote from remote ls"
            )
        store = objectstore.open_store(config.resolve(sm.store, remote))
        move = transfer.push if cmd.verb == "push" else transfer.pull
        return move(sm, store, cmd.ids, with_ancestors=cmd.with_ancestors).text()
    if cmd.verb == "gc":
        stats = sm.gc()
        return " ".join(f"{k}={v}" for k, v in sorted((stats or {}).items()))
    if cmd.verb == "label":
        sm.label(_given(cmd.id, "snapshot id"), cmd.labels)
        return _given(cmd.id, "snapshot id")
    if cmd.verb == "reset":
        info = sm.reset(_given(cmd.name, "branch name"), _given(cmd.id, "snapshot id"))
        return info.parent or ""
    if cmd.verb == "find":
        return " ".join(sm.find(_given(cmd.query, "query")))
    if cmd.verb == "children":
        return " ".join(sm.children(cmd.id))
    raise InvalidArgumentError(f"unknown command {cmd.verb!r}")


def _given(value: T | None, what: str) -> T:
    """A word the parser requires for this verb (``wire.parse_command`` never leaves it out)."""
    if value is None:
        raise InvalidArgumentError(f"{what} missing")
    return value


def error_of(exc: BaseException) -> tuple[int, str]:
    """(errno, message) of an exception that ends a control-plane request."""
    if isinstance(exc, CascowfsError):
        return exc.errno, exc.message
    if isinstance(exc, OSError):
        return exc.errno or _errno.EIO, exc.strerror or str(exc)
    return _errno.EIO, f"internal error: {type(exc).__name__}: {exc}"
