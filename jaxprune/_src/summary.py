"""Counting what a pruning left: the fraction of zeros and a per-leaf table of kept entries."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import tree as tree_lib
from jaxprune._src.types import Array, Prunable, PyTree


def sparsity(params: PyTree, prunable: Prunable = None) -> Array:
  """Fraction of exact zeros over the prunable leaves (0.0 when none is prunable).

  Args:
    params: parameter pytree.
    prunable: see `unstructured_mask`.

  Returns:
    float32 scalar in [0, 1].
  """
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  chosen = [jnp.asarray(x) for x, f in zip(jax.tree.leaves(params), flags) if f]
  total = sum(x.size for x in chosen)
  if total == 0:
    return jnp.float32(0.0)
  zeros = sum(jnp.sum(x == 0, dtype=jnp.float32) for x in chosen)
  return zeros / jnp.float32(total)


class LeafSummary(NamedTuple):
  """One row of `summarize`."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  count: int
  kept: int
  sparsity: float
  prunable: bool


def summarize(params: PyTree, masks: Optional[PyTree] = None,
              prunable: Prunable = None) -> list[LeafSummary]:
  """Per-leaf counts: entries, kept entries and sparsity (host-side, concrete values).

  Args:
    params: parameter pytree.
    masks: optional masks; kept = True entries of the mask. Without masks, kept = nonzeros.
      Unprunable leaves count as fully kept either way (nothing prunes them), as in
      `jaxprune.report`.
    prunable: see `unstructured_mask`.

  Returns:
    One `LeafSummary` per leaf in `jax.tree.leaves` order.
  """
  if masks is not None:
    tree_lib.check_same_structure(params, masks, "params", "masks")
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  rows = []
  src = masks if masks is not None else params
  for (path, x), f, m in zip(tree_lib.leaves_with_paths(params), flags, jax.tree.leaves(src)):
    arr = np.asarray(m)
    count = int(arr.size)
    kept = int(np.count_nonzero(arr)) if f else count
    rows.append(LeafSummary(path, tuple(np.shape(x)), str(np.asarray(x).dtype), count, kept,
                            1.0 - kept / count if count else 0.0, f))
  return rows


def format_summary(rows: Sequence[LeafSummary]) -> str:
  """A fixed-width table of `summarize` rows with a total over prunable leaves."""
  header = f"{'leaf':<40} {'shape':>18} {'count':>12} {'kept':>12} {'sparsity':>9}"
  lines = [header, "-" * len(header)]
  for r in rows:
    mark = "" if r.prunable else " (dense)"
    lines.append(f"{(r.path + mark)[:40]:<40} {str(r.shape):>18} {r.count:>12,} {r.kept:>12,} "
                 f"{r.sparsity:>9.2%}")
  n = sum(r.count for r in rows if r.prunable)
  k = sum(r.kept for r in rows if r.prunable)
  lines.append("-" * len(header))
  lines.append(f"{'total (prunable)':<40} {'':>18} {n:>12,} {k:>12,} "
               f"{(1 - k / n if n else 0.0):>9.2%}")
  return "\n".join(lines)


__all__ = ["LeafSummary", "format_summary", "sparsity", "summarize"]
