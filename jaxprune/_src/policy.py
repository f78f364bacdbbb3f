"""The pruning policy: parameters, scores and a target sparsity to masks, in one function.

`pruning_masks` is the whole decision a pruning method makes at one point in time:

    per-leaf sparsities = distribution(params, target)       (or a global threshold)
                          with per-leaf overrides on top
    masks               = pattern selection over the scores  (unstructured, N:M, blocks)
                          with already-pruned entries ranked below every score

It is what `jaxprune.prune` runs inside its jitted step when the schedule moves, and what
one-shot pruning calls directly. It is traceable: the target may be a traced scalar. Its
arguments are checked and resolved to per-slice sparsities in `policy_args`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import elementwise
from jaxprune._src import masks as masks_lib
from jaxprune._src import scores as scores_lib
from jaxprune._src import sharding
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.policy_args import (BlockPattern, Distribution, MaskFn, NMPattern, Overrides,
                                       Pattern, check_distribution, check_pattern,
                                       slice_overrides, slice_sparsities, takes_stacked)
from jaxprune._src.types import Array, Prunable, PyTree, Sparsity


@dataclasses.dataclass(frozen=True)
class _Ranked:
  """``fn(*operands)`` where ``keep``, NaN where already pruned: the scores a policy ranks by.

  Already-pruned entries (NaN) rank below every number, so the lowest scores include every
  pruned entry whenever the count allows; live NaN scores become ``live_nan`` to stay above
  them. Hashable by content, so compiled selections are reused across calls.
  """
  fn: Optional[Callable[..., Array]]  # None: the first operand already holds the scores
  live_nan: float

  def __call__(self, keep: Array, *operands: Array) -> Array:
    s = jnp.asarray(operands[0] if self.fn is None else self.fn(*operands), jnp.float32)
    return jnp.where(keep, jnp.where(jnp.isnan(s), self.live_nan, s), jnp.nan)


def _no_scores(x: Array) -> Array:
  """Placeholder scores of unprunable leaves; the selections never read them."""
  return jnp.zeros(x.shape, jnp.float32)


def reads_elementwise(mask_fn: MaskFn) -> bool:
  """Whether a mask function reads `Elementwise` score leaves chunk by chunk.

  Args:
    mask_fn: a mask function, possibly a `functools.partial`.

  Returns:
    True for the library's unstructured selections; other mask functions get whole arrays.
  """
  base = mask_fn.func if isinstance(mask_fn, functools.partial) else mask_fn
  return base in (masks_lib.unstructured_mask, sharding.sharded_unstructured_mask)


def _leaf_scores(params: PyTree, scores: Optional[PyTree], flags: list[bool],
                 previous: Optional[PyTree], live_nan: float) -> list:
  """Per leaf: lazy scores of prunable leaves (ranked by ``previous``), placeholders elsewhere."""
  p_leaves = jax.tree.leaves(params)
  if scores is None:
    s_leaves = [elementwise.Elementwise(scores_lib.magnitude, (p,)) if f else None
                for p, f in zip(p_leaves, flags)]
  else:
    tree_lib.check_same_structure(params, scores, "params", "scores")
    s_leaves = jax.tree.leaves(scores)
  prev = [None] * len(p_leaves) if previous is None else jax.tree.leaves(previous)
  out = []
  for p, s, f, keep in zip(p_leaves, s_leaves, flags, prev):
    if not f:
      out.append(elementwise.Elementwise(_no_scores, (p,)))
    elif keep is None:
      out.append(s)
    else:
      fn, ops = (s.fn, s.operands) if isinstance(s, elementwise.Elementwise) else (None, (s,))
      out.append(elementwise.Elementwise(_Ranked(fn, live_nan), (jnp.asarray(keep, bool), *ops)))
  return out


def _leaf_value(values: list, layers: stacked_lib.Layers) -> Any:
  """Per-slice sparsities as a mask function's per-leaf value: one scalar when shared."""
  if values and all(v is values[0] for v in values):
    return values[0]
  return stacked_lib.as_leaf_value(values, layers)


def pruning_masks(params: PyTree, sparsity: Sparsity, *, scores: Optional[PyTree] = None,
                  scope: str = "layer", distribution: Distribution = "uniform",
                  overrides: Overrides = None, prunable: Prunable = None,
                  pattern: Pattern = "unstructured", previous: Optional[PyTree] = None,
                  stacked: stacked_lib.Stacked = None) -> PyTree:
  """Masks that bring ``params`` to a target sparsity: the pruning policy in one function.

  The target is split across the prunable leaves by ``distribution`` (``scope="layer"``) or met
  by one threshold over them (``scope="global"``); ``overrides`` fix the sparsity of chosen
  leaves in either scope; the lowest ``scores`` are pruned in the shape ``pattern`` asks for.
  With ``previous`` masks the entries they prune rank below every score and stay pruned, so
  successive calls are monotone (gradual pruning). Counts are exact: ``round(s·n)`` per leaf,
  or ``round(s·N)`` over the globally pruned leaves. Traceable: ``sparsity`` and the override
  values may be traced (a schedule's value inside a jitted step).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]), "b": jnp.ones(3)}
    >>> masks = jp.pruning_masks(params, 0.5)   # magnitude; biases are not prunable
    >>> masks["w"].tolist(), masks["b"].tolist()
    ([[False, True, False], [True, False, True]], [True, True, True])
    >>> masks = jp.pruning_masks(params, 0.5, pattern=jp.NMPattern(1, 2))   # 1 of 2 per column
    >>> masks["w"].tolist()
    [[False, True, False], [True, False, True]]

  Args:
    params: parameter pytree; its shapes drive the distribution and its leaves the default
      prunable rule.
    sparsity: overall target in [0, 1]; a Python number or a (traced) float scalar.
    scores: pytree with the params' structure (arrays or `Elementwise`), higher = more important;
      None for magnitude ``|w|``, computed chunk by chunk without a parameter-sized copy.
    scope: ``"layer"`` (each leaf to its own sparsity) or ``"global"`` (one threshold over every
      prunable leaf that is not overridden).
    distribution: for ``scope="layer"``: ``"uniform"`` (every leaf at the target, each rounded on
      its own), ``"erk"`` (`erk_sparsities`) or a function with the same signature,
      ``fn(params, sparsity, *, prunable) -> per-leaf sparsities`` (a pytree prefix of the
      params; called with a traced ``sparsity`` under jit), e.g. `uniform_sparsities`.
    overrides: per-leaf sparsities replacing the distribution: a mapping from leaf path (as
      `jax.tree_util.keystr` renders it, e.g. ``"['dense1']['kernel']"``) to a fraction, or a
      callable ``(path, leaf) -> fraction | None``. Overridden leaves are pruned per leaf. With
      ``stacked``, keys may also be slice paths (``"['layers']['q']['kernel'][3]"``) and a
      stacked leaf's value an array over its layer axes.
    prunable: which leaves are pruned: None (floating arrays with ``ndim >= 2``), a predicate
      ``(path, leaf) -> bool`` or a pytree of bools.
    pattern: ``"unstructured"``; ``NMPattern(n, m, axis)`` (the pattern fixes the sparsity at
      ``1 - n/m``: a leaf is N:M-pruned when its sparsity is above 0, left dense at 0; layer
      scope only); ``BlockPattern(shape, reduce, allow_partial)``; or a mask function
      ``fn(scores, sparsity, *, scope, prunable) -> masks`` such as
      ``functools.partial(jp.sharding.sharded_unstructured_mask, mesh=mesh, specs=specs)``.
    previous: masks in force (bool pytree with the params' structure), or None.
    stacked: leading layer axes of each leaf (None, an int or bool, a pytree prefix of them or
      ``(path, leaf) -> int``); each slice along them is then a layer of its own for the
      scope, the distribution, the overrides and the pattern (see `jaxprune.unstructured_mask`).
      A distribution function or mask-function pattern then also receives ``stacked=``.

  Returns:
    Bool masks with the structure and shapes of ``params`` (True = keep); unprunable leaves are
    all True, and every entry False in ``previous`` is False.

  Raises:
    ValueError: on a bad argument, naming it (and the leaf).

  References:
    Zhu & Gupta, "To prune, or not to prune", 2017 (gradual pruning with monotone masks);
    Evci et al., "Rigging the Lottery", ICML 2020 (ERK distribution).
  """
  validation.check_choice(scope, masks_lib.SCOPES, "scope")
  distribution = check_distribution(distribution, scope)
  pattern = check_pattern(pattern)
  if isinstance(pattern, NMPattern) and scope != "layer":
    raise validation.error("scope", "'layer' with an NMPattern (N:M masks are per group)", scope)
  if sparsity is None or not jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity)):
    raise validation.error("sparsity", "one fraction in [0, 1] (per-leaf fractions go in "
                           "overrides or a distribution)", sparsity)
  target = validation.check_fraction(sparsity, "sparsity")
  if stacked is not None:
    for name, fn in (("pattern", pattern), ("distribution", distribution)):
      if callable(fn) and not takes_stacked(fn):
        raise validation.error(name, "a function that takes a stacked= keyword when stacked is "
                               "given", getattr(getattr(fn, "func", fn), "__name__", fn))
  treedef = jax.tree.structure(params)
  layers = stacked_lib.resolve(params, stacked, prunable)
  flags = [l.any for l in layers]
  for (path, leaf), flag in zip(tree_lib.leaves_with_paths(params), flags):
    if flag and not tree_lib.is_floating(leaf):
      raise validation.error("params", "floating-point prunable leaves",
                             f"dtype {getattr(leaf, 'dtype', type(leaf).__name__)}", path)
  if previous is not None:
    tree_lib.check_same_structure(params, previous, "params", "previous")
  overridden = slice_overrides(params, layers, overrides)
  per_slice = slice_sparsities(params, target, layers, overridden, distribution, stacked)
  live_nan = 0.0 if isinstance(pattern, BlockPattern) else -np.inf
  leaves = _leaf_scores(params, scores, flags, previous, live_nan)
  if callable(pattern) and not reads_elementwise(pattern):
    leaves = [s.evaluate() if isinstance(s, elementwise.Elementwise) else s for s in leaves]
  scores_tree = jax.tree.unflatten(treedef, leaves)
  values = jax.tree.unflatten(treedef, [_leaf_value(v, l) for v, l in zip(per_slice, layers)])
  flag_tree = functools.partial(stacked_lib.flag_tree, treedef, layers)
  kwargs = {} if stacked is None else {"stacked": stacked}

  if isinstance(pattern, NMPattern):
    nm = masks_lib.nm_mask(scores_tree, pattern.n, pattern.m, axis=pattern.axis,
                           prunable=flag_tree([[f and not _is_zero(s) for f, s in zip(l.flags, ss)]
                                               for l, ss in zip(layers, per_slice)]), **kwargs)
    masks = jax.tree.unflatten(treedef, [
        _dense_where_zero(m, ss, l) for m, ss, l in zip(jax.tree.leaves(nm), per_slice, layers)])
  else:
    if isinstance(pattern, BlockPattern):
      select_fn = functools.partial(masks_lib.block_mask, block_shape=pattern.shape,
                                    reduce=pattern.reduce, allow_partial=pattern.allow_partial)
    else:
      select_fn = masks_lib.unstructured_mask if pattern == "unstructured" else pattern
    if scope == "layer":
      masks = select_fn(scores_tree, values, scope="layer", prunable=flag_tree(), **kwargs)
    else:
      free = [[f and o is None for f, o in zip(l.flags, ov)]
              for l, ov in zip(layers, overridden)]
      masks = select_fn(scores_tree, target, scope="global", prunable=flag_tree(free), **kwargs)
      if any(o is not None for ov in overridden for o in ov):
        chosen = flag_tree([[o is not None for o in ov] for ov in overridden])
        masks = jax.tree.map(jnp.logical_and, masks,
                             select_fn(scores_tree, values, scope="layer", prunable=chosen,
                                       **kwargs))
  if previous is not None:
    masks = jax.tree.map(lambda m, p: jnp.logical_and(m, jnp.asarray(p, bool)), masks, previous)
  return masks


def _dense_where_zero(mask: Array, values: list, layers: stacked_lib.Layers) -> Array:
  """An N:M mask left dense in the slices whose traced sparsity is 0 (concrete zeros were left
  out of the selection)."""
  if not any(validation.is_traced(v) for v in values):
    return mask
  s = jnp.asarray(stacked_lib.as_leaf_value(values, layers), jnp.float32)
  return jnp.where(s.reshape(s.shape + (1,) * (mask.ndim - s.ndim)) > 0, mask, True)


def _is_zero(s: Any) -> bool:
  """A concrete zero sparsity (a traced one is decided in the masks)."""
  return not validation.is_traced(s) and float(s) == 0.0


__all__ = ["pruning_masks", "reads_elementwise"]
