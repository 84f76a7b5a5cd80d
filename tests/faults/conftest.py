"""Fault injection for real: the `rtb` CLI killed mid-write, disks that fill up or turn read-only,
inputs swapped or corrupted while a stage runs. Linux only (inotify, /proc, mount).

Projects are built once per session with the stage functions (fast, in-process) and copied per
test; the faults themselves hit real `rtb` subprocesses or the real entry point in-process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import rewrite_hand_over, small_raw_frame, write_raw

from rtb.config import ProjectPaths
from rtb.models.registry import load_champion_entry

from .faultkit import (
    BIG_TEST_ROWS,
    SMALL_TEST_ROWS,
    TRAIN_ROWS,
    Mounter,
    Template,
    copy_project,
)

if sys.platform != "linux":
    collect_ignore_glob = ["test_*.py"]


# ----------------------------------------------------------------------------------------------
# Projects


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rtb generate` output: a 5k-row training log and a 300k-row test log (~18 MB gzip)."""
    from rtb.data.generate import generate_raw

    out = tmp_path_factory.mktemp("generated")
    generate_raw(out, rows_train=TRAIN_ROWS, rows_test=BIG_TEST_ROWS, seed=11)
    return out


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory, generated: Path) -> Template:
    """Generated 5k training rows, a small test log, two models: `worse`, then the champion."""
    from rtb.data.make_dataset import run_make_dataset
    from rtb.data.preprocessing import run_preprocess
    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_training import run_training

    cfg = load_dataset_config("rtb")
    paths = ProjectPaths(tmp_path_factory.mktemp("trained") / "project")
    paths.raw_dir.mkdir(parents=True)
    shutil.copy(generated / "training_data.csv.gz", paths.raw_dir / "training_data.csv.gz")
    test = small_raw_frame(SMALL_TEST_ROWS, seed=2, start="2019-01-15").drop(columns=["install"])
    write_raw(test, paths.raw_dir / "test_data.csv.gz")
    for split in ("train", "test"):
        run_make_dataset(paths, split, cfg)
        run_preprocess(paths, split, cfg)
    rewrite_hand_over(paths, "train", lambda frame: frame.assign(**{
        cfg.target: np.random.default_rng(5).permutation(frame[cfg.target].to_numpy())
    }))
    run_training(paths, cfg, cv_folds=2, seed=0)
    worse = load_champion_entry(paths)
    run_preprocess(paths, "train", cfg)
    run_training(paths, cfg, cv_folds=2, seed=0)
    champion = load_champion_entry(paths)
    assert champion.version != worse.version, "the real model must beat the shuffled-label one"
    return Template(paths, worse, champion)


@pytest.fixture(scope="session")
def big_test_template(tmp_path_factory: pytest.TempPathFactory, generated: Path) -> ProjectPaths:
    """The 300k-row test log with its interim Arrow file and processed CSV (~48 MB)."""
    from rtb.data.make_dataset import run_make_dataset
    from rtb.data.preprocessing import run_preprocess
    from rtb.dataset_config import load_dataset_config

    cfg = load_dataset_config("rtb")
    paths = ProjectPaths(tmp_path_factory.mktemp("bigtest") / "project")
    paths.raw_dir.mkdir(parents=True)
    shutil.copy(generated / "test_data.csv.gz", paths.raw_dir / "test_data.csv.gz")
    run_make_dataset(paths, "test", cfg)
    run_preprocess(paths, "test", cfg)
    return paths


@pytest.fixture
def trained(trained_template: Template, tmp_path: Path) -> Template:
    """A private copy of the trained project."""
    paths = copy_project(trained_template.paths, tmp_path / "project")
    worse, champion = (
        dataclasses.replace(entry, path=paths.models_dir / entry.path.name)
        for entry in (trained_template.worse, trained_template.champion)
    )
    return Template(paths, worse, champion)


@pytest.fixture
def big_project(trained: Template, big_test_template: ProjectPaths) -> Template:
    """The trained project whose test split is the 300k-row log (raw, interim, processed).

    The 18 MB raw log is a hard link to the template's: tests may replace it, never write into it.
    """
    paths = trained.paths
    raw = paths.raw_dir / "test_data.csv.gz"
    raw.unlink()
    os.link(big_test_template.raw_dir / raw.name, raw)
    shutil.copy2(big_test_template.interim("test"), paths.interim("test"))
    shutil.copy2(big_test_template.processed("test"), paths.processed("test"))
    shutil.copy2(big_test_template.processed_arrow("test"), paths.processed_arrow("test"))
    return trained


# ----------------------------------------------------------------------------------------------
# Mounts


@pytest.fixture
def mounter() -> Iterator[Mounter]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command")
    mounts = Mounter()
    try:
        yield mounts
    finally:
        mounts.unmount_all()
