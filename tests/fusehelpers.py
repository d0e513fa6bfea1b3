"""The FUSE test helpers under their old name: they live in support/fuse.py (and the mount and
skip helpers they use in support/mounts.py and support/skips.py)."""

from support.fuse import (CLI, PYTHON, READY_TIMEOUT, Cascow, NotifySocket, cascow_base,
                          make_source_tree, mounted, run_cli, tree_listing)
from support.mounts import lazy_umount, mounts_under
from support.processes import REPO, processes_mentioning
from support.skips import fuse_unavailable, needs_fuse

__all__ = ["CLI", "PYTHON", "READY_TIMEOUT", "REPO", "Cascow", "NotifySocket", "cascow_base",
           "fuse_unavailable", "lazy_umount", "make_source_tree", "mounted", "mounts_under",
           "needs_fuse", "processes_mentioning", "run_cli", "tree_listing"]
