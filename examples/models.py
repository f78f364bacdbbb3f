"""LeNet-300-100 and LeNet-5 (Flax Linen), their loss and their test accuracy."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Batch = tuple[jax.Array, jax.Array]


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


# Cached so that equal models share one loss function: jitted code that takes it as a static
# argument then compiles once per model, not once per call.
@functools.lru_cache(maxsize=None)
def loss_fn_for(model: nn.Module) -> Callable[[PyTree, Batch], jax.Array]:
  """Mean softmax cross-entropy ``loss(params, (x, y))`` of ``model``.

  Args:
    model: a Flax Linen module mapping images to logits.

  Returns:
    ``loss(params, (x, y))``, also the function `jaxprune.hessian_diag` differentiates twice.
  """

  def loss_fn(params: PyTree, batch: Batch) -> jax.Array:
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _correct(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
             batch_size: int) -> jax.Array:
  # Fixed-size chunks under a scan so the conv net never holds 10k feature maps at once.
  count = lambda xb, yb: jnp.sum(jnp.argmax(model.apply({"params": params}, xb), -1) == yb)
  full = (x.shape[0] // batch_size) * batch_size
  xs = x[:full].reshape((-1, batch_size) + x.shape[1:])
  ys = y[:full].reshape((-1, batch_size))
  correct, _ = jax.lax.scan(lambda c, xy: (c + count(*xy), None), jnp.zeros((), jnp.int32),
                            (xs, ys))
  if full < x.shape[0]:
    correct = correct + count(x[full:], y[full:])
  return correct


def accuracy(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
             batch_size: int = 1000) -> float:
  """Fraction of ``x`` that ``model`` classifies as ``y``, evaluated ``batch_size`` at a time.

  Args:
    model: a Flax Linen module mapping images to logits.
    params: its parameters.
    x: images ``(n, 28, 28, 1)``.
    y: integer labels ``(n,)``.
    batch_size: images per forward pass (the last one may be smaller).

  Returns:
    The accuracy in [0, 1]; the error rate is ``1 - accuracy``.
  """
  return float(_correct(model, params, jnp.asarray(x), jnp.asarray(y), batch_size)) / len(y)
