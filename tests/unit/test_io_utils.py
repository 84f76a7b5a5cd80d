"""atomic_path: all-or-nothing writes, no overwrites, and dead writers' leftovers cleaned."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest

from rtb.errors import RtbError
from rtb.io_utils import STALE_TMP_SECONDS, atomic_path, remove_stale_tmp_files


def test_failed_block_leaves_nothing_and_success_renames(tmp_path) -> None:
    final = tmp_path / "out.txt"
    with pytest.raises(ValueError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole"
    assert final.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RtbError, match="never overwritten"), atomic_path(final) as tmp:
        tmp.write_text("again")
    assert final.read_text() == "whole"


def _age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_old_unlocked_leftover_is_removed_by_the_next_writer(tmp_path) -> None:
    leftover = tmp_path / ".tmp-pipeline_20260101T000000Z.pkl.abc123"
    leftover.write_bytes(b"partial")
    _age(leftover, STALE_TMP_SECONDS + 5)
    with atomic_path(tmp_path / "pipeline_20260102T000000Z.pkl") as tmp:
        tmp.write_bytes(b"model")
    assert not leftover.exists()


def test_young_or_locked_temporary_files_are_left_alone(tmp_path) -> None:
    young = tmp_path / ".tmp-a.csv.1"
    young.write_bytes(b"being written")
    locked = tmp_path / ".tmp-b.csv.2"
    locked.write_bytes(b"being written slowly")
    _age(locked, STALE_TMP_SECONDS + 5)
    holder = subprocess.Popen(  # another live writer holding its lock
        [sys.executable, "-c",
         "import fcntl,sys,time; f=open(sys.argv[1],'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(30)", str(locked)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_tmp_files(tmp_path) == []
        assert young.exists() and locked.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_tmp_files(tmp_path) == [locked]  # its writer is gone now


def test_writer_holds_its_lock_while_writing(tmp_path) -> None:
    with atomic_path(tmp_path / "x.bin") as tmp:
        with open(tmp, "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


CLAIM_AND_WRITE = """
import sys, time
from pathlib import Path
from rtb.config import claimed_version
folder = Path(sys.argv[1])
def taken(version):
    return (folder / f"out_{version}.txt").exists()
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # both processes claim at the same instant
with claimed_version(folder, taken) as version:
    time.sleep(0.3)  # the work between claiming a version and writing under it
    (folder / f"out_{version}.txt").write_text(version)
print(version)
"""


def test_two_processes_claiming_in_the_same_second_get_different_versions(tmp_path) -> None:
    """A scheduled and a manual predict run of one file start in the same second: each must
    get a version of its own (versions have 1 s resolution), and no claim is left behind."""
    start = time.time() + 1.0
    runs = [subprocess.Popen([sys.executable, "-c", CLAIM_AND_WRITE, str(tmp_path), str(start)],
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    versions = [run.communicate(timeout=60)[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert len(set(versions)) == 2, versions
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"out_{v}.txt" for v in versions)
