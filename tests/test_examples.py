"""examples/: IDX reading, accuracy, the policy, dense training, real-MNIST runs, the digits CLI."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import os
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# A copy elsewhere can be named with JAXPRUNE_MNIST_DIR.
MNIST_DIR = Path(os.environ.get("JAXPRUNE_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))
_EXAMPLE_MODULES = ("data", "models", "training", "pruning", "plots", "mnist")


def _import_examples() -> types.SimpleNamespace:
  # The examples import each other by bare name (``examples/`` on sys.path), and ``models`` is
  # also the name of tests/models.py: import them in isolation, then put back whatever modules
  # of those names were loaded before, so neither shadows the other.
  saved = {n: sys.modules.pop(n) for n in _EXAMPLE_MODULES if n in sys.modules}
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    return types.SimpleNamespace(**{n: importlib.import_module(n) for n in _EXAMPLE_MODULES})
  finally:
    sys.path.remove(str(ROOT / "examples"))
    for n in _EXAMPLE_MODULES:
      sys.modules.pop(n, None)
    sys.modules.update(saved)


EX = _import_examples()
data, models, training, pruning, mnist = EX.data, EX.models, EX.training, EX.pruning, EX.mnist

LENET300_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


def _write_idx(path: Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_bad_header(tmp_path):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / "x.gz", x)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), x)
  with gzip.open(tmp_path / "bad.gz", "wb") as f:
    f.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0")  # float32 type code
  with pytest.raises(ValueError, match="unsigned bytes"):
    data.read_idx(tmp_path / "bad.gz")
  with gzip.open(tmp_path / "short.gz", "wb") as f:
    f.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))  # promises 5 bytes, has 2
  with pytest.raises(ValueError, match=r"promises shape \(5,\)"):
    data.read_idx(tmp_path / "short.gz")


def test_verify_checksums_and_missing_files(tmp_path):
  (tmp_path / "a.gz").write_bytes(b"abc")
  good = hashlib.sha256(b"abc").hexdigest()
  (tmp_path / "SHA256SUMS").write_text(f"{good}  a.gz\n")
  data.verify_checksums(tmp_path, ["a.gz"])
  (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  a.gz\n")
  with pytest.raises(ValueError, match="expected sha256 0000"):
    data.verify_checksums(tmp_path, ["a.gz"])
  with pytest.raises(ValueError, match="data_dir: expected the MNIST IDX files"):
    data.load_mnist(tmp_path)


def test_digits28_shapes():
  d = data.load_digits28()
  assert d.x_train.shape == (1500, 28, 28, 1) and d.x_test.shape == (297, 28, 28, 1)
  assert d.y_train.dtype == np.int32 and set(np.unique(d.y_train)) == set(range(10))
  # Upsampled 8x8 -> 24x24 plus a 2-pixel border: the border holds the background value only.
  border = np.concatenate([d.x_train[:, :2].ravel(), d.x_train[:, -2:].ravel()])
  assert np.all(border == border[0]) and border[0] == d.x_train.min()


# ------------------------------------------------------------------------------------------------
# The default command, on scikit-learn's digits
# ------------------------------------------------------------------------------------------------


def test_digits_default_end_to_end(tmp_path, capsys):
  # taylor stands for the data-driven criteria; obd would add the compilation of a Hessian scan.
  results = mnist.main(["--epochs", "2", "--ft-epochs", "1", "--criteria", "magnitude,taylor",
                        "--sweep-sparsities", "0.5,0.9", "--sweep-ft-epochs", "1", "--out-dir",
                        str(tmp_path), "--no-progress"])
  out = capsys.readouterr().out
  assert "digits: 1500 train / 297 test images" in out
  assert [r.name for r in results] == ["lenet300/oneshot/magnitude", "lenet300/oneshot/taylor"]
  for r in results:
    assert sum(x.kept for x in r.report.prunable_rows) == (
        LENET300_WEIGHTS - round(0.92 * LENET300_WEIGHTS))
    # The library's own table, once per run, and one summary line per run.
    assert out.count(r.report.table()) == 1
    assert f"  {r.name}: {100 * r.test_error:.2f}% at 92.00% sparsity (one-shot, before" in out
  assert "test error % (one-shot, no fine-tuning)" in out
  assert "test error % (one-shot + fine-tuning)" in out and "kFLOPs" not in out
  assert results[0].accuracy > 0.5  # 2 + 1 epochs of 11 steps; chance is 0.1
  assert (tmp_path / "digits_lenet300_sweep.png").stat().st_size > 0
  assert (tmp_path / "digits_lenet300_oneshot_layers.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# The pieces
# ------------------------------------------------------------------------------------------------


def test_accuracy_counts_every_image_in_chunks():
  model = nn.Dense(10)  # any logits model: the counting is what is under test
  rng = np.random.default_rng(0)
  x = rng.normal(size=(37, 6)).astype(np.float32)
  params = {"kernel": rng.normal(size=(6, 10)).astype(np.float32), "bias": np.zeros(10, np.float32)}
  pred = np.argmax(x @ params["kernel"], -1)
  y = np.where(np.arange(37) % 3 == 0, pred, (pred + 1) % 10)  # 13 of 37 right
  # 16 does not divide 37: two scanned chunks and a remainder of 5.
  assert models.accuracy(model, params, x, y, batch_size=16) == 13 / 37


def test_select_masks_exact_counts():
  # The same selection as the fine-tuning transformation: round(s * n) per overridden layer,
  # round(s * N) over the other prunable leaves together; biases stay dense.
  rng = np.random.default_rng(0)
  params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32),
                   "bias": jnp.ones(shape[1])}
            for name, shape in (("a", (6, 5)), ("b", (5, 4)), ("c", (4, 3)))}
  scores = jax.tree.map(jnp.abs, params)
  masks = pruning.select_masks(params, scores, 0.7, scope="global",
                               layer_sparsities=(("a", 0.5),))
  assert int(masks["a"]["kernel"].sum()) == 30 - 15
  assert int(masks["b"]["kernel"].sum() + masks["c"]["kernel"].sum()) == 32 - round(0.7 * 32)
  assert all(bool(masks[n]["bias"].all()) for n in "abc")
  # Global: the lowest |w| of b and c together go first (no ties in normal draws).
  bc = np.concatenate([np.abs(params[n]["kernel"]).ravel() for n in "bc"])
  threshold = np.sort(bc)[round(0.7 * 32) - 1]
  for n in "bc":
    np.testing.assert_array_equal(masks[n]["kernel"], np.abs(params[n]["kernel"]) > threshold)


def test_train_dense_alone_is_deterministic():
  # train_dense on a Dataset needs nothing else; on a Trainer it reuses the device data. Same
  # recipe as the command above: the compiled step is shared when both run.
  digits = data.load_digits28()
  model = models.LeNet300100()
  kw = dict(epochs=2, batch_size=128, lr=1e-3, seed=0, progress=False, max_steps=3)
  a = training.train_dense(model, digits, **kw)
  b = training.train_dense(model, training.make_trainer(model, digits, 128), **kw)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="data: expected a Dataset or a Trainer of"):
    training.train_dense(models.LeNet5(), training.make_trainer(model, digits), **kw)


@pytest.fixture(scope="module")
def digits_trainer():
  return training.make_trainer(models.LeNet300100(), data.load_digits28(), 128)


def test_oneshot_layer_sparsities_without_finetuning(digits_trainer):
  # Han et al.'s per-layer sparsities: exact per-layer counts; the params are the masked ones.
  han = mnist.parse_layer_sparsities("han", "lenet300")
  cfg = pruning.Config(mode="oneshot", criterion="magnitude", sparsity=0.92, ft_epochs=0,
                       layer_sparsities=han)
  r = pruning.run(digits_trainer, cfg, digits_trainer.init(0), progress=False)
  kept = [x.kept for x in r.report.prunable_rows]
  assert kept == [235200 - round(0.93 * 235200), 30000 - round(0.91 * 30000),
                  1000 - round(0.74 * 1000)]
  for p, m in zip(jax.tree.leaves(r.params), jax.tree.leaves(r.masks)):
    if p.ndim >= 2:
      np.testing.assert_array_equal(np.asarray(p) != 0, np.asarray(m))
  assert r.accuracy == r.oneshot_accuracy
  # Bytes and FLOPs come from jp.report: the effective matmul FLOPs scale with density.
  assert r.report.csr_bytes < r.report.dense_bytes
  assert r.report.to_dict()["flops/matmul_effective"] == pytest.approx(2 * sum(kept))


def test_gradual_reaches_exact_sparsity(digits_trainer):
  # One pruning epoch (11 steps; masks at steps 0, 5 and 10) and one fine-tuning epoch.
  cfg = pruning.Config(mode="gradual", criterion="magnitude", sparsity=0.9, prune_epochs=1,
                       ft_epochs=1, prune_every=5)
  r = pruning.run(digits_trainer, cfg, digits_trainer.init(0), progress=False)
  assert sum(x.kept for x in r.report.prunable_rows) == (
      LENET300_WEIGHTS - round(0.9 * LENET300_WEIGHTS))
  # The masks and the params agree exactly: pruned weights are 0.0, kept ones are not.
  for p, m in zip(jax.tree.leaves(r.params), jax.tree.leaves(r.masks)):
    if p.ndim >= 2:
      np.testing.assert_array_equal(np.asarray(p) != 0, np.asarray(m))


# ------------------------------------------------------------------------------------------------
# Real MNIST: the files in the fast suite, a few hundred training steps in the slow one
# ------------------------------------------------------------------------------------------------

needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                 reason=f"MNIST IDX files not found in {MNIST_DIR}")


@needs_mnist
def test_load_mnist_checks_and_reads_the_real_files():
  full = data.load_mnist(MNIST_DIR)  # also checks SHA256SUMS
  assert full.x_train.shape == (60000, 28, 28, 1) and full.x_test.shape == (10000, 28, 28, 1)
  assert set(np.unique(full.y_test)) == set(range(10))
  assert abs(float(full.x_train.mean())) < 1e-3  # standardised with the training set's stats

TRAIN_SUBSET = 100 * 128  # 100 steps per epoch


@pytest.fixture(scope="module")
def mnist_setup():
  full = data.load_mnist(MNIST_DIR)
  subset = full._replace(x_train=full.x_train[:TRAIN_SUBSET], y_train=full.y_train[:TRAIN_SUBSET])
  model = models.LeNet300100()
  trainer = training.make_trainer(model, subset, batch_size=128)
  cfg = pruning.Config(model="lenet300", epochs=2, prune_epochs=1, ft_epochs=1, prune_every=25,
                       sparsity=0.9, scope="global", seed=0)
  dense = training.train_dense(model, trainer, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed,
                               progress=False)  # 200 steps
  return trainer, cfg, dense


@pytest.mark.slow
@needs_mnist
def test_mnist_dense_is_deterministic(mnist_setup):
  trainer, cfg, dense = mnist_setup
  assert trainer.accuracy(dense) > 0.93  # chance is 0.10
  kw = dict(epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, progress=False, max_steps=20)
  a = training.train_dense(trainer.model, trainer, **kw)
  b = training.train_dense(trainer.model, trainer, **kw)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
@needs_mnist
def test_mnist_gradual_reaches_exact_sparsity(mnist_setup):
  trainer, cfg, dense = mnist_setup
  r = pruning.run(trainer, dataclasses.replace(cfg, mode="gradual", criterion="magnitude"),
                  dense, progress=False)  # 100 pruning + 100 fine-tuning steps
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


@pytest.mark.slow
@needs_mnist
def test_mnist_oneshot_layer_sparsities(mnist_setup):
  trainer, cfg, dense = mnist_setup
  han = mnist.parse_layer_sparsities("han", "lenet300")
  c = dataclasses.replace(cfg, mode="oneshot", criterion="magnitude", layer_sparsities=han)
  r = pruning.run(trainer, c, dense, progress=False, max_steps=50)
  kept = [x.kept for x in r.report.prunable_rows]
  assert kept == [235200 - round(0.93 * 235200), 30000 - round(0.91 * 30000),
                  1000 - round(0.74 * 1000)]
  assert r.oneshot_accuracy > 0.5 and r.accuracy > 0.75  # chance is 0.10
  # Bytes and FLOPs come from jp.report: the effective matmul FLOPs scale with density.
  assert r.report.csr_bytes < r.report.dense_bytes
  d = r.report.to_dict()
  assert d["flops/matmul_effective"] == pytest.approx(2 * sum(kept))


def test_parse_layer_sparsity_and_argument_errors():
  assert mnist.parse_layer_sparsities("fc1=0.5,fc3=0.25", "lenet300") == (
      ("fc1", 0.5), ("fc3", 0.25))
  with pytest.raises(ValueError, match="layer=fraction"):
    mnist.parse_layer_sparsities("fc1", "lenet300")
  with pytest.raises(ValueError, match="criterion"):
    pruning.oneshot_scores(None, {}, "hessian-free")
  with pytest.raises(ValueError, match="--criteria: expected names"):
    mnist.main(["--criteria", "magnitude,hessian-free", "--no-progress"])
  with pytest.raises(ValueError, match="mode: expected one of"):
    pruning.run(None, pruning.Config(mode="lottery"), {})
