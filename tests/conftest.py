"""Shared fixtures: long-lived gloo rank pools and hypothesis profiles.

Profiles (``max_examples`` M; tests/test_fuzz.py draws M cases at CP 1, 3M / 4 per multi-rank CP size and M // 10
per Ulysses x ring split):

* ``default`` (CI): M = 40, derandomized — every run draws the same cases, so a red CI is reproducible as is.
* ``thorough`` (``pytest tests/test_fuzz.py --hypothesis-profile thorough``): M = 200, randomized. Unless
  ``--hypothesis-seed`` is given, a seed is drawn and printed in the header and the summary; rerunning with
  ``--hypothesis-profile thorough --hypothesis-seed=N`` draws the same cases again. A failure also prints its
  ``@reproduce_failure`` blob and is saved in hypothesis' example database (``.hypothesis/``) for the next run.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_SLOW_OK)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, derandomize=False, print_blob=True, suppress_health_check=_SLOW_OK
)
settings.load_profile("default")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Give a randomized thorough run a seed of its own, before hypothesis' plugin reads the option."""
    if (
        config.getoption("--hypothesis-profile", None) == "thorough"
        and config.getoption("--hypothesis-seed", None) is None
    ):
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def _seed_line(config) -> str | None:
    seed = config.getoption("--hypothesis-seed", None)
    if config.getoption("--hypothesis-profile", None) == "thorough" and seed is not None:
        return (
            f"hypothesis seed {seed}: rerun with --hypothesis-profile thorough --hypothesis-seed={seed} "
            f"to draw the same cases"
        )
    return None


def pytest_report_header(config):
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = _seed_line(config)
    if line:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def rank_pools():
    from .dist import RankPool

    pools: dict[int, RankPool] = {}

    def get(cp: int) -> RankPool:
        if cp not in pools:
            pools[cp] = RankPool(cp)
        return pools[cp]

    yield get
    for pool in pools.values():  # all pools wind down at once
        pool.stop()
    for pool in pools.values():
        pool.close()
