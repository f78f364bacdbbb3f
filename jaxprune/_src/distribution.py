"""Sparsity distributions: how one overall target is split across the prunable leaves.

Every distribution has one signature, ``fn(params, sparsity, *, prunable=None) -> per-leaf
sparsities`` (a pytree with the params' structure, 0 on unprunable leaves), so `uniform_sparsities`,
`erk_sparsities` and a user's own function are interchangeable wherever a distribution is taken
(`jaxprune.pruning_masks`, `jaxprune.prune`).

The split is rounded so that the pruned counts add up to ``round(s * N)`` over the prunable leaves
(largest-remainder rounding). A concrete ``sparsity`` gives Python floats computed exactly; a
traced one (a schedule's value inside a jitted step) gives float32 scalars by the same rule, equal
to the concrete result unless an exact share lies within float32 rounding of a rounding boundary.
"""

from __future__ import annotations

import fractions
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import select
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, Prunable, PyTree

Fraction = Union[float, Array]


def _prunable_shapes(params: PyTree, prunable: Prunable, stacked: stacked_lib.Stacked):
  """``(treedef, per-leaf Layers, (leaf, slice) of each pruned slice, their shapes)``: a slice
  of a stacked leaf counts as a leaf of its own."""
  treedef = jax.tree.structure(params)
  layers = stacked_lib.resolve(params, stacked, prunable)
  where = [(i, j) for i, l in enumerate(layers) for j, f in enumerate(l.flags) if f]
  return treedef, layers, where, [layers[i].shape for i, _ in where]


def _largest_remainder(exact: Sequence[fractions.Fraction], caps: Sequence[int],
                       total: int) -> list[int]:
  """Integer counts ``k_i`` near ``exact[i]``, ``sum(k_i) == total``, ``0 <= k_i <= caps[i]``.

  Starts from the floors and hands the missing units to the largest fractional parts (earlier
  leaves first among equal remainders), so every count stays within one of its exact share.
  """
  counts = [min(max(math.floor(e), 0), n) for e, n in zip(exact, caps)]
  missing = total - sum(counts)
  order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
  step = 1 if missing > 0 else -1
  while missing != 0:
    moved = False
    for i in (order if step > 0 else reversed(order)):
      if missing == 0:
        break
      if 0 <= counts[i] + step <= caps[i]:
        counts[i] += step
        missing -= step
        moved = True
    if not moved:  # cannot happen when 0 <= total <= sum(caps); guards an infinite loop
      break
  return counts


def _largest_remainder_traced(exact: Array, caps: Array, total: Array) -> Array:
  """`_largest_remainder` in float32 for a traced target (one pass: at most one unit per leaf)."""
  floors = jnp.clip(jnp.floor(exact), 0.0, caps)
  missing = total.astype(jnp.float32) - jnp.sum(floors)
  order = jnp.argsort(-(exact - jnp.floor(exact)), stable=True)
  up = (floors < caps)[order]
  give = up & (jnp.cumsum(up) <= missing)
  down = (floors > 0)[order[::-1]]
  take = down & (jnp.cumsum(down) <= -missing)
  delta = (jnp.zeros_like(floors).at[order].add(give.astype(jnp.float32))
           - jnp.zeros_like(floors).at[order[::-1]].add(take.astype(jnp.float32)))
  return floors + delta


def _as_tree(treedef, layers: Sequence[stacked_lib.Layers], where: Sequence[tuple[int, int]],
             values: Sequence[Fraction]) -> PyTree:
  per_slice: list[list[Fraction]] = [[0.0] * l.num for l in layers]
  for (i, j), v in zip(where, values):
    per_slice[i][j] = v
  return jax.tree.unflatten(treedef, [stacked_lib.as_leaf_value(v, l)
                                      for v, l in zip(per_slice, layers)])


def _split(shapes: Sequence[tuple[int, ...]], sparsity: Fraction,
           densities: Union[None, np.ndarray, Array]) -> list[Fraction]:
  """Per-leaf sparsities with pruned counts adding up to ``round(s * N)``.

  Args:
    shapes: prunable leaf shapes.
    sparsity: overall target (Python float, or a traced float32 scalar).
    densities: per-leaf kept fractions before rounding (None: ``1 - s`` everywhere); a leaf of
      density 1 prunes nothing.
  """
  sizes = [math.prod(sh) for sh in shapes]
  if not sizes:
    return []
  if not validation.is_traced(sparsity) and not validation.is_traced(densities):
    s = float(sparsity)
    total = round(s * sum(sizes))
    if densities is None:
      exact = [fractions.Fraction(s) * n for n in sizes]
      caps = sizes
    else:
      dense = [bool(d >= 1.0) for d in densities]
      exact = [fractions.Fraction(0) if dn else fractions.Fraction(float(1.0 - d)) * n
               for d, n, dn in zip(densities, sizes, dense)]
      # Dense leaves are pinned at zero pruned (capacity 0) so rounding never prunes them.
      caps = [0 if dn else n for n, dn in zip(sizes, dense)]
      if sum(caps) < total:  # only through float round-off near s == 0
        caps = sizes
    counts = _largest_remainder(exact, caps, total)
    return [k / n if n else 0.0 for k, n in zip(counts, sizes)]
  s = jnp.asarray(sparsity, jnp.float32)
  n = jnp.asarray(sizes, jnp.float32)
  total = select.num_to_prune(s, sum(sizes))
  if densities is None:
    exact, caps = s * n, n
  else:
    d = jnp.asarray(densities, jnp.float32)
    exact = jnp.where(d >= 1.0, 0.0, (1.0 - d) * n)
    caps = jnp.where(d >= 1.0, 0.0, n)
    caps = jnp.where(jnp.sum(caps) < total, n, caps)
  counts = _largest_remainder_traced(exact, caps, total)
  fracs = counts / jnp.maximum(n, 1.0)
  return [fracs[j] for j in range(len(sizes))]


def uniform_sparsities(params: PyTree, sparsity: Fraction, *, prunable: Prunable = None,
                       stacked: stacked_lib.Stacked = None) -> PyTree:
  """The same sparsity for every prunable leaf, rounded so the pruned total is ``round(s*N)``.

  Each leaf gets ``k_i / n_i`` where ``k_i`` is within one of ``s * n_i`` and the ``k_i`` add up
  to ``round(s * N)`` (``N`` the number of prunable entries, Python rounding). Passed as the
  per-leaf ``sparsity`` of `jaxprune.unstructured_mask` (layer scope) it prunes exactly ``k_i``
  entries of each leaf. (``distribution="uniform"`` in `jaxprune.pruning_masks` instead rounds
  each leaf on its own, ``round(s * n_i)``, the layer-scope rule.)

  Examples:
    Three leaves of 3 entries at 50 %: 4 = round(4.5) entries in all, so one leaf gives 2:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.uniform_sparsities([jnp.zeros((1, 3))] * 3, 0.5)
    [0.6666666666666666, 0.3333333333333333, 0.3333333333333333]

  Args:
    params: parameter pytree (only shapes and dtypes are read).
    sparsity: overall fraction of prunable entries to prune, in [0, 1]; may be traced.
    prunable: ``None`` (default rule), a predicate ``(path, leaf) -> bool`` or a pytree of bools.
    stacked: leading layer axes of each leaf (see `jaxprune.unstructured_mask`); each slice
      along them then counts as a leaf of its own.

  Returns:
    A pytree with the structure of ``params``: Python floats for a concrete ``sparsity``, float32
    scalars for a traced one; 0.0 for leaves that are not prunable. A stacked leaf gets an array
    of per-slice sparsities over its layer axes.

  Raises:
    ValueError: if a concrete ``sparsity`` is not a number in [0, 1].
  """
  s = validation.check_fraction(sparsity, "sparsity")
  treedef, layers, where, shapes = _prunable_shapes(params, prunable, stacked)
  return _as_tree(treedef, layers, where, _split(shapes, s, None))


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


def erk_sparsities(params: PyTree, sparsity: Fraction, *, prunable: Prunable = None,
                   scale: float = 1.0, stacked: stacked_lib.Stacked = None) -> PyTree:
  """Erdős–Rényi-Kernel split of an overall sparsity over the prunable leaves.

  Leaf ``i`` with shape ``(d_1, ..., d_r)`` gets density ``min(1, eps * (sum_j d_j /
  prod_j d_j)**scale)``; leaves that would exceed density 1 are kept dense and ``eps`` is solved
  again over the others so that the overall density is ``1 - sparsity``. Counts are rounded like
  `uniform_sparsities`: the pruned total over prunable leaves is ``round(s * N)``, dense
  leaves prune nothing.

  Examples:
    The small layer would need a density above 1, so it stays dense and the large one takes the
    whole budget, ``round(0.5 · 272) = 136`` of its 256 entries:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"small": jnp.zeros((4, 4)), "big": jnp.zeros((16, 16))}
    >>> jp.erk_sparsities(params, 0.5)
    {'big': 0.53125, 'small': 0.0}
    >>> masks = jp.pruning_masks(params, 0.5, distribution="erk")   # the same split

  Args:
    params: parameter pytree (only shapes are read).
    sparsity: overall fraction of prunable entries to prune, in [0, 1]; may be traced.
    prunable: ``None`` (default rule), a predicate ``(path, leaf) -> bool`` or a pytree of bools.
    scale: exponent on the ERK ratio (1.0: ERK; 0.0: uniform).
    stacked: leading layer axes of each leaf (see `jaxprune.unstructured_mask`); each slice
      along them then counts as a leaf of its own, with the density of its own shape.

  Returns:
    A pytree with the structure of ``params`` of per-leaf sparsities (Python floats for a
    concrete ``sparsity``, float32 scalars for a traced one); 0.0 for leaves that are not
    prunable. A stacked leaf gets an array of per-slice sparsities over its layer axes.

  Raises:
    ValueError: if a concrete ``sparsity`` is not a number in [0, 1] or ``scale`` is negative.

  References:
    Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020 (ERK);
    Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science", Nature Communications 2018 (Erdős–Rényi).
  """
  s = validation.check_fraction(sparsity, "sparsity")
  validation.check_nonnegative(scale, "scale")
  treedef, layers, idx, shapes = _prunable_shapes(params, prunable, stacked)
  if not idx:
    return _as_tree(treedef, layers, idx, [])
  sizes = [math.prod(sh) for sh in shapes]
  raws = [erk_raw_scores(sh, scale) for sh in shapes]
  if validation.is_traced(s):
    dens = _erk_densities(jnp.asarray(sizes, jnp.float32), jnp.asarray(raws, jnp.float32),
                          1.0 - jnp.asarray(s, jnp.float32), jnp, len(idx))
  else:
    dens = _erk_densities(np.asarray(sizes, np.float64), np.asarray(raws, np.float64), 1.0 - s,
                          np, len(idx))
  return _as_tree(treedef, layers, idx, _split(shapes, s, dens))


__all__ = ["erk_raw_scores", "erk_sparsities", "uniform_sparsities"]
