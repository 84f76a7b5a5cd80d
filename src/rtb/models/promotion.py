"""The promotion gate: a new model becomes the champion only if it beats the current one on
rows neither of them was fitted on.

The challenger's figures are always those of its early fit, which never saw this run's
holdout. The champion's side depends on what it was fitted on (its report's window):

- its window did not include this run's holdout day (a newer labelled day): the champion is
  scored on it as it is (`comparison: champion_as_is`);
- its window included that day, or it cannot be known (the single training file): the
  shipped champion was refitted on those rows, so scoring it there would flatter it. Its
  recipe (the unfitted pipeline: same candidate, same settings) is fitted on exactly this
  run's early rows and calibrated on the same holdout by the same procedure as every
  candidate (`comparison: champion_recipe_refitted`). A recipe that equals one of this run's
  candidates is that candidate's early fit already, so nothing is fitted twice.

Identical holdout figures (or a byte-identical pickle) are a tie, and the report says so: the
champion is kept if it is the same model, or was fitted on the same input or on data reaching
later; otherwise the challenger, as good and fitted on the data as they are now, replaces it.
Either way the decision, the comparison made, the champion's holdout metrics and a bootstrap
interval of the log-loss uplift go into the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import clone

from rtb.config import ProjectPaths
from rtb.dataset_config import DatasetConfig
from rtb.io_utils import read_yaml
from rtb.models import registry
from rtb.models.metrics import bootstrap_log_loss_uplift, probability_metrics
from rtb.models.training import DEFAULT_LIMITS, Selection, TrainingLimits, fit_and_calibrate
from rtb.models.training_report import plain_params

AS_IS = "champion_as_is"
RECIPE = "champion_recipe_refitted"


def compare_with_champion(
    paths: ProjectPaths, cfg: DatasetConfig, selection: Selection, seed: int, *,
    challenger: registry.ModelEntry, inputs: object, holdout_partition: str | None = None,
    limits: TrainingLimits = DEFAULT_LIMITS,
) -> tuple[registry.ModelEntry | None, dict[str, object]]:
    """The current champion (None if there is none) and the decision on replacing it with
    `challenger` (this run's pickle, fitted on `inputs`: the sha256 of what it read, as the
    report's `artifacts.input_sha256` records it), for the report's `promotion` section.

    `holdout_partition` is a training window's latest day: whether the champion's own window
    held it decides between scoring the champion as it is and refitting its recipe."""
    champion = registry.current_champion(paths)
    if champion is None:
        return None, {"promoted": True, "tie": False, "comparison": None, "reason": "no champion yet"}
    champion_report = read_yaml(paths.report(champion.version))
    seen = champion_saw(paths, champion, holdout_partition) if holdout_partition else None
    model = registry.load_verified(champion)
    selected, y_hold = selection.selected, selection.y_holdout
    try:
        if seen is False:
            comparison, recipe = AS_IS, None
            p_champion = model.predict_proba(selection.X[selection.holdout])[:, 1]
            champion_metrics = probability_metrics(y_hold, p_champion)
        else:
            comparison = RECIPE
            p_champion, champion_metrics, recipe = _recipe_on_this_run(
                model, str(champion_report.get("model")), selection, seed, limits
            )
    except (KeyError, ValueError) as exc:
        reason = f"champion {champion.path.name} cannot score this data ({exc}); replacing it"
        return champion, {"promoted": True, "tie": False, "comparison": None, "reason": reason}

    identical_pickle = challenger.sha256 == champion.sha256
    tie = identical_pickle or bool(np.array_equal(p_champion, selected.holdout_probabilities))
    ours, theirs = selected.holdout["log_loss"], champion_metrics["log_loss"]
    against = (
        f"champion {champion.version} as it is" if comparison == AS_IS else
        f"champion {champion.version}'s recipe ({recipe['candidate'] or champion_report.get('model')}) "
        f"refitted on this run's {selection.parts[0]}"
    )
    if tie:
        promoted, why = _break_tie(selection, cfg, champion_report, inputs, identical_pickle)
        what = (f"{challenger.path.name} is byte-identical to {champion.path.name} (sha256 "
                f"{champion.sha256[:12]}...)" if identical_pickle else
                "the same recipe on the same early rows gives the same holdout figures")
        reason = (f"tie: holdout log_loss {ours:.5f} vs {against} {theirs:.5f}; {what}; "
                  + (f"promoted: {why}" if promoted else f"champion {champion.version} kept: {why}"))
    else:
        promoted = bool(ours < theirs)
        reason = (f"holdout log_loss {ours:.5f} vs {against} {theirs:.5f}: "
                  f"{'better' if promoted else 'not better'}")
    decision: dict[str, object] = {
        "promoted": promoted,
        "tie": bool(tie),
        "reason": reason,
        "comparison": comparison,
        "champion": {"version": champion.version, "model": champion_report.get("model"),
                     "sha256": champion.sha256},
        "champion_holdout": champion_metrics,
        "uplift_vs_champion": bootstrap_log_loss_uplift(
            y_hold, selected.holdout_probabilities, p_champion, seed=seed
        ),
    }
    if recipe is not None:
        decision["champion_recipe"] = recipe
    if holdout_partition is not None:
        decision["holdout_partition"] = holdout_partition
        decision["champion_window_included_holdout"] = seen
    decision["note"] = _note(comparison, seen, holdout_partition)
    return champion, decision


def _break_tie(
    selection: Selection, cfg: DatasetConfig, champion_report: dict[str, object], inputs: object,
    identical_pickle: bool,
) -> tuple[bool, str]:
    """Whether a challenger as good as the champion replaces it, and why.

    Equal recipes say nothing about which fit is better when they were fitted on different
    data, so the data decide: the champion stays if it is the same model, was fitted on the
    same input, or on data reaching later (a backfill of an older interval); otherwise the
    challenger, fitted on the data as they are now, replaces it."""
    if identical_pickle:
        return False, "the same model"
    if (champion_report.get("artifacts") or {}).get("input_sha256") == inputs:
        return False, "fitted on the same input (same sha256)"
    ours, theirs = _holdout_start(selection, cfg), _recorded_holdout_start(champion_report)
    if theirs > ours:
        return False, f"its data reach later (holdout from {theirs} vs {ours})"
    return True, "as good, and fitted on this run's data (a different input)"


# `sh run.sh train` prints the training log's line holding this (airflow/rest_client.py has
# its own copy: it runs where rtb is not installed).
PROMOTION_MARK = "promotion decision: "


def promotion_line(
    entry: registry.ModelEntry, champion: registry.ModelEntry | None, decision: dict[str, object]
) -> str:
    """The one line saying whether this run's model became the champion, and why."""
    if decision["promoted"]:
        outcome = f"PROMOTED {entry.path.name} to champion"
    else:
        kept = "" if decision.get("tie") or champion is None else f", champion {champion.path.name} kept"
        outcome = f"NOT promoted ({entry.path.name} stays on disk){kept}"
    return f"{PROMOTION_MARK}{outcome}: {decision['reason']}"


def _recipe_on_this_run(
    model: object, champion_name: str, selection: Selection, seed: int, limits: TrainingLimits
) -> tuple[np.ndarray, dict[str, float], dict[str, object]]:
    """The champion's unfitted pipeline fitted on this run's early rows and calibrated on its
    holdout: its holdout probabilities, metrics, and how they were obtained."""
    wanted = recipe_of(model)
    same = next((c for c in selection.candidates if recipe_of(c.pipeline) == wanted), None)
    if same is not None:
        return same.holdout_probabilities, same.holdout, {
            "candidate": same.name, "fitted": f"identical to candidate {same.name}: its early fit"}
    refit = fit_and_calibrate(f"champion recipe ({champion_name})", clone(model), selection.X,
                              selection.y, selection.holdout, seed=seed, limits=limits)
    return refit.holdout_probabilities, refit.holdout, {
        "candidate": None, "fitted": f"refitted on {refit.fit_rows} rows in {refit.seconds:.1f} s"}


def recipe_of(pipeline: object) -> dict[str, object]:
    """What a pipeline was set up with, less the Platt step each fit tunes for itself: two
    models with equal recipes fitted on the same rows are the same model."""
    return plain_params(clone(pipeline).set_params(model__slope=1.0, model__intercept=0.0))


def _holdout_start(selection: Selection, cfg: DatasetConfig) -> pd.Timestamp:
    return _utc(selection.frame[cfg.timestamp][selection.holdout].min())


def _recorded_holdout_start(report: dict[str, object]) -> pd.Timestamp:
    """When the champion's holdout began, from its report (the epoch if it does not say)."""
    return _utc((report.get("data") or {}).get("holdout_starts") or 0)


def _utc(moment: object) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp


def _note(comparison: str, seen: bool | None, partition: str | None) -> str:
    if comparison == AS_IS:
        return (f"the champion's training window did not include {partition}: both models are "
                "judged on rows neither learnt from, the champion as it is")
    why = (f"the champion's training window included {partition}" if seen else
           f"the champion's report records no training window, so it may have seen {partition}"
           if partition else "the champion may have been fitted on these holdout rows")
    return (f"{why}: its recipe was fitted on this run's early rows instead and calibrated on the "
            "holdout like every candidate, so both are judged on rows neither learnt from")


def champion_saw(paths: ProjectPaths, champion: registry.ModelEntry, partition: str) -> bool | None:
    """Whether the champion's training window (from its report) held `partition`; None when
    its report records no window (trained on the single training file)."""
    window = read_yaml(paths.report(champion.version)).get("window")
    if not isinstance(window, dict):
        return None
    return partition in [p.get("name") for p in window.get("partitions") or []]
