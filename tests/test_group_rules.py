"""The union-find of axis identities and the per-primitive coupling rules of dependency groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune._src import group_rules, jaxpr_walk
from jaxprune._src.group_graph import Graph, Unsupported


def members(group):
  return sorted((m.path, m.axis) for m in group.members)


def weights(**shapes):
  return {k: jnp.ones(s) for k, s in shapes.items()}


X = jnp.ones((2, 4))
P = weights(w1=(4, 5), w2=(5, 3))
MLP_GROUP = [("['w1']", 1), ("['w2']", 0)]


# ---------------------------------------------------------------------------------------------
# The graph.


def test_union_find_pins_and_sizes():
  g = Graph()
  a, b, c = g.new(4), g.new(4), g.new(4)
  assert g.new(1) is None and g.fresh((2, 1, 3))[1] is None
  g.union(a, b)
  g.mark(b, "pin", "why")
  g.union(c, a)
  assert g.find(a[1]) == g.find(b[1]) == g.find(c[1])
  assert g.find(a[1]) in g.pin and g.pin[g.find(a[1])] == "why"
  with pytest.raises(Unsupported, match="different lengths 4 and 5"):
    g.union(a, g.new(5))


def test_regroup_splits_and_unit_maps():
  g = Graph()
  rows, cols = g.new(2), g.new(6)
  heads, head_dim = g.regroup([cols], (2, 3))  # (6,) -> (2, 3) refines the node in place
  assert g.resolve(cols) == ("p", (heads, head_dim))
  (flat,) = g.regroup([rows, cols], (12,))
  maps = dict(g.unit_maps(flat))
  np.testing.assert_array_equal(maps[rows[1]], np.repeat([0, 1], 6))
  np.testing.assert_array_equal(maps[heads[1]], np.tile(np.repeat([0, 1], 3), 2))
  np.testing.assert_array_equal(maps[head_dim[1]], np.tile([0, 1, 2], 4))
  cat = g.resolve(("s", (g.new(2), None, g.new(3))))
  assert [m.tolist() for _, m in g.unit_maps(cat)] == [[0, 1, -1, -1, -1, -1],
                                                       [-1, -1, -1, 0, 1, 2]]
  with pytest.raises(Unsupported, match="do not factor"):
    g.regroup([g.new(6)], (4, 9))


def test_pin_survives_refinement_and_product_union():
  g = Graph()
  a, b = g.new(6), g.new(2)
  g.mark(a, "pin", "reduced")
  g.union(a, ("p", (b, g.new(3))))  # a node coupled with a product becomes that product
  assert all(i in g.pin for i in g.leaves(a)) and g.find(b[1]) in g.pin


# ---------------------------------------------------------------------------------------------
# The table.


def test_supported_primitives_are_the_table_keys():
  assert jp.structured.SUPPORTED_PRIMITIVES is group_rules.SUPPORTED_PRIMITIVES
  assert group_rules.SUPPORTED_PRIMITIVES == frozenset(group_rules.RULES)
  assert set(jaxpr_walk.CALLS) | jaxpr_walk.CONTROL_FLOW <= group_rules.SUPPORTED_PRIMITIVES
  assert len(group_rules.SUPPORTED_PRIMITIVES) == 151
  assert "fft" not in group_rules.SUPPORTED_PRIMITIVES


@pytest.mark.parametrize("mid", [
    lambda h: jnp.transpose(jnp.transpose(h)),
    lambda h: jnp.squeeze(h[:, None, :], 1),
    lambda h: jax.lax.dynamic_update_slice(h, jnp.tanh(h), (0, 0)),
    lambda h: jnp.sort(h, axis=0),  # sorted along the batch: units pass through
    lambda h: jnp.cumsum(h, axis=0),
    lambda h: jax.lax.rev(h, (0,)),
    lambda h: jnp.clip(h, 0.0, 1.0) + jnp.where(h > 0, h, 0.5 * h),
    lambda h: jax.lax.optimization_barrier(h) * jnp.ones((1, 5)),
    lambda h: h.reshape(2, 5, 1).reshape(2, 5),
    lambda h: jnp.stack([h, jnp.tanh(h)], axis=1).sum(1),
], ids=["transpose", "squeeze", "dynamic_update_slice", "sort", "cumsum", "rev", "select",
        "barrier", "reshape", "stack"])
def test_rules_that_pass_units_through(mid):
  (g,) = jp.structured.find_groups(lambda p, x: mid(x @ p["w1"]) @ p["w2"], P, X)
  assert g.size == 5 and members(g) == MLP_GROUP


@pytest.mark.parametrize("mid", [
    lambda h: h[:, :4].sum() + h,
    lambda h: h[:, ::2].sum() + h,
    lambda h: jnp.pad(h, ((0, 0), (1, 0)))[:, 1:],
    lambda h: jnp.sort(h, axis=1),
    lambda h: jax.lax.top_k(h, 2)[0].sum() + h,
    lambda h: jnp.cumsum(h, axis=1),
    lambda h: h - jnp.max(h, axis=1, keepdims=True),
    lambda h: jnp.take(h, jnp.array([0, 2, 1, 3, 4]), axis=1),
    lambda h: h * jnp.arange(5.0),
    lambda h: h + np.arange(5.0, dtype=np.float32),
    lambda h: jax.lax.dynamic_update_slice(h, jnp.ones((2, 2)), (0, 1)),
    lambda h: jnp.concatenate(jnp.split(h, [2], axis=1), axis=1),
    lambda h: jnp.stack([h, h], axis=-1).reshape(2, 10)[:, :5],
], ids=["slice", "strided", "pad", "sort", "top_k", "cumsum", "reduce", "gather", "iota",
        "constant", "dynamic_update_slice", "split", "stack"])
def test_rules_that_pin_units(mid):
  assert jp.structured.find_groups(lambda p, x: mid(x @ p["w1"]) @ p["w2"], P, X) == ()


def test_model_inputs_outputs_and_unused_leaves_are_not_groups():
  p = {**P, "unused": jnp.ones((5, 5))}
  found = jp.structured.find_groups(lambda p, x: (x @ p["w1"]) @ p["w2"], p, X)
  assert [members(g) for g in found] == [MLP_GROUP]
  assert jp.structured.find_groups(lambda p, x: (x @ p["w1"]) * x[:, :1] @ p["w2"], P, X) != ()
  assert jp.structured.find_groups(lambda p, x: x @ p["w1"], P, X) == ()  # its units are outputs


def test_cond_branch_returning_a_constant_pins():
  def f(p, x):
    h = x @ p["w1"]
    h = jax.lax.cond(x[0, 0] > 0, lambda: h, lambda: jnp.asarray(np.ones((2, 5), np.float32)))
    return h @ p["w2"]

  assert jp.structured.find_groups(f, P, X) == ()


def test_scan_outputs_stacked_axis_pinned_units_kept():
  p = weights(w1=(3, 4, 6), w2=(6, 2))

  def f(p, x):
    ys = jax.lax.scan(lambda h, w: (h, jax.nn.relu(h @ w)), x, p["w1"])[1]  # (3, 2, 6)
    return ys.reshape(-1, 6) @ p["w2"]

  (g,) = jp.structured.find_groups(f, p, X)
  assert g.size == 6 and members(g) == [("['w1']", 2), ("['w2']", 0)]


def test_loop_carry_that_becomes_data_dependent_is_an_activation():
  # c starts as a parameter; from the second iteration on it depends on the input, so the
  # product c . h is one of two activations and its contracted axis is pinned.
  p = weights(c0=(2, 5), w1=(4, 5), w2=(5, 3))

  def f(p, x):
    def body(c, xt):
      s = jnp.einsum("bi,bi->b", c, xt @ p["w1"])
      return c * s[:, None], None
    return jax.lax.scan(body, p["c0"], jnp.stack([x, x]))[0] @ p["w2"]

  assert jp.structured.find_groups(f, p, X) == ()


def test_unknown_primitive_poisons_with_its_name():
  def f(p, x):
    return jnp.fft.ifft(x @ p["w1"]).real @ p["w2"]

  with pytest.raises(ValueError, match=r"unsupported primitive 'fft'"):
    jp.structured.find_groups(f, P, X)
