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
from .episodes import OBS_KEY
from .errors import NotFoundError
from .names import label_words
from .pathquote import quote

Verb = Callable[..., argparse.ArgumentParser]


def cmd_label(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        client.label(args.id, label_words(args.labels))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        client.reset(args.name, args.id)
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
        print(ident)
    return 0


def cmd_children(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        for ident in client.children(args.id):
            print(ident)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with Client(args.mountpoint) as client:
        record = client.show(args.id)
    if args.json:
        print(json.dumps(record))
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
    if args.id is not None:
        if args.id not in by_id:
            raise NotFoundError(f"no snapshot {args.id!r}")
        roots = [args.id]
    else:
        roots = children.get(None, [])
    for line in _tree_lines(roots, children, by_id, args.labels):
        print(line)
    return 0


def _tree_lines(
    roots: list[str],
    children: dict[str | None, list[str]],
    by_id: dict[str, dict],
    keys: list[str] | None,
) -> Iterator[str]:
    """``tree(1)``-style lines, depth first, without recursion (a search tree is deep)."""
    stack: list[tuple[str, str, str]] = [(r, "", "") for r in reversed(roots)]
    while stack:
        ident, lead, below = stack.pop()
        labels = by_id[ident]["labels"]
        shown = sorted(labels) if keys is None else [k for k in keys if k in labels]
        words = " ".join(f"{k}={quote(labels[k])}" for k in shown)
        yield f"{lead}{ident}  {words}".rstrip()
        kids = children.get(ident, [])
        for i, kid in reversed(list(enumerate(kids))):
            last = i == len(kids) - 1
            branch, rule = ("└── ", "    ") if last else ("├── ", "│   ")
            stack.append((kid, below + branch, below + rule))


def cmd_episodes(args: argparse.Namespace) -> int:
    from .cli import _change_dict  # here: cli imports this module

    with Client(args.mountpoint) as client, _output(args.output) as out:
        for ep in client.episodes():
            if args.with_diff:
                ep["changes"] = [_change_dict(c) for c in client.diff(ep["parent"], ep["id"])]
            out.write(json.dumps(ep, ensure_ascii=False) + "\n")
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
    p.add_argument("name")
    p.add_argument("id", metavar="ID")

    p = verb(
        "find",
        cmd_find,
        "snapshot ids whose labels match every PREDICATE, one a line",
        "PREDICATE: KEY=V, KEY!=V, KEY<V, KEY<=V, KEY>V, KEY>=V (numeric when both sides "
        "are numbers) or has:KEY (has:obs: a stored observation).",
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
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = verb(
        "episodes",
        cmd_episodes,
        "every snapshot as JSON Lines (MNT/episodes), for training pipelines",
        "One object per snapshot, oldest first: id, parent, created, created_ns, labels, "
        "files, size, root, obs. --with-diff adds 'changes', the change list against the "
        "parent (as `diff --json` gives it).",
    )
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("-o", "--output", metavar="FILE", help="write there (default: stdout)")
    p.add_argument("--with-diff", action="store_true", help="add each snapshot's changes")
