"""jp.prune: exact sparsity, exact zeros, monotone masks, scores, scopes, distributions."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from jaxprune._src import distribution, schedules, select
from jaxprune._src import masks as jp_masks
from jaxprune._src.policy import NMPattern
from jaxprune._src.transform import prune


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense1": {"kernel": jnp.asarray(rng.normal(size=(20, 30)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=(30,)), jnp.float32)},
      "dense2": {"kernel": jnp.asarray(rng.normal(size=(30, 7)), jnp.float32),
                 "bias": jnp.zeros((7,), jnp.float32)},
  }


def _grads(params, step):
  # Deterministic, non-zero, sign-varying pseudo-gradients: every weight keeps being pushed.
  return jax.tree.map(lambda x: jnp.cos(x * 3.0 + step) + 0.1, params)


def _prune_state(state):
  found = optax.tree_utils.tree_get_all_with_path(state, "PruneState")
  assert len(found) == 1
  return found[0][1]


def _make_step(tx, extra=None, traces=None):
  extra = extra or (lambda p, g: {})

  def step(params, state, t):
    if traces is not None:
      traces.append(t)
    g = _grads(params, t)
    updates, state = tx.update(g, state, params, **extra(params, g))
    return optax.apply_updates(params, updates), state

  return step


def _run(tx, params, steps, *, jit=True, extra=None, record=False, traces=None):
  step = _make_step(tx, extra, traces)
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  history = []
  for t in range(steps):
    params, state = step(params, state, jnp.float32(t))
    if record:
      history.append((params, _prune_state(state).masks))
  return params, state, history


def _ref_mask(scores, sparsity):
  """numpy reference of a layer-scope mask: the round(s*n) lowest scores of each kernel pruned,
  ties to the later entry; leaves with ndim < 2 all kept."""
  def one(x):
    x = np.asarray(x)
    if x.ndim < 2:
      return np.ones(x.shape, bool)
    return reference.unit_keep(x.reshape(-1), sparsity).reshape(x.shape)
  return jax.tree.map(one, scores)


SCHED = schedules.polynomial_schedule(0.0, 0.9, begin_step=0, end_step=12, frequency=5)


@pytest.fixture(scope="module")
def adamw_run():
  """chain(adamw, prune) for 12 steps + 100 more: history of params and masks, trace count."""
  tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), prune(SCHED))
  traces = []
  params, state, history = _run(tx, _params(), 13 + 100, record=True, traces=traces)
  return traces, params, state, history


def test_exact_layer_sparsity_at_end_step(adamw_run):
  _, _, _, history = adamw_run
  params, masks = history[12]  # the update at count == end_step has been applied
  for name in ("dense1", "dense2"):
    k = params[name]["kernel"]
    want = round(0.9 * k.size)
    assert int(jnp.sum(~masks[name]["kernel"])) == want
    assert int(jnp.sum(k == 0)) == want
    assert bool(jnp.all(masks[name]["bias"]))
  # Before the end step it was not yet at the target (the schedule is gradual).
  params10, _ = history[10]
  assert int(jnp.sum(params10["dense1"]["kernel"] == 0)) < round(0.9 * 600)


def test_zeros_exact_on_every_step_and_forever_with_adamw(adamw_run):
  _, final, state, history = adamw_run
  previous = None
  for params, masks in history:
    for name in ("dense1", "dense2"):
      k, m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
      assert np.all(k[~m] == 0.0)  # including the step the mask changed
      assert not np.any(np.signbit(k[~m]))  # +0.0, not -0.0
      if previous is not None:
        assert not np.any(m & ~previous[name]["kernel"])  # monotone: never regrows
    previous = jax.tree.map(np.asarray, masks)
  # 100 adamw steps after the end step, with non-zero gradients and weight decay: still zero.
  m = _prune_state(state).masks
  for name in ("dense1", "dense2"):
    assert int(jnp.sum(final[name]["kernel"] == 0)) == round(0.9 * final[name]["kernel"].size)
    assert bool(jnp.all(jnp.where(m[name]["kernel"], True, final[name]["kernel"] == 0)))
  assert float(_prune_state(state).target) == np.float32(0.9)
  assert int(_prune_state(state).count) == 113


def test_unprunable_leaves_follow_inner_optimizer_exactly(adamw_run):
  _, final, _, _ = adamw_run
  inner = optax.adamw(0.05, weight_decay=0.1)
  ref, _, _ = _run(inner, _params(), 113)
  for name in ("dense1", "dense2"):
    np.testing.assert_array_equal(final[name]["bias"], ref[name]["bias"])


def test_jit_equals_no_jit():
  # prune alone, fed the same updates; apply_updates outside so only the transform is compared.
  tx = prune(schedules.polynomial_schedule(0.2, 0.7, 1, 2, 1), "taylor")
  results = []
  for update in (jax.jit(tx.update), tx.update):
    params, state, outs = _params(), tx.init(_params()), []
    for t in range(3):  # mask updates at counts 1 and 2
      g = jax.tree.map(lambda x, t=t: jnp.asarray(np.cos(np.asarray(x) * 3 + t), jnp.float32),
                       params)
      u, state = update(g, state, params, grad=g)
      params = jax.tree.map(lambda p, d: np.asarray(p) + np.asarray(d), params, u)
      outs.append((u, state))
    results.append(outs)
  for (ua, sa), (ub, sb) in zip(*results):
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
  assert int(jnp.sum(~results[0][-1][1].masks["dense1"]["kernel"])) == 420  # 0.7 * 600


def test_no_retrace_across_mask_updates(adamw_run):
  traces, _, _, _ = adamw_run
  assert len(traces) == 1  # one trace for 113 steps, mask updates at counts 5, 10 and 12


def test_global_scope_exact_total():
  tx = optax.chain(optax.sgd(0.01), prune(0.75, scope="global"))
  params, state, _ = _run(tx, _params(), 2)
  n = 600 + 210
  zeros = sum(int(jnp.sum(params[k]["kernel"] == 0)) for k in ("dense1", "dense2"))
  assert zeros == round(0.75 * n)
  # Global by magnitude: every pruned weight of the first step's params is below every kept one.
  m = _prune_state(state).masks
  p0 = _params()
  pruned = np.concatenate([np.abs(p0[k]["kernel"])[~m[k]["kernel"]] for k in ("dense1", "dense2")])
  kept = np.concatenate([np.abs(p0[k]["kernel"])[m[k]["kernel"]] for k in ("dense1", "dense2")])
  assert pruned.max() <= kept.min()


def test_magnitude_mask_equals_core_mask_and_constant_schedule(check_jit_eager):
  p0 = _params()
  tx = prune(0.5)  # constant: prunes at the first step
  updates, state = check_jit_eager(tx.update, jax.tree.map(jnp.zeros_like, p0), tx.init(p0), p0)
  want = _ref_mask(jax.tree.map(jnp.abs, p0), 0.5)
  jax.tree.map(np.testing.assert_array_equal, state.masks, want)
  new = optax.apply_updates(p0, updates)
  np.testing.assert_array_equal(new["dense1"]["kernel"],
                                jnp.where(want["dense1"]["kernel"], p0["dense1"]["kernel"], 0))


def test_taylor_and_gradient_scores_use_grads_extra_arg():
  p0 = _params()
  g = _grads(p0, 0.0)
  for name, fn in [("taylor", lambda: jax.tree.map(lambda w, x: jnp.abs(w * x), p0, g)),
                   ("gradient", lambda: jax.tree.map(jnp.abs, g))]:
    tx = prune(0.6, name)
    _, state = jax.jit(tx.update)(g, tx.init(p0), p0, grad=g)
    want = _ref_mask(fn(), 0.6)
    jax.tree.map(np.testing.assert_array_equal, state.masks, want)
    for extra in ({}, {"grads": g}):  # one spelling: grad=
      with pytest.raises(ValueError, match=r"^grad: expected the raw gradients passed to update "):
        tx.update(g, tx.init(p0), p0, **extra)


def _quadratic(params, batch):
  # Hessian is diagonal with entries `batch`: Hutchinson with Rademacher probes is then exact.
  return 0.5 * sum(jnp.sum(c * w**2) for c, w in zip(jax.tree.leaves(batch),
                                                      jax.tree.leaves(params)))


# Estimating only on update steps is the default path; the averaged one runs the same estimator
# every step, so the fast suite keeps that one and the other runs with -m slow.
@pytest.mark.parametrize("average", [pytest.param(False, marks=pytest.mark.slow), True])
def test_obd_score_from_loss_fn_and_batch(average):
  p0 = _params()
  curv = jax.tree.map(lambda x: jnp.abs(jnp.sin(7 * x)) + 0.01, p0)
  tx = prune(schedules.one_shot_schedule(0.5, step=2), "obd", average_hessian=average,
             num_probes=2)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p,
                                        loss_fn=_quadratic, batch=curv))
  state = tx.init(p0)
  for _ in range(3):
    _, state = step(p0, state)
  want = _ref_mask(
      jax.tree.map(lambda w, c: 0.5 * c * w**2, p0, curv), 0.5)
  jax.tree.map(np.testing.assert_array_equal, state.masks, want)
  if average:
    assert int(state.hess_steps) == 0  # reset at the update (count 2)
  with pytest.raises(ValueError, match="loss_fn"):
    tx.update(p0, tx.init(p0), p0)


def test_random_score_exact_count_and_seeded():
  p0 = _params()
  tx = prune(0.3, "random", seed=0)
  update = jax.jit(tx.update)
  masks = []
  # The seed only enters through the initial key: prune(seed=1).init gives PRNGKey(1).
  for key in (jax.random.PRNGKey(0), jax.random.PRNGKey(0), jax.random.PRNGKey(1)):
    _, state = update(p0, tx.init(p0)._replace(key=key), p0)
    assert int(jnp.sum(~state.masks["dense1"]["kernel"])) == 180
    masks.append(np.asarray(state.masks["dense1"]["kernel"]))
  np.testing.assert_array_equal(tx.init(p0).key, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(prune(0.3, "random", seed=1).init(p0).key, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(masks[0], masks[1])
  assert not np.array_equal(masks[0], masks[2])


def test_callable_score_receives_extra_args():
  p0 = {"dense2": {"kernel": _params()["dense2"]["kernel"]}}
  seen = {}

  def largest_first(params, **extra):
    seen.update(extra)
    return jax.tree.map(lambda x: -jnp.abs(x), params)

  tx = prune(0.5, largest_first)
  _, state = jax.jit(tx.update)(p0, tx.init(p0), p0, foo=3)
  assert set(seen) == {"foo"}
  k, m = np.abs(p0["dense2"]["kernel"]), np.asarray(state.masks["dense2"]["kernel"])
  assert k[~m].min() >= k[m].max()


def test_erk_distribution_counts():
  p0 = _params()
  tx = optax.chain(optax.sgd(0.0), prune(0.8, distribution="erk"))
  params, _, _ = _run(tx, p0, 1)
  want = distribution.erk_sparsities(p0, 0.8)
  for name in ("dense1", "dense2"):
    k = params[name]["kernel"]
    assert abs(int(jnp.sum(k == 0)) - want[name]["kernel"] * k.size) <= 1.0
  assert want["dense2"]["kernel"] < want["dense1"]["kernel"]  # the smaller layer stays denser


def test_callable_distribution_and_overrides():
  p0 = _params()
  half = lambda params, target, *, prunable: jax.tree.map(lambda _: target / 2, params)
  over = {"['dense2']['kernel']": schedules.one_shot_schedule(0.5, step=1)}
  for kwargs, first in [({"distribution": half}, 270), ({"scope": "global"}, 540)]:
    tx = prune(0.9, overrides=over, **kwargs)
    update = jax.jit(tx.update)
    state = tx.init(p0)
    _, state = update(p0, state, p0)
    assert int(jnp.sum(~state.masks["dense1"]["kernel"])) == first
    assert int(jnp.sum(~state.masks["dense2"]["kernel"])) == 0
    _, state = update(p0, state, p0)  # the override's own schedule changes at count 1
    assert int(jnp.sum(~state.masks["dense1"]["kernel"])) == first
    assert int(jnp.sum(~state.masks["dense2"]["kernel"])) == 105
  with pytest.raises(ValueError, match=r"^overrides: expected keys that are leaf paths"):
    prune(0.5, overrides={"['nope']": 0.1}).init(p0)
  with pytest.raises(ValueError, match=r"^overrides: expected overrides of prunable leaves only"):
    prune(0.5, overrides={"['dense1']['bias']": 0.1}).init(p0)


def test_iterative_and_decreasing_schedule_stay_monotone():
  p0 = _params()
  sched = schedules.iterative_schedule(0.5, every=2, rounds=3)
  tx = optax.chain(optax.sgd(0.05), prune(sched))
  _, _, history = _run(tx, p0, 6, record=True)
  counts = [int(jnp.sum(~m["dense1"]["kernel"])) for _, m in history]
  assert counts == [300, 300, 450, 450, 525, 525]  # 1 - 0.5**r of 600
  down = prune(lambda t: jnp.where(t < 1, 0.6, 0.2))
  state = down.init(p0)
  update = jax.jit(down.update)
  _, state = update(p0, state, p0)
  _, state2 = update(p0, state, p0)
  jax.tree.map(np.testing.assert_array_equal, state2.masks, state.masks)


def test_live_nan_scores_never_resurrect_pruned_entries():
  p0 = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
  sched = lambda t: jnp.where(t < 1, 0.3, 0.5)
  nan_first = lambda params: jax.tree.map(lambda x: jnp.where(x > 8, jnp.nan, x), params)
  tx = prune(sched, lambda params, **_: nan_first(params))
  state = tx.init(p0)
  _, state = jax.jit(tx.update)(p0, state, p0)
  # NaN (9, 10) rank lowest: pruned with 1 at 30%.
  np.testing.assert_array_equal(~state.masks["w"].reshape(-1),
                                [1, 0, 0, 0, 0, 0, 0, 0, 1, 1])
  _, state = jax.jit(tx.update)(p0, state, p0)
  np.testing.assert_array_equal(~state.masks["w"].reshape(-1),
                                [1, 1, 1, 0, 0, 0, 0, 0, 1, 1])


def test_live_nan_scores_keep_the_count_exact():
  # From step 1 the scores of 6..10 are NaN: live entries at later positions than the pruned
  # ones. Were they ranked as NaN they would tie with the pruned entries and, being later, go
  # first; prune ranks live NaN as -inf, so exactly round(0.5 * 10) = 5 entries end up pruned.
  p0 = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
  sched = lambda t: jnp.where(t < 1, 0.3, 0.5)
  nan_later = lambda params, step, **_: jax.tree.map(
      lambda x: jnp.where((step >= 1) & (x > 5), jnp.nan, x), params)
  tx = prune(sched, nan_later)
  state = tx.init(p0)
  update = jax.jit(tx.update)
  _, state = update(p0, state, p0, step=0)
  np.testing.assert_array_equal(~state.masks["w"].reshape(-1), [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
  _, state = update(p0, state, p0, step=1)
  np.testing.assert_array_equal(~state.masks["w"].reshape(-1), [1, 1, 1, 0, 0, 0, 0, 0, 1, 1])


def test_constant_sparsity_out_of_range_rejected_for_arrays_too():
  for bad in (1.5, jnp.float32(1.5), np.float32(np.nan)):
    with pytest.raises(ValueError, match="schedule: expected a fraction in"):
      prune(bad)


def test_validation_errors():
  p0 = _params()
  with pytest.raises(ValueError, match=r"^score: expected one of \('magnitude', 'gradient', "
                                       r"'taylor', 'obd', 'curvature', 'random'\), got 'hessian'"):
    prune(0.5, "hessian")
  with pytest.raises(ValueError, match="scope"):
    prune(0.5, scope="net")
  with pytest.raises(ValueError, match="distribution"):
    prune(0.5, scope="global", distribution="erk")
  with pytest.raises(ValueError, match="schedule"):
    prune(1.5)
  tx = prune(0.5)
  with pytest.raises(ValueError, match="params"):
    tx.update(p0, tx.init(p0))
  with pytest.raises(ValueError, match=r"\['dense1'\]\['kernel'\]"):
    prune(0.5, prunable=lambda path, x: True).init(
        {"dense1": {"kernel": jnp.ones((2, 2), jnp.int32)}})


@pytest.mark.parametrize("score, scope", [("magnitude", "layer"), ("taylor", "global")])
def test_mask_update_adds_no_parameter_sized_scratch(score, scope):
  # The scores are recomputed chunk by chunk inside the selection: the compiled update's
  # temporaries (one chunk's keys and bins, and the old masks while the new ones are written)
  # stay a few MiB although one score array of this kernel alone takes 4 MiB (parameter-sized
  # temporaries slow every step on XLA:CPU). A step without mask update copies no mask: the
  # masks stay in their (donated) buffers.
  params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
            "b": jax.ShapeDtypeStruct((1024,), jnp.float32)}
  tx = optax.chain(optax.adam(1e-3), prune(0.5, score, scope=scope))
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p, grad=g)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * 2**20, temp / 2**20
  hlo = compiled.as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  assert not re.search(r"= pred\[1024,1024\]\S* copy\(", entry)
  assert re.search(r"= pred\[1024,1024\]\S* copy\(", hlo)  # in the update branch only


def test_chunked_mask_updates_on_large_kernels_match_reference(monkeypatch):
  # A kernel spanning several selection chunks (4096 entries here; shapes used by no other test,
  # so no selection compiled with the default chunk is reused), with exact ties: two mask
  # updates, the second ranking the already-pruned entries first (monotone), in both scopes.
  monkeypatch.setattr(select, "_CHUNK", 4096)
  rng = np.random.default_rng(7)
  params = {"big": jnp.asarray(rng.integers(-40, 41, size=(150, 121)), jnp.float32),
            "small": jnp.asarray(rng.normal(size=(30, 20)), jnp.float32)}
  sched = schedules.polynomial_schedule(0.0, 0.8, begin_step=0, end_step=2, frequency=1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for scope in ("layer", "global"):
    tx = prune(sched, scope=scope)
    update = jax.jit(tx.update)
    state, p = tx.init(params), params
    for step in range(3):
      updates, state = update(zeros, state, p)
      p = optax.apply_updates(p, updates)
      s = float(sched(step))
      abs_p = {k: np.abs(np.asarray(v)) for k, v in p.items()}
      if scope == "layer":
        want = {k: reference.unit_keep(abs_p[k].ravel(), s).reshape(v.shape)
                for k, v in p.items()}
      else:
        n = sum(v.size for v in abs_p.values())
        names = sorted(abs_p)  # leaf order of the dict
        pruned = reference.prune_lowest([abs_p[k] for k in names], round(s * n))
        want = {k: ~m for k, m in zip(names, pruned)}
      for k in params:
        np.testing.assert_array_equal(np.asarray(state.masks[k]), want[k],
                                      err_msg=f"{scope} step {step} {k}")
        assert not np.asarray(p[k])[~want[k]].any()


def test_custom_mask_fn_receives_whole_score_arrays():
  # A mask function given as pattern gets arrays (not lazy Elementwise leaves): the ranked
  # scores, NaN where an entry is already pruned, and placeholder zeros on unprunable leaves.
  seen, types = [], []

  def by_entry(scores, sparsity, *, scope, prunable):
    types.append([isinstance(x, jax.Array) for x in jax.tree.leaves(scores)])
    jax.debug.callback(lambda s: seen.append(jax.tree.map(np.asarray, s)), scores)
    return jp_masks.unstructured_mask(scores, sparsity, scope=scope, prunable=prunable)

  p0 = _params()
  sched = schedules.polynomial_schedule(0.0, 0.5, begin_step=0, end_step=2, frequency=1)
  tx = prune(sched, pattern=by_entry)
  state = tx.init(p0)
  for _ in range(3):  # masks computed at steps 1 and 2 (the target is 0 at step 0)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, p0), state, p0)
  assert len(seen) == 2 and all(all(t) for t in types)
  kernel = seen[-1]["dense1"]["kernel"]
  pruned_before = ~np.asarray(_ref_mask(jax.tree.map(jnp.abs, p0), float(sched(1)))["dense1"]
                              ["kernel"])
  assert pruned_before.sum() == round(0.4375 * 600)
  np.testing.assert_array_equal(np.isnan(kernel), pruned_before)
  np.testing.assert_array_equal(kernel[~pruned_before],
                                np.abs(np.asarray(p0["dense1"]["kernel"]))[~pruned_before])
  np.testing.assert_array_equal(seen[-1]["dense1"]["bias"], np.zeros(30, np.float32))
  jax.tree.map(np.testing.assert_array_equal, state.masks,
               _ref_mask(jax.tree.map(jnp.abs, p0), 0.5))


def test_library_selections_read_lazy_scores():
  from jaxprune._src import policy, sharding
  assert policy.reads_elementwise(jp_masks.unstructured_mask)
  assert policy.reads_elementwise(functools.partial(sharding.sharded_unstructured_mask, mesh=None))
  assert not policy.reads_elementwise(lambda s, sp, **kw: s)


# --- edge cases and bad input ---------------------------------------------------------------


def test_size_zero_leaf_in_a_jitted_layer_scope_step():
  params = {"a": jnp.arange(1.0, 7.0).reshape(2, 3), "empty": jnp.zeros((0, 5)),
            "z": jnp.arange(1.0, 5.0).reshape(2, 2)}
  tx = prune(0.5)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                                      params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["a"], [[0, 0, 0], [4, 5, 6]])
  np.testing.assert_array_equal(new["z"], [[0, 0], [3, 4]])
  assert state.masks["empty"].shape == (0, 5)


def test_pruned_inf_and_nan_weights_need_the_masks_applied():
  # inf + u is inf or NaN for every u: no update zeroes it. Applying the state's masks after the
  # update (the documented one-liner) gives +0.0.
  params = {"w": jnp.array([[jnp.nan, 1.0, 2.0], [3.0, -jnp.inf, 4.0]])}
  tx = prune(0.5, lambda p, **_: {"w": jnp.array([[0.0, 5, 6], [7, 1, 8]])})
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  plain = optax.apply_updates(params, updates)
  assert np.isnan(plain["w"][0, 0]) and np.isnan(plain["w"][1, 1])
  fixed = jp_masks.apply_masks(optax.apply_updates(params, updates),
                               optax.tree_utils.tree_get(state, "masks"))
  np.testing.assert_array_equal(fixed["w"], [[0, 0, 2], [3, 0, 4]])
  assert not np.signbit(np.asarray(fixed["w"])).any()


def test_schedule_values_checked_at_init_and_clipped_or_ignored_in_the_step():
  p0 = _params()
  for bad in (1.5, float("nan")):
    with pytest.raises(ValueError, match=r"^schedule: expected a fraction in \[0, 1\], got"):
      prune(lambda t, bad=bad: jnp.float32(bad)).init(p0)
    with pytest.raises(ValueError, match=r"^overrides: expected a fraction in \[0, 1\], got"):
      prune(0.5, overrides={"['dense2']['kernel']": lambda t, bad=bad: jnp.float32(bad)}).init(p0)
  # Later steps are only known in the step: above 1 is clipped, NaN keeps the current masks.
  sched = lambda t: jnp.where(t == 0, 0.5, jnp.where(t == 1, jnp.nan, 1.5))
  tx = prune(sched)
  update = jax.jit(tx.update)
  state = tx.init(p0)
  counts = []
  for _ in range(3):
    _, state = update(p0, state, p0)
    counts.append(int(jnp.sum(~state.masks["dense1"]["kernel"])))
  assert counts == [300, 300, 600]


@pytest.mark.parametrize("bad, match", [
    ("0.5", r"^schedule: expected a fraction in \[0, 1\], got '0.5'\.$"),
    (None, r"^schedule: expected a fraction in \[0, 1\], got None\.$"),
    (jnp.ones(2), r"^schedule: expected a fraction in \[0, 1\], got shape \(2,\)\.$"),
])
def test_bad_sparsity_rejected_at_construction(bad, match):
  with pytest.raises(ValueError, match=match):
    prune(bad)


def test_options_checked_at_construction_numpy_integers_accepted():
  for bad in (0, 2.5, "4", True):
    with pytest.raises(ValueError, match=r"^num_probes: expected an integer >= 1, got"):
      prune(0.5, "obd", num_probes=bad)
  with pytest.raises(ValueError, match=r"^pattern: expected 'unstructured'"):
    prune(0.5, pattern="2:4")
  p0 = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
  tx = prune(0.5, "curvature", num_probes=np.int64(2), seed=np.int32(0))
  _, state = jax.jit(lambda p, s: tx.update(p, s, p, loss_fn=_quadratic, batch={"w": p["w"]}))(
      p0, tx.init(p0))
  # The Hessian of the quadratic is diagonal (= batch): curvature |h| = w prunes the low half.
  np.testing.assert_array_equal(state.masks["w"].ravel(), np.arange(8) >= 4)


def test_random_score_skips_integer_leaves_that_are_not_prunable():
  p0 = {"w": jnp.ones((4, 5)), "step": jnp.zeros((3, 3), jnp.int32)}
  tx = prune(0.4, "random")
  updates, state = jax.jit(tx.update)(p0, tx.init(p0), p0)
  assert int(jnp.sum(~state.masks["w"])) == 8 and bool(jnp.all(state.masks["step"]))
  np.testing.assert_array_equal(updates["step"], p0["step"])


def test_nm_pattern_switched_on_by_the_schedule():
  p0 = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)}
  tx = prune(schedules.one_shot_schedule(0.5, step=1), pattern=NMPattern(2, 4))
  update = jax.jit(tx.update)
  state = tx.init(p0)
  _, state = update(p0, state, p0)
  assert bool(jnp.all(state.masks["w"]))  # sparsity 0 before step 1: dense
  _, state = update(p0, state, p0)
  np.testing.assert_array_equal(state.masks["w"], reference.nm_keep(np.abs(p0["w"]), 2, 4, 0))


def test_given_masks_stand_for_the_step0_targets_overrides_included():
  # An override at a constant sparsity must not re-prune the given masks at the first step.
  params = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.arange(8.0, 0.0, -1.0).reshape(4, 2)}
  masks = {"a": jnp.array([[True, False, True, False], [True, False, True, False]]),
           "b": jnp.array([[True, True], [False, False], [True, True], [False, False]])}
  tx = prune(0.5, overrides={"['b']": 0.5}, masks=masks)
  state = tx.init(params)
  assert float(state.target) == 0.5 and [float(t) for t in state.override_targets] == [0.5]
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(state.masks[k]), np.asarray(masks[k]))
  new = optax.apply_updates(params, updates)
  assert int(jnp.sum(new["a"] == 0)) == 4 and int(jnp.sum(new["b"] == 0)) == 4
