"""Exact, sort-free selection of the k lowest scores over a list of arrays.

Sorting a parameter-sized score vector to find a threshold costs many passes over it, and on a
sharded vector `jnp.sort` all-gathers it. Instead the scores are mapped to order-preserving
`uint32` keys and the k-th smallest key is found by a two-pass radix select: a 2¹⁶-bin histogram
of the high 16 bits locates the bin holding the k-th key, a second histogram of the low 16 bits
inside that bin pins it. Histograms are built per array and added, so a global threshold over a
parameter tree never concatenates the tree, and under `shard_map` the per-shard histograms are
combined with a `psum` of 2¹⁶ integers.

Ties at the threshold are broken the same way: the entries equal to the threshold whose
*positions* (leaf order, then row-major index) are largest are pruned first, which is a second
radix select over positions restricted to the tied entries. Every count is exact, so the number
pruned is exactly k, jitted or not, on one device or sharded.

Every pass reads the scores in chunks (2¹⁸ entries on CPU, 2²⁴ on accelerators) inside a
`lax.fori_loop`, recomputing the keys per chunk: the only scratch memory is one chunk's keys and
bins and the histogram, never a parameter-sized array. With `Elementwise` scores even the
scores themselves are computed per chunk from their inputs (``|w|`` from ``w``), which is how
`jaxprune.prune` updates masks inside a train step without raising its memory footprint.

On a single device, selections over at most 2¹⁴ entries find the threshold key and the tie cut
by bisection over the concatenated keys and positions instead (32 counting passes each): the
same order and the same result, cheaper at that size than four 2¹⁶-bin histograms or a sort.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src import validation
from jaxprune._src.elementwise import Elementwise, ScoreLike, join_elementwise, split_elementwise
from jaxprune._src.types import Array

CountReducer = Callable[[Array], Array]

_RADIX_BITS = 16
_BINS = 1 << _RADIX_BITS
_LOW_MASK = _BINS - 1
_MAX_COUNT = 2**31 - 1  # counts are int32


def score_keys(x: Array) -> Array:
  """Maps float scores to ``uint32`` keys whose unsigned order is the scores' numeric order.

  NaN maps to key 0, below every number (NaN scores are pruned first); ``-0.0`` and ``+0.0`` map
  to the same key; ``±inf`` order as numbers. XLA flushes denormals to zero, so denormal scores
  tie with zero. Scores of any float dtype are compared as float32
  (exact for bf16/f16).

  Args:
    x: float array of scores.

  Returns:
    ``uint32`` array of the same shape.
  """
  x = jnp.asarray(x, jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)  # fold -0.0 into +0.0: equal scores tie
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  # Flip all bits of negatives (reverses their order) and set the sign bit of non-negatives.
  keys = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
  return jnp.where(jnp.isnan(x), jnp.uint32(0), keys)


def num_to_prune(sparsity: Any, n: int, name: str = "sparsity",
                 path: Optional[str] = None) -> Union[int, Array]:
  """Number of entries to prune out of ``n``: ``round(sparsity * n)``, half to even.

  A concrete sparsity gives Python's exact ``round(s * n)``. A traced one is computed in float32,
  clipped to [0, n] (NaN counts as 0): this equals Python's result unless ``s·n`` lies within
  float32 rounding of a half-integer.

  Args:
    sparsity: fraction in [0, 1], Python number or (traced) scalar array.
    n: number of candidate entries (static).
    name: argument name for error messages.
    path: leaf path for error messages.

  Returns:
    A Python int for concrete input, else an int32 scalar array.
  """
  if n > _MAX_COUNT:
    raise validation.error(name, f"a selection over at most {_MAX_COUNT} entries (int32 counts)",
                           f"{n} entries", path)
  s = validation.check_fraction(sparsity, name, path)
  if not validation.is_traced(s):
    return int(round(s * n))
  s = jnp.asarray(s, jnp.float32)
  s = jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))
  return jnp.clip(jnp.round(s * n), 0, n).astype(jnp.int32)


def _check_count(k: Any, total: int) -> Union[int, Array]:
  """``k`` as a Python int checked against ``[0, total]``, or an integer tracer as is."""
  dtype = getattr(k, "dtype", None)
  if validation.is_traced(k):
    if np.ndim(k) != 0 or not jnp.issubdtype(dtype, jnp.integer):
      raise validation.error("k", "an integer scalar", f"{dtype}{list(np.shape(k))}")
    return k
  if dtype is not None and np.ndim(k) == 0 and jnp.issubdtype(dtype, jnp.integer):
    k = int(k)  # concrete integer arrays are counts too
  return validation.check_int(k, "k", 0, total)


# Entries per chunk on CPU: one chunk's keys and bins (2 MiB) stay in cache, and the selection's
# temporaries are O(chunk) whatever the model size (benchmarks/selection.py prints them).
_CHUNK = 1 << 18
# On GPU and TPU each loop iteration has a fixed cost (on GPU the loop predicate goes back to
# the host), so chunks are larger there: 2^24 entries, 128 MiB of keys and bins, keep a 10^9-entry
# selection to 60 iterations per pass.
_ACCELERATOR_CHUNK = 1 << 24


def _chunk_size() -> int:
  return _CHUNK if jax.default_backend() == "cpu" else _ACCELERATOR_CHUNK


# (start, size) -> values of the flat entries [start, start + size); ``start`` is a Python int
# or a traced int32 loop index, ``size`` static.
_Reader = Callable[[Union[int, Array], int], Array]
# (leaf index, start, size) -> uint32 values and a validity mask (None: all valid).
_KeyReader = Callable[[int, Union[int, Array], int], tuple[Array, Optional[Array]]]


def _slice(flat: Array, start: Union[int, Array], size: int) -> Array:
  if isinstance(start, int):
    return flat if (start, size) == (0, flat.shape[0]) else flat[start:start + size]
  # A traced start comes from `_histogram`, tied there to the histogram so far. Tying the data
  # to it too makes each pass read its arrays one after another, and keeps XLA from merging
  # the same array's key computations across passes into one array held through all of them.
  flat, _ = lax.optimization_barrier((flat, start))
  return lax.dynamic_slice_in_dim(flat, start, size)


def _score_reader(scores: ScoreLike) -> _Reader:
  if isinstance(scores, Elementwise):
    flats = [o.reshape(-1) for o in scores.operands]

    def read(start, size):
      out = scores.fn(*[_slice(f, start, size) for f in flats])
      if jnp.shape(out) != (size,):
        raise ValueError(f"Elementwise: fn must map chunks of shape ({size},) to scores of the "
                         f"same shape, got shape {jnp.shape(out)}.")
      return out
    return read
  flat = scores.reshape(-1)
  return lambda start, size: _slice(flat, start, size)


def _flat_index(start: Union[int, Array], size: int) -> Array:
  return jnp.asarray(start).astype(jnp.uint32) + lax.iota(jnp.uint32, size)


def _position_reader(positions: Union[None, Array, Callable[[Array], Array]], offset: int,
                     shape: tuple[int, ...]) -> _Reader:
  if positions is None:
    return lambda start, size: jnp.uint32(offset) + _flat_index(start, size)
  if callable(positions):
    return lambda start, size: positions(_flat_index(start, size))
  positions = jnp.asarray(positions)
  if positions.shape != shape or positions.dtype != jnp.uint32:
    raise ValueError(f"positions: expected uint32 arrays shaped like the scores {shape}, got "
                     f"{positions.dtype} of shape {positions.shape}.")
  flat = positions.reshape(-1)
  return lambda start, size: _slice(flat, start, size)


def _counted_reader(counted: Optional[Array]) -> Callable[[Union[int, Array], int],
                                                          Optional[Array]]:
  if counted is None:
    return lambda start, size: None
  counted = jnp.asarray(counted, bool)
  if counted.ndim == 0:
    return lambda start, size: counted
  flat = counted.reshape(-1)
  return lambda start, size: _slice(flat, start, size)


def _histogram(read: _KeyReader, sizes: Sequence[int], digit: Callable[[Array], Array],
               reduce_counts: CountReducer) -> Array:
  """2¹⁶-bin histogram of ``digit(values)`` over the valid entries of every array.

  Arrays are read in chunks of `_chunk_size()` entries (a `fori_loop` over the full chunks,
  then the rest), and each chunk is read only once the histogram of the previous ones exists,
  so only one chunk's values and bins exist at a time.
  """
  hist = None
  chunk = _chunk_size()
  for i, n in enumerate(sizes):
    def add(hist, start, size, i=i):
      if hist is not None:
        # The read waits for the histogram so far (see `_slice`). Without that, XLA computed
        # the keys and bins of every array up front and shared each array's keys between
        # passes; with many arrays all were live at once, twice the scores' size.
        start, hist = lax.optimization_barrier((jnp.asarray(start, jnp.int32), hist))
      values, valid = read(i, start, size)
      bins = digit(values).astype(jnp.int32)
      if hist is None:
        # Zeros derived from the first bins (a zero XLA cannot fold), so the histogram is
        # allocated when first needed: XLA otherwise materializes every selection's
        # histograms up front, 256 KiB each per pass and per leaf in layer scope.
        hist = jnp.zeros((_BINS,), jnp.int32) + jnp.minimum(bins[0], 0)
      else:
        # Always true, but XLA cannot know it: the bins depend on the histogram so far, so they
        # are computed just before their scatter (optimization barriers alone do not order work
        # on XLA:CPU; they stop XLA from sharing keys between passes).
        after = hist[0] >= 0
        valid = after if valid is None else valid & after
      if valid is not None:
        bins = jnp.where(valid, bins, _BINS)  # out of range: dropped by the scatter
      return hist.at[bins].add(1, mode="drop")

    full, rest = divmod(n, chunk)
    if full:
      # The first chunk outside the loop: under shard_map the histogram then already varies
      # over the mesh axes the scores vary over, as a loop carry must from its first iteration.
      hist = add(hist, 0, chunk)
    if full > 1:
      hist = lax.fori_loop(1, full, lambda j, h: add(h, j * chunk, chunk), hist)
    if rest:
      hist = add(hist, full * chunk, rest)
  if hist is None:  # no entries at all
    hist = jnp.zeros((_BINS,), jnp.int32)
  return reduce_counts(hist)


def _first_reaching(hist: Array, k: Array) -> tuple[Array, Array]:
  """Index ``b`` of the first bin whose cumulative count reaches ``k``, and the count below it."""
  cum = jnp.cumsum(hist)
  b = jnp.argmax(cum >= k)  # k <= total count, so some bin reaches it
  return b, cum[b] - hist[b]


def _kth_smallest(read: _KeyReader, sizes: Sequence[int], k: Array,
                  reduce_counts: CountReducer) -> tuple[Array, Array, Array]:
  """The k-th smallest valid ``uint32`` over several arrays together: a two-pass radix select.

  Args:
    read: ``(array index, start, size) -> (values, valid)`` for flat entries of each array.
    sizes: number of entries of each array.
    k: 1-based rank, ``1 <= k <= number of valid entries`` (int32, may be traced).
    reduce_counts: combines histograms across shards (e.g. ``lambda h: lax.psum(h, "x")``).

  Returns:
    ``(t, less, equal)``: the k-th smallest value, and how many valid entries are below it and
    equal to it.
  """
  high = _histogram(read, sizes, lambda v: v >> _RADIX_BITS, reduce_counts)
  b, below_b = _first_reaching(high, k)
  b_u = b.astype(jnp.uint32)

  def read_in_bin(i, start, size):
    values, valid = read(i, start, size)
    same = (values >> _RADIX_BITS) == b_u
    return values, same if valid is None else same & valid

  low = _histogram(read_in_bin, sizes, lambda v: v & _LOW_MASK, reduce_counts)
  lo, below_lo = _first_reaching(low, k - below_b)
  t = (b_u << _RADIX_BITS) | lo.astype(jnp.uint32)
  return t, below_b + below_lo, low[lo]


def prune_lowest(scores: Sequence[ScoreLike], k: Union[int, Array], *,
                 positions: Optional[Sequence[Union[Array, Callable[[Array], Array]]]] = None,
                 reduce_counts: Optional[CountReducer] = None,
                 counted: Optional[Sequence[Optional[Array]]] = None) -> list[Array]:
  """Marks exactly ``k`` entries, over all ``scores`` arrays together, for pruning.

  The k lowest scores are pruned; NaN ranks below every number. Among equal scores the entry with
  the larger position (by default: later array, then later row-major index) is pruned first.
  Scores are read in chunks (2¹⁸ entries on CPU, 2²⁴ on accelerators), so beyond its inputs and
  outputs the selection's scratch memory is bounded whatever the number of entries.

  Args:
    scores: float arrays (any shapes), or `Elementwise` scores computed chunk by chunk.
    k: number to prune, ``0 <= k <= total size``: a Python or numpy integer, or an integer
      scalar array (a traced one is clipped to that range).
    positions: per scores array, its entries' ``uint32`` positions, unique over all arrays: an
      array shaped like the scores, or a function from flat (row-major) indices into the array
      (a ``uint32`` vector) to their positions. Default: the entry's index in the concatenation
      of all arrays. Sharded callers pass the global positions of their shard.
    reduce_counts: combines per-shard histograms (a ``psum``) when the arrays are shards.
    counted: with ``reduce_counts``, per array a boolean (scalar, or shaped like the scores)
      marking the entries that count towards the histograms: a block replicated on several
      devices is counted on one of them only.

  Returns:
    Boolean arrays shaped like ``scores``: True where the entry is pruned.
  """
  scores = [s if isinstance(s, Elementwise) else jnp.asarray(s) for s in scores]
  if not scores:
    return []
  positions = list(positions) if positions is not None else [None] * len(scores)
  if len(positions) != len(scores):
    raise ValueError(f"positions: expected one entry per scores array ({len(scores)}), got "
                     f"{len(positions)}.")
  if reduce_counts is not None:
    # Shards inside shard_map: sizes and k are global, known only to the caller.
    counted = list(counted) if counted is not None else [None] * len(scores)
    return _prune_lowest_impl(scores, jnp.asarray(k, jnp.int32), positions, counted,
                              reduce_counts)
  total = sum(int(s.size) for s in scores)
  if total > _MAX_COUNT:
    raise validation.error("scores", f"at most {_MAX_COUNT} entries per selection (int32 counts)",
                           f"{total} entries")
  k = _check_count(k, total)
  if isinstance(k, int) and k == 0:
    return [jnp.zeros(s.shape, bool) for s in scores]
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
  if any(callable(p) for p in positions):  # functions cannot be jit arguments
    return _select(scores, k, positions)
  # One compiled program per structure: eager callers (one-shot pruning outside jit) would
  # otherwise dispatch the selection op by op. Inside an outer jit this inlines.
  fns, operands = split_elementwise(scores)
  return _prune_lowest_compiled(fns, operands, k, positions)


# Selections over at most this many entries find their threshold by bisection instead: the same
# exact rule, and for small arrays cheaper than four 2^16-bin histograms (or a sort), to run and
# to compile.
_BISECT_MAX = 1 << 14


def _bisect(values: Array, k: Array) -> Array:
  """The k-th smallest of the ``uint32`` ``values`` (``1 <= k <= size``), by 32 counting passes."""
  def halve(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
    lo, hi = bounds  # the answer, the smallest t with #(values <= t) >= k, lies in [lo, hi]
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(values <= mid, dtype=jnp.int32) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  return lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))[1]


def _select(scores: list[ScoreLike], k: Array, positions: list) -> list[Array]:
  # With several devices the arrays may be sharded under GSPMD, where a concatenation gathers
  # them and the histograms do not (for leaves split along their leading dimension).
  if sum(int(s.size) for s in scores) > _BISECT_MAX or jax.device_count() > 1:
    return _prune_lowest_impl(scores, k, positions, [None] * len(scores), None)
  sizes = [int(s.size) for s in scores]
  if not sum(sizes):
    return [jnp.zeros(s.shape, bool) for s in scores]
  offsets = np.cumsum([0] + sizes[:-1]).tolist()
  keys = jnp.concatenate([score_keys(_score_reader(s)(0, n)) for s, n in zip(scores, sizes)])
  pos = jnp.concatenate([_position_reader(p, o, tuple(s.shape))(0, n)
                         for p, o, s, n in zip(positions, offsets, scores, sizes)])
  t = _bisect(keys, jnp.maximum(k, 1))
  tied = keys == t
  ties_pruned = k - jnp.sum(keys < t, dtype=jnp.int32)
  kept_ties = jnp.sum(tied, dtype=jnp.int32) - ties_pruned
  # Tied entries from the (kept_ties + 1)-th smallest position on are pruned; positions are
  # unique and below 2^32 - 1, which stands for the untied entries here.
  cut = lax.cond(kept_ties > 0,
                 lambda: _bisect(jnp.where(tied, pos, jnp.uint32(0xFFFFFFFF)), kept_ties + 1),
                 lambda: jnp.uint32(0))
  pruned = (k > 0) & ((keys < t) | (tied & (pos >= cut)))
  return [x.reshape(s.shape) for x, s in zip(jnp.split(pruned, offsets[1:]), scores)]


def _prune_lowest_impl(scores: list[ScoreLike], k: Array, positions: list, counted: list,
                       reduce_counts: Optional[CountReducer]) -> list[Array]:
  reduce_counts = reduce_counts or (lambda h: h)
  shapes = [tuple(s.shape) for s in scores]
  sizes = [int(s.size) for s in scores]
  offsets = np.cumsum([0] + sizes[:-1]).tolist()
  read_scores = [_score_reader(s) for s in scores]
  read_positions = [_position_reader(p, o, s) for p, o, s in zip(positions, offsets, shapes)]
  read_counted = [_counted_reader(c) for c in counted]

  def read_keys(i, start, size):
    return score_keys(read_scores[i](start, size)), read_counted[i](start, size)

  t, less, equal = _kth_smallest(read_keys, sizes, jnp.maximum(k, 1), reduce_counts)
  ties_pruned = k - less  # in [1, equal] when k >= 1

  def tie_cut():
    # Keep the (equal - ties_pruned) earliest tied entries: the cut is the position of rank
    # (equal - ties_pruned + 1) among tied entries; tied entries at or after it are pruned.
    def read_tied(i, start, size):
      keys, valid = read_keys(i, start, size)
      tied = keys == t
      return read_positions[i](start, size), tied if valid is None else tied & valid
    cut, _, _ = _kth_smallest(read_tied, sizes, equal - ties_pruned + 1, reduce_counts)
    return cut

  cut = lax.cond(ties_pruned < equal, tie_cut, lambda: jnp.uint32(0))
  any_pruned = k > 0
  out = []
  for i, (shape, n) in enumerate(zip(shapes, sizes)):
    keys = score_keys(read_scores[i](0, n))
    pruned = any_pruned & ((keys < t) | ((keys == t) & (read_positions[i](0, n) >= cut)))
    out.append(pruned.reshape(shape))
  return out


@functools.partial(jax.jit, static_argnums=0)
def _prune_lowest_compiled(fns: tuple, operands: list, k: Array, positions: list) -> list[Array]:
  return _select(join_elementwise(fns, operands), k, positions)
