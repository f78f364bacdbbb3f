"""SparseGPT: numpy reference, exact counts, N:M groups, block tiles, dead inputs, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
import reference
from jaxprune._src import obs
from jaxprune._src import refit as refit_lib
from jaxprune._src import sparsegpt as sg

D_IN, D_OUT, TOKENS, DEAD, BLOCK = 72, 8, 160, 5, 32


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(TOKENS, D_IN)) @ (np.eye(D_IN) + 0.4 * rng.normal(size=(D_IN, D_IN)))
  x[:, DEAD] = 0.0
  x = x.astype(np.float32)
  return x.T @ x, rng.normal(size=(D_IN, D_OUT)).astype(np.float32)


def _sparsegpt_reference(w, h, total, block, damp=0.01):
  """Algorithm 1 of Frantar & Alistarh 2023 in float64 with eager (not lazy) updates."""
  d = w.shape[0]
  h = h.astype(np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  h += damp * np.mean(np.diag(h)) * np.eye(d)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  w = w.astype(np.float64).copy()
  keep = np.ones(w.shape, bool)
  ends = list(range(block, d, block)) + [d]
  starts = [0] + ends[:-1]
  # dead inputs' weights first, then the rest in proportion to the blocks' live weights
  free = [int(dead[s:e].sum()) * w.shape[1] for s, e in zip(starts, ends)]
  on_free = min(total, sum(free))
  live = np.cumsum([(e - s) * w.shape[1] - f for s, e, f in zip(starts, ends, free)])
  cum = np.minimum(np.cumsum(free), on_free) + [round((total - on_free) * c / live[-1])
                                                 for c in live]
  cum = [0] + list(cum)
  start = 0
  for b, end in enumerate(ends):
    score = w[start:end] ** 2 / np.diag(u)[start:end, None] ** 2
    score[dead[start:end]] = 0.0
    keep[start:end] = ~reference.prune_lowest([score], cum[b + 1] - cum[b])[0]
    for r in range(start, end):
      q = np.where(keep[r], w[r], 0.0)
      w[r:] -= np.outer(u[r, r:], (w[r] - q) / u[r, r])
      w[r] = q
    start = end
  return w, keep


_run = jax.jit(lambda w, h, s: sg.sparsegpt(w, h, s, block_size=BLOCK))


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_matches_numpy_reference(sparsity):
  h, w = _problem()
  want_w, want_keep = _sparsegpt_reference(w, h, round(sparsity * w.size), BLOCK)
  got_w, got_keep = sg.sparsegpt(w, h, sparsity, block_size=BLOCK)
  np.testing.assert_array_equal(np.asarray(got_keep), want_keep)
  np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=1e-4, atol=1e-4)
  jit_w, jit_keep = _run(w, h, jnp.float32(sparsity))
  np.testing.assert_array_equal(np.asarray(jit_keep), np.asarray(got_keep))
  np.testing.assert_array_equal(np.asarray(jit_w), np.asarray(got_w))


def test_sparsity_zero_is_bit_identical():
  h, w = _problem()
  w = w.copy()
  w[2, 3] = -0.0
  for pattern in [None, ("block", 4, 2)]:
    got, keep = sg.sparsegpt(w, h, 0.0, pattern=pattern, block_size=BLOCK)
    assert bool(np.all(keep))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), w.view(np.uint32))


@settings(max_examples=20, deadline=None)
@given(st.floats(0, 1))
def test_exact_count_for_any_sparsity(sparsity):
  h, w = _problem(1)
  _, keep = _run(w, h, sparsity)
  assert int(np.sum(~np.asarray(keep))) == round(sparsity * w.size)


def test_nm_groups_exact_and_better_than_nm_magnitude():
  h, w = _problem(2)
  got, keep = sg.sparsegpt(w, h, None, pattern="2:4", block_size=BLOCK)
  groups = np.asarray(keep).reshape(D_IN // 4, 4, D_OUT).sum(axis=1)
  assert np.all(groups == 2)
  assert np.all(np.asarray(got)[~np.asarray(keep)] == 0)
  magnitude_keep = reference.nm_keep(np.abs(w), 2, 4, axis=0)
  loss = float(obs.layer_loss(w, got, h))
  assert loss < float(obs.layer_loss(w, np.where(magnitude_keep, w, 0), h))
  with pytest.raises(ValueError, match="sparsity"):
    sg.sparsegpt(w, h, 0.3, pattern="2:4")


def test_block_pattern_prunes_whole_tiles():
  h, w = _problem(3)
  got, keep = sg.sparsegpt(w, h, 0.5, pattern=jp.BlockPattern((4, 2)), block_size=BLOCK)
  tiles = np.asarray(keep).reshape(D_IN // 4, 4, D_OUT // 2, 2)
  full, empty = tiles.all(axis=(1, 3)), (~tiles).all(axis=(1, 3))
  assert np.all(full | empty)
  assert int(empty.sum()) == round(0.5 * (D_IN // 4) * (D_OUT // 2))
  assert np.all(np.asarray(got)[~np.asarray(keep)] == 0)
  with pytest.raises(ValueError, match="pattern"):
    sg.sparsegpt(w, h, 0.5, pattern=("block", 5, 2))


def test_dead_inputs_go_first():
  h, w = _problem(4)
  _, keep = sg.sparsegpt(w, h, 1 / D_IN, block_size=BLOCK)
  removed = ~np.asarray(keep)
  assert removed[DEAD].all() and removed.sum() == D_OUT


def test_loss_below_magnitude_and_losses_helper():
  h, w = _problem(5)
  k = round(0.5 * w.size)
  magnitude_keep = ~reference.prune_lowest([np.abs(w)], k)[0]
  got, _ = sg.sparsegpt(w, h, 0.5, block_size=BLOCK)
  loss = float(obs.layer_loss(w, got, h))
  assert loss < float(obs.layer_loss(w, np.where(magnitude_keep, w, 0), h))
  # refitting SparseGPT's own mask can only lower its loss
  refitted = refit_lib.refit(w, h, np.asarray(got) != 0)
  assert float(obs.layer_loss(w, refitted, h)) <= loss * (1 + 1e-5)
  curve = sg.sparsegpt_losses(w, h, [0.0, 0.5], block_size=BLOCK)
  np.testing.assert_allclose(np.asarray(curve), [0.0, loss], rtol=1e-6)


def test_bad_input():
  h, w = _problem()
  with pytest.raises(ValueError, match="sparsity"):
    sg.sparsegpt(w, h, 1.5)
  with pytest.raises(ValueError, match="block_size"):
    sg.sparsegpt(w, h, 0.5, block_size=0)
  with pytest.raises(ValueError, match="pattern"):
    sg.sparsegpt(w, h, 0.5, pattern="2:5")
  with pytest.raises(ValueError, match="pattern"):
    sg.sparsegpt(w, h, 0.5, pattern=("nm", 2, 4))
  with pytest.raises(ValueError, match="w: expected a 2-D"):
    sg.sparsegpt(w[None], h, 0.5)
