"""Mask functions: scores pytree -> pytree of boolean masks (True = keep).

Masks always have the structure and shapes of the scores; leaves that are not prunable get an
all-True mask, so ``apply_masks`` and the optax transformations never need a special case.

Each function checks its arguments and counts on the host, then runs one jitted program per
layout (leaf shapes, pattern): called eagerly it compiles once and is reused for every
sparsity; called under an outer `jax.jit` it is inlined.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxprune._src import elementwise
from jaxprune._src import mask_compute
from jaxprune._src import mask_state
from jaxprune._src import select
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Prunable, PyTree, Sparsity

SCOPES = ("layer", "global")
reduce_units = mask_compute.reduce_units
REDUCTIONS = ("l1", "l2", "max", "mean")


def check_scope(scope: Any) -> str:
  """Checks ``scope`` is ``"layer"`` or ``"global"``."""
  return validation.check_choice(scope, SCOPES, "scope")


def check_reduce(reduce: Any, allowed: Sequence[str] = REDUCTIONS, name: str = "reduce") -> str:
  """Checks a unit-score reduction name against ``allowed``."""
  return validation.check_choice(reduce, allowed, name)


def prepare(scores: PyTree, prunable: Prunable) -> tuple[list, list[str], list[bool], Any]:
  """Flattens scores into ``(leaves, paths, prunable flags, treedef)``, checking dtypes.

  Array leaves become jax arrays; `elementwise.Elementwise` leaves stay lazy.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
  flags = jax.tree.leaves(tree_lib.prunable_flags(scores, prunable))
  paths = [tree_lib.path_str(p) for p, _ in flat]
  leaves = [x if isinstance(x, elementwise.Elementwise) else jnp.asarray(x) for _, x in flat]
  for x, path in zip(leaves, paths):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise validation.error("scores", "floating-point arrays", f"dtype {x.dtype}", path)
  return leaves, paths, flags, treedef


def leaf_counts(sparsity: Sparsity, scores: PyTree, sizes: dict[int, int], paths: list[str],
                scope: str) -> list:
  """Entries to prune: per selected leaf (layer scope), or one count over them all (global).

  Args:
    sparsity: a fraction, or (layer scope) a pytree prefix of per-leaf fractions.
    scores: the scores pytree (for broadcasting a prefix).
    sizes: leaf index -> number of units of each selected leaf.
    paths: leaf paths for messages.
    scope: ``"layer"`` or ``"global"``.

  Returns:
    Python ints for concrete fractions, int32 scalars for traced ones.
  """
  single = jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity)) and sparsity is not None
  if sparsity is None or single:
    sparsity = validation.check_fraction(sparsity, "sparsity")
  if scope == "layer":
    per_leaf = validation.broadcast_prefix(sparsity, scores, "sparsity", "a fraction")
    return [select.num_to_prune(per_leaf[i], n, "sparsity", paths[i]) for i, n in sizes.items()]
  if not single:
    raise validation.error("sparsity", "one fraction with scope='global' (per-leaf fractions "
                           "need scope='layer')", "a pytree")
  return [select.num_to_prune(sparsity, sum(sizes.values()), "sparsity")]


def prepare_layers(scores: PyTree, prunable: Prunable, stacked: stacked_lib.Stacked,
                   ) -> tuple[list, list[str], list[stacked_lib.Layers], list[int], Any]:
  """`prepare` with layer axes: ``(leaves, paths, per-leaf Layers, selected leaves, treedef)``."""
  leaves, paths, _, treedef = prepare(scores, False)
  layers = stacked_lib.resolve(scores, stacked, prunable)
  return leaves, paths, layers, [i for i, l in enumerate(layers) if l.any], treedef


def layer_counts(sparsity: Sparsity, scores: PyTree, layers: list[stacked_lib.Layers],
                 units: dict[int, int], paths: list[str], scope: str) -> list:
  """`leaf_counts` per slice: per selected leaf its count or per-slice counts (layer scope), or
  one count over every pruned slice (global scope).

  Args:
    sparsity: a fraction, or (layer scope) a pytree prefix of per-leaf fractions, where a
      stacked leaf's may be an array of fractions over its layer axes.
    scores: the scores pytree (for broadcasting a prefix).
    layers: per leaf its `stacked.Layers`.
    units: leaf index -> number of units of one slice of each selected leaf.
    paths: leaf paths for messages.
    scope: ``"layer"`` or ``"global"``.

  Returns:
    Counts as `stacked.slice_counts` gives them (layer scope), or one count (global scope).
  """
  if scope == "global":
    sizes = {i: n * sum(layers[i].flags) for i, n in units.items()}
    return leaf_counts(sparsity, scores, sizes, paths, scope)
  single = jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity)) and sparsity is not None
  if sparsity is None or single:
    sparsity = validation.check_fraction(sparsity, "sparsity")
  per_leaf = validation.broadcast_prefix(sparsity, scores, "sparsity", "a fraction")
  return [stacked_lib.slice_counts(per_leaf[i], layers[i], n, paths[i])
          for i, n in units.items()]


def unstructured_mask(scores: PyTree, sparsity: Sparsity, *, scope: str = "layer",
                      prunable: Prunable = None, stacked: stacked_lib.Stacked = None) -> PyTree:
  """Masks that prune the lowest-scoring individual entries.

  Exactly ``round(s·n)`` entries of each prunable leaf (``scope="layer"``) or ``round(s·N)`` of
  all prunable entries together (``scope="global"``) are pruned. Lower scores go first, NaN
  below every number; among equal scores the later entry (leaf order, then row-major) goes first.
  Selection is a sort-free radix select over 2¹⁶-bin histograms of order-preserving keys.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> scores = jp.magnitude({"a": jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]),
    ...                        "b": jnp.array([[0.1, 0.2], [0.3, 7.0]])})
    >>> masks = jp.unstructured_mask(scores, 0.5)   # half of each leaf
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([[False, True, False], [True, False, True]], [[False, False], [True, True]])
    >>> masks = jp.unstructured_mask(scores, 0.5, scope="global")   # the lowest 5 of all 10
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([[False, True, True], [True, False, True]], [[False, False], [False, True]])

  Args:
    scores: pytree of float arrays, higher = more important. A leaf may be an `Elementwise`
      (e.g. ``Elementwise(jnp.abs, (w,))``): its scores are then computed chunk by chunk and
      never held whole, which saves a parameter-sized array per leaf.
    sparsity: fraction in [0, 1], possibly traced; for ``scope="layer"`` also a pytree prefix of
      per-leaf fractions (for a stacked leaf a fraction or an array of them over its layer axes).
    scope: ``"layer"`` (each leaf separately) or ``"global"`` (one threshold over all leaves).
    prunable: None (floating, ndim >= 2), a predicate ``(path, leaf) -> bool`` or a bool pytree.
    stacked: leading layer axes of each leaf: None, an int (or bool) for every leaf, a pytree
      prefix of them or a function ``(path, leaf) -> int``. Each slice along those axes is then
      pruned as its own layer (see `jaxprune._src.stacked`).

  Returns:
    Pytree of bool masks shaped like ``scores``; True = keep. Unprunable leaves are all True.
  """
  check_scope(scope)
  leaves, paths, layers, idx, treedef = prepare_layers(scores, prunable, stacked)
  counts = layer_counts(sparsity, scores, layers, {i: layers[i].size for i in idx}, paths, scope)
  return mask_compute.run("unstructured", leaves, idx, treedef, scope, (), counts, layers)


def structured_mask(scores: PyTree, sparsity: Sparsity, *, axis: int = -1, reduce: str = "l2",
                    scope: str = "layer", prunable: Prunable = None,
                    stacked: stacked_lib.Stacked = None) -> PyTree:
  """Masks that prune whole slices (neurons, filters, channels) along ``axis``.

  Each index along ``axis`` is one unit, scored by ``reduce`` of its scores over all other axes;
  exactly ``round(s·units)`` units per leaf (or over all leaves for ``scope="global"``) are
  pruned, with the tie rule of `unstructured_mask` on unit indices. ``axis=-1`` is the output
  neuron of a Flax ``(in, out)`` kernel and the filter of an ``(H, W, in, out)`` conv kernel;
  ``axis=-2`` the input channel.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]])
    >>> masks = jp.structured_mask(jp.magnitude({"w": w}), 1 / 3, axis=-1)   # column norms
    >>> masks["w"].tolist()   # 3.2, 4.0 and 6.3: the first column goes
    [[False, True, True], [False, True, True]]

  Args:
    scores: pytree of float arrays.
    sparsity: fraction of units to prune (possibly traced; per-leaf prefix pytree for layer scope).
    axis: the unit axis (of one slice of a stacked leaf).
    reduce: unit score: ``"l2"`` (norm) or ``"l1"``.
    scope: ``"layer"`` or ``"global"``.
    prunable: see `unstructured_mask`.
    stacked: see `unstructured_mask`; a unit is then a (slice, index along ``axis``) pair.

  Returns:
    Pytree of bool masks shaped like ``scores``, constant along every axis but ``axis``.
  """
  check_scope(scope)
  check_reduce(reduce, ("l1", "l2"))
  leaves, paths, layers, idx, treedef = prepare_layers(scores, prunable, stacked)
  axes = tuple(validation.normalize_axis(axis, len(layers[i].shape), "axis", paths[i])
               for i in idx)
  sizes = {i: layers[i].shape[a] for i, a in zip(idx, axes)}
  counts = layer_counts(sparsity, scores, layers, sizes, paths, scope)
  return mask_compute.run("structured", leaves, idx, treedef, scope, (axes, reduce), counts,
                          layers)


def nm_mask(scores: PyTree, n: int = 2, m: int = 4, *, axis: int = -2,
            prunable: Prunable = None, stacked: stacked_lib.Stacked = None) -> PyTree:
  """N:M masks: in every group of ``m`` consecutive entries along ``axis`` keep the ``n`` best.

  The default 2:4 along ``axis=-2`` groups along the reduction (input) dimension of a Flax
  kernel, ``(in, out)`` or ``(H, W, in, out)``, the layout NVIDIA sparse tensor cores accelerate.
  Within a group lower scores are pruned first, NaN first of all, and among equal scores the
  later entry.

  Examples:
    2:4 along the inputs (rows of an ``(in, out)`` kernel): each column keeps its 2 largest of 4.

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1.0, 4.0], [3.0, 2.0], [2.0, 1.0], [4.0, 3.0]])
    >>> jp.nm_mask(jp.magnitude({"w": w}), 2, 4)["w"].tolist()
    [[False, True], [True, False], [False, False], [True, True]]

  Args:
    scores: pytree of float arrays.
    n: entries kept per group, ``0 <= n <= m``.
    m: group size, ``m >= 1``; ``scores.shape[axis]`` must be divisible by it.
    axis: axis along which groups run (of one slice of a stacked leaf: never a layer axis).
    prunable: see `unstructured_mask`.
    stacked: see `unstructured_mask`.

  Returns:
    Pytree of bool masks with exactly ``n`` True per group on prunable leaves.

  References:
    Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (2:4 on NVIDIA Ampere).
  """
  m = validation.check_int(m, "m", 1)
  n = validation.check_int(n, "n", 0, m)
  leaves, paths, layers, idx, treedef = prepare_layers(scores, prunable, stacked)
  axes = tuple(validation.normalize_axis(axis, len(layers[i].shape), "axis", paths[i])
               for i in idx)
  for i, a in zip(idx, axes):
    if layers[i].shape[a] % m:
      raise validation.error("m", f"a divisor of {layers[i].shape[a]}, the size along axis "
                             f"{axis}", m, paths[i])
  return mask_compute.run("nm", leaves, idx, treedef, "layer", (n, m, axes), [], layers)


def check_block_shape(block_shape: Any) -> tuple[int, ...]:
  """Checks a non-empty sequence of positive integers and returns it as a tuple."""
  expected = "a non-empty sequence of positive integers"
  if isinstance(block_shape, (str, bytes)) or not isinstance(block_shape, Sequence) or (
      not block_shape):
    raise validation.error("block_shape", expected, block_shape)
  for b in block_shape:
    validation.check_int(b, "block_shape", 1)
  return tuple(int(b) for b in block_shape)


def block_mask(scores: PyTree, sparsity: Sparsity, block_shape: Sequence[int], *,
               reduce: str = "l1", scope: str = "layer", prunable: Prunable = None,
               allow_partial: bool = False, stacked: stacked_lib.Stacked = None) -> PyTree:
  """Masks that prune whole blocks of entries.

  ``block_shape`` applies to the trailing dimensions of each leaf (leading ones get block size
  1), so ``(8, 128)`` tiles the last two dims of a kernel the way TPU matrix units do. Each block
  is scored by ``reduce`` over its entries and exactly ``round(s·blocks)`` blocks are pruned,
  with the tie rule of `unstructured_mask` over block indices in row-major order.

  Examples:
    The two ``2 × 2`` blocks off the diagonal score lowest:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> scores = jnp.array([[9.0, 9.0, 0.0, 1.0], [9.0, 9.0, 1.0, 0.0],
    ...                     [0.0, 1.0, 9.0, 9.0], [1.0, 0.0, 9.0, 9.0]])
    >>> jp.block_mask({"w": scores}, 0.5, (2, 2))["w"].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]

  Args:
    scores: pytree of float arrays.
    sparsity: fraction of blocks to prune (possibly traced; per-leaf prefix pytree for layer).
    block_shape: positive ints, at most as many as the leaf's dimensions.
    reduce: block score: ``"l1"``, ``"l2"``, ``"max"`` (of ``|s|``) or ``"mean"`` (of ``|s|``).
    scope: ``"layer"`` or ``"global"``.
    prunable: see `unstructured_mask`.
    allow_partial: if False, a dimension not divisible by its block size is an error; if True the
      edge blocks are partial (scored over their true entries only).
    stacked: see `unstructured_mask`; blocks then tile one slice, never the layer axes.

  Returns:
    Pytree of bool masks shaped like ``scores``, constant within each block.
  """
  check_scope(scope)
  check_reduce(reduce)
  block_shape = check_block_shape(block_shape)
  leaves, paths, layers, idx, treedef = prepare_layers(scores, prunable, stacked)
  blocks, sizes = [], {}
  for i in idx:
    shape, path = layers[i].shape, paths[i]
    if len(block_shape) > len(shape):
      raise validation.error("block_shape", f"at most {len(shape)} dims for shape {shape}",
                             block_shape, path)
    bs = (1,) * (len(shape) - len(block_shape)) + block_shape
    if not allow_partial and any(d % b for d, b in zip(shape, bs)):
      raise validation.error("block_shape", f"a divisor of shape {shape} (or allow_partial=True)",
                             bs, path)
    blocks.append(bs)
    sizes[i] = math.prod(-(-d // b) for d, b in zip(shape, bs))
  counts = layer_counts(sparsity, scores, layers, sizes, paths, scope)
  return mask_compute.run("block", leaves, idx, treedef, scope, (tuple(blocks), reduce), counts,
                          layers)


def apply_masks(params: PyTree, masks: Any) -> PyTree:
  """Zeros the entries of ``params`` whose mask is False; dtypes and structure are kept.

  Pruned entries become ``+0.0`` whatever they held (inf and NaN included). This is also the
  export step after training with `jaxprune.prune`: pass the optimizer state and the masks are
  found in it.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]])
    >>> masks = {"w": jnp.array([[False, True, False], [True, False, True]])}
    >>> jp.apply_masks({"w": w}, masks)["w"].tolist()
    [[0.0, -4.0, 0.0], [-3.0, 0.0, 6.0]]
    >>> state = jp.prune(0.5, masks=masks).init({"w": w})   # or the optax state holding the masks
    >>> jp.apply_masks({"w": w}, state)["w"].tolist()
    [[0.0, -4.0, 0.0], [-3.0, 0.0, 6.0]]

  Args:
    params: parameter pytree.
    masks: bool masks with the leaf paths and shapes of ``params``, or an optax state holding
      them (see `jaxprune.find_masks`; an ``nnx.Optimizer``'s ``opt_state`` works).

  Returns:
    The masked parameters, with the tree structure of ``params``.

  Raises:
    ValueError: for masks that do not match ``params`` or a state holding no matching masks.
  """
  masks = mask_state.masks_for(masks, params)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.asarray(p).dtype)),
                      params, masks)


MaskFn = Callable[..., PyTree]
__all__ = ["apply_masks", "block_mask", "check_block_shape", "check_reduce", "check_scope",
           "layer_counts", "leaf_counts", "nm_mask", "prepare", "prepare_layers", "reduce_units",
           "structured_mask", "unstructured_mask"]
