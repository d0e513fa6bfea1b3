#!/usr/bin/python3
"""The micro-VM test's agent: a small tree search through cascowfs's file interface, and the
check that every operation it saw acknowledged survived whatever happened since.

Each operation is logged to an ack log in two fsynced records: the intent before the call and
its result after it. So after a power cut the log holds every acknowledged operation, and at
most one trailing intent whose outcome is unknown (the call may or may not have taken effect).

    agent.py run [--ops N]         expand, write, commit, discard, prune (N ops, or until killed)
    agent.py verify [--power-cut]  every acknowledged op is in the store; with --power-cut
                                   every branch also shows exactly its parent snapshot

Only the standard library: it runs on the guest's own python3, as an agent would.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import sys
from pathlib import Path

MNT = Path(os.environ.get("CASCOWFS_MNT", "/mnt/cascowfs"))
ACKS = Path(os.environ.get("VMTEST_ACKS", "/var/lib/vmtest/acks.log"))
MAX_BRANCHES = 4


def manifest(root: Path | None) -> str:
    """A digest of a tree's names, kinds and file contents (None: the empty snapshot)."""
    h = hashlib.sha256()
    if root is None:
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(f"d {rel}\n".encode())
        for name in sorted(filenames):
            with open(os.path.join(dirpath, name), "rb") as fh:
                h.update(f"f {rel}/{name} {hashlib.sha256(fh.read()).hexdigest()}\n".encode())
    return h.hexdigest()


class AckLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_log(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            self._write(b"\n")  # a torn record of a cut: end it, it is not a record
        self.seq = sum(1 for r in self.records if "intent" in r)

    def _write(self, data: bytes) -> None:
        os.write(self.fd, data)
        os.fsync(self.fd)

    def record(self, rec: dict) -> None:
        self._write(json.dumps(rec, sort_keys=True).encode() + b"\n")
        self.records.append(rec)


def read_log(path: Path) -> list[dict]:
    records = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records
    for line in data.split(b"\n"):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn line of a cut, or the blank line that ends it
    return records


class Agent:
    def __init__(self, log: AckLog, rng: random.Random) -> None:
        self.log = log
        self.rng = rng
        self.ctl = os.open(MNT / "ctl", os.O_RDWR)

    def call(self, intent: dict, fn) -> bool:
        """Log the intent, run ``fn`` (a call into cascowfs), log its result."""
        self.log.seq += 1
        self.log.record({"intent": intent, "seq": self.log.seq})
        try:
            extra = fn() or {}
        except OSError as exc:
            self.log.record({"seq": self.log.seq, "result": errno.errorcode.get(exc.errno, "?")})
            return False
        self.log.record({"seq": self.log.seq, "result": "ok", **extra})
        return True

    def command(self, line: str) -> str:
        os.write(self.ctl, line.encode())
        return os.read(self.ctl, 65536).decode().strip()

    def branches(self) -> list[str]:
        return sorted(os.listdir(MNT / "branches"))

    def snapshots(self) -> list[str]:
        return sorted(os.listdir(MNT / "snapshots"))

    def tree(self, name: str) -> Path:
        return Path(os.readlink(MNT / "branches" / name / "tree"))

    def step(self) -> None:
        branches, snapshots = self.branches(), self.snapshots()
        n = self.log.seq + 1
        if not branches or (len(branches) < MAX_BRANCHES and self.rng.random() < 0.2):
            if snapshots and self.rng.random() < 0.9:
                parent = self.rng.choice(snapshots)
                self.call({"op": "branch", "name": f"b{n}", "parent": parent},
                          lambda: self.command(f"branch b{n} {parent}") and None)
            else:
                self.call({"op": "branch", "name": f"b{n}", "parent": ""},
                          lambda: os.mkdir(MNT / "branches" / f"b{n}"))
            return
        name = self.rng.choice(branches)
        roll = self.rng.random()
        if roll < 0.45:
            self.write(name)
        elif roll < 0.75:
            tree = self.tree(name)
            digest = manifest(tree)
            self.call({"op": "commit", "branch": name, "id": f"s{n}", "manifest": digest},
                      lambda: self.command(f"commit {name} s{n} step={n}") and None)
        elif roll < 0.87 and len(branches) > 1:
            self.call({"op": "discard", "name": name},
                      lambda: self.command(f"discard {name}") and None)
        elif snapshots:
            victim = self.rng.choice(snapshots)  # EBUSY while a branch is based on it: logged
            self.call({"op": "prune", "id": victim},
                      lambda: self.command(f"prune {victim}") and None)

    def write(self, name: str) -> None:
        """Uncommitted work inside the branch: create, rewrite or delete a few files."""
        tree = self.tree(name)
        for _ in range(self.rng.randint(1, 4)):
            path = tree / f"d{self.rng.randint(0, 2)}" / f"f{self.rng.randint(0, 9)}"
            if path.exists() and self.rng.random() < 0.2:
                path.unlink()
                continue
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(self.rng.randbytes(self.rng.randint(0, 20000)))


def cmd_run(args: argparse.Namespace) -> int:
    log = AckLog(ACKS)
    agent = Agent(log, random.Random(args.seed if args.seed is not None else os.getpid()))
    done = 0
    while args.ops is None or done < args.ops:
        agent.step()
        done += 1
    print(f"agent: {done} steps, {log.seq} operations logged", flush=True)
    return 0


def expected_state(records: list[dict]) -> tuple[dict, set, set, set, dict | None]:
    """From the log: snapshots that must exist (id -> manifest), snapshots and branches that
    must not, branches that must, and the trailing intent whose outcome is unknown."""
    intents = {r["seq"]: r["intent"] for r in records if "intent" in r}
    results = {r["seq"]: r["result"] for r in records if "result" in r}
    snaps: dict[str, str] = {}
    gone_snaps: set[str] = set()
    branches: set[str] = set()
    gone_branches: set[str] = set()
    uncertain = None
    for seq in sorted(intents):
        op = intents[seq]
        if seq not in results:
            if seq != max(intents):
                raise AssertionError(f"op {seq} {op} has no result but is not the last")
            uncertain = op
            continue
        if results[seq] != "ok":
            continue
        kind = op["op"]
        if kind == "branch":
            branches.add(op["name"])
        elif kind == "discard":
            branches.discard(op["name"])
            gone_branches.add(op["name"])
        elif kind == "commit":
            snaps[op["id"]] = op["manifest"]
        elif kind == "prune":
            snaps.pop(op["id"], None)
            gone_snaps.add(op["id"])
    return snaps, gone_snaps, branches, gone_branches, uncertain


def cmd_verify(args: argparse.Namespace) -> int:
    records = read_log(ACKS)
    snaps, gone_snaps, branches, gone_branches, uncertain = expected_state(records)
    unsure = set()
    if uncertain is not None:
        unsure = {uncertain.get("id"), uncertain.get("name"), uncertain.get("branch")} - {None}
    problems = []
    present_snaps = set(os.listdir(MNT / "snapshots"))
    present_branches = set(os.listdir(MNT / "branches"))
    for sid, digest in snaps.items():
        if sid in unsure:
            continue
        if sid not in present_snaps:
            problems.append(f"acknowledged commit {sid} is missing")
        elif manifest(MNT / "snapshots" / sid) != digest:
            problems.append(f"snapshot {sid} differs from what its branch showed at commit")
    for sid in (gone_snaps & present_snaps) - unsure:
        problems.append(f"acknowledged prune of {sid} undone")
    for b in (branches - present_branches) - unsure:
        problems.append(f"acknowledged branch {b} is missing")
    for b in (gone_branches & present_branches) - unsure:
        problems.append(f"acknowledged discard of {b} undone")
    for extra in (present_snaps - set(snaps)) - unsure:
        problems.append(f"snapshot {extra} was never acknowledged")
    for extra in (present_branches - branches) - unsure:
        problems.append(f"branch {extra} was never acknowledged")
    restarted = 0
    if args.power_cut:
        for b in sorted(present_branches):
            parent = (MNT / "branches" / b / "parent").read_text().strip()
            tree = Path(os.readlink(MNT / "branches" / b / "tree"))
            if manifest(tree) != manifest(MNT / "snapshots" / parent if parent else None):
                problems.append(f"branch {b} does not show its parent {parent or '(empty)'}")
            restarted += 1
    acked = sum(1 for r in records if r.get("result") == "ok")
    print(json.dumps({"ops_acknowledged": acked, "snapshots": len(snaps),
                      "branches": len(present_branches), "branches_restarted": restarted,
                      "uncertain": uncertain, "problems": problems}), flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--ops", type=int)
    run.add_argument("--seed", type=int)
    verify = sub.add_parser("verify")
    verify.add_argument("--power-cut", action="store_true")
    args = parser.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())
