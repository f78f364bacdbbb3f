"""Finding the masks of a pruning transformation inside an optimizer state.

Optimizer states nest: an ``optax.chain`` tuple, ``inject_hyperparams`` and ``MultiSteps``
wrappers, a Flax ``TrainState`` or an ``nnx.Optimizer``. The masks are found by looking for a
node with a ``masks`` field whose leaf paths and shapes are those of the parameters, wherever it
sits.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxprune._src import tree as tree_lib
from jaxprune._src.types import PyTree


def _has_masks(x: Any) -> bool:
  return hasattr(x, "masks")


def holds_masks(tree: Any) -> bool:
  """Whether any node of ``tree`` has a ``masks`` attribute."""
  return any(_has_masks(n) for n in jax.tree.leaves(tree, is_leaf=_has_masks))


def find_mask_state(state: Any, params: PyTree) -> Any:
  """Finds the node of an optimizer state that holds the masks of ``params``.

  Any node of ``state`` (a chain tuple, a ``NamedTuple`` state such as `jaxprune.PruneState`,
  an ``inject_hyperparams`` or ``MultiSteps`` wrapper, an ``nnx.Optimizer``'s ``opt_state``...)
  with a ``masks`` attribute whose leaf paths and shapes are those of ``params`` qualifies; the
  first one in traversal order is returned. Paths are compared as `tree.path_str`
  renders them, so masks held in NNX ``OptVariable`` nodes match parameters in ``Param`` nodes.

  Args:
    state: an optax state (or any pytree) that contains a state with a ``masks`` field.
    params: the parameters the masks belong to.

  Returns:
    The node (e.g. a `jaxprune.PruneState`).

  Raises:
    ValueError: when no ``masks`` field matches ``params``.
  """
  found = [n for n in jax.tree.leaves(state, is_leaf=_has_masks) if _has_masks(n)]
  for node in found:
    if tree_lib.same_paths(node.masks, params):
      return node
  num = jax.tree.structure(params).num_leaves
  raise ValueError(
      "state: expected an optimizer state containing a `masks` field with the leaf paths and "
      f"shapes of params ({num} leaves); found {len(found)} `masks` field(s), none matching.")


def find_masks(state: Any, params: PyTree) -> PyTree:
  """Finds the mask pytree held in an optimizer state (see `find_mask_state`).

  Examples:
    Wherever wrappers put the pruning state (here gradient accumulation around a chain):

    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -4.0], [-3.0, 0.5]])}
    >>> pruner = jp.prune(0.5, masks={"w": jnp.abs(params["w"]) > 2})
    >>> tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), pruner), every_k_schedule=4)
    >>> jp.find_masks(tx.init(params), params)["w"].tolist()
    [[False, True], [True, False]]

    In a Flax NNX optimizer (masks all True until the first update):

    >>> from flax import nnx
    >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-3), jp.prune(0.5)),
    ...                           wrt=nnx.Param)
    >>> masks = jp.find_masks(optimizer.opt_state, nnx.state(model, nnx.Param))
    >>> masks["kernel"][...].shape, bool(masks["kernel"][...].all())
    ((4, 2), True)

  Args:
    state: an optax state (or any pytree) that contains a state with a ``masks`` field.
    params: the parameters the masks belong to.

  Returns:
    The bool mask pytree, in the tree structure of ``params`` (so `jax.tree.map` over both
    works even where the state wraps its leaves in other node types, as NNX does).
  """
  return tree_lib.like(find_mask_state(state, params).masks, params)


def masks_for(masks_or_state: Any, params: PyTree) -> PyTree:
  """Masks in the tree structure of ``params``, from masks with its leaf paths (NNX variable
  types aside) or from an optax state holding them; checked against ``params``."""
  if tree_lib.same_paths(masks_or_state, params):
    masks = tree_lib.like(masks_or_state, params)
  elif holds_masks(masks_or_state):
    masks = find_masks(masks_or_state, params)
  else:
    masks = masks_or_state
  tree_lib.check_same_structure(params, masks, "params", "masks")
  return masks
