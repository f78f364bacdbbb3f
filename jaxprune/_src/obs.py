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

Patterns: ``None`` (unstructured), ``("nm", n, m)`` (in every group of ``m`` consecutive inputs of
each output column exactly ``n`` are kept, as in `jaxprune.nm_mask`) or ``("block", bi, bo)``
(whole ``bi × bo`` tiles of the kernel are removed).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from jaxprune._src import select
from jaxprune._src import validation

Array = jax.Array
Pattern = Optional[tuple]


class ParsedPattern(NamedTuple):
  """A validated pattern: ``kind`` is ``"none"``, ``"nm"`` or ``"block"``; ``a, b`` its sizes
  (``n, m`` or ``bi, bo``)."""
  kind: str
  a: int = 1
  b: int = 1


def is_int(v: object) -> bool:
  """True for a Python or numpy integer that is not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def parse_pattern(pattern: Pattern, shape: tuple[int, int], name: str = "pattern") -> ParsedPattern:
  """Validates ``pattern`` against a ``(d_in, d_out)`` kernel shape.

  Args:
    pattern: None, ``("nm", n, m)`` or ``("block", bi, bo)``.
    shape: the kernel's shape.
    name: argument name for error messages.

  Returns:
    The `ParsedPattern`.
  """
  if pattern is None:
    return ParsedPattern("none")
  if (not isinstance(pattern, tuple) or len(pattern) != 3 or pattern[0] not in ("nm", "block")
      or not all(is_int(v) for v in pattern[1:])):
    raise ValueError(f"{name}: expected None, ('nm', n, m) or ('block', bi, bo) with int sizes, "
                     f"got {pattern!r}.")
  kind, a, b = pattern
  d_in, d_out = shape
  if kind == "nm":
    if b < 1 or not 0 <= a <= b:
      raise ValueError(f"{name}: expected 0 <= n <= m and m >= 1, got n={a}, m={b}.")
    if d_in % b:
      raise ValueError(f"{name}: expected d_in divisible by m={b}, got kernel shape {shape}.")
  else:
    if a < 1 or b < 1:
      raise ValueError(f"{name}: expected positive block sizes, got {pattern!r}.")
    if d_in % a or d_out % b:
      raise ValueError(f"{name}: expected kernel shape divisible by the block ({a}, {b}), got "
                       f"{shape}.")
  return ParsedPattern(kind, int(a), int(b))


def nm_sparsity(pattern: ParsedPattern) -> float:
  """The sparsity an N:M pattern implies, ``(m - n) / m``."""
  return (pattern.b - pattern.a) / pattern.b


def check_nm_sparsity(sparsity, pattern: ParsedPattern, name: str = "sparsity") -> None:
  """N:M fixes the sparsity: a given ``sparsity`` must be None or ``(m - n) / m``."""
  if sparsity is None or validation.is_traced(sparsity):
    return
  target = nm_sparsity(pattern)
  if abs(float(np.asarray(sparsity)) - target) > 1e-6:
    raise ValueError(f"{name}: pattern ('nm', {pattern.a}, {pattern.b}) prunes a fraction "
                     f"{target}; expected None or {target}, got {sparsity!r}.")


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
  order of `prune_ranks`."""
  return prune_ranks(scores) < count


def layer_loss(w_old: Array, w_new: Array, h: Array) -> Array:
  """The layer loss ``trace((w' - w)ᵀ H (w' - w))`` of replacing ``w_old`` by ``w_new``.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]],
    ...              np.float32)   # calibration inputs: features 0 and 1 are twins
    >>> h = x.T @ x   # what calibrate collects
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> w_new = w.copy()
    >>> w_new[3, 0] = 0.0   # Δ = 0.25 on input 3, with H_33 = 6
    >>> float(jp.layerwise.layer_loss(w, w_new, h))   # 0.25² · 6
    0.375

  Args:
    w_old: ``(d_in, d_out)`` kernel.
    w_new: kernel of the same shape.
    h: ``(d_in, d_in)`` Gram matrix of the layer's inputs.

  Returns:
    float32 scalar: the summed squared change of the layer's outputs over the calibration set.
  """
  check_layer(w_old, h, "w_old")
  delta = jnp.asarray(w_new, jnp.float32) - jnp.asarray(w_old, jnp.float32)
  return jnp.sum(delta * (jnp.asarray(h, jnp.float32) @ delta))


def wanda(w: Array, h: Array) -> Array:
  """Wanda scores ``|w_ij| · ‖X_i‖₂`` with ``‖X_i‖₂ = sqrt(H_ii)``.

  Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models". The
  scores rank weights within each output column; use them with `jaxprune.unstructured_mask` or,
  for their least-squares weights, with `refit`.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]],
    ...              np.float32)   # calibration inputs: features 0 and 1 are twins
    >>> h = x.T @ x   # what calibrate collects
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> scores = jp.layerwise.wanda(w, h)   # |w| · sqrt(diag H), diag H = (6, 6, 6, 6)
    >>> np.asarray(scores, float).round(2).tolist()
    [[2.45, 1.22], [1.22, 2.45], [4.9, 0.61], [0.61, 4.9]]

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX``.

  Returns:
    float32 scores shaped like ``w``; higher = more important.
  """
  check_layer(w, h)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(jnp.asarray(h, jnp.float32)), 0.0))
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
    ...              np.float32)   # calibration inputs: features 0 and 1 are twins
    >>> h = x.T @ x   # what calibrate collects
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
  hd, dead = dampen(h_pp, damp)
  w = jnp.asarray(w, jnp.float32)
  # The right side gets what H_pp got on its diagonal (λ, and 1 for dead inputs), so that at
  # X_p = X_d the solve returns w.
  extra = jnp.diagonal(hd) - jnp.diagonal(jnp.asarray(h_pp, jnp.float32))
  rhs = jnp.asarray(h_pd, jnp.float32) @ w + extra[:, None] * w
  return jsl.cho_solve((jnp.linalg.cholesky(hd), True), rhs)
