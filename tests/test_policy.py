"""pruning_masks: distributions, overrides, scopes, patterns, previous masks, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
import reference


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"conv": jnp.asarray(rng.integers(-4, 5, size=(3, 3, 4, 8)), jnp.float32),
          "dense": {"kernel": jnp.asarray(rng.normal(size=(32, 12)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32)},
          "steps": jnp.arange(4, dtype=jnp.int32).reshape(2, 2)}  # int: never prunable


PARAMS = _params()
KERNELS = [("conv",), ("dense", "kernel")]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def _pruned(masks):
  return [int((~_get(masks, p)).sum()) for p in KERNELS]


def test_magnitude_layer_and_global_match_reference(check_jit_eager):
  layer = check_jit_eager(jp.pruning_masks, PARAMS, 0.7)
  for p in KERNELS:
    np.testing.assert_array_equal(_get(layer, p),
                                  reference.unit_keep(np.abs(_get(PARAMS, p)).ravel(), 0.7)
                                  .reshape(_get(PARAMS, p).shape))
  assert _get(layer, ("dense", "bias")).all() and _get(layer, ("steps",)).all()
  glob = check_jit_eager(lambda p, s: jp.pruning_masks(p, s, scope="global"), PARAMS, 0.7)
  want = reference.prune_lowest([np.abs(_get(PARAMS, p)) for p in KERNELS], round(0.7 * 672))
  for p, w in zip(KERNELS, want):
    np.testing.assert_array_equal(_get(glob, p), ~w)


def test_given_scores_and_elementwise_scores_agree():
  grads = jax.tree.map(lambda x: jnp.cos(jnp.asarray(x, jnp.float32)), PARAMS)
  eager = jp.pruning_masks(PARAMS, 0.5, scores=jax.tree.map(lambda a, b: jnp.abs(a * b),
                                                            PARAMS, grads))
  lazy = jp.pruning_masks(PARAMS, 0.5, scores=jax.tree.map(
      lambda a, b: jp.Elementwise(lambda x, y: jnp.abs(x * y), (a, b)), PARAMS, grads))
  jax.tree.map(np.testing.assert_array_equal, eager, lazy)
  assert _pruned(eager) == [144, 192]


def test_distribution_names_and_callables_share_one_signature(check_jit_eager):
  by_name = check_jit_eager(lambda p, s: jp.pruning_masks(p, s, distribution="erk"), PARAMS, 0.8)
  by_fn = jp.pruning_masks(PARAMS, 0.8, distribution=jp.erk_sparsities)
  jax.tree.map(np.testing.assert_array_equal, by_name, by_fn)
  fracs = jp.erk_sparsities(PARAMS, 0.8)
  assert _pruned(by_name) == [round(fracs["conv"] * 288), round(fracs["dense"]["kernel"] * 384)]
  assert sum(_pruned(by_name)) == round(0.8 * 672)
  # uniform_sparsities rounds for the exact total; "uniform" rounds each leaf on its own
  total = jp.pruning_masks(PARAMS, 0.55, distribution=jp.uniform_sparsities)
  each = jp.pruning_masks(PARAMS, 0.55)
  assert sum(_pruned(total)) == round(0.55 * 672) == 370
  assert _pruned(each) == [round(0.55 * 288), round(0.55 * 384)] == [158, 211]
  seen = {}

  def half(params, sparsity, *, prunable):
    seen["prunable"] = prunable
    return jax.tree.map(lambda _: sparsity / 2, params)

  masks = jp.pruning_masks(PARAMS, 0.5, distribution=half,
                           overrides={"['dense']['kernel']": 0.75})
  assert _pruned(masks) == [72, 288]
  assert seen["prunable"] == {"conv": True, "dense": {"kernel": False, "bias": False},
                              "steps": False}


def test_overrides_in_both_scopes_and_as_callable(check_jit_eager):
  over = {"['conv']": 0.25}
  layer = check_jit_eager(lambda p, s, o: jp.pruning_masks(p, s, overrides={"['conv']": o}),
                          PARAMS, 0.5, 0.25)
  assert _pruned(layer) == [72, 192]
  glob = jp.pruning_masks(PARAMS, 0.5, scope="global", overrides=over)
  assert _pruned(glob) == [72, 192]  # the global threshold covers the dense kernel alone
  by_fn = jp.pruning_masks(PARAMS, 0.5, overrides=lambda path, x: 0.25 if x.ndim == 4 else None)
  jax.tree.map(np.testing.assert_array_equal, by_fn, layer)


def test_previous_masks_rank_first_and_stay_pruned(check_jit_eager):
  first = jp.pruning_masks(PARAMS, 0.3)
  # Scores that favour exactly the entries already pruned: they still go first (monotone).
  inverted = jax.tree.map(lambda x: -jnp.abs(jnp.asarray(x, jnp.float32)), PARAMS)
  second = check_jit_eager(lambda p, s, m: jp.pruning_masks(p, s, scores=inverted, previous=m),
                           PARAMS, 0.5, first)
  for p in KERNELS:
    a, b = _get(first, p), _get(second, p)
    assert not np.any(b & ~a)
  assert _pruned(second) == [144, 192]
  # a lower target never regrows
  lower = jp.pruning_masks(PARAMS, 0.1, previous=second)
  jax.tree.map(np.testing.assert_array_equal, lower, second)


def test_live_nan_scores_rank_above_pruned_entries():
  w = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
  previous = jp.pruning_masks(w, 0.3)  # 1, 2, 3 pruned
  nan_late = {"w": jnp.where(w["w"] > 5, jnp.nan, w["w"])}
  masks = jp.pruning_masks(w, 0.5, scores=nan_late, previous=previous)
  # Live NaN ranks as -inf: above the pruned entries, below every number; the last of the
  # tied NaNs go first; exactly round(0.5 * 10) = 5 pruned.
  np.testing.assert_array_equal(~masks["w"].ravel(), [1, 1, 1, 0, 0, 0, 0, 0, 1, 1])


def test_nm_pattern_with_previous_and_zero_sparsity(check_jit_eager):
  params = {"k": jnp.asarray(np.random.default_rng(1).normal(size=(8, 6)), jnp.float32),
            "other": jnp.ones((4, 4))}
  nm = jp.NMPattern(2, 4)
  masks = check_jit_eager(lambda p, s: jp.pruning_masks(p, s, pattern=nm,
                                                        overrides={"['other']": 0.0}),
                          params, 0.5)
  np.testing.assert_array_equal(masks["k"], reference.nm_keep(np.abs(params["k"]), 2, 4, 0))
  assert masks["other"].all()  # a leaf at sparsity 0 stays dense, traced or not
  prev = {"k": jnp.asarray(np.arange(48).reshape(8, 6) % 4 != 3), "other": jnp.ones((4, 4), bool)}
  again = jp.pruning_masks(params, 0.5, pattern=jp.NMPattern(1, 4), previous=prev)
  assert not np.any(np.asarray(again["k"])[~np.asarray(prev["k"])])
  assert np.all(np.asarray(again["k"]).reshape(2, 4, 6).sum(1) == 1)


def test_block_pattern_counts_blocks_and_keeps_pruned_blocks(check_jit_eager):
  params = {"k": jnp.asarray(np.random.default_rng(2).normal(size=(8, 12)), jnp.float32)}
  pattern = jp.BlockPattern((2, 4), reduce="l2")
  masks = check_jit_eager(lambda p, s: jp.pruning_masks(p, s, pattern=pattern), params, 0.5)
  want = jp.block_mask(jp.magnitude(params), 0.5, (2, 4), reduce="l2")
  jax.tree.map(np.testing.assert_array_equal, masks, want)
  later = jp.pruning_masks(params, 0.75, pattern=pattern, previous=masks)
  assert not np.any(np.asarray(later["k"])[~np.asarray(masks["k"])])
  assert int((~later["k"]).sum()) == 9 * 8  # round(0.75 * 12) blocks of 8


def test_mask_function_pattern_receives_arrays_with_pruned_entries_nan():
  seen = []

  def by_neuron(scores, sparsity, *, scope, prunable):
    seen.append(scores)
    return jp.structured_mask(scores, sparsity, scope=scope, prunable=prunable)

  previous = jp.pruning_masks(PARAMS, 0.25)
  masks = jp.pruning_masks(PARAMS, 0.5, pattern=by_neuron, previous=previous)
  kernel = np.asarray(seen[0]["dense"]["kernel"])
  np.testing.assert_array_equal(np.isnan(kernel), ~np.asarray(previous["dense"]["kernel"]))
  assert not np.any(np.asarray(masks["dense"]["kernel"]) & ~np.asarray(previous["dense"]["kernel"]))
  assert int((~np.asarray(masks["dense"]["kernel"]).any(axis=0)).sum()) == 6  # of 12 neurons


def test_one_shot_pruning_to_exact_sparsity():
  pruned = jp.apply_masks(PARAMS, jp.pruning_masks(PARAMS, 0.6))
  n_zero = sum(int((_get(pruned, p) == 0).sum()) for p in KERNELS)
  before = sum(int((_get(PARAMS, p) == 0).sum()) for p in KERNELS)
  assert n_zero >= round(0.6 * 288) + round(0.6 * 384) >= before
  np.testing.assert_array_equal(pruned["steps"], PARAMS["steps"])


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": "0.5"}, r"^sparsity: expected a fraction in \[0, 1\], got '0.5'\.$"),
    ({"sparsity": None}, r"^sparsity: expected one fraction in \[0, 1\] .*got None\.$"),
    ({"sparsity": 1.5}, r"^sparsity: expected a fraction in \[0, 1\], got 1.5\.$"),
    ({"sparsity": {"conv": 0.5}}, r"^sparsity: expected one fraction"),
    ({"scope": "net"}, r"^scope: expected one of \('layer', 'global'\), got 'net'\.$"),
    ({"distribution": "erk", "scope": "global"}, r"^distribution: expected 'uniform' with "),
    ({"distribution": "normal"}, r"^distribution: expected one of \('uniform', 'erk'\)"),
    ({"pattern": "2:4"}, r"^pattern: expected 'unstructured', an NMPattern"),
    ({"pattern": jp.NMPattern(5, 4)}, r"^pattern.n: expected an integer >= 0 and <= 4, got 5"),
    ({"pattern": jp.NMPattern(2, 4), "scope": "global"}, r"^scope: expected 'layer' with an "),
    ({"pattern": jp.BlockPattern(2)}, r"^pattern.shape: expected a non-empty sequence"),
    ({"pattern": jp.BlockPattern((2, 2), "median")}, r"^pattern.reduce: expected one of"),
    ({"overrides": {"['nope']": 0.1}}, r"^overrides: expected keys that are leaf paths of the "
                                       r"params such as .*, got \"\['nope'\]\"\.$"),
    ({"overrides": {"['dense']['bias']": 0.1}},
     r"^overrides: expected overrides of prunable leaves only, got 0.1 \(leaf \['dense'\]"),
    ({"overrides": {"['conv']": 2.0}}, r"^overrides: expected a fraction in \[0, 1\], got 2.0 "
                                       r"\(leaf \['conv'\]\)\.$"),
    ({"overrides": ["conv"]}, r"^overrides: expected None, a mapping"),
    ({"prunable": lambda p, x: True}, r"^params: expected floating-point prunable leaves, got "
                                      r"'dtype int32' \(leaf \['steps'\]\)\.$"),
    ({"distribution": lambda p, s, prunable: {"conv": 3.0, "dense": 0.1, "steps": 0.0}},
     r"^distribution: expected a fraction in \[0, 1\], got 3.0 \(leaf \['conv'\]\)\.$"),
    ({"previous": {"conv": jnp.ones((3, 3, 4, 8), bool)}}, r"params and previous must have"),
])
def test_bad_input_names_the_argument(kwargs, match):
  kwargs = {"sparsity": 0.5, **kwargs}
  with pytest.raises(ValueError, match=match):
    jp.pruning_masks(PARAMS, kwargs.pop("sparsity"), **kwargs)
