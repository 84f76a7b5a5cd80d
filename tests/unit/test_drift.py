"""The drift watch's statistics against values worked out by hand from literal shares and counts.

Every expected figure below is derived in the comment or the expression next to it (bin
counts from the data as written, PSI terms with math.log), never by calling the code under
test a second time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import small_raw_frame, write_raw

from rtb.data.make_dataset import make_dataset
from rtb.data.preprocessing import preprocess
from rtb.dataset_config import load_dataset_config
from rtb.errors import RtbError
from rtb.features import MISSING
from rtb.monitoring import (
    CategoricalLevels,
    DriftReport,
    DriftThresholds,
    NumericBins,
    QualityLimits,
    ReferenceProfile,
    build_profile,
    drift_report,
    population_stability_index,
    profile_training_window,
    quality_by_day,
    realised_quality,
    unseen_share,
)

FLOOR = 1e-4


def _term(a: float, e: float) -> float:
    """One PSI term with both shares floored, written out for the hand computations."""
    a, e = max(a, FLOOR), max(e, FLOOR)
    return (a - e) * math.log(a / e)


# --------------------------------------------------------------------------- PSI itself
def test_psi_of_two_literal_share_vectors() -> None:
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert population_stability_index([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))


def test_psi_is_zero_for_identical_shares_and_symmetric() -> None:
    shares = [0.1, 0.2, 0.3, 0.4]
    assert population_stability_index(shares, shares) == 0.0
    forward = population_stability_index([0.5, 0.5], [0.2, 0.8])
    assert forward == pytest.approx(population_stability_index([0.2, 0.8], [0.5, 0.5]))
    assert forward > 0


def test_psi_floor_bounds_an_empty_bin_and_ignores_one_empty_on_both_sides() -> None:
    # bin 3 is new in the actual shares; bin 4 is empty on both sides and adds nothing
    expected = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.1 - 1e-4) * math.log(0.1 / 1e-4)
    got = population_stability_index([0.5, 0.5, 0.0, 0.0], [0.5, 0.4, 0.1, 0.0])
    assert got == pytest.approx(expected, rel=1e-12)
    coarse = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.1 - 0.01) * math.log(0.1 / 0.01)
    got = population_stability_index([0.5, 0.5, 0.0, 0.0], [0.5, 0.4, 0.1, 0.0], floor=0.01)
    assert got == pytest.approx(coarse, rel=1e-12)


@pytest.mark.parametrize(
    "expected, actual, floor",
    [([0.5, 0.5], [1.0], 1e-4), ([], [], 1e-4), ([1.0], [1.0], 0.0), ([[1.0]], [[1.0]], 1e-4)],
)
def test_psi_rejects_bad_input(expected: list, actual: list, floor: float) -> None:
    with pytest.raises(RtbError):
        population_stability_index(expected, actual, floor)


# --------------------------------------------------------------------------- numeric bins
def _uniform_reference() -> pd.DataFrame:
    # 0, 1, ..., 99: the 10%, 20%, ... quantiles are 9, 19, ..., 89; 10 rows per bin
    return pd.DataFrame({"x": np.arange(100, dtype=np.float32)})


def test_numeric_profile_cuts_at_reference_quantiles() -> None:
    profile = build_profile(_uniform_reference(), numeric=["x"], categorical=[])
    assert profile.numeric["x"].cuts == [9.0, 19.0, 29.0, 39.0, 49.0, 59.0, 69.0, 79.0, 89.0]
    assert profile.numeric["x"].shares == pytest.approx([0.1] * 10 + [0.0])  # last: NaN bin


def test_shifted_uniform_gives_the_psi_of_its_bin_counts() -> None:
    profile = build_profile(_uniform_reference(), numeric=["x"], categorical=[])
    shifted = pd.DataFrame({"x": np.arange(100, dtype=np.float32) + 20})  # 20 .. 119
    # bins (<=9] and (9,19] get nothing; 20..89 fill bins 2..8 with 10 rows each;
    # 90..119 (30 rows) land in the open last bin (89, inf); the NaN bin is empty on both sides.
    actual = [0.0, 0.0] + [0.1] * 7 + [0.3]
    expected = sum(_term(a, 0.1) for a in actual)
    assert expected == pytest.approx(2 * (1e-4 - 0.1) * math.log(1e-4 / 0.1) + 0.2 * math.log(3))
    report = drift_report(shifted, profile)
    assert report.numeric_psi["x"] == pytest.approx(expected, rel=1e-9)


def test_identical_frame_has_no_drift() -> None:
    frame = _uniform_reference().assign(c=pd.Categorical(["a", "b"] * 50))
    profile = build_profile(frame, numeric=["x"], categorical=["c"])
    report = drift_report(frame, profile, known_levels={"c": ["a", "b"]})
    assert report.numeric_psi == {"x": 0.0}
    assert report.categorical_psi == {"c": 0.0}
    assert report.unseen_share == {"c": 0.0}
    assert not report.crossed


def test_nan_is_a_bin_of_its_own() -> None:
    # reference: 0..79 plus 20 NaN; quantiles of the 80 finite values are 7, 15, ..., 71
    values = np.r_[np.arange(80), np.full(20, np.nan)].astype(np.float32)
    profile = build_profile(pd.DataFrame({"x": values}), numeric=["x"], categorical=[])
    assert profile.numeric["x"].cuts == [7.0, 15.0, 23.0, 31.0, 39.0, 47.0, 55.0, 63.0, 71.0]
    assert profile.numeric["x"].shares == pytest.approx([0.08] * 10 + [0.2])
    # actual: 0..39 (8 rows in each of the first five bins) and 60 NaN
    actual = pd.DataFrame({"x": np.r_[np.arange(40), np.full(60, np.nan)].astype(np.float32)})
    expected = 5 * _term(0.08, 0.08) + 5 * _term(0.0, 0.08) + _term(0.6, 0.2)
    assert expected == pytest.approx(5 * (1e-4 - 0.08) * math.log(1e-4 / 0.08) + 0.4 * math.log(3))
    assert drift_report(actual, profile).numeric_psi["x"] == pytest.approx(expected, rel=1e-9)


def test_values_outside_the_reference_range_fall_in_the_outer_bins() -> None:
    bins = build_profile(_uniform_reference(), numeric=["x"], categorical=[]).numeric["x"]
    counts = bins.counts(np.array([-1000.0, -5.0, 500.0, 1e9, np.nan]))
    assert counts.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1]
    outside = pd.DataFrame({"x": np.array([-1000, -5, 500, 1e9], dtype=np.float32)})
    expected = 2 * _term(0.5, 0.1) + 8 * _term(0.0, 0.1)
    profile = ReferenceProfile(rows=100, numeric={"x": bins})
    assert drift_report(outside, profile).numeric_psi["x"] == pytest.approx(expected)


def test_heavy_ties_collapse_and_a_cut_at_the_maximum_is_dropped() -> None:
    # 55 zeros, 27 ones, 18 twos: the 10%..50% quantiles are 0, 60%..80% are 1, 90% is 2;
    # 2 is the maximum, so the cuts are [0, 1] and the bins (<=0], (0,1], (1,inf)
    values = np.r_[np.zeros(55), np.ones(27), np.full(18, 2.0)].astype(np.float32)
    bins = build_profile(pd.DataFrame({"x": values}), numeric=["x"], categorical=[]).numeric["x"]
    assert bins.cuts == [0.0, 1.0]
    assert bins.shares == pytest.approx([0.55, 0.27, 0.18, 0.0])
    # a 0/1 flag (30% zeros) keeps two bins, and 5 (above the reference max) joins the 1s
    flag = np.r_[np.zeros(30), np.ones(70)].astype(np.float32)
    bins = build_profile(pd.DataFrame({"f": flag}), numeric=["f"], categorical=[]).numeric["f"]
    assert bins.cuts == [0.0]
    assert bins.counts(np.array([0.0, -3.0, 1.0, 5.0])).tolist() == [2, 2, 0]


def test_all_nan_reference_column_has_one_nan_bin() -> None:
    frame = pd.DataFrame({"x": np.full(10, np.nan, dtype=np.float32)})
    bins = build_profile(frame, numeric=["x"], categorical=[]).numeric["x"]
    assert bins.cuts == [] and bins.shares == [0.0, 1.0]


# --------------------------------------------------------------------------- categoricals
def _categorical_reference() -> pd.DataFrame:
    levels = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5
    return pd.DataFrame({"c": pd.Categorical(levels, categories=["a", "b", "c", "d", "z"])})


def test_categorical_top_k_plus_other_with_an_unseen_level() -> None:
    profile = build_profile(_categorical_reference(), numeric=[], categorical=["c"], top_k=2)
    assert profile.categorical["c"].levels == ["a", "b"]
    assert profile.categorical["c"].shares == pytest.approx([0.5, 0.3, 0.2])  # other: c + d
    # actual: a 40, b 10, c 10, and "e" (never seen) 40: other = c + e = 50 rows
    actual = pd.DataFrame({"c": pd.Categorical(["a"] * 40 + ["b"] * 10 + ["c"] * 10 + ["e"] * 40)})
    expected = (
        (0.4 - 0.5) * math.log(0.4 / 0.5)
        + (0.1 - 0.3) * math.log(0.1 / 0.3)
        + (0.5 - 0.2) * math.log(0.5 / 0.2)
    )
    report = drift_report(actual, profile, known_levels={"c": ["a", "b", "c", "d"]})
    assert report.categorical_psi["c"] == pytest.approx(expected, rel=1e-12)
    # unseen is against the model's vocabulary, not the top-k: only "e" is unknown
    assert report.unseen_share["c"] == pytest.approx(0.4)


def test_top_k_ties_break_by_level_text_and_unused_categories_are_skipped() -> None:
    frame = pd.DataFrame({"c": pd.Categorical(["b", "b", "a", "a", "c"], categories=["z", "b", "a", "c"])})
    levels = build_profile(frame, numeric=[], categorical=["c"], top_k=3).categorical["c"]
    assert levels.levels == ["a", "b", "c"]
    assert levels.shares == pytest.approx([0.4, 0.4, 0.2, 0.0])


def test_unseen_share_is_exact_and_counts_gaps_as_the_missing_level() -> None:
    values = pd.Series(pd.Categorical(["known"] * 93 + ["new1"] * 4 + ["new2"] * 3))
    assert unseen_share(values, pd.Index(["known", "other"])) == 7 / 100
    gaps = pd.Series(pd.Categorical(["a", None, None, "b"]))
    assert unseen_share(gaps, ["a", "b"]) == 0.5
    assert unseen_share(gaps, ["a", "b", MISSING]) == 0.0
    text = pd.Series(["a", None, "x", "a"], dtype=object)  # not a Categorical: same answer
    assert unseen_share(text, {"a", MISSING}) == 0.25


# --------------------------------------------------------------------------- score
def test_score_psi_from_logit_quantile_bins() -> None:
    reference = np.linspace(0.001, 0.2, 100)  # 100 distinct scores, 10 per bin in order
    frame = pd.DataFrame({"x": np.zeros(100, dtype=np.float32)})
    profile = build_profile(frame, numeric=[], categorical=[], scores=reference)
    assert profile.score is not None and profile.score.shares == pytest.approx([0.1] * 10 + [0.0])
    assert drift_report(frame, profile, scores=reference).score_psi == 0.0
    # the top half of the reference scores, each twice: bins 5..9 hold 20% each, bins 0..4 none
    served = np.repeat(reference[50:], 2)
    expected = 5 * _term(0.0, 0.1) + 5 * _term(0.2, 0.1)
    assert expected == pytest.approx(5 * (1e-4 - 0.1) * math.log(1e-3) + 0.5 * math.log(2))
    assert drift_report(frame, profile, scores=served).score_psi == pytest.approx(expected)


def test_score_errors_are_named() -> None:
    frame = pd.DataFrame({"x": np.zeros(3, dtype=np.float32)})
    profile = build_profile(frame, numeric=["x"], categorical=[])
    with pytest.raises(RtbError, match="without scores"):
        drift_report(frame, profile, scores=np.full(3, 0.1))
    with pytest.raises(RtbError, match="probabilities"):
        build_profile(frame, numeric=[], categorical=[], scores=np.array([0.1, np.nan, 0.2]))
    with pytest.raises(RtbError, match="shape"):
        build_profile(frame, numeric=[], categorical=[], scores=np.full(2, 0.1))
    with pytest.raises(RtbError, match=r"lacks column\(s\) \['y'\]"):
        drift_report(frame, build_profile(frame.assign(y=1.0), numeric=["y"], categorical=[]))


# --------------------------------------------------------------------------- round trip
def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (str, int, float, bool)


def test_profile_round_trips_through_a_plain_dict_and_yaml() -> None:
    frame = _uniform_reference().assign(
        c=pd.Categorical(["a", "b", None, "c"] * 25), n=np.arange(100) % 3
    )
    scores = np.linspace(0.01, 0.5, 100)
    profile = build_profile(frame, numeric=["x", "n"], categorical=["c"], scores=scores, top_k=2)
    payload = profile.to_dict()
    assert _plain(payload)
    assert ReferenceProfile.from_dict(payload) == profile
    text = yaml.safe_dump(payload)
    assert ReferenceProfile.from_dict(yaml.safe_load(text)) == profile
    with pytest.raises(RtbError, match="format"):
        ReferenceProfile.from_dict({**payload, "format": 99})


# --------------------------------------------------------------------------- thresholds
def _report(psi_x: float, psi_c: float, score: float | None, unseen: float, *,
            expected: float | None = None, **kw: float) -> DriftReport:
    return DriftReport(
        rows=1000,
        numeric_psi={"x": psi_x},
        categorical_psi={"campaignId": psi_c},
        score_psi=score,
        unseen_share={"campaignId": unseen},
        thresholds=DriftThresholds(**({"unseen_share": 0.05} | kw)),
        expected_unseen={} if expected is None else {"campaignId": expected},
    )


def test_nothing_crossed_below_the_thresholds() -> None:
    report = _report(0.19, 0.1, 0.05, 0.049)
    assert not report.crossed and report.reasons == []
    assert report.summary() == (
        "drift over 1,000 rows: max PSI 0.19 (x), score PSI 0.05, unseen campaignId 4.9%; "
        "0 features over PSI 0.2, 0 over unseen 5.0% -> ok"
    )


def test_crossing_at_the_threshold_with_reasons_and_summary() -> None:
    report = _report(0.25, 0.31, 0.05, 0.072)
    assert report.crossed
    assert report.reasons == [
        "campaignId PSI 0.310 >= 0.2",
        "x PSI 0.250 >= 0.2",
        "unseen campaignId 7.2%, 7.2% over the window's own 0.0% of new levels (>= 5.0%)",
    ]
    assert report.summary() == (
        "drift over 1,000 rows: max PSI 0.31 (campaignId), score PSI 0.05, unseen campaignId 7.2%; "
        "2 features over PSI 0.2, 1 over unseen 5.0% -> crossed"
    )
    assert _report(0.2, 0.0, None, 0.0).reasons == ["x PSI 0.200 >= 0.2"]
    assert _report(0.0, 0.0, 0.2, 0.0).reasons == ["score PSI 0.200 >= 0.2"]
    assert _report(0.0, 0.0, None, 0.05).crossed


def test_unseen_shares_count_only_above_the_windows_own_rate_of_new_levels() -> None:
    """A window whose latest day had 15% rows with new levels expects as much tomorrow."""
    assert not _report(0.0, 0.0, None, 0.19, expected=0.15).crossed  # 4 points over: normal
    crossed = _report(0.0, 0.0, None, 0.21, expected=0.15)  # 6 points over the 5-point limit
    assert crossed.crossed and crossed.unseen_excess("campaignId") == pytest.approx(0.06)
    assert crossed.reasons == [
        "unseen campaignId 21.0%, 6.0% over the window's own 15.0% of new levels (>= 5.0%)"
    ]
    assert crossed.to_dict()["expected_unseen_share"] == {"campaignId": 0.15}


def test_too_few_rows_are_reported_but_never_a_reason() -> None:
    """On a few hundred rows a PSI over 20 buckets is sampling noise, not drift."""
    report = DriftReport(rows=141, numeric_psi={"x": 0.9}, categorical_psi={}, score_psi=0.5,
                         unseen_share={"campaignId": 0.9}, thresholds=DriftThresholds())
    assert not report.crossed and report.reasons == []
    assert report.summary().endswith("-> too few rows to judge (< 500)")
    assert report.to_dict()["psi"] == {"x": 0.9}
    assert DriftReport(rows=500, numeric_psi={"x": 0.9}, categorical_psi={}, score_psi=None,
                       unseen_share={}).crossed


def test_new_level_shares_of_a_window() -> None:
    from rtb.monitoring.profile import new_level_shares, seen_levels

    window = pd.DataFrame({"c": pd.Categorical(["a", "b", "a", "b", "a", "z", "z", "b", "y", None],
                                               categories=["a", "b", "q", "y", "z"])})
    latest = np.array([False] * 4 + [True] * 6)  # its last six rows: z, z, y and the gap are new
    known = {"c": seen_levels(window["c"][~latest])}
    assert sorted(known["c"]) == ["a", "b"]  # the unused category q is no level seen
    assert new_level_shares(window[latest], known) == {"c": pytest.approx(4 / 6)}


def test_thresholds_are_configurable_and_the_dict_is_yaml_able() -> None:
    report = _report(0.25, 0.31, 0.05, 0.072, psi=0.35, unseen_share=0.1)
    assert not report.crossed
    payload = report.to_dict()
    assert _plain(payload) and yaml.safe_load(yaml.safe_dump(payload)) == payload
    assert payload["crossed"] is False
    assert payload["thresholds"] == {"psi": 0.35, "unseen_share": 0.1, "min_rows": 500}
    assert payload["psi"] == {"x": 0.25, "campaignId": 0.31} and payload["score_psi"] == 0.05


# --------------------------------------------------------------------------- realised quality
def _entropy(rate: float) -> float:
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def test_realised_calibration_and_ne_on_a_tiny_day() -> None:
    # y = 1 0 0 0, p = .4 .2 .1 .1: mean p 0.2 over a base rate of 0.25 -> calibration 0.8
    quality = realised_quality(np.array([1, 0, 0, 0]), np.array([0.4, 0.2, 0.1, 0.1]))
    log_loss = -(math.log(0.4) + math.log(0.8) + math.log(0.9) + math.log(0.9)) / 4
    assert (quality.rows, quality.positives) == (4, 1)
    assert quality.calibration_ratio == pytest.approx(0.8)
    assert quality.normalized_entropy == pytest.approx(log_loss / _entropy(0.25))
    assert quality.stale and quality.reasons == ["calibration 0.800 outside [0.9, 1.1]"]
    assert not realised_quality([1, 0, 0, 0], [0.4, 0.2, 0.1, 0.1],
                                limits=QualityLimits(calibration_low=0.75)).stale


def test_a_good_day_is_not_stale_and_the_base_rate_is_ne_one() -> None:
    # p = .7 .1 .1 .1: mean 0.25 = base rate -> calibration 1; NE well below 1
    good = realised_quality([1, 0, 0, 0], [0.7, 0.1, 0.1, 0.1])
    assert good.calibration_ratio == pytest.approx(1.0)
    ne = -(math.log(0.7) + 3 * math.log(0.9)) / 4 / _entropy(0.25)
    assert good.normalized_entropy == pytest.approx(ne) and ne < 0.5
    assert not good.stale and good.summary().endswith("-> ok")
    # bidding the base rate to everyone: calibration 1, NE exactly 1 -> stale at the default limit
    flat = realised_quality([1, 0, 0, 0], [0.25] * 4)
    assert flat.normalized_entropy == pytest.approx(1.0)
    assert flat.reasons == ["NE 1.000 >= 1"]
    assert not realised_quality([1, 0, 0, 0], [0.25] * 4, limits=QualityLimits(ne_limit=1.01)).stale
    payload = flat.to_dict()
    assert _plain(payload) and payload["stale"] is True


def test_a_day_without_positives_is_stale_with_undefined_metrics() -> None:
    quality = realised_quality([0, 0, 0], [0.1, 0.1, 0.1])
    assert math.isnan(quality.calibration_ratio) and math.isnan(quality.normalized_entropy)
    assert quality.stale and quality.reasons[0].startswith("calibration undefined")


@pytest.mark.parametrize("y, p", [([0, 1], [0.5]), ([], []), ([0, 2], [0.1, 0.1]), ([0, 1], [0.1, 1.5])])
def test_quality_rejects_bad_input(y: list, p: list) -> None:
    with pytest.raises(RtbError):
        realised_quality(y, p)


def test_quality_by_utc_day() -> None:
    stamps = pd.to_datetime(
        ["2019-01-01 23:30", "2019-01-02 00:10", "2019-01-01 01:00", "2019-01-02 12:00"]
    ).tz_localize("UTC")
    days = quality_by_day(stamps, [1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5])
    assert list(days) == ["2019-01-01", "2019-01-02"]
    assert [(q.rows, q.positives) for q in days.values()] == [(2, 1), (2, 1)]
    assert days["2019-01-01"].calibration_ratio == pytest.approx(1.0)


def test_quality_days_are_utc_days_whatever_the_time_zone() -> None:
    # 20:00 in New York on 1 January (EST, UTC-5) is 01:00 UTC on 2 January
    stamps = pd.DatetimeIndex(["2019-01-01 20:00", "2019-01-01 10:00"]).tz_localize("America/New_York")
    days = quality_by_day(stamps, [1, 0], [0.5, 0.5])
    assert list(days) == ["2019-01-01", "2019-01-02"]
    assert (days["2019-01-02"].rows, days["2019-01-02"].positives) == (1, 1)


def test_float32_values_are_compared_with_float64_cuts_exactly() -> None:
    # float32(0.1) is 0.100000001490116..., above the float64 cut point 0.1
    bins = NumericBins(cuts=[0.1], shares=[0.5, 0.5, 0.0])
    assert bins.counts(np.array([0.1], dtype=np.float32)).tolist() == [0, 1, 0]
    assert bins.counts(np.array([0.1], dtype=np.float64)).tolist() == [1, 0, 0]
    # a float32 cut point keeps float32 comparisons exact: the value equal to it is in its bin
    cut = float(np.float32(0.1))
    bins = NumericBins(cuts=[cut], shares=[0.5, 0.5, 0.0])
    assert bins.counts(np.array([0.1, 0.2], dtype=np.float32)).tolist() == [1, 1, 0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: NumericBins(cuts=[1.0, 1.0], shares=[0.5, 0.5, 0.0, 0.0]),
        lambda: NumericBins(cuts=[1.0], shares=[1.0]),
        lambda: CategoricalLevels(levels=["a", "a"], shares=[0.5, 0.5, 0.0]),
        lambda: CategoricalLevels(levels=["a"], shares=[1.0]),
    ],
)
def test_malformed_bins_are_rejected(make: Callable[[], object]) -> None:
    with pytest.raises(RtbError, match="drift profile"):
        make()


def test_a_processed_frame_from_the_real_stages(tmp_path: Path) -> None:
    """The profile reads frames as the stages hand them over: category dtype, float32 + NaN."""
    cfg = load_dataset_config("rtb")
    raw = write_raw(small_raw_frame(400, seed=3), tmp_path / "training_data.csv.gz")
    frame = preprocess(make_dataset(raw, cfg, "train"), cfg).to_pandas()
    assert isinstance(frame["country"].dtype, pd.CategoricalDtype)
    assert frame["fromLastStart"].dtype == np.float32 and frame["fromLastStart"].isna().any()
    profile = profile_training_window(frame, cfg, exclude=["hour"])
    assert list(profile.numeric) == [c for c in cfg.feature_numerical if c != "hour"]
    assert list(profile.categorical) == cfg.categorical
    assert profile.numeric["fromLastStart"].shares[-1] == frame["fromLastStart"].isna().mean()
    assert ReferenceProfile.from_dict(yaml.safe_load(yaml.safe_dump(profile.to_dict()))) == profile
    vocab = {c: frame[c].cat.categories for c in cfg.categorical}
    report = drift_report(frame, profile, known_levels=vocab)
    assert max(report.feature_psi.values()) == 0.0 and not report.crossed
    with pytest.raises(RtbError, match="cannot exclude"):
        profile_training_window(frame, cfg, exclude=["nope"])
