"""Pruning runs on a trained dense model: one-shot scores, mask selection, the modes, the sweep.

The modes (``oneshot``, ``gradual``, ``iterative``, ``l1``, ``prox``) are described in
``examples/mnist.py``; `run` carries out one, `sweep` the accuracy-vs-sparsity curves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import training
from models import loss_fn_for
from training import Trainer

import jaxprune as jp

PyTree = Any

CRITERIA = ("magnitude", "gradient", "taylor", "obd", "random")
# Opt-in: OBD with the empirical-Fisher diagonal instead of Hutchinson's estimate.
EXTRA_CRITERIA = ("fisher",)
MODES = ("oneshot", "gradual", "iterative", "l1", "prox")
# Per-layer sparsities by layer name, e.g. (("fc1", 0.93), ("fc2", 0.91)); hashable for jit.
LayerSparsities = Optional[tuple[tuple[str, float], ...]]

@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines one pruning run (``examples/mnist.py --help`` explains each)."""
  model: str = "lenet300"
  mode: str = "oneshot"
  criterion: str = "magnitude"
  sparsity: float = 0.92
  scope: str = "global"
  layer_sparsities: LayerSparsities = None
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


def overrides_for(layer_sparsities: LayerSparsities) -> Optional[dict[str, float]]:
  """`jaxprune.prune`'s ``overrides`` (``{"['fc1']['kernel']": s, ...}``) from layer names."""
  if not layer_sparsities:
    return None
  return {f"['{name}']['kernel']": s for name, s in layer_sparsities}


def fisher_diag(loss_fn: Callable[..., jax.Array], params: PyTree,
                batch: tuple[jax.Array, jax.Array]) -> PyTree:
  """Empirical-Fisher diagonal ``mean_n g_n²`` from per-example gradients.

  A curvature estimate without probe noise: Hutchinson's estimate of ``diag H`` has variance
  ``Σ_{j≠i} H_ij²`` per probe, which for 10⁵-weight layers swamps the diagonal (see
  docs/mnist.md); the Fisher diagonal is exact for what it is, at the cost of being the
  Gauss-Newton approximation of the Hessian with observed labels.

  Args:
    loss_fn: ``loss_fn(params, (x, y))``, a mean over the examples of the batch.
    params: the parameters.
    batch: ``(x, y)``.

  Returns:
    A pytree like ``params``.

  References:
    Hassibi & Stork, "Optimal Brain Surgeon", NeurIPS 1992; Theis et al., "Faster gaze
    prediction with dense networks and Fisher pruning", 2018.
  """
  x, y = batch
  per_example = jax.vmap(lambda xi, yi: jax.grad(loss_fn)(params, (xi[None], yi[None])))(x, y)
  return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), per_example)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _averaged_scores(loss_fn, x, y, params, idx, key, criterion, num_probes):
  # Static loss_fn/criterion/num_probes: one compiled scan per model and criterion.
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


def oneshot_scores(trainer: Trainer, params: PyTree, criterion: str, *, batches: int = 16,
                   num_probes: int = 8, seed: int = 0) -> PyTree:
  """Importance scores of ``params`` for one-shot pruning (higher = keep).

  ``magnitude`` is `jaxprune.magnitude`; ``random`` is `jaxprune.random_scores`. The data-driven
  scores are averaged over ``batches`` training batches of the trainer's batch size (one
  minibatch is too noisy to rank 10⁵ weights): ``gradient`` the mean of `jaxprune.gradient`,
  ``taylor`` the mean of `jaxprune.taylor`, ``obd`` `jaxprune.obd` of the mean
  `jaxprune.hessian_diag` (``num_probes`` Rademacher probes per batch) and ``fisher``
  `jaxprune.obd` of the mean `fisher_diag`.

  Args:
    trainer: the model, its loss and the training data.
    params: the (dense) parameters to score.
    criterion: one of `CRITERIA` or `EXTRA_CRITERIA`.
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
  idx = rng.permutation(trainer.x_train.shape[0])[:batches * trainer.batch_size]
  idx = jnp.asarray(idx.reshape(batches, trainer.batch_size))
  return _averaged_scores(trainer.loss_fn, trainer.x_train, trainer.y_train, params, idx, key,
                          criterion, num_probes)


def _given_scores(params: PyTree, *, fixed_scores: PyTree, **unused: Any) -> PyTree:
  """A `jaxprune.prune` score callable that returns scores computed beforehand."""
  del params, unused
  return fixed_scores


def fixed_prune(sparsity: Any, *, scope: str = "global",
                layer_sparsities: LayerSparsities = None) -> optax.GradientTransformationExtraArgs:
  """`jaxprune.prune` at a constant ``sparsity`` of scores given as ``fixed_scores=``.

  The masks are computed at the first step from the ``fixed_scores=`` extra argument and never
  change afterwards (a constant schedule): one-shot pruning followed by fine-tuning.

  Args:
    sparsity: overall fraction pruned; may be traced, so one compiled step serves a sweep.
    scope: ``"global"`` or ``"layer"``, as in `jaxprune.prune`.
    layer_sparsities: per-layer fractions by layer name (`jaxprune.prune`'s ``overrides``).

  Returns:
    The transformation; pass ``fixed_scores=`` to its ``update``.
  """
  return jp.prune(sparsity, _given_scores, scope=scope, overrides=overrides_for(layer_sparsities))


@functools.partial(jax.jit, static_argnames=("scope", "layer_sparsities"))
def select_masks(params: PyTree, scores: PyTree, sparsity: Any, *, scope: str = "global",
                 layer_sparsities: LayerSparsities = None) -> PyTree:
  """The policy alone: boolean masks keeping the highest ``scores`` at ``sparsity``.

  The selection `fixed_prune` makes at its first step, obtained by running that step on zero
  updates; compiled once per scope and allocation (``sparsity`` is traced).

  Args:
    params: the parameters the masks are for.
    scores: a float pytree like ``params`` (higher = keep).
    sparsity: overall fraction pruned of the leaves without a per-layer sparsity.
    scope: ``"global"`` (one threshold over those leaves) or ``"layer"``.
    layer_sparsities: per-layer fractions by layer name, pruned per layer.

  Returns:
    A bool pytree like ``params``.
  """
  tx = fixed_prune(sparsity, scope=scope, layer_sparsities=layer_sparsities)
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zeros, tx.init(params), params, fixed_scores=scores)
  return state.masks


# Cached by value: every one-shot run and sweep point with this recipe shares one compile.
@functools.lru_cache(maxsize=None)
def _finetune_step(model: nn.Module, lr: float, steps: int, scope: str,
                   layer_sparsities: LayerSparsities):
  masking = functools.partial(fixed_prune, scope=scope, layer_sparsities=layer_sparsities)
  return training.finetune_step(loss_fn_for(model), lr, steps, masking)


def finetune(trainer: Trainer, cfg: Config, params: PyTree, scores: PyTree, sparsity: float, *,
             epochs: int, desc: str = "finetune", progress: bool = True,
             max_steps: Optional[int] = None) -> tuple[PyTree, optax.OptState]:
  """Fine-tunes ``params`` for ``epochs`` with the masks of ``scores`` at ``sparsity`` fixed.

  Args:
    trainer: the model and its data.
    cfg: ``ft_lr``, ``scope``, ``layer_sparsities`` and ``seed`` are read.
    params: parameters to prune and fine-tune.
    scores: their scores (higher = keep).
    sparsity: overall fraction pruned.
    epochs: fine-tuning epochs (the length of the learning-rate decay).
    desc: progress-bar label.
    progress: show a progress bar.
    max_steps: stop after this many steps.

  Returns:
    ``(params, opt_state)``; `jaxprune.find_masks` reads the masks back from the state.
  """
  init_tx, step = _finetune_step(trainer.model, cfg.ft_lr, epochs * trainer.steps_per_epoch,
                                 cfg.scope, cfg.layer_sparsities)
  return training.fit(trainer, step, init_tx, params, epochs=epochs, seed=cfg.seed + 2,
                      extra={"fixed_scores": scores, "sparsity": jnp.float32(sparsity)},
                      desc=desc, progress=progress, max_steps=max_steps)


class RunResult(NamedTuple):
  """What one run produced.

  Attributes:
    name: ``model/mode/criterion``.
    config: the run's `Config`.
    params: final parameters, exactly zero where ``masks`` is False.
    masks: the final masks (from the optimizer state).
    accuracy: test accuracy of ``params``.
    oneshot_accuracy: test accuracy right after one-shot pruning, before fine-tuning (one-shot,
      l1 and prox modes; None otherwise).
    report: `jaxprune.report` of ``params`` and ``masks`` with the model's FLOPs.
    seconds: wall time of the run.
    reg_sparsity: fraction of exact zeros the L1 training alone produced (l1 and prox modes).
  """
  name: str
  config: Config
  params: PyTree
  masks: PyTree
  accuracy: float
  oneshot_accuracy: Optional[float]
  report: jp.Report
  seconds: float
  reg_sparsity: Optional[float] = None

  @property
  def test_error(self) -> float:
    return 1.0 - self.accuracy


def schedule_for(cfg: Config, target: float, steps_per_epoch: int) -> optax.Schedule:
  """The sparsity schedule of an in-step mode (gradual / iterative) that reaches ``target``."""
  span = cfg.prune_epochs * steps_per_epoch
  if cfg.mode == "gradual":
    # Ends on the last step of the pruning phase (steps 0 .. span - 1), so the target is
    # reached even when no fine-tuning follows.
    end = max(span - 1, 0)
    return jp.polynomial_schedule(0.0, target, 0, end, frequency=max(1, min(cfg.prune_every, end)))
  # Han et al.: each round removes the same fraction of the surviving weights, so that after
  # `rounds` rounds the target is reached.
  fraction = 1.0 - (1.0 - target) ** (1.0 / cfg.rounds)
  return jp.iterative_schedule(fraction, every=max(span, 1), rounds=cfg.rounds, begin_step=0)


def _in_step_prune(trainer: Trainer, cfg: Config, params: PyTree, *, progress: bool,
                   max_steps: Optional[int]) -> tuple[PyTree, optax.OptState]:
  """Gradual / iterative: `jaxprune.prune` in the train step, then fine-tuning, one chain."""
  spe = trainer.steps_per_epoch
  prune_steps = cfg.prune_epochs * (cfg.rounds if cfg.mode == "iterative" else 1) * spe
  ft_steps = cfg.ft_epochs * spe
  if max_steps is not None:
    prune_steps, ft_steps = min(prune_steps, max_steps), min(ft_steps, max_steps)
  overrides = {path: schedule_for(cfg, s, spe)
               for path, s in (overrides_for(cfg.layer_sparsities) or {}).items()} or None
  score = cfg.criterion
  if score == "fisher":  # a callable score: jp.prune passes it loss_fn= and batch=
    score = lambda p, *, loss_fn, batch, **_: jp.obd(p, fisher_diag(loss_fn, p, batch))
  prune_tx = jp.prune(schedule_for(cfg, cfg.sparsity, spe), score, scope=cfg.scope,
                      overrides=overrides, num_probes=cfg.num_probes,
                      average_hessian=cfg.average_hessian, seed=cfg.seed)
  lr = optax.join_schedules([optax.constant_schedule(cfg.lr),
                             training.finetune_schedule(cfg.ft_lr, ft_steps)], [prune_steps])
  tx = optax.chain(optax.adam(lr), prune_tx)
  total = prune_steps + ft_steps
  return training.fit(trainer, training.make_step(trainer.loss_fn, tx), tx, params,
                      epochs=math.ceil(total / spe), seed=cfg.seed + 2,
                      desc=f"{cfg.mode} {cfg.criterion}", progress=progress, max_steps=total)


def run(trainer: Trainer, cfg: Config, dense: PyTree, *, progress: bool = True,
        max_steps: Optional[int] = None) -> RunResult:
  """Prunes the dense parameters ``dense`` the way ``cfg.mode`` says and fine-tunes them.

  Args:
    trainer: the model and its data.
    cfg: the run configuration.
    dense: trained dense parameters (from `training.train_dense`).
    progress: show progress bars.
    max_steps: cap on steps per training phase (smoke tests).

  Returns:
    A `RunResult` with the final parameters, masks, test accuracy and `jaxprune.report`.
  """
  if cfg.mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {cfg.mode!r}.")
  start = time.perf_counter()
  oneshot_acc = reg_sparsity = None
  params = dense
  if cfg.mode in ("l1", "prox"):
    # Regularised training, then the same one-shot prune + fine-tune as "oneshot".
    if cfg.mode == "l1":
      reg = optax.chain(jp.add_l1(cfg.l1), optax.adam(cfg.lr))
    else:
      reg = optax.chain(optax.adam(cfg.lr), jp.proximal_l1(cfg.l1, cfg.lr))
    reg = optax.with_extra_args_support(reg)
    params, _ = training.fit(trainer, training.make_step(trainer.loss_fn, reg), reg, params,
                             epochs=cfg.prune_epochs, seed=cfg.seed + 1,
                             desc=f"{cfg.mode} {cfg.criterion}", progress=progress,
                             max_steps=max_steps)
    reg_sparsity = float(jp.sparsity(params))  # exact zeros the penalty alone produced

  if cfg.mode in ("gradual", "iterative"):
    params, opt_state = _in_step_prune(trainer, cfg, params, progress=progress,
                                       max_steps=max_steps)
    masks = jp.find_masks(opt_state, params)
  else:
    scores = oneshot_scores(trainer, params, cfg.criterion, batches=cfg.score_batches,
                            num_probes=cfg.num_probes, seed=cfg.seed)
    masks = select_masks(params, scores, cfg.sparsity, scope=cfg.scope,
                         layer_sparsities=cfg.layer_sparsities)
    oneshot_acc = trainer.accuracy(jp.apply_masks(params, masks))
    params, _ = finetune(trainer, cfg, params, scores, cfg.sparsity, epochs=cfg.ft_epochs,
                         desc=f"finetune {cfg.criterion}", progress=progress,
                         max_steps=max_steps)
    # Fine-tuning keeps these masks (its scores and sparsity are constant) and already zeroes
    # the pruned weights; with no fine-tuning step at all, this is what prunes them.
    params = jp.apply_masks(params, masks)

  rep = jp.report(params, masks=masks,
                  apply_fn=lambda p, x: trainer.model.apply({"params": p}, x),
                  inputs=(trainer.x_test[:1],))
  return RunResult(f"{cfg.model}/{cfg.mode}/{cfg.criterion}", cfg, params, masks,
                   trainer.accuracy(params), oneshot_acc, rep, time.perf_counter() - start,
                   reg_sparsity)


class SweepPoint(NamedTuple):
  """Test accuracy of one criterion at one sparsity, before and after fine-tuning."""
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

  Args:
    trainer: the model and its data.
    cfg: scope, per-layer sparsities, score and fine-tuning settings.
    dense: trained dense parameters.
    criteria: names from `CRITERIA` / `EXTRA_CRITERIA`.
    sparsities: overall fractions pruned.
    ft_epochs: fine-tuning epochs per point; 0 skips fine-tuning.
    progress: show progress bars.
    max_steps: cap on fine-tuning steps per point (smoke tests).

  Returns:
    One `SweepPoint` per criterion and sparsity, criteria outermost.
  """
  points = []
  for criterion in criteria:
    scores = oneshot_scores(trainer, dense, criterion, batches=cfg.score_batches,
                            num_probes=cfg.num_probes, seed=cfg.seed)
    for s in sparsities:
      masks = select_masks(dense, scores, s, scope=cfg.scope,
                           layer_sparsities=cfg.layer_sparsities)
      acc0 = trainer.accuracy(jp.apply_masks(dense, masks))
      acc1 = None
      if ft_epochs > 0:
        ft, _ = finetune(trainer, cfg, dense, scores, s, epochs=ft_epochs,
                         desc=f"sweep {criterion} {s:.2f}", progress=progress,
                         max_steps=max_steps)
        acc1 = trainer.accuracy(ft)
      points.append(SweepPoint(criterion, float(s), acc0, acc1))
  return points
