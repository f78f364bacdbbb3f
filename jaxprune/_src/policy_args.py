"""The arguments of the pruning policy: pattern, distribution, overrides, checked and resolved.

`pruning_masks` takes a selection pattern (`NMPattern`, `BlockPattern`, ``"unstructured"`` or a
mask function), a distribution of the target sparsity over the leaves and per-leaf overrides.
This module checks them and turns them into one sparsity per leaf and per slice of a stacked
leaf (`slice_overrides`, `slice_sparsities`); the masks are computed in `policy`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import jax
import numpy as np

from jaxprune._src import distribution as distribution_lib
from jaxprune._src import masks as masks_lib
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import KeyPath, PyTree


class NMPattern(NamedTuple):
  """N:M sparsity: in every ``m`` consecutive entries along ``axis`` keep ``n`` (see `nm_mask`).

  Examples:
    >>> import jaxprune as jp
    >>> jp.NMPattern(2, 4)   # 2 of every 4 inputs of an (in, out) kernel
    NMPattern(n=2, m=4, axis=-2)
  """
  n: int = 2
  m: int = 4
  axis: int = -2


class BlockPattern(NamedTuple):
  """Whole blocks of the trailing dims pruned together (see `block_mask`).

  Examples:
    >>> import jaxprune as jp
    >>> jp.BlockPattern((8, 128), reduce="l2")   # TPU vector-register tiles
    BlockPattern(shape=(8, 128), reduce='l2', allow_partial=False)
  """
  shape: tuple[int, ...]
  reduce: str = "l1"
  allow_partial: bool = False


MaskFn = Callable[..., PyTree]
Pattern = Union[str, NMPattern, BlockPattern, MaskFn]
Distribution = Union[str, Callable[..., PyTree]]
Overrides = Union[None, Mapping[str, Any], Callable[[KeyPath, Any], Any]]
DISTRIBUTIONS = ("uniform", "erk")


def check_pattern(pattern: Any) -> Pattern:
  """Checks a pattern.

  Args:
    pattern: expected ``"unstructured"``, an `NMPattern`, a `BlockPattern` or a mask function.

  Returns:
    The pattern with numpy integers made Python ints; a `ValueError` naming the argument (or its
    field) otherwise.
  """
  if isinstance(pattern, NMPattern):
    m = validation.check_int(pattern.m, "pattern.m", 1)
    n = validation.check_int(pattern.n, "pattern.n", 0, m)
    if isinstance(pattern.axis, bool) or not isinstance(pattern.axis, (int, np.integer)):
      raise validation.error("pattern.axis", "an integer axis", pattern.axis)
    return NMPattern(n, m, int(pattern.axis))
  if isinstance(pattern, BlockPattern):
    validation.check_choice(pattern.reduce, masks_lib.REDUCTIONS, "pattern.reduce")
    return pattern._replace(shape=validation.check_positive_ints(pattern.shape, "pattern.shape"))
  if pattern == "unstructured" or (callable(pattern) and not isinstance(pattern, str)):
    return pattern
  raise validation.error("pattern", "'unstructured', an NMPattern, a BlockPattern or a mask "
                         "function (scores, sparsity, *, scope, prunable) -> masks", pattern)


def check_distribution(distribution: Any, scope: str) -> Distribution:
  """Checks a distribution.

  Args:
    distribution: expected ``"uniform"``, ``"erk"`` or a callable; only ``"uniform"`` with a
      global scope.
    scope: ``"layer"`` or ``"global"``.

  Returns:
    ``distribution``; a `ValueError` naming the argument otherwise.
  """
  if not callable(distribution):
    validation.check_choice(distribution, DISTRIBUTIONS, "distribution")
  if scope == "global" and distribution != "uniform":
    raise validation.error("distribution", "'uniform' with scope='global' (one threshold has no "
                           "per-leaf split)", distribution)
  return distribution


def _split_override(value: Any, layers: stacked_lib.Layers, path: str) -> list:
  """An override of a whole leaf as one value per slice (a schedule applies to every slice)."""
  if value is None:
    return [None] * layers.num
  if callable(value):
    return [value] * layers.num
  return stacked_lib.slice_values(value, layers, "overrides", path)


def slice_overrides(params: PyTree, layers: Sequence[stacked_lib.Layers],
                    overrides: Overrides) -> list[list]:
  """Per leaf (in leaf order), per slice, the override given for it, or None.

  Args:
    params: the parameter pytree.
    layers: per leaf its `stacked.Layers` (a leaf that is not stacked is one slice).
    overrides: None, a mapping from leaf path or slice path (as `jax.tree_util.keystr` renders
      it, e.g. ``['layers']['q']['kernel'][3]``) to a value, or a callable
      ``(path, leaf) -> value | None``. A stacked leaf's value may be an array over its layer
      axes (one value per slice).

  Returns:
    Per leaf a list with one value or None per slice; overridden slices are checked to be
    prunable.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [tree_lib.path_str(p) for p, _ in with_paths]
  per_slice = [stacked_lib.slice_paths(p, l) for (p, _), l in zip(with_paths, layers)]
  if overrides is None:
    return [[None] * l.num for l in layers]
  if isinstance(overrides, Mapping):
    known = set(paths) | {q for l, qs in zip(layers, per_slice) if l.lead for q in qs}
    unknown = [k for k in overrides if k not in known]
    if unknown:
      what = "leaf or slice paths" if any(l.lead for l in layers) else "leaf paths"
      raise validation.error("overrides", f"keys that are {what} of the params such as "
                             f"{paths[:3]}", unknown[0])
    values = []
    for path, qs, l in zip(paths, per_slice, layers):
      vals = _split_override(overrides.get(path), l, path)
      for j, q in enumerate(qs if l.lead else ()):
        if q in overrides:
          if path in overrides:
            raise validation.error("overrides", "one key per slice (the leaf's path or the "
                                   "slice's)", q, path)
          vals[j] = overrides[q]
      values.append(vals)
  elif callable(overrides):
    values = [_split_override(overrides(p, x), l, path)
              for (p, x), l, path in zip(with_paths, layers, paths)]
  else:
    raise validation.error("overrides", "None, a mapping from leaf path to sparsity or a "
                           "callable (path, leaf) -> sparsity | None", type(overrides).__name__)
  for qs, l, vals in zip(per_slice, layers, values):
    for q, flag, value in zip(qs, l.flags, vals):
      if value is not None and not flag:
        raise validation.error("overrides", "overrides of prunable leaves only", value, q)
  return values


def slice_sparsities(params: PyTree, target: Any, layers: list[stacked_lib.Layers],
                     overridden: list, distribution: Distribution,
                     stacked: stacked_lib.Stacked) -> list[list]:
  """Per leaf, per slice, its sparsity from the distribution and the overrides.

  Args:
    params: the parameter pytree.
    target: the overall sparsity (checked; may be traced).
    layers: per leaf its `stacked.Layers`.
    overridden: `slice_overrides` of the params.
    distribution: a checked distribution (`check_distribution`).
    stacked: the ``stacked`` argument, passed on to a distribution function.

  Returns:
    Per leaf a list with one sparsity per slice: the override where one is given, else the
    distribution's share for a prunable slice, else 0; each checked to be a fraction.
  """
  treedef = jax.tree.structure(params)
  free = [[f and o is None for f, o in zip(l.flags, ov)] for l, ov in zip(layers, overridden)]
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [tree_lib.path_str(p) for p, _ in with_paths]
  if distribution == "uniform":
    split = [[target] * l.num for l in layers]
  else:
    fn = distribution_lib.erk_sparsities if distribution == "erk" else distribution
    kwargs = {} if stacked is None else {"stacked": stacked}
    per_leaf = validation.broadcast_prefix(
        fn(params, target, prunable=stacked_lib.flag_tree(treedef, layers, free), **kwargs),
        params, "distribution", "a per-leaf sparsity")
    split = [stacked_lib.slice_values(v, l, "distribution", path)
             for v, l, path in zip(per_leaf, layers, paths)]
  out = []
  for (p, _), l, fs, values, ovs in zip(with_paths, layers, free, split, overridden):
    out.append([validation.check_fraction(o, "overrides", q) if o is not None else
                validation.check_fraction(v, "distribution", q) if f else 0.0
                for q, f, v, o in zip(stacked_lib.slice_paths(p, l), fs, values, ovs)])
  return out


def takes_stacked(fn: Callable[..., Any]) -> bool:
  """Whether ``fn`` accepts a ``stacked`` keyword.

  Args:
    fn: a distribution or mask function.

  Returns:
    True when its signature has a ``stacked`` parameter or ``**kwargs``, or has none to read.
  """
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # no signature to read: let the call decide
    return True
  return any(p.name == "stacked" or p.kind == p.VAR_KEYWORD for p in params)


__all__ = ["DISTRIBUTIONS", "BlockPattern", "Distribution", "MaskFn", "NMPattern", "Overrides",
           "Pattern", "check_distribution", "check_pattern", "slice_overrides",
           "slice_sparsities", "takes_stacked"]
