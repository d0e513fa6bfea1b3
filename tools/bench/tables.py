"""The report's Markdown tables, each a list of lines, and the number formats they share."""

from __future__ import annotations

import math

from .results import PEER_ORDER, import_includes_start
from .workload import OPS


def ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x >= 10:
        return f"{x:,.1f} s"
    v = x * 1e3
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def dur(x: float | None) -> str:
    """A duration with its unit: ms below 10 s, s above."""
    v = ms(x)
    return v if v.endswith(" s") or v == "—" else f"{v} ms"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "—"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"1/{b / a:.0f}"


def mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:,.1f} MB"


def machine_table(m: dict, scratch: list[dict]) -> list[str]:
    """The machine, and the scratch filesystems (``scratch``: one of each type used)."""
    root = m.get("root_fs", {})
    kinds = " and ".join(
        f"{fs.get('fstype')}{' journaled' if fs.get('journal') else ''} ({fs.get('size_gb')} GB)"
        for fs in scratch
    )
    backing = {fs.get("backing") for fs in scratch}
    where = (
        "each on a loop device with direct I/O over a sparse image on `/`, mounted `noatime`"
        if backing == {"loop device, direct-io, sparse image on /"}
        else "; ".join(sorted(str(b) for b in backing))
    )
    return [
        "| | |",
        "|---|---|",
        f"| CPU | {m.get('cpu')}, {m.get('cores')} cores |",
        f"| memory | {m.get('memory_gb')} GiB |",
        f"| kernel | {m.get('kernel')} (Firecracker micro-VM) |",
        f"| Python | {m.get('python')} |",
        f"| `/` | {root.get('fstype')} on {root.get('source')}, no journal; **not used** for any "
        "figure |",
    ] + ([f"| scratch filesystems | {kinds}, {where} |"] if scratch else [])


def mix_table(d: dict, key: str) -> list[str]:
    rows = [
        "| system | ops | wall | op | n | P50 ms | P95 ms | P99 ms | max ms | ops/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("cascowfs",) + PEER_ORDER:
        s = d["systems"].get(name)
        if not s:
            continue
        if key not in s:
            why = s.get("skipped") or (s.get("failed") or "").splitlines()[0:1]
            if why:
                rows.append(
                    f"| {name} | — | — | *{'skipped' if 'skipped' in s else 'failed'}: "
                    f"{why if isinstance(why, str) else why[0]}* | | | | | | |"
                )
            continue
        m = s[key]
        first = True
        for op in OPS:
            o = m["ops_detail"][op]
            if not o["n"]:
                continue
            lead = (
                (f"| **{name}** | {m['ops']} ({m['error_count']} errors) | {m['wall_s']:.1f} s")
                if first
                else "| | |"
            )
            rows.append(
                f"{lead} | {op} | {o['n']} | {ms(o['p50'])} | {ms(o['p95'])} | "
                f"{ms(o['p99'])} | {ms(o['max'])} | {o['throughput_ops_s']:.1f} |"
            )
            first = False
        if m["error_count"]:
            rows.append(
                f"| | | | *{m['error_count']} failed ops; first: "
                f"{m['errors'][0][:160].replace('|', '/')}…* | | | | | | |"
            )
    return rows


def mostly_failed(m: dict) -> bool:
    """More than 5% of the run's ops failed: its figures are left out of the ratios."""
    return bool(m.get("error_count")) and m["error_count"] > 0.05 * max(1, m["ops"])


def ratio_table(d: dict, key: str) -> list[str]:
    c = (d["systems"].get("cascowfs") or {}).get(key)
    if not c:
        return ["*(no cascowfs figures for this run)*"]
    peers = [p for p in PEER_ORDER if key in (d["systems"].get(p) or {})]
    broken = [p for p in peers if mostly_failed(d["systems"][p][key])]
    peers = [p for p in peers if p not in broken]
    if not peers:
        return ["*(no peer completed this run without errors)*"]
    rows = (
        [f"*Left out (more than 5% of their ops failed, see above): {', '.join(broken)}.*", ""]
        if broken
        else []
    )
    rows += [
        "| op | " + " | ".join(f"÷ {p} P50 | ÷ {p} P95" for p in peers) + " |",
        "|---|" + "---|---|" * len(peers),
    ]
    for op in OPS:
        co = c["ops_detail"][op]
        cells = []
        for p in peers:
            po = d["systems"][p][key]["ops_detail"][op]
            cells += [ratio(co["p50"], po["p50"]), ratio(co["p95"], po["p95"])]
        rows.append(f"| {op} | " + " | ".join(cells) + " |")
    return rows


def import_table(d: dict) -> list[str]:
    rows = [
        "| system | import (cold cache) | MB/s | space after import | space after the runs |",
        "|---|---|---|---|---|",
    ]
    for name in ("cascowfs",) + PEER_ORDER:
        s = d["systems"].get(name)
        if not s or "import_s" not in s:
            continue
        after = s.get("storage_after_mix", s.get("storage_after_seq"))
        if name == "btrfs":  # older runs: storage() was the whole fs (with the src copy)
            imp, after = (
                s.get("fs_used_after_import"),
                s.get("fs_used_after_mix", s.get("fs_used_after_seq")),
            )
            rows.append(
                f"| {name} | {s['import_s']:.2f} s | {s['import_mb_s']:.0f} | "
                f"{mb(imp)} | {mb(after)} |"
            )
            continue
        with_start = " (with the daemon's start)" if import_includes_start(s) else ""
        if "import_imaged_from_source" in s:
            with_start += (
                ", image from the source"
                if s["import_imaged_from_source"]
                else ", image not from the source"
            )
        rows.append(
            f"| {name} | {s['import_s']:.2f} s{with_start} | {s['import_mb_s']:.0f} | "
            f"{mb(s.get('storage_after_import'))} | {mb(after)} |"
        )
    return rows


def read_table(rp: dict) -> list[str]:
    if not rp or "tests" not in rp:
        return [f"*not run: {(rp or {}).get('skipped', 'not requested')}*"]
    places = []
    for row in rp["tests"].values():
        for p in row:
            if p not in places:
                places.append(p)
    rows = [
        "| test | " + " | ".join(f"{p} cold / warm" for p in places) + " |",
        "|---|" + "---|" * len(places),
    ]
    for test, row in rp["tests"].items():
        cells = []
        for p in places:
            v = row.get(p)
            if not v:
                cells.append("—")
                continue
            cells.append(
                f"{dur(v['cold'])} / {dur(v['warm'])}"
                if p == "native ext4"
                else f"{dur(v['cold'])} / {dur(v['warm'])} "
                f"(**{v['cold_ratio']:.2f}× / {v['warm_ratio']:.2f}×**)"
            )
        rows.append(f"| {test.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(
        f"{rp.get('repeat')} runs of each (compileall: "
        f"{rp.get('compile_repeat', 1)}), every warm run right after its cold one; cold = "
        "median, warm = best run (another session's drop_caches or I/O burst can make a "
        "warm run cold on this shared machine); ratios are to native ext4."
    )
    if "discard_after_full_read_s" in rp:
        rows.append(
            f"Discard of the branch after all of the above read the whole tree: "
            f"{ms(rp['discard_after_full_read_s'])} ms (bare overlay umount after the "
            f"same: {ms(rp.get('floor_umount_after_full_read_s'))} ms)."
        )
    return rows
