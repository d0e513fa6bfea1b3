"""cascowfs: millisecond branching of a working directory for tree-searching AI agents.

``Client`` drives a mounted filesystem through its files; ``StateManager`` is the in-process
engine (the daemon serves one); every error is a ``CascowfsError`` subclass carrying its errno.
"""

from importlib.metadata import version

from .client import Client
from .errors import (
    BusyError,
    CascowfsError,
    ExistsError,
    InvalidArgumentError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    StoreIOError,
    StoreLockedError,
    error_from_errno,
)
from .state import StateManager

__version__ = version("cascowfs")

__all__ = [
    "BusyError",
    "CascowfsError",
    "Client",
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
]
