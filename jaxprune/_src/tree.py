"""Pytree helpers shared by every module: leaf paths, the prunable rule, validation."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple
Prunable = Union[None, Callable[[KeyPath, Any], bool], PyTree]


def path_str(path: KeyPath) -> str:
  """Renders a key path the way `jax.tree_util.keystr` does, e.g. ``['dense']['kernel']``."""
  return jax.tree_util.keystr(tuple(path)) or "<root>"


def is_floating(leaf: Any) -> bool:
  """True for arrays (or array-likes) with a floating dtype."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def default_prunable(path: KeyPath, leaf: Any) -> bool:
  """The default rule: floating arrays with ``ndim >= 2`` (kernels, filters, embeddings).

  Biases and normalisation scales (``ndim <= 1``) stay dense.

  Args:
    path: key path of the leaf (unused by the default rule; part of the predicate signature).
    leaf: the parameter.

  Returns:
    Whether the leaf is pruned.
  """
  del path
  return is_floating(leaf) and np.ndim(leaf) >= 2


def prunable_flags(params: PyTree, prunable: Prunable = None) -> PyTree:
  """Resolves a prunable specification to a pytree of Python bools shaped like ``params``.

  Args:
    params: parameter (or score) pytree.
    prunable: ``None`` for `default_prunable`; a predicate ``(path, leaf) -> bool``; or a pytree
      of bools that is ``params``' structure or a prefix of it.

  Returns:
    A pytree with the structure of ``params`` whose leaves are Python bools.
  """
  if prunable is None:
    prunable = default_prunable
  if callable(prunable):
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(prunable(p, x)), params)
  try:
    full = jax.tree.broadcast(prunable, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "prunable: expected None, a predicate (path, leaf) -> bool, or a pytree of bools that is "
        f"a prefix of the parameters; got a tree that does not match: {e}") from None
  return jax.tree.map(bool, full)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``(path string, leaf)`` pairs in `jax.tree.leaves` order."""
  return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
  """Raises a ValueError naming the first path where ``a`` and ``b`` differ (structure or shape).

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
