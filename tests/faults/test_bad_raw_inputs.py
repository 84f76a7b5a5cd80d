"""Bad raw logs given to `rtb make-dataset`: each one fails with exit 1 and one short line naming
the file, and the previous interim table stays byte-identical (no temp file left). Odd but valid
logs (unicode ids, CRLF line endings, timestamps in the future) succeed.

The fuzz part is seeded and runs a fixed number of cases per kind, so every machine tries the
same inputs (none is dropped on a slow one); it uses no extra library.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Callable
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.feather as feather
import pytest
from conftest import small_raw_frame, write_raw

from rtb.io_utils import sha256_file

from .faultkit import deadline, error_line, tmp_files

RAW = "training_data.csv.gz"
MAX_LINE = 1000  # a clear message, not a dump of the input
TEN_MB = 10 << 20


def _valid_text(rows: int = 300) -> str:
    return small_raw_frame(rows).to_csv(sep=";", index=False)


def _with_field(row: int, column: str, value: str) -> bytes:
    """The valid log with one field of one data row replaced by raw text."""
    lines = _valid_text().splitlines()
    header = lines[0].split(";")
    fields = lines[row + 1].split(";")
    fields[header.index(column)] = value
    lines[row + 1] = ";".join(fields)
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _scattered_nul_bytes() -> bytes:
    text = bytearray(_valid_text().encode())
    for offset in random.Random(3).sample(range(200, len(text)), 20):
        text[offset] = 0
    return gzip.compress(bytes(text))


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "random bytes": (lambda: _random(4096, 1), "not gzip-compressed"),
    "random bytes after the gzip magic": (lambda: b"\x1f\x8b" + _random(4096, 2), "cannot read"),
    "random bytes after a whole gzip header": (
        lambda: b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + _random(4096, 3),
        "cannot read",
    ),
    "gzip of random bytes": (lambda: gzip.compress(_random(4096, 4)), "cannot read the header row"),
    "truncated gzip": (
        lambda: gzip.compress(_valid_text(3000).encode())[:-2000],
        "cannot decompress or read",
    ),
    "10 MB single line, no separator": (
        lambda: gzip.compress(b"x" * TEN_MB),
        "found a single column",
    ),
    "10 MB data line after a valid header": (
        lambda: gzip.compress(_valid_text().splitlines()[0].encode() + b"\n" + b"7" * TEN_MB + b"\n"),
        "malformed CSV",
    ),
    "negative count": (
        lambda: _with_field(8, "clickCount", "-3"),
        "column 'clickCount' line 10: expected a count >= 0",
    ),
    "NUL byte in a count": (lambda: _with_field(4, "viewCount", "1\x002"), "column 'viewCount' line 6"),
    "NUL bytes scattered": (_scattered_nul_bytes, "training_data.csv.gz"),
    "header-only gzip": (
        lambda: gzip.compress((_valid_text().splitlines()[0] + "\n").encode()),
        "no data rows after the header",
    ),
    "duplicated header names": (
        lambda: gzip.compress(_valid_text().replace("startCount1d", "startCount", 1).encode()),
        "header repeats column(s) ['startCount']",
    ),
}


def _make_dataset(paths, run_cli, data: bytes, split: str = "train"):
    raw = paths.raw_dir / (RAW if split == "train" else "test_data.csv.gz")
    raw.write_bytes(data)
    return run_cli("make-dataset", "--split", split, "--project-dir", str(paths.root))


def _assert_rejected(paths, result, before: str, expected: str = RAW) -> str:
    assert result.code == 1, result.log[-2000:]
    line = error_line(result.stderr)
    assert RAW in line and expected in line, line
    assert len(line) <= MAX_LINE, f"{len(line)} characters: {line[:300]}..."
    assert sha256_file(paths.interim("train")) == before
    assert not tmp_files(paths.interim_dir)
    return line


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_raw_file_is_one_line_and_nothing_is_lost(case, trained, run_cli) -> None:
    paths = trained.paths
    build, expected = BAD_INPUTS[case]
    before = sha256_file(paths.interim("train"))
    _assert_rejected(paths, _make_dataset(paths, run_cli, build()), before, expected)


def test_ten_megabyte_header_of_repeated_names_fails_fast(trained, run_cli) -> None:
    paths = trained.paths
    before = sha256_file(paths.interim("train"))
    with deadline(5, "make-dataset on a 10 MB header line"):
        result = _make_dataset(paths, run_cli, gzip.compress(b"x;" * (TEN_MB // 2)))
    _assert_rejected(paths, result, before, "header repeats column(s) ['x']")


def test_nul_byte_in_an_id_is_rejected(trained, run_cli) -> None:
    paths = trained.paths
    before = sha256_file(paths.interim("train"))
    result = _make_dataset(paths, run_cli, _with_field(3, "id", "0000\x0000000003"))
    _assert_rejected(paths, result, before, "'id'")


def test_unicode_ids_are_valid_all_the_way_to_the_predictions(trained, run_cli) -> None:
    paths = trained.paths
    frame = small_raw_frame(200, seed=4, start="2019-01-15").drop(columns=["install"])
    frame["id"] = [f"ид-{i:04d}-🎯-ü-中文" for i in range(len(frame))]
    write_raw(frame, paths.raw_dir / "test_data.csv.gz")
    for stage in (("make-dataset", "--split", "test"), ("preprocess", "--split", "test"), ("predict",)):
        result = run_cli(*stage, "--project-dir", str(paths.root))
        assert result.code == 0, result.stderr
    assert feather.read_table(paths.interim("test")).column("id").to_pylist() == frame["id"].tolist()
    (predictions,) = paths.predictions_dir.glob("predictions_*.csv")
    assert pcsv.read_csv(predictions).column("id").to_pylist() == frame["id"].tolist()


@pytest.mark.parametrize("split", ["train", "test"])
def test_crlf_line_endings_are_valid(split, trained, run_cli) -> None:
    paths = trained.paths
    frame = small_raw_frame(300, seed=6)
    if split == "test":  # the last column is then a string one: no '\r' may stick to it
        frame = frame.drop(columns=["install"])
    text = frame.to_csv(sep=";", index=False, lineterminator="\r\n")
    result = _make_dataset(paths, run_cli, gzip.compress(text.encode()), split)
    assert result.code == 0, result.stderr
    table = feather.read_table(paths.interim(split))
    assert table.num_rows == 300
    for name in ("id", "deviceType", "connectionType"):
        values = table.column(name).cast("string").to_pylist()
        assert not any(v is not None and "\r" in v for v in values), name


def _future_log() -> bytes:
    return gzip.compress(small_raw_frame(300, start="2099-01-01").to_csv(sep=";", index=False).encode())


def test_timestamps_in_the_future_are_accepted(trained, run_cli) -> None:
    result = _make_dataset(trained.paths, run_cli, _future_log())
    assert result.code == 0, result.stderr


def test_timestamps_in_the_future_are_logged_as_a_warning(trained, run_cli) -> None:
    result = _make_dataset(trained.paths, run_cli, _future_log())
    assert result.code == 0, result.stderr
    assert "WARNING" in result.log and "future" in result.log.lower()


# ----------------------------------------------------------------------------------------------
# Fuzz: seeded random files of four kinds, and mutations of a valid log

FUZZ_SEED = 20240611
FUZZ_PER_KIND = 30  # cases of each kind: a count, not a time budget, so coverage is fixed


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(out))
        op = rng.random()
        if op < 0.3:
            out[at] = rng.randrange(256)
        elif op < 0.5:
            out[at] = rng.choice(b';\n\r"\x00,.-e ')
        elif op < 0.7:
            del out[at : at + rng.randint(1, 50)]
        elif op < 0.85:
            out[at:at] = bytes(rng.choice(b';\n"\x00') for _ in range(rng.randint(1, 3)))
        else:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 80)]
    return bytes(out)


def test_fuzzed_raw_files_fail_cleanly_or_are_read_whole(trained, run_cli, tmp_path: Path) -> None:
    paths = trained.paths
    rng = random.Random(FUZZ_SEED)
    valid = _valid_text(80).encode()
    kinds: dict[str, Callable[[], bytes]] = {
        "random bytes": lambda: rng.randbytes(rng.randint(1, 3000)),
        "gzip magic + random": lambda: b"\x1f\x8b" + rng.randbytes(rng.randint(0, 3000)),
        "gzip of random bytes": lambda: gzip.compress(rng.randbytes(rng.randint(0, 3000))),
        "gzip of a mutated log": lambda: gzip.compress(_mutate(rng, valid)),
    }
    before = sha256_file(paths.interim("train"))
    raw = paths.raw_dir / RAW
    tried = {kind: 0 for kind in kinds}
    for i in range(FUZZ_PER_KIND):
        for kind, build in kinds.items():
            data = build()
            keep = tmp_path / f"fuzz-{i}-{kind.replace(' ', '_')}.csv.gz"
            try:
                result = _make_dataset(paths, run_cli, data)
                if result.code == 0:
                    table = feather.read_table(paths.interim("train"))
                    assert table.schema.metadata[b"rtb.source_sha256"].decode() == sha256_file(raw)
                    before = sha256_file(paths.interim("train"))
                else:
                    _assert_rejected(paths, result, before)
            except Exception as exc:
                keep.write_bytes(data)
                raise AssertionError(f"{kind} #{i} (input kept in {keep}): {exc!r}") from exc
            tried[kind] += 1
    assert all(tried.values()), tried
    assert tried == dict.fromkeys(kinds, FUZZ_PER_KIND), tried
