"""examples/mnist.py: IDX reading, a short real-MNIST prune run, the digits default end to end."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def _load_example():
  spec = importlib.util.spec_from_file_location("mnist_example", ROOT / "examples" / "mnist.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


M = _load_example()

LENET300_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


def _write_idx(path: Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_bad_header(tmp_path):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / "x.gz", x)
  np.testing.assert_array_equal(M.read_idx(tmp_path / "x.gz"), x)
  with gzip.open(tmp_path / "bad.gz", "wb") as f:
    f.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")  # float32 type code
  with pytest.raises(ValueError, match="unsigned bytes"):
    M.read_idx(tmp_path / "bad.gz")
  with gzip.open(tmp_path / "short.gz", "wb") as f:
    f.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))  # promises 5 bytes, has 2
  with pytest.raises(ValueError, match=r"promises shape \(5,\)"):
    M.read_idx(tmp_path / "short.gz")


def test_verify_checksums(tmp_path):
  (tmp_path / "a.gz").write_bytes(b"abc")
  good = hashlib.sha256(b"abc").hexdigest()
  (tmp_path / "SHA256SUMS").write_text(f"{good}  a.gz\n")
  M.verify_checksums(tmp_path, ["a.gz"])
  (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  a.gz\n")
  with pytest.raises(ValueError, match="expected sha256 0000"):
    M.verify_checksums(tmp_path, ["a.gz"])


def test_digits28_shapes():
  d = M.load_digits28()
  assert d.x_train.shape == (1500, 28, 28, 1) and d.x_test.shape == (297, 28, 28, 1)
  assert d.y_train.dtype == np.int32 and set(np.unique(d.y_train)) == set(range(10))
  # Upsampled 8x8 -> 24x24 plus a 2-pixel border: the border holds the background value only.
  border = np.concatenate([d.x_train[:, :2].ravel(), d.x_train[:, -2:].ravel()])
  assert np.all(border == border[0]) and border[0] == d.x_train.min()


# ------------------------------------------------------------------------------------------------
# Real MNIST, a few hundred steps
# ------------------------------------------------------------------------------------------------

needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                 reason=f"MNIST IDX files not found in {MNIST_DIR}")

TRAIN_SUBSET = 100 * 128  # 100 steps per epoch


@pytest.fixture(scope="module")
def mnist_setup():
  full = M.load_mnist(MNIST_DIR)  # also checks SHA256SUMS
  assert full.x_train.shape == (60000, 28, 28, 1) and full.x_test.shape == (10000, 28, 28, 1)
  data = full._replace(x_train=full.x_train[:TRAIN_SUBSET], y_train=full.y_train[:TRAIN_SUBSET])
  trainer = M.Trainer("lenet300", data, batch_size=128)
  cfg = M.Config(model="lenet300", epochs=2, prune_epochs=1, ft_epochs=1, prune_every=25,
                 sparsity=0.9, scope="global", seed=0)
  dense = M.train_dense(trainer, cfg, progress=False)  # 200 steps
  return trainer, cfg, dense


@needs_mnist
def test_mnist_dense_is_deterministic(mnist_setup):
  trainer, cfg, dense = mnist_setup
  assert trainer.accuracy(dense) > 0.93  # chance is 0.10
  a = M.train_dense(trainer, cfg, progress=False, max_steps=20)
  b = M.train_dense(trainer, cfg, progress=False, max_steps=20)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@needs_mnist
def test_mnist_gradual_reaches_exact_sparsity(mnist_setup):
  trainer, cfg, dense = mnist_setup
  r = M.run(trainer, dataclasses.replace(cfg, mode="gradual", criterion="magnitude"), dense,
            progress=False)  # 100 pruning + 100 fine-tuning steps
  kept = sum(x.kept for x in r.report.prunable_rows)
  assert kept == LENET300_WEIGHTS - round(0.9 * LENET300_WEIGHTS) == 26620
  # The masks and the params agree exactly: pruned weights are 0.0, kept ones are not.
  for p, m in zip(jax.tree.leaves(r.params), jax.tree.leaves(r.masks)):
    if p.ndim >= 2:
      np.testing.assert_array_equal(np.asarray(p) != 0, np.asarray(m))
  assert r.accuracy > 0.9  # chance is 0.10
  # Global magnitude pruning removes most of the input layer (Han et al.'s observation).
  fc1, fc2, fc3 = (x.sparsity for x in r.report.prunable_rows)
  assert fc1 > fc2 > fc3


@needs_mnist
def test_mnist_oneshot_layer_sparsities(mnist_setup):
  trainer, cfg, dense = mnist_setup
  han = M.parse_layer_sparsities("han", "lenet300")
  c = dataclasses.replace(cfg, mode="oneshot", criterion="magnitude", layer_sparsities=han)
  r = M.run(trainer, c, dense, progress=False, max_steps=50)
  kept = [x.kept for x in r.report.prunable_rows]
  assert kept == [235200 - round(0.93 * 235200), 30000 - round(0.91 * 30000),
                  1000 - round(0.74 * 1000)]
  assert r.oneshot_accuracy > 0.5 and r.accuracy > 0.75  # chance is 0.10
  # Bytes and FLOPs come from jp.report: the effective matmul FLOPs scale with density.
  assert r.report.csr_bytes < r.report.dense_bytes
  d = r.report.to_dict()
  assert d["flops/matmul_effective"] == pytest.approx(2 * sum(kept))


# ------------------------------------------------------------------------------------------------
# The default command, on scikit-learn's digits
# ------------------------------------------------------------------------------------------------


def test_digits_default_end_to_end(tmp_path, capsys):
  results = M.main(["--epochs", "2", "--ft-epochs", "1", "--criteria", "magnitude,obd",
                    "--sweep-sparsities", "0.5,0.9", "--sweep-ft-epochs", "1", "--out-dir",
                    str(tmp_path), "--no-progress"])
  out = capsys.readouterr().out
  assert "digits: 1500 train / 297 test images" in out
  assert [r.name for r in results] == ["lenet300/oneshot/magnitude", "lenet300/oneshot/obd"]
  for r in results:
    assert sum(x.kept for x in r.report.prunable_rows) == (
        LENET300_WEIGHTS - round(0.92 * LENET300_WEIGHTS))
  assert "test error % (one-shot, no fine-tuning)" in out and "kFLOPs eff" in out
  assert results[0].accuracy > 0.5  # 2 + 1 epochs of 11 steps; chance is 0.1
  assert (tmp_path / "digits_lenet300_sweep.png").stat().st_size > 0
  assert (tmp_path / "digits_lenet300_oneshot_layers.png").stat().st_size > 0


def test_parse_layer_sparsity_errors():
  assert M.parse_layer_sparsities("fc1=0.5,fc3=0.25", "lenet300") == (("fc1", 0.5), ("fc3", 0.25))
  with pytest.raises(ValueError, match="layer=fraction"):
    M.parse_layer_sparsities("fc1", "lenet300")
  with pytest.raises(ValueError, match="criterion"):
    M.oneshot_scores(None, {}, "hessian-free")
  with pytest.raises(ValueError, match="--criteria: expected names"):
    M.main(["--criteria", "magnitude,hessian-free", "--no-progress"])
