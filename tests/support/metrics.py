"""Reading ``MNT/metrics`` as Prometheus parses it.

``scrape(mnt)``                      every sample: (name, sorted labels) -> value
``sample(samples, name, **labels)``  one of them (0 when absent, as a counter not yet moved)
``fuse_requests(mnt)``               FUSE requests answered so far, by operation
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def scrape(mnt: Path) -> dict[tuple[str, tuple], float]:
    """Every sample of ``mnt/metrics``: (name, sorted labels) -> value."""
    text = (mnt / "metrics").read_text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def fuse_requests(mnt: Path) -> dict[str, float]:
    """FUSE requests answered so far, by operation, from one scrape."""
    return {
        dict(labels)["op"]: value
        for (name, labels), value in scrape(mnt).items()
        if name == "cascowfs_fuse_requests_total"
    }
