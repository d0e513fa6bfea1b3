"""The benchmark report judges every target line from one table (tools/bench/targets.py): a
figure on the right side of a line's limit is met, on the wrong side missed, and a line with
no figure is not measured. The page keeps the sections written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.bench.report import repo_relative, with_extra_sections
from tools.bench.results import merge
from tools.bench.stats import drift_ratio
from tools.bench.targets import TARGETS, current_figures
from tools.bench.workload import OPS


def _result(p95: dict[str, float], corpus: str = "django") -> dict:
    """A result with a single-agent run whose per-op P95s are ``p95``."""
    detail = {op: {"n": 10, "p95": p95.get(op, 0.001)} for op in OPS}
    return {"corpus": {"name": corpus, "bytes": 1}, "systems": {
        "cascowfs": {"system": "cascowfs", "seq": {"ops_detail": detail}}}}


def _row(rows: list[str], line: str) -> str:
    (row,) = [r for r in rows if r.startswith(f"| {line} |")]
    return row


def _cells(row: str) -> list[str]:
    """line, must, measured, verdict, aim."""
    return [c.strip() for c in row.strip("|").split(" | ")]


@pytest.mark.parametrize("op", ["branch", "discard", "prune"])
@pytest.mark.parametrize("factor, verdict", [(0.5, "**met**"), (2.0, "**missed**")])
def test_op_line_verdict_follows_its_target(op: str, factor: float, verdict: str):
    target = TARGETS[op]
    rows = current_figures(merge([_result({op: target.limit * factor})]))
    line, must, _, judged, aim = _cells(_row(rows, target.line))
    assert (line, must, judged) == (target.line, target.must, verdict)
    # the aim is judged only once the must is met; a figure at half the must is above the aim
    assert aim == (f"not yet ({target.aim_figure})" if verdict == "**met**" else "—")


@pytest.mark.parametrize("op", ["branch", "discard", "prune"])
def test_aim_verdict_names_the_corpora_that_reach_it(op: str):
    target = TARGETS[op]
    rows = current_figures(merge([_result({op: target.aim_limit * 0.5}, "django"),
                                  _result({op: target.aim_limit * 2}, "linux")]))
    assert _cells(_row(rows, target.line))[4] == f"M only ({target.aim_figure})"
    rows = current_figures(merge([_result({op: target.aim_limit * 0.5}, "django"),
                                  _result({op: target.aim_limit * 0.5}, "linux")]))
    assert _cells(_row(rows, target.line))[4] == f"met ({target.aim_figure})"


def _read_and_growth(ratio: float) -> dict:
    """A linux result whose read-path ratios and store-size ratios are all ``ratio``."""
    res = _result({}, "linux")
    cell = {"cold_ratio": ratio, "warm_ratio": ratio}
    res["read_path"] = {"tests": {"grep -r": {"native ext4": {"cold_ratio": 1, "warm_ratio": 1},
                                              "cascowfs branch": cell}}}
    res["growth"] = {"snapshots": 1000, "cascowfs": {"snapshots": 1000,
                                                     "ratio_to_one_copy": ratio}}
    return res


@pytest.mark.parametrize("key", ["read", "store"])
@pytest.mark.parametrize("ratio, verdict", [(1.14, "**met**"), (1.15, "**met**"),
                                            (1.16, "**missed**"), (1.29, "**missed**")])
def test_read_path_and_store_size_are_judged_at_1_15(key: str, ratio: float, verdict: str):
    rows = current_figures(merge([_read_and_growth(ratio)]))
    line, must, measured, judged, _ = _cells(_row(rows, TARGETS[key].line))
    assert "1.15×" in must and TARGETS[key].limit == 1.15
    assert f"{ratio:.2f}×" in measured
    assert judged == verdict


def _mounted(corpus: str, seconds: list[float], snapshots: int = 10000) -> dict:
    res = _result({}, corpus)
    res["mount"] = {"snapshots": snapshots, "branches": 100, "mount_clean_s": seconds,
                    "mount_after_kill9_s": seconds}
    return res


def test_mount_line_is_judged_on_the_slowest_corpus():
    rows = current_figures(merge([_mounted("linux", [0.4, 0.5]), _mounted("django", [1.2])]))
    _, _, measured, judged, _ = _cells(_row(rows, TARGETS["mount"].line))
    assert measured.startswith("worst 1.20 s (M,") and judged == "**missed**"
    rows = current_figures(merge([_mounted("linux", [0.4, 0.5]), _mounted("django", [0.3])]))
    _, _, measured, judged, _ = _cells(_row(rows, TARGETS["mount"].line))
    assert measured.startswith("worst 0.50 s (L,") and judged == "**met**"
    rows = current_figures(merge([_mounted("linux", [2.0], snapshots=100)]))
    _, _, measured, judged, _ = _cells(_row(rows, TARGETS["mount"].line))
    assert "100 snapshots, 100 branches: not judged" in measured and judged == "—"


def test_lines_without_figures_are_not_measured():
    rows = current_figures(merge([_result({})]))
    for key in ("mix", "read", "import", "store", "mount", "label", "reset", "find"):
        assert _row(rows, TARGETS[key].line).endswith("| not measured | — | — |")
    for key in ("memory",):
        assert _row(rows, TARGETS[key].line).endswith(f"| {TARGETS[key].unmeasured} | — | — |")


@pytest.mark.parametrize("op", ["label", "reset"])
@pytest.mark.parametrize("factor, verdict", [(0.5, "**met**"), (2.0, "**missed**")])
def test_label_and_reset_are_judged_on_the_mix(op: str, factor: float, verdict: str):
    target = TARGETS[op]
    res = _result({})
    detail = {o: {"n": 10, "p95": 0.001} for o in OPS}
    detail[op] = {"n": 10, "p95": target.limit * factor}
    res["systems"]["cascowfs"]["mix"] = {"ops_detail": detail, "agents": 4, "ops": 100}
    _, must, measured, judged, _ = _cells(_row(current_figures(merge([res])), target.line))
    assert (must, judged) == (target.must, verdict)
    assert f"{target.limit * factor * 1e3:.1f} ms (M)" in measured


@pytest.mark.parametrize("snapshots, p95, verdict", [(10000, 0.05, "**met**"),
                                                     (10000, 0.2, "**missed**"),
                                                     (12, 0.2, "—")])
def test_find_is_judged_over_10k_snapshots_only(snapshots: int, p95: float, verdict: str):
    res = _result({})
    res["mount"] = {"find": {"snapshots": snapshots, "all": {"n": 80, "p95": p95}}}
    _, _, measured, judged, _ = _cells(_row(current_figures(merge([res])), TARGETS["find"].line))
    assert judged == verdict and f"{p95 * 1e3:.1f} ms" in measured


def test_every_target_has_one_current_figures_row():
    rows = current_figures(merge([_result({})]))
    assert len(rows) == 2 + len(TARGETS)
    for target in TARGETS.values():
        assert _cells(_row(rows, target.line))[1] == target.must


@pytest.mark.parametrize("key", list(TARGETS))
def test_limit_itself_is_judged_by_the_targets_comparison(key: str):
    target = TARGETS[key]
    for limit, judge in ((target.limit, target.met), (target.aim_limit, target.aim_met)):
        assert judge(limit) == (target.better != "below")
        assert judge(limit * 0.5) == (target.better != "at least")
        assert judge(limit * 2) == (target.better == "at least")


def test_drift_ratio_is_median_of_last_three_windows_over_first_three():
    nan = float("nan")
    assert drift_ratio([1, 2, 3, nan, 4, 4, 6, 8, 10]) == 8 / 2
    assert drift_ratio([1, 2, 3, 4, 5]) is None


def test_hand_written_sections_follow_the_page_in_file_name_order(tmp_path: Path):
    extra = tmp_path / "benchmarks.extra"
    extra.mkdir()
    (extra / "20-later.md").write_text("## Later\n\nsecond\n")
    (extra / "10-big-files.md").write_text("\n## Big and sparse files\n\nfirst\n\n")
    (extra / "notes.txt").write_text("not a section")
    page = with_extra_sections("# Benchmarks\n\n## Runs not done\n\n*none*\n", extra)
    assert page == ("# Benchmarks\n\n## Runs not done\n\n*none*\n\n"
                    "## Big and sparse files\n\nfirst\n\n## Later\n\nsecond\n")
    assert with_extra_sections("# Benchmarks\n", tmp_path / "missing") == "# Benchmarks\n"


@pytest.mark.parametrize("path, shown", [
    ("/work/main/bench-results/linux-peers.json", "bench-results/linux-peers.json"),
    ("/elsewhere/bench-results/x/bench-results/a.json", "bench-results/a.json"),
    ("bench-results/a.json", "bench-results/a.json"),
    ("/tmp/smoke.json", "/tmp/smoke.json"),
])
def test_result_paths_are_shown_relative_to_the_repository(path: str, shown: str):
    assert repo_relative(path) == shown
