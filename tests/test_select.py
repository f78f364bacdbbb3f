"""The sort-free selection: exact counts, tie and NaN rules, jit equality."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import reference
from jaxprune._src import select

_jit_prune = jax.jit(select.prune_lowest)


def test_score_keys_order_numbers_nan_zero():
  tiny = np.float32(1e-30)
  ordered = np.array([np.nan, -np.inf, -3e38, -1.0, -tiny, 0.0, tiny, 1.0, 3e38, np.inf],
                     np.float32)
  keys = np.asarray(select.score_keys(ordered)).astype(np.int64)
  assert keys[0] == 0
  assert np.all(np.diff(keys) > 0)
  assert select.score_keys(jnp.float32(-0.0)) == select.score_keys(jnp.float32(0.0))
  # XLA flushes denormals: they tie with zero rather than ordering as numbers
  denormal = np.array([-1e-45, 0.0, 1e-45], np.float32)
  assert len(set(np.asarray(select.score_keys(denormal)).tolist())) == 1
  # negative NaN also ranks lowest
  neg_nan = np.array([-np.nan], np.float32)
  assert int(select.score_keys(neg_nan)[0]) == 0


def test_bf16_keys_agree_with_float32():
  x = jax.random.normal(jax.random.key(0), (257,), jnp.bfloat16)
  np.testing.assert_array_equal(select.score_keys(x), select.score_keys(x.astype(jnp.float32)))


_VALUES = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0, np.inf, -np.inf, np.nan])
# A few fixed structures (one compile each); values and k are what hypothesis explores.
_STRUCTURES = [((4, 3), (5,), (0, 2)), ((1,),), ((2, 2, 2), (7,))]
_jit_prune_traced_k = jax.jit(select.prune_lowest)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(_STRUCTURES).flatmap(
    lambda shapes: st.tuples(*[hnp.arrays(np.float32, s, elements=_VALUES) for s in shapes])),
       st.floats(0, 1))
def test_matches_reference_with_heavy_ties(arrays, frac):
  arrays = list(arrays)
  total = sum(a.size for a in arrays)
  k = int(round(frac * total))
  expected = reference.prune_lowest(arrays, k)
  jitted = _jit_prune_traced_k([jnp.asarray(a) for a in arrays], jnp.int32(k))
  for e, j in zip(expected, jitted):
    np.testing.assert_array_equal(np.asarray(j), e)
  assert sum(int(j.sum()) for j in jitted) == k


def test_eager_equals_jit_equals_reference():
  rng = np.random.default_rng(0)
  arrays = [rng.integers(-2, 3, size=s).astype(np.float32) for s in [(6, 5), (9,), (2, 3, 4)]]
  arrays[0][1, 2] = np.nan
  arrays[2][0, 0, 0] = -np.inf
  for k in [0, 17, 63]:  # eager dispatch is slow: few values
    expected = reference.prune_lowest(arrays, k)
    eager = select.prune_lowest([jnp.asarray(a) for a in arrays], k)
    jitted = _jit_prune([jnp.asarray(a) for a in arrays], k)
    for e, g, j in zip(expected, eager, jitted):
      np.testing.assert_array_equal(np.asarray(g), e)
      np.testing.assert_array_equal(np.asarray(j), e)


def test_ties_inside_one_histogram_bin():
  # Values that share their high 16 key bits and differ only in the low bits, with duplicates:
  # exercises the second radix pass and the position tie-break together.
  base = np.float32(1.0)
  steps = np.array([0, 3, 3, 1, 2, 3, 0, 1] * 50, np.float32)
  x = base + steps * np.spacing(base)
  assert len({int(k) >> 16 for k in np.asarray(select.score_keys(x))}) == 1
  for k in [0, 1, 99, 100, 101, 150, 399, 400]:
    got = np.asarray(_jit_prune([jnp.asarray(x)], k)[0])
    np.testing.assert_array_equal(got, reference.prune_lowest([x], k)[0])
    assert got.sum() == k


def test_large_random_global_exact_count():
  keys = jax.random.split(jax.random.key(1), 3)
  arrays = [jax.random.normal(keys[0], (300, 200)),
            jnp.round(jax.random.normal(keys[1], (70_000,)) * 4),  # many exact ties
            jax.random.normal(keys[2], (5, 7, 11))]
  host = [np.asarray(a) for a in arrays]
  for k in [1, 12_345, 70_000, 130_385]:
    got = _jit_prune(arrays, k)
    assert sum(int(g.sum()) for g in got) == k
    for g, e in zip(got, reference.prune_lowest(host, k)):
      np.testing.assert_array_equal(np.asarray(g), e)


def test_traced_k_equals_static_k():
  x = jnp.round(jax.random.normal(jax.random.key(2), (40, 25)) * 3)
  f = jax.jit(lambda x, k: select.prune_lowest([x], k)[0])
  for k in [0, 1, 500, 999, 1000]:
    np.testing.assert_array_equal(f(x, k), _jit_prune([x], k)[0])


def test_k_out_of_range_raises():
  with pytest.raises(ValueError, match=r"k must be in \[0, 6\], got 7"):
    select.prune_lowest([jnp.ones((2, 3))], 7)


@pytest.mark.parametrize("s, n, expected", [(0.5, 5, 2), (0.5, 7, 4), (0.5, 3, 2), (0.25, 10, 2),
                                            (0.0, 9, 0), (1.0, 9, 9), (0.9, 266_200, 239_580)])
def test_num_to_prune_rounds_half_to_even(s, n, expected):
  assert select.num_to_prune(s, n) == expected == round(s * n)
  traced = jax.jit(lambda s: select.num_to_prune(s, n))(s)
  assert int(traced) == expected


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), float("inf")])
def test_bad_sparsity_raises_naming_argument(bad):
  with pytest.raises(ValueError, match=r"sparsity for leaf \['w'\]: expected a fraction in"):
    select.num_to_prune(bad, 10, "sparsity", "['w']")


def test_traced_sparsity_is_clipped():
  f = jax.jit(lambda s: select.num_to_prune(s, 10))
  assert int(f(1.5)) == 10 and int(f(-1.0)) == 0 and int(f(jnp.nan)) == 0
