"""Least-squares refit: the best kept weights of a layer for any given mask.

For one output column with kept inputs ``S`` and removed inputs ``R`` the layer loss
``(w' - w)ᵀ H (w' - w)`` subject to ``w'_R = 0`` is minimised by

    w'_S = w_S + H_SS⁻¹ H_SR w_R                      (a system on the kept set), or
    w'   = w - G_:R G_RR⁻¹ w_R,   G = H⁻¹               (a system on the removed set),

the second being the multi-weight Optimal Brain Surgeon step (Hassibi & Stork 1993; Frantar &
Alistarh 2022, "Optimal Brain Compression", eq. 2). Both give the same optimum. Direct solves
gather each column's system into a padded batch and factor it with one batched Cholesky, which
costs ``|S|³/3`` per column. The removed-set system is well conditioned once each row is scaled
by its diagonal (the dampening bounds ``G``, whereas the kept-set system inherits the
conditioning of ``H``), so conjugate gradients on it converge in a few dozen iterations, each
one matrix product ``G @ Y`` for all columns at once. The default uses direct solves for
columns that keep at most a quarter of their inputs and conjugate gradients for the others.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src import obs
from jaxprune._src import validation

Array = jax.Array

# Entries of one padded system times the columns solved together: 4 Mi float32 (16 MiB) per
# batched array bounds the solver's scratch memory whatever the layer size.
_BATCH_ENTRIES = 1 << 22

_METHODS = ("auto", "cholesky")
# Direct systems of at most this size are padded to the bound whatever the mask: one compiled
# program per small layer shape costs less than the padding.
_SMALL = 16
# Conjugate-gradient iterations between recomputations of the true residual.
_CHECK_EVERY = 16


def _kept_counts(mask: Array) -> Optional[np.ndarray]:
  return np.asarray(mask).sum(axis=0) if not validation.is_traced(mask) else None


def _direct_size(mask: Array, method: str) -> int:
  """Static size of the padded direct systems (0: no direct solve).

  ``"cholesky"`` solves every column on its smaller side, ``"auto"`` only columns keeping at most
  ``d_in // 4`` inputs, on the kept side. A concrete mask sizes the systems to the largest one
  it needs (rounded up by `_bucket`), a traced one, or any mask of a layer whose bound is at
  most `_SMALL`, to the bound.
  """
  d_in = mask.shape[0]
  bound = d_in // 2 if method == "cholesky" else d_in // 4
  kept = _kept_counts(mask)
  if kept is None or bound <= _SMALL:
    return bound
  sizes = np.minimum(kept, d_in - kept) if method == "cholesky" else kept[kept <= bound]
  return min(_bucket(int(sizes.max(initial=0))), bound)


def _bucket(k: int) -> int:
  """``k`` rounded up to 8, 12, 16, 24, 32, 48, ... (two sizes per octave), so that masks of
  similar sparsity share one compilation; the padded systems cost at most 3.4 times as much."""
  if k == 0:
    return 0
  size = 8
  while size < k:
    size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
  return size


def _cholesky_solve(a: Array, b: Array) -> Array:
  """``a⁻¹ b`` for a symmetric positive definite ``a``; ``b`` as a row vector, which spares the
  transposed copy of the factor that a column right-hand side costs on CPU."""
  chol = jnp.linalg.cholesky(a)
  z = lax.linalg.triangular_solve(chol, b[None, :], left_side=False, lower=True, transpose_a=True)
  return lax.linalg.triangular_solve(chol, z, left_side=False, lower=True)[0]


def _direct_column(both_sides: Array, w: Array, keep: Array, hw_removed: Array, on_kept: Array,
                   active: Array, size: int) -> Array:
  """One column refit by a direct solve on its kept (``on_kept``) or removed side, padded to
  ``size``; an inactive column solves an empty system."""
  d = w.shape[0]
  chosen = jnp.where(on_kept, keep, ~keep) & active
  idx = jnp.argsort(~chosen, stable=True)[:size]  # the chosen inputs first, in index order
  valid = jnp.arange(size) < jnp.sum(chosen)
  rows = jnp.where(on_kept, idx, idx + d)  # the kept side reads H, the removed side G
  a = jnp.take(jnp.take(both_sides, rows, axis=0), idx, axis=1)
  a = jnp.where(valid[:, None] & valid[None, :], a, jnp.eye(size, dtype=a.dtype))
  rhs = jnp.where(valid, jnp.where(on_kept, hw_removed[idx], w[idx]), 0.0)
  y = jnp.where(valid, _cholesky_solve(a, rhs), 0.0)
  scattered = jnp.zeros(d, y.dtype).at[idx].add(y)
  delta = jnp.where(on_kept, scattered, -(both_sides[d:] @ scattered))
  return jnp.where(keep, w + delta, 0.0)


def _cg_removed_side(g: Array, w: Array, removed: Array, tol: Array,
                     max_iter: int) -> tuple[Array, Array, Array]:
  """Solves ``G_RR y = w_R`` for every column at once by Jacobi-preconditioned conjugate
  gradients; a column stops once its residual is below ``tol`` times its right side.

  In float32 the updated residual drifts from the true one, so the true residual is recomputed
  every ``_CHECK_EVERY`` iterations; a column whose true residual did not fall since the last
  check has reached float32's floor and stops too (iterating on would only amplify rounding).

  Returns:
    ``y`` (zero off ``R``), the number of iterations run, and per column whether its final
    residual is within ten times the tolerance.
  """
  on = removed.astype(w.dtype)
  b = on * w
  inv_diag = on / jnp.diagonal(g)[:, None]
  apply = lambda y: on * (g @ y)
  norm = lambda r: jnp.linalg.norm(r, axis=0)
  limit = tol * norm(b)
  ratio = lambda num, den: jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)

  def running(state):
    i, active = state[0], state[-1]
    return (i < max_iter) & jnp.any(active)

  def step(state):
    i, y, r, p, rz, checked, active = state
    q = apply(p)
    alpha = jnp.where(active, ratio(rz, jnp.sum(p * q, axis=0)), 0.0)
    y = y + alpha * p
    check = (i + 1) % _CHECK_EVERY == 0
    r = lax.cond(check, lambda: b - apply(y), lambda: r - alpha * q)
    res = norm(r)
    active = active & (res > limit) & jnp.where(check, res < checked, True)
    checked = jnp.where(check, res, checked)
    z = inv_diag * r
    rz_next = jnp.sum(r * z, axis=0)
    p = jnp.where(active, z + ratio(rz_next, rz) * p, p)
    return i + 1, y, r, p, jnp.where(active, rz_next, rz), checked, active

  y = inv_diag * b
  r = b - apply(y)
  z = inv_diag * r
  res = norm(r)
  state = (jnp.int32(0), y, r, z, jnp.sum(r * z, axis=0), res, res > limit)
  i, y, *_ = lax.while_loop(running, step, state)
  return y, i, norm(b - apply(y)) <= 10.0 * limit


def refit(w: Array, h: Array, mask: Array, *, damp: float = 0.01, method: str = "auto",
          tol: float = 1e-5, max_iter: int = 1000, chunk: Optional[int] = None) -> Array:
  """The weights minimising the layer loss for a fixed mask.

  Each output column ``j`` keeps its inputs ``S`` and zeroes ``R``; the kept weights move to
  ``w'_S = w_S + H_SS⁻¹ H_SR w_R``, the least-squares optimum of ``‖X w' - X w‖²`` (plus the
  dampening ``λ‖w' - w‖²``) under ``w'_R = 0`` (Hassibi & Stork 1993; Frantar & Alistarh 2022).
  This gives magnitude, Wanda, N:M, block or hardware masks the reconstruction of OBS. Columns
  without a removed entry are returned bit-identical.

  Methods: ``"cholesky"`` solves each column directly on its smaller side (``(d_in/2)³/3`` flops
  per column at 50 %). ``"auto"`` solves columns keeping at most ``d_in / 4`` inputs directly on
  the kept side and the others by conjugate gradients on the removed side, to a residual of
  ``tol``: at moderate sparsity one matrix product per iteration for all columns replaces a
  factorisation per column, and the result is as accurate as the direct solve's.
  With more than three quarters removed, or with little dampening, the removed-side system
  inherits the conditioning of ``H`` and float32 loses accuracy; hence the direct solves, and
  columns whose residual stays above ``10 · tol`` are solved again directly on the kept side
  (after the call when the mask is concrete, inside the program when it is traced).
  Jittable with a traced ``mask``; a concrete mask sizes the direct systems to the largest one
  it needs, a traced one to the bound of the method.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]],
    ...              np.float32)   # calibration inputs: features 0 and 1 are twins
    >>> h = x.T @ x   # what calibrate collects
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> mask = jp.unstructured_mask(jp.magnitude(w), 0.25)   # drops the two 0.25s
    >>> loss = lambda w_new: round(float(jp.layerwise.layer_loss(w, w_new, h)), 2)
    >>> loss(w * mask), loss(jp.layerwise.refit(w, h, mask))
    (0.75, 0.46)

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX`` of the layer's inputs.
    mask: bool ``(d_in, d_out)``, True = keep.
    damp: relative dampening (see `jaxprune._src.obs.dampen`).
    method: ``"auto"`` or ``"cholesky"``.
    tol: relative residual at which conjugate gradients stop.
    max_iter: most conjugate-gradient iterations.
    chunk: columns per batch of direct solves (default: as many as fit 16 MiB per batch).

  Returns:
    float32 kernel, zero where ``mask`` is False.
  """
  return refit_with_info(w, h, mask, damp=damp, method=method, tol=tol, max_iter=max_iter,
                         chunk=chunk)[0]


def refit_with_info(w: Array, h: Array, mask: Array, *, damp: float = 0.01,
                    method: str = "auto", tol: float = 1e-5, max_iter: int = 1000,
                    chunk: Optional[int] = None) -> tuple[Array, Array]:
  """`refit`, also returning the number of conjugate-gradient iterations run (0 if none)."""
  obs.check_layer(w, h)
  obs.check_mask(mask, np.shape(w))
  obs.check_damp(damp)
  if method not in _METHODS:
    raise ValueError(f"method: expected one of {_METHODS}, got {method!r}.")
  for name, v in (("chunk", chunk), ("max_iter", max_iter)):
    if v is not None and (not obs.is_int(v) or v < 1):
      raise ValueError(f"{name}: expected a positive int, got {v!r}.")
  if not tol > 0:
    raise ValueError(f"tol: expected a positive float, got {tol!r}.")
  d_in = np.shape(w)[0]
  kept = _kept_counts(mask)
  use_cg = method == "auto" and (kept is None or bool(np.any((kept > d_in // 4) & (kept < d_in))))
  w, mask = jnp.asarray(w, jnp.float32), jnp.asarray(mask)
  run = functools.partial(_refit, w, h, mask, jnp.float32(damp), jnp.float32(tol),
                          rule="smaller" if method == "cholesky" else "auto", use_cg=use_cg,
                          max_iter=int(max_iter))
  size = _direct_size(mask, method)
  out, iterations, failed = run(size=size, chunk=_chunk(chunk, size), fallback=kept is None)
  if use_cg and kept is not None:
    if validation.is_traced(failed):  # under an outer trace: the fallback joins it
      return run(size=size, chunk=_chunk(chunk, size), fallback=True)[:2]
    cols = np.flatnonzero(np.asarray(failed))
    if cols.size:
      size = min(_bucket(int(kept[cols].max())), d_in)
      again = _refit(w[:, cols], h, mask[:, cols], jnp.float32(damp), jnp.float32(tol),
                     size=size, chunk=_chunk(chunk, size), rule="kept", use_cg=False,
                     max_iter=int(max_iter), fallback=False)[0]
      out = out.at[:, cols].set(again)
  return out, iterations


def _chunk(chunk: Optional[int], size: int) -> int:
  return chunk or max(1, _BATCH_ENTRIES // max(size * size, 1))


@functools.partial(jax.jit, static_argnames=("size", "chunk", "rule", "use_cg", "max_iter",
                                             "fallback"))
def _refit(w: Array, h: Array, mask: Array, damp: Array, tol: Array, *, size: int, chunk: int,
           rule: str, use_cg: bool, max_iter: int,
           fallback: bool) -> tuple[Array, Array, Array]:
  """The refit; ``rule`` picks the columns solved directly and their side: ``"smaller"`` all,
  on the smaller side; ``"auto"`` those keeping at most a quarter, on the kept side (the others
  by conjugate gradients); ``"kept"`` all, on the kept side. With ``fallback`` columns whose
  conjugate gradients did not converge are solved directly inside the program; otherwise they
  are returned as failed."""
  d_in, d_out = w.shape
  hd, _ = obs.dampen(h, damp)
  g = obs.spd_inverse(hd)
  n_keep = jnp.sum(mask, axis=0)
  on_kept = n_keep <= d_in - n_keep if rule == "smaller" else jnp.ones(d_out, bool)
  direct = n_keep <= d_in // 4 if rule == "auto" else jnp.ones(d_out, bool)
  both_sides = lambda: jnp.concatenate([hd, g])
  hw_removed = lambda: hd @ jnp.where(mask, 0.0, w)
  out = jnp.where(mask, w, 0.0)
  iterations, failed = jnp.int32(0), jnp.zeros(d_out, bool)
  if use_cg:
    y, iterations, converged = _cg_removed_side(g, w, ~mask & ~direct[None, :], tol, max_iter)
    out = jnp.where(mask, w - g @ y, 0.0)
    failed = ~converged & ~direct
    if fallback:
      # one column at a time, so that only the failed ones pay for a full-size solve
      def exact(args):
        wj, keepj, hwj, bad, outj = args
        solve = lambda: _direct_column(both_sides(), wj, keepj, hwj, True, True, d_in)
        return lax.cond(bad, solve, lambda: outj)
      out = lax.cond(jnp.any(failed), lambda: lax.map(
          exact, (w.T, mask.T, hw_removed().T, failed, out.T)).T, lambda: out)
      failed = jnp.zeros(d_out, bool)
  if size:
    column = lambda *args: _direct_column(both_sides(), *args, size)
    solved = obs.map_columns(column, [w.T, mask.T, hw_removed().T, on_kept, direct], chunk).T
    out = jnp.where(direct[None, :], solved, out)
  untouched = jnp.all(mask, axis=0, keepdims=True)
  return jnp.where(untouched, w, out), iterations, failed
