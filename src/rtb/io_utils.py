"""Atomic writes and fingerprints: no artifact is ever half-written or overwritten.

Every writer produces a temporary file in the destination folder, flushes and fsyncs it,
then renames it into place. A process killed midway leaves only a `.tmp-*` file that no
reader looks at; readers never see a truncated artifact under its final name. Writers hold an
flock on their temporary file, so the next writer in the folder can tell a dead one's
leftover (lockable, and old) from a live write and remove it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from rtb.errors import RtbError

TMP_PREFIX = ".tmp-"
EXISTS = "already exists; versioned artifacts are never overwritten"
ARTIFACT_MODE = 0o644  # shared: Airflow, the scoring service and the user all read artifacts
STALE_TMP_SECONDS = 600

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it to `final` only if the block succeeds.

    With `overwrite=False` an existing `final` is an error: versioned artifacts never replace
    each other. The rename uses `os.link` semantics for that case so that two writers racing
    for the same name cannot both win.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RtbError(f"{final.parent}: cannot create output folder ({exc.strerror})") from exc
    if not overwrite and final.exists():
        raise RtbError(f"{final}: {EXISTS}")
    remove_stale_tmp_files(final.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "a live writer owns this file"; released on death
        os.fchmod(fd, ARTIFACT_MODE)
    except OSError as exc:
        raise RtbError(f"{final.parent}: cannot write ({exc.strerror})") from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        if overwrite:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError as exc:
                raise RtbError(f"{final}: {EXISTS}") from exc
            tmp.unlink()
        _fsync_dir(final.parent)
    except OSError as exc:
        raise RtbError(f"{final}: write failed ({exc.strerror or exc})") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.close(fd)


def replace_set(final: Path, write: Callable[[Path], object]) -> Path:
    """Publish a folder of files as one unit that replaces the previous one atomically.

    `final` is a symlink to a hidden sibling folder `.<name>.<token>`. `write(folder)` fills a
    new such folder; then a temporary symlink to it is renamed over `final`, one rename, so a
    reader sees the old set or the new one, never a mix, and never none; then the old folder
    is removed. A writer that dies leaves only a hidden folder nothing points to, which the
    next writer removes once it is older than `STALE_TMP_SECONDS`.
    """
    final = Path(final)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RtbError(f"{parent}: cannot create output folder ({exc.strerror})") from exc
    if final.exists() and not final.is_symlink():
        raise RtbError(f"{final}: exists and is not a published set (a symlink); refusing to replace it")
    previous = parent / os.readlink(final) if final.is_symlink() else None
    _remove_stale_sets(final, keep=previous)
    folder = parent / f".{final.name}.{time.strftime('%Y%m%dT%H%M%S')}.{secrets.token_hex(4)}"
    link = parent / f"{TMP_PREFIX}{final.name}.{secrets.token_hex(4)}"
    try:
        folder.mkdir()
        write(folder)
        _fsync_dir(folder)
        link.symlink_to(folder.name)
        os.replace(link, final)
        _fsync_dir(parent)
    except BaseException as exc:
        link.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RtbError(f"{final}: write failed ({exc.strerror or exc})") from exc
        raise
    if previous is not None and previous != folder:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def _remove_stale_sets(final: Path, keep: Path | None, older_than: float = STALE_TMP_SECONDS) -> None:
    now = time.time()
    for candidate in final.parent.glob(f".{final.name}.*"):
        try:
            if candidate == keep or now - candidate.stat().st_mtime < older_than:
                continue
        except OSError:
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        log.info("%s: removed an unpublished set left by a dead writer", candidate)


def remove_stale_tmp_files(folder: Path, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete `.tmp-*` files left by writers that died (killed mid-write, disk full).

    A file counts as dead only if no process holds its flock (the kernel drops a dead
    process's locks) and it has not been modified for `older_than` seconds, which also covers
    the instant between a live writer creating its file and locking it.
    """
    removed = []
    try:
        candidates = [p for p in Path(folder).iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        try:
            if now - path.stat().st_mtime < older_than:
                continue
            with open(path, "rb") as handle:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    if removed:
        log.info("%s: removed %d stale temporary file(s) of dead writers", folder, len(removed))
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _PlainDumper(yaml.SafeDumper):
    """Writes a value used twice in full both times, never as a `&id001` anchor + alias."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def write_yaml(path: Path, payload: dict, *, overwrite: bool = False) -> None:
    """Write `payload` as YAML atomically."""
    text = yaml.dump(payload, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, with a one-line error naming the file when it is not one."""
    try:
        payload = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise RtbError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise RtbError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(payload, dict):
        raise RtbError(f"{path}: expected a YAML mapping, got {type(payload).__name__}")
    return payload


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed so that multi-GB inputs do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
