"""Remotes: snapshots pushed to and pulled from an object store (S3 or a directory).

One idea per module: ``config`` (remote names and URLs, kept in the store), ``objectstore``
(the two backends behind one interface: ``file://`` and ``s3://``), ``packs`` (the pack and
index encodings), ``locks`` (who may run beside a prune), ``transfer`` (push, pull, listing)
and ``prune`` (reclaiming what no snapshot ref reaches). docs/remotes.md describes the format.
"""
