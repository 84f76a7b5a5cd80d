"""The `rtb` command: one subcommand per pipeline stage, each a thin wrapper doing I/O.

Airflow tasks call exactly these commands inside the job image. Every failure the user can fix
is an `RtbError`; it is printed as one line on stderr, with paths relative to the project folder
and no traceback, and the process exits 1. Heavy imports happen inside the commands so that
`rtb --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
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
OptionalSplitOption = Annotated[
    str | None, typer.Option("--split", help="train or test (default: train; not with --partition)")
]
PartitionOption = Annotated[
    str | None,
    typer.Option(
        "--partition",
        help="A raw partition relative to data/raw: requests/date=YYYY-MM-DD/hour=HH or "
        "labelled/date=YYYY-MM-DD (instead of --split).",
    ),
]
RunIdOption = Annotated[
    str | None, typer.Option("--run-id", help="The Airflow run id, recorded in what is written.")
]


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


def _partition(partition: str) -> str:
    """A partition name as `rtb.partitions` spells it, relative to data/raw."""
    from rtb.partitions import parse_partition_name

    parse_partition_name(partition)
    return partition


def _split_or_partition(split: str | None, partition: str | None, cfg: DatasetConfig) -> tuple[str, bool]:
    """The unit a stage works on: (name, is_partition); --split and --partition exclude each other."""
    if partition is not None:
        if split is not None:
            raise RtbError("--split and --partition: expected one of them, got both")
        return _partition(partition), True
    return _split(split or "train", cfg), False


@app.command("make-dataset")
def make_dataset(
    split: OptionalSplitOption = None,
    partition: PartitionOption = None,
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Validate a raw gzip CSV (or every file of a complete partition) and write
    data/interim/<split or partition>.arrow."""
    from rtb.data.make_dataset import run_make_dataset, run_make_dataset_partition
    from rtb.dataset_config import load_dataset_config

    cfg = load_dataset_config(dataset_config)
    name, is_partition = _split_or_partition(split, partition, cfg)
    (run_make_dataset_partition if is_partition else run_make_dataset)(_paths(project_dir), name, cfg)


@app.command()
def preprocess(
    split: OptionalSplitOption = None,
    partition: PartitionOption = None,
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Derive features; write data/processed/<split or partition>_df.arrow (hand-over) and .csv
    (export)."""
    from rtb.data.preprocessing import run_preprocess
    from rtb.dataset_config import load_dataset_config

    cfg = load_dataset_config(dataset_config)
    name, _ = _split_or_partition(split, partition, cfg)
    run_preprocess(_paths(project_dir), name, cfg)


@app.command()
def train(
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
    cv_folds: Annotated[int, typer.Option("--cv-folds", min=2)] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    window_end: Annotated[
        str | None,
        typer.Option(
            "--window-end",
            help="Train on the labelled days before this UTC hour's date (partition mode); "
            "the latest day present is the holdout.",
        ),
    ] = None,
    window_days: Annotated[
        int | None,
        typer.Option(
            "--window-days", min=1, help="With --window-end: days (default $RTB_TRAIN_WINDOW_DAYS, else 7)."
        ),
    ] = None,
    trigger_reason: Annotated[
        str | None, typer.Option("--trigger-reason", help="Why this run was started; goes into the report.")
    ] = None,
) -> None:
    """Fit baseline and challenger, report CV + time holdout, promote if better; write the
    model's drift profile."""
    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_training import TrainingWindow, run_training
    from rtb.partitions import parse_hour
    from rtb.settings import train_window_days

    window = None
    if window_end is not None:
        end = parse_hour(window_end, name="--window-end")
        window = TrainingWindow(end, window_days or train_window_days())
    elif window_days is not None:
        raise RtbError("--window-days: only with --window-end")
    run_training(
        _paths(project_dir), load_dataset_config(dataset_config), cv_folds=cv_folds, seed=seed,
        window=window, trigger_reason=trigger_reason,
    )


@app.command()
def predict(
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model pickle (default: the champion).")
    ] = None,
    partition: PartitionOption = None,
    interval_start: Annotated[
        str | None, typer.Option("--interval-start", help="With --partition: the run's data interval start.")
    ] = None,
    interval_end: Annotated[
        str | None, typer.Option("--interval-end", help="With --partition: the run's data interval end.")
    ] = None,
    run_id: RunIdOption = None,
) -> None:
    """Score the processed test split (write predictions_<version>.npy/.csv + sidecar), or one
    request partition (replace its set data/predictions/<partition>/)."""
    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_predicting import run_predicting, run_predicting_partition

    cfg, paths = load_dataset_config(dataset_config), _paths(project_dir)
    interval = _interval(interval_start, interval_end, required=False)
    if partition is None:
        if interval is not None:
            raise RtbError("--interval-start/--interval-end: only with --partition")
        run_predicting(paths, cfg, model_path=model, run_id=run_id)
        return
    from rtb.partitions import REQUESTS, parse_partition_name

    key = parse_partition_name(partition)
    if key.kind != REQUESTS:
        raise RtbError(f"--partition: expected a request partition (requests/...), got {partition!r}")
    if interval is not None and not interval[0] <= key.hour < interval[1]:
        raise RtbError(f"--partition {partition}: its hour is outside the interval "
                       f"[{interval[0].isoformat()}, {interval[1].isoformat()})")
    run_predicting_partition(
        paths, cfg, partition, model_path=model, run_id=run_id,
        interval=None if interval is None else (interval[0].isoformat(), interval[1].isoformat()),
    )


def _interval(start: str | None, end: str | None, *, required: bool) -> tuple[datetime, datetime] | None:
    """--interval-start/--interval-end as UTC hours: both or neither (both if `required`)."""
    from rtb.partitions import parse_hour

    if start is None and end is None and not required:
        return None
    if start is None or end is None:
        raise RtbError("--interval-start and --interval-end: expected both")
    interval = parse_hour(start, name="--interval-start"), parse_hour(end, name="--interval-end")
    if interval[1] <= interval[0]:
        raise RtbError(f"--interval-end {end}: expected after --interval-start {start}")
    return interval


def _print_json(payload: dict) -> None:
    """The one JSON object a task's caller reads: the last line of stdout (logs go to stderr)."""
    import json

    sys.stdout.write(json.dumps(payload, sort_keys=False) + "\n")
    sys.stdout.flush()


def _moment(text: str, name: str) -> datetime:
    """An Airflow-rendered date-time, floored to its UTC hour (a manually triggered run's
    interval need not be on the hour); said out loud when that changed it."""
    from datetime import UTC

    from rtb.partitions import floor_hour

    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise RtbError(
            f"{name}: expected an ISO date-time such as 2026-11-30T21:00:00+00:00, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    floored = floor_hour(moment)
    if floored != moment:
        log.warning("%s %s: not on an hour; using the hour's start %s", name, text, floored.isoformat())
    return floored


@app.command()
def plan(
    kind: Annotated[str, typer.Argument(help="predict or train")],
    end: Annotated[str, typer.Option("--end", help="The run's data interval end (ISO).")],
    start: Annotated[
        str,
        typer.Option("--start", help="The run's data interval start (ISO); empty for a run that "
                     "has no interval (triggered without a logical date): the period ending at --end."),
    ] = "",
    window_days: Annotated[
        int | None,
        typer.Option(
            "--window-days", min=1, help="train: labelled days (default $RTB_TRAIN_WINDOW_DAYS, else 7)."
        ),
    ] = None,
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Print, as the last stdout line, one JSON object: the units and arguments of one run."""
    from datetime import timedelta

    from rtb.dataset_config import load_dataset_config
    from rtb.planning import plan_run
    from rtb.settings import train_window_days

    last = _moment(end, "--end")
    # No interval: the schedule's period that ended last (an hour of requests; a training
    # window is anchored at its end only).
    first = _moment(start, "--start") if start.strip() else last - timedelta(hours=1)
    payload = plan_run(
        _paths(project_dir), load_dataset_config(dataset_config), kind, first, last,
        window_days=window_days or train_window_days(),
    )
    log.info("plan %s (%s mode): %d unit(s), waiting for %d marker(s)", kind, payload["mode"],
             len(payload["units"]), len(payload["wait_for"]))
    _print_json(payload)


@app.command()
def monitor(
    interval_start: Annotated[str | None, typer.Option("--interval-start")] = None,
    interval_end: Annotated[str | None, typer.Option("--interval-end")] = None,
    split: Annotated[str | None, typer.Option("--split", help="test: the single-file mode")] = None,
    run_id: RunIdOption = None,
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Drift of the interval's scored partitions (or the test split) from the champion's
    profile, realised quality of labelled days; prints {"retrain", "reasons", "champion"}."""
    from rtb.dataset_config import load_dataset_config
    from rtb.monitoring.watch import MonitorLimits, run_monitor

    cfg = load_dataset_config(dataset_config)
    if split is not None:
        if interval_start is not None or interval_end is not None:
            raise RtbError("--split and --interval-start/--interval-end: expected one of them, got both")
        if split != "test":
            raise RtbError(f"--split: expected 'test', got {split!r}")
        interval = None
    else:
        interval = _interval(interval_start, interval_end, required=True)
    _print_json(run_monitor(_paths(project_dir), cfg, interval=interval, run_id=run_id,
                            limits=MonitorLimits.from_env()))


@app.command()
def retention(
    now: Annotated[str, typer.Option("--now", help="The moment ages are measured from (ISO).")],
    max_age_days: Annotated[
        int | None,
        typer.Option("--max-age-days", min=1, help="Default $RTB_RETENTION_DAYS, else 30."),
    ] = None,
    project_dir: ProjectDirOption = None,
) -> None:
    """Delete raw partitions older than the age, with their interim/processed copies."""
    from rtb.retention import run_retention
    from rtb.settings import retention_days, train_window_days

    run_retention(_paths(project_dir), now=_moment(now, "--now"),
                  max_age_days=max_age_days or retention_days(), window_days=train_window_days())


@app.command()
def publish(
    interval_start: Annotated[str | None, typer.Option("--interval-start")] = None,
    interval_end: Annotated[str | None, typer.Option("--interval-end")] = None,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", help="redis://host:port/db (default $RTB_PUBLISH_REDIS_URL)."),
    ] = None,
    ttl_seconds: Annotated[
        int | None,
        typer.Option("--ttl-seconds", min=1,
                     help="Key lifetime (default $RTB_PUBLISH_TTL_SECONDS, else two days)."),
    ] = None,
    key_prefix: Annotated[str, typer.Option("--key-prefix")] = "rtb:",
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=1, help="Keys per round trip.")] = 10_000,
    project_dir: ProjectDirOption = None,
) -> None:
    """Write the interval's prediction sets (or the newest single-file set) to Redis:
    <prefix>score:<id> -> {"p", "model"}; a set already published is not written again."""
    from rtb.publishing import DEFAULT_TTL_SECONDS, PublishOptions, connect, run_publish
    from rtb.settings import PUBLISH_REDIS_URL_ENV, publish_redis_url, publish_ttl_seconds

    url = redis_url or publish_redis_url()
    if not url:
        raise RtbError(f"--redis-url: expected a redis:// URL (or ${PUBLISH_REDIS_URL_ENV}), got none")
    options = PublishOptions(ttl_seconds=ttl_seconds or publish_ttl_seconds(DEFAULT_TTL_SECONDS),
                             key_prefix=key_prefix, batch_rows=batch_rows)
    run_publish(_paths(project_dir), connect(url), options,
                interval=_interval(interval_start, interval_end, required=False))


@app.command()
def uplift(
    labels: Annotated[
        Path, typer.Option("--labels", help="Labels of the logged requests: a raw labelled file or "
                           "partition folder (CSV), or a processed .arrow/.parquet.")
    ],
    shadow_log: Annotated[
        Path | None, typer.Option("--shadow-log", help="A shadow CSV or folder (default reports/shadow).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report YAML (default reports/uplift/uplift_<UTC>.yaml).")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=10, help="Bootstrap rounds.")] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    project_dir: ProjectDirOption = None,
    dataset_config: DatasetOption = None,
) -> None:
    """Judge the shadow challenger against the champion on the logged rows, once labelled:
    metrics and calibration per arm, bootstrap interval of the log-loss uplift."""
    from rtb.dataset_config import load_dataset_config
    from rtb.uplift import run_uplift

    run_uplift(_paths(project_dir), load_dataset_config(dataset_config), shadow_log=shadow_log,
               labels=labels, out=out, rounds=rounds, seed=seed)


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
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes sharing the port (SO_REUSEPORT); "
                          "each follows champion.yaml and ab.yaml.")
    ] = 1,
) -> None:
    """Serve the champion model over HTTP (POST /predict, GET /health, GET /model, /metrics),
    with the challenger of models/ab.yaml if there is one."""
    from rtb.serving.app import ServeOptions, run_server

    run_server(ServeOptions(
        _paths(project_dir),
        host=host,
        port=port,
        model_path=model,
        max_batch=max_batch,
        reload_seconds=reload_seconds,
        max_body_bytes=max_body_bytes,
        dataset_config=dataset_config,
        workers=workers,
    ))


# What the log lines of a stage look like ($RTB_LOG_FORMAT). In a terminal or a file each line
# says when and where it was written. Under Airflow (the DAGs set "airflow") the task log adds
# the time itself and shows a level per line: `rtb` writes `<LEVEL> <message>`, and the DAGs'
# operator turns the word in front into the line's level, so the message is the first thing
# read. The `rtb: error:` line is the same in both.
LOG_FORMAT_ENV = "RTB_LOG_FORMAT"
LOG_FORMATS = {
    "plain": "%(asctime)s %(levelname)s %(name)s: %(message)s",
    "airflow": "%(levelname)s %(message)s",
}


def configure_logging() -> None:
    """One format for every stage, so that task logs read the same everywhere."""
    name = os.environ.get(LOG_FORMAT_ENV, "").strip() or "plain"
    if name not in LOG_FORMATS:
        expected = " or ".join(repr(known) for known in LOG_FORMATS)
        raise RtbError(f"${LOG_FORMAT_ENV}: expected {expected}, got {name!r}")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMATS[name], stream=sys.stderr)


def _project_root(argv: list[str]) -> Path:
    """The project folder a command line works on, resolved as its command resolves it.

    Read from the arguments because the failed command's parsed options are gone by the time
    its error reaches `main`."""
    for index, arg in enumerate(argv):
        if arg == "--project-dir" and index + 1 < len(argv):
            return _paths(Path(argv[index + 1])).root
        if arg.startswith("--project-dir="):
            return _paths(Path(arg.partition("=")[2])).root
    return _paths(None).root


def relative_to_project(message: str, root: Path) -> str:
    """`message` with every path under `root` named relative to it.

    Stages name the files they read by absolute path, and inside a job container that is
    /project/data/raw/...: a folder the user does not have. The user knows the file as
    data/raw/... in their project folder, as the README names it."""
    return message.replace(f"{root}{os.sep}", "")


def main() -> None:
    """Entry point: run the command; an RtbError becomes one line on stderr and exit 1.

    The line is all the user needs (which file, which column, what was expected), so it comes
    without a traceback; any other exception is a bug and keeps its traceback."""
    # OpenMP threads that spin while waiting make LightGBM several times slower when another process
    # shares the two cores (an Airflow scheduler, a second task); passive waiting costs ~nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Our BLAS calls are many small ones (L-BFGS on a few hundred coefficients); with threads
    # they are much slower on a shared 2-core machine. Set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    started = time.perf_counter()
    try:
        configure_logging()
        app(standalone_mode=False)
    except RtbError as exc:
        message = relative_to_project(str(exc), _project_root(sys.argv[1:]))
        print(f"rtb: error: {message}", file=sys.stderr)
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
