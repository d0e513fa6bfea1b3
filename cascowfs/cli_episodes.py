"""The episode store's verbs of the command line: ``label``, ``reset``, ``find``, ``children``,
``tree``, ``show`` and ``episodes`` (docs/interface.md, Episodes). Each goes through the
mount's files like the other verbs (``Client``); ``cli.build_parser`` adds them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from .client import Client
from .episodes import MAX_PREDICATES, OBS_KEY
from .errors import NotFoundError
from .names import label_words
from .pathquote import quote

Verb = Callable[..., argparse.ArgumentParser]


def cmd_label(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        changes = label_words(args.labels)
        client.label(args.id, changes)
    _emit(args, {"id": args.id, "labels": changes}, None)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        client.reset(args.name, args.id)
    _emit(args, {"name": args.name, "parent": args.id}, None)  # as rebase's
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        ids = client.find(
            *args.predicates,
            sort=args.sort,
            limit=args.limit,
            parent=args.parent,
            ancestor=args.ancestor,
        )
    for ident in ids:
        _emit(args, {"id": ident}, ident)
    return 0


def cmd_children(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        kids = client.children(args.id)
    for ident in kids:
        _emit(args, {"id": ident}, ident)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        record = client.show(args.id)
    if args.json:
        _emit(args, record, None)
        return 0
    for key in ("id", "parent", "created_ns", "files", "size", "root", "obs"):
        value = record[key]
        print(f"{key + ':':<11} {'-' if value is None else value}")
    for key, value in sorted(record["labels"].items()):
        print(f"label:      {key}={quote(value)}")
    if record.get("error"):
        print(f"error:      {quote(record['error'])}")
    print(f"children:   {' '.join(record['children']) or '-'}")
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        episodes = client.episodes()
    by_id = {ep["id"]: ep for ep in episodes}
    children: dict[str | None, list[str]] = {}
    for ep in episodes:  # oldest first: children print in creation order
        parent = ep["parent"] if ep["parent"] in by_id else None  # a pruned parent: a root
        children.setdefault(parent, []).append(ep["id"])
    if args.id in by_id:
        roots = [args.id]
    elif args.id is not None:  # a pruned snapshot: its children are still its (children ID)
        roots = [ep["id"] for ep in episodes if ep["parent"] == args.id]
        if not roots:
            raise NotFoundError(f"no snapshot {args.id!r}, nor children of one")
    else:
        roots = children.get(None, [])
        # a snapshot on a parent loop has no root above it (fsck reports the loop): shown too
        below = {kid for kids in children.values() for kid in kids}
        reached = _reached(roots, children)
        roots += [ep["id"] for ep in episodes if ep["id"] not in reached and ep["id"] in below]
    for ident, depth, lead in _tree_walk(roots, children):
        ep = by_id[ident]
        labels = ep["labels"]
        shown = sorted(labels) if args.labels is None else [k for k in args.labels if k in labels]
        words = " ".join(f"{k}={quote(labels[k])}" for k in shown)
        record = {
            "id": ident,
            "parent": ep["parent"],
            "depth": depth,
            "labels": {k: labels[k] for k in shown},
        }
        _emit(args, record, f"{lead}{ident}  {words}".rstrip())
    return 0


def _tree_walk(
    roots: list[str], children: dict[str | None, list[str]]
) -> Iterator[tuple[str, int, str]]:
    """(id, depth, ``tree(1)``-style lead) depth first, without recursion (a search tree is
    deep); each id once, so that a parent loop (which a store should never hold) ends."""
    stack: list[tuple[str, int, str, str]] = [(r, 0, "", "") for r in reversed(roots)]
    shown: set[str] = set()
    while stack:
        ident, depth, lead, below = stack.pop()
        if ident in shown:
            continue
        shown.add(ident)
        yield ident, depth, lead
        kids = [kid for kid in children.get(ident, []) if kid not in shown]
        for i, kid in reversed(list(enumerate(kids))):
            last = i == len(kids) - 1
            branch, rule = ("└── ", "    ") if last else ("├── ", "│   ")
            stack.append((kid, depth + 1, below + branch, below + rule))


def _reached(roots: list[str], children: dict[str | None, list[str]]) -> set[str]:
    return {ident for ident, _, _ in _tree_walk(roots, children)}


def _emit(args: argparse.Namespace, record: dict, text: str | None) -> None:
    from .cli import emit  # here: cli imports this module

    emit(args, record, text)


def cmd_episodes(args: argparse.Namespace) -> int:
    from .cli import _change_dict  # here: cli imports this module

    with Client(args.mountpoint) as client, _output(args.output) as out:
        episodes = client.episodes()
        present = {ep["id"] for ep in episodes}
        for ep in episodes:
            if args.with_diff:
                parent = ep["parent"]
                # a pruned parent's tree is gone: no change list can be made against it
                changes = client.diff(parent, ep["id"]) if parent in present or not parent else None
                ep["changes"] = None if changes is None else [_change_dict(c) for c in changes]
            # ASCII: a name or label may hold C1 controls, U+2028, U+202E (escaped by JSON)
            out.write(json.dumps(ep) + "\n")
    return 0


@contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None or path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as fh:
        yield fh


def add_verbs(verb: Verb) -> None:
    """Add the episode verbs through ``cli.build_parser``'s ``verb`` helper."""
    p = verb(
        "label",
        cmd_label,
        "set labels of snapshot ID after its commit (KEY= removes KEY)",
        "Labels are metadata: the snapshot's tree stays as it is. The caps on labels "
        f"(count, size) hold for the labels that result. The key {OBS_KEY!r} is reserved.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("id", metavar="ID")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE")

    p = verb(
        "reset",
        cmd_reset,
        "drop branch NAME's changes and re-base it on snapshot ID",
        "One atomic step (a rollback to any node of a search): unlike rebase, a branch "
        "with uncommitted changes is not refused; they are dropped.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID")

    p = verb(
        "find",
        cmd_find,
        "snapshot ids whose labels match every PREDICATE, one a line",
        "PREDICATE: KEY=V, KEY!=V, KEY<V, KEY<=V, KEY>V, KEY>=V (numeric when both sides "
        "are numbers) or has:KEY (has:obs: a stored observation); at most "
        f"{MAX_PREDICATES} of them.",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("predicates", nargs="*", metavar="PREDICATE")
    p.add_argument("--sort", metavar="[-]KEY", help="order by label KEY (-KEY: descending)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N ids")
    lineage = p.add_mutually_exclusive_group()
    lineage.add_argument("--parent", metavar="ID", help="only children of snapshot ID")
    lineage.add_argument("--ancestor", metavar="ID", help="only descendants of snapshot ID")

    p = verb("children", cmd_children, "ids of the snapshots whose parent is ID (none: roots)")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("id", metavar="ID", nargs="?")

    p = verb("tree", cmd_tree, "the snapshot tree (below ID) as text, with labels")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("id", metavar="ID", nargs="?")
    p.add_argument(
        "--labels", type=lambda v: v.split(","), metavar="K1,K2", help="show only these labels"
    )

    p = verb("show", cmd_show, "a snapshot's record, labels, observation size and children")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("id", metavar="ID")

    p = verb(
        "episodes",
        cmd_episodes,
        "every snapshot as JSON Lines (MNT/episodes), for training pipelines",
        "One object per snapshot, oldest first: id, parent, created, created_ns, labels, "
        "files, size, root, obs. --with-diff adds 'changes', the change list against the "
        "parent (as `diff --json` gives it).",
        json_help="accepted for symmetry: the output is JSON Lines already",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("-o", "--output", metavar="FILE", help="write there (default: stdout)")
    p.add_argument("--with-diff", action="store_true", help="add each snapshot's changes")
