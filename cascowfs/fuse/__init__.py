"""The FUSE face of cascowfs: the file tree of docs/interface.md served by pyfuse3 on trio.

``operations.CascowOperations`` handles requests, ``inodes`` keeps the nodeid table,
``snapshot_view`` turns snapshot entries into attributes, ``control`` parses and runs control
commands, ``sysmount`` has the small mount-table helpers the daemon and CLI share.

Nothing is imported here, so that ``cascowfs.Client`` (which shares ``control``'s reply parser)
does not pull in pyfuse3 and trio.
"""
