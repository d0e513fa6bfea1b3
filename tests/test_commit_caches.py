"""What a branch's last commit learned, kept for its next commit (commit_caches.py): bounded
over all branches, the branches that committed last kept, and a branch whose cache went
still commits exactly what it shows."""

from __future__ import annotations

from cascowfs.commit_caches import CommitCaches


def _listing(n: int) -> tuple:
    return ([b"n%d" % i for i in range(n)], (), ())


def test_the_caches_of_the_branches_that_committed_last_are_kept_within_the_limit():
    caches = CommitCaches(limit=100)
    caches.keep("a", {"dir": _listing(40)}, {})
    caches.keep("b", {"dir": _listing(40), "file": object()}, {})
    assert caches.entries == 81 and len(caches) == 2
    caches.keep("c", {"dir": _listing(30)}, {})  # 111 > 100: a, the oldest, goes
    assert caches.of("a") is None and caches.of("b") and caches.of("c")
    caches.keep("b", {}, {})  # b again: its old cache replaced, not added
    assert caches.entries == 30
    caches.keep("huge", {"dir": _listing(500)}, {})  # alone over the limit: kept, alone
    assert [n for n in ("b", "c", "huge") if caches.of(n)] == ["huge"]
    caches.forget("huge")
    assert caches.entries == 0 and len(caches) == 0


def test_a_branch_whose_cache_went_commits_what_it_shows(sm, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(50):
        (src / "d" / f"f{i}").write_text(str(i))
    sm.import_tree(src, "base")
    sm._commit_caches.limit = 10  # a branch's cache pushes the others out
    trees = {name: sm.create_branch(name, "base").tree for name in ("a", "b")}
    for round_ in range(3):
        for name, tree in trees.items():
            for i in range(20):
                (tree / "d" / f"new{i}").write_text(f"{name}{round_}")
            (tree / "d" / "f0").write_text(f"{name} round {round_}")
            sm.commit(name, f"{name}{round_}")
            assert len(sm._commit_caches) == 1 and sm._commit_caches.of(name)
    for name in trees:
        root = sm.root_entry(f"{name}2")
        entries = sm.read_tree(sm.trees.lookup(root, b"d").ref)
        assert len(entries) == 70
        f0 = sm.read_file(entries[b"f0"].ref, 0, 100)
        assert f0 == f"{name} round 2".encode()
        sm.discard(name)


def test_what_status_keeps_is_what_its_last_call_found(sm, tmp_path):
    """status reused one dict as cache and keep: every file an agent made and removed between
    two calls stayed in it for the branch's life."""
    import time

    from cascowfs.scan import RACY_NS

    src = tmp_path / "src"
    src.mkdir()
    (src / "kept").write_text("k")
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    for i in range(12):
        (tree / f"scratch{i}").write_text(str(i))
        time.sleep(2 * RACY_NS / 1e9)  # old enough to be kept
        assert [c.path for c in sm.status("b")] == [f"scratch{i}"]
        (tree / f"scratch{i}").unlink()
    kept = sm._status_caches.of("b").stored
    assert 0 < len(kept) <= 3, kept  # the root's listing and the last scratch file
    sm.discard("b")
    assert sm._status_caches.of("b") is None
