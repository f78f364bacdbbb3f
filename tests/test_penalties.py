"""Tests for add_l1, proximal_l1 (ISTA) and proximal_group_lasso."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune._src import penalties


def _lasso_problem():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 12)).astype(np.float32)
  w_true = np.zeros((12, 1), np.float32)
  w_true[[1, 4, 7]] = [[2.0], [-1.5], [0.7]]
  b = (a @ w_true + 0.01 * rng.normal(size=(40, 1))).astype(np.float32)
  return a, b


def _numpy_ista(a, b, w0, lam, lr, steps):
  w = w0.astype(np.float64)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  for _ in range(steps):
    g = a64.T @ (a64 @ w - b64) / a64.shape[0]
    z = w - lr * g
    w = np.sign(z) * np.maximum(np.abs(z) - lr * lam, 0.0)
  return w


def test_proximal_l1_is_ista():
  a, b = _lasso_problem()
  lam, lr, steps = 0.3, 0.05, 200
  params = {"w": jnp.full((12, 1), 0.5, jnp.float32)}
  tx = optax.chain(optax.sgd(lr), penalties.proximal_l1(lam, lr))
  state = tx.init(params)

  def loss(p):
    r = jnp.asarray(a) @ p["w"] - jnp.asarray(b)
    return 0.5 * jnp.mean(jnp.sum(r**2, axis=1))

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  want = _numpy_ista(a, b, np.full((12, 1), 0.5), lam, lr, steps)
  got = np.asarray(params["w"])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.array_equal(got == 0, want == 0)
  assert 0 < np.sum(got == 0) < 12  # the solution is sparse, and not trivially so
  # Exact zeros are +0.0.
  assert not np.any(np.signbit(got[got == 0]))


def test_proximal_l1_schedule_learning_rate_and_prunable():
  sched = optax.linear_schedule(0.1, 0.01, 10)
  params = {"w": jnp.asarray([[0.05, -0.3], [0.2, 1.0]]), "b": jnp.asarray([0.01, -0.02])}
  tx = penalties.proximal_l1(1.0, sched)
  state = tx.init(params)
  zero_updates = jax.tree.map(jnp.zeros_like, params)
  u, state = tx.update(zero_updates, state, params)
  new = optax.apply_updates(params, u)
  # Threshold at count 0 is 0.1: |0.05| zeroed, others shrunk by 0.1; bias (1-D) untouched.
  np.testing.assert_allclose(new["w"], [[0.0, -0.2], [0.1, 0.9]], atol=1e-7)
  assert new["w"][0, 0] == 0.0
  np.testing.assert_array_equal(new["b"], params["b"])
  u, state = tx.update(zero_updates, state, new)
  new2 = optax.apply_updates(new, u)
  t1 = float(sched(1))
  np.testing.assert_allclose(new2["w"], [[0.0, -0.2 + t1], [0.1 - t1, 0.9 - t1]], atol=1e-6)


def test_add_l1_adds_sign_on_prunable_leaves_only():
  params = {"w": jnp.asarray([[1.0, -2.0], [0.0, 3.0]]), "b": jnp.asarray([1.0, -1.0])}
  grads = {"w": jnp.asarray([[0.5, 0.5], [0.5, 0.5]]), "b": jnp.asarray([0.25, 0.25])}
  tx = penalties.add_l1(0.1)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["w"], [[0.6, 0.4], [0.5, 0.6]], rtol=1e-7)
  np.testing.assert_array_equal(u["b"], grads["b"])
  tx_all = penalties.add_l1(0.1, prunable=lambda path, x: True)
  u, _ = tx_all.update(grads, tx_all.init(params), params)
  np.testing.assert_allclose(u["b"], [0.35, 0.15], rtol=1e-7)


def test_add_l1_is_l1_gradient_through_sgd():
  params = {"w": jnp.asarray([[0.3, -0.7]])}
  grads = {"w": jnp.asarray([[1.0, 1.0]])}
  tx = optax.chain(penalties.add_l1(0.5), optax.sgd(0.1))
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["w"], [[-0.1 * 1.5, -0.1 * 0.5]], rtol=1e-6)


def test_proximal_group_lasso_block_soft_threshold():
  # Columns (axis=-1 groups) with norms 5, 0.5 and 1: threshold 1 kills the last two exactly.
  w = jnp.asarray([[3.0, 0.3, 0.6], [4.0, 0.4, 0.8]])
  params = {"k": w, "b": jnp.ones((3,))}
  tx = penalties.proximal_group_lasso(2.0, 0.5, axis=-1)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, u)
  want = np.asarray(w) * np.maximum(0, 1 - 1.0 / np.linalg.norm(np.asarray(w), axis=0))
  np.testing.assert_allclose(new["k"], want, atol=1e-6)
  assert np.all(np.asarray(new["k"])[:, 1:] == 0.0)
  np.testing.assert_array_equal(new["b"], params["b"])
  # Rows as groups.
  tx0 = penalties.proximal_group_lasso(1.0, 1.0, axis=0)
  u, _ = tx0.update(jax.tree.map(jnp.zeros_like, params), tx0.init(params), params)
  rows = optax.apply_updates(params, u)["k"]
  norms = np.linalg.norm(np.asarray(w), axis=1, keepdims=True)
  np.testing.assert_allclose(rows, np.asarray(w) * (1 - 1 / norms), atol=1e-6)


def test_group_lasso_bad_axis_names_leaf():
  params = {"dense": {"kernel": jnp.ones((2, 3))}}
  tx = penalties.proximal_group_lasso(1.0, 1.0, axis=2)
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]"):
    tx.update(params, tx.init(params), params)


def test_penalties_require_params():
  params = {"w": jnp.ones((2, 2))}
  for tx in [penalties.add_l1(0.1), penalties.proximal_l1(0.1, 0.1),
             penalties.proximal_group_lasso(0.1, 0.1)]:
    with pytest.raises(ValueError, match="params"):
      tx.update(params, tx.init(params))
