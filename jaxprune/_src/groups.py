"""Dependency groups for structured pruning, found from the model's jaxpr.

Removing a hidden neuron of a Dense layer means deleting a column of its kernel, an entry of its
bias, the matching BatchNorm statistics and the matching input row of every layer that reads it --
and, through residual additions and concatenations, of layers further away. Instead of asking
users to list these couplings, `find_groups` traces ``apply_fn(variables, *args)`` with
`jax.make_jaxpr` and walks it (`group_walk.trace_graph`), giving every axis of every intermediate
array an identity (`group_graph`) and applying each primitive's coupling rule (`group_rules`).
Axes that must be pruned together end up in one union-find class; each class that touches the
variables and is safe to prune is a `Group`.

Classes are excluded ("pinned") when pruning them could not keep the function unchanged: they
reach a model input or output or a constant array, are reduced over, sliced, padded, gathered,
sorted, or are contracted/free axes of a product of two data-dependent arrays (`group_rules`
lists the cases). A primitive that is not understood *poisons* the classes of its operands and
results: if such a class would otherwise be prunable, `find_groups` raises a ``ValueError``
naming the primitive; `SUPPORTED_PRIMITIVES` lists the understood ones.

Traced in inference mode: BatchNorm reading its running statistics, no dropout (random masks pin
their axes), no mutable collections returned. Scalar constants that user code derives from a
layer's width (``x / x.shape[-1]``) are invisible in a jaxpr: the shrunk model recomputes them
from its new width, so such layers are only safe if those constants do not depend on the pruned
axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxprune._src import group_walk
from jaxprune._src import tree as tree_lib
from jaxprune._src.group_rules import SUPPORTED_PRIMITIVES

__all__ = [
    "SUPPORTED_PRIMITIVES", "Group", "Member", "find_groups", "find_groups_nnx", "make_group",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One axis of one leaf that belongs to a group.

  Examples:
    Two channels at two positions, flattened into the input of a Dense kernel: each channel
    owns every other row of that kernel.

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"a": jnp.ones((3, 2)), "b": jnp.ones((4, 1))}
    >>> apply_fn = lambda p, x: (x @ p["a"]).reshape(1, 4) @ p["b"]   # x: (1, positions, 3)
    >>> (group,) = jp.structured.find_groups(apply_fn, params, jnp.ones((1, 2, 3)))
    >>> [(m.path, m.axis, m.units.tolist()) for m in group.members]
    [("['a']", 1, [0, 1]), ("['b']", 0, [0, 1, 0, 1])]

  Attributes:
    path: ``jax.tree_util.keystr`` of the leaf in the traced variables.
    axis: the axis of the leaf (non-negative).
    units: int32 array of length ``leaf.shape[axis]``: the unit (0..size-1)
      each index along ``axis`` belongs to, or -1 where this group does not
      cover the index (concatenations). A flattened conv feeding a Dense has
      ``units = [0, 1, .., C-1, 0, 1, ..]`` on the Dense kernel's input axis.
  """

  path: str
  axis: int
  units: np.ndarray

  def __repr__(self) -> str:
    return f"Member({self.path}, axis={self.axis}, len={len(self.units)})"


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """A set of leaf axes whose units (neurons, channels, heads) are pruned together.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"hidden": jnp.ones((2, 4)), "out": jnp.ones((4, 2))}
    >>> mlp = lambda p, x: jnp.tanh(x @ p["hidden"]) @ p["out"]   # four hidden units
    >>> (group,) = jp.structured.find_groups(mlp, params, jnp.ones((1, 2)))
    >>> group.size, group.name, [(m.path, m.axis) for m in group.members]
    (4, "['hidden'][axis 1]", [("['hidden']", 1), ("['out']", 0)])

  Attributes:
    size: number of units (e.g. neurons of the layer).
    members: the coupled ``(leaf, axis)`` pairs.
    name: readable label: the first member of a leaf with ``ndim >= 2``.
  """

  size: int
  members: tuple[Member, ...]
  name: str

  def __repr__(self) -> str:
    return f"Group({self.name}, size={self.size}, members={len(self.members)})"


def make_group(variables: Any, axes: Sequence[tuple[str, int]], name: str | None = None) -> Group:
  """Builds a group by hand (the manual override of `find_groups`).

  Every listed axis must have the same length; unit ``i`` is index ``i`` of
  every listed axis.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"hidden": {"kernel": jnp.array([[2.0, 0.0, 1.0], [1.0, 2.0, 0.0]]),
    ...                      "bias": jnp.zeros(3)},
    ...           "out": {"kernel": jnp.array([[1.0], [2.0], [0.0]])}}
    >>> axes = [("['hidden']['kernel']", 1), ("['hidden']['bias']", 0), ("['out']['kernel']", 0)]
    >>> group = jp.structured.make_group(params, axes)
    >>> group.size, group.name
    (3, "['hidden']['kernel'][axis 1]")

  Args:
    variables: the pytree the paths refer to.
    axes: ``(path, axis)`` pairs; ``path`` is ``jax.tree_util.keystr`` of a leaf.
    name: optional label (default: the first path).

  Returns:
    A `Group`.
  """
  leaves = _leaves_by_path(variables)
  members = []
  size = None
  for path, axis in axes:
    if path not in leaves:
      raise ValueError(f"make_group: expected a leaf path of variables, got {path!r}; "
                       f"known paths start with {list(leaves)[:4]}")
    shape = np.shape(leaves[path])
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"make_group: axis {axis} out of range for leaf {path} of shape {shape}")
    axis = axis % len(shape)
    if size is None:
      size = shape[axis]
    elif shape[axis] != size:
      raise ValueError(f"make_group: every axis must have length {size}; leaf {path} axis {axis} "
                       f"has {shape[axis]}")
    members.append(Member(path, axis, np.arange(shape[axis], dtype=np.int32)))
  if size is None:
    raise ValueError("make_group: expected at least one (path, axis) pair, got none")
  return Group(int(size), tuple(members), name or f"{axes[0][0]}[axis {members[0].axis}]")


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tree_lib.path_str(p): x for p, x in flat}


def find_groups(apply_fn: Callable[..., Any], variables: Any, *args: Any,
                on_unsupported: str = "raise", **kwargs: Any) -> tuple[Group, ...]:
  """Finds the prunable dependency groups of a model, automatically.

  Traces ``apply_fn(variables, *args, **kwargs)`` to a jaxpr and couples every
  axis of every leaf of ``variables`` with the axes it must be pruned together
  with. For a Flax Linen model pass ``variables = {"params": ..., "batch_stats":
  ...}`` and ``apply_fn = lambda v, x: model.apply(v, x)`` (inference mode):
  BatchNorm statistics then join their channel's group. For Flax NNX, see
  `find_groups_nnx`.

  Args:
    apply_fn: ``apply_fn(variables, *args, **kwargs) -> outputs``.
    variables: pytree of arrays (parameters and any other collections).
    *args: example inputs (only shapes and dtypes matter).
    on_unsupported: ``"raise"`` (default): a primitive that is not understood
      on the path of an otherwise prunable group raises a ``ValueError`` naming
      it; ``"skip"``: such groups are left out.
    **kwargs: passed to ``apply_fn``.

  Examples:
    The three hidden units of a two-layer MLP couple a kernel column, a bias entry and a row of
    the next kernel; the inputs and outputs stay whole:

    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"hidden": {"kernel": jnp.array([[2.0, 0.0, 1.0], [1.0, 2.0, 0.0]]),
    ...                      "bias": jnp.zeros(3)},
    ...           "out": {"kernel": jnp.array([[1.0], [2.0], [0.0]])}}
    >>> def apply_fn(p, x):
    ...   h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    ...   return h @ p["out"]["kernel"]
    >>> groups = jp.structured.find_groups(apply_fn, params, jnp.ones((1, 2)))
    >>> [(g.name, g.size) for g in groups]
    [("['hidden']['kernel'][axis 1]", 3)]
    >>> scores = jp.structured.group_scores(groups, jp.magnitude(params))
    >>> keep = jp.structured.group_masks(scores, 1 / 3)   # drop the weakest unit
    >>> keep[0].tolist()
    [True, True, False]
    >>> small = jp.structured.shrink(params, groups, keep)
    >>> jax.tree.map(jnp.shape, small)
    {'hidden': {'bias': (2,), 'kernel': (2, 2)}, 'out': {'kernel': (2, 1)}}
    >>> masked = jp.structured.apply_group_masks(params, groups, keep)   # computes the same

  Returns:
    Groups in order of their first member's leaf (order of
    ``jax.tree.leaves(variables)``); groups touching the model's inputs or
    outputs, constants, reductions and the other cases listed in the module
    docstring are left out.
  """
  if on_unsupported not in ("raise", "skip"):
    raise ValueError(f"on_unsupported: expected 'raise' or 'skip', got {on_unsupported!r}")
  g, leaf_labels = group_walk.trace_graph(apply_fn, variables, args, kwargs)
  classes: dict[int, list[Member]] = {}
  order: list[int] = []
  ndims: dict[str, int] = {}
  for path, ndim, labs in leaf_labels:
    ndims[path] = ndim
    for axis, lab in enumerate(labs):
      for root, units in g.unit_maps(lab):
        root = g.find(root)
        if root not in classes:
          classes[root] = []
          order.append(root)
        classes[root].append(Member(path, axis, units))
  groups = []
  for root in order:
    if root in g.pin:
      continue
    members = classes[root]
    if root in g.poison:
      if on_unsupported == "skip":
        continue
      paths = sorted({m.path for m in members})
      raise ValueError(
          f"find_groups: unsupported primitive {g.poison[root]!r} on the coupled path of "
          f"leaves {paths}; expected only the primitives in "
          "jaxprune.structured.SUPPORTED_PRIMITIVES "
          "(pass explicit groups built with make_group, or on_unsupported='skip')")
    named = [m for m in members if ndims[m.path] >= 2] or members
    name = f"{named[0].path}[axis {named[0].axis}]"
    groups.append(Group(g.size[root], tuple(members), name))
  return tuple(groups)


def find_groups_nnx(model: Any, *args: Any, on_unsupported: str = "raise",
                    **kwargs: Any) -> tuple[Group, ...]:
  """`find_groups` for a Flax NNX module.

  Paths refer to ``nnx.split(model)[1]`` (the model's full state, including
  BatchNorm statistics); call ``model.eval()`` first for inference behaviour.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jnp.tanh,
    ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    >>> groups = jp.structured.find_groups_nnx(model, jnp.ones((1, 2)))
    >>> [(m.path, m.axis) for m in groups[0].members]
    [("['layers'][0]['bias']", 0), ("['layers'][0]['kernel']", 1), ("['layers'][2]['kernel']", 0)]

  Args:
    model: an ``nnx.Module``.
    *args: example inputs for ``model(*args, **kwargs)``.
    on_unsupported: see `find_groups`.
    **kwargs: passed to the model.

  Returns:
    The groups, with paths into the model's state.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)

  def apply(st, *a, **kw):
    return nnx.merge(graphdef, st)(*a, **kw)

  return find_groups(apply, state, *args, on_unsupported=on_unsupported, **kwargs)
