"""The `rtb` command: one subcommand per pipeline stage, each a thin wrapper doing I/O.

Airflow tasks call exactly these commands inside the job image. Every failure the user can fix
is an `RtbError`; it is printed as one line on stderr and the process exits 1. Heavy imports
happen inside the commands so that `rtb --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rtb.config import DATASET_CONFIG_ENV, ProjectPaths, default_project_dir
from rtb.errors import RtbError

if TYPE_CHECKING:
    from rtb.dataset_config import DatasetConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__.splitlines()[0],
)
log = logging.getLogger("rtb")

ProjectDirOption = Annotated[
    Path | None,
    typer.Option(
        "--project-dir",
        help="Folder holding data/, models/, reports/ (default: $RTB_PROJECT_DIR, else .).",
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset-config",
        envvar=DATASET_CONFIG_ENV,
        help="Builtin config name (rtb, talkingdata) or path to a dataset YAML.",
    ),
]
SplitOption = Annotated[str, typer.Option("--split", help="train or test")]


def _paths(project_dir: Path | None) -> ProjectPaths:
    return ProjectPaths((project_dir or default_project_dir()).resolve())


def _split(split: str, cfg: DatasetConfig) -> str:
    """A split the dataset config names a raw file for."""
    if split not in cfg.files:
        expected = " or ".join(repr(name) for name in cfg.files)
        raise RtbError(f"--split: expected {expected}, got {split!r}")
    return split


@app.command()
def generate(
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for the two .csv.gz files (with --stream: a data/raw folder)."),
    ],
    rows_train: Annotated[int, typer.Option("--rows-train")] = 200_000,
    rows_test: Annotated[int, typer.Option("--rows-test")] = 50_000,
    seed: Annotated[int, typer.Option("--seed")] = 7,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Write hourly request and daily labelled partitions (requests/date=.../hour=..., "
            "labelled/date=...) instead of the two files.",
        ),
    ] = False,
    days: Annotated[
        int, typer.Option("--days", min=1, help="With --stream: days of requests before --end.")
    ] = 14,
    end: Annotated[
        str | None,
        typer.Option(
            "--end",
            help="With --stream: exclusive end, a UTC hour (2025-06-10T13:00Z; no offset = UTC). "
            "Default: the start of the current UTC hour.",
        ),
    ] = None,
    rows_per_day: Annotated[
        int, typer.Option("--rows-per-day", min=1, help="With --stream: average requests per day.")
    ] = 20_000,
    shift_day: Annotated[
        str | None,
        typer.Option(
            "--shift-day",
            help="With --stream: UTC day (YYYY-MM-DD) of the planted campaign shift. "
            "Default: the third-last complete day.",
        ),
    ] = None,
) -> None:
    """Write a realistic synthetic training_data.csv.gz and test_data.csv.gz (or, with --stream,
    hourly and daily raw-log partitions)."""
    if not stream:
        from rtb.data.generate import generate_raw

        generate_raw(out, rows_train=rows_train, rows_test=rows_test, seed=seed)
        return
    from rtb.data.generate import generate_stream
    from rtb.partitions import parse_day, parse_hour

    generate_stream(
        out,
        end=None if end is None else parse_hour(end, name="--end"),
        days=days,
        rows_per_day=rows_per_day,
        shift_day=None if shift_day is None else parse_day(shift_day, name="--shift-day"),
        seed=seed,
    )


@app.command("make-dataset")
def make_dataset(
    split: SplitOption = "train",
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Validate a raw gzip CSV and write data/interim/<split>.arrow."""
    from rtb.data.make_dataset import run_make_dataset
    from rtb.dataset_config import load_dataset_config

    cfg = load_dataset_config(dataset_config)
    run_make_dataset(_paths(project_dir), _split(split, cfg), cfg)


@app.command()
def preprocess(
    split: SplitOption = "train",
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Derive features; write data/processed/<split>_df.arrow (hand-over) and .csv (export)."""
    from rtb.data.preprocessing import run_preprocess
    from rtb.dataset_config import load_dataset_config

    cfg = load_dataset_config(dataset_config)
    run_preprocess(_paths(project_dir), _split(split, cfg), cfg)


@app.command()
def train(
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
    cv_folds: Annotated[int, typer.Option("--cv-folds", min=2)] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Fit baseline and challenger, report CV + time holdout, promote if better."""
    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_training import run_training

    run_training(
        _paths(project_dir), load_dataset_config(dataset_config), cv_folds=cv_folds, seed=seed
    )


@app.command()
def predict(
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model pickle (default: the champion).")
    ] = None,
) -> None:
    """Score the processed test split; write predictions_<version>.npy/.csv + sidecar."""
    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_predicting import run_predicting

    run_predicting(_paths(project_dir), load_dataset_config(dataset_config), model_path=model)


@app.command("check-model")
def check_model(project_dir: ProjectDirOption = None) -> None:
    """Exit non-zero unless a verified champion model exists (the predict DAG's first gate)."""
    from rtb.models.registry import load_champion_entry

    entry = load_champion_entry(_paths(project_dir))
    log.info("champion model %s (sha256 %s) is present and verified", entry.path.name, entry.sha256)


@app.command()
def serve(
    project_dir: ProjectDirOption = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    model: Annotated[Path | None, typer.Option("--model")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch")] = 1000,
    reload_seconds: Annotated[float, typer.Option("--reload-seconds")] = 5.0,
    max_body_bytes: Annotated[
        int | None, typer.Option("--max-body-bytes", help="Default: 1 KiB per allowed row.")
    ] = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Serve the champion model over HTTP (POST /predict, GET /health, GET /model)."""
    from rtb.serving.app import run_server

    run_server(
        _paths(project_dir),
        host=host,
        port=port,
        model_path=model,
        max_batch=max_batch,
        reload_seconds=reload_seconds,
        max_body_bytes=max_body_bytes,
        dataset_config=dataset_config,
    )


def configure_logging() -> None:
    """One format for every stage, so Airflow task logs read the same everywhere."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """Entry point: run the command; an RtbError becomes one line on stderr and exit 1."""
    # OpenMP threads that spin while waiting make LightGBM several times slower when another process
    # shares the two cores (an Airflow scheduler, a second task); passive waiting costs ~nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Our BLAS calls are many small ones (L-BFGS on a few hundred coefficients); with threads
    # they are much slower on a shared 2-core machine. Set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    configure_logging()
    started = time.perf_counter()
    try:
        app(standalone_mode=False)
    except RtbError as exc:
        print(f"rtb: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("rtb: error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors and bugs alike must not exit 0
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    log.debug("finished in %.1f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
