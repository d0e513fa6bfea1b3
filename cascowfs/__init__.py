"""cascowfs: millisecond branching of a working directory for tree-searching AI agents.

``Client`` drives a mounted filesystem through its files; ``StateManager`` is the in-process
engine (the daemon serves one); every error is a ``CascowfsError`` subclass carrying its errno
(at the client also the builtin ``OSError`` subclass for that errno).
"""

from importlib.metadata import version

from .client import Branch, Client
from .errors import (
    BusyError,
    CascowfsError,
    DaemonNotRunningError,
    ExistsError,
    InvalidArgumentError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    StoreIOError,
    StoreLockedError,
    error_from_errno,
    os_error_from_errno,
)
from .state import StateManager

__version__ = version("cascowfs")

__all__ = [
    "Branch",
    "BusyError",
    "CascowfsError",
    "Client",
    "DaemonNotRunningError",
    "ExistsError",
    "InvalidArgumentError",
    "NoSpaceError",
    "NotFoundError",
    "PermissionDeniedError",
    "ReadOnlyError",
    "StateManager",
    "StoreIOError",
    "StoreLockedError",
    "__version__",
    "error_from_errno",
    "os_error_from_errno",
]
