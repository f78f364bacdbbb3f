"""Mask functions: scores pytree -> pytree of boolean masks (True = keep).

Masks always have the structure and shapes of the scores; leaves that are not prunable get an
all-True mask, so ``apply_masks`` and the optax transformations never need a special case.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import select
from jaxprune._src import tree as tree_lib

Array = jax.Array
PyTree = Any
Sparsity = Union[float, Array, PyTree]

_SCOPES = ("layer", "global")


def _check_scope(scope: str) -> None:
  if scope not in _SCOPES:
    raise ValueError(f"scope: expected one of {_SCOPES}, got {scope!r}.")


def _prepare(scores: PyTree, prunable: tree_lib.Prunable, keep_elementwise: bool = False):
  """Flattens scores with their paths and prunable flags, validating dtypes.

  `select.Elementwise` leaves stay lazy with ``keep_elementwise`` (the unstructured selections
  read them chunk by chunk) and are evaluated otherwise.
  """
  tree_lib.check_float(scores, "scores")
  flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
  flags = jax.tree.leaves(tree_lib.prunable_flags(scores, prunable))
  paths = [tree_lib.path_str(p) for p, _ in flat]
  def leaf(x):
    if isinstance(x, select.Elementwise):
      return x if keep_elementwise else x.evaluate()
    return jnp.asarray(x)

  return [leaf(x) for _, x in flat], paths, flags, treedef


def _per_leaf_sparsity(sparsity: Sparsity, scores: PyTree, treedef) -> list:
  """Broadcasts a scalar or a prefix pytree of fractions to one value per leaf."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity)):
    return [sparsity] * treedef.num_leaves
  try:
    return jax.tree.leaves(jax.tree.broadcast(sparsity, scores))
  except (ValueError, TypeError) as e:
    raise ValueError(
        "sparsity: expected a fraction or a pytree of fractions that is a prefix of the scores' "
        f"structure; got a tree that does not match: {e}") from None


def _global_sparsity(sparsity: Sparsity) -> Union[float, Array]:
  if not jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity)):
    raise ValueError("sparsity: with scope='global' expected one fraction, got a pytree; "
                     "per-leaf sparsities need scope='layer'.")
  return sparsity


def _sparsities(sparsity: Sparsity, scores: PyTree, treedef, idx: list[int], scope: str) -> list:
  """The per-leaf fractions of the selected leaves (layer scope), or the one global fraction."""
  if scope == "layer":
    per_leaf = _per_leaf_sparsity(sparsity, scores, treedef)
    return [per_leaf[i] for i in idx]
  return [_global_sparsity(sparsity)]


def _after(scores: select.ScoreLike, previous: Array) -> select.Elementwise:
  """``scores`` read only once ``previous`` is computed; the values are unchanged.

  Under jit the per-leaf selections are independent, so XLA runs them side by side and holds
  every leaf's chunk buffers at once (scratch memory about twice the scores' size with many
  leaves). Adding a zero derived from the previous leaf's mask, which XLA cannot fold, makes
  them run one after another. ``x + 0.0 == x`` for every float (``-0.0`` becomes ``+0.0``,
  which the selection already treats as equal).
  """
  zero = jnp.minimum(previous.reshape(-1)[0].astype(jnp.float32), 0.0)
  if isinstance(scores, select.Elementwise):
    fn = scores.fn
    return select.Elementwise(lambda *ops: fn(*ops) + zero, scores.operands)
  return select.Elementwise(lambda s: s + zero, (scores,))


def _select_units(unit_scores: list[Array], paths: list[str], sparsities: list,
                  scope: str) -> list[Array]:
  """Prune masks (True = prune) over per-leaf unit scores, per leaf or globally."""
  if scope == "layer":
    out = []
    for s, path, sp in zip(unit_scores, paths, sparsities):
      k = select.num_to_prune(sp, s.size, "sparsity", path)
      if out and isinstance(out[-1], jax.core.Tracer):
        s = _after(s, out[-1])
      out.append(select.prune_lowest([s], k)[0])
    return out
  total = sum(s.size for s in unit_scores)
  k = select.num_to_prune(sparsities[0], total, "sparsity")
  return select.prune_lowest(unit_scores, k)


def _assemble(treedef, leaves: list[Array], keep: dict) -> PyTree:
  masks = [keep[i] if i in keep else jnp.ones(x.shape, bool) for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, masks)


def unstructured_mask(scores: PyTree, sparsity: Sparsity, *, scope: str = "layer",
                      prunable: tree_lib.Prunable = None) -> PyTree:
  """Masks that prune the lowest-scoring individual entries.

  Exactly ``round(s·n)`` entries of each prunable leaf (``scope="layer"``) or ``round(s·N)`` of
  all prunable entries together (``scope="global"``) are pruned. Lower scores go first, NaN
  below every number; among equal scores the later entry (leaf order, then row-major) goes first.
  Selection is a sort-free radix select (see `jaxprune._src.select`).

  Args:
    scores: pytree of float arrays, higher = more important. A leaf may be an `Elementwise`
      (e.g. ``Elementwise(jnp.abs, (w,))``): its scores are then computed chunk by chunk and
      never held whole, which saves a parameter-sized array per leaf.
    sparsity: fraction in [0, 1], possibly traced; for ``scope="layer"`` also a pytree prefix of
      per-leaf fractions.
    scope: ``"layer"`` (each leaf separately) or ``"global"`` (one threshold over all leaves).
    prunable: None (floating, ndim >= 2), a predicate ``(path, leaf) -> bool`` or a bool pytree.

  Returns:
    Pytree of bool masks shaped like ``scores``; True = keep. Unprunable leaves are all True.
  """
  _check_scope(scope)
  leaves, paths, flags, treedef = _prepare(scores, prunable, keep_elementwise=True)
  idx = [i for i, f in enumerate(flags) if f]
  sps = _sparsities(sparsity, scores, treedef, idx, scope)
  pruned = _select_units([leaves[i] for i in idx], [paths[i] for i in idx], sps, scope)
  return _assemble(treedef, leaves, {i: ~p for i, p in zip(idx, pruned)})


def _normalize_axis(axis: int, ndim: int, path: str, name: str = "axis") -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name}: expected an axis in [{-ndim}, {ndim}) for leaf {path} with "
                     f"{ndim} dimensions, got {axis}.")
  return axis % ndim


def _check_norm(norm: str, allowed: Sequence[str], name: str = "norm") -> None:
  if norm not in allowed:
    raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {norm!r}.")


def _reduce(x: Array, axes: tuple[int, ...], how: str) -> Array:
  """Group score over ``axes``; L2 uses the sum of squares, which orders groups like the norm."""
  x = x.astype(jnp.float32)
  if how == "l1":
    return jnp.sum(jnp.abs(x), axis=axes)
  if how == "l2":
    return jnp.sum(jnp.square(x), axis=axes)
  if how == "max":
    return jnp.max(jnp.abs(x), axis=axes)
  return jnp.mean(jnp.abs(x), axis=axes)


def structured_mask(scores: PyTree, sparsity: Sparsity, *, axis: int = -1, norm: str = "l2",
                    scope: str = "layer", prunable: tree_lib.Prunable = None) -> PyTree:
  """Masks that prune whole slices (neurons, filters, channels) along ``axis``.

  Each index along ``axis`` is one unit, scored by the L1 or L2 norm of its scores over all other
  axes; exactly ``round(s·units)`` units per leaf (or over all leaves for ``scope="global"``) are
  pruned, with the tie rule of `unstructured_mask` on unit indices. ``axis=-1`` is the output
  neuron of a Flax ``(in, out)`` kernel and the filter of an ``(H, W, in, out)`` conv kernel;
  ``axis=-2`` the input channel.

  Args:
    scores: pytree of float arrays.
    sparsity: fraction of units to prune (possibly traced; per-leaf prefix pytree for layer scope).
    axis: the unit axis.
    norm: ``"l2"`` or ``"l1"``.
    scope: ``"layer"`` or ``"global"``.
    prunable: see `unstructured_mask`.

  Returns:
    Pytree of bool masks shaped like ``scores``, constant along every axis but ``axis``.
  """
  _check_scope(scope)
  _check_norm(norm, ("l1", "l2"))
  leaves, paths, flags, treedef = _prepare(scores, prunable)
  idx = [i for i, f in enumerate(flags) if f]
  axes = {i: _normalize_axis(axis, leaves[i].ndim, paths[i]) for i in idx}
  unit_scores = []
  for i in idx:
    others = tuple(a for a in range(leaves[i].ndim) if a != axes[i])
    unit_scores.append(_reduce(leaves[i], others, norm))
  sps = _sparsities(sparsity, scores, treedef, idx, scope)
  pruned = _select_units(unit_scores, [paths[i] for i in idx], sps, scope)
  keep = {}
  for i, p in zip(idx, pruned):
    shape = [1] * leaves[i].ndim
    shape[axes[i]] = leaves[i].shape[axes[i]]
    keep[i] = jnp.broadcast_to(~p.reshape(shape), leaves[i].shape)
  return _assemble(treedef, leaves, keep)


def nm_mask(scores: PyTree, n: int = 2, m: int = 4, *, axis: int = -2,
            prunable: tree_lib.Prunable = None) -> PyTree:
  """N:M masks: in every group of ``m`` consecutive entries along ``axis`` keep the ``n`` best.

  The default 2:4 along ``axis=-2`` groups along the reduction (input) dimension of a Flax
  kernel, ``(in, out)`` or ``(H, W, in, out)``, the layout NVIDIA sparse tensor cores accelerate
  (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). Within a group lower scores
  are pruned first, NaN first of all, and among equal scores the later entry.

  Args:
    scores: pytree of float arrays.
    n: entries kept per group, ``0 <= n <= m``.
    m: group size, ``m >= 1``; ``scores.shape[axis]`` must be divisible by it.
    axis: axis along which groups run.
    prunable: see `unstructured_mask`.

  Returns:
    Pytree of bool masks with exactly ``n`` True per group on prunable leaves.
  """
  for name, v in (("n", n), ("m", m)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise ValueError(f"{name}: expected an int, got {v!r}.")
  if m < 1 or not 0 <= n <= m:
    raise ValueError(f"n, m: expected 0 <= n <= m and m >= 1, got n={n}, m={m}.")
  leaves, paths, flags, treedef = _prepare(scores, prunable)
  keep = {}
  for i, (x, path, flag) in enumerate(zip(leaves, paths, flags)):
    if not flag:
      continue
    ax = _normalize_axis(axis, x.ndim, path)
    if x.shape[ax] % m:
      raise ValueError(f"nm_mask: leaf {path} has size {x.shape[ax]} along axis {axis}, "
                       f"expected a multiple of m={m}.")
    keys = jnp.moveaxis(select.score_keys(x), ax, -1)
    groups = keys.reshape(keys.shape[:-1] + (x.shape[ax] // m, m))
    a, b = groups[..., :, None], groups[..., None, :]
    j_before_i = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]
    # rank of entry i = number of entries j that take precedence over it
    rank = jnp.sum((b > a) | ((b == a) & j_before_i), axis=-1)
    mask = (rank < n).reshape(keys.shape)
    keep[i] = jnp.moveaxis(mask, -1, ax)
  return _assemble(treedef, leaves, keep)


def block_mask(scores: PyTree, sparsity: Sparsity, block_shape: Sequence[int], *,
               reduce: str = "l1", scope: str = "layer", prunable: tree_lib.Prunable = None,
               allow_partial: bool = False) -> PyTree:
  """Masks that prune whole blocks of entries.

  ``block_shape`` applies to the trailing dimensions of each leaf (leading ones get block size
  1), so ``(8, 128)`` tiles the last two dims of a kernel the way TPU matrix units do. Each block
  is scored by ``reduce`` over its entries and exactly ``round(s·blocks)`` blocks are pruned,
  with the tie rule of `unstructured_mask` over block indices in row-major order.

  Args:
    scores: pytree of float arrays.
    sparsity: fraction of blocks to prune (possibly traced; per-leaf prefix pytree for layer).
    block_shape: positive ints, at most as many as the leaf's dimensions.
    reduce: block score: ``"l1"``, ``"l2"``, ``"max"`` (of ``|s|``) or ``"mean"`` (of ``|s|``).
    scope: ``"layer"`` or ``"global"``.
    prunable: see `unstructured_mask`.
    allow_partial: if False, a dimension not divisible by its block size is an error; if True the
      edge blocks are partial (their mean uses their true size).

  Returns:
    Pytree of bool masks shaped like ``scores``, constant within each block.
  """
  _check_scope(scope)
  _check_norm(reduce, ("l1", "l2", "max", "mean"), "reduce")
  block_shape = tuple(block_shape)
  if not block_shape or any(not isinstance(b, (int, np.integer)) or b < 1 for b in block_shape):
    raise ValueError(f"block_shape: expected a non-empty tuple of positive ints, got "
                     f"{block_shape!r}.")
  leaves, paths, flags, treedef = _prepare(scores, prunable)
  idx = [i for i, f in enumerate(flags) if f]
  block_scores, layouts = [], []
  for i in idx:
    x, path = leaves[i], paths[i]
    if len(block_shape) > x.ndim:
      raise ValueError(f"block_shape: {block_shape} has more dims than leaf {path} with shape "
                       f"{x.shape}.")
    bs = (1,) * (x.ndim - len(block_shape)) + block_shape
    nb = tuple(math.ceil(d / b) for d, b in zip(x.shape, bs))
    if not allow_partial and any(d % b for d, b in zip(x.shape, bs)):
      raise ValueError(f"block_mask: leaf {path} has shape {x.shape}, not divisible by block "
                       f"{bs}; pass allow_partial=True to use partial edge blocks.")
    pad = [(0, n * b - d) for d, b, n in zip(x.shape, bs, nb)]
    fill = -jnp.inf if reduce == "max" else 0.0
    padded = jnp.pad(jnp.abs(x.astype(jnp.float32)), pad, constant_values=fill)
    blocked = padded.reshape([v for n, b in zip(nb, bs) for v in (n, b)])
    inner = tuple(range(1, 2 * x.ndim, 2))
    how = "l1" if reduce == "mean" else reduce
    s = _reduce(blocked, inner, how)
    if reduce == "mean":
      ones = jnp.pad(jnp.ones(x.shape, jnp.float32), pad)
      s = s / jnp.sum(ones.reshape(blocked.shape), axis=inner)
    block_scores.append(s)
    layouts.append((bs, nb))
  sps = _sparsities(sparsity, scores, treedef, idx, scope)
  pruned = _select_units(block_scores, [paths[i] for i in idx], sps, scope)
  keep = {}
  for i, p, (bs, _) in zip(idx, pruned, layouts):
    full = ~p
    for ax, b in enumerate(bs):
      full = jnp.repeat(full, b, axis=ax)
    keep[i] = full[tuple(slice(0, d) for d in leaves[i].shape)]
  return _assemble(treedef, leaves, keep)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeros the entries of ``params`` whose mask is False; dtypes and structure are kept.

  Args:
    params: parameter pytree.
    masks: bool pytree with the same structure and shapes.

  Returns:
    The masked parameters.
  """
  tree_lib.check_same_structure(params, masks, "params", "masks")
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.asarray(p).dtype)),
                      params, masks)


def sparsity(params: PyTree, prunable: tree_lib.Prunable = None) -> Array:
  """Fraction of exact zeros over the prunable leaves (0.0 when none is prunable).

  Args:
    params: parameter pytree.
    prunable: see `unstructured_mask`.

  Returns:
    float32 scalar in [0, 1].
  """
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
  chosen = [x for x, f in zip(leaves, flags) if f]
  total = sum(x.size for x in chosen)
  if total == 0:
    return jnp.float32(0.0)
  zeros = sum(jnp.sum(x == 0, dtype=jnp.float32) for x in chosen)
  return zeros / jnp.float32(total)


class LeafSummary(NamedTuple):
  """One row of `summarize`."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  count: int
  kept: int
  sparsity: float
  prunable: bool


def summarize(params: PyTree, masks: Optional[PyTree] = None,
              prunable: tree_lib.Prunable = None) -> list[LeafSummary]:
  """Per-leaf counts: entries, kept entries and sparsity (host-side, concrete values).

  Args:
    params: parameter pytree.
    masks: optional masks; kept = True entries of the mask. Without masks, kept = nonzeros.
      Unprunable leaves count as fully kept either way (nothing prunes them), as in
      `jaxprune.report`.
    prunable: see `unstructured_mask`.

  Returns:
    One `LeafSummary` per leaf in `jax.tree.leaves` order.
  """
  if masks is not None:
    tree_lib.check_same_structure(params, masks, "params", "masks")
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  rows = []
  src = masks if masks is not None else params
  for (path, x), f, m in zip(tree_lib.leaves_with_paths(params), flags, jax.tree.leaves(src)):
    arr = np.asarray(m)
    count = int(arr.size)
    kept = int(np.count_nonzero(arr)) if f else count
    rows.append(LeafSummary(path, tuple(np.shape(x)), str(np.asarray(x).dtype), count, kept,
                            1.0 - kept / count if count else 0.0, f))
  return rows


def format_summary(rows: Sequence[LeafSummary]) -> str:
  """A fixed-width table of `summarize` rows with a total over prunable leaves."""
  header = f"{'leaf':<40} {'shape':>18} {'count':>12} {'kept':>12} {'sparsity':>9}"
  lines = [header, "-" * len(header)]
  for r in rows:
    mark = "" if r.prunable else " (dense)"
    lines.append(f"{(r.path + mark)[:40]:<40} {str(r.shape):>18} {r.count:>12,} {r.kept:>12,} "
                 f"{r.sparsity:>9.2%}")
  n = sum(r.count for r in rows if r.prunable)
  k = sum(r.kept for r in rows if r.prunable)
  lines.append("-" * len(header))
  lines.append(f"{'total (prunable)':<40} {'':>18} {n:>12,} {k:>12,} "
               f"{(1 - k / n if n else 0.0):>9.2%}")
  return "\n".join(lines)
