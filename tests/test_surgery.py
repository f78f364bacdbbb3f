"""Group scores, group masks and physical removal: the shrunk model equals the masked one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
import models

ATOL = 1e-5


def n_params(tree):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def randomize(variables, seed):
  """Random values everywhere (biases, BN statistics too) so every removed entry matters."""
  rng = np.random.default_rng(seed)

  def f(path, x):
    if jax.tree_util.keystr(path).endswith("['var']") or "['var']" in jax.tree_util.keystr(path):
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(f, variables)


class MLP(models.MLP):
  features: tuple = (16, 12, 3)


class ResCNN(models.ResCNN):
  c: int = 6


class Block(models.Block):
  heads: int = 4
  qkv: int = 16


def prune_and_shrink(model, x, seed):
  v = randomize(jax.eval_shape(model.init, jax.random.key(0), x), seed)
  gs = jp.structured.find_groups(model.apply, v, x)
  keep = jp.structured.group_masks(jp.structured.group_scores(gs, jax.tree.map(jnp.abs, v)), 0.5)
  apply = jax.jit(model.apply)
  masked = apply(jp.structured.apply_group_masks(v, gs, keep), x)
  return v, gs, keep, jp.structured.shrink(v, gs, keep), masked, apply(v, x)


def test_mlp_linen():
  x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
  v, gs, keep, small, masked, dense = prune_and_shrink(MLP(), x, 0)
  assert [int(k.sum()) for k in keep] == [8, 6]
  sizes = jp.structured.linen_features(small["params"])
  assert sizes == {"Dense_0": 8, "Dense_1": 6, "Dense_2": 3}
  out = jax.jit(MLP(features=(sizes["Dense_0"], sizes["Dense_1"], 3)).apply)(small, x)
  assert float(jnp.max(jnp.abs(out - masked))) <= ATOL
  assert float(jnp.max(jnp.abs(dense - masked))) > 1e-2  # pruning did change the model
  assert n_params(small) == (8 * 8 + 8) + (8 * 6 + 6) + (6 * 3 + 3)
  # global selection: round(0.5 * 28) = 14 units over both layers, fewer where norms are low
  scores_g = jp.structured.group_scores(gs, jp.magnitude(v))
  keep_g = jp.structured.group_masks(scores_g, 0.5, scope="global")
  assert sum(int(k.sum()) for k in keep_g) == 14
  small_g = jp.structured.shrink(v, gs, keep_g)
  f = jp.structured.linen_features(small_g["params"])
  out_g = jax.jit(MLP(features=(f["Dense_0"], f["Dense_1"], 3)).apply)(small_g, x)
  masked_g = jax.jit(MLP().apply)(jp.structured.apply_group_masks(v, gs, keep_g), x)
  assert float(jnp.max(jnp.abs(out_g - masked_g))) <= ATOL
  # the kept units are the highest-norm ones, in their original order
  col_norms = np.linalg.norm(
      np.concatenate([v["params"]["Dense_0"]["kernel"], v["params"]["Dense_1"]["kernel"].T]),
      axis=0)
  np.testing.assert_array_equal(np.nonzero(keep[0])[0], np.sort(np.argsort(-col_norms)[:8]))


def test_cnn_batchnorm_residual_linen():
  x = np.random.default_rng(1).standard_normal((2, 5, 5, 3)).astype(np.float32)
  _v, gs, keep, small, masked, _ = prune_and_shrink(ResCNN(), x, 1)
  assert len(gs) == 1 and int(keep[0].sum()) == 3
  assert small["batch_stats"]["BatchNorm_0"]["var"].shape == (3,)
  assert small["params"]["Dense_0"]["kernel"].shape == (75, 3)
  assert jp.structured.linen_features(small["params"])["Conv_0"] == 3
  out = jax.jit(ResCNN(c=3).apply)(small, x)
  assert float(jnp.max(jnp.abs(out - masked))) <= ATOL


def test_transformer_block_linen():
  x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
  _v, _gs, keep, small, masked, _ = prune_and_shrink(Block(), x, 2)
  assert sorted(int(k.sum()) for k in keep) == [2, 6]
  att = jp.structured.linen_features(small["params"])["MultiHeadDotProductAttention_0"]
  assert att == {"num_heads": 2, "qkv_features": 8, "out_features": 8}
  out = jax.jit(Block(heads=2, qkv=8, hidden=6).apply)(small, x)
  assert float(jnp.max(jnp.abs(out - masked))) <= ATOL


class NnxCNN(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.res = nnx.Conv(6, 6, (1, 1), rngs=rngs)
    self.head = nnx.Linear(6 * 16, 2, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn(self.conv(x)))
    y = y + self.res(y)
    return self.head(y.reshape(y.shape[0], -1))


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.att = nnx.MultiHeadAttention(4, 8, qkv_features=16, decode=False, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.up = nnx.Linear(8, 12, rngs=rngs)
    self.down = nnx.Linear(12, 8, rngs=rngs)

  def __call__(self, x):
    x = self.ln(x + self.att(x))
    return x + self.down(nnx.gelu(self.up(x)))


@pytest.mark.parametrize("cls,shape", [(NnxCNN, (2, 4, 4, 3)), (NnxBlock, (2, 3, 8))])
def test_nnx_shrink(cls, shape):
  model = nnx.eval_shape(lambda: cls(nnx.Rngs(0)))  # shapes only: random values below
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, randomize(state, 3))
  model.eval()
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  gs = jp.structured.find_groups_nnx(model, x)
  graphdef, state = nnx.split(model)  # after eval(): inference-mode BatchNorm
  keep = jp.structured.group_masks(jp.structured.group_scores(gs, jp.magnitude(state)), 0.5)
  small = jp.structured.shrink_nnx(model, gs, keep)
  run = jax.jit(lambda gd, st, x: nnx.merge(gd, st)(x), static_argnums=0)
  masked = run(graphdef, jp.structured.apply_group_masks(state, gs, keep), x)
  assert float(jnp.max(jnp.abs(run(*nnx.split(small), x) - masked))) <= ATOL
  assert n_params(nnx.state(small)) < n_params(nnx.state(model))
  if cls is NnxCNN:
    assert (small.conv.out_features, small.res.in_features, small.bn.num_features) == (3, 3, 3)
    assert small.head.in_features == 3 * 16 and model.conv.out_features == 6
  else:
    assert (small.att.num_heads, small.att.qkv_features, small.up.out_features) == (2, 8, 6)
    assert model.att.num_heads == 4  # the original is untouched


@pytest.fixture(scope="module")
def cnn_groups():
  x = jnp.ones((2, 5, 5, 3))
  v = randomize(jax.eval_shape(ResCNN().init, jax.random.key(0), x), 4)
  return v, jp.structured.find_groups(ResCNN().apply, v, x)


def test_group_scores_match_numpy(cnn_groups):
  v, gs = cnn_groups
  p = {k: {n: np.asarray(a) for n, a in d.items()} for k, d in v["params"].items()}
  sq = (np.sum(p["Conv_0"]["kernel"] ** 2, axis=(0, 1, 2))
        + np.sum(p["Conv_1"]["kernel"] ** 2, axis=(0, 1, 3))  # input channels of the 1x1 conv
        + np.sum(p["Conv_1"]["kernel"] ** 2, axis=(0, 1, 2))  # its output channels (residual)
        + np.sum(p["Dense_0"]["kernel"] ** 2, axis=1).reshape(25, 6).sum(0))  # flattened rows
  (l2,) = jp.structured.group_scores(gs, jax.tree.map(jnp.abs, v))
  np.testing.assert_allclose(l2, np.sqrt(sq), rtol=1e-5)
  ab = jax.tree.map(jnp.abs, v)
  (l1,) = jp.structured.group_scores(gs, ab, reduce="l1")
  l1_ref = (np.abs(p["Conv_0"]["kernel"]).sum((0, 1, 2))
            + np.abs(p["Conv_1"]["kernel"]).sum((0, 1, 3))
            + np.abs(p["Conv_1"]["kernel"]).sum((0, 1, 2))
            + np.abs(p["Dense_0"]["kernel"]).sum(1).reshape(25, 6).sum(0))
  np.testing.assert_allclose(l1, l1_ref, rtol=1e-5)
  # biases and norm parameters contribute when the predicate says so
  (all_l1,) = jp.structured.group_scores(gs, ab, reduce="l1", prunable=lambda path, leaf: True)
  extra = sum(np.abs(np.asarray(x)) for x in (
      p["Conv_0"]["bias"], p["Conv_1"]["bias"], p["BatchNorm_0"]["scale"],
      p["BatchNorm_0"]["bias"], v["batch_stats"]["BatchNorm_0"]["mean"],
      v["batch_stats"]["BatchNorm_0"]["var"]))
  np.testing.assert_allclose(all_l1, l1_ref + extra, rtol=1e-5)
  # scores keyed like params only (no collection level) match nothing
  with pytest.raises(ValueError, match="no leaf of group"):
    jp.structured.group_scores(gs, v["params"])


def test_group_scores_masks_jit_equal(cnn_groups):
  v, gs = cnn_groups

  def f(variables):
    scores = jp.structured.group_scores(gs, jax.tree.map(jnp.abs, variables))
    keep = jp.structured.group_masks(scores, 0.5)
    return keep, jp.structured.apply_group_masks(variables, gs, keep)

  k1, m1 = f(v)
  k2, m2 = jax.jit(f)(v)
  np.testing.assert_array_equal(k1[0], k2[0])
  jax.tree.map(np.testing.assert_array_equal, m1, m2)
  # removed channels are zero in every coupled leaf, kept ones untouched
  removed = ~np.asarray(k1[0])
  assert np.all(np.asarray(m1["params"]["Conv_1"]["kernel"])[:, :, removed, :] == 0)
  assert np.all(np.asarray(m1["params"]["Dense_0"]["kernel"]).reshape(25, 6, 3)[:, removed] == 0)
  np.testing.assert_array_equal(m1["params"]["Dense_0"]["bias"], v["params"]["Dense_0"]["bias"])
  # exactly round(0.5 * 6) channels go, and the kept channels of coupled leaves are untouched
  # (the residual add couples the 1x1 conv's input and output channels)
  assert removed.sum() == 3
  kept = lambda a: np.asarray(a)[..., ~removed]
  np.testing.assert_array_equal(kept(m1["params"]["Conv_0"]["kernel"]),
                                kept(v["params"]["Conv_0"]["kernel"]))
  np.testing.assert_array_equal(kept(m1["params"]["Conv_1"]["kernel"])[:, :, ~removed],
                                kept(v["params"]["Conv_1"]["kernel"])[:, :, ~removed])


def test_group_masks_counts_and_ties():
  scores = [jnp.array([1.0, 1.0, 1.0, 1.0]), jnp.array([0.5, 2.0, 0.5])]
  keep = jp.structured.group_masks(scores, 0.5)
  # round(2.0) = 2 and round(1.5) = 2 (half to even); ties: the later unit goes first
  np.testing.assert_array_equal(keep[0], [True, True, False, False])
  np.testing.assert_array_equal(keep[1], [False, True, False])
  keep = jp.structured.group_masks(scores, 3 / 7, scope="global")  # round(3) units over all 7
  np.testing.assert_array_equal(keep[0], [True, True, True, False])
  np.testing.assert_array_equal(keep[1], [False, True, False])
  keep = jp.structured.group_masks(scores, [0.25, 0.0])
  assert [int(k.sum()) for k in keep] == [3, 3]
  traced = jax.jit(lambda s: jp.structured.group_masks(scores, s))(0.5)
  np.testing.assert_array_equal(traced[1], [False, True, False])


def test_refuses_to_remove_a_whole_layer(cnn_groups):
  v, gs = cnn_groups
  with pytest.raises(ValueError, match="would remove all 4 units of group 0"):
    jp.structured.group_masks([jnp.ones(4)], 1.0)
  with pytest.raises(ValueError, match=r"every unit of groups \[1\]"):
    jp.structured.group_masks([jnp.full(4, 5.0), jnp.zeros(2)], 0.4, scope="global")
  with pytest.raises(ValueError, match="removes all 6 units"):
    jp.structured.shrink(v, gs, [np.zeros(6, bool)])
  with pytest.raises(ValueError, match=r"expected shape \(6,\)"):
    jp.structured.shrink(v, gs, [np.ones(5, bool)])
  with pytest.raises(ValueError, match="must be concrete"):
    jax.jit(lambda k: jp.structured.shrink(v, gs, [k]))(jnp.ones(6, bool))
  with pytest.raises(ValueError, match="sparsity"):
    jp.structured.group_masks([jnp.ones(4)], 1.5)


def test_shrink_keeps_dtype_and_unrelated_leaves(cnn_groups):
  v, gs = cnn_groups
  vb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), v)
  keep = [np.array([True, False, True, True, False, True])]
  small = jp.structured.shrink(vb, gs, keep)
  assert small["params"]["Conv_0"]["kernel"].dtype == jnp.bfloat16
  assert small["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4)
  np.testing.assert_array_equal(small["params"]["Dense_0"]["bias"], vb["params"]["Dense_0"]["bias"])
  np.testing.assert_array_equal(
      small["params"]["Dense_0"]["kernel"],
      np.asarray(vb["params"]["Dense_0"]["kernel"]).reshape(25, 6, 3)[:, keep[0]].reshape(-1, 3))


def test_taylor_and_obd_group_sums():
  rng = np.random.default_rng(5)
  p = {"l1": {"w": rng.standard_normal((4, 6)).astype(np.float32),
              "b": rng.standard_normal(6).astype(np.float32)},
       "l2": {"w": rng.standard_normal((6, 2)).astype(np.float32)}}
  x = rng.standard_normal((8, 4)).astype(np.float32)

  def f(p, x):
    return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]

  (g,) = jp.structured.find_groups(f, p, x)
  grads = jax.grad(lambda p: jnp.sum(f(p, x) ** 2))(p)
  (taylor,) = jp.structured.group_scores([g], jp.taylor(p, grads), reduce="l1")
  wg = lambda k: np.abs(np.asarray(p[k]["w"]) * np.asarray(grads[k]["w"]))
  np.testing.assert_allclose(taylor, wg("l1").sum(0) + wg("l2").sum(1), rtol=1e-5)
  h = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0, 2, a.shape), jnp.float32), p)
  (obd,) = jp.structured.group_scores([g], jp.obd(p, h), reduce="l1")
  o = lambda k: 0.5 * np.asarray(h[k]["w"]) * np.asarray(p[k]["w"]) ** 2
  np.testing.assert_allclose(obd, o("l1").sum(0) + o("l2").sum(1), rtol=1e-5)
