"""Put a challenger beside a trained project's champion, for the A/B and shadow load tests.

Fits another candidate (default `gbm_target_encoded`) on the project's processed train split
and writes it as `models/pipeline_<version>.pkl` with a report recording its sha256, as
training does, without promoting it; then name it in `models/ab.yaml` (see
`rtb.serving.ab`). Bench tooling: `rtb train` is what makes real challengers.

Usage:
    python bench/make_challenger.py --project-dir /tmp/x [--candidate gbm_target_encoded]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import joblib
import pyarrow.feather as feather

from rtb.config import ProjectPaths, new_version
from rtb.dataset_config import load_dataset_config
from rtb.features import feature_frame
from rtb.io_utils import atomic_path, sha256_file, write_yaml
from rtb.models.pipeline import build_pipeline

log = logging.getLogger("bench.make_challenger")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, required=True)
    parser.add_argument("--candidate", default="gbm_target_encoded")
    args = parser.parse_args()
    paths = ProjectPaths(args.project_dir.resolve())
    cfg = load_dataset_config("rtb")
    frame = feather.read_table(paths.processed_arrow("train")).to_pandas()
    pipeline = build_pipeline(args.candidate, cfg)
    pipeline.fit(feature_frame(frame, cfg), frame[cfg.target].to_numpy())
    version = new_version()
    model = paths.model(version)
    with atomic_path(model) as tmp:
        joblib.dump(pipeline, tmp)
    write_yaml(paths.report(version), {
        "version": version, "model": args.candidate,
        "artifacts": {"model": model.name, "model_sha256": sha256_file(model)},
    })
    log.info("challenger %s (%s) written; name it in %s", version, args.candidate,
             paths.models_dir / "ab.yaml")
    print(version)


if __name__ == "__main__":
    main()
