"""Which layers of a snapshot's chain a background merge folds into one: a pure function of
the chain's spans (top first; a span counts the commits a delta layer covers, 0 marks a full
layer, which nothing is merged into).

Delta layers merge like a counter in base F (``Tuning.merge_fan_in``): once the top F layers
all have span s, they merge into one of span F * s, taking along any run of F - 1 layers of
that span right under them (a carry), and so on. So a lineage of n commits is shown by at
most (F - 1) log_F(n) + 1 delta layers, and the store holds each change log_F(n) times
instead of every commit copying everything its branch ever changed. A chain deeper than
``merge_all_above`` (left by merges that fell behind fast lineages) has all its delta layers
merged into one: the counter alone never shortens it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Merge(NamedTuple):
    layers: int  # how many top layers merge into one (below 2: nothing to merge)
    span: int  # the merged layer's span


NOTHING = Merge(0, 0)


def counter_merge(spans: Sequence[int], fan_in: int) -> Merge:
    """The counter's carry on a chain of these spans."""
    span = spans[0] if spans else 0
    if not span:
        return NOTHING
    count, group = 0, fan_in
    while count + group <= len(spans) and all(s == span for s in spans[count : count + group]):
        count += group
        span *= fan_in
        group = fan_in - 1  # the merged layer is the carry's first member
    return Merge(count, span) if count else NOTHING


def deltas_on_top(spans: Sequence[int]) -> Merge:
    """Every delta layer on the chain's first full layer, merged into one."""
    count = 0
    while count < len(spans) and spans[count]:
        count += 1
    return Merge(count, sum(spans[:count]))


def counter_spans(commits: int, fan_in: int) -> list[int]:
    """The delta spans (top first) a lineage of ``commits`` settles to once every merge has
    run: one layer of fan_in**k for each unit of digit k of ``commits`` in base ``fan_in``."""
    spans, power = [], 1
    while commits:
        spans += [power] * (commits % fan_in)
        commits //= fan_in
        power *= fan_in
    return spans


def plan(spans: Sequence[int], fan_in: int, merge_all_above: int) -> Merge:
    """What the next merge of a chain of these spans does."""
    if len(spans) > merge_all_above:
        return deltas_on_top(spans)
    return counter_merge(spans, fan_in)
