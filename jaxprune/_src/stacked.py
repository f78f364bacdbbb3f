"""Stacked layers: leaves whose leading axes index layers, each slice pruned as its own layer.

Models built with ``flax.linen.scan``, ``nnx.scan`` or ``nnx.vmap`` hold one leaf per kind of
kernel with a leading layer axis: ``params['layers']['attn']['q']['kernel']`` of shape
``(L, d_in, d_out)``. The ``stacked`` argument of the mask functions, the distributions, the
policy, `jaxprune.prune`, `jaxprune.report`, `jaxprune.prune_scalars` and the structured group
functions says how many leading axes of each leaf index layers; each slice ``leaf[i]``
(``leaf[i, j]`` for two layer axes) is then one layer: its own exact count in layer scope, its
own ERK density, its own N:M groups and structured units, its own report row. The result is the
one computed on a tree in which every stacked leaf is replaced by the list of its slices
(``tests/test_stacked.py`` checks it bitwise), without ever splitting the leaf: selections run
over the slices with `jax.lax.map`.

A slice's path is the leaf's path followed by one index per layer axis, as
`jax.tree_util.keystr` renders it: ``['layers']['q']['kernel'][3]``. With ``stacked`` the
default prunable rule reads each slice (floating, ``ndim >= 2`` once the layer axes are
dropped), so stacked biases and norm scales stay dense; a prunable flag of a stacked leaf may
also be a bool array over its layer axes, pruning only some of its slices. Per-slice values
(sparsities from a distribution, overrides) are arrays over the layer axes.

Dependency groups whose members all sit on stacked leaves are scored, selected, masked and
shrunk per layer by `jaxprune.structured.group_scores`, `group_masks`, `apply_group_masks` and
`shrink`, each with a ``stacked`` argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import elementwise
from jaxprune._src import select
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, KeyPath, Prunable, PyTree

# None (nothing stacked), a number of leading layer axes for every leaf (an int, or a bool for
# 1 / 0), a pytree prefix of them, or a function (path, leaf) -> number.
Stacked = Union[None, int, bool, PyTree, Callable[[KeyPath, Any], int]]

_EXPECTED = "a number of leading layer axes (an int >= 0 or a bool)"


class Layers(NamedTuple):
  """How one leaf splits into layers.

  Attributes:
    lead: number of leading layer axes (0: the leaf is one layer).
    lead_shape: the leaf's shape over those axes (``()`` when ``lead == 0``).
    shape: the shape of one slice (the leaf's shape when ``lead == 0``).
    flags: per slice, in row-major order over ``lead_shape``, whether it is pruned.
  """
  lead: int
  lead_shape: tuple[int, ...]
  shape: tuple[int, ...]
  flags: tuple[bool, ...]

  @property
  def num(self) -> int:
    """Number of slices (1 for a leaf that is not stacked)."""
    return math.prod(self.lead_shape)

  @property
  def size(self) -> int:
    """Entries per slice."""
    return math.prod(self.shape)

  @property
  def any(self) -> bool:
    """Whether some slice is pruned."""
    return any(self.flags)


def _as_count(value: Any, path: str) -> int:
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, numbers.Integral) or (
      getattr(value, "dtype", None) is not None and np.ndim(value) == 0
      and np.issubdtype(value.dtype, np.integer) and not validation.is_traced(value)):
    if int(value) >= 0:
      return int(value)
    raise validation.error("stacked", _EXPECTED, int(value), path)
  got = validation.describe(value) if hasattr(value, "shape") else value
  raise validation.error("stacked", _EXPECTED, got, path)


def layer_axes(tree: PyTree, stacked: Stacked) -> list[int]:
  """Per leaf (in leaf order) its number of leading layer axes, checked against its ``ndim``.

  Args:
    tree: the parameter (or score, or mask) pytree.
    stacked: None, an int or bool for every leaf, a pytree prefix of them, or a function
      ``(path, leaf) -> int``.

  Returns:
    One int per leaf in ``[0, ndim]``.

  Raises:
    ValueError: for a negative or non-integer count, a count above the leaf's ``ndim``, or a
      tree that is not a prefix of ``tree``; the message names ``stacked`` and the leaf.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  if stacked is None:
    return [0] * len(with_paths)
  if tree_lib.is_function(stacked):
    values = [stacked(p, x) for p, x in with_paths]
  else:
    values = validation.broadcast_prefix(stacked, tree, "stacked", _EXPECTED)
  out = []
  for (p, x), v in zip(with_paths, values):
    path = tree_lib.path_str(p)
    k = _as_count(v, path)
    if k > np.ndim(x):
      raise validation.error("stacked", f"at most {np.ndim(x)} layer axes for shape "
                             f"{tuple(np.shape(x))}", k, path)
    out.append(k)
  return out


def _slice_flags(flag: Any, lead: int, lead_shape: tuple[int, ...], path: str) -> tuple:
  """A leaf's prunable flag (a bool, or a bool array over its layer axes) as per-slice bools."""
  num = math.prod(lead_shape)
  if isinstance(flag, (bool, np.bool_)):
    return (bool(flag),) * num
  if (lead and getattr(flag, "dtype", None) == np.bool_ and not validation.is_traced(flag)
      and tuple(np.shape(flag)) == lead_shape):
    return tuple(bool(f) for f in np.asarray(flag).reshape(-1))
  expected = "a bool" + (f" or a bool array of shape {lead_shape} (one per layer)" if lead
                         else "")
  got = validation.Text(f"shape {np.shape(flag)}") if np.ndim(flag) else flag
  raise validation.error("prunable", expected, got, path)


def resolve(tree: PyTree, stacked: Stacked, prunable: Prunable) -> list[Layers]:
  """Per leaf its layer axes and per-slice prunable flags.

  Args:
    tree: the parameter (or score) pytree.
    stacked: see `layer_axes`.
    prunable: None for the default rule applied to each slice (floating, ``ndim >= 2``
      without the layer axes); a predicate ``(path, leaf) -> flag`` or a pytree of flags, a flag
      being a bool, or for a stacked leaf a bool array over its layer axes.

  Returns:
    One `Layers` per leaf, in leaf order.

  Raises:
    ValueError: for a bad ``stacked`` or ``prunable`` value, naming the argument and the leaf;
      also for as many layer axes as dimensions on a leaf that is pruned or is a floating array
      with ``ndim >= 2`` (a slice must keep an axis; a 1-D leaf may be a stack of scalars).
  """
  leads = layer_axes(tree, stacked)
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [tree_lib.path_str(p) for p, _ in with_paths]
  if stacked is None:
    given = jax.tree.leaves(tree_lib.prunable_flags(tree, prunable))
  elif prunable is None:
    given = [tree_lib.is_floating(x) and np.ndim(x) - k >= 2
             for (_, x), k in zip(with_paths, leads)]
  elif tree_lib.is_function(prunable):
    given = [prunable(p, x) for p, x in with_paths]
  else:
    given = validation.broadcast_prefix(prunable, tree, "prunable", "a bool")
  out = []
  for (_, x), k, flag, path in zip(with_paths, leads, given, paths):
    shape = tuple(int(d) for d in np.shape(x))
    layers = Layers(k, shape[:k], shape[k:], _slice_flags(flag, k, shape[:k], path))
    # A stack of scalars is fine; a leaf that would be a layer, or is pruned, keeps an axis.
    looks_prunable = layers.any or (tree_lib.is_floating(x) and len(shape) >= 2)
    if k and k >= len(shape) and looks_prunable:
      raise validation.error("stacked", f"fewer layer axes than the {len(shape)} dimensions of "
                             "a prunable leaf", k, path)
    out.append(layers)
  return out


def flag_tree(treedef: Any, layers: Sequence[Layers],
              flags: Optional[Sequence[Sequence[bool]]] = None) -> PyTree:
  """A prunable pytree for `resolve`: per leaf a bool, or a bool array over its layer axes.

  Args:
    treedef: the tree structure.
    layers: per leaf its `Layers`.
    flags: per leaf its per-slice flags (default: ``layers[i].flags``).

  Returns:
    A pytree of flags; a leaf whose slices agree gets one bool.
  """
  flags = [l.flags for l in layers] if flags is None else flags
  out = []
  for l, f in zip(layers, flags):
    f = tuple(bool(v) for v in f)
    if not f or all(v == f[0] for v in f):
      out.append(bool(f) and f[0])
    else:
      out.append(np.asarray(f, bool).reshape(l.lead_shape))
  return jax.tree.unflatten(treedef, out)


def slice_keys(lead_shape: Sequence[int]) -> list[tuple]:
  """Per slice, in row-major order, its index keys (`jax.tree_util.SequenceKey`)."""
  return [tuple(jax.tree_util.SequenceKey(int(i)) for i in idx)
          for idx in np.ndindex(*lead_shape)]


def slice_paths(path: KeyPath, layers: Layers) -> list[str]:
  """Per slice its path string: the leaf's path (without NNX's ``.value``) and its indices.

  Args:
    path: the leaf's key path.
    layers: the leaf's `Layers`.

  Returns:
    e.g. ``["['layers']['q']['kernel'][0]", ...]``; ``[path_str(path)]`` for a leaf that is
    not stacked.
  """
  if not layers.lead:
    return [tree_lib.path_str(path)]
  base = tree_lib.clean_path(path)
  return [jax.tree_util.keystr(base + keys) for keys in slice_keys(layers.lead_shape)]


def slice_values(value: Any, layers: Layers, name: str, path: str) -> list:
  """A per-leaf value as one value per slice: a scalar for every slice, or an array over the
  layer axes (concrete or traced) split into its entries.

  Args:
    value: the leaf's value.
    layers: the leaf's `Layers`.
    name: argument name for messages.
    path: the leaf's path for messages.

  Returns:
    ``layers.num`` values (scalars, possibly traced), unchecked.
  """
  shape = tuple(np.shape(value)) if hasattr(value, "shape") else ()
  if shape == () or not layers.lead:
    return [value] * layers.num
  if shape != layers.lead_shape:
    raise validation.error(name, f"a scalar or an array of shape {layers.lead_shape} (one value "
                           "per layer)", validation.Text(f"shape {shape}"), path)
  flat = value.reshape(-1)
  return [flat[j] for j in range(layers.num)]


def as_leaf_value(values: Sequence[Any], layers: Layers) -> Any:
  """Per-slice values back as one per-leaf value.

  Args:
    values: one value per slice.
    layers: the leaf's `Layers`.

  Returns:
    The value of a leaf that is not stacked; for a stacked leaf an array over its layer axes,
    float32 when some value is traced, float64 otherwise.
  """
  if not layers.lead:
    return values[0]
  if any(validation.is_traced(v) for v in values):
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values]).reshape(layers.lead_shape)
  return np.asarray([float(v) for v in values], np.float64).reshape(layers.lead_shape)


def slice_counts(value: Any, layers: Layers, units: int, path: str) -> Union[int, Array, list]:
  """Entries to prune in each slice of a leaf, ``round(s·units)``; 0 in unpruned slices.

  Args:
    value: the leaf's sparsity: a fraction, or an array of fractions over the layer axes.
    layers: the leaf's `Layers`.
    units: units per slice (entries, channels or blocks).
    path: the leaf's path for messages.

  Returns:
    For a leaf that is not stacked, `select.num_to_prune`'s count; else a list of Python ints
    (concrete fractions) or an int32 vector (some fraction traced), one per slice.
  """
  if not layers.lead:
    return select.num_to_prune(value, units, "sparsity", path)
  values = slice_values(value, layers, "sparsity", path)
  paths = [path + "".join(f"[{i}]" for i in idx) for idx in np.ndindex(*layers.lead_shape)]
  counts = [select.num_to_prune(v, units, "sparsity", p) if f else 0
            for v, f, p in zip(values, layers.flags, paths)]
  if any(validation.is_traced(c) for c in counts):
    return jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])
  return counts


def as_slices(x: elementwise.ScoreLike, lead: int) -> elementwise.ScoreLike:
  """``x`` with its ``lead`` leading layer axes merged into one.

  Args:
    x: an array or `Elementwise` scores of a stacked leaf.
    lead: number of leading layer axes.

  Returns:
    The same kind, shaped ``(number of slices, *slice_shape)``; an `Elementwise` stays lazy.
  """
  shape = (math.prod(x.shape[:lead]),) + tuple(x.shape[lead:])
  if isinstance(x, elementwise.Elementwise):
    return elementwise.Elementwise(x.fn, [o.reshape(shape) for o in x.operands])
  return x.reshape(shape)


__all__ = ["Layers", "Stacked", "as_leaf_value", "as_slices", "flag_tree", "layer_axes",
           "resolve", "slice_counts", "slice_keys", "slice_paths", "slice_values"]
