"""`rtb uplift`: what the shadow challenger would have been worth, once the labels came in.

The service's shadow log (`reports/shadow/*.csv`, see `rtb.serving.shadow`) holds, per
request row, the champion's and the challenger's probability. Joined by id with labels that
arrived later (a raw labelled file or partition, or a processed hand-over), both models are
judged on exactly the same rows with the statistics the promotion gate uses:
`probability_metrics` (log loss, normalized entropy, calibration ratio, ...) per arm, a
reliability table per arm, and the paired bootstrap interval of the log-loss uplift
(`bootstrap_log_loss_uplift`; positive = the challenger is better). One comparison per
(champion, challenger) pair the log holds, since either may have been swapped mid-log.

A row id logged twice for the same pair counts once (the first), and so does an id
labelled twice, so a retried request does not weigh double.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from rtb.config import ProjectPaths, new_version
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import write_yaml
from rtb.models.metrics import bootstrap_log_loss_uplift, probability_metrics, reliability_table
from rtb.serving.shadow import COLUMNS

log = logging.getLogger(__name__)

LABEL_SUFFIXES = (".csv.gz", ".csv", ".arrow", ".parquet")


def _files(path: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RtbError(f"{path}: {what} not found")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes)
                   and not p.name.startswith("."))
    if not files:
        raise RtbError(f"{path}: no {what} ({' or '.join(suffixes)} files) in this folder")
    return files


def read_shadow_log(path: Path) -> pd.DataFrame:
    """Every published shadow file under `path` (a file or a folder), as one frame."""
    frames = []
    for file in _files(path, (".csv",), "shadow log"):
        try:
            gaps = {"champion_p": [""], "challenger_p": [""]}
            frame = pd.read_csv(file, dtype={"id": str, "champion": str, "challenger": str},
                                keep_default_na=False, na_values=gaps)
        except (ValueError, pd.errors.ParserError) as exc:
            raise RtbError(f"{file}: not a shadow log CSV ({exc})") from exc
        missing = [name for name in COLUMNS if name not in frame.columns]
        if missing:
            raise RtbError(f"{file}: column {missing[0]!r} missing; expected a shadow log with "
                           f"columns {', '.join(COLUMNS)}")
        for name in ("champion_p", "challenger_p"):
            values = pd.to_numeric(frame[name], errors="coerce")
            bad = ~values.between(0, 1)
            if bad.any():
                raise RtbError(f"{file}: column {name!r} row {int(np.argmax(bad)) + 2}: expected a "
                               f"probability in [0, 1], got {frame[name][bad].iloc[0]!r}")
            frame[name] = values.astype(np.float64)
        frames.append(frame[COLUMNS])
    return pd.concat(frames, ignore_index=True)


def read_labels(path: Path, cfg: DatasetConfig) -> pd.DataFrame:
    """(id, label) of a raw labelled file/partition or a processed hand-over, one per id."""
    frames = []
    for file in _files(path, LABEL_SUFFIXES, "labels"):
        if file.name.endswith((".csv", ".csv.gz")):
            id_column = cfg.id or cfg.id_column
            try:
                header = pd.read_csv(file, sep=cfg.separator, nrows=0).columns
            except (ValueError, pd.errors.ParserError, OSError) as exc:
                raise RtbError(f"{file}: not a {cfg.name} CSV ({exc})") from exc
            _require(file, header, [id_column, cfg.target])
            frame = pd.read_csv(file, sep=cfg.separator, usecols=[id_column, cfg.target],
                                dtype={id_column: str})
        else:
            import pyarrow.feather as feather
            import pyarrow.parquet as parquet

            reader = parquet.read_schema if file.name.endswith(".parquet") else None
            id_column = cfg.id_column
            try:
                if reader is not None:
                    _require(file, reader(file).names, [id_column, cfg.target])
                    table = parquet.read_table(file, columns=[id_column, cfg.target])
                else:
                    table = feather.read_table(file)
                    _require(file, table.column_names, [id_column, cfg.target])
                    table = table.select([id_column, cfg.target])
            except OSError as exc:
                raise RtbError(f"{file}: not a readable {file.suffix[1:]} file ({exc})") from exc
            frame = table.to_pandas()
            frame[id_column] = frame[id_column].astype(str)
        label = pd.to_numeric(frame[cfg.target], errors="coerce")
        bad = ~label.isin([0, 1])
        if bad.any():
            raise RtbError(f"{file}: column {cfg.target!r}: expected 0 or 1, got "
                           f"{frame[cfg.target][bad].iloc[0]!r}")
        frames.append(pd.DataFrame({"id": frame[id_column].to_numpy(),
                                    "label": label.astype(np.int8).to_numpy()}))
    labels = pd.concat(frames, ignore_index=True)
    return labels.drop_duplicates("id", keep="first")


def _require(file: Path, columns: object, wanted: list[str]) -> None:
    for name in wanted:
        if name not in list(columns):
            raise RtbError(f"{file}: column {name!r} missing; expected the id and the label")


def uplift_report(shadow: pd.DataFrame, labels: pd.DataFrame, *, rounds: int = 200,
                  seed: int = 0) -> dict[str, object]:
    """Per (champion, challenger) pair: both arms' metrics and calibration on the labelled
    rows, and the paired bootstrap interval of the challenger's log-loss uplift."""
    with_id = shadow[shadow["id"] != ""]
    unique = with_id.drop_duplicates(["champion", "challenger", "id"], keep="first")
    joined = unique.merge(labels, on="id", how="inner")
    comparisons = []
    for (champion, challenger), rows in joined.groupby(["champion", "challenger"], sort=True):
        logged = unique[(unique["champion"] == champion) & (unique["challenger"] == challenger)]
        y = rows["label"].to_numpy()
        old, new = rows["champion_p"].to_numpy(), rows["challenger_p"].to_numpy()
        comparisons.append({
            "champion": champion,
            "challenger": challenger,
            "rows_logged": len(logged),
            "rows_labelled": len(rows),
            "first_logged": str(rows["logged_at"].min()),
            "last_logged": str(rows["logged_at"].max()),
            "base_rate": float(y.mean()),
            "champion_metrics": probability_metrics(y, old),
            "challenger_metrics": probability_metrics(y, new),
            "calibration": {"champion": reliability_table(y, old),
                            "challenger": reliability_table(y, new)},
            "uplift_vs_champion": {
                **bootstrap_log_loss_uplift(y, new, old, rounds=rounds, seed=seed),
                "rounds": rounds, "seed": seed,
            },
        })
    if not comparisons:
        raise RtbError(f"no shadow row has a label: {len(unique)} logged ids, {len(labels)} "
                       "labelled ids, none in common (expected labels of the logged requests)")
    return {
        "rows": {"logged": len(shadow), "without_id": int(len(shadow) - len(with_id)),
                 "duplicates": int(len(with_id) - len(unique)), "labels": len(labels),
                 "joined": int(len(joined))},
        "comparisons": comparisons,
    }


def run_uplift(paths: ProjectPaths, cfg: DatasetConfig, *, shadow_log: Path | None,
               labels: Path, out: Path | None, rounds: int = 200, seed: int = 0) -> Path:
    """Read, join, judge; write the YAML report atomically (never over an existing one)."""
    from rtb.serving.shadow import shadow_dir

    source = shadow_log or shadow_dir(paths.reports_dir)
    report = uplift_report(read_shadow_log(source), read_labels(labels, cfg), rounds=rounds,
                           seed=seed)
    report = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "shadow_log": str(source), "labels": str(labels), **report}
    target = out or paths.reports_dir / "uplift" / f"uplift_{new_version()}.yaml"
    write_yaml(target, report)
    for comparison in report["comparisons"]:
        uplift = comparison["uplift_vs_champion"]
        log.info("challenger %s vs champion %s on %d labelled rows: log-loss uplift %.5f "
                 "(95%% CI %.5f..%.5f); NE %.4f vs %.4f", comparison["challenger"],
                 comparison["champion"], comparison["rows_labelled"], uplift["uplift"],
                 uplift["ci95_low"], uplift["ci95_high"],
                 comparison["challenger_metrics"]["normalized_entropy"],
                 comparison["champion_metrics"]["normalized_entropy"])
    log.info("wrote %s", target)
    return target
