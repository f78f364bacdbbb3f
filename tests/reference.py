"""Short numpy reference implementations the tests compare against."""

from __future__ import annotations

import numpy as np


def prune_order(values: np.ndarray) -> np.ndarray:
  """Indices of a flat score vector in pruning order: NaN first, then ascending score, ties by
  descending position (later entries go first)."""
  v = np.asarray(values, np.float64).ravel()
  nan = np.isnan(v)
  pos = np.arange(v.size)
  return np.lexsort((-pos, np.where(nan, 0.0, v), ~nan))


def prune_lowest(arrays: list[np.ndarray], k: int) -> list[np.ndarray]:
  """True = pruned: the first k entries of `prune_order` over the concatenated arrays."""
  flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays]) if arrays else []
  pruned = np.zeros(len(flat), bool)
  pruned[prune_order(flat)[:k]] = True
  out, offset = [], 0
  for a in arrays:
    out.append(pruned[offset:offset + a.size].reshape(a.shape))
    offset += a.size
  return out


def unit_keep(unit_scores: np.ndarray, sparsity: float) -> np.ndarray:
  """Keep-mask over units (one score each) pruning round(s * units)."""
  k = round(sparsity * unit_scores.size)
  return ~prune_lowest([unit_scores], k)[0]


def nm_keep(x: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
  """Keep the n best of every m consecutive entries along axis (ties: earlier entry kept)."""
  x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
  keep = np.zeros(x.shape, bool)
  for idx in np.ndindex(x.shape[:-1]):
    for g in range(x.shape[-1] // m):
      group = x[idx][g * m:(g + 1) * m]
      order = prune_order(group)  # worst first
      kept = order[m - n:] if n else []
      row = keep[idx]
      for j in kept:
        row[g * m + j] = True
  return np.moveaxis(keep, -1, axis)
