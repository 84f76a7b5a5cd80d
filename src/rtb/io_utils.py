"""Atomic writes and fingerprints: no artifact is ever half-written or overwritten.

Every writer produces a temporary file in the destination folder, flushes and fsyncs it,
then renames it into place. A process killed midway leaves only a `.tmp-*` file that no
reader looks at; readers never see a truncated artifact under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from rtb.errors import RtbError

TMP_PREFIX = ".tmp-"
EXISTS = "already exists; versioned artifacts are never overwritten"


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
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    except OSError as exc:
        raise RtbError(f"{final.parent}: cannot write ({exc.strerror})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; artifacts are shared (Airflow, the scoring service, the user).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
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
