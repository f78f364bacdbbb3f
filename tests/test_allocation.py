"""Per-leaf sparsities from a global target: sensitivity (convex hull), uniform and ERK."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jaxprune as jp
from jaxprune._src import allocation, distribution
from jaxprune._src import masks as masks_lib
from jaxprune._src import report as report_lib
from jaxprune._src import sensitivity as sens_lib

from models import A, B_, sum_params


def layer_masks(params, alloc):
  # Jitted with the fractions closed over as Python floats (exact counts); eager selection
  # dispatches many small ops.
  return jax.jit(lambda p: masks_lib.unstructured_mask(jp.magnitude(p), alloc, scope="layer"))(
      params)


def synthetic(lower_is_better=False):
  grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  damage = np.array([[0.0, 0.0, 0.01, 0.02, 0.5],     # 'a' is robust up to 75%
                     [0.0, 0.1, 0.2, 0.3, 0.4]])       # 'b' degrades linearly
  metrics = 1.0 + damage if lower_is_better else 1.0 - damage
  return sens_lib.SensitivityResult((A, B_), (20, 15), grid, metrics, 1.0)


@pytest.mark.parametrize("lower", [False, True])
def test_allocation_sparsity_by_hand(lower):
  params = sum_params()
  sens = synthetic(lower)
  # target 0.4 of 35 prunable entries = 14: all from 'a' (its hull slopes 0 and 0.002 < b's).
  alloc = allocation.allocate_sparsities(params, 0.4, sensitivity=sens,
                                         higher_is_better=not lower)
  assert alloc == {"a": {"kernel": 14 / 20}, "b": {"kernel": 0.0}, "bias": 0.0}
  # target 0.6 = 21 entries: 'a' to 15 (75%), then 'b' (slope 0.027) before a's last segment.
  alloc = allocation.allocate_sparsities(params, 0.6, sensitivity=sens,
                                         higher_is_better=not lower)
  assert alloc == {"a": {"kernel": 0.75}, "b": {"kernel": 0.4}, "bias": 0.0}
  pred = allocation.predicted_metric(sens, alloc, higher_is_better=not lower)
  assert pred == pytest.approx(1.0 + 0.18 if lower else 1.0 - 0.18)
  # It feeds unstructured_mask directly, with exactly the allocated counts.
  masks = layer_masks(params, alloc)
  assert int((~masks["a"]["kernel"]).sum()) == 15 and int((~masks["b"]["kernel"]).sum()) == 6
  assert bool(masks["bias"].all())


@pytest.mark.parametrize("target", [0.0, 0.13, 0.5, 0.77, 0.9, 1.0])
def test_allocation_hits_sparsity_exactly(target):
  params = sum_params()
  alloc = allocation.allocate_sparsities(params, target, sensitivity=synthetic())
  pruned = sum(round(s * n) for s, n in zip(jax.tree.leaves(alloc), (20, 15, 3)))
  assert pruned == round(target * 35)


def mlp_setup():
  rng = np.random.default_rng(1)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}
  x = jnp.ones((3, 8))
  apply = lambda p, x: (x @ p["a"]["kernel"]) @ p["b"]["kernel"]
  grid = np.array([0.0, 0.5, 1.0])
  sens = sens_lib.SensitivityResult((A, B_), (48, 24), grid,
                                    np.array([[1.0, 0.9, 0.5], [1.0, 0.95, 0.0]]), 1.0)
  return params, x, apply, sens


@pytest.mark.parametrize("target", [0.1, 0.6])
def test_allocation_flops_and_bytes_budgets(target):
  params, x, apply, sens = mlp_setup()
  dense = report_lib.report(params, apply_fn=apply, inputs=(x,))
  assert dense.flops_dense == 2 * 3 * (8 * 6 + 6 * 4)
  per_entry_flops = 2 * 3  # each weight is used once per row of x
  alloc = allocation.allocate_sparsities(params, target, sensitivity=sens, budget="flops",
                                         report=dense)
  masks = layer_masks(params, alloc)
  after = report_lib.report(params, masks=masks, apply_fn=apply, inputs=(x,))
  limit = (1 - target) * dense.flops_dense
  assert limit - per_entry_flops < after.flops_effective <= limit + 1e-6

  alloc = allocation.allocate_sparsities(params, target, sensitivity=sens, budget="bytes")
  masks = layer_masks(params, alloc)
  after = report_lib.report(params, masks=masks)
  limit = (1 - target) * dense.dense_bytes
  assert limit - 4 < after.bitmask_bytes <= limit


def test_allocation_uniform_erk_and_errors():
  params = sum_params()
  assert allocation.allocate_sparsities(params, 0.5, method="uniform") == (
      distribution.uniform_sparsities(params, 0.5))
  assert allocation.allocate_sparsities(params, 0.5, method="erk") == (
      distribution.erk_sparsities(params, 0.5))
  # The values themselves: round(0.5 * 35) = 18 entries pruned in both; uniform splits them
  # 10 + 8, ERK prunes the larger (4, 5) kernel more (11 + 7) and leaves the bias dense.
  uniform = allocation.allocate_sparsities(params, 0.5, method="uniform")
  erk = allocation.allocate_sparsities(params, 0.5, method="erk")
  assert uniform == {"a": {"kernel": 10 / 20}, "b": {"kernel": 8 / 15}, "bias": 0.0}
  assert erk == {"a": {"kernel": 11 / 20}, "b": {"kernel": 7 / 15}, "bias": 0.0}
  with pytest.raises(ValueError, match="budget"):
    allocation.allocate_sparsities(params, 0.5, method="erk", budget="flops")
  with pytest.raises(ValueError, match="method"):
    allocation.allocate_sparsities(params, 0.5, method="greedy")
  with pytest.raises(ValueError, match="sensitivity"):
    allocation.allocate_sparsities(params, 0.5)
  with pytest.raises(ValueError, match="target"):
    allocation.allocate_sparsities(params, 1.2, sensitivity=synthetic())
  # Only 'a' analysed: at most 20 of 35 entries can go.
  only_a = sens_lib.SensitivityResult((A,), (20,), np.array([0.0, 1.0]), np.array([[1.0, 0.0]]),
                                      1.0)
  with pytest.raises(ValueError, match="target"):
    allocation.allocate_sparsities(params, 0.9, sensitivity=only_a)


def test_allocation_never_prunes_into_a_nan_metric():
  params = sum_params()
  grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  metrics = np.array([[1.0, 1.0, 0.99, 0.98, 0.5],
                      [1.0, 0.99, 0.98, np.nan, np.nan]])  # 'b' diverges from 75% on
  sens = sens_lib.SensitivityResult((A, B_), (20, 15), grid, metrics, 1.0)
  # 24 of 35 entries: 'a' cannot give them all, 'b' may give at most 7 (its 50% point).
  alloc = allocation.allocate_sparsities(params, 0.7, sensitivity=sens)
  counts = (round(alloc["a"]["kernel"] * 20), round(alloc["b"]["kernel"] * 15))
  assert sum(counts) == 24 and counts[1] <= 7
  with pytest.raises(ValueError, match=r"NaN metric limits \['b'\]\['kernel'\] \(up to "
                                       r"sparsity 0.4667\)"):
    allocation.allocate_sparsities(params, 0.9, sensitivity=sens)  # 32 > 20 + 7
  # NaN everywhere but the dense point: nothing may be taken from 'b' at all.
  metrics[1, 1:] = np.nan
  sens = sens._replace(metrics=metrics)
  assert allocation.allocate_sparsities(params, 0.5, sensitivity=sens)["b"]["kernel"] == 0.0
  with pytest.raises(ValueError, match=r"\['b'\]\['kernel'\] \(up to sparsity 0\)"):
    allocation.allocate_sparsities(params, 0.6, sensitivity=sens)


def test_as_overrides():
  alloc = {"a": {"kernel": 0.75}, "b": {"kernel": 0.0}, "bias": 0.0}
  assert allocation.as_overrides(alloc) == {A: 0.75}
  over = allocation.as_overrides(alloc, lambda s: ("sched", s))
  assert over == {A: ("sched", 0.75)}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=4), st.integers(0, 2**31 - 1),
       st.floats(0.0, 1.0))
@example(sizes=[41], seed=0, target=0.4647741007257954)  # a float remainder after a full segment
def test_allocation_exact_property(sizes, seed, target):
  rng = np.random.default_rng(seed)
  params = {f"l{i}": jnp.zeros((n, 1)) for i, n in enumerate(sizes)}
  grid = np.linspace(0.0, 1.0, 5)
  damage = np.cumsum(rng.random((len(sizes), 5)), axis=1) * (grid > 0)  # any monotone shape
  paths = tuple(f"['l{i}']" for i in range(len(sizes)))
  sens = sens_lib.SensitivityResult(paths, tuple(sizes), grid, 1.0 - damage, 1.0)
  alloc = allocation.allocate_sparsities(params, target, sensitivity=sens)
  counts = [round(alloc[f"l{i}"] * n) for i, n in enumerate(sizes)]
  assert all(0 <= k <= n for k, n in zip(counts, sizes))
  assert sum(counts) == round(target * sum(sizes))
  # flops-like budget with unequal per-entry costs: met, overshoot below one entry's cost
  costs = rng.integers(1, 5, size=len(sizes)).astype(float)
  rep = report_lib.Report(rows=tuple(
      report_lib.LeafReport(p, (n, 1), "float32", True, n, n, 0.0, 4 * n, 0, 0, c * n, c * n)
      for p, n, c in zip(paths, sizes, costs)), flops_dense=float(costs @ sizes),
      flops_effective=float(costs @ sizes))
  alloc = allocation.allocate_sparsities(params, target, sensitivity=sens, budget="flops",
                                         report=rep)
  saved = sum(round(alloc[f"l{i}"] * n) * c for i, (n, c) in enumerate(zip(sizes, costs)))
  assert target * rep.flops_dense - 1e-6 <= saved < target * rep.flops_dense + costs.max()


def test_allocation_feeds_prune_transform():
  import optax
  params = sum_params()
  alloc = allocation.allocate_sparsities(params, 0.6, sensitivity=synthetic())
  given = lambda p, target, *, prunable: alloc
  tx = optax.chain(optax.sgd(0.0), jp.prune(0.6, distribution=given))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  assert int((new["a"]["kernel"] == 0).sum()) == 15 and int((new["b"]["kernel"] == 0).sum()) == 6
  assert allocation.as_overrides(alloc) == {A: 0.75, B_: 0.4}
