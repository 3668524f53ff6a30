"""Training data: fetched from PyPI archives with pip, cached under ``data/``, checked by sha256.

Two real data sets, both shipped inside packages on PyPI, so the only network this needs is a package
registry:

* Irish folk tunes in ABC notation (MIT 6.S191 lab 1, music generation): ``mitdeeplearning/data/irish.abc``
inside
  the source archive of ``mitdeeplearning==0.7.5``. We never install or import that package (it pulls
  tensorflow); ``pip download --no-deps --no-build-isolation`` fetches the sdist and we read the one member
  out of the tarball.
* KDD-TSAD #135 from the UCR time-series anomaly archive (Wu & Keogh 2021; "InternalBleeding16", a heart-rate
series,
  1,200 normal training points, 7,501 test points, anomaly at 4187..4198) ships as two CSVs inside the
  ``aeon`` wheel. The wheel is a zip, so we read the CSVs without installing or importing aeon (its import
  needs numba).

Fetching happens only through ``python -m models.data`` (``make data``); loaders used by training read the
cache and fail with a message naming that command if it is missing. Tests build small synthetic archives and
call the same extraction functions.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path("data")

TUNES_PACKAGE = "mitdeeplearning==0.7.5"
TUNES_MEMBER = "mitdeeplearning-0.7.5/mitdeeplearning/data/irish.abc"
TUNES_FILE = "irish.abc"
TUNES_SHA256 = "df3782d5f7b5a2f4c66aa7c13f13008d5f48757b3f5f51620cd6c1ceb2c53023"

# aeon is pinned so the member names and checksums below stay valid.
UCR_PACKAGE = "aeon==1.6.0"
UCR_TRAIN_MEMBER = "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TRAIN.csv"
UCR_TEST_MEMBER = "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv"
UCR_TRAIN_FILE = "ucr135_train.csv"
UCR_TEST_FILE = "ucr135_test.csv"
UCR_TRAIN_SHA256 = "a531b6f4f556b17c0321d144c3f6b4a7bdf5e8464b2218566181702e77962c2b"
UCR_TEST_SHA256 = "fe26577b94896943e8205d04d56bf2511fe05c008df535a1ec3826adff3597e2"
# The archive's labelled anomaly (inclusive) and its scoring tolerance (Wu & Keogh: +-100 points).
UCR_ANOMALY = (4187, 4198)
UCR_TOLERANCE = 100


class DataError(RuntimeError):
    """A data file is missing, unreadable, or does not match its recorded checksum."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str, what: str) -> None:
    """Raise :class:`DataError` unless ``data`` hashes to ``expected``."""
    got = sha256_bytes(data)
    if got != expected:
        raise DataError(
            f"{what}: sha256 {got} does not match the expected {expected}; the file is corrupt or a "
            "different release"
        )


def read_tar_member(archive: Path, member: str) -> bytes:
    """Bytes of one member of a (gzipped) tar archive, e.g. an sdist."""
    with tarfile.open(archive, "r:*") as tar:
        try:
            info = tar.getmember(member)
        except KeyError as e:
            raise DataError(f"{archive.name} has no member {member!r}") from e
        f = tar.extractfile(info)
        if f is None:
            raise DataError(f"{archive.name}: {member!r} is not a regular file")
        return f.read()


def read_zip_member(archive: Path, member: str) -> bytes:
    """Bytes of one member of a zip archive, e.g. a wheel."""
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(member)
        except KeyError as e:
            raise DataError(f"{archive.name} has no member {member!r}") from e


def pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """Download one package archive with pip (no dependencies) into ``dest`` and return its path.

    ``sdist=True`` asks for the source archive; mitdeeplearning's setup script imports pkg_resources, so pip
    must run without build isolation in an environment that has ``setuptools<81`` and ``wheel``.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    cmd += ["--no-build-isolation", "--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(
            f"`pip download {requirement}` failed (is a package registry reachable?):\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    files = sorted(p for p in dest.iterdir() if p.suffix in (".gz", ".whl", ".zip"))
    if not files:
        raise DataError(f"`pip download {requirement}` wrote no archive into {dest}")
    return files[0]


def _cache(data: bytes, expected: str, path: Path, what: str) -> Path:
    check_sha256(data, expected, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic, so a killed fetch never leaves a half-written cache file
    return path


def _cached_ok(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_bytes(path.read_bytes()) == expected


def fetch_tunes(data_dir: Path = DATA_DIR) -> Path:
    """Fetch (or reuse the cached, checksum-verified) ``irish.abc``; return its path."""
    path = data_dir / TUNES_FILE
    if _cached_ok(path, TUNES_SHA256):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download(TUNES_PACKAGE, Path(tmp), sdist=True)
        return _cache(read_tar_member(archive, TUNES_MEMBER), TUNES_SHA256, path, TUNES_MEMBER)


def fetch_ucr135(data_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """Fetch (or reuse the cached, checksum-verified) UCR #135 train/test CSVs; return their paths."""
    train, test = data_dir / UCR_TRAIN_FILE, data_dir / UCR_TEST_FILE
    if _cached_ok(train, UCR_TRAIN_SHA256) and _cached_ok(test, UCR_TEST_SHA256):
        return train, test
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download(UCR_PACKAGE, Path(tmp), sdist=False)
        _cache(read_zip_member(archive, UCR_TRAIN_MEMBER), UCR_TRAIN_SHA256, train, UCR_TRAIN_MEMBER)
        _cache(read_zip_member(archive, UCR_TEST_MEMBER), UCR_TEST_SHA256, test, UCR_TEST_MEMBER)
    return train, test


def _require(path: Path, expected: str) -> bytes:
    if not path.is_file():
        raise DataError(f"{path} is missing: run `make data` (or `python -m models.data`) first")
    data = path.read_bytes()
    check_sha256(data, expected, str(path))
    return data


# -----------------------------------------------------------------------------------------------------------
# Character data (tunes)
# -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharCorpus:
    """A text split into train/validation by whole tunes, with its character vocabulary (index = token id)."""

    vocabulary: tuple[str, ...]
    train: np.ndarray  # (N_train,) int64
    val: np.ndarray  # (N_val,) int64
    n_tunes: int
    description: str

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``; raises ValueError on a character outside the vocabulary."""
        index = {c: i for i, c in enumerate(self.vocabulary)}
        try:
            return np.array([index[c] for c in text], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from e

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of token ids."""
        return "".join(self.vocabulary[int(i)] for i in ids)


def split_tunes(text: str) -> list[str]:
    """Split an ABC file into tunes: each starts at an ``X:`` line; surrounding blank lines are dropped."""
    tunes: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("X:") or not tunes:
            tunes.append([])
        tunes[-1].append(line)
    return [t for t in ("\n".join(lines).strip() for lines in tunes) if t.startswith("X:")]


def make_char_corpus(
    text: str, val_fraction: float = 0.1, description: str = "", seed: int = 0
) -> CharCorpus:
    """Build a :class:`CharCorpus`: a seeded random ``val_fraction`` of the tunes (whole) are validation.

    The file is ordered by tune type (hornpipes, jigs, reels, ...), so a random split of whole tunes, not the
    last tunes of the file, keeps validation representative without leaking any tune into training.
    """
    tunes = split_tunes(text)
    if len(tunes) < 2:
        raise DataError(f"expected at least 2 ABC tunes (lines starting with 'X:'), found {len(tunes)}")
    n_val = max(1, round(len(tunes) * val_fraction))
    order = np.random.default_rng(seed).permutation(len(tunes))
    val_idx = set(order[:n_val].tolist())
    # Tunes are joined by a blank line, as in the file, so the model learns where a tune ends.
    train_text = "\n\n".join(t for i, t in enumerate(tunes) if i not in val_idx) + "\n\n"
    val_text = "\n\n".join(t for i, t in enumerate(tunes) if i in val_idx) + "\n\n"
    vocabulary = tuple(sorted(set(train_text) | set(val_text)))
    index = {c: i for i, c in enumerate(vocabulary)}
    enc = lambda s: np.fromiter((index[c] for c in s), dtype=np.int64, count=len(s))  # noqa: E731
    return CharCorpus(vocabulary, enc(train_text), enc(val_text), len(tunes), description)


def load_tunes(data_dir: Path = DATA_DIR, val_fraction: float = 0.1) -> CharCorpus:
    """Load the cached tunes as a :class:`CharCorpus` (run ``make data`` first)."""
    text = _require(data_dir / TUNES_FILE, TUNES_SHA256).decode("utf-8")
    desc = (
        f"Irish folk tunes in ABC notation (mitdeeplearning 0.7.5 data/irish.abc, MIT 6.S191), "
        f"sha256 {TUNES_SHA256[:12]}; a seeded random {val_fraction:.0%} of the tunes held out for validation"
    )
    return make_char_corpus(text, val_fraction, desc)


def stream_batches(ids: np.ndarray, batch: int, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Truncated-BPTT batches over ``batch`` parallel streams of ``ids``.

    The corpus is cut into ``batch`` contiguous streams; chunk k of every stream follows chunk k-1, so a model
    that carries its state from one yielded batch to the next sees each stream in order (Karpathy's char-rnn
    layout). Yields ``(x, y)`` int64 arrays of shape (batch, seq_len) with ``y`` = ``x`` shifted by one
    character.
    """
    n = (len(ids) - 1) // batch
    if n < 1:
        raise ValueError(f"{len(ids)} tokens are too few for {batch} streams")
    xs = ids[: n * batch].reshape(batch, n)  # (B, n)
    ys = ids[1 : n * batch + 1].reshape(batch, n)  # (B, n)
    for start in range(0, n, seq_len):
        yield xs[:, start : start + seq_len], ys[:, start : start + seq_len]


# -----------------------------------------------------------------------------------------------------------
# Numeric data (UCR #135)
# -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnomalySeries:
    """A univariate anomaly benchmark: normal training points, a test series and its labelled anomaly."""

    train: np.ndarray  # (N_train,) float64
    test: np.ndarray  # (N_test,) float64
    labels: np.ndarray  # (N_test,) bool, True inside the labelled anomaly
    anomaly: tuple[int, int]  # inclusive index range in ``test``
    tolerance: int
    description: str


def read_ucr_csv(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse an aeon UCR anomaly CSV (``timestamp,value,is_anomaly``) into (values, labels)."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    if not rows or [c.strip() for c in rows[0]] != ["timestamp", "value", "is_anomaly"]:
        raise DataError(
            f"expected the header 'timestamp,value,is_anomaly', got {rows[0] if rows else 'nothing'}"
        )
    body = [r for r in rows[1:] if r]
    values = np.array([float(r[1]) for r in body], dtype=np.float64)
    labels = np.array([r[2].strip() == "1" for r in body], dtype=bool)
    if not np.all(np.isfinite(values)):
        raise DataError("the series has non-finite values")
    return values, labels


def load_ucr135(data_dir: Path = DATA_DIR) -> AnomalySeries:
    """Load the cached UCR #135 series (run ``make data`` first); check the labels against the archive's."""
    train, _ = read_ucr_csv(_require(data_dir / UCR_TRAIN_FILE, UCR_TRAIN_SHA256))
    test, labels = read_ucr_csv(_require(data_dir / UCR_TEST_FILE, UCR_TEST_SHA256))
    where = np.flatnonzero(labels)
    if where.size == 0 or (int(where[0]), int(where[-1])) != UCR_ANOMALY:
        raise DataError(
            f"labelled anomaly {where[:1]}..{where[-1:]} differs from the archive's {UCR_ANOMALY}"
        )
    desc = (
        f"UCR anomaly archive KDD-TSAD #135 InternalBleeding16 (heart rate; aeon 1.6.0 data), "
        f"{len(train)} normal training points, {len(test)} test points, anomaly at {UCR_ANOMALY[0]}-"
        f"{UCR_ANOMALY[1]}"
    )
    return AnomalySeries(train, test, labels, UCR_ANOMALY, UCR_TOLERANCE, desc)


def bits(nats: float) -> float:
    """Convert a loss in nats to bits."""
    return nats / math.log(2)


def main(argv: list[str] | None = None) -> int:
    """``python -m models.data``: fetch both data sets into ``--data-dir`` (default ``data/``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args(argv)
    try:
        tunes = fetch_tunes(args.data_dir)
        train, test = fetch_ucr135(args.data_dir)
    except DataError as e:
        print(f"make data failed: {e}", file=sys.stderr)
        return 1
    corpus = load_tunes(args.data_dir)
    series = load_ucr135(args.data_dir)
    print(
        f"{tunes}: {corpus.n_tunes} tunes, {len(corpus.train) + len(corpus.val)} chars, "
        f"{len(corpus.vocabulary)} symbols (sha256 ok)"
    )
    print(
        f"{train}, {test}: {len(series.train)} train / {len(series.test)} test points, anomaly "
        f"{series.anomaly} (sha256 ok)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
