"""Scores and masks for whole units (neurons, channels, heads) of dependency groups.

A unit's score sums an entry-wise score over every entry the unit owns in
every coupled leaf (kernel column, consumer kernel row, ...):

* group norm: ``reduce="l2"`` on magnitudes, ``sqrt(sum w^2)``, or ``"l1"``;
* Taylor: ``reduce="l1"`` on ``jp.taylor(params, grads)``, the group sum of
  ``|w * g|`` (Molchanov et al., 2019);
* Hessian: ``reduce="l1"`` on ``jp.obd(params, h)``, the group sum of OBD
  saliencies ``h w^2 / 2`` (LeCun et al., 1990).

Stacked layers (``stacked=``, see `jaxprune._src.stacked`): a group whose every member lies on
a stacked leaf with the same layer axes, its own axis not among them (the hidden units of a
block stacked by ``nn.scan``), is a group per layer. Its scores and masks have shape
``(*layer_shape, size)``, as if each layer were a model of its own. A group that reaches an
unstacked leaf (a residual stream fed by an embedding, read by a head) couples every layer and
keeps units shared by all of them.

References:
  Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 (filter norms).
  Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
  LeCun, Denker, Solla, "Optimal Brain Damage", NeurIPS 1990.
  Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (dependency groups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import masks as masks_lib
from jaxprune._src import select
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.group_layers import apply_keep, keep_global, keep_per_layer, unit_scores
from jaxprune._src.groups import Group
from jaxprune._src.types import Array, Prunable, PyTree

Sparsity = Union[float, Array, Sequence[Any]]


def check_groups(groups: Sequence[Group], name: str) -> None:
  """Raises a `ValueError` unless ``groups`` holds only `Group` objects."""
  if not all(isinstance(g, Group) for g in groups):
    raise ValueError(f"{name}: expected a sequence of jaxprune Group objects (find_groups / "
                     f"make_group), got {[type(g).__name__ for g in groups]}")


def layer_shapes(tree: PyTree, stacked: stacked_lib.Stacked) -> dict[str, tuple[int, ...]]:
  """Leaf path -> the shape of its leading layer axes (``()`` for a leaf that is not stacked).

  Args:
    tree: the variables (or scores) the groups were found on.
    stacked: see `jaxprune._src.stacked.layer_axes`, which checks it.

  Returns:
    One entry per leaf of ``tree``.
  """
  leads = stacked_lib.layer_axes(tree, stacked)
  return {p: tuple(int(d) for d in np.shape(x)[:k])
          for (p, x), k in zip(tree_lib.leaves_with_paths(tree), leads)}


def layer_shape(group: Group, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
  """The layer shape of a per-layer group, or ``()`` for a group shared by all layers.

  Args:
    group: a dependency group.
    shapes: leaf path -> shape of its layer axes (`layer_shapes`); a missing path has none.

  Returns:
    The common layer shape when every member lies on a stacked leaf with the same layer axes
    and its own axis is not one of them; ``()`` otherwise.
  """
  leads = {shapes.get(m.path, ()) for m in group.members}
  if len(leads) != 1:
    return ()
  shape = leads.pop()
  return shape if shape and all(m.axis >= len(shape) for m in group.members) else ()


def _check_every_layer_scored(groups: Sequence[Group], leads: Sequence[int],
                              by_path: dict[str, stacked_lib.Layers]) -> None:
  """A per-layer group must have a prunable member slice in each layer, or that layer's units
  would all score 0 and be selected by position alone."""
  for g, lead in zip(groups, leads):
    members = [by_path[m.path] for m in g.members if m.path in by_path and by_path[m.path].any]
    if not lead or not members:
      continue  # a group with no prunable member at all is refused by the kernel
    scored = np.logical_or.reduce([np.asarray(l.flags) for l in members])
    if not scored.all():
      layer = [int(i) for i in np.unravel_index(np.argmin(scored), members[0].lead_shape)]
      raise validation.error("prunable", f"a prunable member slice of group {g.name} in every "
                             "layer", validation.Text(f"none in layer {layer}"))


def group_scores(groups: Sequence[Group], scores: PyTree, *, reduce: str = "l2",
                 prunable: Prunable = None, stacked: stacked_lib.Stacked = None) -> list[Array]:
  """Per-unit scores of every group: higher = more important.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"w1": jnp.array([[3.0, 0.0, 2.0], [4.0, 2.0, 1.0]]), "b1": jnp.ones(3),
    ...           "w2": jnp.array([[0.0], [0.0], [2.0]])}
    >>> group = jp.structured.make_group(params, [("['w1']", 1), ("['b1']", 0), ("['w2']", 0)])
    >>> (l2,) = jp.structured.group_scores([group], jp.magnitude(params))
    >>> (l1,) = jp.structured.group_scores([group], jp.magnitude(params), reduce="l1")
    >>> l2.tolist(), l1.tolist()   # the bias is not prunable, so not counted
    ([5.0, 2.0, 3.0], [7.0, 2.0, 5.0])
    >>> two = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params)   # two stacked layers
    >>> per_layer = jp.structured.make_group(two, [(m.path, m.axis + 1) for m in group.members])
    >>> (s,) = jp.structured.group_scores([per_layer], jp.magnitude(two), stacked=1)
    >>> s.tolist()   # one row per layer; layer 1 holds twice layer 0's weights
    [[5.0, 2.0, 3.0], [10.0, 4.0, 6.0]]

  Args:
    groups: from `find_groups` or `make_group`.
    scores: entry-wise scores (``jp.magnitude``, ``jp.taylor``, ``jp.obd`` ...)
      over a pytree keyed like the variables the groups were found on; leaves
      the groups mention but ``scores`` lacks are skipped.
    reduce: ``"l2"`` (square root of the sum of squares) or ``"l1"`` (sum of
      absolute values) over all entries of a unit (in one layer, for a per-layer group).
    prunable: which leaves contribute: None for ``jp.default_prunable``
      (floating, ``ndim >= 2``: kernels, not biases, norm scales or running
      statistics), a predicate ``(key_path, leaf) -> bool`` or a pytree of bools. With
      ``stacked`` the default rule reads each slice (stacked biases do not contribute) and a
      stacked leaf's flag may be a bool array over its layer axes: only those slices count.
    stacked: leading layer axes of each leaf, as in `jaxprune.unstructured_mask`: None, an
      int for every leaf, a pytree prefix of ints, or a function ``(path, leaf) -> int``.
      Groups whose members all lie on stacked leaves are then scored per layer.

  Returns:
    One float32 array per group: ``(group.size,)``, or ``(*layer_shape, group.size)`` for a
    per-layer group (`layer_shape`; only with ``stacked``).
  """
  check_groups(groups, "group_scores")
  masks_lib.check_reduce(reduce, ("l1", "l2"), "reduce")
  paths = [p for p, _ in tree_lib.leaves_with_paths(scores)]
  # Resolved outside jit, to paths: a static set compares by value, so a fresh lambda per call
  # does not recompile, and the predicate sees concrete leaves.
  if stacked is None:
    flags = jax.tree.leaves(tree_lib.prunable_flags(scores, prunable))
    chosen = frozenset((p, 0, None) for p, f in zip(paths, flags) if f)
    leads = (0,) * len(groups)
  else:
    by_path = dict(zip(paths, stacked_lib.resolve(scores, stacked, prunable)))
    chosen = frozenset((p, l.lead, None if all(l.flags) else l.flags)
                       for p, l in by_path.items() if l.any)
    shapes = {p: l.lead_shape for p, l in by_path.items()}
    leads = tuple(len(layer_shape(g, shapes)) for g in groups)
    _check_every_layer_scored(groups, leads, by_path)
  return unit_scores(tuple(groups), scores, reduce, chosen, leads)


def _score_layers(scores: Sequence[Array], stacked: stacked_lib.Stacked) -> list[int]:
  """Per group the number of layer axes of its scores, checked: ``(*layers, size)``."""
  if stacked is None:
    if any(s.ndim != 1 for s in scores):
      raise ValueError(f"group_masks: expected 1-D per-unit scores, got shapes "
                       f"{[s.shape for s in scores]} (per-layer scores need stacked=)")
    return [0] * len(scores)
  leads = stacked_lib.layer_axes(list(scores), stacked)
  for i, (s, k) in enumerate(zip(scores, leads)):
    if s.ndim - k != 1:
      raise validation.error("stacked", f"{s.ndim - 1} layer axes for per-unit scores of shape "
                             f"{s.shape} (layers, then units)", k, f"[{i}]")
  return leads


def group_masks(scores: Sequence[Array], sparsity: Sparsity, *, scope: str = "layer",
                stacked: stacked_lib.Stacked = None) -> list[Array]:
  """Which units to keep: exactly ``round(s * n)`` lowest-scored units removed.

  Ties: among equal scores the later unit (and, globally, the later group) is
  removed first, as in ``jp.unstructured_mask``. A concrete selection that
  would remove every unit of a group (of a layer of a per-layer group) raises a ``ValueError``.
  A per-layer group is a group per layer: layer scope removes ``round(s * size)`` units in
  each layer; global scope ranks every (group, layer, unit) in that order.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> scores = [jnp.array([3.0, 1.0, 2.0]), jnp.array([0.5, 4.0])]
    >>> [k.tolist() for k in jp.structured.group_masks(scores, 0.5)]   # round(1.5), round(1.0)
    [[True, False, False], [False, True]]
    >>> [k.tolist() for k in jp.structured.group_masks(scores, 0.4, scope="global")]   # 2 of 5
    [[True, False, True], [False, True]]
    >>> per_layer = [jnp.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])]   # (layers, units)
    >>> jp.structured.group_masks(per_layer, 0.5, stacked=1)[0].tolist()
    [[True, False, False], [False, False, True]]

  Args:
    scores: per-unit scores, one array per group (`group_scores`).
    sparsity: fraction of units to remove, in [0, 1] (may be traced); with
      ``scope="layer"`` also a sequence with one fraction per group, for a per-layer group
      a fraction or an array of fractions over its layer axes.
    scope: ``"layer"``: ``round(s * group.size)`` units per group (and layer);
      ``"global"``: ``round(s * N)`` of all ``N`` units together.
    stacked: None when every scores array is 1-D; else the number of leading layer axes of
      each scores array (an int for all, a sequence with one per group, or a function
      ``(path, scores) -> int``): ``[s.ndim - 1 for s in scores]`` for the output of
      ``group_scores(..., stacked=...)``.

  Returns:
    One bool array per group, shaped like its scores; True = keep.
  """
  masks_lib.check_scope(scope)
  scores = [jnp.asarray(s, jnp.float32) for s in scores]
  leads = _score_layers(scores, stacked)
  layers = [stacked_lib.Layers(k, s.shape[:k], s.shape[k:], (True,) * math.prod(s.shape[:k]))
            for s, k in zip(scores, leads)]
  if scope == "layer":
    if isinstance(sparsity, (list, tuple)):
      if len(sparsity) != len(scores):
        raise ValueError(f"group_masks: expected {len(scores)} sparsities (one per group), got "
                         f"{len(sparsity)}")
      fracs = list(sparsity)
    else:
      fracs = [sparsity] * len(scores)
    ks = []
    for i, (s, frac, lay) in enumerate(zip(scores, fracs, layers)):
      size = s.shape[-1]
      k = stacked_lib.slice_counts(frac, lay, size, f"group {i}")
      counts = k if isinstance(k, list) else [k]
      full = [j for j, c in enumerate(counts) if isinstance(c, int) and c >= size]
      if full and lay.num:
        layer = [int(j) for j in np.unravel_index(full[0], lay.lead_shape)]
        where = f" in layer {layer}" if lay.lead else ""
        raise ValueError(f"group_masks: sparsity {frac} would remove all {size} units of "
                         f"group {i}{where}; expected to keep at least one")
      ks.append(jnp.asarray(k, jnp.int32).reshape(lay.lead_shape))
    return list(keep_per_layer(tuple(scores), tuple(ks)))
  total = sum(s.size for s in scores)
  k = select.num_to_prune(sparsity, total)
  keep = list(keep_global(tuple(scores), jnp.asarray(k, jnp.int32)))
  if isinstance(k, int):
    empty = [i for i, m in enumerate(jax.device_get(keep)) if not m.any(axis=-1).all()]
    if empty:
      per = "group and layer" if any(leads) else "group"
      raise ValueError(f"group_masks: global sparsity {sparsity} would remove every unit of "
                       f"groups {empty}; expected at least one unit kept per {per} (lower the "
                       "sparsity or use scope='layer')")
  return keep


def check_keep(groups: Sequence[Group], keep: Sequence[Any], variables: PyTree,
               stacked: stacked_lib.Stacked, name: str) -> None:
  """Checks one keep mask per group: ``(size,)``, or for a per-layer group (with ``stacked``)
  also ``(*layer_shape, size)``.

  Args:
    groups: the groups.
    keep: the masks (concrete or traced; only shapes are read).
    variables: the pytree the groups were found on.
    stacked: see `group_scores`.
    name: the calling function, for messages.
  """
  check_groups(groups, name)
  if len(keep) != len(groups):
    raise ValueError(f"{name}: expected one keep mask per group ({len(groups)}), got "
                     f"{len(keep)}")
  shapes = {} if stacked is None else layer_shapes(variables, stacked)
  for g, k in zip(groups, keep):
    allowed = [(g.size,)]
    per_layer = layer_shape(g, shapes)
    if per_layer:
      allowed.append(per_layer + (g.size,))
    if tuple(np.shape(k)) not in allowed:
      raise validation.error("keep", f"shape {' or '.join(map(str, allowed))} for group "
                             f"{g.name}", validation.Text(f"shape {tuple(np.shape(k))}"))


def apply_group_masks(variables: PyTree, groups: Sequence[Group], keep: Sequence[Array], *,
                      stacked: stacked_lib.Stacked = None) -> PyTree:
  """Zeroes every entry of removed units in every coupled leaf (the masked model).

  Works under ``jit`` with traced masks. The result computes what the model
  shrunk by `jaxprune.structured.shrink` computes.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"up": jnp.array([[1.0, -2.0, 0.5]]), "down": jnp.array([[1.0], [3.0], [4.0]])}
    >>> mlp = lambda p, x: jnp.tanh(x @ p["up"]) @ p["down"]
    >>> groups = jp.structured.find_groups(mlp, params, jnp.ones((1, 1)))
    >>> keep = [jnp.array([True, False, True])]
    >>> masked = jp.structured.apply_group_masks(params, groups, keep)
    >>> masked["up"].tolist(), masked["down"].tolist()
    ([[1.0, 0.0, 0.5]], [[1.0], [0.0], [4.0]])
    >>> small = jp.structured.shrink(params, groups, keep)
    >>> x = jnp.array([[0.5], [-1.0]])
    >>> bool(jnp.array_equal(mlp(masked, x), mlp(small, x)))   # the same function
    True
    >>> two = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params)   # two stacked layers
    >>> per_layer = jp.structured.make_group(two, [("['up']", 2), ("['down']", 1)])
    >>> keep = [jnp.array([[True, False, True], [False, True, True]])]   # one mask per layer
    >>> jp.structured.apply_group_masks(two, [per_layer], keep, stacked=1)["down"].tolist()
    [[[1.0], [0.0], [4.0]], [[0.0], [6.0], [8.0]]]

  Args:
    variables: the pytree the groups were found on.
    groups: the groups.
    keep: one bool array per group (True = keep): ``(group.size,)``, or with ``stacked`` for
      a per-layer group (see `group_scores`) also ``(*layer_shape, group.size)``, one mask per
      layer.
    stacked: leading layer axes of each leaf of ``variables``, as in `group_scores`.

  Returns:
    ``variables`` with the removed units' entries set to zero (dtypes kept).
  """
  check_keep(groups, keep, variables, stacked, "apply_group_masks")
  return apply_keep(tuple(groups), variables, tuple(keep))


__all__ = ["apply_group_masks", "check_groups", "check_keep",
           "group_masks", "group_scores", "layer_shape", "layer_shapes"]
