"""`rtb publish` against a real Redis (the compose file's Redis image, in its own container):
every id of a prediction set readable with its score and model, a re-run that writes nothing,
and a publish that fails half way (Redis out of memory) leaving every key readable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.redis_server import running_redis

from rtb.config import ProjectPaths
from rtb.prediction_sets import PredictionSet, latest_test_set

from .conftest import _require_docker


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis server of its own, on a free local port, removed after the module."""
    _require_docker()
    with running_redis("rtb-publish-test") as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def client(redis_url: str):
    import redis

    connection = redis.Redis.from_url(redis_url)
    connection.flushall()
    connection.config_set("maxmemory", 0)
    yield connection
    connection.config_set("maxmemory", 0)


@pytest.fixture(scope="module")
def scored_project(tmp_path_factory: pytest.TempPathFactory) -> ProjectPaths:
    """A project trained and scored through the CLI on small generated files."""
    from conftest import small_raw_frame, write_raw

    paths = ProjectPaths(tmp_path_factory.mktemp("publish") / "project")
    paths.raw_dir.mkdir(parents=True)
    write_raw(small_raw_frame(3_000, seed=1), paths.raw_dir / "training_data.csv.gz")
    test = small_raw_frame(2_500, seed=2, start="2019-01-08").drop(columns=["install"])
    write_raw(test, paths.raw_dir / "test_data.csv.gz")
    for args in (["make-dataset", "--split", "train"], ["preprocess", "--split", "train"],
                 ["train", "--cv-folds", "2"], ["make-dataset", "--split", "test"],
                 ["preprocess", "--split", "test"], ["predict"]):
        result = _rtb(paths, *args)
        assert result.returncode == 0, result.stderr[-2000:]
    return paths


def _rtb(paths: ProjectPaths, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os
    import sys

    rtb = Path(sys.executable).with_name("rtb")
    return subprocess.run([str(rtb), *args, "--project-dir", str(paths.root)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})


def _scored(found: PredictionSet) -> pd.DataFrame:
    return found.read_scored().to_pandas()


def _stored(client, ids: list[str]) -> list[dict | None]:
    values = client.mget([f"rtb:score:{request_id}" for request_id in ids])
    return [None if value is None else json.loads(value) for value in values]


def test_every_id_of_the_set_is_published_once_with_its_score_and_model(
    scored_project: ProjectPaths, redis_url: str, client
) -> None:
    found = latest_test_set(scored_project)
    assert found is not None
    expected = _scored(found)
    result = _rtb(scored_project, "publish", "--redis-url", redis_url, "--ttl-seconds", "3600")
    assert result.returncode == 0, result.stderr
    assert f"published {len(expected)} scores" in result.stderr

    stored = _stored(client, expected["id"].tolist())
    assert all(value is not None for value in stored)
    np.testing.assert_array_equal([value["p"] for value in stored], expected["probability"].to_numpy())
    assert {value["model"] for value in stored} == {found.model_version}
    ttl = client.ttl(f"rtb:score:{expected['id'].iloc[0]}")
    assert 3500 < ttl <= 3600
    assert client.dbsize() == len(expected) + 1  # the scores and the set's marker

    again = _rtb(scored_project, "publish", "--redis-url", redis_url)
    assert again.returncode == 0, again.stderr
    assert "already published; nothing written" in again.stderr
    assert client.dbsize() == len(expected) + 1


def test_a_publish_that_fails_half_way_leaves_every_key_readable_and_is_redone(
    scored_project: ProjectPaths, redis_url: str, client, tmp_path: Path
) -> None:
    from conftest import small_raw_frame, write_raw

    paths = ProjectPaths(tmp_path / "project")
    shutil.copytree(scored_project.root, paths.root, symlinks=True)
    before = latest_test_set(paths)
    assert _rtb(paths, "publish", "--redis-url", redis_url).returncode == 0
    old = _scored(before)

    # The next scoring run holds half of those requests again and 2,500 new ones.
    test = pd.concat([small_raw_frame(2_500, seed=2, start="2019-01-08").iloc[:1_250],
                      small_raw_frame(2_500, seed=3, start="2019-01-08")]).drop(columns=["install"])
    write_raw(test, paths.raw_dir / "test_data.csv.gz")
    for args in (["make-dataset", "--split", "test"], ["preprocess", "--split", "test"], ["predict"]):
        assert _rtb(paths, *args).returncode == 0
    after = latest_test_set(paths)
    assert after.sidecar != before.sidecar
    new = _scored(after)

    # Redis runs out of memory part way through the new keys: the publish fails, and says so.
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory", used + 100_000)
    failed = _rtb(paths, "publish", "--redis-url", redis_url, "--batch-rows", "100")
    assert failed.returncode != 0
    assert "maxmemory" in failed.stderr
    assert "run it again" in failed.stderr
    stored = _stored(client, old["id"].tolist())
    assert all(value is not None for value in stored), "a failed publish must not lose a key"
    written = _stored(client, new["id"].tolist())
    assert 0 < sum(value is not None for value in written) < len(new), "expected a partial publish"
    assert client.get(f"rtb:published:{after.sidecar.stem}") is None

    client.config_set("maxmemory", 0)
    redone = _rtb(paths, "publish", "--redis-url", redis_url)
    assert redone.returncode == 0, redone.stderr
    stored = _stored(client, new["id"].tolist())
    np.testing.assert_array_equal([value["p"] for value in stored], new["probability"].to_numpy())
    assert client.get(f"rtb:published:{after.sidecar.stem}").decode() == after.read_sidecar()["version"]


def test_publish_without_a_redis_url_or_a_set_is_a_one_line_error(
    scored_project: ProjectPaths, tmp_path: Path, redis_url: str
) -> None:
    result = _rtb(scored_project, "publish")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("rtb: error: --redis-url: expected")
    empty = ProjectPaths(tmp_path / "empty")
    empty.predictions_dir.mkdir(parents=True)
    result = _rtb(empty, "publish", "--redis-url", redis_url)
    assert result.returncode == 1
    assert "no prediction set to publish" in result.stderr.strip().splitlines()[-1]
