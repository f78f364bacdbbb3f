"""The fraction of pruned entries, traceable inside a jitted step (`jaxprune.report` gives the
per-leaf table on the host)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import stacked as stacked_lib
from jaxprune._src.types import Array, Prunable, PyTree


def sparsity(params: PyTree, prunable: Prunable = None,
             stacked: stacked_lib.Stacked = None) -> Array:
  """Fraction of exact zeros over the prunable leaves (0.0 when none is prunable).

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]), "b": jnp.zeros(3)}
    >>> float(jp.sparsity(params))   # the bias is not prunable, so not counted
    0.5

  Args:
    params: parameter pytree.
    prunable: see `unstructured_mask`.
    stacked: leading layer axes of each leaf (see `unstructured_mask`); the prunable rule then
      reads each slice.

  Returns:
    float32 scalar in [0, 1].
  """
  chosen = []
  for x, l in zip(jax.tree.leaves(params), stacked_lib.resolve(params, stacked, prunable)):
    if l.any:
      x = jnp.asarray(x).reshape(l.num, l.size)
      chosen.append(x if all(l.flags) else x[np.flatnonzero(l.flags)])
  total = sum(x.size for x in chosen)
  if total == 0:
    return jnp.float32(0.0)
  zeros = sum(jnp.sum(x == 0, dtype=jnp.float32) for x in chosen)
  return zeros / jnp.float32(total)


__all__ = ["sparsity"]
