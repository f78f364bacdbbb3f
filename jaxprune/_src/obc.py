"""Exact greedy layer-wise OBS (Optimal Brain Compression) with the whole removal path.

For each output column, OBC removes one input at a time, always the one whose removal raises the
layer loss least, ``w_p² / [H⁻¹]_pp``, moves the remaining weights by the OBS update
``-w_p / [H⁻¹]_pp · H⁻¹_:p`` and removes ``p`` from the inverse by the rank-one downdate
``H⁻¹ - H⁻¹_:p H⁻¹_p: / [H⁻¹]_pp`` (Hassibi & Stork 1993; Frantar & Alistarh 2022, "Optimal Brain
Compression", Algorithm 1). Recording the order and the loss of every step once gives the masks
of all sparsities: `obc_mask` picks per-column counts from the recorded losses, and `refit` gives
the weights, which for a fixed removal set are the least-squares optimum the OBS steps reach.

Cost: ``O(d_in³)`` per output column, memory ``O(chunk · d_in²)``; meant for layers up to about a
thousand inputs (SparseGPT scales further). The downdates are applied to the inverse in blocks,
as matrix products, and the inverse is compacted to the remaining inputs once half of them are
gone, which saves 37.5 % of the work of a full path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src import obc_tiles
from jaxprune._src import obs
from jaxprune._src import refit as refit_lib
from jaxprune._src import select
from jaxprune._src import validation

Array = jax.Array

# One column's inverse is d_in² float32; the columns processed together share 16 MiB of them.
_CHUNK_ENTRIES = 1 << 22
# Below this many active inputs compacting no longer pays for its gather.
_MIN_COMPACT = 64
# Downdates of the inverse applied together, as one matrix product instead of rank-one updates.
_BLOCK = 32


class ObcPath(NamedTuple):
  """The greedy removal path of every output column.

  Examples:
    A 2:4 path over uncorrelated inputs (H = I): two removals per column, smallest ``|w|``
    first, then the two kept inputs at infinite loss.

    >>> import numpy as np, jaxprune as jp
    >>> w = np.array([[0.5], [-2.0], [1.0], [3.0]], np.float32)
    >>> path = jp.layerwise.obc_path(w, np.eye(4, dtype=np.float32), pattern="2:4")
    >>> path.order[:, 0].tolist()
    [0, 2, 1, 3]
    >>> np.asarray(path.losses[:, 0], float).round(2).tolist()   # w² · (1 + damp)
    [0.25, 1.01, inf, inf]

  Attributes:
    order: int32 ``(d_in, d_out)``: ``order[t, j]`` is the input removed at step ``t`` of column
      ``j``; each column is a permutation of the inputs. An N:M path removes ``d_in · (m - n) / m``
      inputs; its remaining steps list the kept inputs, at infinite loss.
    losses: float32 ``(d_in, d_out)``: the layer-loss increase of each step, in the dampened
      metric ``H + λI`` (removing a dead input costs 0). Their cumulative sums are the loss of the
      first ``t`` removals, an upper bound on the undampened layer loss.
  """
  order: Array
  losses: Array


class _Plan(NamedTuple):
  """Static shape of a path: ``steps`` removals; with N:M, ``quota`` of every ``group`` inputs
  (``group = 0`` unstructured); ``block`` lazy downdates; compaction above ``min_compact``."""
  steps: int
  group: int
  quota: int
  block: int
  min_compact: int


def _phases(size: int, plan: _Plan) -> list[tuple[int, int]]:
  """(active inputs, removals) per phase. Compacting the inverse once, after half the inputs are
  gone, does 0.625 of the downdate work of none; halving again saves little more but each phase
  is compiled separately."""
  half = size // 2 // plan.block * plan.block
  if size <= plan.min_compact or plan.steps <= half or half == 0:
    return [(size, plan.steps)]
  return [(size, half), (size - half, plan.steps - half)]


class _Column(NamedTuple):
  """State of one column's path: the inverse with the block's pending rank-one downdates, its
  current diagonal, and with N:M the removals ``left`` in each group."""
  inv: obc_tiles.LazyInverse
  diag: Array
  w: Array
  removed: Array
  left: Array
  order: Array
  losses: Array


def _step(t: Array, i: Array, c: _Column, end: int, slots: Array, slot_dead: Array,
          group: int) -> _Column:
  """Removes the cheapest input: step ``t`` of the path, ``i`` of the current block; steps from
  ``end`` on (the tail of a phase's last block) change nothing."""
  size = c.w.shape[0]
  score = jnp.where(slot_dead, 0.0, c.w * c.w / jnp.where(c.removed, 1.0, c.diag))
  blocked = c.removed | (c.left[slots // group] == 0) if group else c.removed
  score = jnp.where(blocked, jnp.inf, score)
  p = size - 1 - jnp.argmin(score[::-1])  # among equal scores the later input goes first
  g, u, s = c.inv
  col = g[p] - u @ (s * u[p])  # column p of the current inverse (it is symmetric)
  gpp, wp = jnp.maximum(col[p], jnp.finfo(col.dtype).tiny), c.w[p]  # > 0 up to rounding
  loss = jnp.where(slot_dead[p], 0.0, wp * wp / gpp)
  left = c.left.at[slots[p] // group].add(-1) if group else c.left
  lazy = obc_tiles.LazyInverse(g, u.at[:, i].set(col), s.at[i].set(1.0 / gpp))
  new = _Column(lazy, c.diag - col * col / gpp, (c.w - col * (wp / gpp)).at[p].set(0.0),
                c.removed.at[p].set(True), left, c.order.at[t].set(slots[p]),
                c.losses.at[t].set(jnp.maximum(loss, 0.0)))
  return jax.tree.map(lambda x, y: jnp.where(t < end, x, y), new, c)


def _fold(c: _Column) -> _Column:
  g, u, s = c.inv
  return c._replace(inv=obc_tiles.LazyInverse(g - (u * s) @ u.T, jnp.zeros_like(u),
                                              jnp.zeros_like(s)))


def _run(c: _Column, start: int, count: int, slots: Array, slot_dead: Array,
         plan: _Plan) -> _Column:
  """``count`` steps from step ``start``, in blocks of ``plan.block`` lazy downdates."""
  def block(b, c):
    t0 = start + b * plan.block
    body = lambda i, c: _step(t0 + i, i, c, start + count, slots, slot_dead, plan.group)
    return _fold(lax.fori_loop(0, plan.block, body, c))

  return lax.fori_loop(0, -(-count // plan.block), block, c)


def _column_path(g: Array, w: Array, dead: Array, plan: _Plan) -> tuple[Array, Array]:
  """One column's greedy OBS path from ``g``, the inverse of the dampened H."""
  d, steps, group = w.shape[0], plan.steps, plan.group
  slots = jnp.arange(d)  # original input of each active slot, increasing
  inv = obc_tiles.LazyInverse(g, jnp.zeros((d, plan.block), g.dtype),
                              jnp.zeros(plan.block, g.dtype))
  c = _Column(inv, jnp.diagonal(g), w, jnp.zeros(d, bool),
              jnp.full(d // group if group else 1, plan.quota, jnp.int32),
              jnp.zeros(d, jnp.int32), jnp.full(d, jnp.inf, jnp.float32))
  done = 0
  for size, n in _phases(d, plan):
    c = _run(c, done, n, slots, dead[slots], plan)
    done += n
    if done < steps:
      keep = jnp.argsort(c.removed, stable=True)[:size - n]
      inv = c.inv._replace(g=jnp.take(jnp.take(c.inv.g, keep, axis=0), keep, axis=1),
                           u=c.inv.u[keep])
      c = c._replace(inv=inv, diag=c.diag[keep], w=c.w[keep], removed=c.removed[keep])
      slots = slots[keep]
  order = c.order
  if steps < d:  # an N:M path lists the inputs it keeps last
    order = order.at[steps:].set(slots[jnp.argsort(c.removed, stable=True)[:d - steps]])
  return order, c.losses


def obc_path(w: Array, h: Array, *, pattern: obs.Pattern = None, damp: float = 0.01,
             chunk: Optional[int] = None) -> ObcPath:
  """The exact greedy OBS removal path of every output column (or column group, for tiles).

  Each column starts from ``H⁻¹`` of the dampened ``H`` and removes, step by step, the input with
  the smallest ``w_p² / [H⁻¹]_pp`` (dead inputs first, at no cost), updating its remaining
  weights and inverse (Frantar & Alistarh 2022, "Optimal Brain Compression", Algorithm 1). With
  N:M the choice is restricted to groups that still have removals left, and the path stops when
  every group of ``m`` keeps ``n`` (OBC's N:M variant). With a block pattern of ``bi × bo``
  tiles each group of ``bo`` columns removes one tile of ``bi`` inputs at a time, the one whose
  multi-weight OBS step costs least, so the path is exact greedy OBS over tiles (about ``d_in³``
  per column group, with lazy downdates and no compaction). Equal scores: the later input (or
  tile) goes first.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> a, b, c = np.array([[1, 2, 0, 1], [0, 1, 1, 2], [2, 0, 1, 1]], np.float32)
    >>> x = np.stack([a, a, b, c], axis=1)   # calibration inputs 0 and 1 are twins
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> path = jp.layerwise.obc_path(w, x.T @ x)   # one run serves every sparsity
    >>> path.order[0].tolist()   # the first removal of each column is one of the twins (free)
    [1, 0]
    >>> [int(jp.layerwise.obc_mask(path, s).sum()) for s in (0.25, 0.5, 0.75)]   # kept
    [6, 4, 2]

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX``.
    pattern: any spelling of `jaxprune._src.obs.parse_pattern` (None, ``"2:4"``,
      `jaxprune.NMPattern`, `jaxprune.BlockPattern`, ``("block", bi, bo)``).
    damp: relative dampening.
    chunk: output columns (column groups, for tiles) processed together (default: as many as
      fit 16 MiB of inverses).

  Returns:
    An `ObcPath`; for tiles its arrays are ``(d_in / bi, d_out / bo)``: the tile rows removed
    from each column group, step by step, and their losses.
  """
  obs.check_layer(w, h)
  obs.check_damp(damp)
  pat = obs.layer_pattern(pattern, np.shape(w))
  d_in, d_out = np.shape(w)
  if chunk is None:
    chunk = max(1, _CHUNK_ENTRIES // max(d_in * d_in, 1))
  if not obs.is_int(chunk) or chunk < 1:
    raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}.")
  w = jnp.asarray(w, jnp.float32)
  if pat.kind == "block":
    block = min(max(_BLOCK // pat.a, 1), max(d_in // pat.a, 1))
    return _obc_tiles(w, h, jnp.float32(damp), pat.a, pat.b, block,
                      min(chunk, max(d_out // pat.b, 1)))
  group, quota = (pat.b, pat.b - pat.a) if pat.kind == "nm" else (0, 0)
  steps = d_in // group * quota if group else d_in
  plan = _Plan(steps, group, quota, _BLOCK, _MIN_COMPACT)
  return _obc_path(w, h, jnp.float32(damp), plan, min(chunk, max(d_out, 1)))


@functools.partial(jax.jit, static_argnames=("plan", "chunk"))
def _obc_path(w: Array, h: Array, damp: Array, plan: _Plan, chunk: int) -> ObcPath:
  hd, dead = obs.dampen(h, damp)
  g = obs.spd_inverse(hd)
  column = lambda wj: _column_path(g, wj, dead, plan)
  order, losses = obs.map_columns(column, [w.T], chunk)
  return ObcPath(order.T, losses.T)


@functools.partial(jax.jit, static_argnames=("rows", "cols", "block", "chunk"))
def _obc_tiles(w: Array, h: Array, damp: Array, rows: int, cols: int, block: int,
               chunk: int) -> ObcPath:
  hd, dead = obs.dampen(h, damp)
  g = obs.spd_inverse(hd)
  d_in, d_out = w.shape
  groups = jnp.moveaxis(w.reshape(d_in, d_out // cols, cols), 1, 0)
  path = lambda wg: obc_tiles.tile_path(g, wg, dead, rows, block)
  order, losses = obs.map_columns(path, [groups], chunk)
  return ObcPath(order.T, losses.T)


def _step_ranks(path: ObcPath) -> Array:
  """Rank of every step in the cross-column removal order.

  A column's later steps cannot be taken before its earlier ones, so each step is ranked by the
  largest loss up to it (the running maximum along the path); steps of all columns are then
  ordered by that key, lowest first, ties by the `unstructured_mask` rule. The first ``k`` ranks
  of a column are a prefix of its path except among equal keys, which only reorders equal
  costs.
  """
  return obs.prune_ranks(lax.cummax(jnp.where(jnp.isnan(path.losses), jnp.inf, path.losses),
                                    axis=0))


@jax.jit
def _greedy_mask(path: ObcPath, total: Array) -> Array:
  """Keep mask with per-column counts that sum to ``total``, chosen greedily by the losses."""
  return _mask_from_counts(path.order, jnp.sum(_step_ranks(path) < total, axis=0))


@jax.jit
def _mask_from_counts(order: Array, counts: Array) -> Array:
  """Keep mask removing the first ``counts[j]`` inputs of each column's path."""
  d_in, d_out = order.shape
  position = jnp.zeros((d_in, d_out), jnp.int32).at[order, jnp.arange(d_out)[None, :]].set(
      jnp.broadcast_to(jnp.arange(d_in, dtype=jnp.int32)[:, None], order.shape))
  return position >= counts[None, :]


def obc_mask(path: ObcPath, sparsity: Union[float, Array, None], *,
             pattern: obs.Pattern = None) -> Array:
  """The mask of a sparsity from an OBC path.

  Unstructured, exactly ``round(sparsity · d_in · d_out)`` weights are removed; the count of each
  column comes from a greedy choice over all columns' steps by their (running maximum of) loss
  increments, so columns whose weights are cheap to remove lose more of them (OBC's global
  per-layer mask). Tiles are chosen the same way over column groups, exactly
  ``round(sparsity · tiles)`` of them. With an N:M path the whole path is removed.

  Examples:
    With uncorrelated inputs (H = I) an OBS step moves no other weight, and the mask is that of
    magnitude pruning over the whole layer:

    >>> import numpy as np, jaxprune as jp
    >>> w = np.array([[1.0, -0.5], [0.75, 1.5], [-2.0, 0.25], [0.125, 3.0]], np.float32)
    >>> path = jp.layerwise.obc_path(w, np.eye(4, dtype=np.float32))
    >>> mask = jp.layerwise.obc_mask(path, 0.375)   # 3 of 8: one of column 0, two of column 1
    >>> mask.astype(int).tolist()
    [[1, 0], [1, 1], [1, 0], [0, 1]]
    >>> bool(np.array_equal(mask, jp.unstructured_mask(jp.magnitude(w), 0.375)))
    True

  Args:
    path: an `ObcPath` from `obc_path`.
    sparsity: fraction in [0, 1], possibly traced; with an N:M pattern None or ``(m - n) / m``.
    pattern: the pattern the path was computed with.

  Returns:
    bool ``(d_in, d_out)`` mask, True = keep.
  """
  steps, columns = path.order.shape
  pat = obs.parse_pattern(pattern)
  if pat.kind == "block":
    pat = obs.tile(pat)
    total = select.num_to_prune(sparsity, steps * columns, "sparsity")
    tiles = _greedy_mask(ObcPath(*path), jnp.asarray(total, jnp.int32))
    return jnp.repeat(jnp.repeat(tiles, pat.a, axis=0), pat.b, axis=1)
  pat = obs.layer_pattern(pat, (steps, columns))
  if pat.kind == "nm":
    obs.check_nm_sparsity(sparsity, pat)
    removed = steps // pat.b * (pat.b - pat.a)
    return _mask_from_counts(path.order, jnp.full((columns,), removed, jnp.int32))
  total = select.num_to_prune(sparsity, steps * columns, "sparsity")
  return _greedy_mask(ObcPath(*path), jnp.asarray(total, jnp.int32))


def obc_losses(path: ObcPath, sparsities: Sequence[float]) -> Array:
  """Layer loss (dampened metric) of `obc_mask` at each of ``sparsities``, from one path.

  The error curve the layer-wise sparsity allocation needs: the summed path losses of the
  removals each sparsity's mask makes, i.e. the loss of `obc` at that sparsity without rerunning
  it.

  Examples:
    Removing every weight costs ``trace(Wᵀ(H + λI)W)``, the dampened loss of the whole layer:

    >>> import numpy as np, jaxprune as jp
    >>> h = np.array([[2.0, 1.0], [1.0, 2.0]], np.float32)   # two correlated inputs
    >>> w = np.array([[1.0, 0.5, -1.0], [1.0, -0.5, 2.0]], np.float32)
    >>> curve = jp.layerwise.obc_losses(jp.layerwise.obc_path(w, h), [0, 1 / 3, 2 / 3, 1])
    >>> np.asarray(curve, float).round(2).tolist()
    [0.0, 0.51, 3.56, 12.65]
    >>> round(float(np.trace(w.T @ (h + 0.02 * np.eye(2)) @ w)), 2)   # λ = 0.01 · mean(diag H)
    12.65

  Args:
    path: an unstructured or tile `ObcPath`.
    sparsities: fractions in [0, 1] of the entries (of the tiles, for a tile path).

  Returns:
    float32 ``(len(sparsities),)`` losses.
  """
  steps, columns = path.order.shape
  totals = [select.num_to_prune(s, steps * columns, "sparsities") for s in sparsities]
  return _curve(ObcPath(*path), jnp.asarray(totals, jnp.int32).reshape(-1))


@jax.jit
def _curve(path: ObcPath, totals: Array) -> Array:
  cum = jnp.cumsum(path.losses, axis=0)
  cum = jnp.concatenate([jnp.zeros((1, cum.shape[1]), cum.dtype), cum])
  counts = jnp.sum(_step_ranks(path)[None] < totals[:, None, None], axis=1)
  return jnp.sum(jnp.take_along_axis(cum, counts, axis=0), axis=1)


def obc(w: Array, h: Array, sparsity: Union[float, Array, None], *, pattern: obs.Pattern = None,
        damp: float = 0.01) -> tuple[Array, Array]:
  """Prunes one layer by exact greedy OBS: path, mask, then the least-squares weights.

  Frantar & Alistarh 2022, "Optimal Brain Compression". See `obc_path`, `obc_mask` and `refit`;
  to prune one layer at several sparsities compute the path once and call those directly.

  Examples:
    A Gram matrix whose inputs 0 and 1 are always equal (``H_00 = H_01 = H_11``):

    >>> import numpy as np, jaxprune as jp
    >>> h = np.array([[6, 6, 4, 3], [6, 6, 4, 3], [4, 4, 6, 3], [3, 3, 3, 6]], np.float32)
    >>> w = np.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]], np.float32)
    >>> w_new, mask = jp.layerwise.obc(w, h, 0.25)
    >>> mask.astype(int).tolist()   # one twin goes in each column ...
    [[1, 0], [0, 1], [1, 1], [1, 1]]
    >>> np.asarray(w_new, float)[:2].round(2).tolist()   # ... its weight moves to the other
    [[1.49, 0.0], [0.0, 0.51]]
    >>> round(float(jp.layerwise.layer_loss(w, w_new, h)), 2)   # magnitude's mask costs 0.75
    0.0

  Args:
    w: ``(d_in, d_out)`` kernel.
    h: ``(d_in, d_in)`` Gram matrix ``XᵀX``.
    sparsity: fraction in [0, 1] (of the tiles, with a block pattern; may be traced); with N:M
      None or ``(m - n) / m``.
    pattern: None, ``"n:m"``, `jaxprune.NMPattern`, `jaxprune.BlockPattern` or
      ``("block", bi, bo)``.
    damp: relative dampening.

  Returns:
    ``(w_new, mask)``: float32 weights, zero where the bool mask is False.
  """
  obs.check_layer(w, h)
  pat = obs.layer_pattern(pattern, np.shape(w))
  if pat.kind == "nm":  # before the path, which is the expensive part
    obs.check_nm_sparsity(sparsity, pat)
  else:
    validation.check_fraction(sparsity, "sparsity")
  path = obc_path(w, h, pattern=pat, damp=damp)
  mask = obc_mask(path, sparsity, pattern=pat)
  return refit_lib.refit(w, h, mask, damp=damp), mask
