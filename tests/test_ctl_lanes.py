"""The lanes of ``ctl`` as the daemon hands them out (cascowfs/fuse/ctl_lanes.py), on a clock
the test moves: which lookup gets which lane, and when a lane is free again. The same rules on a
real mount, with agents racing to open ``ctl``, are in test_fuse_control.py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from cascowfs.fuse.ctl_lanes import MAX_IDLE, MAX_PROMISED, PROMISE_SECONDS, CtlLanes
from cascowfs.fuse.inodes import CTL_INO, ROOT_INO, CtlNode, InodeTable, Node, SkeletonNode

AGENT_A, AGENT_B = 101, 202


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lanes_on(clock: Clock, inos: Iterator[int] | None = None) -> CtlLanes:
    """Lanes whose new inodes are numbered by ``inos`` (from 100 if None)."""
    root = Node(1, name=b"", parent=None)
    numbers = itertools.count(100) if inos is None else inos
    return CtlLanes(CtlNode(2, name=b"ctl", parent=root), lambda: next(numbers), root, clock)


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


def test_a_thread_handed_another_lane_gives_its_earlier_one_back():
    """A thread opens the lane it looked up last, so the one it was promised before is free
    for others at once, not a second later."""
    lanes = lanes_on(Clock())
    earlier = lanes.for_lookup(AGENT_A)
    other = lanes.for_lookup(AGENT_B)
    lanes.opened(other)
    lanes.closed(other)  # B's command is done
    assert lanes.for_lookup(AGENT_A) is other  # the lane the kernel caches now
    assert lanes.for_lookup(303) is earlier  # not a new lane


def test_the_lanes_of_a_burst_of_opens_are_dropped_once_closed():
    """Any user may hold as many opens of ``ctl`` at once as its fd limits allow: the lanes
    they took were kept for good, and every contended lookup of ``ctl`` went through all of
    them on the trio thread."""
    clock = Clock()
    allocated = itertools.count(100)
    lanes = lanes_on(clock, allocated)
    burst = []
    for pid in range(1, 2001):
        lane = lanes.for_lookup(pid)
        lanes.opened(lane)
        burst.append(lane)
    assert len({lane.ino for lane in burst}) == 2000
    for lane in burst:
        lanes.closed(lane)
    clock.now += PROMISE_SECONDS + 0.01
    assert lanes.kept <= MAX_IDLE + 1  # the first lane, ``ctl`` itself, is always kept
    made = next(allocated)
    held = lanes.for_lookup(AGENT_A)  # two agents at once, as before the burst
    lanes.opened(held)
    for _ in range(100):
        lane = lanes.for_lookup(AGENT_B)
        assert lane is not held
        lanes.opened(lane)
        lanes.closed(lane)
    assert next(allocated) == made + 1  # the lanes kept served them all
    assert lanes.kept <= MAX_IDLE + 1


def test_a_dropped_lane_stays_known_until_the_kernel_forgets_it():
    """The kernel may still cache a lane dropped from the pool, and open it again (through
    ``/proc/<pid>/fd``, say): its node lives in the inode table until its ``forget``."""
    table = InodeTable()
    root = table.add_pinned(SkeletonNode(ROOT_INO))
    first = table.add_pinned(CtlNode(CTL_INO, name=b"ctl", parent=root))
    lanes = CtlLanes(first, table.allocate, root, Clock())
    burst = []
    for pid in range(1, 3 * MAX_IDLE):
        lane = lanes.for_lookup(pid)
        table.looked_up(lane)  # as ``lookup`` does
        lanes.opened(lane)
        burst.append(lane)
    for lane in burst:
        lanes.closed(lane)
    assert lanes.kept <= MAX_IDLE + 1
    assert all(table.get(lane.ino) is lane for lane in burst)
    dropped = burst[-1]  # closed when MAX_IDLE lanes were idle already
    lanes.opened(dropped)
    assert dropped.opens == 1
    lanes.closed(dropped)
    assert lanes.kept <= MAX_IDLE + 1
    for lane in burst:
        table.forget(lane.ino, 1)
    assert len(table) == 2  # the mount root and ``ctl``
    lane = lanes.for_lookup(AGENT_A)
    table.looked_up(lane)
    assert table.get(lane.ino) is lane
