"""MNIST and scikit-learn's digits as standardised 28x28 images; nothing is downloaded.

Real MNIST is read from the four gzipped IDX files as distributed (checked against a
``SHA256SUMS`` file next to them when there is one); the default dataset is scikit-learn's
bundled 8x8 digits, upsampled so that the MNIST models run unchanged.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


class Dataset(NamedTuple):
  """Normalised images ``(n, 28, 28, 1)`` float32 and int32 labels."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def read_idx(path: os.PathLike) -> np.ndarray:
  """Reads a (gzipped) IDX file: the format MNIST is distributed in.

  Header: two zero bytes, a type code (0x08 = uint8), the number of dims, then one big-endian
  uint32 per dim; the data follows row-major.

  Args:
    path: path of an ``.idx*`` or ``.idx*.gz`` file.

  Returns:
    A uint8 array with the shape recorded in the header.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"read_idx: expected an IDX file of unsigned bytes (magic 00 00 08 ..), got "
                     f"header {raw[:4].hex()} in {path}.")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != math.prod(dims):
    raise ValueError(f"read_idx: header of {path} promises shape {dims} "
                     f"({math.prod(dims)} bytes), got {data.size} bytes of data.")
  return data.reshape(dims)


def verify_checksums(data_dir: os.PathLike, names: Sequence[str]) -> None:
  """Checks files against a ``SHA256SUMS`` file in ``data_dir``, if there is one.

  Args:
    data_dir: folder holding the files and, optionally, ``SHA256SUMS`` (``sha256sum`` output).
    names: file names in ``data_dir`` to check; names the sums file does not list are skipped.

  Raises:
    ValueError: a file's digest differs from the one recorded.
  """
  sums_file = Path(data_dir) / "SHA256SUMS"
  if not sums_file.exists():
    return
  expected = {}
  for line in sums_file.read_text().splitlines():
    if line.strip():
      digest, name = line.split()
      expected[name.lstrip("*")] = digest
  for name in names:
    if name not in expected:
      continue
    got = hashlib.sha256((Path(data_dir) / name).read_bytes()).hexdigest()
    if got != expected[name]:
      raise ValueError(f"{Path(data_dir) / name}: expected sha256 {expected[name]} (from "
                       f"SHA256SUMS), got {got}.")


def _normalise(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray) -> Dataset:
  # Standardised with the training set's statistics only, so the test set stays unseen.
  x_train = x_train.astype(np.float32)
  x_test = x_test.astype(np.float32)
  mean, std = float(x_train.mean()), float(x_train.std())
  return Dataset(name, ((x_train - mean) / std)[..., None], y_train.astype(np.int32),
                 ((x_test - mean) / std)[..., None], y_test.astype(np.int32))


def load_mnist(data_dir: os.PathLike, verify: bool = True) -> Dataset:
  """MNIST (60k train / 10k test) from the four gzipped IDX files in ``data_dir``.

  Args:
    data_dir: folder with ``train-images-idx3-ubyte.gz`` and the three other files.
    verify: check them against ``SHA256SUMS`` in the same folder when it exists.

  Returns:
    A `Dataset`, pixels standardised with the training set's mean and std.
  """
  data_dir = Path(data_dir)
  missing = [f for f in MNIST_FILES.values() if not (data_dir / f).exists()]
  if missing:
    raise ValueError(f"data_dir: expected the MNIST IDX files {sorted(MNIST_FILES.values())} "
                     f"in {data_dir}, missing {missing}.")
  if verify:
    verify_checksums(data_dir, list(MNIST_FILES.values()))
  arrays = {k: read_idx(data_dir / f) for k, f in MNIST_FILES.items()}
  return _normalise("mnist", **arrays)


@functools.lru_cache(maxsize=2)
def load_digits28(test_size: int = 297, seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images), upsampled 3x and padded to 28x28.

  Each pixel becomes a 3x3 block (24x24) with a 2-pixel border, so the MNIST models run
  unchanged. Nothing is downloaded: the data ships inside scikit-learn.

  Args:
    test_size: images held out for testing (a fixed random split).
    seed: seed of the split.

  Returns:
    A `Dataset` (1500 train / 297 test with the defaults).
  """
  from sklearn.datasets import load_digits  # optional dependency: only the default path needs it

  digits = load_digits()
  images = np.kron(digits.images, np.ones((1, 3, 3))) / 16.0
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  order = np.random.default_rng(seed).permutation(len(images))
  test, train = order[:test_size], order[test_size:]
  return _normalise("digits", images[train], digits.target[train], images[test],
                    digits.target[test])
