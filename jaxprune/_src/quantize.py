"""Int8 quantization of pruned weights: per-channel symmetric scales, zeros stay zeros.

For a channel (a slice along ``axis``, by default the output axis of a Flax kernel) with largest
magnitude ``a``, the scale is ``s = a / 127`` and ``q = clip(round(w / s), -127, 127)``; the
dequantized ``q * s`` is within ``s / 2`` of ``w`` (half an integer step), so the relative error
against the channel's range is at most ``1 / 254``. ``round(0) = 0``, so pruned weights remain
exact zeros and a bitmask still describes the sparsity. The symmetric range omits -128 so that
``q`` and ``-q`` are both representable.

References:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
  Only Inference", CVPR 2018 (affine/symmetric int8 scheme).
  Han et al., "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
  Quantization and Huffman Coding", ICLR 2016 (pruning followed by quantization).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import report as report_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, Prunable, PyTree

_QMAX = 127


class QuantizedArray(NamedTuple):
  """An int8 array with per-channel float32 scales; ``values * scale`` approximates the weight.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> q = jp.compress.QuantizedArray(values=np.array([[127, -32], [64, 127]], np.int8),
    ...                                scale=np.array([[1 / 127, 2 / 127]], np.float32))
    >>> q.values.shape, q.scale.shape   # one scale per column (as quantize_array makes it)
    ((2, 2), (1, 2))

  Attributes:
    values: int8, the leaf's shape.
    scale: float32, the leaf's rank with size 1 on every axis but the channel axis.
  """
  values: jax.Array
  scale: jax.Array


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a `QuantizedArray` (an ``is_leaf`` for trees holding them)."""
  return isinstance(x, QuantizedArray)


def _check_finite(x: Array, name: str, path: Optional[str] = None) -> None:
  """Refuses concrete non-finite values: int8 cannot hold them, and a channel's scale taken
  over an inf would round every finite value of the channel to 0."""
  if validation.is_traced(x) or x.size == 0:
    return
  bad = ~np.isfinite(np.asarray(x))
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise validation.error(name, "finite values to quantize (int8 has no inf or NaN)",
                           validation.Text(f"{np.asarray(x)[index]} at index {index}"), path)


def quantize_array(x: jax.Array, axis: int = -1) -> QuantizedArray:
  """Per-channel symmetric int8 quantization of one array (channels along ``axis``).

  Examples:
    Column scales are ``max |x| / 127``: ``1/127`` and ``2/127`` here.

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> q = jp.compress.quantize_array(jnp.array([[1.0, -0.5], [0.5, 2.0]]))
    >>> q.values.tolist()
    [[127, -32], [64, 127]]

  Args:
    x: floating array with ``ndim >= 1`` (possibly empty); concrete values must be finite.
    axis: channel axis; each slice along it gets its own scale.

  Returns:
    A `QuantizedArray`. An all-zero (or empty) channel gets scale 1 (its values are 0). Under
    `jax.jit`, where values cannot be checked, the scales come from the finite entries only,
    so finite values keep their precision; ``±inf`` saturates to ``±127`` and NaN becomes 0.

  Raises:
    ValueError: for a 0-d or non-floating ``x``, an ``axis`` out of range, or a concrete
      ``x`` holding inf or NaN (the message gives the first such index).
  """
  if not tree_lib.is_floating(x):
    raise validation.error("x", "a floating-point array",
                           validation.Text(f"dtype {getattr(x, 'dtype', type(x).__name__)}"))
  if np.ndim(x) == 0:
    raise validation.error("x", "an array with ndim >= 1 (channels along axis)",
                           validation.Text("a 0-d array"))
  axis = validation.normalize_axis(axis, np.ndim(x))
  _check_finite(x, "x")
  return _quantize(x, axis)


def _quantize(x: Array, axis: int) -> QuantizedArray:
  x = jnp.asarray(x, jnp.float32)
  reduce_axes = tuple(d for d in range(x.ndim) if d != axis)
  finite = jnp.isfinite(x)
  amax = jnp.max(jnp.where(finite, jnp.abs(x), 0.0), axis=reduce_axes, keepdims=True,
                 initial=0.0)
  scale = jnp.where(amax > 0, amax / _QMAX, 1.0).astype(jnp.float32)
  q = jnp.clip(jnp.round(jnp.where(jnp.isnan(x), 0.0, x) / scale), -_QMAX, _QMAX)
  return QuantizedArray(values=q.astype(jnp.int8), scale=scale)


def dequantize_array(q: QuantizedArray, dtype: Any = jnp.float32) -> jax.Array:
  """``values * scale`` in ``dtype``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> q = jp.compress.quantize_array(jnp.array([[1.0, -0.5], [0.5, 2.0]]))
    >>> [[round(float(v), 4) for v in row] for row in jp.compress.dequantize_array(q)]
    [[1.0, -0.5039], [0.5039, 2.0]]

  Args:
    q: a `QuantizedArray`.
    dtype: the floating dtype of the result.

  Returns:
    The dequantized array.
  """
  if not is_quantized(q):
    raise validation.error("q", "a QuantizedArray", validation.Text(type(q).__name__))
  return (q.values.astype(jnp.float32) * q.scale).astype(dtype)


def quantize(params: PyTree, *, axis: int = -1, prunable: Prunable = None) -> PyTree:
  """Quantizes every prunable leaf to a `QuantizedArray`; other leaves are returned unchanged.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -0.5], [0.5, 2.0]]), "b": jnp.ones(2)}
    >>> qparams = jp.compress.quantize(params)   # the bias is not prunable: left as is
    >>> type(qparams["w"]).__name__, qparams["w"].values.tolist(), qparams["b"].tolist()
    ('QuantizedArray', [[127, -32], [64, 127]], [1.0, 1.0])

  Args:
    params: parameter pytree (apply masks first with `jaxprune.apply_masks`, so pruned weights
      are 0).
    axis: channel axis of the per-channel scales (-1: output features of Flax kernels).
    prunable: which leaves to quantize (see `jaxprune.prunable_flags`). Leaves with ``ndim``
      below 1 are never quantized; empty leaves become empty `QuantizedArray` s.

  Returns:
    The tree with quantized leaves; `dequantize` inverts it up to the rounding error.

  Raises:
    ValueError: naming the leaf, for a prunable leaf that is not floating, an ``axis`` out of
      its range, or concrete inf / NaN values in it (int8 cannot keep them, and refusing keeps
      them from wiping out the finite values of their channel).
  """
  validation.check_int(axis, "axis")
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  out = []
  for (path, leaf), flag in zip(tree_lib.leaves_with_paths(params), flags):
    if not flag or np.ndim(leaf) == 0:
      out.append(leaf)
      continue
    if not tree_lib.is_floating(leaf):
      raise validation.error("params", "floating-point prunable leaves",
                             validation.Text(f"dtype {getattr(leaf, 'dtype', '?')}"), path)
    leaf_axis = validation.normalize_axis(axis, np.ndim(leaf), "axis", path)
    _check_finite(leaf, "params", path)
    out.append(_quantize(leaf, leaf_axis))
  return jax.tree.unflatten(jax.tree.structure(params), out)


def dequantize(qparams: PyTree, like: Optional[PyTree] = None) -> PyTree:
  """Float parameters from a `quantize`d tree.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -0.5], [0.5, 2.0]]), "b": jnp.ones(2)}
    >>> restored = jp.compress.dequantize(jp.compress.quantize(params))
    >>> float(jnp.max(jnp.abs(restored["w"] - params["w"])))   # half a step of column 0
    0.0039370059967041016

  Args:
    qparams: output of `quantize`.
    like: optional original tree; dequantized leaves take its dtypes (float32 otherwise).

  Returns:
    The parameter tree with every `QuantizedArray` replaced by ``values * scale``.
  """
  if like is None:
    return jax.tree.map(lambda x: dequantize_array(x) if is_quantized(x) else x, qparams,
                        is_leaf=is_quantized)
  plain = jax.tree.map(lambda x: x.values if is_quantized(x) else x, qparams,
                       is_leaf=is_quantized)
  tree_lib.check_same_structure(like, plain, "like", "qparams")
  return jax.tree.map(
      lambda x, ref: dequantize_array(x, ref.dtype) if is_quantized(x) else x,
      qparams, like, is_leaf=is_quantized)


def quantization_error(params: PyTree, qparams: PyTree) -> dict[str, float]:
  """What quantization cost: errors and int8 storage, as logger scalars.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -0.5], [0.5, 2.0]]), "b": jnp.ones(2)}
    >>> err = jp.compress.quantization_error(params, jp.compress.quantize(params))
    >>> round(err["quant/max_rel"], 5), err["bytes/int8_dense"]   # 4 + 2·4 + 8 bytes
    (0.00197, 20.0)

  Args:
    params: the float parameters that were quantized.
    qparams: ``quantize(params, ...)``.

  Returns:
    ``{'quant/max_abs': ..., 'quant/max_rel': ..., 'quant/max_abs/<leaf>': ...,
    'quant/max_rel/<leaf>': ..., 'bytes/int8_dense': ..., 'bytes/int8_bitmask': ...}``;
    ``max_rel`` is the largest absolute error over the largest magnitude of the leaf (at most
    1/254 up to float rounding). Int8 bytes count one byte per kept value (or per entry),
    ``ceil(n / 8)`` mask bytes, four bytes per scale and the dense bytes of unquantized leaves.
  """
  out: dict[str, float] = {}
  max_abs = max_rel = 0.0
  dense_bytes = bitmask_bytes = 0
  flat_q = jax.tree.leaves(qparams, is_leaf=is_quantized)
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  plain = jax.tree.map(lambda x: x.values if is_quantized(x) else x, qparams,
                       is_leaf=is_quantized)
  tree_lib.check_same_structure(params, plain, "params", "qparams")
  for (p, x), q in zip(with_paths, flat_q):
    x = np.asarray(x)
    if not is_quantized(q):
      dense_bytes += x.nbytes
      bitmask_bytes += x.nbytes
      continue
    err = np.abs(np.asarray(dequantize_array(q), np.float64) - x.astype(np.float64))
    leaf_abs = float(err.max(initial=0.0))
    amax = float(np.abs(x).max(initial=0.0))
    leaf_rel = leaf_abs / amax if amax > 0 else 0.0
    name = report_lib.log_name(p)
    out[f"quant/max_abs/{name}"] = leaf_abs
    out[f"quant/max_rel/{name}"] = leaf_rel
    max_abs, max_rel = max(max_abs, leaf_abs), max(max_rel, leaf_rel)
    scale_bytes = 4 * int(q.scale.size)
    kept = int(np.count_nonzero(np.asarray(q.values)))
    dense_bytes += x.size + scale_bytes
    bitmask_bytes += min(x.size, report_lib.leaf_bytes(x.shape, 1, kept)[1]) + scale_bytes
  out["quant/max_abs"] = max_abs
  out["quant/max_rel"] = max_rel
  out["bytes/int8_dense"] = float(dense_bytes)
  out["bytes/int8_bitmask"] = float(bitmask_bytes)
  return out
