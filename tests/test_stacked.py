"""Stacked layers (`stacked=`): a leaf whose leading axes index layers is pruned slice by slice.

The reference for every mask is the same call on a tree in which the stacked leaf is replaced by
the list of its slices: the masks must be bitwise equal, eagerly and under `jax.jit` with a
traced sparsity, ties included. Slice paths (``['w'][1]``) are then the reference tree's leaf
paths, so overrides, report rows and logger names can be compared by name.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from conftest import assert_trees_equal

L = 3
STACKED = {"w": 1, "v": 0, "b": 1}


def stacked_scores(seed=0):
  # Few distinct values: many ties, cut by position exactly like separate leaves.
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.integers(0, 6, size=(L, 8, 4)), jnp.float32),
          "v": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(L, 4)), jnp.float32)}


def unstack(tree):
  return {"w": [tree["w"][i] for i in range(L)], "v": tree["v"],
          "b": [tree["b"][i] for i in range(L)]}


def restack(tree):
  return {"w": jnp.stack(tree["w"]), "v": tree["v"], "b": jnp.stack(tree["b"])}


NM_ONLY = {"w": True, "v": False, "b": False}
MASK_FNS = {
    "unstructured": lambda t, s, scope, **kw: jp.unstructured_mask(t, s, scope=scope, **kw),
    "structured": lambda t, s, scope, **kw: jp.structured_mask(t, s, axis=-1, scope=scope, **kw),
    "block": lambda t, s, scope, **kw: jp.block_mask(t, s, (2, 2), reduce="max", scope=scope,
                                                      **kw),
    # N:M along axis -2 of each (in, out) slice: groups run along `in` (8), never along L (3).
    "nm": lambda t, s, scope, stacked=None: jp.nm_mask(
        t, 2, 4, stacked=stacked, prunable=NM_ONLY if stacked else {
            "w": [True] * L, "v": False, "b": [False] * L}),
}


def check_cases(cases, eager):
  """Stacked masks == masks of the separate slices, all cases in one compiled program; the
  ``eager`` cases also called eagerly (concrete counts) and compared with the jitted ones."""
  scores = stacked_scores()

  def masks(s):
    out = {}
    for case in cases:
      kind, scope = case.split()
      out[case] = (MASK_FNS[kind](scores, s, scope, stacked=STACKED),
                   restack(MASK_FNS[kind](unstack(scores), s, scope)))
    return out

  jitted = jax.jit(masks)(0.4)
  for got, want in jitted.values():
    assert_trees_equal(got, want)
    assert bool(got["b"].all())  # stacked biases stay dense: the default rule reads the slice
  for case in eager:
    kind, scope = case.split()
    assert_trees_equal(MASK_FNS[kind](scores, 0.4, scope, stacked=STACKED), jitted[case][0])
  return {case: got for case, (got, _) in jitted.items()}


def test_masks_equal_separate_slices():
  # Global scope is checked with a slice override below.
  got = check_cases(["unstructured layer", "structured layer", "nm layer"],
                    eager=["unstructured layer"])
  pruned = (~np.asarray(got["unstructured layer"]["w"])).reshape(L, -1).sum(axis=1)
  np.testing.assert_array_equal(pruned, round(0.4 * 32))
  nm = np.asarray(got["nm layer"]["w"])
  np.testing.assert_array_equal(nm.reshape(L, 2, 4, 4).sum(axis=2), 2)


@pytest.mark.slow
def test_every_mask_kind_and_scope_equals_separate_slices():
  cases = [f"{kind} {scope}" for kind in ("unstructured", "structured", "block")
           for scope in ("layer", "global")]
  got = check_cases(cases + ["nm layer"], eager=cases + ["nm layer"])
  # Axes count within a slice: axis 0 is the input axis of every slice.
  assert_trees_equal(jp.nm_mask(stacked_scores(), 2, 4, axis=0, stacked=STACKED,
                                prunable=NM_ONLY), got["nm layer"])


@pytest.mark.slow
def test_two_layer_axes_and_per_slice_sparsity():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.integers(0, 4, size=(2, 2, 4, 4)), jnp.float32)
  fracs = np.asarray([[0.25, 0.5], [0.0, 1.0]])
  ref_w = [[w[i, j] for j in range(2)] for i in range(2)]
  got, ref = jax.jit(lambda s: (
      jp.unstructured_mask({"w": w}, {"w": s}, stacked=2),
      jp.unstructured_mask({"w": ref_w}, {"w": [[s[i, j] for j in range(2)] for i in range(2)]})
  ))(fracs)
  np.testing.assert_array_equal(got["w"], np.stack([np.stack(r) for r in ref["w"]]))
  assert_trees_equal(jp.unstructured_mask({"w": w}, {"w": fracs}, stacked=2), got)
  np.testing.assert_array_equal((~np.asarray(got["w"])).sum(axis=(2, 3)), fracs * 16)


def test_erk_and_uniform_equal_separate_slices():
  params = {"w": np.zeros((L, 8, 4)), "v": np.zeros((6, 4)), "u": np.zeros((2, 5, 3))}
  stacked = {"w": 1, "v": 0, "u": 1}
  ref = {"w": [params["w"][i] for i in range(L)], "v": params["v"],
         "u": [params["u"][i] for i in range(2)]}
  for fn in (jp.erk_sparsities, jp.uniform_sparsities):
    got = fn(params, 0.7, stacked=stacked)
    want = fn(ref, 0.7)
    assert got["w"].shape == (L,) and got["w"].dtype == np.float64
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got["u"], want["u"])
    assert got["v"] == want["v"]


@pytest.mark.slow
def test_traced_erk_and_uniform_equal_separate_slices():
  params = {"w": np.zeros((L, 8, 4)), "v": np.zeros((6, 4)), "u": np.zeros((2, 5, 3))}
  stacked = {"w": 1, "v": 0, "u": 1}
  ref = {"w": [params["w"][i] for i in range(L)], "v": params["v"],
         "u": [params["u"][i] for i in range(2)]}
  for fn in (jp.erk_sparsities, jp.uniform_sparsities):
    traced = jax.jit(lambda s, fn=fn: (fn(params, s, stacked=stacked), fn(ref, s)))(0.7)
    assert traced[0]["w"].dtype == jnp.float32
    np.testing.assert_array_equal(traced[0]["w"], np.stack(traced[1]["w"]))
    np.testing.assert_array_equal(traced[0]["u"], np.stack(traced[1]["u"]))


def policy_params():
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) - 2.5), stacked_scores(3))


OVER = {"['w'][2]": 0.75}  # a slice path is the leaf path of that slice in the reference tree


def test_policy_global_scope_with_a_slice_override():
  params = policy_params()
  got, want = jax.jit(lambda s: (
      jp.pruning_masks(params, s, stacked=STACKED, scope="global", overrides=OVER),
      restack(jp.pruning_masks(unstack(params), s, scope="global", overrides=OVER))))(0.5)
  assert_trees_equal(got, want)
  eager = jp.pruning_masks(params, 0.5, stacked=STACKED, scope="global", overrides=OVER)
  assert_trees_equal(eager, got)
  assert (~np.asarray(eager["w"][2])).sum() == 24
  assert (~np.asarray(eager["w"][:2])).sum() + (~np.asarray(eager["v"])).sum() == 48


@pytest.mark.slow
def test_policy_equals_separate_slices():
  params = policy_params()
  params2 = jax.tree.map(lambda x: jnp.asarray(-np.asarray(x)), params)
  only = {"w": np.asarray([True, False, True]), "v": True, "b": False}
  ref_only = {"w": [True, False, True], "v": True, "b": [False] * L}

  def both(s):
    # Monotone from previous masks, as with separate leaves.
    first = jp.pruning_masks(params, 0.3, stacked=STACKED)
    out = [(jp.pruning_masks(params2, s, stacked=STACKED, previous=first),
            restack(jp.pruning_masks(unstack(params2), s, previous=unstack(first))), first)]
    for kw, rkw in (({"distribution": "erk"}, {"distribution": "erk"}),
                    ({"prunable": only}, {"prunable": ref_only}),
                    ({"pattern": jp.NMPattern(2, 4), "overrides": OVER},
                     {"pattern": jp.NMPattern(2, 4), "overrides": OVER})):
      out.append((jp.pruning_masks(params, s, stacked=STACKED, **kw),
                   restack(jp.pruning_masks(unstack(params), s, **rkw))))
    return out

  jitted = jax.jit(both)(0.5)
  for got, want, *_ in jitted:
    assert_trees_equal(got, want)
  got, _, first = jitted[0]
  assert not np.any(np.asarray(got["w"]) & ~np.asarray(first["w"]))
  assert_trees_equal(jp.pruning_masks(params, 0.5, stacked=STACKED, distribution="erk"),
                     jitted[1][0])


class Block(nn.Module):
  width: int = 4
  hidden: int = 8

  @nn.compact
  def __call__(self, x, _):
    h = nn.relu(nn.Dense(self.hidden, name="up")(x))
    return x + nn.Dense(self.width, name="down")(h), None


class ScanModel(nn.Module):
  width: int = 4
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="embed")(x)
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = blocks(self.width, self.hidden, name="layers")(x, None)
    return nn.Dense(2, name="head")(x)


def in_layers(path, leaf):
  """The `stacked` predicate of an `nn.scan` model: one layer axis under ``layers``."""
  del leaf
  return int(path[0].key == "layers")


def test_linen_scan_model_trains_to_exact_per_slice_sparsity():
  model = ScanModel()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  # Initialised from the shapes: compiling Flax's scanned initialisers costs seconds.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / 2, jnp.float32), shapes)
  assert params["layers"]["up"]["kernel"].shape == (3, 4, 8)
  sched = jp.polynomial_schedule(0.5, 0.75, 0, 1, frequency=1)
  tx = optax.chain(optax.adam(1e-2), jp.prune(
      sched, stacked=in_layers, overrides={"['layers']['down']['kernel'][0]": 0.25}))
  opt_state = jax.jit(tx.init)(params)
  apply = lambda p, x: model.apply({"params": p}, x)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  masks = []
  for _ in range(3):
    params, opt_state = step(params, opt_state)
    masks.append(jp.find_masks(opt_state, params))
  for before, after in zip(masks, masks[1:]):  # monotone
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
      assert not np.any(np.asarray(b) & ~np.asarray(a))

  r = jp.report(params, masks=opt_state, stacked=in_layers, apply_fn=apply, inputs=(x,))
  rows = {row.path: row for row in r.rows}
  for name, n in (("up", 32), ("down", 32)):
    for i in range(3):
      row = rows[f"['layers']['{name}']['kernel'][{i}]"]
      want = 0.25 if (name, i) == ("down", 0) else 0.75
      assert row.prunable and row.shape == (4, 8)[::1 if name == "up" else -1]
      assert row.count - row.kept == round(want * n)
      assert np.count_nonzero(np.asarray(params["layers"][name]["kernel"])[i]) == row.kept
    assert not rows[f"['layers']['{name}']['bias'][1]"].prunable  # (3, d) biases stay dense
  assert rows["['embed']['kernel']"].count - rows["['embed']['kernel']"].kept == 15
  # Each slice gets a third of its kernel's scanned FLOPs.
  flops = jp.matmul_flops_by_leaf(apply, params, x)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  up = paths.index("['layers']['up']['kernel']")
  assert rows["['layers']['up']['kernel'][0]"].flops_dense == flops[up] / 3
  # The same report from the zeros of the trained params, and the same logger names.
  assert r == jp.report(params, stacked=in_layers, apply_fn=apply, inputs=(x,))
  logged, zeros = jax.device_get(jax.jit(lambda s, p: (
      jp.prune_scalars(s, p, stacked=in_layers), jp.sparsity(p, stacked=in_layers)))(
          opt_state, params))
  expected = r.to_dict()
  assert "sparsity/layers/down/kernel/0" in logged
  assert {k for k in logged if k.startswith("sparsity/")} == {
      k for k in expected if k.startswith("sparsity/")}
  for key, value in logged.items():
    if key.startswith("sparsity/"):
      assert value == np.float32(expected[key]), key
  assert float(zeros) == pytest.approx(r.sparsity)


W_ONLY = {"w": True, "v": False, "b": False}
BAD = [
    (dict(stacked=-1), r"^stacked: expected a number of leading layer axes \(an int >= 0 or a "
                       r"bool\), got -1 \(leaf \['b'\]\)\.$"),
    (dict(stacked=1.0), r"^stacked: expected a number of leading layer axes .*, got 1\.0 "
                        r"\(leaf \['b'\]\)\.$"),
    (dict(stacked={"w": "1", "v": 0, "b": 1}), r"^stacked: .*, got '1' \(leaf \['w'\]\)\.$"),
    (dict(stacked={"w": 3, "v": 0, "b": 1}),
     r"^stacked: expected fewer layer axes than the 3 dimensions of a prunable leaf, got 3 "
     r"\(leaf \['w'\]\)\.$"),
    (dict(stacked={"w": 4, "v": 0, "b": 1}),
     r"^stacked: expected at most 3 layer axes for shape \(3, 8, 4\), got 4 \(leaf \['w'\]\)\.$"),
    (dict(stacked={"w": 1}), r"^stacked: expected .* a prefix of the parameters' structure"),
    (dict(stacked=lambda p, x: None), r"^stacked: expected .*, got None \(leaf \['b'\]\)\.$"),
    (dict(stacked=STACKED, sparsity={"w": np.zeros(2), "v": 0.5, "b": 0.5}),
     r"^sparsity: expected a scalar or an array of shape \(3,\) \(one value per layer\), got "
     r"shape \(2,\) \(leaf \['w'\]\)\.$"),
    (dict(stacked=STACKED, sparsity={"w": np.asarray([0.1, 1.5, 0.2]), "v": 0.5, "b": 0.5}),
     r"^sparsity: expected a fraction in \[0, 1\], got 1\.5 \(leaf \['w'\]\[1\]\)\.$"),
    (dict(stacked=STACKED, prunable={"w": np.ones(2, bool), "v": True, "b": False}),
     r"^prunable: expected a bool or a bool array of shape \(3,\) \(one per layer\), got shape "
     r"\(2,\) \(leaf \['w'\]\)\.$"),
    (dict(stacked=STACKED, axis=-3, prunable=W_ONLY),
     r"^axis: expected an axis in \[-2, 2\) for 2 dimensions, got -3 \(leaf \['w'\]\)\.$"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_input_names_the_argument_and_leaf(kwargs, message):
  kwargs = dict(kwargs)
  sparsity = kwargs.pop("sparsity", 0.5)
  fn = jp.structured_mask if "axis" in kwargs else jp.unstructured_mask
  with pytest.raises(ValueError, match=message):
    fn(stacked_scores(), sparsity, **kwargs)


def test_bad_policy_input():
  params = stacked_scores()
  with pytest.raises(ValueError, match=r"^overrides: expected one key per slice .*, got "
                                       r"\"\['w'\]\[1\]\" \(leaf \['w'\]\)\.$"):
    jp.pruning_masks(params, 0.5, stacked=STACKED, overrides={"['w']": 0.1, "['w'][1]": 0.2})
  with pytest.raises(ValueError, match=r"^overrides: expected overrides of prunable leaves only, "
                                       r"got 0\.2 \(leaf \['b'\]\[0\]\)\.$"):
    jp.pruning_masks(params, 0.5, stacked=STACKED, overrides={"['b'][0]": 0.2})
  with pytest.raises(ValueError, match=r"^overrides: expected keys that are leaf or slice paths"):
    jp.pruning_masks(params, 0.5, stacked=STACKED, overrides={"['w'][3]": 0.2})
  with pytest.raises(ValueError, match=r"^pattern: expected a function that takes a stacked= "
                                       r"keyword when stacked is given, got "
                                       r"'sharded_unstructured_mask'\.$"):
    jp.pruning_masks(params, 0.5, stacked=STACKED, pattern=functools.partial(
        jp.sharding.sharded_unstructured_mask, mesh=None))
  with pytest.raises(ValueError, match=r"^block_shape: expected at most 2 dims for shape "
                                       r"\(8, 4\), got \(1, 4, 2\) \(leaf \['w'\]\)\.$"):
    jp.block_mask(params, 0.5, (1, 4, 2), stacked=STACKED, prunable=W_ONLY)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs)


@nnx.split_rngs(splits=3)
@nnx.vmap(in_axes=(0,), out_axes=0)
def nnx_blocks(rngs):
  return NNXBlock(rngs)


def test_nnx_vmap_stacked_state():
  shapes = nnx.state(nnx.eval_shape(lambda: nnx_blocks(nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  assert state["up"]["kernel"][...].shape == (3, 4, 8)
  masks = jp.unstructured_mask(jax.tree.map(np.abs, state), 0.5, stacked=1)
  rows = jp.report(state, masks=masks, stacked=1).rows
  # Slice paths without NNX's `.value`; biases (3, 8) stay dense.
  assert [(r.path, r.prunable, r.kept) for r in rows] == (
      [(f"['up']['bias'][{i}]", False, 8) for i in range(3)] +
      [(f"['up']['kernel'][{i}]", True, 16) for i in range(3)])


def under_layers(path, leaf):
  """The `stacked` predicate for variables ``{"params": ...}`` of an `nn.scan` model."""
  del leaf
  return int(any(getattr(k, "key", None) == "layers" for k in path))


@pytest.fixture(scope="module")
def scan_groups():
  model = ScanModel()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  residual, hidden = jp.structured.find_groups(model.apply, variables, x)
  assert hidden.size == 8 and residual.size == 4
  return x, variables, [residual, hidden]


def test_groups_of_scanned_blocks_are_pruned_per_layer(scan_groups):
  _, variables, groups = scan_groups
  magnitude = jax.tree.map(lambda v: jnp.asarray(np.abs(v)), variables)
  scores = jp.structured.group_scores(groups, magnitude, stacked=under_layers)
  assert scores[0].shape == (4,) and scores[1].shape == (3, 8)  # the residual stream is shared
  # Without stacked= every group is shared: the hidden units sum over layers.
  shared = jp.structured.group_scores(groups, magnitude,
                                      prunable=lambda p, x: x.ndim - under_layers(p, x) >= 2)
  np.testing.assert_array_equal(shared[0], scores[0])
  np.testing.assert_allclose(shared[1] ** 2, np.sum(np.asarray(scores[1]) ** 2, axis=0),
                             rtol=1e-5)
  # Each layer's hidden units scored as a group of that layer alone.
  blocks = jax.tree.map(np.asarray, variables["params"]["layers"])
  one = [{"up": {"kernel": blocks["up"]["kernel"][i], "bias": blocks["up"]["bias"][i]},
          "down": {"kernel": blocks["down"]["kernel"][i]}} for i in range(3)]
  per_layer = [jp.structured.make_group(one, [(f"[{i}]['up']['kernel']", 1),
                                              (f"[{i}]['up']['bias']", 0),
                                              (f"[{i}]['down']['kernel']", 0)])
               for i in range(3)]
  ref = jp.structured.group_scores(per_layer, jax.tree.map(lambda v: jnp.asarray(np.abs(v)), one))
  np.testing.assert_allclose(scores[1], np.stack(ref), rtol=1e-6)
  keep = jp.structured.group_masks(scores, 0.5, stacked=[0, 1])
  top = np.argsort(-np.asarray(scores[1]), axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(keep[1]), top, 1), True)
  np.testing.assert_array_equal(np.asarray(keep[1]).sum(axis=1), 4)  # 4 of 8 in each layer
  np.testing.assert_array_equal(np.asarray(keep[0]).sum(), 2)
  # Global scope ranks (group, layer, unit) in the order of separate groups.
  glob = jp.structured.group_masks(scores, 0.5, scope="global",
                                   stacked=lambda _, s: s.ndim - 1)
  want = jp.structured.group_masks([scores[0]] + list(np.asarray(scores[1])), 0.5,
                                   scope="global")
  np.testing.assert_array_equal(glob[0], want[0])
  np.testing.assert_array_equal(glob[1], np.stack(want[1:]))
  masked = jax.tree.map(np.asarray, jp.structured.apply_group_masks(
      variables, groups, keep, stacked=under_layers)["params"])
  k = np.asarray(keep[1])
  up, down = masked["layers"]["up"], masked["layers"]["down"]
  for i in range(3):
    np.testing.assert_array_equal(up["kernel"][i][:, ~k[i]], 0)
    np.testing.assert_array_equal(up["bias"][i][~k[i]], 0)
    np.testing.assert_array_equal(down["kernel"][i][~k[i]], 0)
    assert np.all(up["kernel"][i][np.asarray(keep[0])][:, k[i]] != 0)
  np.testing.assert_array_equal(down["kernel"][..., ~np.asarray(keep[0])], 0)


def test_per_slice_prunable_and_per_layer_sparsity(scan_groups):
  _, variables, groups = scan_groups
  magnitude = jax.tree.map(lambda v: jnp.asarray(np.abs(v)), variables)

  def only(path, leaf):  # the up kernel of layer 1 is not pruned: it does not count
    if jax.tree_util.keystr(path).endswith("['up']['kernel']"):
      return np.asarray([True, False, True])
    return leaf.ndim - under_layers(path, leaf) >= 2

  res, hid = jp.structured.group_scores(groups, magnitude, stacked=under_layers, prunable=only)
  p = jax.tree.map(np.asarray, variables["params"])
  up, down = p["layers"]["up"]["kernel"], p["layers"]["down"]["kernel"]
  flag = np.asarray([1.0, 0.0, 1.0])
  want_hid = np.sqrt(flag[:, None] * (up ** 2).sum(axis=1) + (down ** 2).sum(axis=2))
  np.testing.assert_allclose(hid, want_hid, rtol=1e-5)
  want_res = np.sqrt((p["embed"]["kernel"] ** 2).sum(0) + (p["head"]["kernel"] ** 2).sum(1)
                     + (flag[:, None, None] * up ** 2).sum((0, 2)) + (down ** 2).sum((0, 1)))
  np.testing.assert_allclose(res, want_res, rtol=1e-5)
  # One fraction per layer for the per-layer group, traced or not.
  fracs = [0.5, np.asarray([0.25, 0.5, 0.0])]
  eager = jp.structured.group_masks([res, hid], fracs, stacked=[0, 1])
  assert [int(k.sum()) for k in eager[:1]] == [2]
  np.testing.assert_array_equal(np.asarray(eager[1]).sum(axis=1), [6, 4, 8])
  jitted = jax.jit(lambda f: jp.structured.group_masks([res, hid], f, stacked=[0, 1]))(fracs)
  assert_trees_equal(eager, jitted)
  keep = [np.ones(4, bool), np.asarray(eager[1])]
  assert_trees_equal(jp.structured.apply_group_masks(variables, groups, keep, stacked=under_layers),
                     jax.jit(lambda v, k: jp.structured.apply_group_masks(
                         v, groups, k, stacked=under_layers))(variables, keep))


def test_shrunk_scan_model_equals_masked_one(scan_groups):
  x, variables, groups = scan_groups
  scores = jp.structured.group_scores(groups, jp.magnitude(variables), stacked=under_layers)
  keep = jp.structured.group_masks(scores, 0.5, stacked=[0, 1])
  small = jp.structured.shrink(variables, groups, keep, stacked=under_layers)
  sizes = jp.structured.linen_features(small["params"])
  assert sizes == {"embed": 2, "layers/up": 4, "layers/down": 2, "head": 2}
  assert small["params"]["layers"]["up"]["kernel"].shape == (3, 2, 4)
  # Each layer keeps its own units, in their original order.
  k = np.asarray(keep[1])
  up = np.asarray(variables["params"]["layers"]["up"]["kernel"])[..., np.asarray(keep[0]), :]
  for i in range(3):
    np.testing.assert_array_equal(small["params"]["layers"]["up"]["kernel"][i], up[i][:, k[i]])
  masked = jp.structured.apply_group_masks(variables, groups, keep, stacked=under_layers)
  apply = jax.jit(ScanModel().apply)
  want = apply(masked, x)
  got = jax.jit(ScanModel(width=2, hidden=4).apply)(small, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert float(jnp.max(jnp.abs(want - apply(variables, x)))) > 1e-2  # pruning changed it


def test_stacked_group_bad_input(scan_groups):
  _, variables, groups = scan_groups
  per_layer = [np.ones(4, bool), np.ones((3, 8), bool)]
  with pytest.raises(ValueError, match=r"^group_masks: expected 1-D per-unit scores, got shapes "
                                       r"\[\(4,\), \(3, 8\)\] \(per-layer scores need stacked=\)"):
    jp.structured.group_masks([jnp.ones(4), jnp.ones((3, 8))], 0.5)
  with pytest.raises(ValueError, match=r"^stacked: expected 1 layer axes for per-unit scores of "
                                       r"shape \(3, 8\) \(layers, then units\), got 0 "
                                       r"\(leaf \[1\]\)\.$"):
    jp.structured.group_masks([jnp.ones(4), jnp.ones((3, 8))], 0.5, stacked=0)
  with pytest.raises(ValueError, match=r"^stacked: expected a number of leading layer axes .*, "
                                       r"got -1 \(leaf \[0\]\)\.$"):
    jp.structured.group_masks([jnp.ones(4)], 0.5, stacked=-1)
  with pytest.raises(ValueError, match=r"^group_masks: sparsity 1\.0 would remove all 8 units of "
                                       r"group 1 in layer \[0\]; expected to keep at least one$"):
    jp.structured.group_masks([jnp.ones(4), jnp.ones((3, 8))], [0.5, 1.0], stacked=[0, 1])
  with pytest.raises(ValueError, match=r"^keep: expected shape \(8,\) for group .*, got shape "
                                       r"\(3, 8\)\.$"):
    jp.structured.apply_group_masks(variables, groups, per_layer)
  with pytest.raises(ValueError, match=r"^keep: expected shape \(8,\) or \(3, 8\) for group .*, "
                                       r"got shape \(2, 8\)\.$"):
    jp.structured.shrink(variables, groups, [np.ones(4, bool), np.ones((2, 8), bool)],
                         stacked=under_layers)
  uneven = np.ones((3, 8), bool)
  uneven[1, :3] = False
  with pytest.raises(ValueError, match=r"^keep: expected the same number of kept units in every "
                                       r"layer \(the shrunk leaf has one shape\), got counts "
                                       r"\[8, 5, 8\] \(leaf \['params'\]\['layers'\]"):
    jp.structured.shrink(variables, groups, [np.ones(4, bool), uneven], stacked=under_layers)
  uneven[1] = False
  with pytest.raises(ValueError, match=r"removes all 8 units in some layer"):
    jp.structured.shrink(variables, groups, [np.ones(4, bool), uneven], stacked=under_layers)
  with pytest.raises(ValueError, match=r"^prunable: expected a prunable member slice of group .* "
                                       r"in every layer, got none in layer \[1\]\.$"):
    jp.structured.group_scores(groups, jp.magnitude(variables), stacked=under_layers,
                               prunable=lambda p, x: np.asarray([True, False, True])
                               if x.ndim == 3 else False)
