"""The daemon's metrics in Prometheus' text exposition format: what ``MNT/metrics`` serves.

They live in a ``CollectorRegistry`` of the daemon's own, not in prometheus_client's global
one, so that a process embedding several StateManagers (the tests do) never mixes two stores'
figures, and nothing a library registers globally leaks into a scrape.

Two kinds of figures, kept apart by what they cost:

* What happens, counted as it happens: each operation's latency in a histogram by op and
  result, failed operations by errno. An operation costs one histogram observation (a few
  microseconds against the milliseconds of the operation); a FUSE request, far more
  frequent, costs one increment of a plain dict entry on the FUSE thread, turned into a
  counter family only when a scrape asks.
* What is, read when a scrape asks (``StoreCollector``): the counts of branches, snapshots and
  layers (LMDB keeps each database's entry count: O(1)), merges waiting, the store's bytes.
  The logical bytes are the sum of every snapshot's size; snapshots never change size, so the
  sizes are remembered by id and a scrape decodes only the records of snapshots new since the
  last one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .state import StateManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# From a rebase of an idle branch (~1 ms) to an import of a large tree (minutes).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class DaemonMetrics:
    """The metrics of one daemon over one store."""

    def __init__(self, sm: StateManager) -> None:
        # A ``_created`` series beside every counter and histogram would double a scrape's
        # size; Prometheus reads the start of a counter from its resets, not from those.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.operation_seconds = Histogram(
            "cascowfs_operation_seconds",
            "Latency of the operations run through the file interface, by op and result "
            "(ok or the errno's name).",
            ["op", "result"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = PromCounter(
            "cascowfs_errors",
            "Operations that failed, by the errno they failed with.",
            ["errno"],
            registry=self.registry,
        )
        # Incremented by the FUSE thread alone, read (copied whole) by a scrape.
        self.fuse_requests: Counter[str] = Counter()
        self.store = StoreCollector(sm, self.fuse_requests)
        self.registry.register(self.store)

    def observe(self, op: str, result: str, seconds: float) -> None:
        self.operation_seconds.labels(op, result).observe(seconds)
        if result != "ok":
            self.errors.labels(result).inc()

    def exposition(self) -> bytes:
        """Every metric, in the text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)


class StoreCollector(Collector):
    """The figures read from the store when a scrape asks."""

    def __init__(self, sm: StateManager, fuse_requests: Counter[str]) -> None:
        self.sm = sm
        self.fuse_requests = fuse_requests
        self._sizes: dict[str, int] = {}  # snapshot id -> size (snapshots never change size)
        self._sizes_lock = threading.Lock()  # two scrapes at once

    def collect(self) -> Iterator[Metric]:
        sm = self.sm
        with sm.db.read() as txn:
            branches = sm.catalog.branch_count(txn)
            snapshots = sm.catalog.snapshot_count(txn)
            layers = sm.catalog.layer_count(txn)
            stored = sm.db.bytes_used(txn, "objects")
            logical = self._logical_bytes(txn)
        yield GaugeMetricFamily("cascowfs_branches", "Live branches.", value=branches)
        yield GaugeMetricFamily("cascowfs_snapshots", "Snapshots in the store.", value=snapshots)
        yield GaugeMetricFamily(
            "cascowfs_layers", "Layer directories recorded (full and delta).", value=layers
        )
        yield GaugeMetricFamily(
            "cascowfs_pending_merges",
            "Layer merges queued in the background and not started yet.",
            value=sm.pending_merges(),
        )
        store = GaugeMetricFamily(
            "cascowfs_store_bytes",
            "Bytes of every snapshot's files (logical) and of the object database that holds "
            "them, deduplicated and compressed (stored).",
            labels=["kind"],
        )
        store.add_metric(["logical"], logical)
        store.add_metric(["stored"], stored)
        yield store
        yield GaugeMetricFamily(
            "cascowfs_dedup_ratio",
            "Logical bytes per stored byte (deduplication and compression together; 0 while "
            "nothing is stored).",
            value=logical / stored if stored else 0.0,
        )
        yield CounterMetricFamily(
            "cascowfs_wal_replays",
            "Unfinished operations the write-ahead log replay settled when the daemon opened "
            "the store.",
            value=sm.wal.replayed,
        )
        requests = CounterMetricFamily(
            "cascowfs_fuse_requests", "FUSE requests answered, by operation.", labels=["op"]
        )
        for op, count in sorted(dict(self.fuse_requests).items()):
            requests.add_metric([op], count)
        yield requests

    def forget_snapshot(self, id: str) -> None:
        """Snapshot ``id`` was pruned: a new one may take its id, with another size."""
        with self._sizes_lock:
            self._sizes.pop(id, None)

    def _logical_bytes(self, txn) -> int:
        catalog = self.sm.catalog
        with self._sizes_lock:
            ids = set(catalog.snapshot_ids(txn))
            for gone in self._sizes.keys() - ids:
                del self._sizes[gone]
            for new in ids - self._sizes.keys():
                self._sizes[new] = catalog.snapshot(txn, new).size
            return sum(self._sizes.values())
