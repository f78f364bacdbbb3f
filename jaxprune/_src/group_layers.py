"""Compiled kernels of group scoring, selection and masking, for any number of layer axes.

A group shared by all layers has per-unit arrays of shape ``(size,)``; a per-layer group (see
`jaxprune._src.group_scores`) has ``(*layer_shape, size)``, and every kernel treats its leading
axes as independent layers. Arguments are checked by the public functions of
`jaxprune._src.group_scores`; these only compute.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import mask_compute
from jaxprune._src import select
from jaxprune._src import tree as tree_lib
from jaxprune._src.groups import Group
from jaxprune._src.types import Array, PyTree

# (path, number of layer axes, per-slice flags or None when every slice counts)
Chosen = frozenset[tuple[str, int, Optional[tuple[bool, ...]]]]


# Groups hash by identity, so reusing the same groups reuses the compiled program.
@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def unit_scores(groups: tuple[Group, ...], scores: PyTree, reduce: str, chosen: Chosen,
                leads: tuple[int, ...]) -> list[Array]:
  """Per group the reduced scores of its units, per layer over ``leads`` leading layer axes.

  Args:
    groups: the groups (static: hashed by identity).
    scores: entry-wise scores keyed like the groups' variables.
    reduce: ``"l2"`` or ``"l1"``.
    chosen: the leaves that contribute: path, number of layer axes and, when only some
      slices contribute, one flag per slice (row-major over the layer axes).
    leads: per group the number of leading layer axes of its members (0: units shared by
      every layer, scored over the whole leaves).

  Returns:
    Per group a float32 array ``(*layer_shape, size)``.
  """
  leaves = dict(tree_lib.leaves_with_paths(scores))
  slices = {path: (lead, flags) for path, lead, flags in chosen}
  out = []
  for g, lead in zip(groups, leads):
    total = None
    for m in g.members:
      if m.path not in slices:  # absent from scores, or not prunable
        continue
      s = leaves[m.path]
      if s.shape[m.axis] != len(m.units):
        raise ValueError(f"group_scores: leaf {m.path} has length {s.shape[m.axis]} on axis "
                         f"{m.axis}, the group {g.name} expects {len(m.units)}")
      leaf_lead, flags = slices[m.path]
      if flags is not None:  # slices that are not prunable contribute nothing
        counts = np.asarray(flags).reshape(s.shape[:leaf_lead] + (1,) * (s.ndim - leaf_lead))
        s = jnp.where(counts, s, jnp.zeros((), s.dtype))
      per_index = mask_compute.reduce_units(s, tuple(a for a in range(lead, s.ndim)
                                                     if a != m.axis), reduce)
      covered = np.nonzero(m.units >= 0)[0]
      # Units lead for segment_sum, layers follow: (size, *layer_shape).
      summed = jax.ops.segment_sum(jnp.moveaxis(per_index[..., covered], -1, 0),
                                   m.units[covered], num_segments=g.size)
      summed = jnp.moveaxis(summed, 0, -1)
      total = summed if total is None else total + summed
    if total is None:
      raise ValueError(f"group_scores: no leaf of group {g.name} is in scores and prunable; "
                       f"expected one of {sorted({m.path for m in g.members})}")
    out.append(jnp.sqrt(total) if reduce == "l2" else total)
  return out


# One compiled selection per call shape: the per-unit vectors are tiny, and
# op-by-op dispatch of the radix select would dominate.
@jax.jit
def keep_per_layer(scores: tuple[Array, ...], ks: tuple[Array, ...]) -> tuple[Array, ...]:
  """Per group and layer, the units kept when the ``ks`` lowest-scored ones are removed.

  Args:
    scores: per group ``(*layer_shape, size)`` scores.
    ks: per group int32 counts of shape ``layer_shape``.

  Returns:
    Per group a bool array shaped like its scores, True = keep.
  """
  out = []
  for s, k in zip(scores, ks):
    if s.ndim == 1:
      out.append(~select.prune_lowest([s], k)[0])
      continue
    rows = s.reshape(-1, s.shape[-1])
    pruned = jax.lax.map(lambda rk: select.prune_lowest([rk[0]], rk[1])[0], (rows, k.reshape(-1)))
    out.append(~pruned.reshape(s.shape))
  return tuple(out)


@jax.jit
def keep_global(scores: tuple[Array, ...], k: Array) -> tuple[Array, ...]:
  """The units kept when the ``k`` lowest-scored of all groups and layers are removed; ties in
  row-major order over (group, layer, unit)."""
  return tuple(~p for p in select.prune_lowest(list(scores), k))


def axis_keep_by_leaf(groups: Sequence[Group], keep: Sequence[Any], xp: Any,
                      ) -> dict[str, dict[int, Any]]:
  """Leaf path -> axis -> which indices of that axis stay, AND over every covering group.

  Args:
    groups: the groups.
    keep: one keep mask per group, ``(size,)`` or ``(*layer_shape, size)``, shapes checked.
    xp: ``numpy`` for concrete masks, ``jax.numpy`` for traced ones.

  Returns:
    Per leaf and axis a bool array ``(*layer_shape, length)``; ``layer_shape`` is ``()``
    unless a per-layer mask covers that axis.
  """
  out: dict[str, dict[int, Any]] = {}
  for g, k in zip(groups, keep):
    k = xp.asarray(k, bool)
    for m in g.members:
      units = np.asarray(m.units)
      idx_keep = xp.where(units >= 0, k[..., np.maximum(units, 0)], True)
      axes = out.setdefault(m.path, {})
      axes[m.axis] = idx_keep if m.axis not in axes else axes[m.axis] & idx_keep
  return out


def check_axis_keep(path: str, shape: tuple[int, ...], axis: int, keep: Any, name: str) -> None:
  """Raises a `ValueError` unless ``keep`` (``(*layer_shape, length)``) fits axis ``axis``
  of a leaf of ``shape`` whose leading axes are those layer axes."""
  lead = np.ndim(keep) - 1
  if shape[axis] != np.shape(keep)[-1] or shape[:lead] != np.shape(keep)[:-1] or axis < lead:
    if not lead:
      raise ValueError(f"{name}: leaf {path} has length {shape[axis]} on axis {axis}, the "
                       f"groups expect {np.shape(keep)[-1]}")
    raise ValueError(f"{name}: leaf {path} of shape {shape} does not match the per-layer "
                     f"mask of shape {np.shape(keep)} on axis {axis}")


@functools.partial(jax.jit, static_argnums=0)
def apply_keep(groups: tuple[Group, ...], variables: PyTree, keep: tuple[Array, ...]) -> PyTree:
  """``variables`` with every entry of a removed unit zeroed (per layer for per-layer masks)."""
  axis_keep = axis_keep_by_leaf(groups, keep, jnp)

  def mask_leaf(path, x):
    axes = axis_keep.get(tree_lib.path_str(path))
    if not axes:
      return x
    m = jnp.ones((), bool)
    for axis, v in axes.items():
      check_axis_keep(tree_lib.path_str(path), x.shape, axis, v, "apply_group_masks")
      lead = v.ndim - 1  # the layer axes of a per-layer mask lead the leaf's shape
      shape = list(v.shape[:-1]) + [1] * (x.ndim - lead)
      shape[axis] = v.shape[-1]
      m = m & v.reshape(shape)
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree_util.tree_map_with_path(mask_leaf, variables)


__all__ = ["Chosen", "apply_keep", "axis_keep_by_leaf", "check_axis_keep", "keep_global",
           "keep_per_layer", "unit_scores"]
