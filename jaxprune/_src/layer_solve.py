"""One kernel pruned in its ``(inputs, outputs)`` view by a named method, and stacked slices.

`solve_layer` dispatches to the layer solvers (`obc`, `sparsegpt`, masks with an optional
`refit`) with the library's own selection for masks; `slices` and `slice_counts` treat a kernel
stacked along a ``scan`` as one layer per slice. Shared by `oneshot` and its allocations.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxprune._src import masks as masks_lib
from jaxprune._src import obc as obc_lib
from jaxprune._src import obs as obs_lib
from jaxprune._src import refit as refit_lib
from jaxprune._src import sparsegpt as sparsegpt_lib

METHODS = ("magnitude", "wanda", "sparsegpt", "obc")


def slices(x: Optional[jax.Array], site: Any) -> Optional[jax.Array]:
  """A kernel-shaped calibration array with a leading axis of layers (one for an unstacked
  kernel, one per slice of a kernel stacked along a scan)."""
  return x if x is None or site.loop_axes else x[None]


def slice_counts(total: int, slices: int) -> list[int]:
  """``total`` removals split over equal slices, exactly, by differences of rounded cumulative
  targets."""
  cum = [0] + [round(total * (k + 1) / slices) for k in range(slices)]
  return [b - a for a, b in zip(cum, cum[1:])]


def layer_mask(scores: jax.Array, sparsity: float, pattern: obs_lib.ParsedPattern) -> jax.Array:
  """The library's own selection on an ``(inputs, outputs)`` score matrix: exact counts, ties."""
  if pattern.kind == "none":
    return masks_lib.unstructured_mask(scores, sparsity)
  if pattern.kind == "nm":
    return masks_lib.nm_mask(scores, pattern.a, pattern.b, axis=0)
  return masks_lib.block_mask(scores, sparsity, (pattern.a, pattern.b), reduce=pattern.reduce)


def solve_layer(method: str, w: jax.Array, h: jax.Array, sparsity: float,
                pattern: obs_lib.Pattern = None, *, refit: bool = False, damp: float = 0.01,
                block_size: int = 128) -> tuple[jax.Array, jax.Array]:
  """Prunes one kernel in its ``(inputs, outputs)`` view with one of `METHODS`.

  Args:
    method: one of `METHODS`.
    w: ``(d_in, d_out)`` float32 kernel.
    h: ``(d_in, d_in)`` calibration Gram matrix ``XᵀX``.
    sparsity: fraction of the entries (or, with a block pattern, of the tiles) to prune.
    pattern: any spelling of `obs.parse_pattern`, resolved against ``w``'s shape.
    refit: least-squares refit of the kept weights after the mask is chosen.
    damp: relative dampening of ``h``.
    block_size: SparseGPT's column block.

  Returns:
    ``(w', mask)``, ``w'`` zero where the bool mask is False.
  """
  pattern = obs_lib.layer_pattern(pattern, jnp.shape(w))
  if method in ("magnitude", "wanda"):
    scores = jnp.abs(w) if method == "magnitude" else obs_lib.wanda(w, h)
    mask = layer_mask(scores, sparsity, pattern)
    w_new = refit_lib.refit(w, h, mask, damp=damp) if refit else jnp.where(mask, w, 0)
    return w_new, mask
  if method == "sparsegpt":
    w_new, mask = sparsegpt_lib.sparsegpt(w, h, sparsity, pattern=pattern, block_size=block_size,
                                          damp=damp)
  else:
    w_new, mask = obc_lib.obc(w, h, sparsity, pattern=pattern, damp=damp)
  if refit:
    w_new = refit_lib.refit(w, h, mask, damp=damp)
  return jnp.where(mask, w_new, 0), mask


__all__ = ["METHODS", "layer_mask", "slice_counts", "slices", "solve_layer"]
