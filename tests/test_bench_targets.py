"""The benchmark report judges every target line from one table (tools/bench/targets.py): a
figure on the right side of a line's limit is met, on the wrong side missed, and a line with
no figure is not measured."""

from __future__ import annotations

import pytest

from tools.bench.results import merge
from tools.bench.stats import drift_ratio
from tools.bench.targets import TARGETS, must_lines
from tools.bench.workload import OPS


def _result(p95: dict[str, float]) -> dict:
    """A django result with a single-agent run whose per-op P95s are ``p95``."""
    detail = {op: {"n": 10, "p95": p95.get(op, 0.001)} for op in OPS}
    return {"corpus": {"name": "django", "bytes": 1}, "systems": {
        "cascowfs": {"system": "cascowfs", "seq": {"ops_detail": detail}}}}


def _row(rows: list[str], what: str) -> str:
    (row,) = [r for r in rows if r.startswith(f"| {what} |")]
    return row


@pytest.mark.parametrize("op", ["branch", "discard", "prune"])
@pytest.mark.parametrize("factor, verdict", [(0.5, "**met**"), (2.0, "**MISSED**")])
def test_op_line_verdict_follows_its_target(op: str, factor: float, verdict: str):
    target = TARGETS[op]
    rows = must_lines(merge([_result({op: target.limit * factor})]))
    row = _row(rows, target.what)
    assert row.endswith(f"| {verdict} |")
    assert f"| {target.must} | {target.aim} |" in row


def test_lines_without_figures_are_not_measured():
    rows = must_lines(merge([_result({})]))
    for key in ("import", "store", "mount"):
        assert _row(rows, TARGETS[key].what).endswith("| — | not measured |")


@pytest.mark.parametrize("key", list(TARGETS))
def test_limit_itself_is_judged_by_the_targets_comparison(key: str):
    target = TARGETS[key]
    assert target.met(target.limit) == (target.better != "below")
    assert target.met(target.limit * 0.5) == (target.better != "at least")
    assert target.met(target.limit * 2) == (target.better == "at least")


def test_drift_ratio_is_median_of_last_three_windows_over_first_three():
    nan = float("nan")
    assert drift_ratio([1, 2, 3, nan, 4, 4, 6, 8, 10]) == 8 / 2
    assert drift_ratio([1, 2, 3, 4, 5]) is None
