"""The sort-free selection: exact counts, tie and NaN rules, jit equality."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import reference
from jaxprune._src import select

_jit_prune = jax.jit(select.prune_lowest)
_keys = jax.jit(select.score_keys)


def test_score_keys_order_numbers_nan_zero(check_jit_eager):
  tiny = np.float32(1e-30)
  ordered = np.array([np.nan, -np.inf, -3e38, -1.0, -tiny, 0.0, tiny, 1.0, 3e38, np.inf],
                     np.float32)
  keys = np.asarray(check_jit_eager(select.score_keys, ordered)).astype(np.int64)
  assert keys[0] == 0
  assert np.all(np.diff(keys) > 0)
  assert _keys(jnp.float32(-0.0)) == _keys(jnp.float32(0.0))
  # XLA flushes denormals: they tie with zero rather than ordering as numbers
  denormal = np.array([-1e-45, 0.0, 1e-45], np.float32)
  assert len(set(np.asarray(_keys(denormal)).tolist())) == 1
  # negative NaN also ranks lowest
  neg_nan = np.array([-np.nan], np.float32)
  assert int(_keys(neg_nan)[0]) == 0


def test_bf16_keys_agree_with_float32():
  x = jnp.asarray(np.random.default_rng(0).normal(size=257), jnp.bfloat16)
  np.testing.assert_array_equal(_keys(x), _keys(x.astype(jnp.float32)))


_VALUES = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0, np.inf, -np.inf, np.nan])
# A few fixed structures (one compile each); values and k are what hypothesis explores.
_STRUCTURES = [((4, 3), (5,), (0, 2)), ((1,),), ((2, 2, 2), (7,))]
_jit_prune_traced_k = jax.jit(select.prune_lowest)
_radix = jax.jit(lambda scores, k: select._prune_lowest_impl(scores, k, [None] * len(scores),
                                                             [None] * len(scores), None))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(_STRUCTURES).flatmap(
    lambda shapes: st.tuples(*[hnp.arrays(np.float32, s, elements=_VALUES) for s in shapes])),
       st.floats(0, 1))
def test_matches_reference_with_heavy_ties(arrays, frac):
  # Both selections: the sort of small arrays (the public entry point here) and the radix one.
  arrays = list(arrays)
  total = sum(a.size for a in arrays)
  k = int(round(frac * total))
  expected = reference.prune_lowest(arrays, k)
  for fn in (_jit_prune_traced_k, _radix):
    got = fn([jnp.asarray(a) for a in arrays], jnp.int32(k))
    for e, j in zip(expected, got):
      np.testing.assert_array_equal(np.asarray(j), e)
    assert sum(int(j.sum()) for j in got) == k


def test_eager_equals_jit_equals_reference(check_jit_eager):
  rng = np.random.default_rng(0)
  arrays = [rng.integers(-2, 3, size=s).astype(np.float32) for s in [(6, 5), (9,), (2, 3, 4)]]
  arrays[0][1, 2] = np.nan
  arrays[2][0, 0, 0] = -np.inf
  for k in [0, 17, 63]:  # a Python int eagerly, a traced int32 under jit
    got = check_jit_eager(select.prune_lowest, [jnp.asarray(a) for a in arrays], k)
    for e, g in zip(reference.prune_lowest(arrays, k), got):
      np.testing.assert_array_equal(np.asarray(g), e)


def test_ties_inside_one_histogram_bin():
  # Values that share their high 16 key bits and differ only in the low bits, with duplicates:
  # exercises the second radix pass and the position tie-break together.
  base = np.float32(1.0)
  steps = np.array([0, 3, 3, 1, 2, 3, 0, 1] * 50, np.float32)
  x = base + steps * np.spacing(base)
  assert len({int(k) >> 16 for k in np.asarray(_keys(x))}) == 1
  for k in [0, 1, 99, 100, 101, 150, 399, 400]:
    got = np.asarray(_radix([jnp.asarray(x)], jnp.int32(k))[0])
    np.testing.assert_array_equal(got, reference.prune_lowest([x], k)[0])
    assert got.sum() == k


def test_large_random_global_exact_count():
  rng = np.random.default_rng(1)
  arrays = [jnp.asarray(rng.normal(size=(150, 120)), jnp.float32),
            jnp.asarray(np.round(rng.normal(size=30_000) * 4), jnp.float32),  # many exact ties
            jnp.asarray(rng.normal(size=(5, 7, 11)), jnp.float32)]
  host = [np.asarray(a) for a in arrays]
  for k in [1, 12_345, 30_000, 48_385]:
    got = _jit_prune(arrays, k)
    assert sum(int(g.sum()) for g in got) == k
    for g, e in zip(got, reference.prune_lowest(host, k)):
      np.testing.assert_array_equal(np.asarray(g), e)


def test_traced_k_equals_static_k():
  x = jnp.asarray(np.round(np.random.default_rng(2).normal(size=(40, 25)) * 3), jnp.float32)
  f = jax.jit(lambda x, k: select.prune_lowest([x], k)[0])
  for k in [0, 1, 500, 999, 1000]:
    np.testing.assert_array_equal(f(x, k), _jit_prune([x], k)[0])


def test_k_must_be_an_integer_in_range():
  with pytest.raises(ValueError, match=r"k: expected an integer >= 0 and <= 6, got 7\.$"):
    select.prune_lowest([jnp.ones((2, 3))], 7)
  with pytest.raises(ValueError, match=r"k: expected an integer >= 0 and <= 6, got 2\.7\.$"):
    select.prune_lowest([jnp.ones((2, 3))], 2.7)
  with pytest.raises(ValueError, match=r"k: expected an integer scalar, got 'float32\[\]'"):
    jax.jit(lambda k: select.prune_lowest([jnp.ones((2, 3))], k))(2.5)
  x = jnp.arange(6.0)
  for k in (np.int64(2), jnp.int32(2)):  # numpy and concrete jax integers are counts too
    np.testing.assert_array_equal(select.prune_lowest([x], k)[0], np.arange(6) < 2)


@pytest.mark.parametrize("s, n, expected", [(0.5, 5, 2), (0.5, 7, 4), (0.5, 3, 2), (0.25, 10, 2),
                                            (0.0, 9, 0), (1.0, 9, 9), (0.9, 266_200, 239_580)])
def test_num_to_prune_rounds_half_to_even(s, n, expected):
  assert select.num_to_prune(s, n) == expected == round(s * n)
  traced = jax.jit(lambda s: select.num_to_prune(s, n))(s)
  assert int(traced) == expected


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), float("inf"), "0.5", None])
def test_bad_sparsity_raises_naming_argument(bad):
  with pytest.raises(ValueError, match=r"^sparsity: expected a fraction in \[0, 1\], got .* "
                                       r"\(leaf \['w'\]\)\.$"):
    select.num_to_prune(bad, 10, "sparsity", "['w']")


def test_traced_sparsity_is_clipped():
  f = jax.jit(lambda s: select.num_to_prune(s, 10))
  assert int(f(1.5)) == 10 and int(f(-1.0)) == 0 and int(f(jnp.nan)) == 0


# --- chunked passes -------------------------------------------------------------------------


def _impl_jit(n: int):
  """A fresh jit of the selection (not the module's cached program), for a patched chunk size."""
  return jax.jit(lambda scores, k: select._prune_lowest_impl(scores, k, [None] * n, [None] * n,
                                                             None))


def test_chunk_boundaries_match_reference(monkeypatch):
  # Chunk 7: leaves shorter than a chunk, exactly one chunk, one chunk plus a rest, and several
  # chunks through the loop, all in one global selection with heavy ties and NaN.
  monkeypatch.setattr(select, "_CHUNK", 7)
  rng = np.random.default_rng(3)
  values = np.array([-1.0, 0.0, 0.0, 1.0, 1.0, 2.0, np.nan, np.inf], np.float32)
  shapes = [(5,), (7,), (3, 4), (7, 2), (6, 7)]
  arrays = [rng.choice(values, size=s) for s in shapes]
  total = sum(a.size for a in arrays)
  f = _impl_jit(len(arrays))
  assert total == 80
  for k in [0, 1, 13, 40, 41, 57, 79, 80]:
    got = f([jnp.asarray(a) for a in arrays], jnp.int32(k))
    assert sum(int(g.sum()) for g in got) == k
    for g, e in zip(got, reference.prune_lowest(arrays, k)):
      np.testing.assert_array_equal(np.asarray(g), e, err_msg=f"k={k}")


def test_elementwise_scores_equal_materialized_scores(monkeypatch):
  monkeypatch.setattr(select, "_CHUNK", 16)
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.integers(-3, 4, size=(9, 11)).astype(np.float32))
  g = jnp.asarray(rng.integers(-2, 3, size=(9, 11)).astype(np.float32))
  fn = lambda a, b: jnp.abs(a * b)
  lazy = select.Elementwise(fn, (w, g))
  np.testing.assert_array_equal(lazy.evaluate(), jnp.abs(w * g))
  assert lazy.dtype == jnp.float32 and lazy.ndim == 2 and lazy.size == 99
  f = jax.jit(lambda w, g, k: select._prune_lowest_impl([select.Elementwise(fn, (w, g))], k,
                                                        [None], [None], None))
  for k in [0, 30, 50, 99]:
    want = reference.prune_lowest([np.abs(np.asarray(w * g))], k)[0]
    np.testing.assert_array_equal(f(w, g, jnp.int32(k))[0], want)
    # the public entry point, eager, with the default chunk
    np.testing.assert_array_equal(select.prune_lowest([lazy], k)[0], want)


def test_multi_chunk_loop_at_real_chunk_size():
  # More than two real chunks (2^18 entries each) plus a rest, with exact ties across chunks.
  n = 2 * select._CHUNK + 12_345
  x = jnp.asarray(np.round(np.random.default_rng(5).normal(size=n) * 50), jnp.float32)
  host = np.asarray(x)
  for k in [1, 300_000, n - 7]:
    got = np.asarray(_jit_prune([x], k)[0])
    assert got.sum() == k
    np.testing.assert_array_equal(got, reference.prune_lowest([host], k)[0])


def test_selection_scratch_memory_is_chunk_sized():
  # 2^22 entries: materialized keys alone would take 16 MiB, bins another 16 MiB.
  x = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
  lazy = jax.jit(lambda x: select.prune_lowest([select.Elementwise(jnp.abs, (x,))], 10**6))
  plain = jax.jit(lambda x: select.prune_lowest([x], 10**6))
  for f in (lazy, plain):
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 4 * 2**20, temp / 2**20


def test_positions_as_function_equal_positions_as_array():
  x = jnp.asarray(np.tile(np.float32([1.0, 2.0]), 30).reshape(6, 10))
  reversed_pos = lax.iota(jnp.uint32, 60)[::-1].reshape(6, 10)
  as_array = select.prune_lowest([x], 17, positions=[reversed_pos])[0]
  as_fn = select.prune_lowest([x], 17, positions=[lambda i: jnp.uint32(59) - i])[0]
  radix = jax.jit(lambda x: select._prune_lowest_impl([x], jnp.int32(17),
                                                     [lambda i: jnp.uint32(59) - i], [None],
                                                     None)[0])(x)
  np.testing.assert_array_equal(as_array, as_fn)
  np.testing.assert_array_equal(radix, as_fn)
  # reversed positions: among the 30 tied ones the *earliest* 17 are pruned
  flat = np.asarray(as_fn).ravel()
  assert flat.sum() == 17 and flat[0:34:2].all() and not flat[34:].any()


def test_elementwise_validation():
  with pytest.raises(ValueError, match=r"expected operands of one shape, got shapes \[\(2, 3\), "
                                       r"\(3, 2\)\]"):
    select.Elementwise(jnp.add, (jnp.ones((2, 3)), jnp.ones((3, 2))))
  bad = select.Elementwise(lambda a: a[:1], (jnp.ones((2, 3)),))
  with pytest.raises(ValueError, match=r"fn must map chunks of shape \(6,\) to scores of the "
                                       r"same shape, got shape \(1,\)"):
    select.prune_lowest([bad], 2)
  with pytest.raises(ValueError, match=r"positions: expected uint32 arrays shaped like the "
                                       r"scores \(2, 3\), got int32"):
    select.prune_lowest([jnp.ones((2, 3))], 2, positions=[jnp.zeros((2, 3), jnp.int32)])


def test_chunk_size_per_platform(monkeypatch):
  assert select._chunk_size() == select._CHUNK == 2**18  # this suite runs on CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert select._chunk_size() == 2**24


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_scratch_memory_does_not_grow_with_the_number_of_leaves(scope):
  # 8 leaves of 10^5 scores (3.2 MB): XLA had computed every leaf's keys and bins up front and
  # held every per-leaf histogram at once (about twice the scores' size); the reads are now
  # ordered one chunk after another, so the scratch is that of about one leaf.
  import jaxprune as jp
  leaves = [jax.ShapeDtypeStruct((100, 1000), jnp.float32)] * 8
  f = jax.jit(lambda scores: jp.unstructured_mask(scores, 0.9, scope=scope))
  temp = f.lower(leaves).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * 2**20, temp / 2**20
