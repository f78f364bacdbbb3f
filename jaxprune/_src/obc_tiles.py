"""Exact greedy layer-wise OBS over tiles: the block-pattern path of `jaxprune.layerwise.obc_path`.

Each step removes the ``rows``-input tile whose removal raises the layer loss of a group of
output columns least, moves the group by the multi-weight OBS update and downdates the inverse
Hessian by rank ``rows`` (Hassibi & Stork 1993; Frantar & Alistarh 2022, "Optimal Brain
Compression", Sec. 4). The downdates are applied lazily, a block of steps at a time, while the
tiles' diagonal blocks of the inverse are kept current at every step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class LazyInverse(NamedTuple):
  """The inverse Hessian of a greedy OBS path with the downdates of the current block pending.

  The inverse is ``g - Σ_i u_i s_i u_iᵀ`` over the removals ``i`` of the block: ``u_i`` the
  ``i``-th slice of columns of ``u`` (one column per removed input, ``bi`` for a tile) and
  ``s_i = s[i]`` the inverse of the removed pivot (a scalar, or a ``(bi, bi)`` block). Folding
  them into ``g`` once per block turns the rank-one (rank-``bi``) downdates of OBS (Hassibi &
  Stork 1993) into one matrix product (Frantar & Alistarh 2022, "Optimal Brain Compression").
  """
  g: Array
  u: Array
  s: Array


class Tiles(NamedTuple):
  """State of one group of ``bo`` columns removing tiles of ``bi`` inputs: the inverse with the
  block's pending downdates, and ``diag``, its ``(bi, bi)`` diagonal blocks, kept current at
  every step."""
  inv: LazyInverse
  diag: Array
  w: Array
  removed: Array
  order: Array
  losses: Array


def spd_solve(a: Array, b: Array) -> Array:
  """``a⁻¹ b`` for (batches of) small symmetric positive definite ``a``, through Cholesky, which
  compiles several times faster than the LU of `jnp.linalg.solve`."""
  chol = jnp.linalg.cholesky(a)
  z = lax.linalg.triangular_solve(chol, b, left_side=True, lower=True)
  return lax.linalg.triangular_solve(chol, z, left_side=True, lower=True, transpose_a=True)


def tile_step(t: Array, i: Array, c: Tiles, end: int, live: Array) -> Tiles:
  """Removes the cheapest tile: step ``t`` of the path, ``i`` of the current block; steps from
  ``end`` on (the tail of the last block) change nothing."""
  tiles, rows, _ = c.diag.shape
  d, cols = c.w.shape
  g, u, s = c.inv
  eye = jnp.eye(rows, dtype=g.dtype)
  active = t < end
  wt = (c.w * live).reshape(tiles, rows, cols)
  blocks = jnp.where(c.removed[:, None, None], eye, c.diag)
  score = jnp.sum(wt * spd_solve(blocks, wt), axis=(1, 2))
  score = jnp.where(c.removed, jnp.inf, score)
  p = tiles - 1 - jnp.argmin(score[::-1])  # among equal scores the later tile goes first
  q = p * rows
  u3 = u.reshape(d, -1, rows)
  pending = jnp.einsum("ibc,qic->ibq", s, lax.dynamic_slice_in_dim(u3, q, rows))
  col = lax.dynamic_slice_in_dim(g, q, rows, axis=1) - jnp.einsum("dib,ibq->dq", u3, pending)
  gone = jnp.repeat(c.removed, rows)[:, None]
  col = jnp.where(active & ~gone, col, 0.0)  # G_:Q of the current inverse
  inv = spd_solve(jnp.where(active, lax.dynamic_slice_in_dim(col, q, rows), eye), eye)
  w = c.w - col @ (inv @ lax.dynamic_slice_in_dim(c.w, q, rows))
  on = (jnp.arange(d) // rows == p)[:, None] & active
  col3 = col.reshape(tiles, rows, rows)
  lazy = LazyInverse(g, lax.dynamic_update_slice_in_dim(u, col, i * rows, axis=1),
                     s.at[i].set(inv))
  return Tiles(lazy, c.diag - jnp.einsum("kab,bc,kdc->kad", col3, inv, col3),
                jnp.where(on, 0.0, w), c.removed.at[p].set(c.removed[p] | active),
                jnp.where(active, c.order.at[t].set(p), c.order),
                jnp.where(active, c.losses.at[t].set(jnp.maximum(score[p], 0.0)), c.losses))


def tile_path(g: Array, w: Array, dead: Array, rows: int, block: int) -> tuple[Array, Array]:
  """One column group's greedy OBS path over tiles of ``rows`` consecutive inputs.

  Removing the inputs ``Q`` of a tile from every column of the group costs
  ``Σ_j w_Qjᵀ [G_QQ]⁻¹ w_Qj`` and moves the group by ``-G_:Q [G_QQ]⁻¹ w_Q`` (the multi-weight OBS
  step, Hassibi & Stork 1993; Frantar & Alistarh 2022, Sec. 4); ``G`` loses ``Q`` by the rank-
  ``rows`` downdate ``G - G_:Q [G_QQ]⁻¹ G_Q:``, applied lazily ``block`` steps at a time. Dead
  inputs are decoupled from the others in ``G``, so dropping their weights from the cost leaves
  the cost of the live ones exact.
  """
  d, cols = w.shape
  tiles = d // rows
  live = jnp.where(dead, 0.0, 1.0)[:, None]
  diag = jnp.moveaxis(jnp.diagonal(g.reshape(tiles, rows, tiles, rows), axis1=0, axis2=2), -1, 0)
  inv = LazyInverse(g, jnp.zeros((d, block * rows), g.dtype),
                    jnp.zeros((block, rows, rows), g.dtype))
  c = Tiles(inv, diag, w, jnp.zeros(tiles, bool), jnp.zeros(tiles, jnp.int32),
            jnp.full(tiles, jnp.inf, jnp.float32))

  def run_block(b, c):
    c = lax.fori_loop(0, block, lambda i, c: tile_step(b * block + i, i, c, tiles, live), c)
    g, u, s = c.inv
    g = g - jnp.einsum("dib,ibc->dic", u.reshape(d, block, rows), s).reshape(d, -1) @ u.T
    return c._replace(inv=LazyInverse(g, jnp.zeros_like(u), jnp.zeros_like(s)))

  c = lax.fori_loop(0, -(-tiles // block), run_block, c)
  return c.order, c.losses


__all__ = ["LazyInverse", "Tiles", "spd_solve", "tile_path", "tile_step"]
