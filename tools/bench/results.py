"""Result files read back for the report: merged per corpus, read-path figures normalized, and
the few figures derived from them."""

from __future__ import annotations

import statistics

PEER_ORDER = ("overlay", "btrfs", "git", "cp")
CORPUS_ORDER = ("django", "linux")
CORPUS_LABEL = {"django": "M = Django 5.1.4 sdist", "linux": "L = linux-source-6.1"}
CORPUS_PROSE = {"django": "the Django 5.1.4 sdist", "linux": "Debian's linux-source-6.1"}
GROWTH_KEYS = ("cascowfs", "btrfs", "cascowfs-wide", "btrfs-wide")


def corpus_key(res: dict) -> str:
    name = res["corpus"]["name"]
    return "synthetic" if name.startswith("synthetic") else name


def merge(results: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for res in results:
        key = corpus_key(res)
        cur = out.setdefault(key, {"systems": {}, "runs": []})
        cur["runs"].append(
            {k: res.get(k) for k in ("argv", "started", "finished", "config", "product")}
        )
        for k, v in res.items():
            if k == "systems":
                for name, sysres in v.items():
                    old = cur["systems"].get(name, {})
                    if "skipped" in sysres or "failed" in sysres:
                        if not old:
                            cur["systems"][name] = sysres
                        continue
                    merged = {kk: vv for kk, vv in old.items() if kk not in ("skipped", "failed")}
                    merged.update(v[name])
                    cur["systems"][name] = merged
            elif k == "growth" and isinstance(v, dict):
                g = cur.setdefault("growth", {})
                for gk, gv in v.items():
                    if isinstance(gv, dict) and "skipped" in gv and isinstance(g.get(gk), dict):
                        continue
                    if gk in ("snapshots", "wide_snapshots") and not gv:
                        continue
                    g[gk] = gv
            elif k in ("read_path", "mount"):
                if v and "skipped" not in v:
                    cur[k] = v
                elif k not in cur:
                    cur[k] = v
            else:
                cur[k] = v
    return out


def normalize_read_path(data: dict[str, dict]) -> None:
    """Warm = the best of the repeats, cold = their median. The machine is shared: another
    session's drop_caches or I/O burst can turn one warm run cold, and the best of N is the
    figure such interference cannot inflate (a cold run has no such floor, so its median)."""
    for d in data.values():
        rp = d.get("read_path") or {}
        for row in (rp.get("tests") or {}).values():
            for v in row.values():
                if v.get("warm_all"):
                    v["warm"] = min(v["warm_all"])
                if v.get("cold_all"):
                    v["cold"] = statistics.median(v["cold_all"])
            base = row.get("native ext4")
            if base:
                for v in row.values():
                    v["cold_ratio"] = v["cold"] / base["cold"]
                    v["warm_ratio"] = v["warm"] / base["warm"]


def import_includes_start(s: dict) -> bool:
    """Runs before the import was timed apart from the daemon's start (``import_after_start``)
    timed both: cascowfs's mount (0.4–0.5 s) counted against its import, the peers' did not."""
    return s.get("system") == "cascowfs" and not s.get("import_after_start")


def cold_read_mb_s(res: dict) -> float | None:
    """How fast this run's disk read the corpus cold (read path: every file, native ext4): the
    ceiling of any import, which has to read it all."""
    tests = (res.get("read_path") or {}).get("tests") or {}
    row = next((v for t, v in tests.items() if t.startswith("read every file")), None)
    native = (row or {}).get("native ext4") or {}
    if not native.get("cold"):
        return None
    return res["corpus"]["bytes"] / 1e6 / native["cold"]


def corpora_in_order(data: dict[str, dict]) -> list[str]:
    """The corpora of ``data``, the known ones first in their order."""
    return [c for c in CORPUS_ORDER if c in data] + [c for c in data if c not in CORPUS_ORDER]
