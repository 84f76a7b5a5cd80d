"""Behavioural tests of the trained model, black-box: what it learns, not how.

A training log gets a planted effect (one campaign and one count column raise the install rate;
every other column is noise), the real CLI trains on it (`rtb make-dataset`, `rtb preprocess`,
`rtb train`) and scores hand-made requests (`rtb predict`). Only the CLI and the files it writes
are used (data/predictions/predictions_<version>.csv and its .yaml sidecar), so these tests hold
whatever the internals become:

- direction: requests that differ only in the planted feature score higher with the planted
  value, for a categorical (campaignId) and a numeric (clickCount) feature;
- invariance: shuffling the rows of the file to score, or renaming the ids, changes no score;
- an unseen campaign is scored like an average one: between the lowest- and highest-scored
  seen campaigns and nearer the middle than the planted one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import small_raw_frame, write_raw

from rtb.config import ProjectPaths

TRAIN_ROWS = 4_000
PLANTED_CAMPAIGN = "c007"
PLANTED_CAMPAIGN_LOGIT = 2.0  # on top of the base; turn negative to see the direction test fail
PLANTED_CLICK_LOGIT = 0.6  # per click
# Campaigns differ in real logs: two rare-install ones give the seen campaigns a range both ways.
LOW_CAMPAIGNS = ("c015", "c016")
LOW_CAMPAIGN_LOGIT = -1.5
BASE_LOGIT = -3.0
UNSEEN_CAMPAIGN = "never-seen-campaign"
SAME_SCORE = 1e-12


def _planted_training_log(seed: int = 7) -> pd.DataFrame:
    """small_raw_frame's columns, with labels drawn from the planted effects alone."""
    frame = small_raw_frame(TRAIN_ROWS, seed=seed)
    rng = np.random.default_rng(seed + 1)
    logit = (
        BASE_LOGIT
        + PLANTED_CAMPAIGN_LOGIT * (frame["campaignId"] == PLANTED_CAMPAIGN)
        + LOW_CAMPAIGN_LOGIT * frame["campaignId"].isin(LOW_CAMPAIGNS)
        + PLANTED_CLICK_LOGIT * frame["clickCount"]
    )
    frame["install"] = (rng.random(len(frame)) < 1 / (1 + np.exp(-logit))).astype(int)
    return frame


def _rtb(*args: str) -> None:
    """The installed `rtb` console script, for the module's one training run (the fixtures that
    run_cli needs are per test)."""
    script = Path(sys.executable).with_name("rtb")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rtb.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"rtb {' '.join(args)}: {result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project trained once on the planted log: the slow part, copied for each test."""
    paths = ProjectPaths(tmp_path_factory.mktemp("behaviour") / "project")
    train = _planted_training_log()
    write_raw(train, paths.raw_dir / "training_data.csv.gz")
    for stage in ("make-dataset", "preprocess"):
        _rtb(stage, "--split", "train", "--project-dir", str(paths.root))
    _rtb("train", "--cv-folds", "2", "--seed", "0", "--project-dir", str(paths.root))
    return paths.root


@pytest.fixture
def trained(trained_root: Path, project: ProjectPaths) -> ProjectPaths:
    """A private copy of the trained project (each test scores its own requests)."""
    shutil.copytree(trained_root, project.root, dirs_exist_ok=True)
    return project


def _score(paths: ProjectPaths, run_cli, requests: pd.DataFrame) -> pd.Series:
    """Write `requests` as the raw test log, run the CLI chain, return probability by id."""
    write_raw(requests, paths.raw_dir / "test_data.csv.gz")
    before = set(paths.predictions_dir.glob("predictions_*.yaml"))
    for stage in (("make-dataset", "--split", "test"), ("preprocess", "--split", "test"), ("predict",)):
        result = run_cli(*stage, "--project-dir", str(paths.root))
        assert result.code == 0, result.stderr
    (sidecar_path,) = set(paths.predictions_dir.glob("predictions_*.yaml")) - before
    sidecar = yaml.safe_load(sidecar_path.read_text())
    (csv_name,) = [name for name in sidecar["outputs"] if name.endswith(".csv")]
    scored = pd.read_csv(paths.predictions_dir / csv_name, dtype={"id": str})
    assert scored["id"].tolist() == requests["id"].tolist(), "predictions are not in input order"
    assert sidecar["rows"] == len(requests)
    return scored.set_index("id")["probability"]


CONTEXTS = 20  # requests the probes are built on: a verdict on one would hang on its crosses


def _probes(**varied: list) -> pd.DataFrame:
    """Each of CONTEXTS requests once per value of the varied column, all else kept."""
    ((column, values),) = varied.items()
    contexts = small_raw_frame(CONTEXTS, seed=3, start="2019-01-09").drop(columns=["install"])
    contexts["campaignId"], contexts["clickCount"] = "c012", 1
    rows = contexts.loc[contexts.index.repeat(len(values))].reset_index(drop=True)
    rows[column] = values * CONTEXTS
    rows["id"] = [f"probe-{i // len(values)}-{value}" for i, value in enumerate(rows[column])]
    return rows


def _mean_logit(scores: pd.Series, values: list) -> dict:
    """Per value of the varied column, its mean log-odds over the contexts."""
    return {
        value: float(np.mean([_logit(scores[f"probe-{k}-{value}"]) for k in range(CONTEXTS)]))
        for value in values
    }


def _seen_campaigns() -> list[str]:
    return sorted(_planted_training_log()["campaignId"].unique())


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


# ----------------------------------------------------------------------------------------------
# Direction: the planted effects are learned with the right sign


def test_planted_campaign_scores_above_every_other_campaign(trained, run_cli) -> None:
    campaigns = _seen_campaigns()
    assert PLANTED_CAMPAIGN in campaigns
    scores = _score(trained, run_cli, _probes(campaignId=campaigns))
    by_campaign = _mean_logit(scores, campaigns)
    planted = by_campaign.pop(PLANTED_CAMPAIGN)
    assert planted > max(by_campaign.values()), (planted, by_campaign)
    for k in range(CONTEXTS):  # and in every single context, not just on average
        others = max(scores[f"probe-{k}-{c}"] for c in by_campaign)
        assert scores[f"probe-{k}-{PLANTED_CAMPAIGN}"] > others, k


def test_more_clicks_score_higher(trained, run_cli) -> None:
    clicks = [0, 1, 2, 3, 4]
    scores = _score(trained, run_cli, _probes(clickCount=clicks))
    by_clicks = list(_mean_logit(scores, clicks).values())
    assert by_clicks[-1] > by_clicks[0], by_clicks
    assert by_clicks[2] > by_clicks[0], by_clicks
    for k in range(CONTEXTS):
        assert scores[f"probe-{k}-4"] > scores[f"probe-{k}-0"], k


# ----------------------------------------------------------------------------------------------
# Invariance: neither the order of the rows nor the names of the ids matter


def _requests() -> pd.DataFrame:
    return small_raw_frame(500, seed=5, start="2019-01-09").drop(columns=["install"])


def test_row_order_does_not_change_any_score(trained, run_cli) -> None:
    requests = _requests()
    scores = _score(trained, run_cli, requests)
    shuffled = requests.sample(frac=1, random_state=np.random.default_rng(11)).reset_index(drop=True)
    assert shuffled["id"].tolist() != requests["id"].tolist()
    again = _score(trained, run_cli, shuffled)
    assert sorted(again.index) == sorted(scores.index)
    difference = (again - scores.reindex(again.index)).abs()
    assert difference.max() <= SAME_SCORE, difference.sort_values().tail()


def test_renaming_ids_does_not_change_any_score(trained, run_cli) -> None:
    requests = _requests()
    scores = _score(trained, run_cli, requests)
    renamed = requests.copy()
    new_ids = {old: f"renamed-{len(requests) - i:05d}-{old[::-1]}" for i, old in enumerate(requests["id"])}
    renamed["id"] = renamed["id"].map(new_ids)
    again = _score(trained, run_cli, renamed)
    expected = scores.rename(index=new_ids).reindex(again.index)
    difference = (again - expected).abs()
    assert difference.max() <= SAME_SCORE, difference.sort_values().tail()


# ----------------------------------------------------------------------------------------------
# An unseen category: scored like an average campaign, not like the planted one


def test_unseen_campaign_scores_between_the_seen_ones_near_the_middle(trained, run_cli) -> None:
    """New campaigns appear every day: one the model never saw must be bid on like an average
    campaign, not like the worst one. Known to fail when the target-encoded logistic regression
    wins the promotion (e.g. _planted_training_log(seed=8)): it scores an unseen campaign below
    every seen one, as all its encoded counts are 0."""
    campaigns = _seen_campaigns()
    scores = _score(trained, run_cli, _probes(campaignId=[*campaigns, UNSEEN_CAMPAIGN]))
    seen = _mean_logit(scores, campaigns)
    unseen = _mean_logit(scores, [UNSEEN_CAMPAIGN])[UNSEEN_CAMPAIGN]
    assert min(seen.values()) <= unseen <= max(seen.values()), (unseen, seen)
    middle = float(np.median(list(seen.values())))
    assert abs(unseen - middle) < abs(seen[PLANTED_CAMPAIGN] - middle), (unseen, seen)
