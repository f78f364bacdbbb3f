"""Hardware presets: the sparsity pattern each kind of accelerator can actually exploit.

=====================  =======================================================================
preset                 pattern
=====================  =======================================================================
``"gpu_2:4"``          2 kept in every 4 consecutive weights along the input (reduction) axis,
                       ``axis=-2`` (axis 0 of a Flax ``(in, out)`` kernel, ``I`` of an ``HWIO``
                       filter; ``hardware_mask(..., axis=-1)`` for Equinox ``(out, in)``
                       weights): the layout of NVIDIA Ampere+ sparse tensor cores
                       (cuSPARSELt), a fixed 50% sparsity, ~2x matmul throughput.
``"tpu_8x128"``        whole ``(8, 128)`` blocks of the two trailing dims: one TPU vector
                       register tile (8 sublanes x 128 lanes), so skipped blocks skip whole
                       loads; block scores are L2 norms.
``"tpu_128x128"``      whole ``(128, 128)`` blocks: one pass of the 128x128 MXU systolic
                       array; a zero block is a matmul tile that can be skipped.
``"cpu_unstructured"``  unstructured layer-wise selection: no speed-up from dense BLAS, but
                       the best accuracy per byte for compressed storage (bitmask / CSR, see
                       `jaxprune.compress.save_compressed`) and for sparse CPU kernels.
=====================  =======================================================================

References:
  Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (arXiv:2104.08378): 2:4
  structured sparsity on NVIDIA Ampere.
  Google Cloud TPU documentation, "Performance guide": (8, 128) tiling of arrays and the
  128x128 MXU.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import numpy as np

from jaxprune._src import masks as masks_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Prunable, PyTree, Sparsity


class HardwarePreset(NamedTuple):
  """A sparsity pattern matched to hardware.

  Examples:
    A pattern of your own, 1 kept in every 4 inputs, used like a built-in preset:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> one_of_four = jp.HardwarePreset("1:4", "nm", n=1, m=4, axis=-2)
    >>> masks = jp.hardware_mask({"w": jnp.arange(8.0).reshape(4, 2)}, one_of_four)
    >>> masks["w"].tolist()
    [[False, False], [False, False], [False, False], [True, True]]

  Attributes:
    name: preset key.
    kind: ``"nm"``, ``"block"`` or ``"unstructured"``.
    n: kept per group (``"nm"``).
    m: group size (``"nm"``).
    axis: grouping axis (``"nm"``).
    block_shape: block of the trailing dims (``"block"``).
    description: one line on the target hardware.
  """
  name: str
  kind: str
  n: int = 0
  m: int = 0
  axis: int = -2
  block_shape: tuple[int, ...] = ()
  description: str = ""


PRESETS: dict[str, HardwarePreset] = {
    "gpu_2:4": HardwarePreset(
        "gpu_2:4", "nm", n=2, m=4, axis=-2,
        description="NVIDIA sparse tensor cores: 2 of 4 along the input axis (50%)."),
    "tpu_8x128": HardwarePreset(
        "tpu_8x128", "block", block_shape=(8, 128),
        description="TPU: whole (8, 128) vector-register tiles."),
    "tpu_128x128": HardwarePreset(
        "tpu_128x128", "block", block_shape=(128, 128),
        description="TPU: whole (128, 128) MXU tiles."),
    "cpu_unstructured": HardwarePreset(
        "cpu_unstructured", "unstructured",
        description="CPU / storage: unstructured, for bitmask or CSR compression."),
}
"""The hardware presets by name (exported as ``jaxprune.HARDWARE_PRESETS``).

* ``"gpu_2:4"``: 2 kept in every 4 consecutive weights along the input axis, the layout of
  NVIDIA sparse tensor cores (50 %).
* ``"tpu_8x128"``: whole ``(8, 128)`` blocks of the two trailing dims, one TPU vector-register
  tile.
* ``"tpu_128x128"``: whole ``(128, 128)`` blocks, one pass of the TPU matrix unit.
* ``"cpu_unstructured"``: unstructured, for bitmask or CSR storage and sparse CPU kernels.

Examples:
  >>> import jaxprune as jp
  >>> sorted(jp.HARDWARE_PRESETS)
  ['cpu_unstructured', 'gpu_2:4', 'tpu_128x128', 'tpu_8x128']
  >>> preset = jp.HARDWARE_PRESETS["gpu_2:4"]
  >>> preset.kind, preset.n, preset.m, preset.axis
  ('nm', 2, 4, -2)
"""


def _get(preset: str | HardwarePreset, axis: Optional[int] = None) -> HardwarePreset:
  if isinstance(preset, HardwarePreset):
    p = preset
  else:
    p = PRESETS[validation.check_choice(preset, sorted(PRESETS), "preset")]
  if axis is not None:
    if p.kind != "nm":
      raise validation.error("axis", f"None for the {p.kind} preset {p.name!r} (only N:M "
                             "presets group along an axis)", axis)
    p = p._replace(axis=validation.check_int(axis, "axis"))
  return p


def compatible(preset: str | HardwarePreset, shape: tuple[int, ...],
               axis: Optional[int] = None) -> bool:
  """Whether a leaf of ``shape`` can take the preset's pattern without partial groups/blocks.

  Args:
    preset: a key of `jaxprune.HARDWARE_PRESETS` or a `HardwarePreset`.
    shape: the leaf's shape.
    axis: for N:M presets, the grouping axis if not the preset's own (see `hardware_mask`).

  Returns:
    True when the pattern fits.
  """
  p = _get(preset, axis)
  if p.kind == "nm":
    return len(shape) >= 2 and -len(shape) <= p.axis < len(shape) and shape[p.axis] % p.m == 0
  if p.kind == "block":
    k = len(p.block_shape)
    return len(shape) >= k and all(d % b == 0 for d, b in zip(shape[-k:], p.block_shape))
  return True


def hardware_mask(scores: PyTree, preset: str | HardwarePreset, *,
                  sparsity: Optional[Sparsity] = None, scope: str = "layer",
                  prunable: Prunable = None, incompatible: str = "raise",
                  axis: Optional[int] = None) -> PyTree:
  """Masks in the pattern of a hardware preset (see `jaxprune.HARDWARE_PRESETS`).

  Examples:
    2:4 along the inputs (rows of an ``(in, out)`` kernel): each column keeps its 2 largest of 4.

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1.0, 4.0], [3.0, 2.0], [2.0, 1.0], [4.0, 3.0]])
    >>> masks = jp.hardware_mask(jp.magnitude({"w": w}), "gpu_2:4")
    >>> masks["w"].tolist()
    [[False, True], [True, False], [False, False], [True, True]]

  Args:
    scores: score pytree (higher = keep).
    preset: a key of `jaxprune.HARDWARE_PRESETS` or a `HardwarePreset`.
    sparsity: required for block and unstructured presets (as in `jaxprune.block_mask` /
      `jaxprune.unstructured_mask`); for ``"gpu_2:4"`` None or exactly ``1 - n/m``.
    scope: ``"layer"`` or ``"global"`` for block and unstructured presets.
    prunable: which leaves are pruned (see `jaxprune.prunable_flags`).
    incompatible: ``"raise"`` (a ValueError naming the leaf whose shape does not fit the
      pattern) or ``"dense"`` (such leaves are left unpruned).
    axis: for N:M presets, the input (reduction) axis of the kernels when it is not the
      preset's ``axis=-2`` of Flax's ``(in, out)`` layout: ``axis=-1`` for Equinox / PyTorch
      ``(out, in)`` weights.

  Returns:
    Bool masks with the structure of ``scores``.
  """
  p = _get(preset, axis)
  validation.check_choice(incompatible, ("raise", "dense"), "incompatible")
  flags = tree_lib.prunable_flags(scores, prunable)
  if p.kind != "unstructured":
    fixed = []
    for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(scores)[0],
                                  jax.tree.leaves(flags)):
      ok = compatible(p, tuple(np.shape(leaf)))
      if flag and not ok and incompatible == "raise":
        what = (f"axis {p.axis} divisible by {p.m}" if p.kind == "nm" else
                f"trailing dims divisible by {p.block_shape}")
        raise validation.error(
            "scores", f"a shape with {what} for preset {p.name!r} (or incompatible='dense')",
            validation.Text(f"shape {np.shape(leaf)}"), tree_lib.path_str(path))
      fixed.append(flag and ok)
    flags = jax.tree.unflatten(jax.tree.structure(scores), fixed)
  if p.kind == "nm":
    fixed_at = 1 - p.n / p.m
    if sparsity is not None and not np.isclose(
        validation.check_fraction(sparsity, "sparsity", allow_traced=False), fixed_at):
      raise validation.error("sparsity", f"None or {fixed_at} (fixed by preset {p.name!r})",
                             sparsity)
    return masks_lib.nm_mask(scores, p.n, p.m, axis=p.axis, prunable=flags)
  if sparsity is None:
    raise validation.error("sparsity", f"a fraction for preset {p.name!r}", None)
  if p.kind == "block":
    return masks_lib.block_mask(scores, sparsity, p.block_shape, reduce="l2", scope=scope,
                                prunable=flags)
  return masks_lib.unstructured_mask(scores, sparsity, scope=scope, prunable=flags)
