"""Smoke mode of the benchmark tools: a tiny synthetic corpus, a few ops per system, every
section (MCTS mix, read path, growth, mount time), then the report with its plots.

This only checks that the tools run end to end, leave nothing mounted, and write what the
report needs; it asserts no speed (speed targets live in the benchmarks, never in tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.skips import needs_fuse, needs_loop

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"


pytestmark = [needs_fuse, needs_loop]  # the benchmark mounts cascowfs on a loop-device ext4


def _leaks(parent: Path) -> list[str]:
    sys.path.insert(0, str(TOOLS))
    try:
        import benchfs

        return benchfs.leaks(str(parent))
    finally:
        sys.path.remove(str(TOOLS))


def _bench(tmp_path: Path, *args: str, timeout: float) -> dict:
    """Run ``bench_mcts.py`` with its scratch images and corpora under ``tmp_path``; returns
    the result JSON, after checking the run succeeded and left no scratch image behind."""
    images = tmp_path / "images"  # scratch images of this run only (leak check below)
    images.mkdir()
    env = dict(os.environ, CASCOWFS_BENCH_DATA=str(tmp_path / "data"),
               CASCOWFS_BENCH_IMAGES=str(images))
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(TOOLS / "bench_mcts.py"), *args, "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _leaks(images) == []
    return json.loads(out.read_text())


def _report(tmp_path: Path, doc: Path) -> str:
    """The report of ``_bench``'s result, written to ``doc``; returns its text."""
    r = subprocess.run([sys.executable, str(TOOLS / "bench_report.py"),
                        str(tmp_path / "smoke.json"), "--doc", str(doc), "--notes", ""],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
    return doc.read_text()


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    res = _bench(tmp_path, "--corpus", "synthetic", "--synthetic-files", "120", "--agents", "2",
                 "--ops", "40", "--seq-ops", "24", "--slow-ops", "16", "--read-repeat", "1",
                 "--growth", "10", "--mount-snapshots", "12", "--mount-branches", "3",
                 timeout=220)
    assert res["corpus"]["files"] > 100
    systems = res["systems"]
    assert set(systems) == {"cascowfs", "overlay", "btrfs", "git", "cp"}
    for name, s in systems.items():
        if "skipped" in s:
            assert name == "btrfs", f"{name} skipped: {s['skipped']}"
            continue
        assert "failed" not in s, s.get("failed")
        for key in ("seq", "mix"):
            m = s[key]
            assert m["error_count"] == 0, (name, key, m["errors"])
            assert m["ops_detail"]["branch"]["n"] > 0
            assert m["ops_detail"]["discard"]["n"] == m["ops_detail"]["branch"]["n"]
    # the same script for every system: same number of branch ops in the single-agent run
    fast = [s["seq"]["ops_detail"]["branch"]["n"] for n, s in systems.items()
            if "seq" in s and n in ("cascowfs", "overlay", "btrfs")]
    assert len(set(fast)) == 1, fast
    rp = res["read_path"]
    assert "cascowfs branch" in rp["tests"]["read every file (find | xargs cat)"]
    assert res["growth"]["cascowfs"]["series"][-1][0] == 10
    assert len(res["mount"]["mount_after_kill9_s"]) == 3

    text = _report(tmp_path, tmp_path / "docs" / "benchmarks.md")
    assert "## Current figures" in text and "create branch" in text
    assert "met" in text or "MISSED" in text
    assert "`--ctl-open per-agent`" in text  # the default driver: one open of ctl per agent
    pngs = sorted(p.name for p in (tmp_path / "docs" / "img").glob("*.png")) \
        if (tmp_path / "docs" / "img").exists() else []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # the bench extra is not installed: tables only
    assert any("latency" in p for p in pngs) and any("growth" in p for p in pngs), pngs


@pytest.mark.timeout(180)
def test_bench_smoke_with_ctl_opened_per_command(tmp_path: Path) -> None:
    """The shell-style driver (`--ctl-open per-command`): every op opens ctl afresh."""
    res = _bench(tmp_path, "--corpus", "synthetic", "--synthetic-files", "60", "--systems",
                 "cascowfs", "--agents", "2", "--ops", "30", "--seq-ops", "12", "--no-read-path",
                 "--ctl-open", "per-command", timeout=160)
    assert res["config"]["ctl_open"] == "per-command"
    for key in ("seq", "mix"):
        m = res["systems"]["cascowfs"][key]
        assert m["error_count"] == 0, (key, m["errors"])
        assert m["ops_detail"]["commit"]["n"] > 0
    assert "`--ctl-open per-command`" in _report(tmp_path, tmp_path / "benchmarks.md")


@pytest.mark.timeout(200)
def test_bench_smoke_of_the_episode_lines(tmp_path: Path) -> None:
    """The MCTS mix labels paths and resets branches (P50/P95/P99 of each), the mount section
    times find over its labelled snapshots, and the report has a line for each."""
    res = _bench(tmp_path, "--corpus", "synthetic", "--synthetic-files", "60", "--systems",
                 "cascowfs", "--agents", "2", "--ops", "80", "--seq-ops", "30", "--no-read-path",
                 "--mount-snapshots", "12", "--mount-branches", "2", timeout=180)
    for key in ("seq", "mix"):
        m = res["systems"]["cascowfs"][key]
        assert m["error_count"] == 0, (key, m["errors"])
        detail = m["ops_detail"]
        assert detail["discard"]["n"] == detail["branch"]["n"]  # a reset branch goes once too
        for op in ("label", "reset"):
            assert detail[op]["n"] > 0, (key, op)
            assert detail[op]["p50"] <= detail[op]["p95"] <= detail[op]["p99"]
    find = res["mount"]["find"]
    assert find["snapshots"] == 12 and find["all"]["n"] == 80
    text = _report(tmp_path, tmp_path / "benchmarks.md")
    for line in ("label a snapshot, MCTS mix", "reset a branch, MCTS mix", "find, 10k snapshots"):
        row = next(r for r in text.splitlines() if r.startswith(f"| {line} |"))
        assert "P95" in row, row
