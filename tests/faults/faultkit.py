"""Helpers for the fault-injection tests: run the real CLI, kill it mid-write, watch a folder
with inotify, fingerprint a project, mount a full or read-only file system over a folder."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
import yaml

from rtb.config import ProjectPaths
from rtb.io_utils import TMP_PREFIX, sha256_file
from rtb.models.registry import ModelEntry

BIG_TEST_ROWS = 300_000
TRAIN_ROWS = 5_000
SMALL_TEST_ROWS = 2_000

# ----------------------------------------------------------------------------------------------
# Running the real CLI


def rtb_command(*args: str) -> list[str]:
    """The installed `rtb` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("rtb")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "rtb.cli"]
    return [*prefix, *args]


def start_rtb(*args: str, log: Path, preexec: Callable[[], None] | None = None) -> subprocess.Popen:
    """Start `rtb ARGS` with stderr in `log` (a pipe nobody reads could block the child).

    `preexec` runs in the child before exec (e.g. to pin it to a CPU: see kill_mid_write).
    """
    with open(log, "ab") as handle:
        return subprocess.Popen(rtb_command(*args), stdout=handle, stderr=handle, preexec_fn=preexec)


@dataclass
class Finished:
    code: int
    stderr: str


def run_rtb(*args: str, log: Path, timeout: float = 300) -> Finished:
    """Run `rtb ARGS` to completion in a subprocess."""
    log.write_bytes(b"")
    proc = start_rtb(*args, log=log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"`rtb {' '.join(args)}` hung for {timeout} s: {tail(log)}") from None
    return Finished(proc.returncode, log.read_text(errors="replace"))


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "<no log>"


def error_line(stderr: str) -> str:
    """The one `rtb: error:` line (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("rtb: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than `seconds`.

    A guard against hangs (a lock never released, quadratic work), not a timing assertion.
    """

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# Watching a folder: which names get created or opened (Linux inotify through libc)

IN_MODIFY = 0x00000002
IN_OPEN = 0x00000020
IN_CREATE = 0x00000100
_EVENT = struct.Struct("iIII")


class Inotify:
    """inotify on one folder. Events name the entry, whichever process touched it."""

    def __init__(self, folder: Path, mask: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc.inotify_add_watch(self._fd, os.fsencode(folder), mask) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")
        self.events: list[tuple[int, str]] = []

    def poll(self, timeout: float = 0.0) -> list[tuple[int, str]]:
        """Events queued now or arriving within `timeout` seconds; all are kept in `events`."""
        new: list[tuple[int, str]] = []
        ready, _, _ = select.select([self._fd], [], [], timeout)
        while ready:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0").decode(errors="replace")
                new.append((mask, name))
                offset = start + length
        self.events.extend(new)
        return new

    def names(self, mask: int) -> set[str]:
        """Entries that had one of the `mask` events (also after `close`)."""
        if self._fd >= 0:
            self.poll()
        return {name for event, name in self.events if event & mask and name}

    def close(self) -> None:
        """Collect what is queued, then stop watching."""
        if self._fd >= 0:
            self.poll()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# What is on disk


def final_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path, temp files excluded."""
    return {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(TMP_PREFIX)
    }


def tmp_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)} if folder.exists() else set()


def final_name_of(tmp_name: str) -> str:
    """`.tmp-<final name>.<random>` -> `<final name>` (see rtb.io_utils.atomic_path)."""
    assert tmp_name.startswith(TMP_PREFIX), tmp_name
    return tmp_name[len(TMP_PREFIX) :].rsplit(".", 1)[0]


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    """Every final file that existed before is still there, byte-identical."""
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert not changed, f"final files changed or lost: {changed}"


@dataclass
class KilledRun:
    tmp: Path  # the temp file the killed run was writing
    final: Path  # the name it would have become
    before: dict[str, str]  # final files (relative path -> sha256) just before the run
    attempts: int


@contextlib.contextmanager
def _killer_preempts_child() -> Iterator[Callable[[], None]]:
    """Make the kill land the moment the child's write syscall returns, not some time later.

    The watcher (this thread) and the child share one CPU and the watcher runs SCHED_FIFO: an
    inotify event then wakes the watcher, which preempts the child before it runs another
    instruction of its own, so the SIGKILL cannot come after a rename that was just a few
    microseconds away (a small file is written, fsynced and renamed in far less time than an
    ordinary wake-up takes on a busy machine). Without CAP_SYS_NICE the child runs at nice 19
    instead, which makes the same outcome likely but not certain; then the attempts count.
    Yields the child's preexec function; restores this thread's CPUs and policy afterwards.
    """
    cpus = os.sched_getaffinity(0)
    cpu = max(cpus)
    policy, priority = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        realtime = True
    except PermissionError:
        realtime = False

    def pin_child() -> None:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # no RT child, ever
        os.sched_setaffinity(0, {cpu})
        if not realtime:
            os.nice(19)

    try:
        yield pin_child
    finally:
        if realtime:
            os.sched_setscheduler(0, policy, os.sched_param(priority))
        os.sched_setaffinity(0, cpus)


def kill_mid_write(
    root: Path,
    args: tuple[str, ...],
    folder: Path,
    match: Callable[[str], bool],
    log: Path,
    *,
    attempts: int = 3,
    timeout: float = 300,
) -> KilledRun:
    """Start `rtb ARGS`, SIGKILL it right after its first non-empty write to a matching temp
    file in `folder` (inotify IN_MODIFY, the file has bytes), so that it dies mid-write.

    A kill counts as mid-write when the temp file is still there afterwards and its final
    name is absent or unchanged: the rename or link had not happened. The watcher preempts the
    child (see _killer_preempts_child), so that holds on the first attempt; if it ever does
    not, the attempts are repeated and then the test FAILS: a kill that missed tested nothing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    missed: list[str] = []
    for attempt in range(1, attempts + 1):
        before = final_files(root)
        existing = tmp_files(folder)
        log.write_bytes(b"")
        with _killer_preempts_child() as pin_child, Inotify(folder, IN_CREATE | IN_MODIFY) as watch:
            proc = start_rtb(*args, log=log, preexec=pin_child)
            candidates: set[str] = set()
            killed_on = None
            started = time.monotonic()
            while killed_on is None:
                for mask, name in watch.poll(0.05):
                    if name in existing or not match(name):
                        continue
                    if mask & IN_CREATE:
                        candidates.add(name)
                    elif name in candidates and _has_bytes(folder / name):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed_on = name
                        break
                if killed_on is None and proc.poll() is not None:
                    raise AssertionError(
                        f"`rtb {' '.join(args)}` exited {proc.returncode} before writing to the "
                        f"temp file to kill it on (created: {sorted(candidates)}): {tail(log)}"
                    )
                if time.monotonic() - started > timeout:
                    proc.kill()
                    proc.wait()
                    raise AssertionError(f"no write to a matching temp file after {timeout} s: {tail(log)}")
            proc.wait()
        if proc.returncode == 0:  # it finished between the write and the kill
            missed.append(f"attempt {attempt}: `rtb` exited 0 before the SIGKILL landed")
            continue
        assert proc.returncode == -signal.SIGKILL, tail(log)
        tmp = folder / killed_on
        final = folder / final_name_of(killed_on)
        rel = str(final.relative_to(root))
        untouched = not final.exists() or before.get(rel) == sha256_file(final)
        if tmp.exists() and untouched:
            return KilledRun(tmp, final, before, attempt)
        missed.append(
            f"attempt {attempt}: temp file {'kept' if tmp.exists() else 'gone'}, "
            f"{final.name} {'untouched' if untouched else 'written'}"
        )
    raise AssertionError(
        f"the SIGKILL landed after the {folder.name}/ write was complete in {attempts} tries, "
        f"so no kill was mid-write: {missed}"
    )


def _has_bytes(path: Path) -> bool:
    """A write put data in `path` (not just the O_TRUNC of an open); a vanished file counts,
    so that a rename before the kill shows up as a miss instead of waiting forever."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return True


# ----------------------------------------------------------------------------------------------
# Mounts (root only): a small tmpfs, or a read-only bind mount, over an output folder


class Mounter:
    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def _mount(self, *args: str) -> None:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"`mount {' '.join(args)}` is not permitted here: {result.stderr.strip()}")

    def tmpfs(self, target: Path, size: str = "2m") -> None:
        target.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target))
        self.mounted.append(target)

    def read_only(self, target: Path) -> None:
        """Bind `target` onto itself, then remount that bind read-only (root ignores chmod)."""
        target.mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(target), str(target))
        self.mounted.append(target)
        self._mount("-o", "remount,bind,ro", str(target))

    def unmount_all(self) -> None:
        while self.mounted:
            target = self.mounted.pop()
            if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill_up(folder: Path, leave_bytes: int) -> None:
    """Fill the file system holding `folder` until about `leave_bytes` are free."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(folder / "disk-filler.bin", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))


@dataclass(frozen=True)
class Template:
    paths: ProjectPaths
    worse: ModelEntry  # trained on shuffled labels: any real training beats (and replaces) it
    champion: ModelEntry


def copy_project(source: ProjectPaths, dest: Path) -> ProjectPaths:
    """A private copy (real copies: tests write raw files, and a hard link would share them)."""
    shutil.copytree(source.root, dest)
    return ProjectPaths(dest)


# ----------------------------------------------------------------------------------------------
# Prediction sets


def assert_prediction_set(paths: ProjectPaths, sidecar_path: Path) -> tuple[str, np.ndarray]:
    """A prediction set agrees with its sidecar: outputs, rows, ids, model and input sha256.

    Returns the model file the sidecar names and the probabilities.
    """
    sidecar = yaml.safe_load(sidecar_path.read_text())
    version = sidecar["version"]
    assert sidecar_path.name == f"predictions_{version}.yaml"
    npy, csv = (paths.predictions_dir / name for name in sidecar["outputs"])
    assert (npy.name, csv.name) == (f"predictions_{version}.npy", f"predictions_{version}.csv")
    probabilities = np.load(npy)
    table = pcsv.read_csv(csv, convert_options=pcsv.ConvertOptions(column_types={"id": pa.string()}))
    assert len(probabilities) == table.num_rows == sidecar["rows"]
    assert np.allclose(table.column("probability").to_numpy(), probabilities, rtol=1e-12, atol=0)
    assert sidecar["mean_probability"] == pytest.approx(float(probabilities.mean()), rel=1e-12)
    model = paths.models_dir / sidecar["model"]["file"]
    assert sha256_file(model) == sidecar["model"]["sha256"], f"{model.name} is not what was used"
    report = yaml.safe_load(paths.report(sidecar["model"]["version"]).read_text())
    assert report["artifacts"]["model_sha256"] == sidecar["model"]["sha256"]
    hand_over = paths.processed_arrow("test")
    assert sidecar["input"] == {"file": hand_over.name, "sha256": sha256_file(hand_over)}
    processed = paths.processed("test")
    ids = pcsv.read_csv(
        processed,
        convert_options=pcsv.ConvertOptions(column_types={"id": pa.string()}, include_columns=["id"]),
    ).column("id")
    assert table.column("id").equals(ids)
    return model.name, probabilities


def expected_probabilities(paths: ProjectPaths, entry: ModelEntry) -> np.ndarray:
    """What `entry` predicts for the processed test set, computed here, in-process."""
    from rtb.data.preprocessing import read_processed
    from rtb.dataset_config import load_dataset_config
    from rtb.models import registry
    from rtb.models.make_predicting import predict

    cfg = load_dataset_config("rtb")
    frame = read_processed(paths.processed_arrow("test"), cfg, require_target=False)
    return predict(registry.load_verified(entry), frame, cfg)
