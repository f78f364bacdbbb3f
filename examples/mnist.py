"""Train, prune and fine-tune LeNet-300-100 / LeNet-5 on MNIST with jaxprune (Flax Linen).

Quickstart (no download: runs on scikit-learn's bundled 8x8 digits, upsampled to 28x28)::

    pip install -e ".[examples]" && python examples/mnist.py

Real MNIST from gzipped IDX files (``train-images-idx3-ubyte.gz`` ... as distributed)::

    python examples/mnist.py --data-dir ../shared/data/mnist --model lenet300 \
        --mode gradual --criteria magnitude --sparsity 0.95

Modes (``--mode``), all starting from one dense model trained for ``--epochs``:

* ``oneshot``: score the dense weights, prune to ``--sparsity`` at once, fine-tune
  ``--ft-epochs`` with the masks fixed.
* ``gradual``: prune inside the train step with `jaxprune.polynomial_schedule` over
  ``--prune-epochs`` (Zhu & Gupta 2017), then fine-tune ``--ft-epochs``.
* ``iterative``: ``--rounds`` prune / retrain cycles of ``--prune-epochs`` each, each round
  pruning the same fraction of the surviving weights (Han et al. 2015), then fine-tune.
* ``l1`` / ``prox``: ``--prune-epochs`` of L1-regularised training (subgradient `jaxprune.add_l1`
  or the soft-threshold `jaxprune.proximal_l1`), then one-shot pruning and fine-tuning.

Criteria (``--criteria``, comma separated): ``magnitude`` |w|, ``gradient`` |g|, ``taylor``
|w g|, ``obd`` (Optimal Brain Damage ½ h w² with a Hutchinson Hessian diagonal) and ``random``.
For one-shot pruning the gradient, Taylor and Hessian scores are averaged over
``--score-batches`` training batches (one minibatch is too noisy to rank 10⁵ weights); in the
in-step modes `jaxprune.prune` computes them from the current batch.

``--sweep`` adds an accuracy-vs-sparsity sweep: for every criterion and every sparsity in
``--sweep-sparsities``, the dense model is pruned once and evaluated without fine-tuning, and
(unless ``--sweep-ft-epochs 0``) again after a short fine-tuning. Plots go to ``--out-dir``.

Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp

PyTree = Any

CRITERIA = ("magnitude", "gradient", "taylor", "obd", "random")
# Not in the default set: OBD with the empirical-Fisher diagonal instead of Hutchinson's estimate.
EXTRA_CRITERIA = ("fisher",)
MODES = ("oneshot", "gradual", "iterative", "l1", "prox")

# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

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
  """Checks ``names`` against a ``SHA256SUMS`` file in ``data_dir``, if there is one."""
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
    raise ValueError(f"--data-dir: expected the MNIST IDX files {sorted(MNIST_FILES.values())} "
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


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class LeNet300100(nn.Module):
  """LeNet-300-100: 784-300-100-10 fully connected, ReLU (266,200 weights)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(300, name="fc1")(x))
    x = nn.relu(nn.Dense(100, name="fc2")(x))
    return nn.Dense(10, name="fc3")(x)


class LeNet5(nn.Module):
  """Caffe's LeNet-5 as in Han et al.: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10.

  430,500 weights (conv1 500, conv2 25,000, fc1 400,000, fc2 5,000).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(20, (5, 5), padding="VALID", name="conv1")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Conv(50, (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)


MODELS: dict[str, Callable[[], nn.Module]] = {"lenet300": LeNet300100, "lenet5": LeNet5}

# Han et al. 2015 (Tables 2-3) keep, per layer, 8/9/26 % (LeNet-300-100) and 66/12/8/19 %
# (LeNet-5); the first, largest layers are pruned most. Their totals round to 8 % kept; these
# allocations shift fc1 by one point so the total is >= 92 % pruned.
HAN_SPARSITIES = {
    "lenet300": {"fc1": 0.93, "fc2": 0.91, "fc3": 0.74},
    "lenet5": {"conv1": 0.34, "conv2": 0.88, "fc1": 0.93, "fc2": 0.81},
}

# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines one run (see ``--help`` for each field)."""
  model: str = "lenet300"
  mode: str = "oneshot"
  criterion: str = "magnitude"
  sparsity: float = 0.92
  scope: str = "global"
  layer_sparsities: Optional[tuple[tuple[str, float], ...]] = None
  epochs: int = 20
  prune_epochs: int = 4
  rounds: int = 4
  ft_epochs: int = 8
  batch_size: int = 128
  lr: float = 1e-3
  ft_lr: float = 3e-4
  l1: float = 1e-4
  num_probes: int = 8
  average_hessian: bool = False
  score_batches: int = 16
  prune_every: int = 50
  seed: int = 0


def overrides_for(cfg: Config) -> Optional[dict[str, float]]:
  """``{"['fc1']['kernel']": s, ...}`` for `jaxprune.prune` from ``cfg.layer_sparsities``."""
  if not cfg.layer_sparsities:
    return None
  return {f"['{name}']['kernel']": s for name, s in cfg.layer_sparsities}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def loss_fn_for(model: nn.Module) -> Callable[[PyTree, tuple[jax.Array, jax.Array]], jax.Array]:
  """Mean cross-entropy ``loss(params, (x, y))``; also the function the Hessian is taken of."""

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


class Trainer:
  """Jitted steps for one model and dataset; the data lives on the device, batches by index."""

  def __init__(self, model_name: str, data: Dataset, batch_size: int = 128):
    self.model_name = model_name
    self.model = MODELS[model_name]()
    self.data = data
    self.batch_size = batch_size
    self.x_train = jnp.asarray(data.x_train)
    self.y_train = jnp.asarray(data.y_train)
    self.x_test = jnp.asarray(data.x_test)
    self.y_test = jnp.asarray(data.y_test)
    self.loss_fn = loss_fn_for(self.model)
    self.steps_per_epoch = len(data.x_train) // batch_size
    self._accuracy = jax.jit(self._accuracy_impl)
    self.steps: dict[Any, Any] = {}  # compiled steps shared between calls, by schedule

  def init(self, seed: int) -> PyTree:
    return self.model.init(jax.random.PRNGKey(seed), self.x_train[:1])["params"]

  def batch(self, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.x_train[idx], self.y_train[idx]

  def epoch_indices(self, rng: np.random.Generator) -> np.ndarray:
    """One epoch of shuffled batch indices, ``(steps_per_epoch, batch_size)``; drops the rest."""
    perm = rng.permutation(len(self.data.x_train))
    n = self.steps_per_epoch * self.batch_size
    return perm[:n].reshape(self.steps_per_epoch, self.batch_size)

  def _accuracy_impl(self, params: PyTree) -> jax.Array:
    # Fixed-size chunks so the conv net never holds 10k feature maps at once.
    n = self.x_test.shape[0]
    chunk = 1000 if n % 1000 == 0 else n
    xs = self.x_test.reshape((n // chunk, chunk) + self.x_test.shape[1:])
    ys = self.y_test.reshape((n // chunk, chunk))

    def count(carry, xy):
      logits = self.model.apply({"params": params}, xy[0])
      return carry + jnp.sum(jnp.argmax(logits, -1) == xy[1]), None

    correct, _ = jax.lax.scan(count, jnp.zeros((), jnp.int32), (xs, ys))
    return correct / n

  def accuracy(self, params: PyTree) -> float:
    """Test accuracy in [0, 1]."""
    return float(self._accuracy(params))

  def make_step(self, tx: optax.GradientTransformationExtraArgs):
    """``step(params, opt_state, idx, **extra) -> (params, opt_state, loss)``, jitted.

    The raw gradients, the loss function and the batch are passed to ``tx.update`` as extra
    arguments, which is what `jaxprune.prune` needs for gradient, Taylor and Hessian scores;
    transformations that take no extra arguments ignore them inside `optax.chain`.
    """
    loss_fn = self.loss_fn

    @jax.jit
    def step(params, opt_state, idx, extra):
      batch = self.batch(idx)
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, grads=grads, loss_fn=loss_fn,
                                     batch=batch, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    return step

  def fit(self, params: PyTree, tx: optax.GradientTransformationExtraArgs, epochs: int, *,
          seed: int, desc: str = "train", progress: bool = True, step=None,
          extra: Optional[dict] = None, max_steps: Optional[int] = None):
    """Runs ``epochs`` epochs of ``tx``; returns ``(params, opt_state)``.

    Args:
      params: initial parameters.
      tx: the optimizer chain (possibly containing `jaxprune.prune`).
      epochs: number of passes over the training set.
      seed: seed of the data order.
      desc: progress-bar label.
      progress: show a tqdm progress bar.
      step: a step from `make_step` for this ``tx`` (reuse it to skip recompiling).
      extra: extra traced arguments passed to ``tx.update`` (e.g. fixed scores).
      max_steps: stop after this many steps (for smoke tests).
    """
    step = step or self.make_step(tx)
    extra = extra or {}
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    total = epochs * self.steps_per_epoch
    if max_steps is not None:
      total = min(total, max_steps)
    bar = _progress(total, desc, progress)
    done = 0
    for _ in range(epochs):
      for idx in self.epoch_indices(rng):
        if done == total:
          break
        params, opt_state, loss = step(params, opt_state, jnp.asarray(idx), extra)
        done += 1
        if bar is not None:
          bar.update(1)
          if done % 50 == 0 or done == total:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    if bar is not None:
      bar.close()
    return params, opt_state


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm  # optional dependency: only needed for the bar

  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Scores for one-shot pruning
# ------------------------------------------------------------------------------------------------


def oneshot_scores(trainer: Trainer, params: PyTree, criterion: str, *, batches: int = 16,
                   num_probes: int = 8, seed: int = 0) -> PyTree:
  """Importance scores of ``params`` for one-shot pruning (higher = keep).

  ``magnitude`` is `jaxprune.magnitude`; ``random`` is `jaxprune.random_scores`. The data-driven
  scores are averaged over ``batches`` training batches of the trainer's batch size:
  ``gradient`` the mean of `jaxprune.gradient` (|g| per batch), ``taylor`` the mean of
  `jaxprune.taylor` (|w g| per batch) and ``obd`` `jaxprune.obd` of the mean
  `jaxprune.hessian_diag` (``num_probes`` Rademacher probes per batch).

  Args:
    trainer: provides the model, loss and data.
    params: the (dense) parameters to score.
    criterion: one of `CRITERIA`.
    batches: training batches the data-driven scores are averaged over.
    num_probes: Hutchinson probes per batch for ``obd``.
    seed: seed of the batch choice, the probes and the random scores.

  Returns:
    A float32 pytree with the structure of ``params``.

  References:
    LeCun, Denker & Solla, "Optimal Brain Damage", NeurIPS 1989;
    Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
  """
  if criterion not in CRITERIA + EXTRA_CRITERIA:
    raise ValueError(f"criterion: expected one of {CRITERIA + EXTRA_CRITERIA}, got "
                     f"{criterion!r}.")
  key = jax.random.PRNGKey(seed)
  if criterion == "magnitude":
    return jp.magnitude(params)
  if criterion == "random":
    return jp.random_scores(params, key)
  # Small training sets (digits) have fewer batches than asked for.
  batches = max(1, min(batches, trainer.steps_per_epoch))
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(trainer.data.x_train))[:batches * trainer.batch_size]
  idx = jnp.asarray(idx.reshape(batches, trainer.batch_size))
  return _averaged_scores(trainer.loss_fn, trainer.x_train, trainer.y_train, params, idx, key,
                          criterion, num_probes)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _averaged_scores(loss_fn, x, y, params, idx, key, criterion, num_probes):
  # Static loss_fn/criterion/num_probes: one compiled scan per trainer and criterion.
  grad_fn = jax.grad(loss_fn)

  def one(acc, inputs):
    b, k = inputs
    batch = (x[b], y[b])
    if criterion == "obd":
      s = jp.hessian_diag(loss_fn, params, batch, key=k, num_probes=num_probes)
    elif criterion == "fisher":
      s = fisher_diag(loss_fn, params, batch)
    elif criterion == "gradient":
      s = jp.gradient(grad_fn(params, batch))
    else:
      s = jp.taylor(params, grad_fn(params, batch))
    return jax.tree.map(jnp.add, acc, s), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  keys = jax.random.split(key, idx.shape[0])
  total, _ = jax.lax.scan(one, zeros, (idx, keys))
  mean = jax.tree.map(lambda t: t / idx.shape[0], total)
  return jp.obd(params, mean) if criterion in ("obd", "fisher") else mean


def fisher_diag(loss_fn: Callable[..., jax.Array], params: PyTree,
                batch: tuple[jax.Array, jax.Array]) -> PyTree:
  """Empirical-Fisher diagonal ``mean_n g_n²`` from per-example gradients.

  A curvature estimate without probe noise: Hutchinson's estimate of ``diag H`` has variance
  ``Σ_{j≠i} H_ij²`` per probe, which for 10⁵-weight layers swamps the diagonal (see
  docs/mnist.md); the Fisher diagonal is exact for what it is, at the cost of being the
  Gauss-Newton approximation of the Hessian with observed labels.

  References:
    Hassibi & Stork, "Optimal Brain Surgeon", NeurIPS 1992; Theis et al., "Faster gaze
    prediction with dense networks and Fisher pruning", 2018.
  """
  x, y = batch
  per_example = jax.vmap(lambda xi, yi: jax.grad(loss_fn)(params, (xi[None], yi[None])))(x, y)
  return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), per_example)


def _given_scores(params: PyTree, *, fixed_scores: PyTree, **unused: Any) -> PyTree:
  """A `jaxprune.prune` score callable that returns scores computed beforehand."""
  del params, unused
  return fixed_scores


def fixed_prune(cfg: Config, sparsity: Any) -> optax.GradientTransformationExtraArgs:
  """`jaxprune.prune` at a constant ``sparsity`` with externally computed scores.

  The masks are computed at the first step from the ``fixed_scores=`` extra argument and never
  change afterwards (a constant schedule), which is one-shot pruning followed by fine-tuning.
  ``sparsity`` may be traced, so one compiled step serves a whole sparsity sweep.
  """
  return jp.prune(sparsity, _given_scores, scope=cfg.scope, overrides=overrides_for(cfg))


def _selection_key(cfg: Config) -> Config:
  # Only these fields change the selection: runs that differ elsewhere share one compile.
  return Config(scope=cfg.scope, layer_sparsities=cfg.layer_sparsities)


@functools.partial(jax.jit, static_argnums=(0,))
def _select_masks(cfg: Config, params: PyTree, scores: PyTree, sparsity: jax.Array) -> PyTree:
  tx = fixed_prune(cfg, sparsity)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zeros, state, params, fixed_scores=scores)
  return state.masks


def select_masks(cfg: Config, params: PyTree, scores: PyTree, sparsity: float) -> PyTree:
  """The masks `fixed_prune` computes at its first step: the same selection, no training."""
  return _select_masks(_selection_key(cfg), params, scores, jnp.float32(sparsity))


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


class RunResult(NamedTuple):
  """What one run produced."""
  name: str
  config: Config
  params: PyTree
  masks: PyTree
  accuracy: float
  oneshot_accuracy: Optional[float]
  report: Any
  seconds: float
  reg_sparsity: Optional[float] = None

  @property
  def test_error(self) -> float:
    return 1.0 - self.accuracy


def _ft_lr(cfg: Config, steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(cfg.ft_lr, max(steps, 1))


def finetune_step(trainer: Trainer, cfg: Config, ft_steps: int):
  """``(init_tx, step)`` for fine-tuning with fixed masks, compiled once per trainer and schedule.

  The step rebuilds the transformation at trace time around a traced ``extra["sparsity"]``
  (the state's structure does not depend on its value, so ``init_tx.init`` fits) and takes the
  scores as ``extra["fixed_scores"]``: one-shot runs and every point of a sweep share it.
  """
  key = ("finetune", cfg.ft_lr, ft_steps, cfg.scope, cfg.layer_sparsities)
  if key not in trainer.steps:
    lr = _ft_lr(cfg, ft_steps)
    loss_fn = trainer.loss_fn

    @jax.jit
    def step(params, opt_state, idx, extra):
      tx = optax.chain(optax.adam(lr), fixed_prune(cfg, extra["sparsity"]))
      loss, grads = jax.value_and_grad(loss_fn)(params, trainer.batch(idx))
      updates, opt_state = tx.update(grads, opt_state, params,
                                     fixed_scores=extra["fixed_scores"])
      return optax.apply_updates(params, updates), opt_state, loss

    trainer.steps[key] = (optax.chain(optax.adam(lr), fixed_prune(cfg, 0.0)), step)
  return trainer.steps[key]


def train_dense(trainer: Trainer, cfg: Config, progress: bool = True,
                max_steps: Optional[int] = None) -> PyTree:
  """Adam at ``cfg.lr`` with a cosine decay over ``cfg.epochs`` epochs, from ``cfg.seed``."""
  steps = cfg.epochs * trainer.steps_per_epoch
  key = ("dense", cfg.lr, steps)
  if key not in trainer.steps:  # same schedule: reuse the compiled step
    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, steps, alpha=0.05))
    tx = optax.with_extra_args_support(tx)
    trainer.steps[key] = (tx, trainer.make_step(tx))
  tx, step = trainer.steps[key]
  params, _ = trainer.fit(trainer.init(cfg.seed), tx, cfg.epochs, seed=cfg.seed, step=step,
                          desc=f"dense {cfg.model}", progress=progress, max_steps=max_steps)
  return params


def schedule_for(cfg: Config, target: float, begin: int, steps_per_epoch: int):
  """The sparsity schedule of an in-step mode reaching ``target`` (gradual / iterative)."""
  span = cfg.prune_epochs * steps_per_epoch
  if cfg.mode == "gradual":
    # Ends on the last step of the pruning phase (steps begin .. begin + span - 1), so the
    # target is reached even when no fine-tuning follows.
    end = begin + max(span - 1, 0)
    return jp.polynomial_schedule(0.0, target, begin, end,
                                  frequency=max(1, min(cfg.prune_every, end - begin)))
  # Han et al.: each round removes the same fraction of the surviving weights, so that after
  # `rounds` rounds the target is reached.
  fraction = 1.0 - (1.0 - target) ** (1.0 / cfg.rounds)
  return jp.iterative_schedule(fraction, every=max(span, 1), rounds=cfg.rounds, begin_step=begin)


def run(trainer: Trainer, cfg: Config, dense: PyTree, *, progress: bool = True,
        max_steps: Optional[int] = None) -> RunResult:
  """Prunes the dense parameters ``dense`` the way ``cfg.mode`` says and fine-tunes them.

  Args:
    trainer: model, data and compiled helpers.
    cfg: the run configuration.
    dense: trained dense parameters (from `train_dense`).
    progress: show progress bars.
    max_steps: cap on steps per training phase (smoke tests).

  Returns:
    A `RunResult` with the final parameters, masks, test accuracy and `jaxprune.report`.
  """
  start = time.perf_counter()
  spe = trainer.steps_per_epoch
  name = f"{cfg.model}/{cfg.mode}/{cfg.criterion}"
  oneshot_acc = reg_sparsity = None
  ft_steps = cfg.ft_epochs * spe
  if max_steps is not None:
    ft_steps = min(ft_steps, max_steps)
  params = dense

  if cfg.mode in ("l1", "prox"):
    # Regularised training, then the same one-shot prune + fine-tune as "oneshot".
    if cfg.mode == "l1":
      reg = optax.chain(jp.add_l1(cfg.l1), optax.adam(cfg.lr))
    else:
      reg = optax.chain(optax.adam(cfg.lr), jp.proximal_l1(cfg.l1, cfg.lr))
    params, _ = trainer.fit(params, optax.with_extra_args_support(reg), cfg.prune_epochs,
                            seed=cfg.seed + 1, desc=f"{cfg.mode} {cfg.criterion}",
                            progress=progress, max_steps=max_steps)
    reg_sparsity = float(jp.sparsity(params))  # exact zeros the penalty alone produced

  if cfg.mode in ("oneshot", "l1", "prox"):
    scores = oneshot_scores(trainer, params, cfg.criterion, batches=cfg.score_batches,
                            num_probes=cfg.num_probes, seed=cfg.seed)
    masks = select_masks(cfg, params, scores, cfg.sparsity)
    oneshot_acc = trainer.accuracy(jp.apply_masks(params, masks))
    init_tx, step = finetune_step(trainer, cfg, cfg.ft_epochs * spe)
    params, opt_state = trainer.fit(params, init_tx, cfg.ft_epochs, seed=cfg.seed + 2,
                                    desc=f"finetune {cfg.criterion}", progress=progress,
                                    step=step, max_steps=max_steps,
                                    extra={"fixed_scores": scores,
                                           "sparsity": jnp.float32(cfg.sparsity)})
  elif cfg.mode in ("gradual", "iterative"):
    prune_steps = (cfg.prune_epochs * (cfg.rounds if cfg.mode == "iterative" else 1)) * spe
    if max_steps is not None:
      prune_steps = min(prune_steps, max_steps)
    overrides = None
    if cfg.layer_sparsities:
      overrides = {p: schedule_for(cfg, s, 0, spe) for p, s in overrides_for(cfg).items()}
    score = cfg.criterion
    if score == "fisher":  # a callable score: jp.prune passes it loss_fn= and batch=
      score = lambda params, *, loss_fn, batch, **_: jp.obd(  # noqa: E731
          params, fisher_diag(loss_fn, params, batch))
    prune_tx = jp.prune(schedule_for(cfg, cfg.sparsity, 0, spe), score,
                        scope=cfg.scope, overrides=overrides, num_probes=cfg.num_probes,
                        average_hessian=cfg.average_hessian, seed=cfg.seed)
    lr = optax.join_schedules([optax.constant_schedule(cfg.lr), _ft_lr(cfg, ft_steps)],
                              [prune_steps])
    tx = optax.chain(optax.adam(lr), prune_tx)
    epochs = math.ceil((prune_steps + ft_steps) / spe)
    params, opt_state = trainer.fit(params, tx, epochs, seed=cfg.seed + 2,
                                    desc=f"{cfg.mode} {cfg.criterion}", progress=progress,
                                    max_steps=prune_steps + ft_steps)
  else:
    raise ValueError(f"mode: expected one of {MODES}, got {cfg.mode!r}.")

  masks = jp.find_masks(opt_state, params)
  accuracy = trainer.accuracy(params)
  x1 = trainer.x_test[:1]
  rep = jp.report(params, masks=masks,
                  apply_fn=lambda p, x: trainer.model.apply({"params": p}, x), inputs=(x1,))
  return RunResult(name, cfg, params, masks, accuracy, oneshot_acc, rep,
                   time.perf_counter() - start, reg_sparsity)


# ------------------------------------------------------------------------------------------------
# Sweep: accuracy vs sparsity per criterion
# ------------------------------------------------------------------------------------------------


class SweepPoint(NamedTuple):
  criterion: str
  sparsity: float
  oneshot_accuracy: float
  finetuned_accuracy: Optional[float]


def sweep(trainer: Trainer, cfg: Config, dense: PyTree, criteria: Sequence[str],
          sparsities: Sequence[float], ft_epochs: int, *, progress: bool = True,
          max_steps: Optional[int] = None) -> list[SweepPoint]:
  """One-shot pruning of ``dense`` at each sparsity for each criterion, before/after fine-tuning.

  Scores are computed once per criterion; one compiled mask selection and one compiled
  fine-tuning step (sparsity and scores are traced arguments) serve every point.
  """
  points = []
  if ft_epochs > 0:
    init_tx, step = finetune_step(trainer, cfg, ft_epochs * trainer.steps_per_epoch)
  for criterion in criteria:
    scores = oneshot_scores(trainer, dense, criterion, batches=cfg.score_batches,
                            num_probes=cfg.num_probes, seed=cfg.seed)
    for s in sparsities:
      masks = select_masks(cfg, dense, scores, s)
      acc0 = trainer.accuracy(jp.apply_masks(dense, masks))
      acc1 = None
      if ft_epochs > 0:
        ft, _ = trainer.fit(dense, init_tx, ft_epochs, seed=cfg.seed + 2, step=step,
                            extra={"fixed_scores": scores, "sparsity": jnp.float32(s)},
                            desc=f"sweep {criterion} {s:.2f}", progress=progress,
                            max_steps=max_steps)
        acc1 = trainer.accuracy(ft)
      points.append(SweepPoint(criterion, float(s), acc0, acc1))
  return points


# ------------------------------------------------------------------------------------------------
# Output: tables and plots
# ------------------------------------------------------------------------------------------------


def summary_table(results: Sequence[RunResult], dense_accuracy: Optional[float] = None) -> str:
  """One line per run: error, sparsity, kept params, bytes, FLOPs, per-layer sparsity, time."""
  header = ("run", "test err %", "1-shot err %", "sparsity %", "kept", "dense B", "bitmask B",
            "CSR B", "kFLOPs dense", "kFLOPs eff", "per-layer sparsity %", "time s")
  rows = []
  if dense_accuracy is not None:
    rows.append(("dense", f"{100 * (1 - dense_accuracy):.2f}", "", "0.00", "", "", "", "", "",
                 "", "", ""))
  for r in results:
    rep = r.report
    kept = sum(x.kept for x in rep.prunable_rows)
    count = sum(x.count for x in rep.prunable_rows)
    layers = " ".join(f"{jp.log_name(x.path).split('/')[0]}={100 * x.sparsity:.1f}"
                      for x in rep.prunable_rows)
    rows.append((r.name, f"{100 * r.test_error:.2f}",
                 "" if r.oneshot_accuracy is None else f"{100 * (1 - r.oneshot_accuracy):.2f}",
                 f"{100 * rep.sparsity:.2f}", f"{kept}/{count}", str(rep.dense_bytes),
                 str(rep.bitmask_bytes), str(rep.csr_bytes), f"{rep.flops_dense / 1e3:.1f}",
                 f"{rep.flops_effective / 1e3:.1f}", layers, f"{r.seconds:.0f}"))
  widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
  fmt = lambda row: "  ".join(  # noqa: E731
      c.ljust(w) if i in (0, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
  return "\n".join([fmt(header), "-" * len(fmt(header)), *map(fmt, rows)])


def sweep_table(points: Sequence[SweepPoint]) -> str:
  """Test error (%) per criterion (rows) and sparsity (columns), one-shot and fine-tuned."""
  criteria = list(dict.fromkeys(p.criterion for p in points))
  sparsities = sorted({p.sparsity for p in points})
  get = {(p.criterion, p.sparsity): p for p in points}
  lines = []
  for title, field in (("one-shot, no fine-tuning", "oneshot_accuracy"),
                       ("one-shot + fine-tuning", "finetuned_accuracy")):
    if all(getattr(p, field) is None for p in points):
      continue
    lines.append(f"test error % ({title})")
    lines.append(f"{'criterion':<10}" + "".join(f"{f's={s:g}':>9}" for s in sparsities))
    for c in criteria:
      vals = [getattr(get[(c, s)], field) for s in sparsities]
      lines.append(f"{c:<10}" + "".join(f"{100 * (1 - v):9.2f}" for v in vals))
  return "\n".join(lines)


def plot_sweep(points: Sequence[SweepPoint], path: os.PathLike, title: str,
               dense_accuracy: Optional[float] = None) -> None:
  """Test accuracy vs sparsity, one line per criterion, no fine-tuning | after fine-tuning."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("one-shot, no fine-tuning", "oneshot_accuracy")]
  if any(p.finetuned_accuracy is not None for p in points):
    panels.append(("one-shot + fine-tuning", "finetuned_accuracy"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (panel, field) in zip(axes[0], panels):
    for c in dict.fromkeys(p.criterion for p in points):
      pts = sorted((p.sparsity, getattr(p, field)) for p in points if p.criterion == c)
      ax.plot([100 * s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=c)
    if dense_accuracy is not None:
      ax.axhline(100 * dense_accuracy, color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(panel)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_layers(results: Sequence[RunResult], path: os.PathLike, title: str) -> None:
  """Per-layer sparsity bars, one group per layer and one bar per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = [jp.log_name(x.path) for x in results[0].report.prunable_rows]
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(layers) * max(2, len(results))),
                                  4.5 + 0.2 * len(results)))
  width = 0.8 / len(results)
  for i, r in enumerate(results):
    vals = [100 * x.sparsity for x in r.report.prunable_rows]
    xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(layers))]
    ax.bar(xs, vals, width, label=f"{r.name} ({100 * r.report.sparsity:.1f}%)")
  ax.set_xticks(range(len(layers)), layers)
  ax.set_ylabel("weights pruned (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

# Defaults per dataset: digits has 11 batches per epoch, so it needs more epochs to converge.
DEFAULTS = {
    "digits": dict(epochs=40, prune_epochs=10, ft_epochs=20, prune_every=10, prox=0.5),
    "mnist": dict(epochs=20, prune_epochs=4, ft_epochs=8, prune_every=50, prox=0.15),
    # LeNet-5's convolutions cost ~10x LeNet-300-100 per epoch on CPU; this shorter recipe
    # reached 0.77 % at 92 % in 11 minutes on 2 (shared) cores (docs/mnist.md).
    "mnist/lenet5": dict(epochs=8, prune_epochs=2, ft_epochs=4),
}


def parse_layer_sparsities(text: Optional[str], model: str):
  if not text:
    return None
  if text == "han":
    return tuple(HAN_SPARSITIES[model].items())
  out = []
  for item in text.split(","):
    name, _, value = item.partition("=")
    if not value:
      raise ValueError(f"--layer-sparsity: expected 'han' or 'layer=fraction,...', got {item!r}.")
    out.append((name.strip(), float(value)))
  return tuple(out)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--data-dir", default=None,
                 help="folder with the gzipped MNIST IDX files; default: sklearn's digits")
  p.add_argument("--model", choices=sorted(MODELS), default="lenet300")
  p.add_argument("--mode", choices=MODES, default="oneshot")
  p.add_argument("--criteria", default=",".join(CRITERIA),
                 help=f"comma-separated subset of {','.join(CRITERIA + EXTRA_CRITERIA)} "
                      "(fisher: OBD with the empirical-Fisher diagonal)")
  p.add_argument("--sparsity", type=float, default=0.92, help="overall fraction pruned")
  p.add_argument("--scope", choices=("global", "layer"), default="global")
  p.add_argument("--layer-sparsity", default=None,
                 help="per-layer fractions 'fc1=0.93,fc2=0.91,...' or 'han' (Han et al.'s "
                      "allocation); replace --sparsity for those layers")
  p.add_argument("--epochs", type=int, default=None, help="dense training epochs")
  p.add_argument("--prune-epochs", type=int, default=None,
                 help="epochs of gradual pruning / per iterative round / of L1 training")
  p.add_argument("--rounds", type=int, default=4, help="iterative prune/retrain rounds")
  p.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--ft-lr", type=float, default=3e-4)
  p.add_argument("--l1", type=float, default=None,
                 help="L1 strength: default 1e-4 for --mode l1 (added to the gradient); for "
                      "--mode prox (soft threshold lr*l1 per step after Adam) 0.15 on MNIST, "
                      "0.5 on digits")
  p.add_argument("--num-probes", type=int, default=8, help="Hutchinson probes per batch")
  p.add_argument("--average-hessian", action="store_true",
                 help="gradual/iterative obd: average the Hutchinson estimate over every step "
                      "between mask updates (one extra Hessian-vector product per probe per step)")
  p.add_argument("--score-batches", type=int, default=16,
                 help="batches the one-shot gradient/Taylor/OBD scores average over")
  p.add_argument("--prune-every", type=int, default=None, help="steps between mask updates")
  p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                 help="accuracy-vs-sparsity sweep per criterion (default: on for digits)")
  p.add_argument("--sweep-sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98")
  p.add_argument("--sweep-ft-epochs", type=int, default=None,
                 help="fine-tuning epochs per sweep point (0: no fine-tuning curve)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default="runs")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--no-verify", action="store_true", help="skip the SHA256SUMS check")
  return p


def main(argv: Optional[Sequence[str]] = None) -> list[RunResult]:
  args = build_parser().parse_args(argv)
  t0 = time.perf_counter()
  data = (load_mnist(args.data_dir, verify=not args.no_verify) if args.data_dir
          else load_digits28(seed=args.seed))
  d = dict(DEFAULTS["mnist" if args.data_dir else "digits"])
  d.update(DEFAULTS.get(f"{'mnist' if args.data_dir else 'digits'}/{args.model}", {}))
  pick = lambda value, key: d[key] if value is None else value  # noqa: E731
  criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
  if not criteria:
    raise ValueError(f"--criteria: expected at least one of {CRITERIA + EXTRA_CRITERIA}, got "
                     f"{args.criteria!r}.")
  for c in criteria:
    if c not in CRITERIA + EXTRA_CRITERIA:
      raise ValueError(f"--criteria: expected names from {CRITERIA + EXTRA_CRITERIA}, got "
                       f"{c!r}.")
  base = Config(model=args.model, mode=args.mode, criterion=criteria[0], sparsity=args.sparsity,
                scope=args.scope,
                layer_sparsities=parse_layer_sparsities(args.layer_sparsity, args.model),
                epochs=pick(args.epochs, "epochs"),
                prune_epochs=pick(args.prune_epochs, "prune_epochs"), rounds=args.rounds,
                ft_epochs=pick(args.ft_epochs, "ft_epochs"), batch_size=args.batch_size,
                lr=args.lr, ft_lr=args.ft_lr,
                l1=args.l1 if args.l1 is not None else (d["prox"] if args.mode == "prox" else 1e-4),
                num_probes=args.num_probes, average_hessian=args.average_hessian,
                score_batches=args.score_batches,
                prune_every=pick(args.prune_every, "prune_every"), seed=args.seed)
  progress = not args.no_progress
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test images; "
        f"model {args.model}; mode {args.mode}; devices {jax.devices()}")

  trainer = Trainer(args.model, data, args.batch_size)
  dense = train_dense(trainer, base, progress)
  dense_acc = trainer.accuracy(dense)
  print(f"dense {args.model}: test error {100 * (1 - dense_acc):.2f}% "
        f"({time.perf_counter() - t0:.0f}s)")

  results = []
  for c in criteria:
    r = run(trainer, dataclasses.replace(base, criterion=c), dense, progress=progress)
    results.append(r)
    print(f"\n== {r.name}: test error {100 * r.test_error:.2f}% at "
          f"{100 * r.report.sparsity:.2f}% sparsity ({r.seconds:.0f}s)")
    if r.reg_sparsity is not None:
      print(f"   {args.mode} training alone left {100 * r.reg_sparsity:.2f}% exact zeros")
    print(r.report.table())

  tag = f"{data.name}_{args.model}_{args.mode}"
  print("\n" + summary_table(results, dense_acc))
  plot_layers(results, out_dir / f"{tag}_layers.png",
              f"{data.name} {args.model} {args.mode}: per-layer sparsity")
  written = [out_dir / f"{tag}_layers.png"]

  do_sweep = args.sweep if args.sweep is not None else not args.data_dir
  if do_sweep:
    sparsities = [float(s) for s in args.sweep_sparsities.split(",")]
    ft = args.sweep_ft_epochs if args.sweep_ft_epochs is not None else (
        5 if not args.data_dir else 1)
    points = sweep(trainer, base, dense, criteria, sparsities, ft, progress=progress)
    print("\n" + sweep_table(points))
    path = out_dir / f"{data.name}_{args.model}_sweep.png"
    plot_sweep(points, path, f"{data.name} {args.model}: one-shot pruning by criterion "
               f"(scope={base.scope})", dense_acc)
    written.append(path)
  print(f"\nplots: {', '.join(map(str, written))}; total {time.perf_counter() - t0:.0f}s")
  return results


if __name__ == "__main__":
  main()
