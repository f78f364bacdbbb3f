"""Getting pruned parameters out: sparse arrays and compressed checkpoints.

(Dense parameters with exact zeros come from `jaxprune.apply_masks`, given masks or the optax
state holding them.)
* `compact` turns prunable leaves into `jax.experimental.sparse` arrays (BCSR for 2-D kernels,
  BCOO otherwise) when that takes fewer bytes than the dense leaf; `sparse_matmul` multiplies
  an activation by a dense or sparse kernel; `densify` goes back.
* `save_compressed` / `load_compressed` write a ``.npz`` holding, for each prunable leaf that
  pays, its kept values and a packed bitmask (``np.packbits``), and the other leaves dense. No
  pickle is involved: metadata is JSON and values are raw bytes, so bfloat16 and other ml_dtypes
  round-trip bitwise.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from jaxprune._src import masks as masks_lib
from jaxprune._src import quantize as quantize_lib
from jaxprune._src import report as report_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Prunable, PyTree

SparseArray = Union[sparse.BCSR, sparse.BCOO]

_FORMAT_NAME = "jaxprune"
_FORMAT_VERSION = 1


# Jitted once per shape: eager BCSR/BCOO conversion dispatches dozens of small ops.
_FROMDENSE = {
    cls: jax.jit(cls.fromdense, static_argnames=("nse", "index_dtype"))
    for cls in (sparse.BCSR, sparse.BCOO)
}
_TODENSE = jax.jit(lambda x: x.todense())


def _is_sparse(x: Any) -> bool:
  return isinstance(x, (sparse.BCSR, sparse.BCOO))


def _sparse_bytes(x: SparseArray) -> int:
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(x))


def compact(params: PyTree, masks: Optional[PyTree] = None, *,
            prunable: Prunable = None, min_saving: float = 0.0) -> PyTree:
  """Replaces prunable leaves by sparse arrays where that takes fewer bytes.

  A 2-D leaf becomes a ``BCSR`` (values, int32 column indices, int32 row pointers), any other
  rank a ``BCOO`` (values and one int32 index per dim); ``nse`` is the number of kept entries.
  The leaf is converted only when the sparse arrays take fewer than ``(1 - min_saving)`` times
  the dense bytes.

  Examples:
    A ``4 × 4`` kernel with 4 nonzeros takes 52 bytes as BCSR instead of 64; the bias stays dense:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": 2 * jnp.eye(4), "b": jnp.ones(4)}
    >>> small = jp.compress.compact(params)
    >>> type(small["w"]).__name__, small["w"].nse
    ('BCSR', 4)
    >>> jp.compress.compact_bytes(params), jp.compress.compact_bytes(small)
    (80, 68)

  Args:
    params: parameter pytree (concrete).
    masks: optional masks; pruned entries are zeroed first (`jaxprune.apply_masks`).
    prunable: which leaves may be converted (see `jaxprune.prunable_flags`).
    min_saving: fraction of the dense bytes a conversion must save.

  Returns:
    The tree with some leaves replaced by ``jax.experimental.sparse`` arrays.
  """
  validation.check_fraction(min_saving, "min_saving", allow_traced=False)
  params = (jax.tree.map(jnp.asarray, params) if masks is None
            else masks_lib.apply_masks(params, masks))
  flags = tree_lib.prunable_flags(params, prunable)

  def convert(leaf, flag):
    if not flag or np.ndim(leaf) == 0:
      return leaf
    nse = int(np.count_nonzero(np.asarray(leaf)))
    cls = sparse.BCSR if np.ndim(leaf) == 2 else sparse.BCOO
    itemsize = np.dtype(leaf.dtype).itemsize
    # Predicted from the formats' layouts so that nothing is materialised when it does not pay:
    # BCSR is the report's CSR layout; BCOO stores one int32 index per dimension per entry.
    predicted = (report_lib.leaf_bytes(leaf.shape, itemsize, nse)[2] if cls is sparse.BCSR else
                 nse * (itemsize + 4 * np.ndim(leaf)))
    if predicted >= (1.0 - min_saving) * leaf.size * itemsize:
      return leaf
    return _FROMDENSE[cls](leaf, nse=nse, index_dtype=jnp.int32)

  return jax.tree.map(convert, params, flags)


def densify(tree: PyTree) -> PyTree:
  """Inverse of `compact`: every sparse leaf back to a dense array.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": 2 * jnp.eye(4), "b": jnp.ones(4)}
    >>> dense = jp.compress.densify(jp.compress.compact(params))
    >>> type(dense["w"]).__name__, bool((dense["w"] == params["w"]).all())
    ('ArrayImpl', True)
  """
  return jax.tree.map(lambda x: _TODENSE(x) if _is_sparse(x) else x, tree, is_leaf=_is_sparse)


def compact_bytes(tree: PyTree) -> int:
  """Bytes of a (partly) compacted tree: data and index buffers of sparse leaves, dense bytes
  of the others.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": 2 * jnp.eye(4), "b": jnp.ones(4)}   # 64 + 16 bytes dense
    >>> jp.compress.compact_bytes(params), jp.compress.compact_bytes(jp.compress.compact(params))
    (80, 68)
  """
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=_is_sparse):
    total += _sparse_bytes(x) if _is_sparse(x) else int(np.size(x)) * np.dtype(x.dtype).itemsize
  return total


def sparse_matmul(x: jax.Array, kernel: Union[jax.Array, SparseArray]) -> jax.Array:
  """``x @ kernel`` for a dense, ``BCSR`` or ``BCOO`` kernel of shape ``(in, out)``.

  ``BCSR`` only multiplies as the left operand, so the product is computed as
  ``(kernel^T x^T)^T`` by contracting the kernel's dim 0 with the last dim of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> kernel = jp.compress.compact({"w": 2 * jnp.eye(4)})["w"]   # BCSR
    >>> jp.compress.sparse_matmul(jnp.array([[1.0, 2.0, 3.0, 4.0]]), kernel).tolist()
    [[2.0, 4.0, 6.0, 8.0]]

  Args:
    x: activations ``(..., in)``.
    kernel: ``(in, out)`` weights.

  Returns:
    ``(..., out)``.
  """
  if isinstance(kernel, sparse.BCSR):
    out = sparse.bcsr_dot_general(kernel, x, dimension_numbers=(([0], [x.ndim - 1]), ([], [])))
    return jnp.moveaxis(out, 0, -1)
  return x @ kernel


# --- compressed checkpoints -------------------------------------------------------------------


class _NotACheckpoint(Exception):
  """Raised inside `load_compressed` for any sign that the file is not one of ours."""


def _raw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def _dtype_key(dtype: np.dtype, path: str) -> str:
  """How a leaf's dtype is written: numpy's ``str`` (byte order included) for numpy's own
  numeric types, the name for ml_dtypes types (bfloat16, float8_*, int4...)."""
  if dtype.kind in "biufc":
    return dtype.str
  if dtype.kind == "V" and dtype.names is None:
    try:
      if jnp.dtype(dtype.name) == dtype:
        return dtype.name
    except TypeError:
      pass
  raise validation.error("params", "numeric or bool arrays",
                         validation.Text(f"dtype {dtype}"), path)


def _dtype(key: str) -> np.dtype:
  try:
    return np.dtype(key)
  except TypeError:
    return jnp.dtype(key)


def _loaded(x: np.ndarray) -> Union[jax.Array, np.ndarray]:
  """A JAX array when JAX holds ``x``'s dtype as is; the numpy array otherwise (64-bit types
  without ``jax_enable_x64``, non-native byte order), so no value is narrowed or reordered."""
  if x.dtype.isnative and jax.dtypes.canonicalize_dtype(x.dtype) == x.dtype:
    return jnp.asarray(x)
  return x


def save_compressed(path: Union[str, os.PathLike], params: PyTree,
                    masks: Optional[PyTree] = None, *,
                    prunable: Prunable = None) -> int:
  """Writes a compressed ``.npz`` checkpoint and returns its size on disk in bytes.

  Each prunable leaf whose bitmask form is smaller than its dense form is stored as the kept
  values (row-major) plus ``np.packbits`` of its mask (True = kept; from ``masks`` or, without
  masks, its nonzero entries); every other leaf is stored dense. Quantized leaves
  (`QuantizedArray`, from `jaxprune.compress.quantize`) are stored the same way with int8 values,
  plus their float32 scales, so pruning and quantization compound. The archive is not
  zip-compressed, so its size tracks the bitmask byte count of `jaxprune.report` plus a fixed
  per-entry overhead. Values are stored as raw bytes with their exact dtype (every numeric numpy
  dtype, byte order included, and the ml_dtypes types), so they load bitwise.

  Examples:
    >>> import os, tempfile, numpy as np, jaxprune as jp
    >>> params = {"w": 2 * np.eye(4, dtype=np.float32), "b": np.ones(4, np.float32)}
    >>> path = os.path.join(tempfile.mkdtemp(), "pruned.npz")
    >>> nbytes = jp.compress.save_compressed(path, params)   # w as 4 values + a 2-byte bitmask
    >>> nbytes == os.path.getsize(path)
    True
    >>> loaded = jp.compress.load_compressed(path, like=params)
    >>> np.array_equal(loaded["w"], params["w"])
    True

  Args:
    path: file path (``.npz`` is appended by numpy when missing).
    params: parameter pytree (concrete arrays), possibly with `QuantizedArray` leaves.
    masks: optional bool masks (True = keep; one per array or per `QuantizedArray`); pruned
      entries are not stored.
    prunable: which float leaves may be stored sparse (quantized leaves always may).

  Returns:
    Bytes of the written file.

  Raises:
    ValueError: naming the leaf, for a traced leaf, a non-numeric dtype (strings, objects,
      dates), or masks that do not match ``params`` or are not bool.
  """
  with_paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=quantize_lib.is_quantized)[0]
  # The same tree with each quantized leaf replaced by its int8 values: masks and the prunable
  # rule refer to it.
  plain = jax.tree.map(lambda x: x.values if quantize_lib.is_quantized(x) else x, params,
                       is_leaf=quantize_lib.is_quantized)
  if masks is not None:
    tree_lib.check_same_structure(plain, masks, "params", "masks")
    for p, m in tree_lib.leaves_with_paths(masks):
      if getattr(m, "dtype", None) != np.bool_:
        raise validation.error("masks", "bool arrays (True = keep)", validation.describe(m), p)
  flags = jax.tree.leaves(tree_lib.prunable_flags(plain, prunable))
  mask_leaves = jax.tree.leaves(masks) if masks is not None else [None] * len(with_paths)
  arrays: dict[str, np.ndarray] = {}
  meta = []
  for i, ((p, leaf), flag, mask) in enumerate(zip(with_paths, flags, mask_leaves)):
    quantized = quantize_lib.is_quantized(leaf)
    path_name = tree_lib.path_str(p)
    value = leaf.values if quantized else leaf
    if validation.is_traced(value):
      raise validation.error("params", "concrete arrays (checkpoints are written outside jit)",
                             validation.Text("a traced value"), path_name)
    x = np.asarray(value)
    entry = {"path": path_name, "shape": list(x.shape), "dtype": _dtype_key(x.dtype, path_name)}
    if quantized:
      scale = np.asarray(leaf.scale, np.float32)
      entry["scale_shape"] = list(scale.shape)
      arrays[f"{i}.scale"] = _raw(scale)
    keep = (np.asarray(mask, bool) if mask is not None else x != 0) if flag or quantized else None
    if keep is not None:
      kept = int(np.count_nonzero(keep))
      _, bitmask, _ = report_lib.leaf_bytes(x.shape, x.dtype.itemsize, kept)
    if keep is not None and bitmask < x.nbytes:
      entry["format"] = "bitmask"
      arrays[f"{i}.values"] = _raw(x[keep])
      arrays[f"{i}.mask"] = np.packbits(keep.reshape(-1))
    else:
      entry["format"] = "dense"
      arrays[f"{i}.dense"] = _raw(x)
    meta.append(entry)
  header = {"format": _FORMAT_NAME, "version": _FORMAT_VERSION, "leaves": meta}
  arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  path = os.fspath(path)
  if not path.endswith(".npz"):
    path += ".npz"
  np.savez(path, **arrays)
  return os.path.getsize(path)


def _entry(f: Any, name: str) -> np.ndarray:
  """One raw byte array of the archive."""
  if name not in f.files:
    raise _NotACheckpoint(f"it has no {name} entry")
  try:
    x = f[name]
  except ValueError as e:  # numpy refuses pickled object arrays under allow_pickle=False
    raise _NotACheckpoint(f"its {name} entry cannot be read: {e}") from None
  if x.dtype != np.uint8 or x.ndim != 1:
    raise _NotACheckpoint(f"its {name} entry is not raw bytes")
  return x


def _read_leaves(f: Any) -> dict[str, Any]:
  """``{path: array or QuantizedArray}`` from an open archive; `_NotACheckpoint` otherwise."""
  header = json.loads(_entry(f, "__meta__").tobytes().decode())
  if not isinstance(header, dict) or not isinstance(header.get("leaves"), list):
    raise _NotACheckpoint("its header lists no leaves")
  if header.get("version") != _FORMAT_VERSION:
    raise _NotACheckpoint(f"its format version is {header.get('version')!r}; this jaxprune "
                          f"reads version {_FORMAT_VERSION}")
  out = {}
  for i, entry in enumerate(header["leaves"]):
    dtype = _dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    if entry["format"] == "bitmask":
      n = int(np.prod(shape))
      keep = np.unpackbits(_entry(f, f"{i}.mask"), count=n).astype(bool)
      x = np.zeros(n, dtype)
      x[keep] = _entry(f, f"{i}.values").view(dtype)
      x = x.reshape(shape)
    else:
      x = _entry(f, f"{i}.dense").view(dtype).reshape(shape)
    x = _loaded(x)
    if "scale_shape" in entry:
      scale = _entry(f, f"{i}.scale").view(np.float32).reshape(entry["scale_shape"])
      x = quantize_lib.QuantizedArray(values=x, scale=jnp.asarray(scale))
    out[entry["path"]] = x
  return out


def load_compressed(path: Union[str, os.PathLike], like: Optional[PyTree] = None) -> PyTree:
  """Reads a checkpoint written by `save_compressed`.

  Examples:
    >>> import os, tempfile, numpy as np, jaxprune as jp
    >>> params = {"w": 2 * np.eye(4, dtype=np.float32), "b": np.ones(4, np.float32)}
    >>> path = os.path.join(tempfile.mkdtemp(), "pruned.npz")
    >>> _ = jp.compress.save_compressed(path, params)
    >>> loaded = jp.compress.load_compressed(path)   # without like=: keyed by leaf path
    >>> sorted(loaded), loaded["['w']"].tolist()[1]
    (["['b']", "['w']"], [0.0, 2.0, 0.0, 0.0])

  Args:
    path: the ``.npz`` file (``.npz`` is appended when the path without it does not exist).
    like: optional pytree whose structure (and leaf paths) the result takes; its leaves are not
      read. Without it, a ``{path string: array}`` dict is returned.

  Returns:
    The parameters, pruned entries as (+0) zeros, kept entries bitwise as saved, in their saved
    dtype: JAX arrays, or numpy arrays for dtypes JAX would narrow (float64 / int64 without
    ``jax_enable_x64``) or byte-swap; quantized leaves come back as `QuantizedArray`.

  Raises:
    FileNotFoundError: when there is no such file.
    ValueError: when the file is not a jaxprune checkpoint (another ``.npz``, a ``.npy``, a
      pickle, a truncated file...), or does not match ``like`` (names the leaf).
  """
  path = os.fspath(path)
  if not os.path.exists(path) and os.path.exists(path + ".npz"):
    path += ".npz"
  # Opened here, not by np.load, so that the file is closed whatever np.load makes of it.
  with open(path, "rb") as fh:
    try:
      if fh.read(4) != b"PK\x03\x04":
        raise _NotACheckpoint("it is not an .npz archive")
      fh.seek(0)
      with np.load(fh, allow_pickle=False) as f:
        out = _read_leaves(f)
    except (_NotACheckpoint, KeyError, IndexError, TypeError, ValueError, OSError, EOFError,
            zipfile.BadZipFile) as e:  # ValueError covers JSON and Unicode decoding errors
      raise ValueError(f"path: expected a jaxprune checkpoint written by save_compressed, got "
                       f"{path!r}, which is not one ({e}).") from None
  if like is None:
    return out
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(
      like, is_leaf=quantize_lib.is_quantized)
  paths = [tree_lib.path_str(p) for p, _ in with_paths]
  missing = [p for p in paths if p not in out]
  if missing or len(paths) != len(out):
    extra = [p for p in out if p not in set(paths)]
    raise ValueError(
        "like: expected the tree the checkpoint was saved from; "
        + (f"leaf {missing[0]} is not in the checkpoint" if missing
           else f"checkpoint leaf {extra[0]} is not in like") + ".")
  for p, (_, leaf) in zip(paths, with_paths):
    got = out[p].values.shape if quantize_lib.is_quantized(out[p]) else out[p].shape
    want = leaf.values.shape if quantize_lib.is_quantized(leaf) else np.shape(leaf)
    if tuple(want) != tuple(got):
      raise ValueError(f"like: leaf {p} has shape {tuple(want)}, the checkpoint has "
                       f"{tuple(got)}.")
  return jax.tree.unflatten(treedef, [out[p] for p in paths])
