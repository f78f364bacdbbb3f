"""Report: exact counts, byte formulas and FLOPs on small known models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import report as report_lib

B, IN, H, OUT = 8, 10, 16, 4


def mlp(params, x):
  h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def mlp_no_bias(params, x):
  return (x @ params["l1"]["kernel"]) @ params["l2"]["kernel"]


@pytest.fixture(scope="module")
def params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "l1": {"kernel": jax.random.normal(k1, (IN, H)), "bias": jnp.zeros((H,))},
      "l2": {"kernel": jax.random.normal(k2, (H, OUT)), "bias": jnp.zeros((OUT,))},
  }


def first_k_mask(x, kept):
  flat = np.zeros(x.size, bool)
  flat[:kept] = True
  return jnp.asarray(flat.reshape(x.shape))


@pytest.fixture(scope="module")
def masks(params):
  return {
      "l1": {"kernel": first_k_mask(params["l1"]["kernel"], 40), "bias": jnp.ones((H,), bool)},
      "l2": {"kernel": first_k_mask(params["l2"]["kernel"], 16), "bias": jnp.ones((OUT,), bool)},
  }


def test_counts_and_bytes_by_hand(params, masks):
  r = report_lib.report(params, masks=masks)
  rows = {row.path: row for row in r.rows}
  k1 = rows["['l1']['kernel']"]
  assert (k1.count, k1.kept, k1.prunable) == (160, 40, True)
  assert k1.sparsity == pytest.approx(0.75)
  assert k1.dense_bytes == 160 * 4
  assert k1.bitmask_bytes == 40 * 4 + 20              # values + 160 bits
  assert k1.csr_bytes == 40 * 4 + 40 * 4 + 4 * (IN + 1)  # values + col idx + row ptr
  k2 = rows["['l2']['kernel']"]
  assert (k2.kept, k2.bitmask_bytes, k2.csr_bytes) == (16, 16 * 4 + 8, 16 * 8 + 4 * (H + 1))
  b1 = rows["['l1']['bias']"]
  assert (b1.prunable, b1.kept, b1.bitmask_bytes, b1.csr_bytes) == (False, H, 4 * H, 4 * H)
  assert r.sparsity == pytest.approx(1 - 56 / 224)
  d = r.to_dict()
  assert d["bytes/dense"] == 4 * (160 + 16 + 64 + 4)
  assert d["bytes/bitmask"] == 180 + 72 + 4 * (H + OUT)
  assert d["bytes/csr"] == 364 + 196 + 4 * (H + OUT)
  assert d["bytes/best"] == 180 + 72 + 4 * (H + OUT)
  assert d["sparsity/l1/kernel"] == pytest.approx(0.75)
  assert d["sparsity/total"] == pytest.approx(0.75)
  assert d["params/count"] == 244 and d["params/kept"] == 56 + H + OUT
  assert all(isinstance(v, float) for v in d.values())


def test_kept_from_zeros_without_masks_and_bf16_bytes():
  w = jnp.asarray(np.arange(24).reshape(2, 3, 4) % 3, jnp.bfloat16)  # 8 zeros
  r = report_lib.report({"w": w})
  row = r.rows[0]
  assert (row.count, row.kept) == (24, 16)
  assert row.dense_bytes == 48
  assert row.bitmask_bytes == 16 * 2 + 3
  assert row.csr_bytes == 16 * (2 + 4) + 4 * (6 + 1)  # rows = 2*3 leading dims flattened


def test_mlp_flops_dense_and_effective(params, masks):
  x = jnp.ones((B, IN))
  r = report_lib.report(params, masks=masks, apply_fn=mlp_no_bias, inputs=(x,))
  dense = 2 * B * (IN * H + H * OUT)
  assert r.flops_dense == dense
  eff = 2 * B * IN * H * 40 / 160 + 2 * B * H * OUT * 16 / 64
  assert r.flops_effective == pytest.approx(eff)
  d = r.to_dict()
  assert d["flops/matmul_dense"] == dense
  assert d["flops/speedup"] == pytest.approx(dense / eff)
  # With biases and relu, XLA counts the elementwise ops too; only the matmuls are scaled.
  r2 = report_lib.report(params, masks=masks, apply_fn=mlp, inputs=(x,))
  assert r2.flops_dense > dense
  assert r2.flops_dense - r2.flops_effective == pytest.approx(dense - eff)
  assert "total" in r2.table() and "['l1']['kernel']" in r2.table()


def test_flops_attributed_through_casts_scan_and_jit():
  w = jnp.ones((2, 6, 6))  # two stacked layers, scanned over

  def f(p, x):
    inner = jax.jit(lambda a, k: a @ k.astype(jnp.bfloat16).T.astype(jnp.float32))

    def body(h, k):
      return inner(h, k), None
    return jax.lax.scan(body, x, p["w"])[0]

  x = jnp.ones((3, 6))
  flops = report_lib.matmul_flops_by_leaf(f, {"w": w}, x)
  assert flops == [2 * (2 * 3 * 6 * 6)]


def test_flops_attributed_through_while_and_cond():
  p = {"lim": jnp.ones(3), "w": jnp.ones((6, 6))}
  x = jnp.ones((2, 6))

  def loop(p, x):
    def body(c):
      return c[0] + 1, jnp.tanh(c[1] @ p["w"])
    # the cond reads a param too, so cond consts shift the body's operands
    return jax.lax.while_loop(lambda c: c[0] < jnp.sum(p["lim"]), body, (0.0, x))[1]

  assert report_lib.matmul_flops_by_leaf(loop, p, x) == [0.0, 2 * 2 * 6 * 6]  # body once

  def branch(p, x):
    return jax.lax.cond(x[0, 0] > 0, lambda: x @ p["w"], lambda: jnp.tanh(x) @ p["w"])

  assert report_lib.matmul_flops_by_leaf(branch, p, x) == [0.0, 2 * 2 * 6 * 6]  # one branch


@pytest.mark.parametrize("kw", [
    dict(window_strides=(1, 1), padding="SAME"),
    dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)], lhs_dilation=(1, 2),
         rhs_dilation=(2, 1)),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=3),
])
def test_conv_flops_match_xla(kw):
  in_ch = 1 if "feature_group_count" in kw else 3

  def f(w, x):
    return jax.lax.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)

  w, x = jnp.ones((3, 3, in_ch, 6)), jnp.ones((2, 7, 6, 3))
  assert report_lib.matmul_flops_by_leaf(f, w, x) == [report_lib.xla_flops(f, w, x)]


def test_valid_conv_flops_formula():
  f = lambda w, x: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w, x = jnp.ones((3, 3, 2, 5)), jnp.ones((1, 8, 8, 2))
  assert report_lib.matmul_flops_by_leaf(f, w, x) == [2 * 6 * 6 * 5 * (3 * 3 * 2)]


def test_log_name():
  assert report_lib.log_name("['a']['b'][0]") == "a/b/0"
  path = jax.tree_util.tree_flatten_with_path({"x": [1, 2]})[0][1][0]
  assert report_lib.log_name(path) == "x/1"


def test_mask_structure_mismatch_names_leaf(params):
  with pytest.raises(ValueError, match="l2"):
    report_lib.report(params, masks={"l1": {"kernel": jnp.ones((IN, H), bool),
                                             "bias": jnp.ones((H,), bool)}})


def test_leaf_bytes_formula():
  assert report_lib.leaf_bytes((5, 7, 9), 4, 10) == (
      5 * 7 * 9 * 4, 40 + math.ceil(315 / 8), 10 * 8 + 4 * 36)
