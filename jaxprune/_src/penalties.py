"""Sparsity-inducing penalties as optax transformations: L1 subgradient, L1 and group-lasso prox.

`add_l1` works in gradient space (chain it *before* the optimizer, like
`optax.add_decayed_weights`). The proximal steps work in parameter space: chained *after* the
optimizer, they see the point ``z = params + updates`` the optimizer is about to move to and emit
updates that land on ``prox(z)`` instead, so soft-thresholded entries become exactly zero after
`optax.apply_updates` (``p + (0 - p) == +0`` in IEEE arithmetic).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, Prunable, PyTree, ScalarOrSchedule


class PenaltyState(NamedTuple):
  """State of the penalty transformations: the step count, for schedules.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> state = jp.add_l1(1e-4).init({"w": jnp.ones((2, 3))})
    >>> int(state.count)
    0
  """
  count: jax.Array


def _init(params: PyTree) -> PenaltyState:
  del params
  return PenaltyState(count=jnp.zeros((), jnp.int32))


def _check_coefficient(value: ScalarOrSchedule, name: str) -> ScalarOrSchedule:
  """A constant must be a finite number >= 0 (a negative L1 strength grows weights); a schedule
  is checked where its value is concrete (`_value`)."""
  if callable(value):
    return value
  if np.ndim(value) != 0 and not validation.is_traced(value):
    raise validation.error(name, "a finite number >= 0 or a schedule count -> number",
                           validation.Text(f"shape {np.shape(value)}"))
  return validation.check_nonnegative(value, name)


def _value(x: ScalarOrSchedule, count: Array, name: str) -> Array:
  out = x(count) if callable(x) else x
  if np.ndim(out) != 0:
    raise validation.error(name, "a scalar per step from the schedule",
                           validation.Text(f"shape {np.shape(out)}"))
  return validation.check_nonnegative(out, name)  # a traced value passes unchecked


def _require_params(params: PyTree, updates: PyTree, name: str) -> None:
  if params is None:
    raise ValueError(f"{name}: expected the current params as the third argument of update(), "
                     "got None.")
  tree_lib.check_same_structure(params, updates, "params", "updates")


def add_l1(strength: ScalarOrSchedule, *,
           prunable: Prunable = None) -> optax.GradientTransformation:
  """Adds ``strength * sign(params)`` to the updates: the subgradient of ``strength * ||w||_1``.

  Chain it before the optimizer so that the optimizer sees the gradient of
  ``L(w) = L0(w) + strength * ||w||_1``, e.g. ``optax.chain(jp.add_l1(1e-4), optax.adam(1e-3))``.
  The subgradient makes weights oscillate around zero rather than reach it; use `proximal_l1`
  for exact zeros.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -2.0, 3.0]]), "b": jnp.array([1.0])}
    >>> grads = {"w": jnp.zeros((1, 3)), "b": jnp.zeros(1)}
    >>> tx = jp.add_l1(0.5)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["w"].tolist(), updates["b"].tolist()   # biases are not penalised by default
    ([[0.5, -0.5, 0.5]], [0.0])

  Args:
    strength: L1 coefficient (a finite number >= 0), or a schedule ``count -> coefficient``
      (its values are checked where they are concrete, i.e. outside jit).
    prunable: which leaves are penalised: ``None`` (default rule: floating arrays with
      ``ndim >= 2``), a predicate ``(path, leaf) -> bool`` or a pytree of bools.

  Returns:
    An `optax.GradientTransformation`; ``update`` requires ``params``.

  Raises:
    ValueError: for a negative, NaN or infinite coefficient, at construction (constants) or at
      update (concrete schedule values); for ``updates`` that do not match ``params``.
  """
  _check_coefficient(strength, "strength")
  return _per_leaf("add_l1", lambda count: _value(strength, count, "strength"),
                   lambda path, u, p, lam: (u + lam * jnp.sign(p)).astype(u.dtype), prunable)


def _per_leaf(name: str, coefficient: Callable[[Array], Array],
              leaf_fn: Callable[[tuple, Array, Array, Array], Array],
              prunable: Prunable) -> optax.GradientTransformation:
  """A penalty transformation: ``leaf_fn(path, update, param, coefficient(count))`` on every
  prunable leaf, the updates unchanged on the others, and a step count for schedules."""

  def update_fn(updates, state, params=None):
    _require_params(params, updates, name)
    flags = tree_lib.prunable_flags(params, prunable)
    for (path, leaf), flag in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(flags)):
      if flag and not tree_lib.is_floating(leaf):
        raise validation.error("params", "floating-point prunable leaves",
                               validation.Text(f"dtype {getattr(leaf, 'dtype', '?')}"), path)
    c = coefficient(state.count)
    new = jax.tree_util.tree_map_with_path(
        lambda path, u, p, f: leaf_fn(path, u, p, c) if f else u, updates, params, flags)
    return new, PenaltyState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(_init, update_fn)


def _soft_threshold_update(u: Array, p: Array, t: Array) -> Array:
  z = p + u
  shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - t, 0)
  # 0 - p is exactly -p, so p + update is exactly +0 where the threshold zeroes the entry.
  return jnp.where(jnp.abs(z) <= t, -p, shrunk - p).astype(u.dtype)


def proximal_l1(strength: ScalarOrSchedule, learning_rate: ScalarOrSchedule, *,
                prunable: Prunable = None) -> optax.GradientTransformation:
  """Proximal step of ``strength * ||w||_1``: soft-thresholding after the optimizer.

  With ``z = params + updates`` (the optimizer's proposed point) the emitted updates move the
  params to ``sign(z) * max(|z| - learning_rate * strength, 0)``; entries with ``|z|`` below the
  threshold become exactly 0. ``optax.chain(optax.sgd(lr), jp.proximal_l1(lam, lr))`` is
  ISTA. The ``learning_rate`` must be the step size the optimizer used, so that the threshold
  is ``step * strength``.

  Examples:
    With a step size of 0.5 and ``strength=0.5`` the threshold is 0.25: smaller entries become
    exactly zero, the others shrink by 0.25.

    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[0.125, -0.5, 1.0]])}
    >>> tx = optax.chain(optax.sgd(0.5), jp.proximal_l1(0.5, learning_rate=0.5))
    >>> grads = {"w": jnp.zeros((1, 3))}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[0.0, -0.25, 0.75]]

  Args:
    strength: L1 coefficient ``lambda`` (a finite number >= 0), or a schedule of the step count.
    learning_rate: the optimizer's step size (>= 0), or the same schedule the optimizer uses.
    prunable: which leaves get the proximal step (see `add_l1`); other leaves pass through.

  Returns:
    An `optax.GradientTransformation`; ``update`` requires ``params``.

  Raises:
    ValueError: as `add_l1`, for ``strength`` and ``learning_rate``.

  References:
    Daubechies, Defrise & De Mol, "An iterative thresholding algorithm for linear inverse
    problems with a sparsity constraint", 2004; Beck & Teboulle, "A fast iterative
    shrinkage-thresholding algorithm for linear inverse problems", 2009 (ISTA).
  """
  _check_coefficient(strength, "strength")
  _check_coefficient(learning_rate, "learning_rate")
  return _per_leaf("proximal_l1", _threshold(strength, learning_rate),
                   lambda path, u, p, t: _soft_threshold_update(u, p, t), prunable)


def _threshold(strength: ScalarOrSchedule,
               learning_rate: ScalarOrSchedule) -> Callable[[Array], Array]:
  """The proximal threshold ``step size * coefficient`` at a step count."""
  return lambda count: (_value(learning_rate, count, "learning_rate") *
                        _value(strength, count, "strength"))


def proximal_group_lasso(strength: ScalarOrSchedule, learning_rate: ScalarOrSchedule,
                         axis: int = -1, *,
                         prunable: Prunable = None) -> optax.GradientTransformation:
  """Proximal step of the group lasso over slices along ``axis`` (neurons, filters, channels).

  Each index along ``axis`` is one group ``g`` (for a Flax ``(in, out)`` kernel or an HWIO conv
  filter, ``axis=-1`` groups by output unit). The penalty is ``strength * sum_g ||w_g||_2`` and
  its proximal map is block soft-thresholding: with ``z = params + updates`` and ``t =
  learning_rate * strength``, ``z_g <- z_g * max(0, 1 - t / ||z_g||_2)``. Whole groups with
  ``||z_g|| <= t`` become exactly zero, ready for structured removal.

  Examples:
    Groups are the columns (``axis=-1``). With threshold ``0.5 * 5.0 = 2.5`` the first column
    (norm 5) is halved and the second (norm 0.2) becomes exactly zero:

    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[3.0, 0.12], [4.0, 0.16]])}
    >>> tx = optax.chain(optax.sgd(0.5), jp.proximal_group_lasso(5.0, learning_rate=0.5))
    >>> grads = {"w": jnp.zeros((2, 2))}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [[1.5, 0.0], [2.0, 0.0]]

  Args:
    strength: group-lasso coefficient, or a schedule of the step count.
    learning_rate: the optimizer's step size (or its schedule).
    axis: the group axis of each prunable leaf.
    prunable: which leaves get the proximal step (see `add_l1`); other leaves pass through.

  Returns:
    An `optax.GradientTransformation`; ``update`` requires ``params``.

  Raises:
    ValueError: for a negative, NaN or infinite coefficient; at trace time if ``axis`` is out of
      range for a prunable leaf (names the leaf).

  References:
    Yuan & Lin, "Model selection and estimation in regression with grouped variables", 2006;
    Wen et al., "Learning Structured Sparsity in Deep Neural Networks", NeurIPS 2016.
  """
  _check_coefficient(strength, "strength")
  _check_coefficient(learning_rate, "learning_rate")
  validation.check_int(axis, "axis")

  def leaf_update(path, u, p, t):
    ndim = np.ndim(p)
    group_axis = validation.normalize_axis(axis, ndim, "axis", tree_lib.path_str(path))
    reduce_axes = tuple(a for a in range(ndim) if a != group_axis)
    z = p + u
    norms = jnp.sqrt(jnp.sum(jnp.square(z.astype(jnp.float32)), reduce_axes, keepdims=True))
    scale = jnp.maximum(1.0 - t / jnp.where(norms > 0, norms, 1.0), 0.0)
    zeroed = norms <= t
    return jnp.where(zeroed, -p, (z * scale).astype(z.dtype) - p).astype(u.dtype)

  return _per_leaf("proximal_group_lasso", _threshold(strength, learning_rate), leaf_update,
                   prunable)
