"""cascowfs/crashpoints.py: the named WAL steps at which a process can be made to die by
SIGKILL (``CASCOWFS_CRASH_AT``), the way the crash and power-cut tests use them."""

from __future__ import annotations

import signal

import pytest

from conftest import run_child
from cascowfs.crashpoints import CRASH_POINTS, crash_point

# A child that reports each point it passes, so the output shows where it died.
PASS_POINTS = """
import sys
from cascowfs.crashpoints import crash_point
for name in sys.argv[1:]:
    crash_point(name)
    print("passed", name, flush=True)
"""


def test_points_are_unique_operation_steps_grouped_by_operation():
    assert len(set(CRASH_POINTS)) == len(CRASH_POINTS)
    operations = []
    for point in CRASH_POINTS:
        op, dot, step = point.partition(".")
        assert dot and op.isidentifier() and step.isidentifier(), point
        if not operations or operations[-1] != op:
            operations.append(op)
    assert len(operations) == len(set(operations)), f"steps of one operation apart: {operations}"


@pytest.mark.parametrize("name", ["", "commit", "commit.nowhere", "COMMIT.PREPARED",
                                  " commit.prepared", "commit.prepared,import.applied"])
def test_an_unknown_point_is_refused_by_name(name):
    with pytest.raises(ValueError, match="unknown crash point") as info:
        crash_point(name)
    assert repr(name) in str(info.value)


def test_unarmed_points_let_the_process_through():
    proc = run_child(PASS_POINTS, *CRASH_POINTS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"passed {p}" for p in CRASH_POINTS]


@pytest.mark.parametrize("armed", ["commit.applied", "prune.prepared, commit.applied",
                                   ",commit.applied,,", "commit.applied,no.such"])
def test_an_armed_point_kills_the_process_there_and_nowhere_before(armed):
    points = ["import.prepared", "commit.prepared", "commit.applied", "commit.switched"]
    proc = run_child(PASS_POINTS, *points, crash_at=armed)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["passed", "import.prepared", "passed", "commit.prepared"]
