"""Hypothesis settings for the property tests.

``hypothesis_settings(n)``  settings for a property run of ``n`` examples (no deadline: the
                            examples mount real filesystems); ``CASCOWFS_TEST_EXAMPLES=10``
                            multiplies every ``n`` by 10 for a thorough run
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES_SCALE = float(os.environ.get("CASCOWFS_TEST_EXAMPLES", "1") or 1)
settings.register_profile(
    "cascowfs-engine", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def hypothesis_settings(max_examples: int, **kw) -> settings:
    """Settings for one property: ``max_examples`` scaled by ``CASCOWFS_TEST_EXAMPLES``."""
    return settings(settings.get_profile("cascowfs-engine"),
                    max_examples=max(1, int(max_examples * EXAMPLES_SCALE)), **kw)
