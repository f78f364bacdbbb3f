"""Dependency groups found from the jaxpr: exact members, pinning, unsupported primitives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from models import MLP, Block, ResCNN


def members(group):
  return sorted((m.path, m.axis) for m in group.members)


def by_name(groups):
  return {g.name: g for g in groups}


def test_mlp_groups_exact():
  x = jnp.ones((2, 4))
  v = jax.eval_shape(MLP().init, jax.random.key(0), x)
  gs = jp.structured.find_groups(MLP().apply, v, x)
  assert [g.size for g in gs] == [6, 5]
  p = "['params']"
  assert members(gs[0]) == [(f"{p}['Dense_0']['bias']", 0), (f"{p}['Dense_0']['kernel']", 1),
                            (f"{p}['Dense_1']['kernel']", 0)]
  assert members(gs[1]) == [(f"{p}['Dense_1']['bias']", 0), (f"{p}['Dense_1']['kernel']", 1),
                            (f"{p}['Dense_2']['kernel']", 0)]
  for g in gs:
    for m in g.members:
      np.testing.assert_array_equal(m.units, np.arange(g.size))


def test_cnn_batchnorm_residual_flatten():
  x = jnp.ones((2, 5, 5, 2))
  v = jax.eval_shape(ResCNN().init, jax.random.key(0), x)
  gs = jp.structured.find_groups(ResCNN().apply, v, x)
  assert len(gs) == 1  # input, output and spatial axes are pinned
  (g,) = gs
  assert g.size == 4
  p, b = "['params']", "['batch_stats']"
  assert members(g) == sorted([
      (f"{b}['BatchNorm_0']['mean']", 0), (f"{b}['BatchNorm_0']['var']", 0),
      (f"{p}['BatchNorm_0']['bias']", 0), (f"{p}['BatchNorm_0']['scale']", 0),
      (f"{p}['Conv_0']['bias']", 0), (f"{p}['Conv_0']['kernel']", 3),
      # the residual couples the 1x1 conv's input and output channels
      (f"{p}['Conv_1']['bias']", 0), (f"{p}['Conv_1']['kernel']", 2),
      (f"{p}['Conv_1']['kernel']", 3),
      (f"{p}['Dense_0']['kernel']", 0)])
  dense = next(m for m in g.members if m.path.endswith("['Dense_0']['kernel']"))
  # flatten of (5, 5, C): channel is the fastest-varying factor
  np.testing.assert_array_equal(dense.units, np.tile(np.arange(4), 25))


def test_transformer_block_heads():
  x = jnp.ones((2, 3, 4))
  v = jax.eval_shape(Block().init, jax.random.key(0), x)
  gs = jp.structured.find_groups(Block().apply, v, x)
  assert sorted(g.size for g in gs) == [2, 12]  # heads, MLP hidden; d_model and head_dim pinned
  heads = next(g for g in gs if g.size == 2)
  a = "['params']['MultiHeadDotProductAttention_0']"
  assert members(heads) == sorted(
      [(f"{a}['{n}']['kernel']", 1) for n in ("query", "key", "value")]
      + [(f"{a}['{n}']['bias']", 0) for n in ("query", "key", "value")]
      + [(f"{a}['out']['kernel']", 0)])


def _concat_model(params, x):
  a = jax.nn.relu(x @ params["a"]["w"] + params["a"]["b"])
  b = jnp.tanh(x @ params["b"]["w"])
  return jnp.concatenate([a, b], axis=-1) @ params["out"]["w"]


def _concat_params(seed):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {"a": {"w": f(4, 3), "b": f(3)}, "b": {"w": f(4, 5)}, "out": {"w": f(8, 2)}}


def test_concatenate_segments():
  params = _concat_params(0)
  gs = jp.structured.find_groups(_concat_model, params, jnp.ones((2, 4)))
  assert [g.size for g in gs] == [3, 5]
  out_a = next(m for m in gs[0].members if m.path == "['out']['w']")
  out_b = next(m for m in gs[1].members if m.path == "['out']['w']")
  np.testing.assert_array_equal(out_a.units, [0, 1, 2, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(out_b.units, [-1, -1, -1, 0, 1, 2, 3, 4])


def _split_heads_model(params, x, head_dim=3):
  # hand-written attention on a fused (d, heads * head_dim) projection
  q = (x @ params["q"]).reshape(x.shape[0], x.shape[1], -1, head_dim)
  k = (x @ params["k"]).reshape(x.shape[0], x.shape[1], -1, head_dim)
  v = (x @ params["v"]).reshape(x.shape[0], x.shape[1], -1, head_dim)
  w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim), axis=-1)
  o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape[0], x.shape[1], -1)
  return o @ params["o"]


def test_reshape_splits_heads():
  rng = np.random.default_rng(0)
  params = {n: rng.standard_normal(s).astype(np.float32)
            for n, s in (("q", (4, 6)), ("k", (4, 6)), ("v", (4, 6)), ("o", (6, 4)))}
  x = rng.standard_normal((2, 3, 4)).astype(np.float32)
  gs = jp.structured.find_groups(_split_heads_model, params, x)
  assert len(gs) == 1 and gs[0].size == 2  # heads; head_dim stays (attention scale)
  assert members(gs[0]) == [("['k']", 1), ("['o']", 0), ("['q']", 1), ("['v']", 1)]
  for m in gs[0].members:
    np.testing.assert_array_equal(m.units, [0, 0, 0, 1, 1, 1])
  keep = [np.array([False, True])]
  model = jax.jit(_split_heads_model)
  masked = model(jp.structured.apply_group_masks(params, gs, keep), x)
  small = jp.structured.shrink(params, gs, keep)
  assert small["q"].shape == (4, 3) and small["o"].shape == (3, 4)
  np.testing.assert_allclose(model(small, x), masked, atol=1e-5, rtol=0)
  # the removed head mattered: the masked model differs from the dense one
  assert float(jnp.max(jnp.abs(masked - model(params, x)))) > 1e-2


def test_sub_jaxprs_jit_and_custom_jvp():
  @jax.jit
  def inner(h):
    return jax.nn.relu(h) * jax.nn.sigmoid(h)  # custom_jvp inside pjit

  def f(p, x):
    return inner(x @ p["w1"] + p["b1"]) @ p["w2"]

  p = {"w1": jnp.ones((3, 5)), "b1": jnp.ones((5,)), "w2": jnp.ones((5, 2))}
  (g,) = jp.structured.find_groups(f, p, jnp.ones((2, 3)))
  assert members(g) == [("['b1']", 0), ("['w1']", 1), ("['w2']", 0)]

  @jax.custom_vjp
  def act(h):
    return jnp.sin(h)

  act.defvjp(lambda h: (jnp.sin(h), h), lambda h, ct: (ct * jnp.cos(h),))

  def f2(p, x):
    h = act(x @ p["w1"] + p["b1"])
    h = jax.checkpoint(jnp.tanh)(h)
    h = jax.lax.cond(jnp.sum(x) > 0, lambda h: 2 * h, lambda h: h + 1, h)
    return h @ p["w2"]

  (g,) = jp.structured.find_groups(f2, p, jnp.ones((2, 3)))
  assert members(g) == [("['b1']", 0), ("['w1']", 1), ("['w2']", 0)]


def test_reductions_and_layernorm_pin():
  def f(p, x):
    h = x @ p["w1"]
    h = h - jnp.mean(h, axis=-1, keepdims=True)  # couples all units: not prunable
    return h @ p["w2"]

  p = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
  assert jp.structured.find_groups(f, p, jnp.ones((2, 3))) == ()


def test_unsupported_primitive_raises_and_skip():
  def f(p, x):
    h = x @ p["w1"]
    h = jnp.fft.fft(h).real  # mixes units: not a supported coupling
    return jax.nn.relu(h) @ p["w2"]

  p = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
  with pytest.raises(ValueError, match=r"unsupported primitive 'fft'.*\['w1'\]"):
    jp.structured.find_groups(f, p, jnp.ones((2, 3)))
  assert jp.structured.find_groups(f, p, jnp.ones((2, 3)), on_unsupported="skip") == ()


def test_loops_couple_carries():
  def f(p, x):
    h = x @ p["w1"]
    h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["w_rec"]), h)  # scan
    _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] * 0.5), (0, h))
    return h @ p["w2"]

  p = {"w1": jnp.ones((3, 5)), "w_rec": jnp.ones((5, 5)), "w2": jnp.ones((5, 2))}
  (g,) = jp.structured.find_groups(f, p, jnp.ones((2, 3)))
  assert members(g) == [("['w1']", 1), ("['w2']", 0), ("['w_rec']", 0), ("['w_rec']", 1)]

  def g2(p, x):  # a loop condition that reads the units pins them
    h = x @ p["w1"]
    h = jax.lax.while_loop(lambda h: jnp.sum(h) > 1e9, lambda h: h * 0.5, h)
    return h @ p["w2"]

  assert jp.structured.find_groups(g2, p, jnp.ones((2, 3))) == ()


def test_max_pool_passes_channels():
  class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), (2, 2))
      x = nn.avg_pool(x, (2, 2), (2, 2))
      return nn.Dense(2)(x.reshape((x.shape[0], -1)))

  x = jnp.ones((1, 8, 8, 3))
  v = jax.eval_shape(Pool().init, jax.random.key(0), x)
  (g,) = jp.structured.find_groups(Pool().apply, v, x)
  assert g.size == 4
  dense = next(m for m in g.members if "Dense_0" in m.path)
  np.testing.assert_array_equal(dense.units, np.tile(np.arange(4), 4))


def test_grouped_conv_raises():
  class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.Conv(4, (3, 3), feature_group_count=4)(x)
      return nn.Conv(2, (1, 1))(x)

  x = jnp.ones((1, 4, 4, 2))
  v = jax.eval_shape(Depthwise().init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="conv_general_dilated"):
    jp.structured.find_groups(Depthwise().apply, v, x)


def test_make_group_manual_override():
  params = _concat_params(0)
  g = jp.structured.make_group(params, [("['a']['w']", 1), ("['a']['b']", 0)])
  assert g.size == 3 and members(g) == [("['a']['b']", 0), ("['a']['w']", 1)]
  with pytest.raises(ValueError, match=r"\['b'\]\['w'\] axis 1 has 5"):
    jp.structured.make_group(params, [("['a']['w']", 1), ("['b']['w']", 1)])
  with pytest.raises(ValueError, match="expected a leaf path"):
    jp.structured.make_group(params, [("['nope']", 0)])
  with pytest.raises(ValueError, match="on_unsupported"):
    jp.structured.find_groups(_concat_model, params, jnp.ones((2, 4)), on_unsupported="ignore")


def test_scanned_layers_pruned_alike():
  # residual MLP blocks stacked along a leading layer axis and applied with lax.scan
  rng = np.random.default_rng(0)
  p = {"w1": rng.standard_normal((3, 4, 6)).astype(np.float32),
       "b1": rng.standard_normal((3, 6)).astype(np.float32),
       "w2": rng.standard_normal((3, 6, 4)).astype(np.float32)}

  def f(p, x):
    def layer(h, w):
      return h + jax.nn.relu(h @ w["w1"] + w["b1"]) @ w["w2"], None
    return jax.lax.scan(layer, x, p)[0]

  x = rng.standard_normal((2, 4)).astype(np.float32)
  (g,) = jp.structured.find_groups(f, p, x)
  assert g.size == 6 and members(g) == [("['b1']", 1), ("['w1']", 2), ("['w2']", 1)]
  keep = [np.array([True, False, True, True, False, False])]
  small = jp.structured.shrink(p, [g], keep)
  assert small["w1"].shape == (3, 4, 3) and small["w2"].shape == (3, 3, 4)
  fj = jax.jit(f)
  np.testing.assert_allclose(fj(small, x), fj(jp.structured.apply_group_masks(p, [g], keep), x),
                             atol=1e-5, rtol=0)
