"""Least-squares refit: explicit-X least squares, bit identity, counts of the two solve sides."""

import jax
import numpy as np
import pytest

from jaxprune._src import obs
from jaxprune._src import refit as refit_lib

D_IN, D_OUT, TOKENS, DEAD = 72, 8, 160, 5


def _problem(seed=0):
  """Correlated features, one dead input: explicit X, its Gram matrix and a kernel."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(TOKENS, D_IN)) @ (np.eye(D_IN) + 0.4 * rng.normal(size=(D_IN, D_IN)))
  x[:, DEAD] = 0.0
  x = x.astype(np.float32)
  return x, x.T @ x, rng.normal(size=(D_IN, D_OUT)).astype(np.float32)


def _lstsq_refit(x, w, keep, damp):
  """Per column: argmin ‖X w' - X w‖² + Σ_i λ_i (w'_i - w_i)² over w'_S, w'_R = 0, where λ_i is
  the dampening plus 1 on dead inputs, solved by numpy lstsq on the augmented rows."""
  h = x.T.astype(np.float64) @ x
  diag = np.diag(h) + (np.diag(h) == 0)
  lam = damp * diag.mean() + (np.diag(h) == 0)
  a = np.vstack([x.astype(np.float64), np.diag(np.sqrt(lam))])
  out = np.zeros(w.shape)
  for j in range(w.shape[1]):
    s = keep[:, j]
    out[s, j] = np.linalg.lstsq(a[:, s], a @ w[:, j], rcond=None)[0]
  return out


def _mixed_mask():
  """Columns from 0 % to 100 % removed: direct solves on both sides and conjugate gradients."""
  rng = np.random.default_rng(1)
  return rng.random((D_IN, D_OUT)) >= np.linspace(0.0, 1.0, D_OUT)[None, :]


@pytest.mark.parametrize("method", ["auto", pytest.param("cholesky", marks=pytest.mark.slow)])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_refit_equals_explicit_least_squares(method, damp):
  x, h, w = _problem()
  w[0, 0] = -0.0
  keep = _mixed_mask()
  got = np.asarray(refit_lib.refit(w, h, keep, damp=damp, method=method))
  want = _lstsq_refit(x, w, keep, damp)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  assert np.all(got[~keep] == 0)
  # a column without removals comes back bit for bit, -0.0 included
  np.testing.assert_array_equal(got[:, 0].view(np.uint32), w[:, 0].view(np.uint32))
  # kept weights of the dead input are not moved by the compensation
  np.testing.assert_allclose(got[DEAD][keep[DEAD]], w[DEAD][keep[DEAD]], rtol=1e-6)
  masked = np.where(keep, w, 0)
  assert float(obs.layer_loss(w, got, h)) < 0.9 * float(obs.layer_loss(w, masked, h))


def test_refit_traced_mask_and_conjugate_gradient_fallback():
  """Under jit the direct systems are padded to their bound, and without dampening the columns
  whose removed-side system is too ill-conditioned for float32 are re-solved in the program."""
  x, h, w = _problem()
  keep = _mixed_mask()
  jitted = np.asarray(jax.jit(lambda m: refit_lib.refit(w, h, m, damp=0.0, chunk=3))(keep))
  want = _lstsq_refit(x, w, keep, 0.0)
  np.testing.assert_allclose(jitted, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  _, iterations = refit_lib.refit_with_info(w, h, keep)
  assert 0 < int(iterations) < 200  # dampened: stopped by the tolerance, not by max_iter


def test_refit_bad_input():
  _, h, w = _problem()
  with pytest.raises(ValueError, match="mask"):
    refit_lib.refit(w, h, np.ones((D_IN, D_OUT + 1), bool))
  with pytest.raises(ValueError, match="mask"):
    refit_lib.refit(w, h, np.ones(w.shape, np.float32))
  with pytest.raises(ValueError, match="h: expected shape"):
    refit_lib.refit(w, h[:-1], np.ones(w.shape, bool))
  with pytest.raises(ValueError, match="damp"):
    refit_lib.refit(w, h, np.ones(w.shape, bool), damp=-1.0)
  with pytest.raises(ValueError, match="method"):
    refit_lib.refit(w, h, np.ones(w.shape, bool), method="lu")
