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


_TRACED = {fn: jax.jit(lambda t, fn=fn: fn(_params(), t))
           for fn in (distribution.uniform_sparsities, distribution.erk_sparsities)}


@pytest.mark.parametrize("s", [0.3, 0.8, 0.97])
def test_traced_sparsity_gives_the_concrete_split(s):
  # Under jit the target is a traced float32: the same largest-remainder split, as float32.
  params = _params()
  for fn, traced_fn in _TRACED.items():
    concrete = fn(params, s)
    traced = traced_fn(jnp.float32(s))
    assert all(isinstance(x, float) for x in jax.tree.leaves(concrete))
    assert all(jnp.asarray(x).dtype == jnp.float32 for x in jax.tree.leaves(traced))
    assert _counts(params, concrete) == _counts(params, jax.tree.map(float, traced))
    assert _total_pruned(params, traced) == round(np.float32(s) * N_PRUNABLE)


def test_traced_erk_keeps_capped_leaves_dense():
  params = {"small": jnp.zeros((2, 2)), "big": jnp.zeros((100, 100))}
  traced = jax.jit(lambda t: distribution.erk_sparsities(params, t))(0.5)
  assert float(traced["small"]) == 0.0
  assert round(float(traced["big"]) * 10000) == round(0.5 * 10004)


def test_one_signature_for_every_distribution():
  # fn(params, sparsity, *, prunable): the exported functions and a user's one are interchangeable.
  params = _params()
  only_dense = lambda path, x: "dense" in jax.tree_util.keystr(path) and x.ndim >= 2
  for fn in (distribution.uniform_sparsities, distribution.erk_sparsities):
    fracs = fn(params, 0.5, prunable=only_dense)
    assert fracs["conv"] == 0.0 and fracs["dense1"]["bias"] == 0.0
    n = 288 * 64 + 64 * 10
    assert _total_pruned(params, fracs) == round(0.5 * n)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", None, jnp.ones(2)])
def test_bad_sparsity_raises(bad):
  for fn in (distribution.uniform_sparsities, distribution.erk_sparsities):
    with pytest.raises(ValueError, match=r"^sparsity: expected a fraction in \[0, 1\], got"):
      fn(_params(), bad)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1"])
def test_bad_erk_scale_raises(bad):
  with pytest.raises(ValueError, match=r"^scale: expected a finite number >= 0, got"):
    distribution.erk_sparsities(_params(), 0.5, scale=bad)


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
