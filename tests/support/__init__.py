"""Helpers shared by the tests; conftest.py holds the fixtures and re-exports these names.

Module map (import from the module, e.g. ``from support.views import dir_view``):
    skips       ``needs_overlay`` / ``needs_loop`` / ``needs_fuse`` and why each may not hold
    mounts      the mount table: ``mounts_below``, ``force_unmount_below``, ``mounts_under``
    stores      ``open_store``, ``register_store`` (the leak check's list), ``assert_fsck_clean``,
                ``check_live``
    views       ``dir_view`` / ``snapshot_view`` (comparable trees), ``assert_same_view``,
                ``expected_status`` / ``assert_status`` (the status/diff oracle)
    loopdev     ``loop_ext4``, ``make_ext4_image``, ``mounted_image``: ext4 on loop devices
    processes   ``run_child`` (armed at a crash point), ``child_env``, ``descendant_processes``,
                ``run_until_killed`` (a child's output up to its SIGKILL), ``read_first_line``
    properties  ``hypothesis_settings`` (example counts scaled by ``CASCOWFS_TEST_EXAMPLES``)
    fuse        ``mounted`` / ``Cascow``: a real daemon over a fresh store, torn down for sure
    metrics     ``scrape`` / ``sample`` / ``fuse_requests``: ``MNT/metrics`` as Prometheus parses it
"""
