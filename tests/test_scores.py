"""Score functions: formulas, dtypes, Hutchinson Hessian diagonal against jax.hessian."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp


def _params(dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"w1": jax.random.normal(k1, (6, 10), dtype) * 0.5,
          "b1": jax.random.normal(k2, (10,), dtype) * 0.1,
          "w2": jax.random.normal(k3, (10, 3), dtype) * 0.5}


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"]
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 3), -1))


def _batch():
  kx, ky = jax.random.split(jax.random.key(1))
  return jax.random.normal(kx, (16, 6)), jax.random.randint(ky, (16,), 0, 3)


def test_first_order_formulas():
  p = _params()
  g = jax.tree.map(lambda x: x[::-1] * 2.0 - 0.3, p)
  for got, want in [(jp.magnitude(p), jax.tree.map(np.abs, p)),
                    (jp.gradient(g), jax.tree.map(np.abs, g)),
                    (jp.taylor(p, g), jax.tree.map(lambda a, b: np.abs(np.asarray(a) * b), p, g))]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_obd_and_curvature_formulas():
  p = _params()
  h = jax.tree.map(lambda x: jnp.cos(x) - 0.2, p)
  jax.tree.map(lambda s, w, hh: np.testing.assert_allclose(s, 0.5 * hh * w * w, rtol=1e-6),
               jp.obd(p, h), p, h)
  jax.tree.map(lambda s, hh: np.testing.assert_allclose(s, np.abs(hh)), jp.curvature(h), h)


def test_scores_are_float32_for_bf16_params():
  p = _params(jnp.bfloat16)
  for s in [jp.magnitude(p), jp.taylor(p, p), jp.random_scores(p, jax.random.key(0))]:
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s))
  np.testing.assert_array_equal(jp.magnitude(p)["w1"], np.abs(np.asarray(p["w1"], np.float32)))


def test_random_scores_deterministic_and_per_leaf_distinct():
  p = {"a": jnp.zeros((50, 2)), "b": jnp.zeros((50, 2))}
  s1 = jp.random_scores(p, jax.random.key(3))
  s2 = jp.random_scores(p, jax.random.key(3))
  np.testing.assert_array_equal(s1["a"], s2["a"])
  assert not np.array_equal(s1["a"], s1["b"])
  assert 0.0 <= float(s1["a"].min()) and float(s1["a"].max()) < 1.0


_hess_jit = jax.jit(lambda p, x, y, key: jp.hessian_diag(_loss, p, x, y, key=key, num_probes=256))


@jax.jit  # eagerly, jax.hessian would dispatch (and compile) each operation separately
def _exact_diag(p, x, y):
  flat, unravel = jax.flatten_util.ravel_pytree(p)
  h = jax.hessian(lambda f: _loss(unravel(f), x, y))(flat)
  return unravel(jnp.diag(h))


def test_hessian_diag_converges_to_exact_diagonal():
  p = _params()
  x, y = _batch()
  exact = jax.flatten_util.ravel_pytree(_exact_diag(p, x, y))[0]
  errors = []
  for probes_blocks in (1, 16):
    keys = jax.random.split(jax.random.key(7), probes_blocks)
    est = sum(jax.flatten_util.ravel_pytree(_hess_jit(p, x, y, k))[0] for k in keys)
    est = est / probes_blocks
    errors.append(float(jnp.sqrt(jnp.mean((est - exact) ** 2))))
  # 16x the probes: the error shrinks like 1/sqrt(probes) (4x); allow sampling noise
  assert errors[1] < errors[0] / 2.5, errors
  assert errors[1] < 0.05 * float(jnp.sqrt(jnp.mean(exact ** 2))) + 1e-3


def test_hessian_diag_exact_for_separable_loss():
  # A diagonal Hessian makes every Rademacher probe exact (variance sum_{j!=i} H_ij^2 = 0).
  a = {"u": jnp.arange(1.0, 7.0).reshape(2, 3), "v": jnp.array([0.5, -2.0])}
  loss = lambda p: jnp.sum(a["u"] * p["u"] ** 2) + jnp.sum(a["v"] * p["v"] ** 2)
  est = jp.hessian_diag(loss, jax.tree.map(jnp.ones_like, a), key=jax.random.key(0), num_probes=1)
  jax.tree.map(lambda e, c: np.testing.assert_allclose(e, 2 * c, rtol=1e-6), est, a)


def test_hessian_diag_bf16_params_accumulates_float32():
  p = _params(jnp.bfloat16)
  x, y = _batch()
  loss = lambda p, x, y: _loss(jax.tree.map(lambda t: t.astype(jnp.float32), p), x, y)
  est = jax.jit(lambda p, x, y: jp.hessian_diag(loss, p, x, y, key=jax.random.key(0),
                                                num_probes=4))(p, x, y)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(est))
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(est))


def test_bad_score_inputs():
  p = _params()
  with pytest.raises(ValueError, match=r"params: expected floating-point arrays, got dtype int32 "
                                       r"at leaf \['n'\]"):
    jp.magnitude({"n": jnp.ones((2, 2), jnp.int32)})
  with pytest.raises(ValueError, match=r"leaf \['b1'\] has shape \(10,\) in params and \(3,\)"):
    jp.taylor(p, {**p, "b1": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"leaf \['w2'\] is in params but not in grads"):
    jp.taylor(p, {"w1": p["w1"], "b1": p["b1"]})
  with pytest.raises(ValueError, match="expected a scalar loss, got a value of shape"):
    jp.hessian_diag(lambda q: q["w1"] * 2, p, key=jax.random.key(0))
  with pytest.raises(ValueError, match="num_probes: expected an integer >= 1, got 0"):
    jp.hessian_diag(lambda q: jnp.sum(q["w1"]), p, key=jax.random.key(0), num_probes=0)
