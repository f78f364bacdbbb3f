"""Dependency groups of stacked layers, scored, selected and masked layer by layer.

`jaxprune.structured.find_groups` walks ``scan`` bodies: the hidden units of a block stacked by
``nn.scan`` form one group whose members sit on stacked leaves (``up`` kernel ``(L, d, h)``
axis 2, ``down`` kernel ``(L, h, d)`` axis 1, ...). Unit ``i`` of such a group is then shared by
all layers. With ``stacked`` (`jaxprune._src.stacked`), a group whose every member lies on a
stacked leaf with the same layer axes, its own axis not among them, is scored per layer instead:
its units are (layer, unit) pairs, as if each layer were a model of its own, so each layer keeps
its own best units. Groups that reach an unstacked leaf (a residual stream fed by an embedding,
read by a head) couple every layer and keep shared units.

Scores of a per-layer group have shape ``(*layer_shape, size)``; `group_masks` and
`apply_group_masks` here take them alongside the 1-D scores of shared groups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import group_scores as group_scores_lib
from jaxprune._src import mask_compute
from jaxprune._src import masks as masks_lib
from jaxprune._src import select
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src.groups import Group
from jaxprune._src.types import Array, Prunable, PyTree


def layer_shape(group: Group, layers: dict[str, stacked_lib.Layers]) -> tuple[int, ...]:
  """The layer axes' shape of a per-layer group, or ``()`` for a group shared by all layers.

  Args:
    group: a dependency group.
    layers: leaf path -> its `stacked.Layers`.

  Returns:
    The common layer shape when every member lies on a stacked leaf with the same layer axes
    and its own axis is not one of them; ``()`` otherwise.
  """
  leads = {(layers[m.path].lead, layers[m.path].lead_shape) if m.path in layers else (0, ())
           for m in group.members}
  if len(leads) != 1:
    return ()
  lead, shape = leads.pop()
  return shape if lead and all(m.axis >= lead for m in group.members) else ()


def group_scores(groups: Sequence[Group], scores: PyTree, *, reduce: str = "l2",
                 prunable: Prunable = None, stacked: stacked_lib.Stacked = None) -> list[Array]:
  """`jaxprune.structured.group_scores` with per-layer scores for groups of stacked layers.

  Args:
    groups: from `jaxprune.structured.find_groups` or `make_group`.
    scores: entry-wise scores over a pytree keyed like the variables the groups were found on.
    reduce: ``"l2"`` or ``"l1"`` over every entry of a unit (in one layer, for a per-layer
      group).
    prunable: which leaves contribute (see `jaxprune.unstructured_mask`; with ``stacked`` the
      default rule reads each slice, so stacked biases and norm scales do not).
    stacked: leading layer axes of each leaf (see `jaxprune.unstructured_mask`).

  Returns:
    One float32 array per group: ``(size,)`` for a group shared by all layers,
    ``(*layer_shape, size)`` for a per-layer group (see `layer_shape`).
  """
  group_scores_lib.check_groups(groups, "group_scores")
  masks_lib.check_reduce(reduce, ("l1", "l2"), "reduce")
  resolved = stacked_lib.resolve(scores, stacked, prunable)
  paths = [p for p, _ in tree_lib.leaves_with_paths(scores)]
  by_path = dict(zip(paths, resolved))
  shared = [i for i, g in enumerate(groups) if not layer_shape(g, by_path)]
  out: list[Optional[Array]] = [None] * len(groups)
  if shared:
    flags = jax.tree.unflatten(jax.tree.structure(scores), [l.any for l in resolved])
    for i, s in zip(shared, group_scores_lib.group_scores([groups[i] for i in shared], scores,
                                                          reduce=reduce, prunable=flags)):
      out[i] = s
  per_layer = tuple(g for g in groups if layer_shape(g, by_path))
  if per_layer:
    chosen = frozenset(p for p, l in by_path.items() if l.any)
    leads = tuple(by_path[g.members[0].path].lead for g in per_layer)
    for i, s in zip([i for i in range(len(groups)) if i not in shared],
                    unit_scores(per_layer, scores, reduce, chosen, leads)):
      out[i] = s
  return out


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def unit_scores(groups: tuple[Group, ...], scores: PyTree, reduce: str,
                chosen: frozenset[str], leads: tuple[int, ...]) -> list[Array]:
  """Per group the reduced scores of its units, per layer over ``leads`` leading layer axes.

  Args:
    groups: the groups (static: hashed by identity).
    scores: entry-wise scores keyed like the groups' variables.
    reduce: ``"l2"`` or ``"l1"``.
    chosen: the paths of the leaves that contribute.
    leads: per group the number of leading layer axes of its members (0: units shared by
      every layer, scored over the whole leaves).

  Returns:
    Per group a float32 array ``(*layer_shape, size)``.
  """
  leaves = dict(tree_lib.leaves_with_paths(scores))
  out = []
  for g, lead in zip(groups, leads):
    total, used = None, False
    for m in g.members:
      if m.path not in chosen:
        continue
      s = leaves[m.path]
      if s.shape[m.axis] != len(m.units):
        raise ValueError(f"group_scores: leaf {m.path} has length {s.shape[m.axis]} on axis "
                         f"{m.axis}, the group {g.name} expects {len(m.units)}")
      axes = tuple(a for a in range(lead, s.ndim) if a != m.axis)
      per_index = mask_compute.reduce_units(s, axes, reduce)  # (*layer_shape, length)
      covered = np.nonzero(m.units >= 0)[0]
      if total is None:
        total = jnp.zeros(s.shape[:lead] + (g.size,), jnp.float32)
      total = total.at[..., m.units[covered]].add(per_index[..., covered])
      used = True
    if not used:
      raise ValueError(f"group_scores: no leaf of group {g.name} is in scores and prunable; "
                       f"expected one of {sorted({m.path for m in g.members})}")
    out.append(jnp.sqrt(total) if reduce == "l2" else total)
  return out


def group_masks(scores: Sequence[Array], sparsity: Any, *, scope: str = "layer") -> list[Array]:
  """`jaxprune.structured.group_masks` over 1-D scores and per-layer ``(*layers, size)`` scores.

  A per-layer group is a group per layer: layer scope removes exactly ``round(s·size)`` units
  in each layer, global scope ranks every (group, layer, unit) together in the order separate
  groups would have (group, then layer, then unit). Ties and errors as in
  `jaxprune.structured.group_masks`.

  Args:
    scores: one array per group, from `group_scores`.
    sparsity: fraction of units to remove, in [0, 1] (may be traced); with ``scope="layer"``
      also a sequence with one fraction per group.
    scope: ``"layer"`` or ``"global"``.

  Returns:
    One bool array per group, shaped like its scores; True = keep.
  """
  masks_lib.check_scope(scope)
  scores = [jnp.asarray(s, jnp.float32) for s in scores]
  if all(s.ndim == 1 for s in scores):
    return group_scores_lib.group_masks(scores, sparsity, scope=scope)
  if any(s.ndim == 0 for s in scores):
    raise ValueError(f"group_masks: expected per-unit scores of ndim >= 1, got shapes "
                     f"{[s.shape for s in scores]}")
  rows = [(math.prod(s.shape[:-1]), s.shape[-1]) for s in scores]
  if scope == "layer":
    fracs = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity] * len(scores)
    if len(fracs) != len(scores):
      raise ValueError(f"group_masks: expected {len(scores)} sparsities (one per group), got "
                       f"{len(fracs)}")
    ks = []
    for i, ((num, size), frac) in enumerate(zip(rows, fracs)):
      k = select.num_to_prune(frac, size, "sparsity", f"group {i}")
      if isinstance(k, int) and k >= size and num:
        raise ValueError(f"group_masks: sparsity {frac} would remove all {size} units of "
                         f"group {i}; expected to keep at least one")
      ks.append(k)
    keep = _keep_per_layer(tuple(scores), jnp.asarray(ks, jnp.int32))
  else:
    k = select.num_to_prune(sparsity, sum(num * size for num, size in rows))
    keep = _keep_all(tuple(scores), jnp.asarray(k, jnp.int32))
    if isinstance(k, int):
      empty = [i for i, m in enumerate(jax.device_get(keep)) if not m.any(axis=-1).all()]
      if empty:
        raise ValueError(f"group_masks: global sparsity {sparsity} would remove every unit of a "
                         f"layer of groups {empty}; expected at least one unit kept per group "
                         "and layer (lower the sparsity or use scope='layer')")
  return list(keep)


def _rows(s: Array) -> Array:
  """Per-unit scores with their layer axes merged: ``(layers, size)``."""
  return s.reshape(-1, s.shape[-1])


@jax.jit
def _keep_per_layer(scores: tuple[Array, ...], ks: Array) -> tuple[Array, ...]:
  return tuple(~jax.lax.map(lambda r, i=i: select.prune_lowest([r], ks[i])[0], _rows(s))
               .reshape(s.shape) for i, s in enumerate(scores))


@jax.jit
def _keep_all(scores: tuple[Array, ...], k: Array) -> tuple[Array, ...]:
  return tuple(~p.reshape(s.shape)
               for p, s in zip(select.prune_lowest([_rows(s) for s in scores], k), scores))


def apply_group_masks(variables: PyTree, groups: Sequence[Group],
                      keep: Sequence[Array]) -> PyTree:
  """`jaxprune.structured.apply_group_masks` with per-layer masks ``(*layers, size)``.

  Args:
    variables: the pytree the groups were found on.
    groups: the groups.
    keep: one bool array per group, ``(size,)`` or, for a per-layer group, ``(*layers, size)``
      over the leading layer axes of its members.

  Returns:
    ``variables`` with every entry of a removed unit set to zero, in each layer separately for
    per-layer masks (dtypes kept). Works under `jax.jit` with traced masks.
  """
  if all(np.ndim(k) == 1 for k in keep):
    return group_scores_lib.apply_group_masks(variables, groups, keep)
  group_scores_lib.check_groups(groups, "apply_group_masks")
  if len(keep) != len(groups):
    raise ValueError(f"apply_group_masks: expected one keep mask per group ({len(groups)}), got "
                     f"{len(keep)}")
  for g, k in zip(groups, keep):
    if np.shape(k)[-1:] != (g.size,):
      raise ValueError(f"keep mask of group {g.name}: expected shape (..., {g.size}), got "
                       f"{tuple(np.shape(k))}")
  return _apply(tuple(groups), variables, tuple(keep))


@functools.partial(jax.jit, static_argnums=0)
def _apply(groups: tuple[Group, ...], variables: PyTree, keep: tuple[Array, ...]) -> PyTree:
  by_leaf: dict[str, list[tuple[int, Array]]] = {}
  for g, k in zip(groups, keep):
    k = jnp.asarray(k, bool)
    for m in g.members:
      units = np.asarray(m.units)
      by_leaf.setdefault(m.path, []).append(
          (m.axis, jnp.where(units >= 0, k[..., np.maximum(units, 0)], True)))

  def mask_leaf(path, x):
    found = by_leaf.get(tree_lib.path_str(path))
    if not found:
      return x
    m = jnp.ones((), bool)
    for axis, v in found:
      lead = v.ndim - 1  # the layer axes of a per-layer mask lead the leaf's shape
      if x.shape[axis] != v.shape[-1] or x.shape[:lead] != v.shape[:-1]:
        raise ValueError(f"apply_group_masks: leaf {tree_lib.path_str(path)} of shape "
                         f"{x.shape} does not match a mask of shape {v.shape} on axis {axis}")
      shape = list(v.shape[:-1]) + [1] * (x.ndim - lead)
      shape[axis] = v.shape[-1]
      m = m & v.reshape(shape)
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree_util.tree_map_with_path(mask_leaf, variables)


__all__ = ["apply_group_masks", "group_masks", "group_scores", "layer_shape", "unit_scores"]
