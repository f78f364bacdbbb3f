"""Scores and masks for whole units (neurons, channels, heads) of dependency groups.

A unit's score sums an entry-wise score over every entry the unit owns in
every coupled leaf (kernel column, consumer kernel row, ...):

* group norm: ``reduce="l2"`` on magnitudes, ``sqrt(sum w^2)``, or ``"l1"``;
* Taylor: ``reduce="l1"`` on ``jp.taylor(params, grads)``, the group sum of
  ``|w * g|`` (Molchanov et al., 2019);
* Hessian: ``reduce="l1"`` on ``jp.obd(params, h)``, the group sum of OBD
  saliencies ``h w^2 / 2`` (LeCun et al., 1990).

References:
  Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 (filter norms).
  Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
  LeCun, Denker, Solla, "Optimal Brain Damage", NeurIPS 1990.
  Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (dependency groups).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import masks as masks_lib
from jaxprune._src import select
from jaxprune._src import tree as tree_lib
from jaxprune._src.groups import Group

Array = jax.Array
Sparsity = Union[float, Array, Sequence[float]]


def check_groups(groups: Sequence[Group], name: str) -> None:
  if not all(isinstance(g, Group) for g in groups):
    raise ValueError(f"{name}: expected a sequence of jaxprune Group objects (find_groups / "
                     f"make_group), got {[type(g).__name__ for g in groups]}")


def group_scores(groups: Sequence[Group], scores: Any, *, reduce: str = "l2",
                 prunable: tree_lib.Prunable = None) -> list[Array]:
  """Per-unit scores of every group: higher = more important.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"hidden": {"kernel": jnp.array([[2.0, 0.0, 1.0], [1.0, 2.0, 0.0]]),
    ...                      "bias": jnp.zeros(3)},
    ...           "out": {"kernel": jnp.array([[1.0], [2.0], [0.0]])}}
    >>> axes = [("['hidden']['kernel']", 1), ("['hidden']['bias']", 0), ("['out']['kernel']", 0)]
    >>> group = jp.structured.make_group(params, axes)
    >>> scores = jp.structured.group_scores([group], jp.magnitude(params))   # L2 per unit
    >>> [round(float(s), 3) for s in scores[0]]   # the bias is not prunable, so not counted
    [2.449, 2.828, 1.0]

  Args:
    groups: from `find_groups` or `make_group`.
    scores: entry-wise scores (``jp.magnitude``, ``jp.taylor``, ``jp.obd`` ...)
      over a pytree keyed like the variables the groups were found on; leaves
      the groups mention but ``scores`` lacks are skipped.
    reduce: ``"l2"`` (square root of the sum of squares) or ``"l1"`` (sum of
      absolute values) over all entries of a unit.
    prunable: which leaves contribute: None for ``jp.default_prunable``
      (floating, ``ndim >= 2``: kernels, not biases, norm scales or running
      statistics), a predicate ``(key_path, leaf) -> bool`` or a pytree of bools.

  Returns:
    One float32 array of shape ``(group.size,)`` per group.
  """
  check_groups(groups, "group_scores")
  masks_lib.check_reduce(reduce, ("l1", "l2"), "reduce")
  # Resolved outside jit, to paths: a static set compares by value, so a fresh lambda per call
  # does not recompile, and the predicate sees concrete leaves.
  flags = jax.tree.leaves(tree_lib.prunable_flags(scores, prunable))
  chosen = frozenset(path for (path, _), f in zip(tree_lib.leaves_with_paths(scores), flags) if f)
  return _group_scores(tuple(groups), scores, reduce, chosen)


# Groups hash by identity, so reusing the same groups reuses the compiled program.
@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _group_scores(groups: tuple[Group, ...], scores: Any, reduce: str,
                  chosen: frozenset[str]) -> list[Array]:
  leaves = dict(tree_lib.leaves_with_paths(scores))
  out = []
  for g in groups:
    total = jnp.zeros((g.size,), jnp.float32)
    used = False
    for m in g.members:
      if m.path not in chosen:  # absent from scores, or not prunable
        continue
      s = leaves[m.path]
      if s.shape[m.axis] != len(m.units):
        raise ValueError(f"group_scores: leaf {m.path} has length {s.shape[m.axis]} on axis "
                         f"{m.axis}, the group {g.name} expects {len(m.units)}")
      per_index = masks_lib.reduce_units(s, tuple(i for i in range(s.ndim) if i != m.axis), reduce)
      covered = np.nonzero(m.units >= 0)[0]
      total = total + jax.ops.segment_sum(per_index[covered], m.units[covered],
                                          num_segments=g.size)
      used = True
    if not used:
      raise ValueError(f"group_scores: no leaf of group {g.name} is in scores and prunable; "
                       f"expected one of {sorted({m.path for m in g.members})}")
    out.append(jnp.sqrt(total) if reduce == "l2" else total)
  return out


def group_masks(scores: Sequence[Array], sparsity: Sparsity, *,
                scope: str = "layer") -> list[Array]:
  """Which units to keep: exactly ``round(s * n)`` lowest-scored units removed.

  Ties: among equal scores the later unit (and, globally, the later group) is
  removed first, as in ``jp.unstructured_mask``. A concrete selection that
  would remove every unit of a group raises a ``ValueError``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> scores = [jnp.array([3.0, 1.0, 2.0]), jnp.array([0.5, 4.0])]
    >>> [k.tolist() for k in jp.structured.group_masks(scores, 0.5)]   # round(1.5), round(1.0)
    [[True, False, False], [False, True]]
    >>> [k.tolist() for k in jp.structured.group_masks(scores, 0.4, scope="global")]   # 2 of 5
    [[True, False, True], [False, True]]

  Args:
    scores: per-unit scores, one array per group (`group_scores`).
    sparsity: fraction of units to remove, in [0, 1] (may be traced); with
      ``scope="layer"`` also a sequence with one fraction per group.
    scope: ``"layer"``: ``round(s * group.size)`` units per group;
      ``"global"``: ``round(s * N)`` of all ``N`` units together.

  Returns:
    One bool array per group, True = keep.
  """
  masks_lib.check_scope(scope)
  scores = [jnp.asarray(s, jnp.float32) for s in scores]
  if any(s.ndim != 1 for s in scores):
    raise ValueError(f"group_masks: expected 1-D per-unit scores, got shapes "
                     f"{[s.shape for s in scores]}")
  if scope == "layer":
    if isinstance(sparsity, (list, tuple)):
      if len(sparsity) != len(scores):
        raise ValueError(f"group_masks: expected {len(scores)} sparsities (one per group), got "
                         f"{len(sparsity)}")
      fracs = list(sparsity)
    else:
      fracs = [sparsity] * len(scores)
    ks = []
    for i, (s, frac) in enumerate(zip(scores, fracs)):
      k = select.num_to_prune(frac, s.shape[0], "sparsity", f"group {i}")
      if isinstance(k, int) and k >= s.shape[0]:
        raise ValueError(f"group_masks: sparsity {frac} would remove all {s.shape[0]} units of "
                         f"group {i}; expected to keep at least one")
      ks.append(k)
    return list(_keep_per_group(tuple(scores), jnp.asarray(ks, jnp.int32)))
  total = sum(s.shape[0] for s in scores)
  k = select.num_to_prune(sparsity, total)
  keep = list(_keep_global(tuple(scores), jnp.asarray(k, jnp.int32)))
  if isinstance(k, int):
    empty = [i for i, m in enumerate(jax.device_get(keep)) if not m.any()]  # one transfer
    if empty:
      raise ValueError(f"group_masks: global sparsity {sparsity} would remove every unit of "
                       f"groups {empty}; expected at least one unit kept per group (lower the "
                       "sparsity or use scope='layer')")
  return keep


# One compiled selection per call shape: the per-unit vectors are tiny, and
# op-by-op dispatch of the radix select would dominate.
@jax.jit
def _keep_per_group(scores: tuple[Array, ...], ks: Array) -> tuple[Array, ...]:
  return tuple(~select.prune_lowest([s], ks[i])[0] for i, s in enumerate(scores))


@jax.jit
def _keep_global(scores: tuple[Array, ...], k: Array) -> tuple[Array, ...]:
  return tuple(~p for p in select.prune_lowest(list(scores), k))


def axis_keep_by_leaf(groups: Sequence[Group], keep: Sequence[Any], xp: Any,
               ) -> dict[str, dict[int, Any]]:
  """path -> axis -> bool vector over that axis (AND over every covering group)."""
  if len(keep) != len(groups):
    raise ValueError(f"expected one keep mask per group ({len(groups)}), got {len(keep)}")
  out: dict[str, dict[int, Any]] = {}
  for g, k in zip(groups, keep):
    if tuple(np.shape(k)) != (g.size,):
      raise ValueError(f"keep mask of group {g.name}: expected shape ({g.size},), got "
                       f"{tuple(np.shape(k))}")
    k = xp.asarray(k, bool)
    for m in g.members:
      units = np.asarray(m.units)
      idx_keep = xp.where(units >= 0, k[np.maximum(units, 0)], True)
      axes = out.setdefault(m.path, {})
      axes[m.axis] = idx_keep if m.axis not in axes else axes[m.axis] & idx_keep
  return out


def apply_group_masks(variables: Any, groups: Sequence[Group], keep: Sequence[Array]) -> Any:
  """Zeroes every entry of removed units in every coupled leaf (the masked model).

  Works under ``jit`` with traced masks. The result computes what the model
  shrunk by `jaxprune.structured.shrink` computes.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"hidden": {"kernel": jnp.array([[2.0, 0.0, 1.0], [1.0, 2.0, 0.0]]),
    ...                      "bias": jnp.zeros(3)},
    ...           "out": {"kernel": jnp.array([[1.0], [2.0], [0.0]])}}
    >>> axes = [("['hidden']['kernel']", 1), ("['hidden']['bias']", 0), ("['out']['kernel']", 0)]
    >>> group = jp.structured.make_group(params, axes)
    >>> keep = [jnp.array([True, False, True])]
    >>> masked = jp.structured.apply_group_masks(params, [group], keep)
    >>> masked["hidden"]["kernel"].tolist(), masked["out"]["kernel"].tolist()
    ([[2.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[1.0], [0.0], [0.0]])

  Args:
    variables: the pytree the groups were found on.
    groups: the groups.
    keep: one bool array per group (True = keep).

  Returns:
    ``variables`` with the removed units' entries set to zero (dtypes kept).
  """
  check_groups(groups, "apply_group_masks")
  if len(keep) != len(groups):
    raise ValueError(f"apply_group_masks: expected one keep mask per group ({len(groups)}), got "
                     f"{len(keep)}")
  return _apply_group_masks(tuple(groups), variables, tuple(keep))


@functools.partial(jax.jit, static_argnums=0)
def _apply_group_masks(groups: tuple[Group, ...], variables: Any, keep: tuple[Array, ...]) -> Any:
  axis_keep = axis_keep_by_leaf(groups, keep, jnp)

  def mask_leaf(path, x):
    axes = axis_keep.get(tree_lib.path_str(path))
    if not axes:
      return x
    m = jnp.ones((), bool)
    for axis, v in axes.items():
      if x.shape[axis] != v.shape[0]:
        raise ValueError(f"apply_group_masks: leaf {tree_lib.path_str(path)} has length "
                         f"{x.shape[axis]} on axis {axis}, the groups expect {v.shape[0]}")
      shape = [1] * x.ndim
      shape[axis] = -1
      m = m & v.reshape(shape)
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree_util.tree_map_with_path(mask_leaf, variables)
