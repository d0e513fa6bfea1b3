"""The operation gate (``gate.py``): operations run side by side, an exclusive section waits
for all of them and holds new ones back, and an operation alone may become exclusive."""

from __future__ import annotations

import threading
import time

from cascowfs.gate import NamedLocks, OpGate


def _hold(gate: OpGate, section: str = "running") -> tuple[threading.Thread, threading.Event,
                                                            threading.Event]:
    """A thread inside ``gate.<section>()`` until the returned release event is set."""
    inside, release = threading.Event(), threading.Event()

    def run() -> None:
        with getattr(gate, section)():
            inside.set()
            release.wait()

    t = threading.Thread(target=run)
    t.start()
    return t, inside, release


def test_operations_run_side_by_side():
    gate = OpGate()
    t, inside, release = _hold(gate)
    assert inside.wait(5)
    with gate.running():  # does not wait for the other one
        assert not release.is_set()
    release.set()
    t.join()


def test_an_exclusive_section_waits_for_running_operations_and_holds_new_ones_back():
    gate = OpGate()
    op, op_inside, op_release = _hold(gate)
    assert op_inside.wait(5)
    ex, ex_inside, ex_release = _hold(gate, "exclusive")
    assert not ex_inside.wait(0.2)  # the running operation holds it off
    op_release.set()
    op.join()
    assert ex_inside.wait(5)
    late, late_inside, late_release = _hold(gate)
    assert not late_inside.wait(0.2)  # held back while the section runs
    ex_release.set()
    ex.join()
    assert late_inside.wait(5)
    late_release.set()
    late.join()


def test_an_operation_alone_may_become_exclusive_but_not_beside_another():
    gate = OpGate()
    with gate.running():
        assert gate.try_sole()
        gate.release_sole()
        t, inside, release = _hold(gate)
        assert inside.wait(5)
        assert not gate.try_sole()
        release.set()
        t.join()


def test_try_enter_never_waits_and_counts_as_running_until_left():
    gate = OpGate()
    ticket = gate.try_enter()
    assert ticket is not None
    ex, ex_inside, ex_release = _hold(gate, "exclusive")
    deadline = time.monotonic() + 5
    while (other := gate.try_enter()) is not None:  # until the section claims the gate
        gate.leave(other)
        assert time.monotonic() < deadline, "the exclusive section never claimed the gate"
        time.sleep(0.01)
    assert not ex_inside.is_set()  # it waits for the operation that entered
    gate.leave(ticket)
    assert ex_inside.wait(5)
    assert gate.try_enter() is None  # nor while it runs
    ex_release.set()
    ex.join()
    again = gate.try_enter()
    assert again is not None and again != ticket
    gate.leave(again)


# -- a lock per branch name ------------------------------------------------------------------
def test_a_named_lock_excludes_its_name_only_and_is_dropped_when_nobody_uses_it():
    locks = NamedLocks()
    inside, release, waited = threading.Event(), threading.Event(), []

    def hold_b1() -> None:
        with locks.holding("b1") as held:
            assert held
            inside.set()
            release.wait()

    def wait_b1() -> None:
        with locks.holding("b1"):
            waited.append(time.monotonic())

    holder = threading.Thread(target=hold_b1, daemon=True)
    waiter = threading.Thread(target=wait_b1, daemon=True)
    holder.start()
    try:
        assert inside.wait(5)
        with locks.holding("b1", wait=False) as held:
            assert not held  # a commit's way: refused, not queued
        with locks.holding("b2", wait=False) as held:
            assert held  # another branch runs beside it
        waiter.start()
        time.sleep(0.05)
        assert not waited and len(locks) == 1  # held and waited for: kept
        released = time.monotonic()
    finally:
        release.set()
    holder.join(5)
    waiter.join(5)
    assert waited and waited[0] >= released
    assert len(locks) == 0  # nobody holds or waits: nothing kept


def test_a_store_keeps_no_lock_for_the_branches_it_discarded(sm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    sm.import_tree(src, "base")
    for n in range(20):
        sm.create_branch(f"b{n}", "base")
        sm.discard(f"b{n}")
    assert len(sm._branch_locks) == 0
