"""Layer-wise Optimal Brain Surgeon: the conventions every layer solver shares, and small solvers.

A layer is a kernel ``w`` of shape ``(d_in, d_out)`` (rows are input features, as in a Flax Dense
kernel; conv and einsum kernels are reshaped to this view by the caller) and ``h = XᵀX``, the
``(d_in, d_in)`` sum over calibration tokens of ``x xᵀ``. Changing ``w`` to ``w'`` changes the
layer's outputs on the calibration set by ``trace((w' - w)ᵀ H (w' - w))``, the layer loss every
solver minimises (Hassibi & Stork 1993, "Second order derivatives for network pruning: Optimal
Brain Surgeon"; Frantar & Alistarh 2022, "Optimal Brain Compression"). Each output column is an
independent problem with the same ``H``.

Solvers work on a dampened ``H + λI`` with ``λ = damp · mean(diag H)``. An input that is zero on
every calibration token (``H_ii = 0``) first gets ``H_ii = 1`` so that the inverse exists; its
weights change no output, so they cost nothing to remove and are removed first, but they are
never zeroed unless removed. Masks are bool ``(d_in, d_out)``, True = keep.

Patterns: one parser, `parse_pattern`, reads every spelling the library accepts (``None`` or
``"unstructured"``, ``"n:m"``, `jaxprune.NMPattern`, `jaxprune.BlockPattern`, and the tile tuple
``("block", bi, bo)``) into a `ParsedPattern`; `layer_pattern` resolves it against one
``(d_in, d_out)`` kernel. N:M keeps exactly ``n`` in every group of ``m`` consecutive inputs of
each output column, as `jaxprune.nm_mask` does; a block pattern removes whole ``bi × bo`` tiles.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from jaxprune._src import policy_args
from jaxprune._src import select
from jaxprune._src import validation

Array = jax.Array
Pattern = Union[None, str, policy_args.NMPattern, policy_args.BlockPattern, tuple]


class ParsedPattern(NamedTuple):
  """A validated sparsity pattern.

  Attributes:
    kind: ``"none"``, ``"nm"`` or ``"block"``.
    a: ``n`` (N:M) or the tile's rows ``bi`` (inputs); 1 otherwise.
    b: ``m`` (N:M) or the tile's columns ``bo`` (outputs); 1 otherwise.
    axis: N:M given as a `jaxprune.NMPattern`: the leaf axis its groups run along; None when the
      groups run along the kernel's input features whatever its layout (``"n:m"``).
    shape: block given as a `jaxprune.BlockPattern`: its block of the leaf's trailing dims; None
      for a tile of the ``(d_in, d_out)`` view (``("block", bi, bo)``, or once resolved).
    reduce: how a block mask chosen from scores (magnitude, Wanda) scores a tile.
  """
  kind: str
  a: int = 1
  b: int = 1
  axis: Optional[int] = None
  shape: Optional[tuple[int, ...]] = None
  reduce: str = "l1"


NONE = ParsedPattern("none")
SPELLINGS = ("None, 'unstructured', 'n:m' (e.g. '2:4'), NMPattern(n, m), BlockPattern(shape) or "
             "('block', rows, cols)")


def is_int(v: object) -> bool:
  """True for a Python or numpy integer that is not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def parse_pattern(pattern: Any, name: str = "pattern") -> ParsedPattern:
  """Reads any spelling of a sparsity pattern; the one parser of every layer-wise entry point.

  Args:
    pattern: ``None`` or ``"unstructured"``; ``"n:m"`` (N:M along the kernel's input features);
      `jaxprune.NMPattern` (N:M along its ``axis`` of the leaf, which must be the kernel's input
      axis); `jaxprune.BlockPattern` (blocks of the leaf's trailing dims, as in
      `jaxprune.block_mask`); ``("block", bi, bo)`` (tiles of the ``(d_in, d_out)`` view); or
      a `ParsedPattern`.
    name: argument name for error messages.

  Returns:
    The `ParsedPattern`.
  """
  if isinstance(pattern, ParsedPattern):
    return pattern
  if pattern is None or (isinstance(pattern, str) and pattern == "unstructured"):
    return NONE
  if isinstance(pattern, str):
    n, sep, m = pattern.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
      raise validation.error(name, SPELLINGS, pattern)
    m = validation.check_int(int(m), f"{name} m", 1)
    return ParsedPattern("nm", validation.check_int(int(n), f"{name} n", 0, m), m)
  if isinstance(pattern, policy_args.NMPattern):
    pattern = policy_args.check_pattern(pattern)
    return ParsedPattern("nm", pattern.n, pattern.m, axis=pattern.axis)
  if isinstance(pattern, policy_args.BlockPattern):
    pattern = policy_args.check_pattern(pattern)
    return ParsedPattern("block", shape=pattern.shape, reduce=pattern.reduce)
  if isinstance(pattern, tuple) and len(pattern) == 3 and pattern[0] == "block":
    return ParsedPattern("block", validation.check_int(pattern[1], f"{name} rows", 1),
                         validation.check_int(pattern[2], f"{name} cols", 1))
  raise validation.error(name, SPELLINGS, pattern)


def layer_pattern(pattern: Any, shape: tuple[int, int], name: str = "pattern",
                  path: Optional[str] = None) -> ParsedPattern:
  """Resolves a pattern against one ``(d_in, d_out)`` kernel, the view every solver works on.

  An `jaxprune.NMPattern` must run along the view's input axis (``0`` or ``-2``); a
  `jaxprune.BlockPattern` of at most two dims tiles the view as `jaxprune.block_mask` tiles a
  2-D leaf. Tiles and groups must divide the kernel (no partial ones).

  Args:
    pattern: any spelling `parse_pattern` reads.
    shape: the kernel's ``(d_in, d_out)``.
    name: argument name for error messages.
    path: the kernel's leaf path, for error messages.

  Returns:
    A `ParsedPattern` with ``axis`` and ``shape`` None.
  """
  pat = parse_pattern(pattern, name)
  d_in, d_out = shape
  if pat.kind == "nm":
    if pat.axis is not None and pat.axis not in (0, -2):
      raise validation.error(f"{name}.axis", "0 or -2, the input axis of a (d_in, d_out) kernel",
                             pat.axis, path)
    if d_in % pat.b:
      raise validation.error(name, f"groups of m={pat.b} dividing the {d_in} inputs of a kernel "
                             f"of shape {tuple(shape)}", f"{pat.a}:{pat.b}", path)
    return pat._replace(axis=None)
  if pat.kind == "block":
    pat = tile(pat, name, path)
    if d_in % pat.a or d_out % pat.b:
      raise validation.error(name, f"tiles dividing a kernel of shape {tuple(shape)}",
                             (pat.a, pat.b), path)
  return pat


def tile(pattern: ParsedPattern, name: str = "pattern",
         path: Optional[str] = None) -> ParsedPattern:
  """A block pattern's tile of the ``(d_in, d_out)`` view: a `jaxprune.BlockPattern` of at most
  two dims tiles it as `jaxprune.block_mask` tiles a 2-D leaf (one dim: ``(1, bo)``)."""
  if pattern.shape is None:
    return pattern
  if len(pattern.shape) > 2:
    raise validation.error(f"{name}.shape", "at most 2 dims for a (d_in, d_out) kernel",
                           pattern.shape, path)
  return pattern._replace(a=((1,) + pattern.shape)[-2], b=pattern.shape[-1], shape=None)


def nm_sparsity(pattern: ParsedPattern) -> float:
  """The sparsity an N:M pattern implies, ``(m - n) / m``."""
  return (pattern.b - pattern.a) / pattern.b


def check_nm_sparsity(sparsity, pattern: ParsedPattern, name: str = "sparsity",
                      path: Optional[str] = None) -> None:
  """N:M fixes the sparsity: a given ``sparsity`` must be None or ``(m - n) / m``."""
  if sparsity is None or validation.is_traced(sparsity):
    return
  target = nm_sparsity(pattern)
  if abs(float(np.asarray(sparsity)) - target) > 1e-6:
    raise validation.error(name, f"None or {target} for the {pattern.a}:{pattern.b} pattern",
                           sparsity, path)


def check_layer(w: Array, h: Array, name: str = "w") -> None:
  """Raises if ``w`` is not a 2-D float kernel or ``h`` not its ``(d_in, d_in)`` float Hessian."""
  for arg, x in ((name, w), ("h", h)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f"{arg}: expected a float array, got dtype {jnp.result_type(x)}.")
  if np.ndim(w) != 2:
    raise ValueError(f"{name}: expected a 2-D (d_in, d_out) kernel, got shape {np.shape(w)}.")
  d_in = np.shape(w)[0]
  if np.shape(h) != (d_in, d_in):
    raise ValueError(f"h: expected shape ({d_in}, {d_in}) for a kernel of shape {np.shape(w)}, "
                     f"got {np.shape(h)}.")


def check_mask(mask: Array, shape: tuple[int, ...]) -> None:
  """Raises unless ``mask`` is a bool array of the kernel's shape."""
  if jnp.result_type(mask) != jnp.bool_ or np.shape(mask) != tuple(shape):
    raise ValueError(f"mask: expected a bool array of shape {tuple(shape)}, got "
                     f"{jnp.result_type(mask)} {np.shape(mask)}.")


def check_damp(damp: float) -> None:
  """Raises unless ``damp`` is a Python or numpy float ``>= 0`` (it is a static setting)."""
  if not isinstance(damp, (int, float, np.floating)) or not damp >= 0:
    raise ValueError(f"damp: expected a float >= 0, got {damp!r}.")


def dampen(h: Array, damp: Union[float, Array]) -> tuple[Array, Array]:
  """``H + λI`` with ``λ = damp · mean(diag H)``, after giving dead inputs ``H_ii = 1``.

  Args:
    h: ``(d, d)`` Gram matrix ``XᵀX``.
    damp: relative dampening.

  Returns:
    The dampened float32 matrix and the bool vector of dead inputs (``H_ii == 0``).
  """
  h = jnp.asarray(h, jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  lam = damp * jnp.mean(jnp.diagonal(h))
  return h + lam * jnp.eye(h.shape[0], dtype=h.dtype), dead


def spd_inverse(a: Array) -> Array:
  """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
  chol = jnp.linalg.cholesky(a)
  return jsl.cho_solve((chol, True), jnp.eye(a.shape[0], dtype=a.dtype))


def map_columns(fn: Callable[..., Any], columns: Sequence[Array], chunk: int) -> Any:
  """Applies ``fn`` to every output column, ``chunk`` columns at a time (one vmapped batch each).

  The columns are split into equal batches of at most ``chunk``; the last is padded with copies
  of the last column, so one compiled batch serves all and the scratch memory stays bounded.

  Args:
    fn: function of one column of each of ``columns``.
    columns: arrays whose leading axis is the output column.
    chunk: most columns per batch.

  Returns:
    ``fn``'s outputs stacked over columns.
  """
  n = columns[0].shape[0]
  batches = -(-n // max(min(chunk, n), 1))
  size = -(-n // batches)
  def split(x):
    x = jnp.pad(x, [(0, batches * size - n)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    return x.reshape((batches, size) + x.shape[1:])

  out = lax.map(lambda xs: jax.vmap(fn)(*xs), tuple(split(x) for x in columns))
  return jax.tree.map(lambda y: y.reshape((batches * size,) + y.shape[2:])[:n], out)


def prune_ranks(scores: Array) -> Array:
  """Position of every entry in the pruning order, 0 = pruned first.

  The order of `jaxprune.unstructured_mask`: NaN first, then ascending, and among equal scores
  the later entry (row-major) first. Sort-based, meant for the arrays of one layer inside a
  solver, where the count to prune may change from step to step.
  """
  keys = select.score_keys(scores).reshape(-1)
  n = keys.size
  order = n - 1 - jnp.argsort(keys[::-1], stable=True)
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank.reshape(scores.shape)


def prune_lowest(scores: Array, count: Union[int, Array]) -> Array:
  """True for the ``count`` lowest entries of ``scores`` (``count`` may be traced), in the
  order of `prune_ranks`: `jaxprune._src.select.prune_lowest` on one array, without a sort."""
  return select.prune_lowest([scores], count)[0]


def layer_loss(w_old: Array, w_new: Array, h: Array) -> Array:
  """The layer loss ``trace((w' - w)ᵀ H (w' - w))`` of replacing ``w_old`` by ``w_new``.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> x = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], np.float32)   # 3 samples, 2 inputs
    >>> w, w_new = np.array([[0.5], [-1.0]], np.float32), np.array([[0.5], [0.0]], np.float32)
    >>> float(jp.layerwise.layer_loss(w, w_new, x.T @ x))
    6.0
    >>> float(np.sum((x @ w_new - x @ w) ** 2))   # the outputs move by x[:, 1]
    6.0

  Args:
    w_old: ``(d_in, d_out)`` kernel.
    w_new: kernel of the same shape.
    h: ``(d_in, d_in)`` Gram matrix of the layer's inputs.

  Returns:
    float32 scalar: the summed squared change of the layer's outputs over the calibration set.
  """
  check_layer(w_old, h, "w_old")
  return _layer_loss(w_old, w_new, h)


@jax.jit
def _layer_loss(w_old: Array, w_new: Array, h: Array) -> Array:
  delta = jnp.asarray(w_new, jnp.float32) - jnp.asarray(w_old, jnp.float32)
  return jnp.sum(delta * (jnp.asarray(h, jnp.float32) @ delta))


def wanda(w: Array, h: Array) -> Array:
  """Wanda scores ``|w_ij| · ‖X_i‖₂`` with ``‖X_i‖₂ = sqrt(H_ii)``.

  Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models". The
  scores rank weights within each output column; use them with `jaxprune.unstructured_mask` or,
  for their least-squares weights, with `refit`.

  Examples:
    Only the diagonal of ``H`` matters, the squared norms of the inputs:

    >>> import numpy as np, jaxprune as jp
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25]], np.float32)
    >>> jp.layerwise.wanda(w, np.array([4.0, 1.0, 0.25], np.float32)).tolist()   # norms 2, 1, 0.5
    [[2.0, 1.0], [0.5, 1.0], [1.0, 0.125]]

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX``, or only its diagonal ``(d_in,)`` (what
      calibration with ``diagonal=True`` holds).

  Returns:
    float32 scores shaped like ``w``; higher = more important.
  """
  if np.ndim(h) == 1:
    d_in = np.shape(w)[0] if np.ndim(w) else None
    if np.shape(h) != (d_in,) or not jnp.issubdtype(jnp.result_type(h), jnp.floating):
      raise ValueError(f"h: expected a float ({d_in},) diagonal or ({d_in}, {d_in}) matrix for a "
                       f"kernel of shape {np.shape(w)}, got {jnp.result_type(h)} {np.shape(h)}.")
    check_layer(w, jax.ShapeDtypeStruct((d_in, d_in), jnp.float32))
    diag = jnp.asarray(h, jnp.float32)
  else:
    check_layer(w, h)
    diag = jnp.diagonal(jnp.asarray(h, jnp.float32))
  norms = jnp.sqrt(jnp.maximum(diag, 0.0))
  return jnp.abs(jnp.asarray(w, jnp.float32)) * norms[:, None]


def dense_target(w: Array, h_pp: Array, h_pd: Array, *, damp: float = 0.01) -> Array:
  """Kernel that best maps the pruned model's inputs to the dense model's outputs.

  With ``X_p`` the layer's inputs in the (partly) pruned model and ``X_d`` in the dense model,
  ``K* = argmin ‖X_p K* - X_d K‖² + λ‖K* - K‖² = (H_pp + λI)⁻¹ (H_pd K + λK)``, where
  ``H_pp = X_pᵀX_p`` and ``H_pd = X_pᵀX_d``. Pruning ``K*`` with ``H_pp`` then fits the layer to
  the dense outputs instead of to its own (Frantar & Alistarh 2022, "Optimal Brain Compression",
  Sec. 5, sequential correction). Dead inputs of ``X_p`` keep their weights. At ``X_p = X_d``
  the result is ``w`` up to rounding.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]],
    ...              np.float32)   # the dense model's inputs to the layer
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> x_p = x * np.array([1, 1, 0, 1], np.float32)   # input 2 pruned away upstream
    >>> k = np.asarray(jp.layerwise.dense_target(w, x_p.T @ x_p, x_p.T @ x))
    >>> err = lambda k: round(float(np.sum((x_p @ k - x @ w) ** 2)), 1)
    >>> err(w), err(k)   # distance to the dense layer's outputs
    (24.4, 12.6)

  Args:
    w: ``(d_in, d_out)`` dense kernel.
    h_pp: ``(d_in, d_in)`` Gram matrix of the pruned model's inputs.
    h_pd: ``(d_in, d_in)`` cross Gram matrix ``X_pᵀX_d``.
    damp: relative dampening of ``H_pp``.

  Returns:
    float32 target kernel shaped like ``w``.
  """
  check_layer(w, h_pp)
  check_layer(w, h_pd)
  check_damp(damp)
  return _dense_target(w, h_pp, h_pd, jnp.float32(damp))


@jax.jit
def _dense_target(w: Array, h_pp: Array, h_pd: Array, damp: Array) -> Array:
  hd, _ = dampen(h_pp, damp)
  w = jnp.asarray(w, jnp.float32)
  # The right side gets what H_pp got on its diagonal (λ, and 1 for dead inputs), so that at
  # X_p = X_d the solve returns w.
  extra = jnp.diagonal(hd) - jnp.diagonal(jnp.asarray(h_pp, jnp.float32))
  rhs = jnp.asarray(h_pd, jnp.float32) @ w + extra[:, None] * w
  return jsl.cho_solve((jnp.linalg.cholesky(hd), True), rhs)
