"""SparseGPT: one pass over the inputs with lazy OBS updates and adaptive masks.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (Algorithm 1). With ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), the
inputs are visited in order; removing weights of input ``r`` and compensating with the inputs
after it costs ``w_rj² / U_rr²`` and moves later inputs by ``-U_r,: · (w_rj - q_rj) / U_rr``, which
is the OBS update when earlier inputs are frozen. Updates are applied within a block of inputs at
once and to the rest of the kernel once per block. The mask of each block is chosen when the pass
reaches it, from the already updated weights: unstructured by the lowest ``w² / U_rr²`` of the
block, N:M per group of ``m`` inputs when the pass reaches the group, blocks by the summed score
of each tile.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from jaxprune._src import obs
from jaxprune._src import select

Array = jax.Array


def _nm_prune(scores: Array, n: int) -> Array:
  """True for all but the ``n`` best of each column of an ``(m, d_out)`` group; lower scores go
  first and, among equal scores, the later input (`jaxprune.nm_mask`'s rule)."""
  keys = select.score_keys(scores)
  m = keys.shape[0]
  a, b = keys[:, None, :], keys[None, :, :]
  earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]
  rank = jnp.sum((b > a) | ((b == a) & earlier), axis=1)  # inputs preferred over each input
  return rank >= n


def _block_prune(scores: Array, count: Array, kind: str, a: int, b: int) -> Array:
  """Prune flags of one block of inputs chosen up front (unstructured or tiles)."""
  if kind == "none":
    return obs.prune_lowest(scores, count)
  rows, cols = scores.shape
  tiles = scores.reshape(rows // a, a, cols // b, b).sum(axis=(1, 3))
  pruned = obs.prune_lowest(tiles, count)
  return jnp.repeat(jnp.repeat(pruned, a, axis=0), b, axis=1)


def _block_counts(total: Array, free: Array, sizes: Sequence[int]) -> Array:
  """Splits ``total`` removals over consecutive blocks of ``sizes`` candidates.

  The ``free`` candidates of each block (weights of dead inputs, which cost nothing) are taken
  first, in block order; the rest is split in proportion to each block's other candidates by
  differences of rounded cumulative targets, so the counts sum to ``total`` exactly and every
  block prunes the same fraction of its live weights.
  """
  free_cum = jnp.cumsum(free)
  on_free = jnp.minimum(total, free_cum[-1])
  live_cum = jnp.cumsum(jnp.asarray(sizes, jnp.int32) - free)
  rest = total - on_free
  target = jnp.round(rest.astype(jnp.float32) * (live_cum / jnp.maximum(live_cum[-1], 1)))
  target = target.astype(jnp.int32).at[-1].set(rest)
  cum = jnp.minimum(free_cum, on_free) + target
  return jnp.diff(cum, prepend=0)


def _upper_inverse_factor(hd: Array) -> Array:
  """``U`` upper triangular with ``UᵀU = hd⁻¹``.

  With ``R`` the upper triangular factor of ``hd = RRᵀ`` (the lower Cholesky factor of ``hd``
  with rows and columns reversed), ``hd⁻¹ = R⁻ᵀR⁻¹``, so ``U = R⁻¹``: one factorisation and one
  triangular solve, where inverting ``hd`` first and factorising the inverse takes two of each.
  """
  r = jnp.linalg.cholesky(hd[::-1, ::-1])[::-1, ::-1]
  return jsl.solve_triangular(r, jnp.eye(hd.shape[0], dtype=hd.dtype), lower=False)


def _score(w1: Array, diag: Array, dead1: Array) -> Array:
  """``w² / U_rr²``, 0 for dead inputs."""
  return jnp.where(dead1[:, None], 0.0, w1 * w1 / (diag * diag)[:, None])


def _block(w: Array, keep: Array, start: Union[int, Array], size: int, count: Array, u: Array,
           dead: Array, kind: str, a: int, b: int) -> tuple[Array, Array]:
  """Prunes the ``size`` inputs from ``start`` (already updated by the earlier blocks) one by
  one, then applies their OBS updates to every later input in one product."""
  w1 = lax.dynamic_slice_in_dim(w, start, size)
  u1 = lax.dynamic_slice(u, (start, start), (size, size))
  diag = jnp.diagonal(u1)
  dead1 = lax.dynamic_slice_in_dim(dead, start, size)
  if kind == "nm":
    prune = jnp.zeros(w1.shape, bool)
  else:
    prune = _block_prune(_score(w1, diag, dead1), count, kind, a, b)

  def body(r, carry):
    w1, err, prune = carry
    if kind == "nm":  # choose the group's mask when the pass reaches it
      def choose(prune):
        s = _score(lax.dynamic_slice_in_dim(w1, r, b), lax.dynamic_slice_in_dim(diag, r, b),
                   lax.dynamic_slice_in_dim(dead1, r, b))
        return lax.dynamic_update_slice_in_dim(prune, _nm_prune(s, a), r, 0)
      prune = lax.cond(r % b == 0, choose, lambda p: p, prune)
    row = w1[r]
    q = jnp.where(prune[r], 0.0, row)
    e = (row - q) / u1[r, r]
    # U is upper triangular: row r of U1 moves only inputs r.. of the block
    w1 = (w1 - u1[r][:, None] * e[None, :]).at[r].set(q)
    return w1, err.at[r].set(e), prune

  w1, err, prune = lax.fori_loop(0, size, body, (w1, jnp.zeros_like(w1), prune))
  later = (jnp.arange(w.shape[0]) >= start + size)[:, None]
  update = lax.dynamic_slice_in_dim(u, start, size).T @ err
  w = lax.dynamic_update_slice_in_dim(w, w1, start, 0) - jnp.where(later, update, 0.0)
  return w, lax.dynamic_update_slice_in_dim(keep, ~prune, start, 0)


@functools.partial(jax.jit, static_argnames=("size", "kind", "a", "b"))
def _sparsegpt(w: Array, h: Array, total: Array, damp: Array, size: int, kind: str, a: int,
               b: int) -> tuple[Array, Array]:
  hd, dead = obs.dampen(h, damp)
  u = _upper_inverse_factor(hd)
  w0 = jnp.asarray(w, jnp.float32)
  d_in, d_out = w0.shape
  full, rest = divmod(d_in, size)
  sizes = [size] * full + ([rest] if rest else [])
  if kind == "none":
    free = jnp.stack([jnp.sum(dead[i * size:i * size + n], dtype=jnp.int32)
                      for i, n in enumerate(sizes)]) * d_out
    counts = _block_counts(total, free, [n * d_out for n in sizes])
  elif kind == "block":
    tiles = [n // a * (d_out // b) for n in sizes]
    counts = _block_counts(total, jnp.zeros(len(sizes), jnp.int32), tiles)
  else:
    counts = jnp.zeros(len(sizes), jnp.int32)
  args = (u, dead, kind, a, b)
  # one compiled loop over the equal blocks, whatever their number
  step = lambda i, c: _block(*c, i * size, size, counts[i], *args)
  w_new, keep = lax.fori_loop(0, full, step, (w0, jnp.ones(w0.shape, bool)))
  if rest:
    w_new, keep = _block(w_new, keep, full * size, rest, counts[full], *args)
  w_new = jnp.where(keep, w_new, 0.0)
  # a column without removals is only ever updated by exact zeros; return it bit for bit
  return jnp.where(jnp.all(keep, axis=0, keepdims=True), w0, w_new), keep


def sparsegpt(w: Array, h: Array, sparsity: Union[float, Array, None], *,
              pattern: obs.Pattern = None, block_size: int = 128,
              damp: float = 0.01) -> tuple[Array, Array]:
  """Prunes one layer with SparseGPT (Frantar & Alistarh 2023, Algorithm 1).

  Unstructured, exactly ``round(sparsity · d_in · d_out)`` weights are removed: the weights of
  dead inputs first (they cost nothing), the rest split over the blocks of inputs in proportion
  to their live weights, and within a block the lowest ``w² / U_rr²`` go. N:M (``"n:m"``) keeps
  ``n`` of every ``m`` consecutive inputs per output column, chosen group by group (dead inputs
  first); a block pattern removes exactly ``round(sparsity · tiles)`` whole ``bi × bo`` tiles,
  split over blocks in proportion to their tiles. Ties follow `jaxprune.unstructured_mask`.

  Jittable, with ``sparsity`` static or traced (the per-block split of the count is rounded in
  float32 either way; the total is exact). ``block_size`` is rounded down to a multiple of ``m``
  or ``bi`` (at least one group).

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> f = np.array([[1, 0, 2], [2, 1, 0], [0, 1, 1], [1, 2, 1]], np.float32)   # 3 features
    >>> x = np.concatenate([f[:, :1], f], axis=1)   # calibration inputs 0 and 1 are twins
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> w_new, mask = jp.layerwise.sparsegpt(w, x.T @ x, 0.25)
    >>> mask.astype(int).tolist()   # input 0 goes; its twin, later in the pass, takes its weights
    [[0, 0], [1, 1], [1, 1], [1, 1]]
    >>> np.asarray(w_new, float)[:2].round(2).tolist()
    [[0.0, 0.0], [1.48, 0.51]]
    >>> _, nm = jp.layerwise.sparsegpt(w, x.T @ x, None, pattern="2:4")
    >>> nm.astype(int).T.tolist()   # two of the four inputs of each column
    [[0, 1, 1, 0], [0, 1, 0, 1]]

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX``.
    sparsity: fraction in [0, 1]; with N:M None or ``(m - n) / m``.
    pattern: None, ``"n:m"``, `jaxprune.NMPattern`, `jaxprune.BlockPattern` or
      ``("block", bi, bo)`` (see `jaxprune._src.obs.parse_pattern`).
    block_size: inputs per lazy-update block.
    damp: relative dampening.

  Returns:
    ``(w_new, mask)``: float32 weights, zero where the bool mask is False.
  """
  pat, size = _plan(w, h, pattern, block_size, damp)
  return _sparsegpt(w, h, jnp.asarray(_total(w, sparsity, pat), jnp.int32), jnp.float32(damp),
                    size, pat.kind, pat.a, pat.b)


def _plan(w: Array, h: Array, pattern: obs.Pattern, block_size: int,
          damp: float) -> tuple[obs.ParsedPattern, int]:
  """Checks a layer's arguments; its pattern and the lazy-update block size."""
  obs.check_layer(w, h)
  obs.check_damp(damp)
  if not obs.is_int(block_size) or block_size < 1:
    raise ValueError(f"block_size: expected a positive int, got {block_size!r}.")
  d_in, d_out = np.shape(w)
  pat = obs.layer_pattern(pattern, (d_in, d_out))
  unit = {"none": 1, "nm": pat.b, "block": pat.a}[pat.kind]
  return pat, min(max(block_size // unit, 1) * unit, d_in)


def _total(w: Array, sparsity: Union[float, Array, None], pat: obs.ParsedPattern) -> Any:
  """How many weights (or tiles) ``sparsity`` removes; 0 for N:M, whose count is fixed."""
  d_in, d_out = np.shape(w)
  if pat.kind == "nm":
    obs.check_nm_sparsity(sparsity, pat)
    return 0
  if pat.kind == "block":
    return select.num_to_prune(sparsity, d_in // pat.a * (d_out // pat.b), "sparsity")
  return select.num_to_prune(sparsity, d_in * d_out, "sparsity")


@functools.partial(jax.jit, static_argnames=("size", "kind", "a", "b"))
def _losses(w: Array, h: Array, totals: Array, damp: Array, size: int, kind: str, a: int,
            b: int) -> Array:
  # vmap over the counts only: the factorisation of H, which does not depend on them, is
  # computed once for all of them.
  one = lambda total: obs.layer_loss(w, _sparsegpt(w, h, total, damp, size, kind, a, b)[0], h)
  return jax.vmap(one)(totals)


def sparsegpt_losses(w: Array, h: Array, sparsities: Sequence[float], *,
                     pattern: obs.Pattern = None, block_size: int = 128,
                     damp: float = 0.01) -> Array:
  """Layer loss of `sparsegpt` at each of ``sparsities``, in one batched run (one compilation,
  one factorisation of ``H``).

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> x = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [2, 1, 1]], np.float32)   # 3 inputs
    >>> h, w = x.T @ x, np.array([[1.0, -1.0], [0.5, 2.0], [-0.25, 1.0]], np.float32)
    >>> losses = jp.layerwise.sparsegpt_losses(w, h, [0.5, 1.0])
    >>> w_half, _ = jp.layerwise.sparsegpt(w, h, 0.5)   # what a separate run gives
    >>> bool(np.isclose(losses[0], jp.layerwise.layer_loss(w, w_half, h)))
    True
    >>> np.asarray(losses, float).round(1).tolist()
    [2.8, 18.9]
    >>> bool(np.isclose(losses[1], np.trace(w.T @ h @ w)))   # removing every weight: w_new = 0
    True

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX``.
    sparsities: fractions in [0, 1].
    pattern: as in `sparsegpt`.
    block_size: see `sparsegpt`.
    damp: see `sparsegpt`.

  Returns:
    float32 ``(len(sparsities),)``: ``trace(ΔᵀHΔ)`` with the undampened ``h``.
  """
  pat, size = _plan(w, h, pattern, block_size, damp)
  totals = [_total(w, s, pat) for s in sparsities]
  if not totals:
    return jnp.zeros((0,), jnp.float32)
  return _losses(w, h, jnp.asarray(totals, jnp.int32), jnp.float32(damp), size, pat.kind,
                 pat.a, pat.b)
