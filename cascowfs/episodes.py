"""The episode store's queries: ``find`` predicates over snapshot labels, the snapshot tree's
edges, and the episode records ``MNT/episodes`` serves (docs/interface.md, Episodes).

A tree search keeps tens of thousands of snapshots and asks for a handful of them at every
step ("the ten best children of this node"), so nothing here decodes every snapshot record:
a predicate on a label reads the catalog's ``labels`` index for that key only, ``--parent``
and ``--ancestor`` read its ``children`` index, and whole records are decoded only for the
candidates that survive (``has:obs``) and for the episode export, which wants them all.

Predicate grammar (one word each; every predicate must hold)::

    KEY=VALUE  KEY!=VALUE  KEY<VALUE  KEY<=VALUE  KEY>VALUE  KEY>=VALUE
    has:KEY                       the label is set (has:obs: a large observation is stored)

A comparison is numeric when both the label's value and VALUE are decimal numbers
(``names.LABEL_NUMBER_RE``), else it compares the strings by code point; a snapshot without
the label matches no comparison. ``--sort [-]KEY`` orders by a label (numbers before other strings,
snapshots without it last, ties by id); without it the ids come in id order.

Any caller may send ``find`` (docs/security.md), so what one command costs is bounded by what
it asks, not by how long it is: at most ``MAX_PREDICATES`` predicates, a predicate given twice
is tested once, and the predicates on one key test each candidate's value in one pass.
"""

from __future__ import annotations

import heapq
import json
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .catalog import AFTER_TEXT, NUMBER_TAG, TEXT_TAG, number_bytes
from .errors import InvalidArgumentError
from .names import (
    LABEL_KEY_PATTERN,
    check_label_value,
    check_snapshot_id,
    label_number,
)

if TYPE_CHECKING:
    import lmdb

    from .catalog import Catalog, SnapshotRecord

# A label named this is the observation's place (``commit ... obs=@/path``), never a label.
OBS_KEY = "obs"
_COMPARISON_RE = re.compile(rf"({LABEL_KEY_PATTERN})(<=|>=|!=|=|<|>)(.*)", re.DOTALL)
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
MAX_LIMIT = 1 << 31
# A search asks a handful; a 64 KiB command held 6,500, which cost 17.8 s at 3,000 snapshots.
MAX_PREDICATES = 64


@dataclass(frozen=True, slots=True)
class Predicate:
    """One ``find`` condition on a label (``op`` None: ``has:key``)."""

    key: str
    op: str | None = None
    value: str = ""

    def word(self) -> str:
        return f"has:{self.key}" if self.op is None else f"{self.key}{self.op}{self.value}"

    def matcher(self) -> Callable[[str | None], bool]:
        """Whether a label's value (None: no such label) satisfies the predicate."""
        return all_hold([self])


def all_hold(predicates: Iterable[Predicate]) -> Callable[[str | None], bool]:
    """Whether a label's value (None: no such label) satisfies every one of ``predicates``,
    all on that label's key. Right-hand sides are parsed once, and each value once, as a
    query may test thousands of values."""
    tests = [(_OPERATORS[p.op], p.value, label_number(p.value)) for p in predicates if p.op]

    def holds(actual: str | None) -> bool:
        if actual is None:
            return False
        left = label_number(actual) if tests else None
        for compare, text, number in tests:
            numeric = left is not None and number is not None
            if not (compare(left, number) if numeric else compare(actual, text)):
                return False
        return True

    return holds


def by_key(predicates: Iterable[Predicate]) -> dict[str, list[Predicate]]:
    """The distinct ``predicates``, grouped by label key in the order the keys first come."""
    groups: dict[str, list[Predicate]] = {}
    for p in dict.fromkeys(predicates):
        groups.setdefault(p.key, []).append(p)
    return groups


def parse_predicate(word: str) -> Predicate:
    """A predicate word, or EINVAL naming it."""
    if word.startswith("has:"):
        key = word[4:]
        if not re.fullmatch(LABEL_KEY_PATTERN, key):
            raise InvalidArgumentError(f"invalid predicate {word[:80]!r}: has: takes a label key")
        return Predicate(key)
    match = _COMPARISON_RE.fullmatch(word)
    if match is None:
        raise InvalidArgumentError(
            f"invalid predicate {word[:80]!r}: expected KEY<op>VALUE (op one of "
            f"{' '.join(_OPERATORS)}) or has:KEY"
        )
    key, op, value = match.groups()
    if key == OBS_KEY:
        raise InvalidArgumentError("the observation is no label: ask has:obs")
    return Predicate(key, op, check_label_value(key, value))


def label_matcher(words: list[str]) -> Callable[[dict[str, str], bool], bool]:
    """Whether a snapshot's labels, and whether it has a large observation (``has:obs``),
    satisfy every predicate word (``find``'s syntax), for lists the catalog's indexes do not
    hold, such as a remote's snapshots."""
    _check_count(len(words))
    checks = [(key, all_hold(ps)) for key, ps in by_key(map(parse_predicate, words)).items()]

    def match(labels: dict[str, str], has_obs: bool) -> bool:
        # obs is no label key (``parse_predicate``): a predicate on it is has:obs
        return all(has_obs if key == OBS_KEY else holds(labels.get(key)) for key, holds in checks)

    return match


@dataclass(frozen=True, slots=True)
class FindQuery:
    """A parsed ``find``: predicates, the sort key (``descending``: ``-key``), a limit, and at
    most one of ``parent`` (its children only) and ``ancestor`` (its descendants only)."""

    predicates: tuple[Predicate, ...] = ()
    sort: str | None = None
    descending: bool = False
    limit: int | None = None
    parent: str | None = None
    ancestor: str | None = None

    def words(self) -> list[str]:
        """The query as ctl words (``parse_find`` gives it back)."""
        out = [p.word() for p in self.predicates]
        if self.sort is not None:
            out += ["--sort", ("-" if self.descending else "") + self.sort]
        if self.limit is not None:
            out += ["--limit", str(self.limit)]
        if self.parent is not None:
            out += ["--parent", self.parent]
        if self.ancestor is not None:
            out += ["--ancestor", self.ancestor]
        return out


def parse_find(words: list[str]) -> FindQuery:
    """``find``'s words after the verb: predicates and options in any order."""
    predicates: list[Predicate] = []
    options: dict[str, str] = {}
    rest = iter(words)
    for word in rest:
        if word in ("--sort", "--limit", "--parent", "--ancestor"):
            if word in options:
                raise InvalidArgumentError(f"find: {word} given twice")
            value = next(rest, None)
            if value is None:
                raise InvalidArgumentError(f"find: {word} needs a value")
            options[word] = value
        elif word.startswith("--"):
            raise InvalidArgumentError(f"find: unknown option {word[:40]!r}")
        else:
            _check_count(len(predicates) + 1)
            predicates.append(parse_predicate(word))
    if "--parent" in options and "--ancestor" in options:
        raise InvalidArgumentError("find: give --parent or --ancestor, not both")
    sort, descending = options.get("--sort"), False
    if sort is not None:
        descending = sort.startswith("-")
        sort = sort[1:] if descending else sort
        if not re.fullmatch(LABEL_KEY_PATTERN, sort) or sort == OBS_KEY:
            raise InvalidArgumentError(f"find: --sort takes [-]KEY, a label key: {sort[:80]!r}")
    limit = None
    if "--limit" in options:
        text = options["--limit"]
        if not text.isdigit() or not text.isascii() or int(text) > MAX_LIMIT:
            raise InvalidArgumentError(f"find: --limit takes a count, 0..{MAX_LIMIT}: {text!r}")
        limit = int(text)
    return FindQuery(
        tuple(predicates),
        sort,
        descending,
        limit,
        check_snapshot_id(options["--parent"]) if "--parent" in options else None,
        check_snapshot_id(options["--ancestor"]) if "--ancestor" in options else None,
    )


def _check_count(predicates: int) -> None:
    if predicates > MAX_PREDICATES:
        raise InvalidArgumentError(
            f"find: too many predicates: {predicates} or more, at most {MAX_PREDICATES}"
        )


# ----------------------------------------------------------------------------------------
# running a query inside one read transaction
# ----------------------------------------------------------------------------------------
def descendants(catalog: Catalog, txn: lmdb.Transaction, id: str) -> set[str]:
    """Every snapshot below ``id`` in the snapshot tree (``id`` itself not included)."""
    found: set[str] = set()
    queue = deque([id])
    while queue:
        for child in catalog.children(txn, queue.popleft()):
            if child not in found:  # a record cannot name its own descendant, yet stay finite
                found.add(child)
                queue.append(child)
    return found


def parent_loops(starts: Iterable[str], parent_of: Callable[[str], str | None]) -> list[list[str]]:
    """Each loop of parent links reached from ``starts`` (``parent_of``: a snapshot's parent,
    None for none or unknown) once, as the ids along it and the first again. Every snapshot
    is followed once, whatever the number of starts: linear in the snapshots walked."""
    loops = []
    done: set[str] = set()
    for start in starts:
        path: list[str] = []
        on_path: set[str] = set()
        cur: str | None = start
        while cur is not None and cur not in done and cur not in on_path:
            path.append(cur)
            on_path.add(cur)
            cur = parent_of(cur)
        if cur is not None and cur in on_path:
            loops.append([*path[path.index(cur) :], cur])
        done.update(path)
    return loops


# Above this many candidates a label's values are read by one scan of its index entries,
# below it by one lookup per candidate.
SCAN_ABOVE = 256


def find(catalog: Catalog, txn: lmdb.Transaction, query: FindQuery) -> list[str]:
    """The ids ``query`` selects, in its order (NotFoundError for a missing --parent or
    --ancestor).

    With ``--sort`` and ``--limit`` the sort key's ordered index drives: entries come in the
    asked order and the query stops at the limit, whatever the store's size. Otherwise the
    first label predicate gives the candidates (a range of the ordered index when it compares
    with a number, else its key's index entries), the others filter them."""
    scope: set[str] | None = None
    if query.parent is not None:
        scope = set(catalog.children_or_orphans(txn, query.parent))
    elif query.ancestor is not None:
        catalog.children_or_orphans(txn, query.ancestor)  # NotFoundError if nothing at all
        scope = descendants(catalog, txn, query.ancestor)
    distinct = list(dict.fromkeys(query.predicates))  # a predicate given twice is tested once
    labelled = [p for p in distinct if p.key != OBS_KEY or p.op is not None]
    wants_obs = len(labelled) < len(distinct)
    small_scope = scope is not None and len(scope) <= SCAN_ABOVE
    if query.sort is not None and query.limit is not None and not small_scope:
        return _first_in_order(catalog, txn, query, labelled, wants_obs, scope)
    scanned: dict[str, dict[str, str]] = {}  # label key -> {id: value}, read whole

    def values(key: str, ids: list[str]) -> dict[str, str]:
        if key in scanned:
            return scanned[key]
        if len(ids) > SCAN_ABOVE:
            scanned[key] = dict(catalog.labelled(txn, key))
            return scanned[key]
        return {id: v for id in ids if (v := catalog.label(txn, key, id)) is not None}

    if labelled:
        first, rest = labelled[0], labelled[1:]
        ranges = [p for p in labelled if p.key == first.key and _bounds(p) is not None]
        if first in ranges:  # every range on the first key: one scan of their intersection
            rest = [p for p in labelled if p not in ranges]
            in_range = _in_ranges(catalog, txn, first.key, ranges)
            candidates = sorted(id for id in in_range if scope is None or id in scope)
        else:
            first_values = scanned[first.key] = dict(catalog.labelled(txn, first.key))
            holds = first.matcher()
            candidates = [
                id
                for id, value in first_values.items()
                if (scope is None or id in scope) and holds(value)
            ]
    else:
        candidates = sorted(scope) if scope is not None else catalog.snapshot_ids(txn)
        rest = []
    for key, ps in by_key(rest).items():  # one pass a key, whatever its predicates
        holds, known = all_hold(ps), values(key, candidates)
        candidates = [id for id in candidates if holds(known.get(id))]
    if wants_obs:
        candidates = [id for id in candidates if catalog.snapshot(txn, id).obs is not None]
    if query.sort is not None:
        known = values(query.sort, candidates)
        candidates = _sorted_by_label(candidates, known, query.descending, query.limit)
    return candidates if query.limit is None else candidates[: query.limit]


def _bounds(p: Predicate) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]] | None:
    """The [low, high) sort bytes of the values satisfying ``p``: among the label's numbers,
    and among its other values (compared as text). None when ``p`` is no such range
    (``has:``, ``!=``, a comparison with a word: numbers then compare as text)."""
    number = label_number(p.value)
    if p.op is None or p.op == "!=" or number is None:
        return None
    at = NUMBER_TAG + number_bytes(number)
    text = TEXT_TAG + p.value.encode()
    after_at, after_text = at + b"\1", text + b"\1"  # past every "<at>\0<id>"
    return {
        "<": ((NUMBER_TAG, at), (TEXT_TAG, text)),
        "<=": ((NUMBER_TAG, after_at), (TEXT_TAG, after_text)),
        ">": ((after_at, TEXT_TAG), (after_text, AFTER_TEXT)),
        ">=": ((at, TEXT_TAG), (text, AFTER_TEXT)),
        "=": ((at, after_at), (text, after_text)),
    }[p.op]


def _in_ranges(
    catalog: Catalog, txn: lmdb.Transaction, key: str, ranges: list[Predicate]
) -> list[str]:
    """The ids whose label ``key`` satisfies every predicate of ``ranges`` (each with
    ``_bounds``): the intersection of their intervals, read from the ordered index."""
    bounds = [b for p in ranges if (b := _bounds(p)) is not None]
    out: list[str] = []
    for region in (0, 1):
        low = max(b[region][0] for b in bounds)
        high = min(b[region][1] for b in bounds)
        if low < high:
            out += [id for _, id in catalog.ordered(txn, key, low, high, descending=False)]
    return out


def _first_in_order(
    catalog: Catalog,
    txn: lmdb.Transaction,
    query: FindQuery,
    labelled: list[Predicate],
    wants_obs: bool,
    scope: set[str] | None,
) -> list[str]:
    """``find`` with ``--sort`` and ``--limit``: walk the sort key's ordered index (numbers,
    then other values, then the snapshots without the label) and keep the first ``limit``
    snapshots that pass every predicate."""
    assert query.sort is not None and query.limit is not None
    checks = [(key, all_hold(ps)) for key, ps in by_key(labelled).items()]
    out: list[str] = []

    def passes(id: str) -> bool:
        return (
            (scope is None or id in scope)
            and all(holds(catalog.label(txn, key, id)) for key, holds in checks)
            and (not wants_obs or catalog.snapshot(txn, id).obs is not None)
        )

    for ids in _ordered_ties(catalog, txn, query.sort, query.descending):
        for id in ids:
            if len(out) == query.limit:
                return out
            if passes(id):
                out.append(id)
    if len(out) < query.limit:
        has_sort_key = {id for id, _ in catalog.labelled(txn, query.sort)}
        pool = sorted(scope) if scope is not None else catalog.snapshot_ids(txn)
        for id in pool:
            if len(out) == query.limit:
                break
            if id not in has_sort_key and passes(id):
                out.append(id)
    return out


def _ordered_ties(
    catalog: Catalog, txn: lmdb.Transaction, key: str, descending: bool
) -> Iterator[list[str]]:
    """Label ``key``'s snapshot ids in sort order, numbers before other values in either
    direction, each run of equal values as one list sorted by id."""
    for low, high in ((NUMBER_TAG, TEXT_TAG), (TEXT_TAG, AFTER_TEXT)):
        run: list[str] = []
        value = b""
        for sort_key, id in catalog.ordered(txn, key, low, high, descending=descending):
            if run and sort_key != value:
                yield sorted(run)
                run = []
            value = sort_key
            run.append(id)
        if run:
            yield sorted(run)


def _sorted_by_label(
    ids: list[str], known: dict[str, str], descending: bool, limit: int | None
) -> list[str]:
    """``ids`` ordered by their values in ``known``: numbers (by value), then other values
    (by code point), then ids without one; ties by id. Only the first ``limit`` are sorted."""
    numbers: list[tuple[float, str]] = []
    texts: list[tuple[str, str]] = []
    missing: list[str] = []
    sign = -1.0 if descending else 1.0
    for id in ids:
        value = known.get(id)
        number = label_number(value) if value is not None else None
        if value is None:
            missing.append(id)
        elif number is not None:
            numbers.append((sign * number, id))
        else:
            texts.append((value, id))
    want = len(ids) if limit is None else limit
    out = [id for _, id in heapq.nsmallest(want, numbers)]
    if len(out) < want:
        # ties by id in both directions: the same query always answers in the same order
        texts.sort(key=lambda item: item[1])
        texts.sort(key=lambda item: item[0], reverse=descending)
        out += [id for _, id in texts] + sorted(missing)
    return out


# ----------------------------------------------------------------------------------------
# the episode export
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Episode:
    """One line of ``MNT/episodes``."""

    id: str
    parent: str | None
    created_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    files: int = 0
    size: int = 0
    root: str = ""
    obs: int | None = None

    def record(self, created: str) -> dict:
        return {
            "id": self.id,
            "parent": self.parent,
            "created": created,
            "created_ns": self.created_ns,
            "labels": self.labels,
            "files": self.files,
            "size": self.size,
            "root": self.root,
            "obs": self.obs,
        }


def episode_of(id: str, rec: SnapshotRecord) -> Episode:
    return Episode(
        id,
        rec.parent,
        rec.created_ns,
        dict(rec.labels),
        rec.files,
        rec.size,
        rec.root,
        rec.obs.size if rec.obs is not None else None,
    )


def episode_lines(episodes: Iterable[Episode], iso_time: Callable[[int], str]) -> Iterator[bytes]:
    """JSON Lines, oldest first (ties by id), as ``MNT/episodes`` serves them: ASCII, so a
    label's C1 controls, U+2028 or U+202E reach no reader raw (JSON escapes them)."""
    for ep in sorted(episodes, key=lambda e: (e.created_ns, e.id)):
        yield json.dumps(ep.record(iso_time(ep.created_ns))).encode("ascii") + b"\n"
