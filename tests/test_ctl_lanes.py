"""The lanes of ``ctl`` as the daemon hands them out (cascowfs/fuse/ctl_lanes.py), on a clock
the test moves: which lookup gets which lane, and when a lane is free again. The same rules on a
real mount, with agents racing to open ``ctl``, are in test_fuse_control.py."""

from __future__ import annotations

import itertools

from cascowfs.fuse.ctl_lanes import MAX_PROMISED, PROMISE_SECONDS, CtlLanes
from cascowfs.fuse.inodes import CtlNode, Node

AGENT_A, AGENT_B = 101, 202


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lanes_on(clock: Clock) -> CtlLanes:
    root = Node(1, name=b"", parent=None)
    inos = itertools.count(100)
    return CtlLanes(CtlNode(2, name=b"ctl", parent=root), lambda: next(inos), root, clock)


def test_agents_looking_up_together_get_lanes_of_their_own():
    lanes = lanes_on(Clock())
    a, b = lanes.for_lookup(AGENT_A), lanes.for_lookup(AGENT_B)  # both before either opens
    assert a is not b
    lanes.opened(a)
    lanes.opened(b)
    assert a.opens == b.opens == 1


def test_the_thread_a_lane_was_promised_to_gets_it_again():
    """The kernel looks ``ctl`` up twice when the lane differs from the inode it cached."""
    lanes = lanes_on(Clock())
    busy = lanes.for_lookup(AGENT_A)
    lanes.opened(busy)
    first = lanes.for_lookup(AGENT_B)
    assert first is not busy
    assert lanes.for_lookup(AGENT_B) is first
    assert lanes.for_lookup(AGENT_A) is not first  # promised to B, not free for A


def test_a_lookup_without_an_open_holds_its_lane_for_a_while_only():
    clock = Clock()
    lanes = lanes_on(clock)
    looked = lanes.for_lookup(AGENT_A)  # a stat: no open follows
    for agent in (AGENT_B, 303):  # two agents open ctl and keep it open
        lane = lanes.for_lookup(agent)
        assert lane is not looked
        lanes.opened(lane)
    clock.now += PROMISE_SECONDS + 0.01
    assert lanes.for_lookup(404) is looked


def test_one_thread_at_a_time_keeps_reusing_one_lane():
    lanes = lanes_on(Clock())
    seen = set()
    for _ in range(5):
        lane = lanes.for_lookup(AGENT_A)
        lanes.opened(lane)
        lanes.closed(lane)
        seen.add(lane.ino)
        seen.add(lanes.for_lookup(AGENT_A).ino)  # a stat in between
    assert seen == {2}


def test_a_closed_lane_is_free_for_any_thread():
    lanes = lanes_on(Clock())
    lane = lanes.for_lookup(AGENT_A)
    lanes.opened(lane)
    lanes.closed(lane)
    assert lanes.for_lookup(AGENT_B) is lane


def test_a_lookup_storm_reuses_promised_lanes_past_the_cap():
    lanes = lanes_on(Clock())
    handed = [lanes.for_lookup(pid) for pid in range(1, 3 * MAX_PROMISED)]
    assert len({lane.ino for lane in handed}) == MAX_PROMISED
    assert handed[MAX_PROMISED] is handed[0]  # the lane promised first, promised again
