"""The training loop: jitted steps over device-resident data, learning-rate schedules, `fit`.

Every step takes the training images and labels as arguments and gathers its batch by index
inside the jitted function, so one compiled step serves any dataset of the same shape and the
host sends only ``batch_size`` integers per step.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from data import Dataset
from models import accuracy, loss_fn_for

PyTree = Any
# step(params, opt_state, x_train, y_train, batch_indices, extra) -> (params, opt_state, loss)
Step = Callable[..., tuple[PyTree, optax.OptState, jax.Array]]


class Trainer(NamedTuple):
  """A model and its data on the device: what the steps, `fit` and the evaluation read.

  Attributes:
    model: a Flax Linen module mapping images to logits.
    x_train, y_train, x_test, y_test: the `Dataset` arrays as device arrays.
    batch_size: training examples per step.
  """
  model: nn.Module
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  batch_size: int

  @property
  def steps_per_epoch(self) -> int:
    """Full batches per epoch; the remainder of a shuffled epoch is dropped."""
    return self.x_train.shape[0] // self.batch_size

  @property
  def loss_fn(self) -> Callable[[PyTree, tuple[jax.Array, jax.Array]], jax.Array]:
    return loss_fn_for(self.model)

  def init(self, seed: int) -> PyTree:
    """Fresh parameters of ``model`` from ``seed``."""
    return self.model.init(jax.random.PRNGKey(seed), self.x_train[:1])["params"]

  def accuracy(self, params: PyTree) -> float:
    """Test accuracy in [0, 1]."""
    return accuracy(self.model, params, self.x_test, self.y_test)


def make_trainer(model: nn.Module, data: Dataset, batch_size: int = 128) -> Trainer:
  """Puts ``data`` on the default device next to ``model``."""
  return Trainer(model, jnp.asarray(data.x_train), jnp.asarray(data.y_train),
                 jnp.asarray(data.x_test), jnp.asarray(data.y_test), batch_size)


def dense_schedule(lr: float, steps: int) -> optax.Schedule:
  """Cosine decay from ``lr`` to ``0.05 * lr`` over ``steps``: the dense training's rate."""
  return optax.cosine_decay_schedule(lr, steps, alpha=0.05)


def finetune_schedule(lr: float, steps: int) -> optax.Schedule:
  """Cosine decay from ``lr`` to 0 over ``steps`` (at least one): the fine-tuning rate."""
  return optax.cosine_decay_schedule(lr, max(steps, 1))


def _jit_step(loss_fn: Callable[..., jax.Array],
              tx_for: Callable[[Mapping[str, Any]], optax.GradientTransformationExtraArgs]
              ) -> Step:
  # The transformation is built at trace time from the traced extra arguments, so it may
  # depend on traced values (a sparsity that changes between calls without recompiling).

  @jax.jit
  def step(params, opt_state, x, y, idx, extra):
    batch = (x[idx], y[idx])
    loss, grad = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx_for(extra).update(grad, opt_state, params, grad=grad,
                                              loss_fn=loss_fn, batch=batch, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_step(loss_fn: Callable[..., jax.Array],
              tx: optax.GradientTransformationExtraArgs) -> Step:
  """A jitted train step of ``tx`` on the mean loss of one batch.

  The raw gradients, the loss function and the batch reach ``tx.update`` as the extra
  arguments ``grad=``, ``loss_fn=`` and ``batch=`` (what `jaxprune.prune` reads for gradient,
  Taylor and Hessian scores), followed by the step's ``extra`` mapping; transformations that
  take no extra arguments ignore them inside `optax.chain`.

  Args:
    loss_fn: ``loss_fn(params, (x, y)) -> scalar``.
    tx: the optimizer, e.g. ``optax.chain(optax.adam(lr), jaxprune.prune(...))``.

  Returns:
    ``step(params, opt_state, x_train, y_train, batch_indices, extra) -> (params, opt_state,
    loss)``.
  """
  return _jit_step(loss_fn, lambda extra: tx)


def finetune_step(loss_fn: Callable[..., jax.Array], lr: float, steps: int,
                  masking: Callable[[Any], optax.GradientTransformationExtraArgs]
                  ) -> tuple[optax.GradientTransformationExtraArgs, Step]:
  """Adam with `finetune_schedule`, chained with a masking transformation of a sparsity.

  The step builds ``masking(extra["sparsity"])`` at trace time, so the sparsity is a traced
  argument and one compilation serves every sparsity of a sweep; the returned ``init_tx``
  (built at sparsity 0) initialises the optimizer state, whose structure must not depend on
  the sparsity's value.

  Args:
    loss_fn: ``loss_fn(params, (x, y)) -> scalar``.
    lr: peak fine-tuning learning rate.
    steps: fine-tuning steps (the length of the cosine decay).
    masking: ``sparsity -> transformation`` that keeps pruned weights at zero.

  Returns:
    ``(init_tx, step)``; call the step with ``extra={"sparsity": ..., ...}``.
  """
  schedule = finetune_schedule(lr, steps)
  build = lambda sparsity: optax.chain(optax.adam(schedule), masking(sparsity))
  return build(0.0), _jit_step(loss_fn, lambda extra: build(extra["sparsity"]))


def _progress(total: int, desc: str, enabled: bool) -> Optional[Any]:
  if not enabled:
    return None
  from tqdm.auto import tqdm  # optional dependency: only the progress bar needs it

  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def fit(trainer: Trainer, step: Step, tx: optax.GradientTransformationExtraArgs,
        params: PyTree, *, epochs: int, seed: int, extra: Optional[Mapping[str, Any]] = None,
        desc: str = "train", progress: bool = True,
        max_steps: Optional[int] = None) -> tuple[PyTree, optax.OptState]:
  """Runs ``epochs`` shuffled epochs of ``step`` from ``tx.init(params)``.

  Args:
    trainer: the model and its data.
    step: from `make_step` or `finetune_step` for this ``tx``.
    tx: the transformation ``step`` applies (only its ``init`` is called here).
    params: initial parameters.
    epochs: passes over the training set.
    seed: seed of the data order.
    extra: traced arguments passed to every step (e.g. fixed scores and a sparsity).
    desc: progress-bar label.
    progress: show a tqdm progress bar.
    max_steps: stop after this many steps.

  Returns:
    ``(params, opt_state)`` after the last step.
  """
  extra = dict(extra or {})
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  total = epochs * trainer.steps_per_epoch
  if max_steps is not None:
    total = min(total, max_steps)
  bar = _progress(total, desc, progress)
  n = trainer.steps_per_epoch * trainer.batch_size
  done = 0
  while done < total:
    order = rng.permutation(trainer.x_train.shape[0])[:n]
    for idx in order.reshape(trainer.steps_per_epoch, trainer.batch_size)[:total - done]:
      params, opt_state, loss = step(params, opt_state, trainer.x_train, trainer.y_train,
                                     jnp.asarray(idx), extra)
      done += 1
      if bar is not None:
        bar.update(1)
        if done % 50 == 0 or done == total:
          bar.set_postfix(loss=f"{float(loss):.4f}")
  if bar is not None:
    bar.close()
  return params, opt_state


# Cached by value: equal models and rates share one compiled step across calls and datasets.
@functools.lru_cache(maxsize=None)
def _dense_step(model: nn.Module, lr: float,
                steps: int) -> tuple[optax.GradientTransformationExtraArgs, Step]:
  tx = optax.with_extra_args_support(optax.adam(dense_schedule(lr, steps)))
  return tx, make_step(loss_fn_for(model), tx)


def train_dense(model: nn.Module, data: Dataset | Trainer, *, epochs: int,
                batch_size: int = 128, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                max_steps: Optional[int] = None) -> PyTree:
  """Trains ``model`` from scratch: Adam, `dense_schedule` over ``epochs`` epochs.

  Args:
    model: a Flax Linen module mapping images to logits.
    data: a `Dataset`, or a `Trainer` of the same model whose data is already on the device.
    epochs: passes over the training set.
    batch_size: examples per step (ignored for a `Trainer`, which has its own).
    lr: peak learning rate.
    seed: seed of the initialisation and of the data order.
    progress: show a tqdm progress bar.
    max_steps: stop after this many steps (the schedule still spans ``epochs``).

  Returns:
    The trained parameters.
  """
  trainer = data if isinstance(data, Trainer) else make_trainer(model, data, batch_size)
  if trainer.model != model:
    raise ValueError(f"data: expected a Dataset or a Trainer of {model!r}, got a Trainer of "
                     f"{trainer.model!r}.")
  tx, step = _dense_step(model, lr, epochs * trainer.steps_per_epoch)
  params, _ = fit(trainer, step, tx, trainer.init(seed), epochs=epochs, seed=seed,
                  desc=f"dense {type(model).__name__}", progress=progress, max_steps=max_steps)
  return params
