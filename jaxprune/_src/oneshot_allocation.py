"""How `oneshot` splits a sparsity over kernels: per-layer fractions from a pattern, a global
ranking (magnitude, Wanda scores or output OBD saliencies, counted on the host), the layers'
output-weighted OBS error curves, uniform, or given per leaf.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import allocation as allocation_lib
from jaxprune._src import calibration as calib_lib
from jaxprune._src import gauss_newton
from jaxprune._src import interpret
from jaxprune._src import layer_solve
from jaxprune._src import obc as obc_lib
from jaxprune._src import obs as obs_lib
from jaxprune._src import select as select_lib
from jaxprune._src import sparsegpt as sparsegpt_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import PyTree

ALLOCATIONS = ("global", "wanda", "obd", "obs", "uniform")
RANKED = ("wanda", "obd")


def layer_sparsities(params: PyTree, paths: Sequence[str], sparsity: Any,
                      pattern: obs_lib.ParsedPattern, allocation: Any,
                      ranking: Callable[[str], Mapping[str, Any]]) -> dict[str, float]:
  """Per-kernel sparsities: from the pattern, one ranking over all kernels (``ranking(name)``
  gives ``{path: scores}`` of the allocations in `RANKED`), or given per leaf."""
  leaves = dict(tree_lib.leaves_with_paths(params))
  if pattern.kind == "nm":
    obs_lib.check_nm_sparsity(sparsity, pattern)
    return {p: obs_lib.nm_sparsity(pattern) for p in paths}
  if isinstance(allocation, Mapping):
    missing = [p for p in paths if p not in allocation]
    if missing:
      raise validation.error("allocation", "a sparsity for every pruned kernel", "none",
                             missing[0])
    return {p: validation.check_fraction(allocation[p], "allocation", p) for p in paths}
  sparsity = validation.check_fraction(sparsity, "sparsity", allow_traced=False)
  if allocation == "uniform":
    return {p: sparsity for p in paths}
  if allocation == "global" or allocation in RANKED:
    # Exactly round(s·N) over all pruned kernels, by magnitude or a calibrated score: the layer
    # sizes this picks are what the per-layer solvers then reach exactly.
    ranked = leaves if allocation == "global" else ranking(allocation)
    pruned = global_counts([np.abs(np.asarray(jax.device_get(ranked[p]), np.float32))
                            for p in paths], select_lib.num_to_prune(
                                sparsity, sum(leaves[p].size for p in paths)))
    return {p: k / leaves[p].size for p, k in zip(paths, pruned)}
  raise AssertionError(allocation)


def global_counts(scores: Sequence[np.ndarray], total: int) -> list[int]:
  """How many entries of each array one global ranking prunes, host side.

  The counts of `jaxprune.unstructured_mask` with ``scope="global"``: the ``total`` lowest
  scores over all arrays, NaN lowest, ties pruned from the last position of the concatenation
  backwards. One partition over the concatenated scores, no compiled program: the allocation
  needs only the counts, and a selection program over every kernel of a large model takes
  longer to compile than the ranking takes to run.

  Args:
    scores: float32 arrays.
    total: the number of entries to prune, ``0 <= total <= Σ size``.

  Returns:
    Per array, its number of pruned entries (summing to ``total``).
  """
  flat = [np.where(np.isnan(s), -np.inf, s).ravel() for s in scores]
  if total == 0:
    return [0] * len(flat)
  threshold = np.partition(np.concatenate(flat), total - 1)[total - 1]
  counts = [int(np.sum(f < threshold)) for f in flat]
  left = total - sum(counts)
  for i in reversed(range(len(flat))):  # ties at the threshold: later positions first
    take = min(left, int(np.sum(flat[i] == threshold)))
    counts[i] += take
    left -= take
  return counts


OBS_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def obs_allocation(calibrator: calib_lib.Calibrator, params: PyTree, batches: list,
                    sites: Mapping[str, Any], sparsity: float, method: str,
                    patterns: Mapping[str, obs_lib.ParsedPattern], refit: bool, damp: float,
                    block_size: int) -> dict[str, float]:
  """Per-kernel sparsities minimising the predicted change of the model's outputs.

  Each kernel's reconstruction error ``‖ΔY‖²`` is measured with the method's own solver on the
  dense model's calibration inputs at the sparsities of `OBS_GRID`, and weighted by how much
  that kernel's outputs move the model's outputs (`gauss_newton.output_sensitivity` per
  position and output feature), which puts every kernel's error in the same unit: the expected
  squared change of the outputs. The allocation then takes the cheapest change per pruned entry
  first over the curves' lower convex hulls (the equal-slope solution of
  `jaxprune.allocate_sparsities`), with exactly ``round(s·N)`` entries.

  References: Hassibi & Stork, 1993 (the OBS error); Frantar & Alistarh, "Optimal Brain
  Compression", 2022 (allocating sparsity over per-layer OBS errors).
  """
  leaves = dict(tree_lib.leaves_with_paths(params))
  paths = list(sites)
  cal = calibrator(params, batches, kernels=paths)
  sensitivity = gauss_newton.output_sensitivity(calibrator.apply_fn, params, batches, paths)
  grid = np.asarray(OBS_GRID)
  curves, sizes = [], []
  for path in paths:
    site = sites[path]
    ws = layer_solve.slices(interpret.to_matrix(leaves[path], site).astype(jnp.float32), site)
    positions = float(np.sum(jax.device_get(cal[path].count)))
    weight = sensitivity[path] / max(positions * ws.shape[-1], 1e-30)
    errors = np.zeros(len(grid))
    for w, h in zip(ws, layer_solve.slices(cal[path].h, site)):  # a stacked kernel's slices add up
      if method == "obc" and not refit:
        path_ = obc_lib.obc_path(w, h, pattern=patterns[path], damp=damp)
        errors += np.asarray(obc_lib.obc_losses(path_, grid))
      elif method == "sparsegpt" and not refit:
        errors[1:] += np.asarray(sparsegpt_lib.sparsegpt_losses(
            w, h, grid[1:], pattern=patterns[path], block_size=block_size, damp=damp))
      else:
        errors[1:] += [float(obs_lib.layer_loss(w, layer_solve.solve_layer(
            method, w, h, float(s), patterns[path], refit=refit, damp=damp,
            block_size=block_size)[0], h)) for s in grid[1:]]
    curves.append((grid, np.maximum.accumulate(errors * weight)))
    sizes.append(int(leaves[path].size))
  total = sum(sizes)
  counts = allocation_lib.solve_counts(curves, sizes, [1.0] * len(sizes),
                                       float(round(sparsity * total)), paths)
  return {p: k / n for p, k, n in zip(paths, counts, sizes)}


__all__ = [
    "ALLOCATIONS", "OBS_GRID", "RANKED", "global_counts", "layer_sparsities", "obs_allocation",
]
