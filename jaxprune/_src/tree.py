"""Pytree helpers shared by every module: leaf paths, the prunable rule, structure checks.

Works on any JAX pytree: dicts (Flax Linen ``params``), Flax NNX ``State`` (whose leaves sit in
``Variable`` nodes), Equinox modules (filtered with ``eqx.filter(model, eqx.is_array)``) and
``NamedTuple`` / dataclass trees.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import validation
from jaxprune._src.types import KeyPath, Prunable, PyTree

_VALUE_KEY = jax.tree_util.GetAttrKey("value")


def clean_path(path: KeyPath) -> KeyPath:
  """``path`` without a trailing ``.value`` key.

  Flax NNX ``Variable`` nodes (``Param``, ``BatchStat``, optimizer ``OptVariable``...) flatten
  to their array under a ``.value`` attribute key; dropping it makes an NNX path read like the
  Linen path of the same parameter (``['l1']['kernel']``) and makes a parameter's path and its
  mask's path equal whatever ``Variable`` type wraps each. No other leaf can share the shortened
  path: it names the node that held the ``.value`` attribute, which is not itself a leaf.
  """
  path = tuple(path)
  return path[:-1] if path and path[-1] == _VALUE_KEY else path


def path_str(path: KeyPath) -> str:
  """Renders a key path like `jax.tree_util.keystr`, without NNX's trailing ``.value``.

  Args:
    path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    e.g. ``['dense']['kernel']`` (Linen and NNX), ``.layers[0].weight`` (Equinox), or
    ``<root>`` for a tree that is a single leaf.
  """
  return jax.tree_util.keystr(clean_path(path)) or "<root>"


def is_floating(leaf: Any) -> bool:
  """True for arrays (or array-likes) with a floating dtype."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def default_prunable(path: KeyPath, leaf: Any) -> bool:
  """The default rule: floating arrays with ``ndim >= 2`` (kernels, filters, embeddings).

  Biases and normalisation scales (``ndim <= 1``) stay dense.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> leaves = (jnp.zeros((2, 3)), jnp.zeros(3), jnp.zeros((2, 3), int))
    >>> [jp.default_prunable((), leaf) for leaf in leaves]   # a kernel, a bias, integers
    [True, False, False]

  Args:
    path: key path of the leaf (unused by the default rule; part of the predicate signature).
    leaf: the parameter.

  Returns:
    Whether the leaf is pruned.
  """
  del path
  return is_floating(leaf) and np.ndim(leaf) >= 2


def is_function(value: Any) -> bool:
  """Whether ``value`` is a function argument (a predicate, a score function) or pytree data.

  A function is a callable that is a pytree leaf (a function, lambda, method or
  `functools.partial`), or a `jax.tree_util.Partial`. A callable pytree *node* is data: every
  Equinox module is callable, and so is a tree of bools or scores shaped like an Equinox model.
  """
  if isinstance(value, jax.tree_util.Partial):
    return True
  return callable(value) and jax.tree_util.treedef_is_leaf(jax.tree.structure(value))


def _is_bool(value: Any) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return True
  return (getattr(value, "dtype", None) == np.bool_ and np.ndim(value) == 0
          and not validation.is_traced(value))


def prunable_flags(params: PyTree, prunable: Prunable = None) -> PyTree:
  """Resolves a prunable specification to a pytree of Python bools shaped like ``params``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    >>> jp.prunable_flags(params)
    {'b': False, 'w': True}
    >>> jp.prunable_flags(params, lambda path, leaf: leaf.ndim >= 1)
    {'b': True, 'w': True}

  Args:
    params: parameter (or score) pytree.
    prunable: ``None`` for `default_prunable`; a predicate ``(path, leaf) -> bool`` (see
      `is_function`); or a pytree of bools that is ``params``' structure or a prefix of it
      (a single ``True`` / ``False`` applies to every leaf).

  Returns:
    A pytree with the structure of ``params`` whose leaves are Python bools.

  Raises:
    ValueError: for a value that is neither (a string, a number, an array...), a tree that is
      not a prefix of ``params``, or a predicate that returns something other than a bool; the
      message names the leaf.
  """
  if prunable is None:
    prunable = default_prunable
  if is_function(prunable):
    def call(path, leaf):
      out = prunable(path, leaf)
      if not _is_bool(out):
        raise validation.error("prunable", "a predicate returning a bool", out, path_str(path))
      return bool(out)
    return jax.tree_util.tree_map_with_path(call, params)
  try:
    full = jax.tree.broadcast(prunable, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "prunable: expected None, a predicate (path, leaf) -> bool, or a pytree of bools that is "
        f"a prefix of the parameters; got a tree that does not match: {e}") from None
  for path, flag in jax.tree_util.tree_flatten_with_path(full)[0]:
    if not _is_bool(flag):
      got = validation.Text(f"shape {np.shape(flag)}") if np.ndim(flag) else flag
      raise validation.error(
          "prunable", "None, a predicate (path, leaf) -> bool, or a pytree of bools", got,
          path_str(path))
  return jax.tree.map(bool, full)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``(path string, leaf)`` pairs in `jax.tree.leaves` order."""
  return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def same_paths(a: PyTree, b: PyTree) -> bool:
  """Whether two trees have the same leaf paths (NNX ``Variable`` types aside) and shapes."""
  pa, pb = leaves_with_paths(a), leaves_with_paths(b)
  return ([p for p, _ in pa] == [p for p, _ in pb] and
          all(np.shape(x) == np.shape(y) for (_, x), (_, y) in zip(pa, pb)))


def like(tree: PyTree, reference: PyTree) -> PyTree:
  """``tree``'s leaves in ``reference``'s tree structure (its leaf paths must match).

  Masks kept in an NNX optimizer state sit in ``OptVariable`` nodes while the parameters sit in
  ``Param`` nodes: the leaf paths agree but the tree structures do not, so `jax.tree.map` over
  both fails. This rebuilds ``tree`` with ``reference``'s structure.
  """
  if jax.tree.structure(tree) == jax.tree.structure(reference):
    return tree
  check_same_structure(reference, tree, "reference", "tree")
  return jax.tree.unflatten(jax.tree.structure(reference), jax.tree.leaves(tree))


def check_same_structure(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
  """Raises a ValueError naming the first path where ``a`` and ``b`` differ (structure or shape).

  Leaf paths are compared as `path_str` renders them, so an NNX ``Param`` tree and the
  ``OptVariable`` tree of its masks agree.

  Args:
    a: first pytree.
    b: second pytree.
    name_a: argument name of ``a`` for the message.
    name_b: argument name of ``b`` for the message.
  """
  pa = jax.tree_util.tree_flatten_with_path(a)[0]
  pb = jax.tree_util.tree_flatten_with_path(b)[0]
  paths_a = [path_str(p) for p, _ in pa]
  paths_b = [path_str(p) for p, _ in pb]
  if paths_a != paths_b:
    only_a = [p for p in paths_a if p not in set(paths_b)]
    only_b = [p for p in paths_b if p not in set(paths_a)]
    where = (f"leaf {only_a[0]} is in {name_a} but not in {name_b}" if only_a else
             f"leaf {only_b[0]} is in {name_b} but not in {name_a}" if only_b else
             "the leaves are in a different order")
    raise ValueError(
        f"{name_a} and {name_b} must have the same tree structure; {where} "
        f"({len(paths_a)} vs {len(paths_b)} leaves).")
  for path, (_, xa), (_, xb) in zip(paths_a, pa, pb):
    sa, sb = np.shape(xa), np.shape(xb)
    if sa != sb:
      raise ValueError(
          f"{name_a} and {name_b} must have the same shapes; leaf {path} has shape {sa} in "
          f"{name_a} and {sb} in {name_b}.")


def check_float(tree: PyTree, name: str) -> None:
  """Raises a ValueError naming the first leaf of ``tree`` that is not a floating array."""
  for path, leaf in leaves_with_paths(tree):
    if not is_floating(leaf):
      dtype = getattr(leaf, "dtype", type(leaf).__name__)
      raise ValueError(
          f"{name}: expected floating-point arrays, got dtype {dtype} at leaf {path}.")
