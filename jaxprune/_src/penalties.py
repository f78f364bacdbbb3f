"""Sparsity-inducing penalties as optax transformations: L1 subgradient, L1 and group-lasso prox.

`add_l1` works in gradient space (chain it *before* the optimizer, like
`optax.add_decayed_weights`). The proximal steps work in parameter space: chained *after* the
optimizer, they see the point ``z = params + updates`` the optimizer is about to move to and emit
updates that land on ``prox(z)`` instead, so soft-thresholded entries become exactly zero after
`optax.apply_updates` (``p + (0 - p) == +0`` in IEEE arithmetic).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._src import tree as tree_lib

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class PenaltyState(NamedTuple):
  """State of the penalty transformations: the step count, for schedules."""
  count: jax.Array


def _init(params: PyTree) -> PenaltyState:
  del params
  return PenaltyState(count=jnp.zeros((), jnp.int32))


def _value(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return x(count) if callable(x) else x


def _require_params(params: PyTree, name: str) -> None:
  if params is None:
    raise ValueError(f"{name}: expected the current params as the third argument of update(), "
                     "got None.")


def add_l1(strength: ScalarOrSchedule, *,
           prunable: tree_lib.Prunable = None) -> optax.GradientTransformation:
  """Adds ``strength * sign(params)`` to the updates: the subgradient of ``strength * ||w||_1``.

  Chain it before the optimizer so that the optimizer sees the gradient of
  ``L(w) = L0(w) + strength * ||w||_1``, e.g. ``optax.chain(jp.add_l1(1e-4), optax.adam(1e-3))``.
  The subgradient makes weights oscillate around zero rather than reach it; use `proximal_l1`
  for exact zeros.

  Args:
    strength: L1 coefficient, or a schedule ``count -> coefficient``.
    prunable: which leaves are penalised: ``None`` (default rule: floating arrays with
      ``ndim >= 2``), a predicate ``(path, leaf) -> bool`` or a pytree of bools.

  Returns:
    An `optax.GradientTransformation`; ``update`` requires ``params``.
  """

  return _per_leaf("add_l1", lambda count: _value(strength, count),
                   lambda path, u, p, lam: (u + lam * jnp.sign(p)).astype(u.dtype), prunable)


def _per_leaf(name: str, coefficient: Callable[[jax.Array], jax.Array],
              leaf_fn: Callable[[tuple, jax.Array, jax.Array, jax.Array], jax.Array],
              prunable: tree_lib.Prunable) -> optax.GradientTransformation:
  """A penalty transformation: ``leaf_fn(path, update, param, coefficient(count))`` on every
  prunable leaf, the updates unchanged on the others, and a step count for schedules."""

  def update_fn(updates, state, params=None):
    _require_params(params, name)
    flags = tree_lib.prunable_flags(params, prunable)
    c = coefficient(state.count)
    new = jax.tree_util.tree_map_with_path(
        lambda path, u, p, f: leaf_fn(path, u, p, c) if f else u, updates, params, flags)
    return new, PenaltyState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(_init, update_fn)


def _soft_threshold_update(u: jax.Array, p: jax.Array, t: jax.Array) -> jax.Array:
  z = p + u
  shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - t, 0)
  # 0 - p is exactly -p, so p + update is exactly +0 where the threshold zeroes the entry.
  return jnp.where(jnp.abs(z) <= t, -p, shrunk - p).astype(u.dtype)


def proximal_l1(strength: ScalarOrSchedule, learning_rate: ScalarOrSchedule, *,
                prunable: tree_lib.Prunable = None) -> optax.GradientTransformation:
  """Proximal step of ``strength * ||w||_1``: soft-thresholding after the optimizer.

  With ``z = params + updates`` (the optimizer's proposed point) the emitted updates move the
  params to ``sign(z) * max(|z| - learning_rate * strength, 0)``; entries with ``|z|`` below the
  threshold become exactly 0. ``optax.chain(optax.sgd(lr), jp.proximal_l1(lam, lr))`` is
  ISTA. The ``learning_rate`` must be the step size the optimizer used, so that the threshold
  is ``step * strength``.

  Args:
    strength: L1 coefficient ``lambda``, or a schedule of the step count.
    learning_rate: the optimizer's step size, or the same schedule the optimizer uses.
    prunable: which leaves get the proximal step (see `add_l1`); other leaves pass through.

  Returns:
    An `optax.GradientTransformation`; ``update`` requires ``params``.

  References:
    Daubechies, Defrise & De Mol, "An iterative thresholding algorithm for linear inverse
    problems with a sparsity constraint", 2004; Beck & Teboulle, "A fast iterative
    shrinkage-thresholding algorithm for linear inverse problems", 2009 (ISTA).
  """

  return _per_leaf("proximal_l1", _threshold(strength, learning_rate),
                   lambda path, u, p, t: _soft_threshold_update(u, p, t), prunable)


def _threshold(strength: ScalarOrSchedule,
               learning_rate: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  """The proximal threshold ``step size * coefficient`` at a step count."""
  return lambda count: _value(learning_rate, count) * _value(strength, count)


def proximal_group_lasso(strength: ScalarOrSchedule, learning_rate: ScalarOrSchedule,
                         axis: int = -1, *,
                         prunable: tree_lib.Prunable = None) -> optax.GradientTransformation:
  """Proximal step of the group lasso over slices along ``axis`` (neurons, filters, channels).

  Each index along ``axis`` is one group ``g`` (for a Flax ``(in, out)`` kernel or an HWIO conv
  filter, ``axis=-1`` groups by output unit). The penalty is ``strength * sum_g ||w_g||_2`` and
  its proximal map is block soft-thresholding: with ``z = params + updates`` and ``t =
  learning_rate * strength``, ``z_g <- z_g * max(0, 1 - t / ||z_g||_2)``. Whole groups with
  ``||z_g|| <= t`` become exactly zero, ready for structured removal.

  Args:
    strength: group-lasso coefficient, or a schedule of the step count.
    learning_rate: the optimizer's step size (or its schedule).
    axis: the group axis of each prunable leaf.
    prunable: which leaves get the proximal step (see `add_l1`); other leaves pass through.

  Returns:
    An `optax.GradientTransformation`; ``update`` requires ``params``.

  Raises:
    ValueError: at trace time if ``axis`` is out of range for a prunable leaf (names the leaf).

  References:
    Yuan & Lin, "Model selection and estimation in regression with grouped variables", 2006;
    Wen et al., "Learning Structured Sparsity in Deep Neural Networks", NeurIPS 2016.
  """

  def leaf_update(path, u, p, t):
    ndim = np.ndim(p)
    if not -ndim <= axis < ndim:
      raise ValueError(f"proximal_group_lasso: axis {axis} is out of range for leaf "
                       f"{tree_lib.path_str(path)} of shape {np.shape(p)}.")
    reduce_axes = tuple(a for a in range(ndim) if a != axis % ndim)
    z = p + u
    norms = jnp.sqrt(jnp.sum(jnp.square(z.astype(jnp.float32)), reduce_axes, keepdims=True))
    scale = jnp.maximum(1.0 - t / jnp.where(norms > 0, norms, 1.0), 0.0)
    zeroed = norms <= t
    return jnp.where(zeroed, -p, (z * scale).astype(z.dtype) - p).astype(u.dtype)

  return _per_leaf("proximal_group_lasso", _threshold(strength, learning_rate), leaf_update,
                   prunable)
