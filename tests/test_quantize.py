"""Int8 quantization of pruned weights and the distillation loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune._src import distill
from jaxprune._src import quantize as q_lib


def pruned_params(seed=0, shape=(12, 6), sparsity=0.5):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  w[rng.random(shape) < sparsity] = 0.0
  return {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray(rng.normal(size=shape[-1:]),
                                                                   jnp.float32)}}


def test_known_values():
  w = jnp.array([[1.0, -0.5], [0.0, 0.25], [-2.0, 0.0]])
  qa = q_lib.quantize_array(w)
  np.testing.assert_array_equal(qa.scale, np.array([[2.0 / 127, 0.5 / 127]], np.float32))
  np.testing.assert_array_equal(qa.values, np.array([[64, -127], [0, 64], [-127, 0]], np.int8))
  # 1.0 / (2/127) = 63.5 rounds half to even -> 64; 0.25 / (0.5/127) = 63.5 -> 64.
  assert qa.values.dtype == jnp.int8


def test_zeros_preserved_and_error_bound():
  params = pruned_params()
  qp = q_lib.quantize(params)
  assert isinstance(qp["dense"]["kernel"], q_lib.QuantizedArray)
  assert qp["dense"]["bias"] is params["dense"]["bias"]  # 1-D: not prunable, untouched
  w = np.asarray(params["dense"]["kernel"])
  qa = qp["dense"]["kernel"]
  np.testing.assert_array_equal(np.asarray(qa.values) == 0, w == 0)
  deq = np.asarray(q_lib.dequantize(qp)["dense"]["kernel"])
  err = np.abs(deq - w)
  assert np.all(err <= np.asarray(qa.scale) / 2 * (1 + 1e-6))
  stats = q_lib.quantization_error(params, qp)
  assert stats["quant/max_abs"] == pytest.approx(err.max())
  assert stats["quant/max_rel"] <= 1 / 254 * (1 + 1e-6)
  assert stats["quant/max_abs/dense/kernel"] == stats["quant/max_abs"]
  kept = int(np.count_nonzero(w))
  assert stats["bytes/int8_dense"] == 72 + 6 * 4 + 6 * 4      # int8 kernel + scales + f32 bias
  assert stats["bytes/int8_bitmask"] == min(72, kept + 9) + 6 * 4 + 6 * 4


def test_requantize_is_bitwise_fixed_point_and_dtype():
  params = pruned_params(1)
  qp = q_lib.quantize(params)
  again = q_lib.quantize(q_lib.dequantize(qp))
  np.testing.assert_array_equal(again["dense"]["kernel"].values, qp["dense"]["kernel"].values)
  np.testing.assert_array_equal(again["dense"]["kernel"].scale, qp["dense"]["kernel"].scale)
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert q_lib.dequantize(q_lib.quantize(bf), like=bf)["dense"]["kernel"].dtype == jnp.bfloat16


def test_jit_matches_eager_and_zero_channel():
  w = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 5)), jnp.float32).at[..., 2].set(0)
  eager = q_lib.quantize_array(w, axis=-1)
  jitted = jax.jit(q_lib.quantize_array, static_argnums=1)(w, -1)
  np.testing.assert_array_equal(eager.values, jitted.values)
  np.testing.assert_array_equal(eager.scale, jitted.scale)
  assert eager.scale.shape == (1, 1, 5) and float(eager.scale[0, 0, 2]) == 1.0
  assert not np.any(np.asarray(eager.values[..., 2]))


def test_axis_error_names_leaf():
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]"):
    q_lib.quantize(pruned_params(), axis=3)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_error_bound_property(seed, magnitude):
  w = jnp.asarray(np.random.default_rng(seed).normal(size=(7, 3)) * magnitude, jnp.float32)
  qa = q_lib.quantize_array(w, axis=0)
  err = np.abs(np.asarray(q_lib.dequantize_array(qa)) - np.asarray(w))
  assert np.all(err <= np.asarray(qa.scale) / 2 * (1 + 1e-5))
  assert np.abs(np.asarray(qa.values).astype(int)).max() == 127


# --- distillation ----------------------------------------------------------------------------


def test_distillation_zero_when_equal_and_formula():
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, size=5))
  assert float(distill.distillation_loss(t, t, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)
  T, a = 2.0, 0.7
  pt = jax.nn.softmax(t / T)
  kl = np.sum(pt * (jnp.log(pt) - jax.nn.log_softmax(s / T)), -1).mean()
  ce = optax.softmax_cross_entropy_with_integer_labels(s, labels).mean()
  expected = a * T**2 * kl + (1 - a) * ce
  got = distill.distillation_loss(s, t, labels, temperature=T, alpha=a)
  assert float(got) == pytest.approx(float(expected), rel=1e-5)
  jitted = jax.jit(distill.distillation_loss, static_argnames=("temperature", "alpha"))
  assert float(jitted(s, t, labels, temperature=T, alpha=a)) == pytest.approx(float(got),
                                                                              rel=1e-6)


def test_distillation_gradient_is_t_times_prob_gap():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  T = 4.0
  g_s, g_t = jax.grad(lambda s, t: distill.distillation_loss(s, t, temperature=T),
                      argnums=(0, 1))(s, t)
  expected = T * (jax.nn.softmax(s / T) - jax.nn.softmax(t / T)) / s.shape[0]
  np.testing.assert_allclose(g_s, expected, atol=1e-6)
  assert not np.any(np.asarray(g_t))  # the teacher is not trained


def test_distillation_bad_args():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="teacher_logits"):
    distill.distillation_loss(x, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="temperature"):
    distill.distillation_loss(x, x, temperature=0.0)
  with pytest.raises(ValueError, match="alpha"):
    distill.distillation_loss(x, x, jnp.zeros(2, int), alpha=1.5)
  with pytest.raises(ValueError, match="labels"):
    distill.distillation_loss(x, x, jnp.zeros(3, int))


def test_non_finite_refused_eagerly_and_kept_apart_under_jit():
  w = jnp.asarray([[1.0, 0.5], [jnp.inf, -0.25], [-0.5, jnp.nan]])
  with pytest.raises(ValueError, match=r"got inf at index \(1, 0\) \(leaf \['k'\]\)"):
    q_lib.quantize({"k": w})
  # Under jit nothing can be refused: each channel's scale comes from its finite entries, so
  # they keep their precision; inf saturates and NaN becomes 0.
  qa = jax.jit(q_lib.quantize_array)(w)
  np.testing.assert_array_equal(qa.scale, np.array([[1.0 / 127, 0.5 / 127]], np.float32))
  np.testing.assert_array_equal(qa.values, np.array([[127, 127], [127, -64], [-64, 0]], np.int8))


def test_empty_leaf_quantizes_to_empty():
  qp = q_lib.quantize({"e": jnp.zeros((0, 4)), "k": jnp.ones((2, 4))})
  assert qp["e"].values.shape == (0, 4) and qp["e"].scale.shape == (1, 4)
  np.testing.assert_array_equal(qp["e"].scale, 1.0)
  assert q_lib.dequantize(qp)["e"].shape == (0, 4)
  assert q_lib.quantization_error({"e": jnp.zeros((0, 4)), "k": jnp.ones((2, 4))},
                                  qp)["quant/max_abs/e"] == 0.0
