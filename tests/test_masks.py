"""Mask functions: exact counts, tie/NaN rules, prunable rules, numpy references, bad input."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
import reference


def _tree(seed=0, ties=False):
  rng = np.random.default_rng(seed)
  draw = (lambda s: rng.integers(-3, 4, size=s).astype(np.float32)) if ties else (
      lambda s: rng.normal(size=s).astype(np.float32))
  return {"conv": {"kernel": draw((3, 3, 4, 8)), "bias": draw((8,))},
          "dense": {"kernel": draw((32, 10)), "bias": draw((10,))},
          "embed": draw((6, 4))}


_layer = jax.jit(lambda s, sp: jp.unstructured_mask(s, sp))
_global = jax.jit(lambda s, sp: jp.unstructured_mask(s, sp, scope="global"))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0, 1), st.booleans())
def test_layer_scope_exact_counts_and_reference(seed, s, ties):
  scores = _tree(seed, ties)
  masks = _layer(scores, jnp.float32(s))
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    leaf = scores
    for k in path:
      leaf = leaf[k.key]
    if leaf.ndim < 2:
      assert bool(np.all(m))  # biases stay dense
      continue
    k = round(float(np.float32(s)) * leaf.size)
    assert int(np.sum(~np.asarray(m))) == k
    np.testing.assert_array_equal(np.asarray(m), ~reference.prune_lowest([leaf], k)[0])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0, 1), st.booleans())
def test_global_scope_exact_count_and_reference(seed, s, ties):
  scores = _tree(seed, ties)
  masks = _global(scores, jnp.float32(s))
  prunable = [x for x in jax.tree.leaves(scores) if x.ndim >= 2]
  k = round(float(np.float32(s)) * sum(x.size for x in prunable))
  expected = reference.prune_lowest(prunable, k)
  got = [m for m, x in zip(jax.tree.leaves(masks), jax.tree.leaves(scores)) if x.ndim >= 2]
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(g), ~e)


def test_jit_equals_eager_and_python_float_semantics(check_jit_eager):
  scores = _tree(3, ties=True)
  by_global = lambda x, s: jp.unstructured_mask(x, s, scope="global")
  for s in [0.0, 0.3, 0.5, 1.0]:  # a Python float eagerly, a traced float32 under jit
    check_jit_eager(by_global, scores, s)
    check_jit_eager(jp.unstructured_mask, scores, {"conv": s, "dense": 1 - s, "embed": s})


def test_all_equal_scores_prune_the_last_entries():
  scores = {"w": jnp.ones((4, 5))}
  m = np.asarray(jp.unstructured_mask(scores, 0.3)["w"]).ravel()
  np.testing.assert_array_equal(m, np.arange(20) < 14)
  # globally, later leaves go first
  scores = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}
  g = jp.unstructured_mask(scores, 0.75, scope="global")
  assert not np.asarray(g["b"]).any()
  np.testing.assert_array_equal(np.asarray(g["a"]).ravel(), [1, 1, 1, 0, 0, 0])


def test_nan_pruned_first_inf_ranked_as_number():
  w = jnp.array([[1.0, jnp.nan, -jnp.inf], [jnp.inf, 0.5, jnp.nan]])
  m = jp.unstructured_mask({"w": w}, 3 / 6)["w"]
  np.testing.assert_array_equal(m, [[True, False, False], [True, True, False]])
  m = jp.unstructured_mask({"w": w}, 5 / 6)["w"]
  np.testing.assert_array_equal(m, [[False, False, False], [True, False, False]])


def test_sparsity_zero_and_one():
  scores = _tree(1)
  keep_all = jp.unstructured_mask(scores, 0.0)
  assert all(bool(np.all(m)) for m in jax.tree.leaves(keep_all))
  none = jp.unstructured_mask(scores, 1.0, scope="global")
  for m, x in zip(jax.tree.leaves(none), jax.tree.leaves(scores)):
    assert bool(np.all(m)) if x.ndim < 2 else not np.any(m)


def test_per_leaf_prefix_sparsity():
  scores = _tree(2)
  masks = jp.unstructured_mask(scores, {"conv": 0.25, "dense": 0.5, "embed": 0.0})
  assert int(np.sum(~masks["conv"]["kernel"])) == round(0.25 * 288)
  assert int(np.sum(~masks["dense"]["kernel"])) == 160
  assert bool(np.all(masks["embed"])) and bool(np.all(masks["dense"]["bias"]))


def test_prunable_predicate_and_bool_tree():
  scores = _tree(4)
  only_dense = jp.unstructured_mask(scores, 0.5, prunable=lambda path, x: "dense" in str(path))
  assert bool(np.all(only_dense["conv"]["kernel"]))
  assert int(np.sum(~only_dense["dense"]["kernel"])) == 160
  assert int(np.sum(~only_dense["dense"]["bias"])) == 5  # the predicate overrides ndim >= 2
  flags = {"conv": False, "dense": {"kernel": True, "bias": False}, "embed": False}
  by_tree = jp.unstructured_mask(scores, 0.5, prunable=flags)
  assert int(np.sum(~by_tree["dense"]["kernel"])) == 160 and bool(np.all(by_tree["embed"]))


def test_bf16_scores_and_masks_are_bool_leaf_shaped():
  scores = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(5))
  masks = jp.unstructured_mask(scores, 0.4)
  for m, x in zip(jax.tree.leaves(masks), jax.tree.leaves(scores)):
    assert m.dtype == jnp.bool_ and m.shape == x.shape


def test_empty_and_single_entry_leaves(check_jit_eager):
  # A size-0 leaf between others: jitted layer scope had indexed its (empty) mask to order the
  # selections one after another.
  scores = {"a": jnp.arange(6.).reshape(3, 2), "empty": jnp.zeros((0, 4)), "one": jnp.ones((1, 1)),
            "w": jnp.arange(6.).reshape(2, 3)}
  for scope in ("layer", "global"):
    m = check_jit_eager(lambda x, s, scope=scope: jp.unstructured_mask(x, s, scope=scope), scores,
                        0.5)
    assert m["empty"].shape == (0, 4) and m["empty"].dtype == jnp.bool_
  m = jp.unstructured_mask(scores, 0.5)
  assert bool(m["one"][0, 0])  # round(0.5) == 0
  np.testing.assert_array_equal(m["w"].ravel(), [0, 0, 0, 1, 1, 1])
  assert not bool(jp.unstructured_mask(scores, 1.0)["one"][0, 0])
  blocks = check_jit_eager(lambda x: jp.block_mask(x, 0.5, (1, 2), allow_partial=True), scores)
  np.testing.assert_array_equal(blocks["w"], [[False, False, False], [True, True, True]])
  assert blocks["empty"].shape == (0, 4)
  units = check_jit_eager(lambda x: jp.structured_mask(x, 0.5, axis=0), scores)
  np.testing.assert_array_equal(units["a"].ravel(), [0, 0, 0, 0, 1, 1])


# --- structured ---

def _np_unit_scores(x, axis, norm):
  others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  return (np.abs(x).sum(others) if norm == "l1" else np.square(x).sum(others)).astype(np.float32)


@pytest.mark.parametrize("axis, norm", [(-1, "l2"), (-1, "l1"), (-2, "l2"), (0, "l1")])
def test_structured_matches_reference(axis, norm):
  scores = _tree(6, ties=True)
  masks = jp.structured_mask(scores, 0.5, axis=axis, reduce=norm)
  for x, m in [(scores["conv"]["kernel"], masks["conv"]["kernel"]),
               (scores["dense"]["kernel"], masks["dense"]["kernel"])]:
    units = _np_unit_scores(x, axis, norm)
    keep_units = reference.unit_keep(units, 0.5)
    expected = np.broadcast_to(
        np.expand_dims(keep_units, tuple(a for a in range(x.ndim) if a != axis % x.ndim)), x.shape)
    np.testing.assert_array_equal(np.asarray(m), expected)


def test_structured_global_counts_units_over_leaves():
  scores = {"a": jnp.ones((3, 4)), "b": jnp.full((5, 6), 2.0)}
  masks = jp.structured_mask(scores, 0.5, scope="global", reduce="l1")
  # unit L1 norms: a -> 3 (x4), b -> 10 (x6); 5 of 10 units go: all of a, then the last b unit
  assert not np.asarray(masks["a"]).any()
  np.testing.assert_array_equal(np.asarray(masks["b"])[0], [1, 1, 1, 1, 1, 0])


# --- N:M ---

@settings(max_examples=15, deadline=None)
@given(hnp.arrays(np.float32, (8, 3),
                  elements=st.sampled_from([0.0, 1.0, 2.0, -1.0, np.nan, np.inf])),
       st.sampled_from([(2, 4), (1, 4), (0, 2), (4, 4), (3, 8)]))
def test_nm_matches_reference(x, nm):
  n, m = nm
  got = np.asarray(jp.nm_mask({"w": x}, n, m)["w"])
  np.testing.assert_array_equal(got, reference.nm_keep(x, n, m, axis=0))
  assert np.all(got.reshape(8 // m, m, 3).sum(1) == n)


def test_nm_default_axis_is_input_axis_of_conv_kernel(check_jit_eager):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 8, 5)), jnp.float32)
  got = np.asarray(check_jit_eager(jp.nm_mask, {"k": x})["k"])
  np.testing.assert_array_equal(got, reference.nm_keep(np.asarray(x), 2, 4, axis=2))
  # numpy integers are accepted for n and m
  np.testing.assert_array_equal(jp.nm_mask({"k": x}, np.int64(2), np.int32(4))["k"], got)


# --- blocks ---

def test_block_mask_max_scores_partial_edge_blocks_by_their_entries():
  # Padding had been -inf before taking |.|: every partial edge block scored +inf under "max".
  x = np.arange(24, dtype=np.float32).reshape(4, 6) - 11
  got = np.asarray(jp.block_mask({"w": x}, 0.5, (3, 4), reduce="max", allow_partial=True)["w"])
  maxes = np.array([[np.abs(x[:3, :4]).max(), np.abs(x[:3, 4:]).max()],
                    [np.abs(x[3:, :4]).max(), np.abs(x[3:, 4:]).max()]], np.float32)
  assert maxes.tolist() == [[11, 7], [10, 12]]
  np.testing.assert_array_equal(got, np.kron(reference.unit_keep(maxes, 0.5),
                                             np.ones((3, 4), bool))[:4, :6])


def test_block_mask_reference_and_partial_blocks():
  x = np.arange(24, dtype=np.float32).reshape(4, 6) - 11
  got = np.asarray(jp.block_mask({"w": x}, 0.5, (2, 3), reduce="l1")["w"])
  block_scores = np.abs(x).reshape(2, 2, 2, 3).sum((1, 3))
  keep_blocks = reference.unit_keep(block_scores, 0.5)
  np.testing.assert_array_equal(got, np.kron(keep_blocks, np.ones((2, 3), bool)))
  part = np.asarray(jp.block_mask({"w": x}, 0.5, (3, 4), reduce="mean", allow_partial=True)["w"])
  means = np.array([[np.abs(x[:3, :4]).mean(), np.abs(x[:3, 4:]).mean()],
                    [np.abs(x[3:, :4]).mean(), np.abs(x[3:, 4:]).mean()]], np.float32)
  kb = reference.unit_keep(means, 0.5)
  expected = np.kron(kb, np.ones((3, 4), bool))[:4, :6]
  np.testing.assert_array_equal(part, expected)


def test_block_mask_on_conv_uses_trailing_dims(check_jit_eager):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 4, 8)), jnp.float32)
  m = np.asarray(check_jit_eager(lambda s: jp.block_mask(s, 0.25, (2, 4), reduce="l2"), {"k": x})
                 ["k"])
  assert (~m).sum() == round(0.25 * 36) * 8
  blocks = m.reshape(3, 3, 2, 2, 2, 4)
  assert np.all(blocks.all(axis=(3, 5)) == blocks.any(axis=(3, 5)))  # constant in each block


# --- apply / sparsity / summary ---

def test_apply_masks_sparsity_and_summary():
  params = _tree(7)
  masks = jp.unstructured_mask(jp.magnitude(params), 0.6, scope="global")
  pruned = jp.apply_masks(params, masks)
  n = 288 + 320 + 24
  assert float(jp.sparsity(pruned)) == pytest.approx(round(0.6 * n) / n, abs=1e-7)
  assert np.asarray(pruned["dense"]["kernel"]).dtype == np.float32
  rows = jp.report(pruned, masks=masks).rows
  assert [r.count for r in rows] == [8, 288, 10, 320, 24]
  assert sum(r.count - r.kept for r in rows if r.prunable) == round(0.6 * n)
  # a zero in a dense (unprunable) bias is not pruning
  with_zero_bias = {**pruned, "dense": {**pruned["dense"], "bias": jnp.zeros(10)}}
  bias_row = jp.report(with_zero_bias).rows[2]
  assert (bias_row.path, bias_row.kept, bias_row.prunable) == ("['dense']['bias']", 10, False)


# --- bad input ---

@pytest.mark.parametrize("bad", [-0.5, 1.5, float("nan"), "0.5", jnp.ones(2)])
def test_bad_sparsity(bad):
  with pytest.raises(ValueError, match=r"^sparsity: expected a fraction in \[0, 1\], got "):
    jp.unstructured_mask(_tree(), bad)
  with pytest.raises(ValueError, match=r"sparsity: expected a fraction in \[0, 1\], got .* "
                                       r"\(leaf \['dense'\]\['kernel'\]\)\.$"):
    jp.unstructured_mask(_tree(), {"conv": 0.1, "dense": bad, "embed": 0.0})
  with pytest.raises(ValueError, match=r"^sparsity: expected a fraction in \[0, 1\], got "):
    jp.block_mask(_tree(), bad, (1, 2))


def test_missing_sparsity_is_named():
  for fn in (jp.unstructured_mask, jp.structured_mask):
    with pytest.raises(ValueError, match=r"^sparsity: expected a fraction in \[0, 1\], got None"):
      fn(_tree(), None)


def test_bad_inputs_name_the_leaf():
  with pytest.raises(ValueError, match=r"scores: expected floating-point arrays, got 'dtype int32' "
                                       r"\(leaf \['i'\]\)"):
    jp.unstructured_mask({"i": jnp.ones((2, 2), jnp.int32)}, 0.5)
  with pytest.raises(ValueError, match="scope"):
    jp.unstructured_mask(_tree(), 0.5, scope="network")
  with pytest.raises(ValueError, match=r"leaf \['b'\] is in params but not in masks"):
    jp.apply_masks({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": jnp.ones(2, bool)})
  with pytest.raises(ValueError, match=r"leaf \['a'\] has shape \(2,\) in params and \(3,\)"):
    jp.apply_masks({"a": jnp.ones(2)}, {"a": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match=r"n: expected an integer >= 0 and <= 4, got 5\."):
    jp.nm_mask(_tree(), 5, 4)
  with pytest.raises(ValueError, match=r"axis: expected an axis in \[-2, 2\) for 2 dimensions, got "
                                       r"3 \(leaf \['dense'\]\['kernel'\]\)"):
    jp.structured_mask(_tree(), 0.5, axis=3, prunable=lambda p, x: x.ndim == 2)
  with pytest.raises(ValueError, match=r"axis: expected an integer axis, got 1\.0 \(leaf "):
    jp.structured_mask(_tree(), 0.5, axis=1.0)
  with pytest.raises(ValueError, match=r"m: expected a divisor of 10, the size along axis -1, got "
                                       r"4 \(leaf \['dense'\]\['kernel'\]\)"):
    jp.nm_mask(_tree(), 2, 4, axis=-1, prunable=lambda p, x: x.ndim == 2)
  with pytest.raises(ValueError, match=r"block_shape: expected a divisor of shape \(32, 10\) \(or "
                                       r"allow_partial=True\), got \(8, 4\) \(leaf \['dense'\]"):
    jp.block_mask(_tree(), 0.5, (8, 4), prunable=lambda p, x: x.ndim == 2)
  with pytest.raises(ValueError, match=r"block_shape: expected at most 2 dims for shape"):
    jp.block_mask(_tree(), 0.5, (1, 1, 1), prunable=lambda p, x: x.ndim == 2)
  for bad in (2, (), (2, 0), (2.0, 1), "ab"):
    with pytest.raises(ValueError, match=r"^block_shape: expected "):
      jp.block_mask(_tree(), 0.5, bad)
  with pytest.raises(ValueError, match=r"^reduce: expected one of \('l1', 'l2'\), got 'max'"):
    jp.structured_mask(_tree(), 0.5, reduce="max")
  with pytest.raises(ValueError, match="sparsity: expected one fraction with scope='global'"):
    jp.unstructured_mask(_tree(), {"conv": 0.1, "dense": 0.2, "embed": 0.3}, scope="global")


def test_elementwise_leaves_equal_materialized_scores():
  # Lazy scores |w - v| per leaf (the 1-D biases stay unprunable by the default rule, read
  # through Elementwise.ndim); other mask functions evaluate Elementwise leaves whole.
  w, v = _tree(1, ties=True), _tree(2, ties=True)
  lazy = jax.tree.map(lambda a, b: jp.Elementwise(lambda x, y: jnp.abs(x - y), (a, b)), w, v)
  eager = jax.tree.map(lambda a, b: np.abs(a - b), w, v)
  for scope in ("layer", "global"):
    got = jp.unstructured_mask(lazy, 0.6, scope=scope)
    want = jp.unstructured_mask(eager, 0.6, scope=scope)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert bool(np.all(got["dense"]["bias"])) and not bool(np.all(got["dense"]["kernel"]))
  jax.tree.map(np.testing.assert_array_equal, jp.structured_mask(lazy, 0.5),
               jp.structured_mask(eager, 0.5))
