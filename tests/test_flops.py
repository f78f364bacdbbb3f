"""FLOPs per weight leaf from the jaxpr walker, against analytic counts and XLA's own count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxprune._src import flops
from models import MLP, ResCNN

KEY = jax.random.key(0)


def test_dense_mlp():
  x = jnp.ones((3, 4))
  v = jax.eval_shape(MLP().init, KEY, x)  # Dense 4 -> 6 -> 5 -> 3, biases, relu
  got = flops.matmul_flops_by_leaf(MLP().apply, v, x)
  # leaves: (bias, kernel) of Dense_0, Dense_1, Dense_2; 2 * batch * in * out per kernel
  assert got == [0.0, 2 * 3 * 4 * 6, 0.0, 2 * 3 * 6 * 5, 0.0, 2 * 3 * 5 * 3]


def test_conv_net_same_padding_taps():
  x = jnp.ones((2, 5, 5, 2))
  v = jax.eval_shape(ResCNN().init, KEY, x)
  got = flops.matmul_flops_by_leaf(ResCNN().apply, v, x)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0]]
  by_path = dict(zip(paths, got))
  # 3x3 SAME on 5 positions: 2 + 3 + 3 + 3 + 2 = 13 taps read real inputs per spatial dim
  assert by_path["['params']['Conv_0']['kernel']"] == 2 * 2 * 4 * 2 * 13 * 13
  assert by_path["['params']['Conv_1']['kernel']"] == 2 * 2 * 4 * 4 * 5 * 5  # 1x1
  assert by_path["['params']['Dense_0']['kernel']"] == 2 * 2 * (5 * 5 * 4) * 3
  assert sum(got) == 5408 + 1600 + 1200


def test_strided_conv_counts_valid_taps():
  f = lambda w, x: jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w, x = jnp.ones((3, 3, 2, 5)), jnp.ones((1, 6, 6, 2))
  # stride 2 on 6 positions, padding (0, 1): windows read 3 + 3 + 2 real inputs per dim
  assert flops.matmul_flops_by_leaf(f, w, x) == [2 * 1 * 5 * 2 * 8 * 8]


@pytest.mark.parametrize("kw", [
    dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)], lhs_dilation=(1, 2),
         rhs_dilation=(2, 1)),
    dict(window_strides=(1, 1), padding="VALID", feature_group_count=3),
])
def test_conv_matches_xla(kw):
  in_ch = 1 if "feature_group_count" in kw else 3
  f = lambda w, x: jax.lax.conv_general_dilated(
      x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
  w, x = jnp.ones((3, 3, in_ch, 6)), jnp.ones((2, 7, 6, 3))
  assert flops.matmul_flops_by_leaf(f, w, x) == [flops.xla_flops(f, w, x)]


def test_scan_counts_length_times_through_jit_and_casts():
  w = jnp.ones((3, 6, 6))  # three stacked layers, scanned over

  def f(p, x):
    inner = jax.jit(lambda a, k: a @ k.astype(jnp.bfloat16).T.astype(jnp.float32))
    return jax.lax.scan(lambda h, k: (inner(h, k), None), x, p["w"])[0]

  assert flops.matmul_flops_by_leaf(f, {"w": w}, jnp.ones((2, 6))) == [3 * (2 * 2 * 6 * 6)]


def test_cond_takes_costliest_branch_per_leaf():
  p = {"v": jnp.ones((6, 6)), "w": jnp.ones((6, 6))}

  def f(p, x):
    return jax.lax.cond(x[0, 0] > 0, lambda: x @ p["w"],
                        lambda: jnp.tanh(x) @ p["w"] @ p["v"] @ p["w"])

  one = 2 * 2 * 6 * 6
  # v: only the second branch (one product); w: two products in the second branch
  assert flops.matmul_flops_by_leaf(f, p, jnp.ones((2, 6))) == [one, 2 * one]


def test_while_counts_body_and_condition_once():
  p = {"lim": jnp.ones(3), "v": jnp.ones((6, 1)), "w": jnp.ones((6, 6))}

  def f(p, x):
    def cond(c):
      return jnp.sum(c[1] @ p["v"]) < jnp.sum(p["lim"])
    return jax.lax.while_loop(cond, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, x))[1]

  assert flops.matmul_flops_by_leaf(f, p, jnp.ones((2, 6))) == [0.0, 2 * 2 * 6, 2 * 2 * 6 * 6]


def test_nested_control_flow_multiplies_trips():
  p = {"v": jnp.ones((6, 6)), "w": jnp.ones((6, 6))}

  def f(p, x):
    def body(h, _):
      h = jax.lax.cond(h[0, 0] > 0, lambda: h @ p["w"], lambda: h @ p["w"] @ p["w"])
      h = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ p["v"]), (0, h))[1]
      return h, None
    return jax.lax.scan(body, x, None, length=4)[0]

  one = 2 * 2 * 6 * 6
  assert flops.matmul_flops_by_leaf(f, p, jnp.ones((2, 6))) == [4 * one, 4 * 2 * one]


def test_kernel_views_through_calls_masks_and_stacking():
  p = {"v": jnp.ones((6, 6)), "w": jnp.ones((6, 6))}
  one = 2 * 2 * 6 * 6
  x = jnp.ones((2, 6))
  transposed = lambda p, x: x @ jax.jit(lambda w: w.T)(p["w"])
  masked = lambda p, x: x @ (p["w"] * (p["v"] > 0))
  product = lambda p, x: x @ (p["v"] @ p["w"])  # a product of two leaves counts for the rhs
  assert flops.matmul_flops_by_leaf(transposed, p, x) == [0.0, one]
  assert flops.matmul_flops_by_leaf(masked, p, x) == [0.0, one]
  assert flops.matmul_flops_by_leaf(product, p, x) == [0.0, 2 * 6 * 6 * 6]
  stacked = lambda p, x: jnp.einsum("bi,hij->bhj", x, jnp.stack([p["v"], p["w"]]))
  assert flops.matmul_flops_by_leaf(stacked, p, x) == [0.0, 0.0]  # no longer a view of one leaf


def test_flax_scan_and_remat_layers():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return h + nn.Dense(h.shape[-1])(nn.relu(nn.remat(nn.Dense)(6)(h))), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return stack()(x, None)[0]

  x = jnp.ones((2, 5))
  v = jax.eval_shape(Net().init, KEY, x)
  got = flops.matmul_flops_by_leaf(Net().apply, v, x)
  assert sorted(got) == [0.0, 0.0, 3 * 2 * 2 * 5 * 6, 3 * 2 * 2 * 6 * 5]


def test_xla_flops_of_a_matmul():
  assert flops.xla_flops(lambda a, b: a @ b, jnp.ones((3, 4)), jnp.ones((4, 5))) == 2 * 3 * 4 * 5
