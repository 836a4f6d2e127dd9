"""Shared fixtures: long-lived gloo rank pools and hypothesis profiles.

Profiles: ``default`` (fast, CI) and ``thorough`` (``pytest --hypothesis-profile thorough``).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("default")


@pytest.fixture(scope="session")
def rank_pools():
    from .dist import RankPool

    pools: dict[int, RankPool] = {}

    def get(cp: int) -> RankPool:
        if cp not in pools:
            pools[cp] = RankPool(cp)
        return pools[cp]

    yield get
    for pool in pools.values():
        pool.close()
