"""The merge plan as a pure function of a chain's spans (``merge_plan.py``): replaying it the
way background merges do, after every commit, keeps a lineage shaped like a counter in base F,
whatever F and however long the lineage."""

from __future__ import annotations

from hypothesis import given, strategies as st

from cascowfs import merge_plan
from cascowfs.merge_plan import Merge

from conftest import hypothesis_settings


def _merged(spans: list[int], fan_in: int, merge_all_above: int = 10**9) -> list[int]:
    """Apply merges until the plan says there is nothing to merge."""
    while True:
        count, span = merge_plan.plan(spans, fan_in, merge_all_above)
        if count < 2:
            return spans
        spans = [span] + spans[count:]


@hypothesis_settings(200)
@given(fan_in=st.integers(min_value=2, max_value=9),
       commits=st.integers(min_value=0, max_value=400))
def test_a_lineage_merged_after_every_commit_is_the_counter_of_its_commits(fan_in, commits):
    spans = [0]  # the imported full layer
    for _ in range(commits):
        spans = _merged([1] + spans, fan_in)
    assert spans == merge_plan.counter_spans(commits, fan_in) + [0]
    positions, n = 0, commits
    while n:
        n //= fan_in
        positions += 1
    assert len(spans) - 1 <= (fan_in - 1) * positions  # at most (F - 1) log_F(n) + 1 deep


@hypothesis_settings(200)
@given(spans=st.lists(st.integers(min_value=0, max_value=64), max_size=30),
       fan_in=st.integers(min_value=2, max_value=9))
def test_a_merge_takes_only_equal_delta_layers_from_the_top_and_keeps_their_span(spans, fan_in):
    count, span = merge_plan.counter_merge(spans, fan_in)
    if count == 0:
        assert span == 0
        return
    assert count >= fan_in and all(s == spans[0] for s in spans[:count]) and spans[0] > 0
    assert span == sum(spans[:count])  # the merged layer covers exactly the commits it took


@hypothesis_settings(100)
@given(n=st.integers(min_value=0, max_value=10**6), fan_in=st.integers(min_value=2, max_value=9))
def test_the_counters_spans_add_up_to_its_commits_with_fewer_than_fan_in_of_each(n, fan_in):
    spans = merge_plan.counter_spans(n, fan_in)
    assert sum(spans) == n and spans == sorted(spans)
    assert all(spans.count(s) < fan_in for s in set(spans))


@hypothesis_settings(200)
@given(deltas=st.lists(st.integers(min_value=1, max_value=64), max_size=40),
       below=st.lists(st.integers(min_value=0, max_value=64), max_size=5))
def test_deltas_on_top_stop_at_the_first_full_layer(deltas, below):
    spans = deltas + [0] + below
    assert merge_plan.deltas_on_top(spans) == Merge(len(deltas), sum(deltas))


@hypothesis_settings(200)
@given(depth=st.integers(min_value=0, max_value=80), limit=st.integers(min_value=2, max_value=70),
       fan_in=st.integers(min_value=2, max_value=9))
def test_a_chain_deeper_than_the_limit_is_merged_whole(depth, limit, fan_in):
    spans = [1] * depth + [0]
    plan = merge_plan.plan(spans, fan_in, limit)
    if len(spans) > limit:
        assert plan == Merge(depth, depth)
    else:
        assert plan == merge_plan.counter_merge(spans, fan_in)


def test_nothing_is_merged_into_a_full_layer_or_an_empty_chain():
    assert merge_plan.plan([], 2, 64) == merge_plan.NOTHING
    assert merge_plan.plan([0, 0, 0], 2, 64) == merge_plan.NOTHING
    assert merge_plan.plan([1, 0], 2, 64) == merge_plan.NOTHING
    assert merge_plan.plan([1, 1, 0], 2, 64) == Merge(2, 2)
