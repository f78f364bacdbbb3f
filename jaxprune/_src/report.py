"""What pruning bought: per-leaf counts, storage bytes and FLOPs, as a table or logger scalars.

Storage formats counted for every prunable leaf (non-prunable leaves are stored dense in all of
them):

* dense:   ``count * itemsize``.
* bitmask: the kept values plus one bit per entry, ``kept * itemsize + ceil(count / 8)``.
* CSR:     the kept values, one int32 column index per kept value and ``rows + 1`` int32 row
  pointers of the 2-D view whose rows are the leading dims flattened
  (``rows = prod(shape[:-1])``), i.e. ``kept * (itemsize + 4) + 4 * (rows + 1)``.

FLOPs. ``flops/dense`` is XLA's own count (``jax.jit(apply_fn).lower(...).compile()
.cost_analysis()['flops']``). The effective count is derived from the jaxpr of ``apply_fn``: each
``dot_general`` / ``conv_general_dilated`` whose weight operand is a parameter leaf (possibly cast,
reshaped or transposed, possibly inside ``pjit`` / ``scan`` / ``while`` / ``cond`` / ``remat`` /
custom-derivative calls; ``scan`` bodies count ``length`` times, ``while`` bodies once, like XLA)
is counted analytically (``2 * out_size * contraction_size``) and scaled by that leaf's density
``kept / count``; ``flops/effective = flops/dense - sum(leaf_flops * (1 - density))``. A sparse
kernel skips the multiply-adds of its zero weights, which is what this models; it is an upper
bound on what any real sparse kernel saves.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src.flops import matmul_flops_by_leaf, xla_flops
from jaxprune._src import mask_state
from jaxprune._src import validation
from jaxprune._src.types import PyTree

_INDEX_BYTES = 4  # int32 column indices and row pointers


class LeafReport(NamedTuple):
  """One row of a `Report`.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[0.0, -4.0, 0.0], [-3.0, 0.0, 6.0]]), "b": jnp.ones(3)}
    >>> row = jp.report(params).rows[1]
    >>> row.path, row.count, row.kept, row.dense_bytes, row.bitmask_bytes   # 3·4 + 1 bytes
    ("['w']", 6, 3, 24, 13)

  Attributes:
    path: key path string, e.g. ``['dense1']['kernel']``.
    shape: leaf shape.
    dtype: dtype name.
    prunable: whether the leaf is prunable (non-prunable leaves are counted fully kept).
    count: number of entries.
    kept: entries kept (mask True, or nonzero when no masks are given).
    sparsity: ``1 - kept / count``.
    dense_bytes: ``count * itemsize``.
    bitmask_bytes: ``kept * itemsize + ceil(count / 8)`` (``dense_bytes`` if not prunable).
    csr_bytes: ``kept * (itemsize + 4) + 4 * (rows + 1)`` (``dense_bytes`` if not prunable).
    flops_dense: analytic FLOPs of the matmuls/convs that use this leaf as weight (0 if none or
      no ``apply_fn`` was given).
    flops_effective: ``flops_dense * kept / count``.
  """
  path: str
  shape: tuple[int, ...]
  dtype: str
  prunable: bool
  count: int
  kept: int
  sparsity: float
  dense_bytes: int
  bitmask_bytes: int
  csr_bytes: int
  flops_dense: float
  flops_effective: float


class Report(NamedTuple):
  """Per-leaf rows and totals; `to_dict` gives logger scalars, `table` a printable table.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[0.0, -4.0, 0.0], [-3.0, 0.0, 6.0]]), "b": jnp.ones(3)}
    >>> r = jp.report(params)
    >>> r.sparsity, r.dense_bytes, r.bitmask_bytes, r.best_bytes
    (0.5, 36, 25, 25)
    >>> {k: v for k, v in r.to_dict().items() if k.startswith("sparsity/")}
    {'sparsity/total': 0.5, 'sparsity/w': 0.5}

  Attributes:
    rows: one `LeafReport` per leaf (per slice of a stacked leaf), in `jax.tree.leaves` order.
    flops_dense: XLA's FLOP count of ``apply_fn`` (None without ``apply_fn``).
    flops_effective: ``flops_dense`` minus the multiply-adds of pruned weights (None without
      ``apply_fn``).
  """
  rows: tuple[LeafReport, ...]
  flops_dense: Optional[float] = None
  flops_effective: Optional[float] = None

  @property
  def prunable_rows(self) -> tuple[LeafReport, ...]:
    return tuple(r for r in self.rows if r.prunable)

  @property
  def sparsity(self) -> float:
    """Fraction of pruned entries over the prunable leaves (0.0 when there are none)."""
    n = sum(r.count for r in self.prunable_rows)
    return 1.0 - sum(r.kept for r in self.prunable_rows) / n if n else 0.0

  @property
  def dense_bytes(self) -> int:
    return sum(r.dense_bytes for r in self.rows)

  @property
  def bitmask_bytes(self) -> int:
    return sum(r.bitmask_bytes for r in self.rows)

  @property
  def csr_bytes(self) -> int:
    return sum(r.csr_bytes for r in self.rows)

  @property
  def best_bytes(self) -> int:
    """Bytes when each leaf is stored in its smallest format (dense, bitmask or CSR)."""
    return sum(min(r.dense_bytes, r.bitmask_bytes, r.csr_bytes) for r in self.rows)

  def to_dict(self) -> dict[str, float]:
    """Flat ``{name: float}`` of every figure, for TensorBoard / W&B style loggers.

    Keys: ``params/count``, ``params/kept``, ``sparsity/total``, ``sparsity/<leaf>`` (prunable
    leaves, ``<leaf>`` the path joined by ``/``), ``bytes/dense``, ``bytes/bitmask``,
    ``bytes/csr``, ``bytes/best``, ``compression/bitmask``, ``compression/csr``,
    ``compression/best`` (dense / sparse), and with FLOPs ``flops/dense``, ``flops/effective``,
    ``flops/matmul_dense``, ``flops/matmul_effective``, ``flops/speedup``.
    """
    out: dict[str, float] = {
        "params/count": float(sum(r.count for r in self.rows)),
        "params/kept": float(sum(r.kept for r in self.rows)),
        "sparsity/total": float(self.sparsity),
    }
    for r in self.prunable_rows:
      out[f"sparsity/{log_name(r.path)}"] = float(r.sparsity)
    dense = self.dense_bytes
    out["bytes/dense"] = float(dense)
    for name, value in (("bitmask", self.bitmask_bytes), ("csr", self.csr_bytes),
                        ("best", self.best_bytes)):
      out[f"bytes/{name}"] = float(value)
      out[f"compression/{name}"] = float(dense / value) if value else float("inf")
    if self.flops_dense is not None:
      out["flops/dense"] = float(self.flops_dense)
      out["flops/effective"] = float(self.flops_effective)
      out["flops/matmul_dense"] = float(sum(r.flops_dense for r in self.rows))
      out["flops/matmul_effective"] = float(sum(r.flops_effective for r in self.rows))
      out["flops/speedup"] = (float(self.flops_dense / self.flops_effective)
                              if self.flops_effective else float("inf"))
    return out

  def table(self) -> str:
    """A fixed-width text table: one line per leaf, then the totals."""
    header = ("path", "shape", "count", "kept", "sparsity", "dense B", "bitmask B", "CSR B",
              "MFLOPs", "eff MFLOPs")
    lines = []
    for r in self.rows:
      shape = "x".join(map(str, r.shape)) or "()"
      lines.append((r.path + ("" if r.prunable else " (dense)"), shape,
                    str(r.count), str(r.kept), f"{r.sparsity:.4f}", str(r.dense_bytes),
                    str(r.bitmask_bytes), str(r.csr_bytes), f"{r.flops_dense / 1e6:.4g}",
                    f"{r.flops_effective / 1e6:.4g}"))
    total = ("total", "", str(sum(r.count for r in self.rows)),
             str(sum(r.kept for r in self.rows)), f"{self.sparsity:.4f}", str(self.dense_bytes),
             str(self.bitmask_bytes), str(self.csr_bytes),
             "" if self.flops_dense is None else f"{self.flops_dense / 1e6:.4g}",
             "" if self.flops_effective is None else f"{self.flops_effective / 1e6:.4g}")
    widths = [max(len(row[i]) for row in [header, total, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    rule = "-" * len(fmt(header))
    parts = [fmt(header), rule, *map(fmt, lines), rule, fmt(total)]
    if self.flops_dense is not None:
      parts.append("FLOPs: XLA count of apply_fn (total) and matmul/conv FLOPs per weight leaf; "
                   "effective = dense scaled by the weight's density.")
    return "\n".join(parts)


def log_name(path: str | tuple) -> str:
  """A logger-friendly name for a key path: ``['dense1']['kernel']`` -> ``dense1/kernel``."""
  if not isinstance(path, str):
    path = tree_lib.path_str(path)
  parts = [p.strip("'\"") for p in path.replace("]", "[").replace(".", "[").split("[") if p]
  return "/".join(parts)


def leaf_bytes(shape: Sequence[int], itemsize: int, kept: int) -> tuple[int, int, int]:
  """``(dense, bitmask, csr)`` bytes of a leaf of ``shape`` with ``kept`` nonzero entries."""
  count = math.prod(shape)
  rows = math.prod(shape[:-1]) if len(shape) >= 2 else 1
  dense = count * itemsize
  bitmask = kept * itemsize + (count + 7) // 8
  csr = kept * (itemsize + _INDEX_BYTES) + _INDEX_BYTES * (rows + 1)
  return dense, bitmask, csr


def _check_report_args(params: PyTree, masks: Optional[PyTree],
                       apply_fn: Optional[Callable[..., Any]], inputs: Any) -> tuple:
  """Checks `report`'s arguments; returns ``inputs`` as a tuple."""
  for path, leaf in tree_lib.leaves_with_paths(params):
    if validation.is_traced(leaf):
      raise validation.error("params", "concrete arrays (the report runs on the host, outside "
                             "jit)", validation.Text("a traced value"), path)
    dtype = getattr(leaf, "dtype", None)
    if dtype is None and isinstance(leaf, (bool, int, float, complex)):
      dtype = np.asarray(leaf).dtype
    if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):
      got = validation.Text(f"dtype {dtype}") if dtype is not None else validation.describe(leaf)
      raise validation.error("params", "numeric arrays", got, path)
  if masks is not None:
    for path, mask in tree_lib.leaves_with_paths(masks):
      if getattr(mask, "dtype", None) != np.bool_:
        raise validation.error("masks", "bool arrays (True = keep)", validation.describe(mask),
                               path)
  if apply_fn is None:
    if not (isinstance(inputs, (tuple, list)) and len(inputs) == 0):
      raise validation.error("apply_fn", "a function apply_fn(params, *inputs) since inputs "
                             "are given", None)
    return ()
  if not callable(apply_fn):
    raise validation.error("apply_fn", "a function apply_fn(params, *inputs)",
                           validation.Text(type(apply_fn).__name__))
  if not isinstance(inputs, (tuple, list)):
    got = (f"an array of shape {np.shape(inputs)}" if hasattr(inputs, "shape") else
           f"a {type(inputs).__name__}")
    raise ValueError(f"inputs: expected a tuple of the remaining arguments of apply_fn, e.g. "
                     f"inputs=(x,) for apply_fn(params, x), got {got}.")
  return tuple(inputs)


def report(params: PyTree, *, masks: Optional[PyTree] = None,
           prunable: tree_lib.Prunable = None,
           apply_fn: Optional[Callable[..., Any]] = None,
           inputs: Sequence[Any] = (), stacked: stacked_lib.Stacked = None) -> Report:
  """Counts, storage bytes and FLOPs of (pruned) parameters.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[0.0, -4.0, 0.0], [-3.0, 0.0, 6.0]]), "b": jnp.ones(3)}
    >>> r = jp.report(params, apply_fn=lambda p, x: x @ p["w"] + p["b"], inputs=(jnp.ones((4, 2)),))
    >>> print(r.table())  # doctest: +NORMALIZE_WHITESPACE
    path           shape  count  kept  sparsity  dense B  bitmask B  CSR B   MFLOPs  eff MFLOPs
    -------------------------------------------------------------------------------------------
    ['b'] (dense)      3      3     3    0.0000       12         12     12        0           0
    ['w']            2x3      6     3    0.5000       24         13     36  4.8e-05     2.4e-05
    -------------------------------------------------------------------------------------------
    total                     9     6    0.5000       36         25     48    6e-05     3.6e-05
    FLOPs: XLA count of apply_fn (total) and matmul/conv FLOPs per weight leaf; effective = dense
    scaled by the weight's density.

  Args:
    params: parameter pytree (concrete arrays).
    masks: optional bool masks with the leaf paths of ``params`` (True = keep), or an optax
      state holding them (see `find_masks`; an ``nnx.Optimizer``'s ``opt_state`` works). When
      given, a prunable leaf's ``kept`` is its mask count; otherwise its number of nonzero
      entries.
    prunable: which leaves are prunable (None: floating, ``ndim >= 2``; a predicate
      ``(path, leaf) -> bool``; or a pytree of bools). Non-prunable leaves count as fully kept
      and stored dense.
    apply_fn: optional ``apply_fn(params, *inputs)`` whose FLOPs are counted. For Flax NNX,
      ``lambda state, x: nnx.merge(graphdef, state, rest)(x)`` with ``graphdef, state, rest =
      nnx.split(model, nnx.Param, ...)``; for Equinox, ``lambda p, x: eqx.combine(p, static)(x)``
      (see docs/families.md).
    inputs: the remaining arguments of ``apply_fn``, a tuple: ``inputs=(x,)``, not ``x``.
    stacked: leading layer axes of each leaf (see `jaxprune.unstructured_mask`): a stacked leaf
      gets one row per slice, with the slice's path (``['layers']['q']['kernel'][3]``), shape
      and counts, and an equal share of the leaf's FLOPs.

  Returns:
    A `Report`; `LeafReport` gives the byte and FLOP formulas.

  Raises:
    ValueError: for masks or an optimizer state that do not match ``params``, non-bool masks,
      non-numeric or traced leaves (the report runs on the host), or ``inputs`` that is not a
      tuple; the message names the argument and the leaf.
  """
  if masks is not None:
    masks = mask_state.masks_for(masks, params)
  inputs = _check_report_args(params, masks, apply_fn, inputs)
  layers = stacked_lib.resolve(params, stacked, prunable)
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  mask_leaves = jax.tree.leaves(masks) if masks is not None else [None] * len(with_paths)

  if apply_fn is not None:
    flops_dense: Optional[float] = xla_flops(apply_fn, params, *inputs)
    leaf_flops = matmul_flops_by_leaf(apply_fn, params, *inputs)
  else:
    flops_dense, leaf_flops = None, [0.0] * len(with_paths)

  rows = []
  for (path, leaf), l, mask, fl in zip(with_paths, layers, mask_leaves, leaf_flops):
    dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    # Only pruned layers are counted: the others are read as dense, never copied to the host.
    values = (np.asarray(leaf if mask is None else mask).reshape((l.num,) + l.shape)
              if l.any else [None] * l.num)
    for j, q in enumerate(stacked_lib.slice_paths(path, l)):
      rows.append(_row(q, l.shape, dtype, l.flags[j], values[j], fl / max(l.num, 1)))

  flops_effective = None
  if flops_dense is not None:
    flops_effective = flops_dense - sum(r.flops_dense - r.flops_effective for r in rows)
  return Report(rows=tuple(rows), flops_dense=flops_dense, flops_effective=flops_effective)


def _row(path: str, shape: tuple[int, ...], dtype: np.dtype, flag: bool,
         kept_of: Optional[np.ndarray], flops: float) -> LeafReport:
  """One layer's row; ``kept_of`` is its mask, or its values (kept = nonzero) without masks."""
  count = math.prod(shape)
  kept = int(np.count_nonzero(kept_of)) if flag else count
  dense, bitmask, csr = leaf_bytes(shape, dtype.itemsize, kept)
  if not flag:
    bitmask = csr = dense
  density = kept / count if count else 1.0
  return LeafReport(
      path=path, shape=tuple(int(d) for d in shape), dtype=dtype.name, prunable=bool(flag),
      count=count, kept=kept, sparsity=1.0 - density, dense_bytes=dense, bitmask_bytes=bitmask,
      csr_bytes=csr, flops_dense=flops, flops_effective=flops * density)
