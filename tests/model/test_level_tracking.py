"""The base-rate tracker bench/multi_world.py evaluates (bench/level_tracking.py): a
stationary window must fall back to its overall rate, a real drift must be followed to the
next day."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from scipy.special import expit, logit

sys.path.insert(0, str(REPO_ROOT / "bench"))
from level_tracking import tracked_base_rate_log_odds  # noqa: E402


def test_stationary_days_give_the_overall_rate() -> None:
    positives, rows = np.array([300, 280, 290, 310, 295, 305, 280]), np.full(7, 30_000)
    level = tracked_base_rate_log_odds(positives, rows, 7.0)
    assert expit(level) == pytest.approx(positives.sum() / rows.sum(), rel=0.01)


def test_a_clear_drift_is_extrapolated_to_the_next_day() -> None:
    rows = np.full(7, 200_000)
    expected = expit(logit(0.01) + 0.1 * np.arange(8))
    positives = np.round(rows * expected[:7])
    level = tracked_base_rate_log_odds(positives, rows, 7.0)
    assert expit(level) == pytest.approx(expected[7], rel=0.02)
    assert expit(level) > positives[-1] / rows[-1]


def test_days_without_both_classes_are_ignored_and_two_days_pool() -> None:
    level = tracked_base_rate_log_odds(np.array([0, 20, 40]), np.array([0, 10_000, 10_000]), 3.0)
    assert expit(level) == pytest.approx(60 / 20_000)
