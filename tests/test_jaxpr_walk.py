"""The jaxpr walker: leaf views, dot/conv sites, the 2-D kernel view and the shifted evaluator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxprune._src import interpret
from jaxprune._src import jaxpr_walk

def rand(i, shape):
  return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


def np_matrix(w, site):
  """numpy reference of `to_matrix`."""
  w = np.transpose(np.reshape(w, site.atoms), site.contract_axes + site.out_axes)
  return w.reshape(site.d_in, site.d_out)


def sites_of(fn, params, batch):
  return interpret.trace(fn, params, batch).sites


def check_view(fn, params, batch):
  """At every site: site_outputs == site_inputs @ (numpy) to_matrix(kernel)."""
  traced = interpret.trace(fn, params, batch)
  leaves = jax.tree.leaves(params)

  def run(leaves, batch):
    taps = {s.location: lambda o, y, s=s: (interpret.site_inputs(s, o[1 - s.operand]),
                                           interpret.site_outputs(s, y)) for s in traced.sites}
    return interpret.evaluate_with_taps(traced.jaxpr, leaves + jax.tree.leaves(batch), taps)[1]

  with jax.default_matmul_precision("highest"):
    got = jax.jit(run)(leaves, batch)
  assert len(got) == len(traced.sites)
  for site in traced.sites:
    x, y = (np.asarray(a, np.float64) for a in got[site.location])
    w2 = np_matrix(np.asarray(leaves[site.leaf], np.float64), site)
    np.testing.assert_allclose(y, x @ w2, rtol=1e-5, atol=1e-5)
  return traced.sites


def test_dense_flax_in_out():
  x = rand(1, (2, 5, 4))
  params = {"params": {"kernel": rand(2, (4, 3)), "bias": rand(3, (3,))}}
  (site,) = check_view(nn.Dense(3).apply, params, x)
  assert (site.path, site.contract_axes, site.out_axes, site.operand) == (
      "['params']['kernel']", (0,), (1,), 1)
  assert (site.d_in, site.d_out) == (4, 3)


@pytest.mark.parametrize("fn", [
    lambda p, x: x @ p["w"].T,
    lambda p, x: jax.vmap(lambda v: p["w"] @ v)(x),
    lambda p, x: (p["w"] @ x.T).T,
])
def test_out_in_weight(fn):
  (site,) = check_view(fn, {"w": rand(2, (3, 4))}, rand(3, (5, 4)))
  assert (site.contract_axes, site.out_axes) == ((1,), (0,))


def test_einsum_heads_kernel():
  fn = lambda p, x: jnp.einsum("btd,hdk->bthk", x, p["w"])
  (site,) = check_view(fn, {"w": rand(4, (2, 4, 3))}, rand(5, (2, 5, 4)))
  assert (site.contract_axes, site.out_axes, site.d_in, site.d_out) == ((1,), (0, 2), 4, 6)


def test_attention_out_projection_contracts_two_axes():
  fn = lambda p, x: jnp.einsum("bthk,hkd->btd", x, p["w"])
  (site,) = check_view(fn, {"w": rand(6, (2, 3, 4))}, rand(7, (2, 5, 2, 3)))
  assert (site.contract_axes, site.out_axes, site.d_in) == ((0, 1), (2,), 6)


def test_reshape_splitting_a_leaf_axis_refines_atoms():
  fn = lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"].reshape(8, 2, 3))
  (site,) = check_view(fn, {"w": rand(8, (8, 6))}, rand(9, (3, 8)))
  assert (site.atoms, site.contract_axes, site.out_axes) == ((8, 2, 3), (0,), (1, 2))
  fn = lambda p, x: jnp.einsum("bh,hdk->bdk", x, p["w"].reshape(2, 4, 6))
  (site,) = check_view(fn, {"w": rand(8, (8, 6))}, rand(10, (3, 2)))
  assert (site.atoms, site.contract_axes, site.out_axes) == ((2, 4, 6), (0,), (1, 2))


def test_cast_transpose_and_mask_keep_the_view():
  mask = jnp.ones((3, 4), jnp.bfloat16)
  fn = lambda p, x: x @ (p["w"].astype(jnp.bfloat16) * mask).astype(jnp.float32).T
  (site,) = sites_of(fn, {"w": rand(11, (3, 4))}, rand(12, (5, 4)))
  assert (site.path, site.contract_axes) == ("['w']", (1,))


CONV_LAYOUTS = [
    ("NHWC", "HWIO", "NHWC", (3, 2, 4, 5)),
    ("NCHW", "OIHW", "NCHW", (5, 4, 3, 2)),
    ("NHWC", "WOHI", "CNHW", (2, 5, 3, 4)),
]


@pytest.mark.parametrize("lhs,rhs,out,kshape", CONV_LAYOUTS)
def test_conv_patches_match_kernel_rows(lhs, rhs, out, kshape):
  x = rand(13, (2, 6, 7, 4) if lhs == "NHWC" else (2, 4, 6, 7))
  fn = lambda p, x: lax.conv_general_dilated(
      x, p["w"], (2, 1), ((1, 0), (2, 1)), rhs_dilation=(1, 2), dimension_numbers=(lhs, rhs, out))
  (site,) = check_view(fn, {"w": rand(14, kshape)}, x)
  # Kernel spatial dims pair with the input's in order of appearance, whatever their letters.
  spatial = tuple(i for i, c in enumerate(rhs) if c not in "OI")
  assert (site.out_axes, site.contract_axes) == ((rhs.index("O"),), (*spatial, rhs.index("I")))


def test_flax_conv():
  x = rand(15, (2, 6, 5, 4))
  params = {"params": {"kernel": rand(16, (3, 2, 4, 3)), "bias": rand(17, (3,))}}
  (site,) = check_view(nn.Conv(3, (3, 2), strides=(2, 1)).apply, params, x)
  assert (site.contract_axes, site.out_axes, site.d_in) == ((0, 1, 2), (3,), 24)


def test_problem_sites_are_flagged():
  grouped = lambda p, x: lax.conv_general_dilated(
      x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  (site,) = sites_of(grouped, {"w": rand(16, (3, 3, 2, 4))}, rand(17, (1, 5, 5, 4)))
  assert "grouped" in site.problem
  batched = lambda p, x: jnp.einsum("hbd,hdk->hbk", x, p["w"])
  (site,) = sites_of(batched, {"w": rand(18, (2, 4, 3))}, rand(19, (2, 5, 4)))
  assert "batch dimensions" in site.problem


def test_product_of_two_parameters_is_not_a_site():
  fn = lambda p, x: x @ (p["a"] @ p["b"])
  params = {"a": rand(20, (4, 2)), "b": rand(21, (2, 3))}
  assert sites_of(fn, params, rand(22, (5, 4))) == ()


@jax.custom_jvp
def _custom(w, x):
  return x @ w


_custom.defjvp(lambda primals, tangents: (_custom(*primals), tangents[1] @ primals[0]))


def test_sites_inside_calls_and_control_flow():
  def fn(p, x):
    y = jax.jit(lambda w, v: v @ w)(p["a"], x)
    y = y + jax.checkpoint(lambda w, v: v @ w)(p["b"], x)
    y = y + _custom(p["c"], x)
    y = y + lax.cond(x.sum() > 0, lambda: x @ p["d"], lambda: -x @ p["d"])
    return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), y, p["e"])[0]

  params = {k: rand(i, (4, 4)) for i, k in enumerate("abcd")}
  params["e"] = rand(9, (3, 4, 4))
  sites = sites_of(fn, params, rand(23, (2, 4)))
  got = [(s.path, s.scope, s.loop_axes) for s in sites]
  assert got == [("['a']", ("jit",), ()), ("['b']", ("remat2",), ()),
                 ("['c']", ("custom_jvp_call",), ()), ("['d']", ("cond",), ()),
                 ("['d']", ("cond",), ()), ("['e']", ("scan",), (0,))]
  assert sites[-1].contract_axes == (1,) and sites[-1].out_axes == (2,)
  assert len({s.location for s in sites}) == len(sites)


def test_one_jitted_function_at_two_places_has_two_locations():
  dense = jax.jit(lambda w, v: v @ w)
  fn = lambda p, x: dense(p["b"], jnp.tanh(dense(p["a"], x)))
  params = {"a": rand(1, (4, 4)), "b": rand(2, (4, 3))}
  x = rand(3, (2, 4))
  traced = interpret.trace(fn, params, x)
  a, b = traced.sites
  assert (a.path, b.path) == ("['a']", "['b']") and a.location != b.location
  # Shifts tell the two calls apart: cancelling the first site's output zeroes the model's.
  shifts = {a.location: -(x @ params["a"])}
  (out,) = interpret.evaluate(traced.jaxpr, jax.tree.leaves(params) + [x], shifts)
  np.testing.assert_allclose(out, jnp.zeros((2, 3)), atol=1e-6)


def test_shifts_inside_a_scan_are_added_one_slice_per_iteration():
  fn = lambda p, x: lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x @ p["a"], p["e"])[0]
  params = {"a": rand(1, (4, 4)), "e": rand(2, (3, 4, 4))}
  x = rand(3, (2, 4))
  traced = interpret.trace(fn, params, x)
  first, stacked = traced.sites
  assert interpret.scan_lengths(traced.jaxpr, first.location) == ()
  assert interpret.scan_lengths(traced.jaxpr, stacked.location) == (3,)
  shift = rand(4, (3, 2, 4))
  expected = x @ params["a"] + 0.5
  for i in range(3):
    expected = np.tanh(expected @ params["e"][i] + shift[i])
  run = lambda ls, v: interpret.evaluate_with_taps(
      traced.jaxpr, ls + [v], {stacked.location: lambda ops, y: y},
      {first.location: 0.5, stacked.location: shift})
  for (out,), taps in (run(jax.tree.leaves(params), x), jax.jit(run)(jax.tree.leaves(params), x)):
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert taps[stacked.location].shape == (3, 2, 4)   # the unshifted outputs, per iteration


def test_evaluate_without_shifts_is_the_function_jitted_and_eager():
  m = nn.Dense(3)
  x = rand(4, (2, 4))
  params = {"params": {"kernel": rand(5, (4, 3)), "bias": rand(6, (3,))}}
  fn = lambda p, v: jax.checkpoint(m.apply)(p, jnp.tanh(v))
  traced = interpret.trace(fn, params, x)
  (site,) = traced.sites
  double = {site.location: jnp.tanh(x) @ params["params"]["kernel"]}   # the site's own output
  run = lambda ls, v, shifts: interpret.evaluate(traced.jaxpr, ls + [v], shifts)[0]
  leaves = jax.tree.leaves(params)
  np.testing.assert_allclose(run(leaves, x, {}), fn(params, x), rtol=1e-6)
  eager = run(leaves, x, double)
  jitted = jax.jit(lambda ls, v: run(ls, v, double))(leaves, x)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6)
  kernel_only = params["params"]["kernel"]
  np.testing.assert_allclose(eager - params["params"]["bias"],
                             2 * jnp.tanh(x) @ kernel_only, rtol=1e-5)


def test_to_matrix_round_trip_jitted_equals_eager():
  fn = lambda p, x: jnp.einsum("btd,hdk->bthk", x, p["w"])
  w = rand(5, (2, 4, 3))
  (site,) = sites_of(fn, {"w": w}, rand(6, (1, 2, 4)))
  w2 = interpret.to_matrix(w, site)
  np.testing.assert_array_equal(w2, jnp.transpose(w, (1, 0, 2)).reshape(4, 6))
  np.testing.assert_array_equal(jax.jit(interpret.to_matrix, static_argnums=1)(w, site), w2)
  np.testing.assert_array_equal(interpret.from_matrix(w2, site), w)
  with pytest.raises(ValueError, match=r"w2: expected shape \(4, 6\).*\['w'\]"):
    interpret.from_matrix(w2.T, site)


def test_walk_reports_frames_and_trips():
  frames = []

  def on_eqn(eqn, ins, ctx):
    if eqn.primitive.name == "dot_general":
      frames.append([(f.primitive, f.branch, f.trips) for f in ctx.scope])
    if jaxpr_walk.call_body(eqn) is not None or eqn.primitive.name in jaxpr_walk.CONTROL_FLOW:
      return None
    return [None] * len(eqn.outvars)

  def fn(w, x):
    x = lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]
    return lax.while_loop(lambda c: c.sum() < 0, lambda c: jax.jit(jnp.dot)(c, w), x)

  closed = jax.make_jaxpr(fn)(jnp.ones((3, 3)), jnp.ones((2, 3)))
  jaxpr_walk.walk(closed, [None, None], jaxpr_walk.Rule(eqn=on_eqn))
  assert frames == [[("scan", 0, 5.0)], [("while", 1, 1.0), ("jit", 0, 1.0)]]
