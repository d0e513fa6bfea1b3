"""Names, labels and errors (docs/interface.md): validation against an independent oracle, the errno
of every refusal, and bad input leaving the store untouched."""

from __future__ import annotations

import errno
import os
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import check_live, hypothesis_settings, needs_overlay
from cascowfs import errors
from cascowfs.errors import (BusyError, CascowfsError, ExistsError, InvalidArgumentError,
                             NoSpaceError, NotFoundError, error_from_errno, from_os_error)
from cascowfs.names import (check_branch_name, check_labels, check_name, check_snapshot_id,
                            parse_labels)

FIRST = set(string.ascii_letters + string.digits)
REST = FIRST | set("._-")


def oracle_valid(name: str) -> bool:
    """docs/interface.md spelled out by hand: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, ASCII only."""
    return 1 <= len(name) <= 128 and name[0] in FIRST and all(c in REST for c in name[1:])


BAD_NAMES = ["", ".", "..", "/", "a/b", "../x", "a\0b", "\0", "x" * 129, "x" * 300, "-a", ".a",
             "_a", "a b", "a\n", "\na", "a\t", "\u00e9t\u00e9", "a:b", "a,b", "\u0661",  # Arabic 1
             "a\u200b", "ａ"]  # zero-width space, full-width a
GOOD_NAMES = ["a", "A", "0", "a.b", "a-b", "a_b", "x" * 128, "1.0.0-rc_1", "a..", "a--"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_einval(name):
    for check in (check_name, check_snapshot_id, check_branch_name):
        with pytest.raises(InvalidArgumentError) as info:
            check(name)
        assert info.value.errno == errno.EINVAL
        assert info.value.errno_name == "EINVAL"


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_pass_unchanged(name):
    assert check_name(name) == name
    assert check_name(name.encode()) == name


@pytest.mark.parametrize("value", [b"\xff\xfe", b"a\xffb", 42, None, 1.5, ["a"], b"a/b"])
def test_non_text_and_non_utf8_are_einval(value):
    with pytest.raises(InvalidArgumentError):
        check_name(value)


@hypothesis_settings(400)
@given(st.one_of(st.text(max_size=140),
                 st.text(alphabet=string.ascii_letters + string.digits + "._-/ \n", max_size=140),
                 st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,130}", fullmatch=True)))
def test_names_agree_with_the_oracle(name):
    if oracle_valid(name):
        assert check_name(name) == name
    else:
        with pytest.raises(InvalidArgumentError):
            check_name(name)


def test_labels():
    assert check_labels(None) == {} and check_labels({}) == {}
    assert check_labels({"reward": "0.7", "plan": "a b=c ✓"}) == {"reward": "0.7", "plan": "a b=c ✓"}
    assert parse_labels(["a=1", "b=", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}
    for bad in ({"": "x"}, {"a b": "x"}, {"a": "x\ny"}, {"a": "x\0"}, {"a": "v" * 4097},
                {"k" * 65: "x"}, {"=": "x"}):
        with pytest.raises(InvalidArgumentError):
            check_labels(bad)
    with pytest.raises(InvalidArgumentError):
        parse_labels(["novalue"])


def test_every_error_class_carries_its_errno():
    expected = {errors.NotFoundError: errno.ENOENT, errors.ExistsError: errno.EEXIST,
                errors.InvalidArgumentError: errno.EINVAL, errors.BusyError: errno.EBUSY,
                errors.ReadOnlyError: errno.EROFS, errors.NoSpaceError: errno.ENOSPC,
                errors.PermissionDeniedError: errno.EPERM, errors.StoreIOError: errno.EIO,
                errors.StoreLockedError: errno.EBUSY}
    for cls, code in expected.items():
        exc = cls("msg")
        assert exc.errno == code and exc.message == "msg" and isinstance(exc, CascowfsError)
        if cls is not errors.StoreLockedError:
            back = error_from_errno(code, "again")
            assert type(back) is cls and back.errno == code and back.message == "again"


def test_errors_from_the_disk_keep_their_errno():
    for code, cls in ((errno.ENOSPC, NoSpaceError), (errno.EIO, errors.StoreIOError),
                      (errno.ENOENT, NotFoundError)):
        exc = from_os_error(OSError(code, os.strerror(code)), "writing")
        assert type(exc) is cls and exc.errno == code and "writing" in exc.message
    odd = error_from_errno(errno.EXDEV, "cross-device")
    assert type(odd) is CascowfsError and odd.errno == errno.EXDEV and odd.errno_name == "EXDEV"
    assert from_os_error(OSError("no errno"), "x").errno == errno.EIO


# ----------------------------------------------------------------------------------------
# the engine: every refusal has its errno and changes nothing
# ----------------------------------------------------------------------------------------
def _state(sm) -> tuple:
    """Everything a refusal must not change (and the disk layout under the store)."""
    return (sorted((s.id, s.root, s.parent) for s in sm.snapshots()),
            sorted((b.name, b.parent) for b in sm.branches()),
            sorted(os.listdir(sm.store / "branches")), sorted(os.listdir(sm.store / "layers")),
            sorted(os.listdir(sm.store / "staging")))


@needs_overlay
def test_refusals_have_their_errno_and_change_nothing(sm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    sm.import_tree(src, "base")
    tree = sm.create_branch("dirty", "base").tree
    (tree / "g").write_bytes(b"y")
    sm.create_branch("clean", "base")
    before = _state(sm)
    cases = [
        (EXISTS := errno.EEXIST, lambda: sm.create_branch("dirty", "base")),
        (EXISTS, lambda: sm.import_tree(src, "base")),
        (EXISTS, lambda: sm.commit("clean", "base")),
        (errno.ENOENT, lambda: sm.create_branch("new", "nope")),
        (errno.ENOENT, lambda: sm.discard("nope")),
        (errno.ENOENT, lambda: sm.prune("nope")),
        (errno.ENOENT, lambda: sm.commit("nope", "x1")),
        (errno.ENOENT, lambda: sm.status("nope")),
        (errno.ENOENT, lambda: sm.snapshot("nope")),
        (errno.ENOENT, lambda: sm.rebase("clean", "nope")),
        (errno.ENOENT, lambda: sm.import_tree(tmp_path / "missing", "x2")),
        (errno.EBUSY, lambda: sm.prune("base")),
        (errno.EBUSY, lambda: sm.rebase("dirty", None)),
    ]
    for bad in BAD_NAMES[:12] + ["x" * 300]:
        cases += [(errno.EINVAL, lambda bad=bad: sm.create_branch(bad)),
                  (errno.EINVAL, lambda bad=bad: sm.create_branch("ok", bad)),
                  (errno.EINVAL, lambda bad=bad: sm.discard(bad)),
                  (errno.EINVAL, lambda bad=bad: sm.prune(bad))]
        if bad:  # an empty id asks commit and import for a generated one (docs/interface.md)
            cases += [(errno.EINVAL, lambda bad=bad: sm.commit("clean", bad)),
                      (errno.EINVAL, lambda bad=bad: sm.import_tree(src, bad))]
    cases += [(errno.EINVAL, lambda: sm.create_branch(b"\xff")),
              (errno.EINVAL, lambda: sm.commit("clean", "c9", labels={"bad key": "v"})),
              (errno.EINVAL, lambda: sm.import_tree(src, "c9", labels={"k": "a\nb"}))]
    for i, (code, call) in enumerate(cases):
        with pytest.raises(CascowfsError) as info:
            call()
        assert info.value.errno == code, f"case {i}: {info.value!r} has errno {info.value.errno}, want {code}"
        assert _state(sm) == before, f"case {i} ({info.value!r}) changed the store"
    assert [c.line() for c in sm.status("dirty")] == ["A g"]
    check_live(sm)


@needs_overlay
def test_a_store_is_opened_by_one_manager_at_a_time(sm):
    from cascowfs.state import StateManager

    with pytest.raises(errors.StoreLockedError) as info:
        StateManager.open(sm.store)
    assert info.value.errno == errno.EBUSY and str(os.getpid()) in info.value.message


@needs_overlay
def test_generated_ids_are_valid_and_distinct(sm):
    sm.create_branch("b")
    ids = {sm.commit("b") for _ in range(20)}
    assert len(ids) == 20
    for sid in ids:
        assert oracle_valid(sid)
        assert sm.snapshot(sid).id == sid
