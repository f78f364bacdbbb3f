"""Sparsity distributions: how one overall target is split across the prunable leaves.

Two distributions are provided, each in two forms:

* `uniform_sparsities` / `erk_sparsities` take a concrete Python float and return a pytree of
  Python floats, rounded so that the pruned counts add up to ``round(s * N)`` over the prunable
  leaves (largest-remainder rounding). They are meant for analysis code and for building
  per-leaf targets by hand.
* `erk_fractions` computes the same ERK split inside a jitted step from a traced target (float32,
  no count rounding); `jaxprune.prune` uses it when the target comes from a schedule.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import tree as tree_lib

PyTree = Any


def _check_fraction(value: Any, name: str) -> float:
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) != 0:
    raise ValueError(f"{name}: expected a scalar fraction in [0, 1], got shape {np.shape(value)}.")
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(
        f"{name}: expected a concrete Python number in [0, 1], got {type(value).__name__} "
        "(use erk_fractions inside jit).") from None
  if not 0.0 <= value <= 1.0:  # False for NaN as well
    raise ValueError(f"{name}: expected a fraction in [0, 1], got {value}.")
  return value


def _prunable_leaves(params: PyTree, prunable: tree_lib.Prunable):
  """Flattens ``params`` and returns (leaves with paths, treedef, per-leaf flags)."""
  flags = tree_lib.prunable_flags(params, prunable)
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  flag_leaves = jax.tree.leaves(flags)
  return with_paths, treedef, flag_leaves


def _largest_remainder(exact: Sequence[fractions.Fraction], sizes: Sequence[int],
                       total: int) -> list[int]:
  """Integer counts ``k_i`` near ``exact[i]`` with ``sum(k_i) == total`` and ``0 <= k_i <= n_i``.

  Starts from the floors and hands the missing units to the largest fractional parts (earlier
  leaves first among equal remainders), so every count stays within one of its exact share.
  """
  counts = [min(max(math.floor(e), 0), n) for e, n in zip(exact, sizes)]
  missing = total - sum(counts)
  order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
  step = 1 if missing > 0 else -1
  while missing != 0:
    moved = False
    for i in (order if step > 0 else reversed(order)):
      if missing == 0:
        break
      if 0 <= counts[i] + step <= sizes[i]:
        counts[i] += step
        missing -= step
        moved = True
    if not moved:  # cannot happen when 0 <= total <= sum(sizes); guards an infinite loop
      break
  return counts


def _as_fractions_tree(with_paths, treedef, flag_leaves, counts: dict[int, int]) -> PyTree:
  out = []
  for i, ((_, leaf), flag) in enumerate(zip(with_paths, flag_leaves)):
    n = int(np.size(leaf))
    out.append(counts[i] / n if flag and n else 0.0)
  return jax.tree.unflatten(treedef, out)


def uniform_sparsities(params: PyTree, sparsity: float, *,
                       prunable: tree_lib.Prunable = None) -> PyTree:
  """The same sparsity for every prunable leaf, rounded so the pruned total is ``round(s*N)``.

  Each leaf gets ``k_i / n_i`` where ``k_i`` is within one of ``s * n_i`` and the ``k_i`` add up
  to ``round(s * N)`` (``N`` the number of prunable entries, Python rounding). Pass the result as
  the per-leaf ``sparsity`` of `jaxprune.unstructured_mask` (layer scope) to prune exactly
  ``k_i`` entries of each leaf.

  Args:
    params: parameter pytree (only shapes and dtypes are read).
    sparsity: overall fraction of prunable entries to prune, in [0, 1].
    prunable: ``None`` (default rule), a predicate ``(path, leaf) -> bool`` or a pytree of bools.

  Returns:
    A pytree with the structure of ``params`` of Python floats; 0.0 for leaves that are not
    prunable.

  Raises:
    ValueError: if ``sparsity`` is not a concrete number in [0, 1].
  """
  s = _check_fraction(sparsity, "sparsity")
  with_paths, treedef, flags = _prunable_leaves(params, prunable)
  idx = [i for i, f in enumerate(flags) if f]
  sizes = [int(np.size(with_paths[i][1])) for i in idx]
  total = round(s * sum(sizes))
  exact = [fractions.Fraction(s) * n for n in sizes]
  counts = dict(zip(idx, _largest_remainder(exact, sizes, total)))
  return _as_fractions_tree(with_paths, treedef, flags, counts)


def erk_raw_scores(shape: Sequence[int], scale: float = 1.0) -> float:
  """Unnormalised Erdős–Rényi-Kernel density of one leaf: ``(sum(shape) / prod(shape))**scale``.

  Args:
    shape: leaf shape (kernel dimensions included for convolutions).
    scale: exponent on the ratio; 1.0 is ERK, 0.0 makes every leaf equally dense (uniform).

  Returns:
    The density weight of the leaf (before normalisation and capping).

  References:
    Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020, eq. for ERK.
  """
  prod = math.prod(shape)
  return (sum(shape) / prod) ** scale if prod else 0.0


def _erk_densities(sizes, raws, density, xp, iters: int):
  """ERK densities ``min(1, eps * raw_i)`` with ``sum d_i n_i == density * N``.

  Leaves whose density would exceed 1 are fixed dense and ``eps`` is re-solved over the rest; a
  capped leaf only lowers ``eps`` for the others, which can never un-cap it, so at most ``iters =
  number of leaves`` rounds are needed. Written against ``xp`` (numpy or jax.numpy) so the same
  rule runs on concrete floats and on a traced target.
  """
  sizes = xp.asarray(sizes)
  raws = xp.asarray(raws)
  budget = density * xp.sum(sizes)
  dense = raws <= -1.0  # all False, in xp's boolean type
  eps = xp.zeros((), sizes.dtype)
  for _ in range(iters):
    free = xp.where(dense, 0.0, raws * sizes)
    remaining = budget - xp.sum(xp.where(dense, sizes, 0.0))
    denom = xp.sum(free)
    eps = xp.where(denom > 0, remaining / xp.where(denom > 0, denom, 1.0), 0.0)
    dense = dense | (eps * raws > 1.0)
  return xp.where(dense, 1.0, xp.clip(eps * raws, 0.0, 1.0))


def erk_sparsities(params: PyTree, sparsity: float, *, prunable: tree_lib.Prunable = None,
                   scale: float = 1.0) -> PyTree:
  """Erdős–Rényi-Kernel split of an overall sparsity over the prunable leaves.

  Leaf ``i`` with shape ``(d_1, ..., d_r)`` gets density ``min(1, eps * (sum_j d_j /
  prod_j d_j)**scale)``; leaves that would exceed density 1 are kept dense and ``eps`` is solved
  again over the others so that the overall density is ``1 - sparsity``. Counts are rounded like
  `uniform_sparsities`: the pruned total over prunable leaves is ``round(s * N)``, dense
  leaves prune nothing.

  Args:
    params: parameter pytree (only shapes are read).
    sparsity: overall fraction of prunable entries to prune, in [0, 1].
    prunable: ``None`` (default rule), a predicate ``(path, leaf) -> bool`` or a pytree of bools.
    scale: exponent on the ERK ratio (1.0: ERK; 0.0: uniform).

  Returns:
    A pytree with the structure of ``params`` of Python floats (per-leaf sparsities); 0.0 for
    leaves that are not prunable.

  Raises:
    ValueError: if ``sparsity`` is not a concrete number in [0, 1] or ``scale`` is negative.

  References:
    Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020 (ERK);
    Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science", Nature Communications 2018 (Erdős–Rényi).
  """
  s = _check_fraction(sparsity, "sparsity")
  if not scale >= 0.0:
    raise ValueError(f"scale: expected a non-negative exponent, got {scale}.")
  with_paths, treedef, flags = _prunable_leaves(params, prunable)
  idx = [i for i, f in enumerate(flags) if f]
  shapes = [tuple(np.shape(with_paths[i][1])) for i in idx]
  sizes = [math.prod(sh) for sh in shapes]
  if not idx:
    return _as_fractions_tree(with_paths, treedef, flags, {})
  raws = [erk_raw_scores(sh, scale) for sh in shapes]
  dens = _erk_densities(np.asarray(sizes, np.float64), np.asarray(raws, np.float64), 1.0 - s,
                        np, len(idx))
  total = round(s * sum(sizes))
  dense = [bool(d >= 1.0) for d in dens]
  exact = [fractions.Fraction(0) if dn else fractions.Fraction(float(1.0 - d)) * n
           for d, n, dn in zip(dens, sizes, dense)]
  # Dense leaves are pinned at zero pruned (capacity 0) so rounding never prunes them.
  caps = [0 if dn else n for n, dn in zip(sizes, dense)]
  if sum(caps) < total:  # only through float round-off near s == 0; fall back to all leaves
    caps = sizes
  counts = dict(zip(idx, _largest_remainder(exact, caps, total)))
  return _as_fractions_tree(with_paths, treedef, flags, counts)


def erk_fractions(shapes: Sequence[Sequence[int]], sparsity: jax.Array,
                  scale: float = 1.0) -> jax.Array:
  """ERK per-leaf sparsities for a (possibly traced) overall target, in float32.

  The jit-friendly counterpart of `erk_sparsities` for a list of leaf shapes: same densities,
  no integer rounding (the mask function rounds each leaf's count).

  Args:
    shapes: shapes of the prunable leaves, in leaf order.
    sparsity: overall target in [0, 1]; a float32 scalar, may be traced.
    scale: exponent on the ERK ratio.

  Returns:
    float32 array of per-leaf sparsities, one per shape.
  """
  sizes = [float(math.prod(sh)) for sh in shapes]
  raws = [erk_raw_scores(sh, scale) for sh in shapes]
  density = 1.0 - jnp.asarray(sparsity, jnp.float32)
  dens = _erk_densities(jnp.asarray(sizes, jnp.float32), jnp.asarray(raws, jnp.float32), density,
                        jnp, len(shapes))
  return jnp.clip(1.0 - dens, 0.0, 1.0)
