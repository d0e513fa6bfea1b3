"""The control plane's execution: a parsed ``MNT/ctl`` command or branch-file write run
against the StateManager, and the (errno, message) of what failed.

The commands and replies themselves (grammar, parsing, quoting) are ``wire.py``'s. Execution
is a plain blocking call into the StateManager (the operations layer runs it in a worker
thread so that reads of snapshots never wait for a commit).
"""

from __future__ import annotations

import errno as _errno

from ..errors import CascowfsError, InvalidArgumentError
from ..state import StateManager
from ..wire import Command


def execute(sm: StateManager, cmd: Command) -> str:
    """Run a validated command against a StateManager (blocking). Returns the reply result."""
    if cmd.verb == "branch":
        info = sm.create_branch(cmd.name, cmd.id)
        return str(info.tree)
    if cmd.verb == "commit":
        return str(sm.commit(cmd.name, cmd.id, cmd.labels or None))
    if cmd.verb == "discard":
        sm.discard(cmd.name)
        return str(cmd.name)
    if cmd.verb == "prune":
        sm.prune(cmd.id)
        return str(cmd.id)
    if cmd.verb == "rebase":
        info = sm.rebase(cmd.name, cmd.id)
        return info.parent or ""
    if cmd.verb == "import":
        return str(sm.import_tree(cmd.src, cmd.id, cmd.labels or None))
    if cmd.verb == "gc":
        stats = sm.gc()
        return " ".join(f"{k}={v}" for k, v in sorted((stats or {}).items()))
    raise InvalidArgumentError(f"unknown command {cmd.verb!r}")


def error_of(exc: BaseException) -> tuple[int, str]:
    """(errno, message) of an exception that ends a control-plane request."""
    if isinstance(exc, CascowfsError):
        return exc.errno, exc.message
    if isinstance(exc, OSError):
        return exc.errno or _errno.EIO, exc.strerror or str(exc)
    return _errno.EIO, f"internal error: {type(exc).__name__}: {exc}"
