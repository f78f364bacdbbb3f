"""The jitted programs behind the mask functions: unit scores, selection, expansion to entries.

One program per `Layout` (leaf shapes, layer axes, pattern): called eagerly it compiles once and
is reused for every sparsity; under an outer `jax.jit` it is inlined. A leaf with leading layer
axes (`jaxprune._src.stacked`) is viewed as ``(slices, *slice_shape)``: its unit scores and masks
are computed slice by slice with `jax.vmap`, its layer-scope selections run over the slices
with `jax.lax.map` (one compiled selection whatever the number of layers), and in global scope
its slices enter the one selection in row-major order, the order they would have as separate
leaves.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src import elementwise
from jaxprune._src import select
from jaxprune._src import stacked as stacked_lib
from jaxprune._src.types import Array, PyTree


def reduce_units(x: Array, axes: tuple[int, ...], how: str) -> Array:
  """Unit score over ``axes``: ``l1``, ``l2`` (sum of squares, which orders units like the norm),
  ``max`` or ``mean`` of ``|x|``; float32."""
  x = jnp.abs(x.astype(jnp.float32))
  if how == "l2":
    return jnp.sum(jnp.square(x), axis=axes)
  if how == "max":
    return jnp.max(x, axis=axes, initial=0.0)
  if how == "mean":
    return jnp.mean(x, axis=axes)
  return jnp.sum(x, axis=axes)


def _after(scores: elementwise.ScoreLike, previous: Array) -> elementwise.Elementwise:
  """``scores`` read only once ``previous`` is computed; the values are unchanged.

  Under jit the per-leaf selections are independent, so XLA runs them side by side and holds
  every leaf's chunk buffers at once (scratch memory about twice the scores' size with many
  leaves). Adding a zero derived from the previous leaf's mask, which XLA cannot fold, makes
  them run one after another. ``x + 0.0 == x`` for every float (``-0.0`` becomes ``+0.0``,
  which the selection already treats as equal).
  """
  zero = jnp.minimum(previous.reshape(-1)[0].astype(jnp.float32), 0.0)
  if isinstance(scores, elementwise.Elementwise):
    fn = scores.fn
    return elementwise.Elementwise(lambda *ops: fn(*ops) + zero, scores.operands)
  return elementwise.Elementwise(lambda s: s + zero, (scores,))


class Layout(NamedTuple):
  """Everything static about one mask computation: the jitted program is cached on it.

  Attributes:
    kind: ``"unstructured"``, ``"structured"``, ``"block"`` or ``"nm"``.
    shapes: every leaf's shape.
    idx: the selected leaves.
    fns: per selected leaf, its `Elementwise` fn, or None.
    scope: ``"layer"`` or ``"global"``.
    options: per kind, per selected leaf and relative to one slice: ``(axes, reduce)``,
      ``(block shapes, reduce)`` or ``(n, m, axes)``.
    leads: per selected leaf, its number of leading layer axes.
    flags: per selected leaf, which of its slices are pruned.
  """
  kind: str
  shapes: tuple[tuple[int, ...], ...]
  idx: tuple[int, ...]
  fns: tuple
  scope: str
  options: tuple
  leads: tuple[int, ...]
  flags: tuple[tuple[bool, ...], ...]


def _units(kind: str, option, x: elementwise.ScoreLike) -> elementwise.ScoreLike:
  """The unit scores of one layer (a leaf, or one slice of a stacked leaf)."""
  if kind == "unstructured":
    return x
  x = x.evaluate() if isinstance(x, elementwise.Elementwise) else x
  if kind == "structured":
    axis, how = option
    return reduce_units(x, tuple(a for a in range(x.ndim) if a != axis), how)
  bs, how = option
  nb = tuple(-(-d // b) for d, b in zip(x.shape, bs))
  # Padding with |x| = 0 keeps partial edge blocks exact: no padding entry raises an l1 / l2 /
  # max score, and the mean divides by the true number of entries of each block.
  padded = jnp.pad(jnp.abs(x.astype(jnp.float32)), [(0, n * b - d)
                                                     for d, b, n in zip(x.shape, bs, nb)])
  inner = tuple(range(1, 2 * x.ndim, 2))
  blocked = padded.reshape([v for n, b in zip(nb, bs) for v in (n, b)])
  s = reduce_units(blocked, inner, "l1" if how == "mean" else how)
  if how == "mean":
    counts = [np.minimum(b, d - b * np.arange(n)) for d, b, n in zip(x.shape, bs, nb)]
    s = s / functools.reduce(np.multiply.outer, counts).astype(np.float32)
  return s


def _expand(kind: str, option, keep_units: Array, shape: tuple[int, ...]) -> Array:
  """Entry masks of one layer of ``shape`` from its unit masks."""
  if kind == "unstructured":
    return keep_units.reshape(shape)
  if kind == "structured":
    unit_shape = [1] * len(shape)
    unit_shape[option[0]] = shape[option[0]]
    return jnp.broadcast_to(keep_units.reshape(unit_shape), shape)
  full = keep_units
  for ax, b in enumerate(option[0]):
    full = jnp.repeat(full, b, axis=ax)
  return full[tuple(slice(0, d) for d in shape)]


def _nm_keep(x: Array, n: int, m: int, ax: int) -> Array:
  """Rank within each group of ``m`` along ``ax``: keep the ``n`` entries ranked first."""
  keys = jnp.moveaxis(select.score_keys(x), ax, -1)
  groups = keys.reshape(keys.shape[:-1] + (keys.shape[-1] // m, m))
  a, b = groups[..., :, None], groups[..., None, :]
  j_before_i = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]
  # rank of entry i = number of entries j that take precedence over it
  rank = jnp.sum((b > a) | ((b == a) & j_before_i), axis=-1)
  return jnp.moveaxis((rank < n).reshape(keys.shape), -1, ax)


def _map_slices(fn, x: elementwise.ScoreLike, *rest: Array) -> Array:
  """``fn(slice, *rest_slices)`` over the leading axis with `jax.lax.map`, `Elementwise` kept lazy
  inside the loop."""
  fns, operands = elementwise.split_elementwise([x])
  return lax.map(lambda a: fn(elementwise.join_elementwise(fns, [a[0]])[0], *a[1:]),
                 (operands[0], *rest))


def _slice_runs(flags: tuple[bool, ...]) -> list[tuple[int, int]]:
  """``[start, end)`` runs of consecutive pruned slices."""
  runs, start = [], None
  for j, f in enumerate(flags + (False,)):
    if f and start is None:
      start = j
    elif not f and start is not None:
      runs.append((start, j))
      start = None
  return runs


def _rows(x: elementwise.ScoreLike, start: int, end: int) -> elementwise.ScoreLike:
  if isinstance(x, elementwise.Elementwise):
    return elementwise.Elementwise(x.fn, [o[start:end] for o in x.operands])
  return x[start:end]


def _select(layout: Layout, units: list, counts: list) -> list[Array]:
  """Prune masks (True = prune) over per-leaf unit scores (``(slices, ...)`` for stacked
  leaves), per leaf or slice (layer scope) or over all of them (global scope)."""
  if layout.scope == "global":
    parts, where = [], []
    for j, (u, lead, flags) in enumerate(zip(units, layout.leads, layout.flags)):
      runs = _slice_runs(flags) if lead else [(0, 1)]
      for start, end in runs:
        parts.append(u if not lead or (start, end) == (0, len(flags)) else _rows(u, start, end))
        where.append((j, start, end))
    pruned = select.prune_lowest(parts, counts[0])
    out = [jnp.zeros(u.shape, bool) for u in units]
    for (j, start, end), p in zip(where, pruned):
      out[j] = p if not layout.leads[j] or (start, end) == (0, len(layout.flags[j])) else (
          out[j].at[start:end].set(p))
    return out
  out: list[Array] = []
  for u, k, lead in zip(units, counts, layout.leads):
    previous = [p for p in out if p.size]
    if previous:
      u = _after(u, previous[-1])
    if lead:
      out.append(_map_slices(lambda s, kk: select.prune_lowest([s], kk)[0], u, k))
    else:
      out.append(select.prune_lowest([u], k)[0])
  return out


@functools.partial(jax.jit, static_argnums=0)
def _compute(layout: Layout, operands: list, counts: list) -> list[Array]:
  leaves = elementwise.join_elementwise(layout.fns, operands)
  keep = []
  if layout.kind == "nm":
    n, m, axes = layout.options
    for j, x in enumerate(leaves):
      x = x.evaluate() if isinstance(x, elementwise.Elementwise) else x
      k = _nm_keep(x, n, m, axes[j] + layout.leads[j])
      flags = np.asarray(layout.flags[j], bool)
      if not flags.all():  # slices that are not pruned stay dense
        k = k | ~flags.reshape(x.shape[:layout.leads[j]] + (1,) * (x.ndim - layout.leads[j]))
      keep.append(k)
  else:
    options = [tuple(o[j] for o in layout.options[:-1]) + layout.options[-1:]
               for j in range(len(leaves))]
    units = []
    for x, lead, option in zip(leaves, layout.leads, options):
      if not lead:
        units.append(_units(layout.kind, option, x))
      elif layout.kind == "unstructured":
        units.append(stacked_lib.as_slices(x, lead))
      else:
        x = x.evaluate() if isinstance(x, elementwise.Elementwise) else x
        units.append(jax.vmap(functools.partial(_units, layout.kind, option))(
            stacked_lib.as_slices(x, lead)))
    pruned = _select(layout, units, counts)
    for j, (p, lead, option) in enumerate(zip(pruned, layout.leads, options)):
      shape = layout.shapes[layout.idx[j]]
      if lead:
        one = functools.partial(_expand, layout.kind, option, shape=shape[lead:])
        keep.append(jax.vmap(one)(~p).reshape(shape))
      else:
        keep.append(_expand(layout.kind, option, ~p, shape))
  out = dict(zip(layout.idx, keep))
  return [out[i] if i in out else jnp.ones(s, bool) for i, s in enumerate(layout.shapes)]


def run(kind: str, leaves: list, idx: list[int], treedef, scope: str, options: tuple,
        counts: list, layers: Optional[list[stacked_lib.Layers]] = None) -> PyTree:
  """The masks of one mask function: ``options`` per selected leaf, relative to one slice.

  Args:
    kind: ``"unstructured"``, ``"structured"``, ``"block"`` or ``"nm"``.
    leaves: every leaf's scores (arrays or `Elementwise`).
    idx: the selected leaves.
    treedef: the tree structure of the result.
    scope: ``"layer"`` or ``"global"``.
    options: see `Layout`.
    counts: per selected leaf its count, or its per-slice counts (layer scope), or one count
      (global scope); none for N:M.
    layers: per leaf its `stacked.Layers` (None: nothing stacked).

  Returns:
    The mask pytree (all True on leaves that are not selected).
  """
  fns, operands = elementwise.split_elementwise([leaves[i] for i in idx])
  leads = tuple(layers[i].lead if layers else 0 for i in idx)
  flags = tuple(layers[i].flags if layers else (True,) for i in idx)
  layout = Layout(kind, tuple(tuple(x.shape) for x in leaves), tuple(idx), fns, scope, options,
                  leads, flags)
  masks = _compute(layout, operands, [jnp.asarray(k, jnp.int32) for k in counts])
  return jax.tree.unflatten(treedef, masks)


__all__ = ["Layout", "reduce_units", "run"]
