"""The promotion gate: a new model becomes the champion only if it beats the current one.

Both are scored on this run's time holdout: the new model by its early fit (which never saw
those rows, the honest figure), the champion as it is. The decision, the champion's holdout
metrics and a bootstrap interval of the log-loss uplift go into the report either way.
"""

from __future__ import annotations

from rtb.config import ProjectPaths
from rtb.dataset_config import DatasetConfig
from rtb.features import feature_frame
from rtb.io_utils import read_yaml
from rtb.models import registry
from rtb.models.metrics import bootstrap_log_loss_uplift, probability_metrics
from rtb.models.training import Selection


def compare_with_champion(
    paths: ProjectPaths, cfg: DatasetConfig, selection: Selection, seed: int,
    *, holdout_partition: str | None = None,
) -> tuple[registry.ModelEntry | None, dict[str, object]]:
    """The current champion (None if there is none) and the decision on replacing it.

    With `holdout_partition` (a training window's latest day), the decision also says whether
    the champion's own training window included that day: if it did, the champion is judged
    on rows it learnt from, which favours keeping it."""
    champion = registry.current_champion(paths)
    if champion is None:
        return None, {"promoted": True, "reason": "no champion yet"}
    model = registry.load_verified(champion)
    holdout, selected = selection.holdout, selection.selected
    y_hold = selection.y_holdout
    try:
        p_champion = model.predict_proba(feature_frame(selection.frame, cfg)[holdout])[:, 1]
    except (KeyError, ValueError) as exc:
        reason = f"champion {champion.path.name} cannot score this data ({exc}); replacing it"
        return champion, {"promoted": True, "reason": reason}
    champion_metrics = probability_metrics(y_hold, p_champion)
    uplift = bootstrap_log_loss_uplift(y_hold, selected.holdout_probabilities, p_champion, seed=seed)
    better = selected.holdout["log_loss"] < champion_metrics["log_loss"]
    reason = (
        f"holdout log_loss {selected.holdout['log_loss']:.5f} vs champion "
        f"{champion_metrics['log_loss']:.5f}: {'better' if better else 'not better'}"
    )
    decision = {
        "promoted": bool(better),
        "reason": reason,
        "champion_holdout": champion_metrics,
        "uplift_vs_champion": uplift,
        "note": "the champion may have seen these holdout rows, which favours keeping it",
    }
    if holdout_partition is not None:
        seen = champion_saw(paths, champion, holdout_partition)
        decision["holdout_partition"] = holdout_partition
        decision["champion_window_included_holdout"] = seen
        decision["note"] = (
            f"the champion's training window included {holdout_partition}: it has seen these "
            "holdout rows, which favours keeping it" if seen else
            f"the champion's training window did not include {holdout_partition}: both models "
            "are judged on rows neither learnt from" if seen is False else
            f"the champion's report records no training window, so it may have seen "
            f"{holdout_partition}, which favours keeping it"
        )
    return champion, decision


def champion_saw(paths: ProjectPaths, champion: registry.ModelEntry, partition: str) -> bool | None:
    """Whether the champion's training window (from its report) held `partition`; None when
    its report records no window (trained on the single training file)."""
    window = read_yaml(paths.report(champion.version)).get("window")
    if not isinstance(window, dict):
        return None
    return partition in [p.get("name") for p in window.get("partitions") or []]
