"""Gauss–Newton diagonal against explicit per-example JᵀΛJ references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import gauss_newton

N, D, H, C = 12, 5, 6, 4


def rand(i, shape):
  return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


class Net(nn.Module):
  """A VALID convolution as large as the image (one output position: one token per example, so
  the diagonal is exact, which pins the convolution's patch / kernel layout), then an MLP."""

  @nn.compact
  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x, self.param("conv", nn.initializers.zeros, (D, 2, 3, 2)),
                                     (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = jnp.tanh(y.reshape(x.shape[0], D))
    return nn.Dense(C, name="out")(jnp.tanh(nn.Dense(H, name="hidden")(y)))


PARAMS = {"params": {"conv": rand(0, (D, 2, 3, 2)),
                         "hidden": {"kernel": rand(1, (D, H)), "bias": rand(2, (H,))},
                         "out": {"kernel": rand(3, (H, C)), "bias": rand(4, (C,))}}}
X = rand(5, (N, 2, 3, 2))
Y = np.random.default_rng(6).integers(0, C, N)


def jacobians(apply_fn, params, x):
  """Per-example logits and Jacobians ``∂logits / ∂params``."""
  one = lambda p, v: apply_fn(p, v[None])[0]
  return jax.jit(jax.vmap(lambda v: (one(params, v), jax.jacrev(one)(params, v))))(x)


def reference(logits, jac, out_hessian):
  """Σ_n diag(J_nᵀ Λ_n J_n), contracted in float64."""
  lam = np.stack([out_hessian(np.asarray(z, np.float64), n) for n, z in enumerate(logits)])
  return jax.tree.map(lambda j: np.einsum("nc...,ncd,nd...->...", np.asarray(j, np.float64),
                                          lam, np.asarray(j, np.float64)), jac)


def softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def fisher(z, n):
  p = softmax(z)
  return np.diag(p) - np.outer(p, p)


def assert_kernels_match(got, want, rtol=1e-4):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    if g.ndim < 2:
      np.testing.assert_array_equal(g, 0.0)  # unprunable leaves stay zero
    else:
      np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6 * np.abs(w).max(), err_msg=str(path))


@pytest.fixture(scope="module")
def net_jac():
  return jacobians(Net().apply, PARAMS, X)


def test_softmax_cross_entropy_exact_with_one_token_per_example(net_jac):
  got = gauss_newton.gauss_newton_diag(Net().apply, PARAMS, [X[:6], X[6:]])
  assert_kernels_match(got, reference(*net_jac, fisher))


def test_jitted_equals_eager():
  model = lambda p, x: x @ p["w"]
  params, batches = {"w": rand(20, (D, C))}, [rand(21, (6, D)), rand(22, (6, D))]
  jitted = gauss_newton.gauss_newton_diag(model, params, batches)
  with jax.disable_jit():
    eager = gauss_newton.gauss_newton_diag(model, params, batches)
  np.testing.assert_allclose(eager["w"], jitted["w"], rtol=1e-5, atol=1e-7)


def test_mse_and_empirical_fisher_exact(net_jac):
  got = gauss_newton.gauss_newton_diag(Net().apply, PARAMS, [X], loss="mse")
  assert_kernels_match(got, reference(*net_jac, lambda z, n: np.eye(C)))

  def empirical(z, n):
    g = softmax(z) - np.eye(C)[Y[n]]
    return np.outer(g, g)

  apply = lambda p, b: Net().apply(p, b[0] if isinstance(b, tuple) else b)
  got = gauss_newton.gauss_newton_diag(apply, PARAMS, [(X, Y)], labels=lambda b: b[1])
  assert_kernels_match(got, reference(*net_jac, empirical))


def test_conv_drops_cross_token_terms():
  """Σ_n Σ_c p_nc Σ_t x_nt² δ^c_nt², with δ from per-example gradients and numpy patches."""
  conv = nn.Conv(3, (3, 3), padding="SAME")
  params = {"params": {"kernel": rand(10, (3, 3, 2, 3)), "bias": rand(11, (3,))},
            "head": rand(12, (4 * 4 * 3, C))}
  x = rand(13, (3, 4, 4, 2))

  def model(p, v, eps=0.0):
    y = conv.apply({"params": p["params"]}, v) + eps
    return jnp.tanh(y).reshape(v.shape[0], -1) @ p["head"]

  got = gauss_newton.gauss_newton_diag(model, params, [x])

  def per_example(v):
    nll = lambda e, c: -jax.nn.log_softmax(model(params, v[None], e)[0])[c]
    grads = jax.vmap(jax.grad(nll), (None, 0))(jnp.zeros((1, 4, 4, 3)), jnp.arange(C))
    return jax.nn.softmax(model(params, v[None])[0]), grads

  probs, deltas = jax.jit(jax.vmap(per_example))(x)
  want = np.zeros((2 * 9, 3))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for n in range(x.shape[0]):
    patches = np.stack([xp[n, r:r + 3, s:s + 3].transpose(2, 0, 1).ravel()
                        for r in range(4) for s in range(4)]).astype(np.float64)
    for c in range(C):
      delta = np.asarray(deltas[n, c], np.float64).reshape(16, 3)
      want += float(probs[n, c]) * (patches ** 2).T @ delta ** 2
  want = want.reshape(2, 3, 3, 3).transpose(1, 2, 0, 3)  # rows (c, kh, kw) -> HWIO
  np.testing.assert_allclose(got["params"]["kernel"], want, rtol=1e-4, atol=1e-8)
  np.testing.assert_array_equal(got["head"] != 0, True)


def test_bad_input():
  with pytest.raises(ValueError, match=r"loss: expected one of"):
    gauss_newton.gauss_newton_diag(Net().apply, PARAMS, [X], loss="hinge")
  with pytest.raises(ValueError, match=r"labels: only used with loss='softmax_cross_entropy'"):
    gauss_newton.gauss_newton_diag(Net().apply, PARAMS, [X], loss="mse", labels=len)
  with pytest.raises(ValueError, match=r"batches: expected at least one batch"):
    gauss_newton.gauss_newton_diag(Net().apply, PARAMS, iter(()))
  with pytest.raises(ValueError, match=r"apply_fn: expected one logits array of shape \(batch, "
                     r"classes\), got \[\(2, 3, 4\)\]"):
    gauss_newton.gauss_newton_diag(lambda p, x: x @ p["w"], {"w": rand(13, (D, C))},
                                   [rand(14, (2, 3, D))])
  embed = lambda p, ids: p["emb"][ids] @ p["w"]
  params = {"emb": rand(15, (7, D)), "w": rand(16, (D, C))}
  with pytest.raises(ValueError, match=r"prunable leaf \['emb'\] is not read as a dot/conv"):
    gauss_newton.gauss_newton_diag(embed, params, [np.arange(3)])
  with pytest.raises(ValueError, match=r"labels: expected integer labels of shape \(12,\)"):
    gauss_newton.gauss_newton_diag(Net().apply, PARAMS, [X], labels=lambda b: Y[:3])


def test_output_sensitivity_linear_exact_and_two_layer_trace():
  # Output layer: ∂f/∂y = I, and a Rademacher probe has ‖v‖² = d_out exactly, so the estimate is
  # exactly N·d_out. Hidden layer: E‖W2 v‖² = ‖W2‖²_F per position.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
  params = {"w1": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)}
  apply_fn = lambda p, x: (x @ p["w1"]) @ p["w2"]
  exact = gauss_newton.output_sensitivity(apply_fn, params, [x[:3], x[3:]], ["['w2']"])
  assert exact == {"['w2']": 6 * 2}
  many = gauss_newton.output_sensitivity(apply_fn, params, [x], ["['w1']", "['w2']"],
                                         num_probes=4096, seed=1)
  expected = 6 * float(jnp.sum(params["w2"] ** 2))
  assert many["['w1']"] == pytest.approx(expected, rel=0.05)
  assert many["['w2']"] == 12.0
  with pytest.raises(ValueError, match="apply_fn: expected at least one floating-point output"):
    gauss_newton.output_sensitivity(lambda p, x: jnp.argmax(x @ p["w1"] @ p["w2"], -1), params,
                                    [x], ["['w2']"])


def test_output_diag_exact_for_a_linear_output_and_invariant_to_rescaling():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  # f = x @ a: the probes' squares are 1, so the estimate is Σ_n x_ni² for every output, exactly
  linear = gauss_newton.output_diag(lambda p, x: x @ p["a"], {"a": a}, [x[:16], x[16:]], ["['a']"])
  expected = np.broadcast_to(np.sum(np.square(np.asarray(x)), axis=0)[:, None], (5, 4))
  np.testing.assert_allclose(np.asarray(linear["['a']"]), expected, rtol=1e-5)
  # f = (x @ a) @ b with a scaled up by 8 and b down by 8 (powers of two: exact in float32):
  # the same model, and w² · diag, the OBD saliency, is unchanged in both kernels
  model = lambda p, x: (x @ p["a"]) @ p["b"]
  paths = ["['a']", "['b']"]
  sal = lambda p: {k: np.asarray(jnp.square(p[k[2]]) * d) for k, d in
                   gauss_newton.output_diag(model, p, [x], paths).items()}
  plain, scaled = sal({"a": a, "b": b}), sal({"a": 8.0 * a, "b": b / 8.0})
  for k in paths:
    np.testing.assert_allclose(scaled[k], plain[k], rtol=1e-5)


def test_output_diag_of_a_scan_stacked_kernel_equals_the_unrolled_layers():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  stack = jnp.asarray(rng.normal(size=(3, 4, 4)) / 2, jnp.float32)
  out = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  body = lambda c, w: (jnp.tanh(c @ w), None)
  scanned = lambda p, x: jax.lax.scan(body, x, p["stack"])[0] @ p["out"]

  def unrolled(p, x):
    for k in range(3):
      x = body(x, p[f"w{k}"])[0]
    return x @ p["out"]

  got = gauss_newton.output_diag(scanned, {"stack": stack, "out": out}, [x],
                                 ["['stack']", "['out']"])
  flat = {f"w{k}": stack[k] for k in range(3)} | {"out": out}
  paths = [f"['w{k}']" for k in range(3)] + ["['out']"]
  want = gauss_newton.output_diag(unrolled, flat, [x], paths)
  # the same probes (one key per batch, one probe array per output), so equal up to rounding
  np.testing.assert_allclose(got["['stack']"], np.stack([want[f"['w{k}']"] for k in range(3)]),
                             rtol=1e-5)
  np.testing.assert_allclose(got["['out']"], want["['out']"], rtol=1e-5)
  assert float(jnp.min(got["['stack']"])) > 0.0
