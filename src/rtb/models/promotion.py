"""The promotion gate: a new model becomes the champion only if it beats the current one.

Both are scored on this run's time holdout: the new model by its early fit (which never saw
those rows, the honest figure), the champion as it is. The decision, the champion's holdout
metrics and a bootstrap interval of the log-loss uplift go into the report either way.
"""

from __future__ import annotations

from rtb.config import ProjectPaths
from rtb.dataset_config import DatasetConfig
from rtb.features import feature_frame
from rtb.models import registry
from rtb.models.metrics import bootstrap_log_loss_uplift, probability_metrics
from rtb.models.training import Selection


def compare_with_champion(
    paths: ProjectPaths, cfg: DatasetConfig, selection: Selection, seed: int
) -> tuple[registry.ModelEntry | None, dict[str, object]]:
    """The current champion (None if there is none) and the decision on replacing it."""
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
    return champion, decision
