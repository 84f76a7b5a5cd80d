"""The raw log is replaced (os.replace, as a sync job would) while `rtb make-dataset` reads it:
the run fails with "changed while it was being read", or its output holds exactly one file,
whose sha256 is the one recorded in the interim schema metadata. Never a mix."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pyarrow.feather as feather
import pytest
from conftest import small_raw_frame, write_raw

from rtb.io_utils import sha256_file

from .faultkit import assert_unchanged, error_line, final_files, start_rtb, tail, tmp_files

CHANGED = "file changed while it was being read"
SOURCE_SHA = b"rtb.source_sha256"


def _has_open(pid: int, path: Path) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) == str(path):
                return True
        except OSError:
            continue
    return False


def _replacement(raw_dir: Path, name: str) -> tuple[Path, list[str]]:
    """Another valid test log, in the same folder (os.replace stays on one file system)."""
    frame = small_raw_frame(500, seed=9, start="2019-01-20").drop(columns=["install"])
    path = write_raw(frame, raw_dir / name)
    return path, frame["id"].tolist()


def _ids(interim: Path) -> list[str]:
    return feather.read_table(interim, columns=["id"]).column("id").to_pylist()


def test_swap_while_the_file_is_open_fails_the_run(big_project, run_cli, tmp_path: Path) -> None:
    paths = big_project.paths
    raw = paths.raw_dir / "test_data.csv.gz"
    incoming, incoming_ids = _replacement(paths.raw_dir, "incoming.csv.gz")
    incoming_sha = sha256_file(incoming)
    log = tmp_path / "rtb.log"
    before = final_files(paths.root)

    proc = start_rtb("make-dataset", "--split", "test", "--project-dir", str(paths.root), log=log)
    started = time.monotonic()
    while not _has_open(proc.pid, raw):
        assert proc.poll() is None, f"make-dataset finished before it was seen reading: {tail(log)}"
        assert time.monotonic() - started < 120, tail(log)
        time.sleep(0.001)
    os.replace(incoming, raw)
    proc.wait(timeout=300)

    assert proc.returncode == 1, tail(log)
    line = error_line(log.read_text())
    assert "test_data.csv.gz" in line and CHANGED in line, line
    after = final_files(paths.root)
    assert_unchanged({k: v for k, v in before.items() if "/raw/" not in k}, after)
    assert not tmp_files(paths.interim_dir)

    # Run again: the new file is read whole.
    result = run_cli("make-dataset", "--split", "test", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    table = feather.read_table(paths.interim("test"))
    assert table.schema.metadata[SOURCE_SHA].decode() == incoming_sha
    assert table.column("id").to_pylist() == incoming_ids


@pytest.mark.slow
def test_swap_at_random_moments_never_mixes_two_files(big_project, big_test_template, tmp_path: Path) -> None:
    paths = big_project.paths
    raw = paths.raw_dir / "test_data.csv.gz"
    original = big_test_template.raw_dir / "test_data.csv.gz"
    original_sha = sha256_file(original)
    original_ids = _ids(big_test_template.interim("test"))
    rng = random.Random(2024)
    outcomes = []
    for attempt in range(2):
        raw.unlink()
        os.link(original, raw)
        incoming, incoming_ids = _replacement(paths.raw_dir, f"incoming{attempt}.csv.gz")
        incoming_sha = sha256_file(incoming)
        paths.interim("test").unlink()
        log = tmp_path / f"rtb{attempt}.log"

        proc = start_rtb("make-dataset", "--split", "test", "--project-dir", str(paths.root), log=log)
        time.sleep(rng.uniform(0.3, 3.0))
        os.replace(incoming, raw)
        proc.wait(timeout=300)

        if proc.returncode != 0:
            assert CHANGED in error_line(log.read_text())
            assert not paths.interim("test").exists()
            outcomes.append("failed")
            continue
        table = feather.read_table(paths.interim("test"))
        recorded = table.schema.metadata[SOURCE_SHA].decode()
        assert recorded in (original_sha, incoming_sha)
        expected = original_ids if recorded == original_sha else incoming_ids
        assert table.column("id").to_pylist() == expected, "rows of one file, sha256 of another"
        outcomes.append("original" if recorded == original_sha else "incoming")
    assert len(outcomes) == 2
