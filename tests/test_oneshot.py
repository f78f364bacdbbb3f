"""jp.oneshot: layer-wise OBS pruning from calibration data, end to end on small models."""

from __future__ import annotations

import copy

import flax.linen as nn
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import jaxprune as jp
from jaxprune._src import gauss_newton
from jaxprune._src import oneshot_allocation
import reference


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(24, name="fc1")(x))
    x = nn.relu(nn.Dense(16, name="fc2")(x))
    # fc3 shares fc1's shape: one compilation serves both in every solver
    return nn.Dense(24, name="fc3")(x)


MODEL = MLP()


def apply_fn(params, x):
  return MODEL.apply({"params": params}, x)


def rand(seed, shape, scale=1.0):
  """Test data from numpy: jax.random would compile its sampler once per shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


@pytest.fixture(scope="module")
def setup():
  # Correlated inputs: what makes reconstruction matter.
  x = rand(1, (256, 16)) @ rand(0, (16, 16))
  sizes = {"fc1": (16, 24), "fc2": (24, 16), "fc3": (16, 24)}
  params = {name: {"kernel": rand(2 + k, shape, shape[0] ** -0.5),
                   "bias": rand(5 + k, shape[1:], 0.1)}
            for k, (name, shape) in enumerate(sizes.items())}
  batches = [x[i:i + 64] for i in range(0, 256, 64)]
  return params, batches, x


def _kernels(tree):
  return {k: v["kernel"] for k, v in tree.items()}


def _output_error(params, dense, x):
  return float(jnp.mean((apply_fn(params, x) - apply_fn(dense, x)) ** 2))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "obc"])
def test_zero_sparsity_is_bit_identical(setup, method):
  params, batches, _ = setup
  out, masks = jp.oneshot(apply_fn, params, batches, 0.0, method=method, allocation="uniform",
                          progress=False)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(masks))


@pytest.mark.parametrize("method", ["sparsegpt", "obc"])
def test_exact_global_count_and_zeros(setup, method):
  params, batches, _ = setup
  out, masks = jp.oneshot(apply_fn, params, batches, 0.6, method=method, progress=False)
  n = sum(k.size for k in _kernels(params).values())
  pruned = sum(int(jnp.sum(~m)) for m in _kernels(masks).values())
  assert pruned == round(0.6 * n)
  for name in params:
    np.testing.assert_array_equal(np.asarray(out[name]["bias"]), np.asarray(params[name]["bias"]))
    assert bool(jnp.all(jnp.where(masks[name]["kernel"], True, out[name]["kernel"] == 0)))
  # masks plug into the library's mask tools unchanged
  assert float(jp.sparsity(out)) == pytest.approx(pruned / n, abs=1e-6)


def test_nm_pattern_groups_exact(setup):
  params, batches, _ = setup
  out, masks = jp.oneshot(apply_fn, params, batches, method="sparsegpt", pattern="2:4",
                          progress=False)
  for m in _kernels(masks).values():
    groups = np.asarray(m).reshape(m.shape[0] // 4, 4, m.shape[1])
    np.testing.assert_array_equal(groups.sum(axis=1), 2)
  # the policy's spelling is the same pattern
  again, masks2 = jp.oneshot(apply_fn, params, batches, 0.5, method="sparsegpt",
                             pattern=jp.NMPattern(2, 4), progress=False)
  for a, b in zip(jax.tree.leaves((out, masks)), jax.tree.leaves((again, masks2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_patterns_follow_each_kernels_input_axis():
  """Magnitude one-shot is the library's own mask on the leaf: N:M along the input channels of a
  conv kernel at each tap (as `nm_mask` on HWIO), along axis -1 of an (out, in) weight, and
  blocks of the leaf's trailing dims whatever the layout (as `block_mask`)."""
  conv = nn.Conv(8, (2, 2))
  x = rand(10, (4, 5, 5, 8))
  params = {"conv": {"kernel": rand(11, (2, 2, 8, 8), 0.2), "bias": rand(12, (8,), 0.1)},
            "w": rand(13, (6, 8))}  # (out, in)

  def model(p, batch):
    h = jnp.tanh(conv.apply({"params": p["conv"]}, batch))
    return h @ p["w"].T

  run = lambda pattern, s=None: jp.oneshot(model, params, [x], s, method="magnitude",
                                           pattern=pattern, allocation="uniform",
                                           sequential=False, progress=False)
  scores = jp.magnitude(params)
  _, nm = run("2:4")
  np.testing.assert_array_equal(nm["conv"]["kernel"],
                                jp.nm_mask(scores["conv"]["kernel"], 2, 4, axis=-2))
  np.testing.assert_array_equal(nm["w"], jp.nm_mask(scores["w"], 2, 4, axis=-1))
  with pytest.raises(ValueError, match=r"pattern.axis: expected 1 or -1, .* \['w'\]"):
    run(jp.NMPattern(2, 4))
  _, blocks = run(jp.BlockPattern((2, 4)), 0.5)
  np.testing.assert_array_equal(blocks["conv"]["kernel"],
                                jp.block_mask(scores["conv"]["kernel"], 0.5, (2, 4)))
  np.testing.assert_array_equal(blocks["w"], jp.block_mask(scores["w"], 0.5, (2, 4)))


def test_apply_fn_traced_once_plus_one_pass_per_data_driven_allocation(setup):
  params, batches, _ = setup
  traces = []

  def counted(p, x):
    traces.append(None)
    return apply_fn(p, x)

  for allocation in ("global", "uniform"):
    traces.clear()
    jp.oneshot(counted, params, batches, 0.5, method="magnitude", allocation=allocation,
               progress=False)
    assert len(traces) == 1, allocation
  # the data-driven allocations add exactly one pass of their own (None: the default, "obd")
  for allocation in (None, "wanda", "obs"):
    traces.clear()
    kwargs = {} if allocation is None else {"allocation": allocation}
    jp.oneshot(counted, params, batches, 0.5, method="magnitude", progress=False, **kwargs)
    assert len(traces) == 2, allocation


@pytest.mark.parametrize("method,refit", [("obc", False), ("magnitude", True), ("wanda", True)])
def test_reconstruction_beats_magnitude_per_layer(setup, method, refit):
  params, batches, _ = setup
  kwargs = dict(allocation="uniform", target="pruned", sequential=False, progress=False,
                return_layers=True)
  _, _, layers = jp.oneshot(apply_fn, params, batches, 0.7, method=method, refit=refit, **kwargs)
  _, _, mag = jp.oneshot(apply_fn, params, batches, 0.7, method="magnitude", **kwargs)
  for ours, theirs in zip(layers, mag):
    assert ours.path == theirs.path
    assert ours.loss <= theirs.loss + 1e-6, (ours, theirs)


def test_methods_beat_magnitude_on_outputs(setup):
  params, batches, x = setup
  errors = {}
  for method, refit in [("magnitude", False), ("magnitude", True), ("sparsegpt", False),
                        ("obc", False)]:
    out, _ = jp.oneshot(apply_fn, params, batches, 0.7, method=method, refit=refit,
                        progress=False)
    errors[(method, refit)] = _output_error(out, params, x)
  base = errors[("magnitude", False)]
  for key, value in errors.items():
    if key != ("magnitude", False):
      assert value < base, errors


def test_obs_allocation_exact_total(setup):
  params, batches, _ = setup
  out, masks = jp.oneshot(apply_fn, params, batches, 0.5, method="obc", allocation="obs",
                          progress=False)
  n = sum(k.size for k in _kernels(params).values())
  assert sum(int(jnp.sum(~m)) for m in _kernels(masks).values()) == round(0.5 * n)


@pytest.mark.parametrize("allocation", ["global", "wanda"])
def test_ranked_allocation_counts_per_kernel(setup, allocation):
  # Each kernel's count is what one ranking over all kernels gives: magnitude, or the dense
  # model's Wanda scores (which differ here, so the two allocations differ).
  params, batches, _ = setup
  _, masks = jp.oneshot(apply_fn, params, batches, 0.55, method="sparsegpt",
                        allocation=allocation, progress=False)
  ranked = jp.magnitude(params) if allocation == "global" else jp.wanda_scores(
      apply_fn, params, batches)
  expected = jp.unstructured_mask(ranked, 0.55, scope="global",
                                  prunable=lambda path, leaf: leaf.ndim == 2)
  counts = {k: int(jnp.sum(~m)) for k, m in _kernels(masks).items()}
  assert counts == {k: int(jnp.sum(~m)) for k, m in _kernels(expected).items()}
  assert sum(counts.values()) == round(0.55 * sum(k.size for k in _kernels(params).values()))
  other = jp.unstructured_mask(jp.wanda_scores(apply_fn, params, batches) if allocation ==
                               "global" else jp.magnitude(params), 0.55, scope="global",
                               prunable=lambda path, leaf: leaf.ndim == 2)
  assert counts != {k: int(jnp.sum(~m)) for k, m in _kernels(other).items()}


def test_obs_allocation_spares_the_kernel_the_outputs_depend_on():
  # Two kernels with the same inputs and the same weights, hence the same reconstruction error
  # curves; the model's output scales one by 10 and the other by 0.1, so the allocation over
  # output-weighted errors prunes the second more (relative errors would not tell them apart).
  x = rand(7, (128, 12)) @ rand(8, (12, 12))
  w = rand(9, (12, 8), 12 ** -0.5)
  params = {"a": w, "b": w}
  apply_fn = lambda p, x: jnp.concatenate([10.0 * (x @ p["a"]), 0.1 * (x @ p["b"])], axis=-1)
  _, masks = jp.oneshot(apply_fn, params, [x[:64], x[64:]], 0.5, method="sparsegpt",
                        allocation="obs", progress=False)
  pruned = {k: int(jnp.sum(~m)) for k, m in masks.items()}
  assert pruned["a"] + pruned["b"] == 96
  assert pruned["b"] > pruned["a"], pruned


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, np.nan]), min_size=1,
                                    max_size=7), min_size=1, max_size=4),
                  st.floats(0.0, 1.0))
def test_global_counts_equal_the_global_mask(values, sparsity):
  # Heavy ties and NaN: the counts of the global ranking (reference.prune_lowest, the rule
  # unstructured_mask(scope="global") is pinned to in test_select).
  arrays = [np.asarray(v, np.float32) for v in values]
  total = round(sparsity * sum(a.size for a in arrays))
  masks = reference.prune_lowest(arrays, total)
  assert oneshot_allocation.global_counts(arrays, total) == [int(m.sum()) for m in masks]


def test_params_not_modified(setup):
  params, batches, _ = setup
  before = copy.deepcopy(jax.device_get(params))
  jp.oneshot(apply_fn, params, batches, 0.5, progress=False)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_masks_plug_into_prune(setup):
  params, batches, x = setup
  out, masks = jp.oneshot(apply_fn, params, batches, 0.5, progress=False)
  tx = optax.chain(optax.sgd(0.1), jp.prune(0.5, masks=masks))
  state = tx.init(out)
  grads = jax.tree.map(jnp.ones_like, out)
  updates, state = tx.update(grads, state, out)
  new = optax.apply_updates(out, updates)
  for m, p in zip(jax.tree.leaves(_kernels(masks)), jax.tree.leaves(_kernels(new))):
    np.testing.assert_array_equal(np.asarray(p)[~np.asarray(m)], 0.0)
  kept = optax.tree_utils.tree_get(state, "masks")
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(masks)):  # not recomputed
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="masks"):
    jp.prune(0.5, masks=jax.tree.map(lambda m: m[:1], masks)).init(out)


def test_bad_input(setup):
  params, batches, _ = setup
  with pytest.raises(ValueError, match="batches"):
    jp.oneshot(apply_fn, params, [], 0.5)
  with pytest.raises(ValueError, match="method"):
    jp.oneshot(apply_fn, params, batches, 0.5, method="nope")
  with pytest.raises(ValueError, match="sparsity"):
    jp.oneshot(apply_fn, params, batches, 1.5)
  with pytest.raises(ValueError, match="sparsity"):
    jp.oneshot(apply_fn, params, batches, 0.3, pattern="2:4")
  with pytest.raises(ValueError, match="pattern"):
    jp.oneshot(apply_fn, params, batches, pattern="2-4")
  bad = [b.at[0, 0].set(jnp.nan) for b in batches]
  with pytest.raises(ValueError, match="fc1"):
    jp.oneshot(apply_fn, params, bad, 0.5)
  unused = dict(params, extra={"kernel": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="extra"):
    jp.oneshot(apply_fn, unused, batches, 0.5)
  # 2:4 cannot be reached along an input axis of 10
  odd = {"w": jnp.ones((10, 4))}
  with pytest.raises(ValueError, match="w"):
    jp.oneshot(lambda p, x: x[:, :10] @ p["w"], odd, batches, pattern="2:4")


def test_wanda_scores_pytree(setup):
  params, batches, x = setup
  scores = jp.wanda_scores(apply_fn, params, batches)
  norms = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=0))
  expected = np.abs(np.asarray(params["fc1"]["kernel"])) * norms[:, None]
  np.testing.assert_allclose(np.asarray(scores["fc1"]["kernel"]), expected, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(scores["fc1"]["bias"]),
                                np.abs(np.asarray(params["fc1"]["bias"])))
  masks = jp.unstructured_mask(scores, 0.5)
  assert int(jnp.sum(~masks["fc2"]["kernel"])) == round(0.5 * params["fc2"]["kernel"].size)


def test_scan_stacked_kernel_pruned_slice_by_slice_with_its_own_h():
  """Stacked layers read inside lax.scan: each slice is pruned with the H of its iteration."""
  layers = rand(14, (3, 8, 8), 0.4)
  x = rand(15, (32, 8))
  model = lambda p, v: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), v, p["layers"])[0]
  params = {"layers": layers}
  out, masks = jp.oneshot(model, params, [x], 0.5, target="pruned", progress=False)
  keep = np.asarray(masks["layers"])
  assert keep.shape == (3, 8, 8) and [int((~k).sum()) for k in keep] == [32, 32, 32]
  (cal,) = jp.layerwise.calibrate(model, params, [x]).values()
  for k in range(3):
    # oneshot's defaults, which differ from the layer solver's
    want_w, want_keep = jp.layerwise.sparsegpt(layers[k], cal.h[k], 0.5, damp=0.1, block_size=32)
    np.testing.assert_array_equal(keep[k], np.asarray(want_keep))
    np.testing.assert_allclose(np.asarray(out["layers"][k]), np.asarray(want_w), rtol=1e-6,
                               atol=1e-6)
  scores = jp.wanda_scores(model, params, [x])["layers"]
  np.testing.assert_allclose(np.asarray(scores[1]), np.asarray(jp.layerwise.wanda(
      layers[1], cal.h[1])), rtol=1e-6)


def test_obd_allocation_ranks_output_saliencies_and_ignores_rescaling():
  # Each kernel's count is what one global ranking of w² · (output Gauss-Newton diagonal)
  # gives; scaling the first kernel up and the second down by 8 leaves the model, and so this
  # allocation, unchanged, where the magnitude ranking moves the pruning onto the small kernel.
  x = rand(20, (64, 10))
  params = {"a": rand(21, (10, 12), 0.3), "b": rand(22, (12, 6), 0.3)}
  model = lambda p, x: (x @ p["a"]) @ p["b"]
  counts = lambda m: {k: int(jnp.sum(~v)) for k, v in m.items()}
  _, masks = jp.oneshot(model, params, [x], 0.5, allocation="obd", progress=False)
  diag = gauss_newton.output_diag(model, params, [x], ["['a']", "['b']"], num_probes=1)
  sal = [np.asarray(jnp.square(params[k]) * diag[f"['{k}']"]) for k in ("a", "b")]
  expected = oneshot_allocation.global_counts(sal, round(0.5 * 192))
  assert [counts(masks)["a"], counts(masks)["b"]] == expected
  scaled = {"a": 8.0 * params["a"], "b": params["b"] / 8.0}
  _, masks_scaled = jp.oneshot(model, scaled, [x], 0.5, allocation="obd", progress=False)
  assert counts(masks_scaled) == counts(masks)
  _, by_magnitude = jp.oneshot(model, scaled, [x], 0.5, allocation="global", progress=False)
  assert counts(by_magnitude)["b"] == 72  # every entry of the shrunk kernel ranks lowest


def test_obd_allocation_of_scan_stacked_kernels():
  # a kernel stacked along a scan is ranked with each slice's own output diagonal
  x = rand(24, (32, 8))
  params = {"layers": rand(23, (3, 8, 8), 0.4), "out": rand(25, (8, 4), 0.4)}
  model = lambda p, v: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), v,
                                    p["layers"])[0] @ p["out"]
  _, masks = jp.oneshot(model, params, [x], 0.5, allocation="obd", progress=False)
  diag = gauss_newton.output_diag(model, params, [x], ["['layers']", "['out']"], num_probes=1)
  sal = [np.asarray(jnp.square(params[k]) * diag[f"['{k}']"]) for k in ("layers", "out")]
  expected = oneshot_allocation.global_counts(sal, round(0.5 * (192 + 32)))
  assert [int(jnp.sum(~masks[k])) for k in ("layers", "out")] == expected
  assert expected != [96, 16]  # not the uniform split
  per_slice = [int(jnp.sum(~m)) for m in masks["layers"]]
  assert sum(per_slice) == expected[0] and max(per_slice) - min(per_slice) <= 1


def test_default_allocation_needs_a_floating_output(setup):
  params, batches, _ = setup
  labels = lambda p, x: jnp.argmax(apply_fn(p, x), axis=-1)
  with pytest.raises(ValueError, match="floating-point output .* 'global' does not"):
    jp.oneshot(labels, params, batches, 0.5, method="magnitude", progress=False)
  _, masks = jp.oneshot(labels, params, batches, 0.5, method="magnitude", allocation="global",
                        progress=False)
  kernels = _kernels(masks)
  assert sum(int(jnp.sum(~m)) for m in kernels.values()) == round(0.5 * 3 * 16 * 24)
