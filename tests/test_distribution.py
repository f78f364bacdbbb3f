"""Tests for the uniform and ERK sparsity distributions."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import distribution


def _params():
  return {
      "conv": jnp.zeros((3, 3, 4, 8)),
      "dense1": {"kernel": jnp.zeros((288, 64)), "bias": jnp.zeros((64,))},
      "dense2": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros((10,))},
  }


def _counts(params, fracs):
  return jax.tree.map(lambda x, f: round(f * x.size), params, fracs)


def _total_pruned(params, fracs):
  return sum(jax.tree.leaves(_counts(params, fracs)))


N_PRUNABLE = 3 * 3 * 4 * 8 + 288 * 64 + 64 * 10


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.77, 0.9, 1.0])
def test_uniform_total_is_round_s_n(s):
  params = _params()
  fracs = distribution.uniform_sparsities(params, s)
  assert _total_pruned(params, fracs) == round(s * N_PRUNABLE)
  assert fracs["dense1"]["bias"] == 0.0 and fracs["dense2"]["bias"] == 0.0
  for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(fracs)):
    if x.ndim >= 2:
      assert abs(round(f * x.size) - s * x.size) < 1.0


def test_uniform_odd_sizes_rounding():
  # 3 leaves of 3 entries at s=0.5: per-leaf 1.5 each; total round(4.5) = 4 (half to even).
  params = [jnp.zeros((1, 3))] * 3
  fracs = distribution.uniform_sparsities(params, 0.5)
  counts = [round(f * 3) for f in fracs]
  assert counts == [2, 1, 1]


def test_uniform_prunable_predicate():
  params = _params()
  fracs = distribution.uniform_sparsities(
      params, 0.5, prunable=lambda path, x: "conv" not in jax.tree_util.keystr(path)
      and x.ndim >= 2)
  assert fracs["conv"] == 0.0
  assert fracs["dense1"]["kernel"] == 0.5 and fracs["dense2"]["kernel"] == 0.5


def test_erk_matches_closed_form_and_total():
  params = _params()
  s = 0.9
  fracs = distribution.erk_sparsities(params, s)
  assert _total_pruned(params, fracs) == round(s * N_PRUNABLE)
  shapes = [(3, 3, 4, 8), (288, 64), (64, 10)]
  raws = np.array([sum(sh) / math.prod(sh) for sh in shapes])
  sizes = np.array([math.prod(sh) for sh in shapes], float)
  # No leaf is capped at s=0.9 for these shapes: eps solves sum(eps*raw*n) = (1-s)N.
  eps = (1 - s) * sizes.sum() / (raws * sizes).sum()
  assert np.all(eps * raws < 1)
  got = [fracs["conv"], fracs["dense1"]["kernel"], fracs["dense2"]["kernel"]]
  assert np.all(np.abs(np.array(got) - (1 - eps * raws)) <= 1.5 / sizes)
  # Smaller layers are denser under ERK.
  assert got[2] < got[1]


def test_erk_caps_small_layers_dense_and_redistributes():
  params = {"small": jnp.zeros((2, 2)), "big": jnp.zeros((100, 100))}
  fracs = distribution.erk_sparsities(params, 0.5)
  assert fracs["small"] == 0.0  # raw = 1.0 > budget would put density > 1
  assert round(fracs["big"] * 10000) == round(0.5 * 10004)


def test_erk_scale_zero_is_uniform():
  params = _params()
  a = distribution.erk_sparsities(params, 0.6, scale=0.0)
  b = distribution.uniform_sparsities(params, 0.6)
  assert _counts(params, a) == _counts(params, b)


def test_erk_fractions_traced_matches_concrete():
  params = _params()
  shapes = [x.shape for x in jax.tree.leaves(params) if x.ndim >= 2]
  want = distribution.erk_sparsities(params, 0.8)
  got = jax.jit(lambda s: distribution.erk_fractions(shapes, s))(jnp.float32(0.8))
  # Order of jax.tree.leaves: conv, dense1/kernel, dense2/kernel.
  np.testing.assert_allclose(
      np.asarray(got), [want["conv"], want["dense1"]["kernel"], want["dense2"]["kernel"]],
      atol=1e-3)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_sparsity_raises(bad):
  with pytest.raises(ValueError, match="sparsity"):
    distribution.uniform_sparsities(_params(), bad)
  with pytest.raises(ValueError, match="sparsity"):
    distribution.erk_sparsities(_params(), bad)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=5),
    s=st.floats(0.0, 1.0),
    erk=st.booleans())
def test_total_property(shapes, s, erk):
  params = [np.zeros(sh, np.float32) for sh in shapes]
  fn = distribution.erk_sparsities if erk else distribution.uniform_sparsities
  fracs = fn(params, s)
  n = sum(math.prod(sh) for sh in shapes)
  assert _total_pruned(params, fracs) == round(s * n)
  assert all(0.0 <= f <= 1.0 for f in fracs)
