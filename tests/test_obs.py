"""Exact greedy OBS (OBC) against brute force, masks from the path, Wanda, dense target, losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
import reference
from jaxprune._src import obc as obc_lib
from jaxprune._src import obs
from jaxprune._src import layer_solve
from jaxprune._src import refit as refit_lib

D_IN, D_OUT, TOKENS, DEAD = 72, 8, 160, 5


def _problem(seed=0, d_in=D_IN, d_out=D_OUT, dead=DEAD):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(TOKENS, d_in)) @ (np.eye(d_in) + 0.4 * rng.normal(size=(d_in, d_in)))
  if dead is not None:
    x[:, dead] = 0.0
  x = x.astype(np.float32)
  return x, x.T @ x, rng.normal(size=(d_in, d_out)).astype(np.float32)


def _brute_force_path(w, h, rows=1, damp=0.01):
  """Greedy removal of tiles of ``rows`` inputs from all columns of ``w``, re-solving the
  least-squares problem from scratch for every candidate.

  The loss is measured with the dampened H; a dead input is decoupled from the others, so its
  removal costs nothing in the undampened metric and its diagonal is left out.
  """
  d = w.shape[0]
  h = h.astype(np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  h += damp * np.mean(np.diag(h)) * np.eye(d)
  metric = np.where(np.outer(dead, dead), 0.0, h)
  removed, losses, previous = [], [], 0.0
  for _ in range(d // rows):
    best = None
    for p in range(d // rows):
      if p in removed:
        continue
      r = [i for t in removed + [p] for i in range(t * rows, (t + 1) * rows)]
      s = [i for i in range(d) if i not in r]
      new = np.zeros(w.shape)
      if s:
        new[s] = w[s] + np.linalg.solve(h[np.ix_(s, s)], h[np.ix_(s, r)] @ w[r])
      loss = np.sum((new - w) * (metric @ (new - w)))
      if best is None or loss <= best[0]:  # equal losses: the later input goes first
        best = (loss, p)
    removed.append(best[1])
    losses.append(best[0] - previous)
    previous = best[0]
  return np.array(removed), np.array(losses)


def test_path_equals_brute_force_greedy():
  """72 inputs: the path compacts its inverse after 32 removals and ends in a partial block."""
  _, h, w = _problem(0)
  assert obc_lib._phases(D_IN, obc_lib._Plan(D_IN, 0, 0, 32, 64)) == [(72, 32), (40, 40)]
  path = obc_lib.obc_path(w, h)
  for j in range(2):
    order, losses = _brute_force_path(w[:, j:j + 1].astype(np.float64), h)
    np.testing.assert_array_equal(np.asarray(path.order[:, j]), order)
    np.testing.assert_allclose(np.asarray(path.losses[:, j]), losses, rtol=2e-3,
                               atol=1e-4 * losses.max())


def test_tile_path_equals_brute_force_greedy_over_tiles(monkeypatch):
  """2 × 2 tiles of a 12-input layer: each group of 2 columns removes 2 inputs at a time, with
  the downdates folded every 4 removals (the last block partial)."""
  monkeypatch.setattr(obc_lib, "_BLOCK", 8)
  _, h, w = _problem(8, d_in=12, d_out=4)
  path = obc_lib.obc_path(w, h, pattern=jp.BlockPattern((2, 2)))
  assert path.order.shape == (6, 2)
  for g in range(2):
    order, losses = _brute_force_path(w[:, 2 * g:2 * g + 2].astype(np.float64), h, rows=2)
    np.testing.assert_array_equal(np.asarray(path.order[:, g]), order)
    np.testing.assert_allclose(np.asarray(path.losses[:, g]), losses, rtol=1e-3,
                               atol=1e-5 * losses.max())
  keep = np.asarray(obc_lib.obc_mask(path, 0.5, pattern=("block", 2, 2)))
  tiles = keep.reshape(6, 2, 2, 2)
  assert np.all(tiles.all(axis=(1, 3)) | (~tiles).all(axis=(1, 3)))
  assert int((~tiles).all(axis=(1, 3)).sum()) == 6
  new, keep2 = obc_lib.obc(w, h, 0.5, pattern=jp.BlockPattern((2, 2)))
  np.testing.assert_array_equal(np.asarray(keep2), keep)
  # what oneshot(method="obc", pattern=BlockPattern) runs on each kernel
  same, keep3 = layer_solve.solve_layer("obc", w, h, 0.5, jp.BlockPattern((2, 2)))
  np.testing.assert_array_equal(np.asarray(keep3), keep)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(new))
  tile_l1 = np.abs(w).reshape(6, 2, 2, 2).sum(axis=(1, 3))
  magnitude = np.repeat(np.repeat(~reference.prune_lowest([tile_l1], 6)[0], 2, 0), 2, 1)
  assert float(obs.layer_loss(w, new, h)) < float(obs.layer_loss(w, np.where(magnitude, w, 0), h))
  # the path's losses of the chosen tiles add up to the refitted weights' loss
  dead = np.diag(h) == 0
  metric = np.where(np.outer(dead, dead), 0.0, np.asarray(obs.dampen(h, 0.01)[0], np.float64))
  delta = np.asarray(new, np.float64) - w
  np.testing.assert_allclose(float(obc_lib.obc_losses(path, [0.5])[0]),
                             np.sum(delta * (metric @ delta)), rtol=1e-3)


def test_obc_update_is_the_least_squares_optimum_and_losses_match_the_path():
  _, h, w = _problem(1)
  path = obc_lib.obc_path(w, h)
  keep = obc_lib.obc_mask(path, 0.5)
  new = np.asarray(refit_lib.refit(w, h, keep))
  hd = np.asarray(obs.dampen(h, 0.01)[0], np.float64)
  live = np.arange(D_IN) != DEAD
  delta = (new - w)[live]
  loss = np.sum(delta * (hd[np.ix_(live, live)] @ delta))
  np.testing.assert_allclose(float(obc_lib.obc_losses(path, [0.5])[0]), loss, rtol=1e-3)
  # the recorded path losses are the undampened loss plus the dampening term
  assert float(obs.layer_loss(w, new, h)) <= loss * (1 + 1e-4)


def test_obc_mask_exact_counts_and_greedy_allocation():
  _, h, w = _problem(2)
  path = obc_lib.obc_path(w, h)
  for s in [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]:
    keep = np.asarray(obc_lib.obc_mask(path, s))
    assert int((~keep).sum()) == round(s * w.size)
  # column counts are the greedy choice over running-maximum increments
  key = np.maximum.accumulate(np.asarray(path.losses), axis=0)
  k = round(0.4 * w.size)
  counts = reference.prune_lowest([key], k)[0].sum(axis=0)
  keep = np.asarray(obc_lib.obc_mask(path, 0.4))
  np.testing.assert_array_equal((~keep).sum(axis=0), counts)
  for j in range(D_OUT):  # each column removes a prefix of its path
    assert set(np.flatnonzero(~keep[:, j])) == set(np.asarray(path.order[:counts[j], j]))


@functools.lru_cache(maxsize=None)
def _path_3():
  _, h, w = _problem(3)
  return obc_lib.obc_path(w, h)


@settings(max_examples=20, deadline=None)
@given(st.floats(0, 1))
def test_obc_mask_exact_count_property(sparsity):
  keep = obc_lib.obc_mask(_path_3(), sparsity)
  assert int(np.sum(~np.asarray(keep))) == round(sparsity * D_IN * D_OUT)


def test_obc_sparsity_zero_is_bit_identical():
  _, h, w = _problem(4)
  w[0, 1] = -0.0
  new, keep = obc_lib.obc(w, h, 0.0)
  assert bool(np.all(keep))
  np.testing.assert_array_equal(np.asarray(new).view(np.uint32), w.view(np.uint32))


@pytest.mark.slow
def test_obc_jit_equals_eager():
  _, h, w = _problem(4)
  eager_w, eager_keep = obc_lib.obc(w, h, 0.5)
  jit_w, jit_keep = jax.jit(lambda s: obc_lib.obc(w, h, s))(jnp.float32(0.5))
  np.testing.assert_array_equal(np.asarray(jit_keep), np.asarray(eager_keep))
  np.testing.assert_allclose(np.asarray(jit_w), np.asarray(eager_w), rtol=1e-4, atol=1e-4)


def test_obc_loss_below_magnitude_and_dead_inputs_first():
  _, h, w = _problem(5)
  k = round(0.5 * w.size)
  magnitude = np.where(reference.prune_lowest([np.abs(w)], k)[0], 0, w)
  new, keep = obc_lib.obc(w, h, 0.5)
  assert float(obs.layer_loss(w, new, h)) < float(obs.layer_loss(w, magnitude, h))
  _, keep = obc_lib.obc(w, h, 1 / D_IN)  # one input's worth: exactly the dead one
  removed = ~np.asarray(keep)
  assert removed[DEAD].all() and removed.sum() == D_OUT


@pytest.mark.slow
def test_obc_nm_groups_exact_and_loss_below_nm_magnitude():
  _, h, w = _problem(5)
  new, keep = obc_lib.obc(w, h, None, pattern="2:4")
  keep = np.asarray(keep)
  assert np.all(keep.reshape(D_IN // 4, 4, D_OUT).sum(axis=1) == 2)
  assert not keep[DEAD].any()  # dead inputs are free, so removed in every column
  magnitude = np.where(reference.nm_keep(np.abs(w), 2, 4, axis=0), w, 0)
  assert float(obs.layer_loss(w, new, h)) < float(obs.layer_loss(w, magnitude, h))


def test_obc_bad_input():
  _, h, w = _problem()
  with pytest.raises(ValueError, match="pattern: expected tiles dividing"):
    obc_lib.obc(w, h, 0.5, pattern=("block", 5, 2))
  with pytest.raises(ValueError, match="pattern: expected groups of m=5"):
    obc_lib.obc_path(w, h, pattern="2:5")
  with pytest.raises(ValueError, match="sparsity"):
    obc_lib.obc(w, h, 0.3, pattern=jp.NMPattern(2, 4))
  with pytest.raises(ValueError, match="sparsity"):
    obc_lib.obc_mask(obc_lib.obc_path(w, h), -0.1)
  with pytest.raises(TypeError, match="w: expected a float"):
    obc_lib.obc_path(w.astype(np.int32), h)


def test_wanda_layer_loss_and_dense_target():
  x, h, w = _problem(6)
  np.testing.assert_allclose(np.asarray(obs.wanda(w, h)),
                             np.abs(w) * np.linalg.norm(x, axis=0)[:, None], rtol=1e-5)
  new = w * 0.5
  want = np.sum((x @ (new - w)) ** 2)
  np.testing.assert_allclose(float(obs.layer_loss(w, new, h)), want, rtol=1e-4)
  # identical inputs: the target is the kernel itself
  np.testing.assert_allclose(np.asarray(obs.dense_target(w, h, h)), w, rtol=1e-4, atol=1e-4)
  # different inputs: the ridge least-squares fit of the dense outputs
  rng = np.random.default_rng(7)
  x_p = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  x_p[:, DEAD] = 0.0
  h_pp, h_pd = x_p.T @ x_p, x_p.T @ x
  hd = np.asarray(obs.dampen(h_pp, 0.01)[0], np.float64)
  extra = np.diag(hd) - np.diag(h_pp)
  want = np.linalg.solve(hd, h_pd.astype(np.float64) @ w + extra[:, None] * w)
  got = np.asarray(obs.dense_target(w, h_pp, h_pd))
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
  np.testing.assert_allclose(got[DEAD], w[DEAD], rtol=1e-5)
  with pytest.raises(ValueError, match="h: expected shape"):
    obs.wanda(w, h[:3])
  # the diagonal alone gives the same scores (what diagonal-only calibration holds)
  np.testing.assert_array_equal(np.asarray(obs.wanda(w, np.diagonal(h).copy())),
                                np.asarray(obs.wanda(w, h)))
  with pytest.raises(ValueError, match=r"h: expected a float \(72,\) diagonal"):
    obs.wanda(w, np.diagonal(h)[:3].copy())


def test_prune_lowest_tie_rule_and_pattern_parsing():
  scores = np.array([[1.0, 0.0, 2.0], [0.0, np.nan, 1.0]], np.float32)
  for k in range(7):
    np.testing.assert_array_equal(np.asarray(obs.prune_lowest(scores, k)),
                                  reference.prune_lowest([scores], k)[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, -3.0, np.inf, -np.inf, np.nan, 1e-3]),
                min_size=24, max_size=24), st.integers(0, 24))
def test_prune_lowest_matches_the_reference_order_jitted_and_eager(values, k):
  scores = np.asarray(values, np.float32).reshape(4, 6)   # one shape: one compilation
  want = reference.prune_lowest([scores], k)[0]
  np.testing.assert_array_equal(np.asarray(obs.prune_lowest(scores, k)), want)
  np.testing.assert_array_equal(np.asarray(JIT_PRUNE_LOWEST(scores, jnp.int32(k))), want)
  np.testing.assert_array_equal(np.asarray(obs.prune_ranks(scores) < k), want)


JIT_PRUNE_LOWEST = jax.jit(obs.prune_lowest)


def test_one_parser_reads_every_spelling():
  nm, block = obs.ParsedPattern("nm", 2, 4), obs.ParsedPattern("block", 2, 3)
  for spelling, want in [(None, obs.NONE), ("unstructured", obs.NONE), ("2:4", nm),
                         (jp.NMPattern(2, 4), nm), (jp.NMPattern(2, 4, axis=0), nm),
                         (jp.BlockPattern((2, 3)), block), (("block", 2, 3), block),
                         (jp.BlockPattern((3,)), obs.ParsedPattern("block", 1, 3))]:
    assert obs.layer_pattern(spelling, (8, 6)) == want, spelling
  assert obs.parse_pattern(jp.BlockPattern((2, 3), reduce="max")).reduce == "max"
  for bad, match in [("2-4", "pattern: expected None, 'unstructured'"),
                     (("nm", 2, 4), "pattern: expected None"), ((2, 4), "pattern: expected"),
                     ("5:4", "pattern n"), (jp.NMPattern(5, 4), "pattern.n"),
                     (jp.NMPattern(2, 4, axis=1), "pattern.axis: expected 0 or -2"),
                     (("block", 0, 2), "pattern rows"), (jp.BlockPattern((0, 2)), "pattern.shape"),
                     (jp.BlockPattern((1, 2, 2)), "pattern.shape: expected at most 2 dims"),
                     (("block", 3, 2), "pattern: expected tiles dividing"),
                     ("2:3", "pattern: expected groups of m=3")]:
    with pytest.raises(ValueError, match=match):
      obs.layer_pattern(bad, (8, 4))
