"""jp.prune's in-step Hessian diagonals: the exact Gauss–Newton one against the one-shot one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune._src import schedules

N, D, H, C = 16, 6, 8, 3


def _rand(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


PARAMS = {"l1": {"kernel": _rand(0, (D, H)), "bias": _rand(1, (H,))},
          "l2": {"kernel": _rand(2, (H, C)), "bias": _rand(3, (C,))}}
BATCHES = [_rand(10 + i, (N, D)) for i in range(3)]


def apply_fn(params, x):
  hidden = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  return hidden @ params["l2"]["kernel"] + params["l2"]["bias"]


def _zeros(params):
  return jax.tree.map(jnp.zeros_like, params)


def _step(tx, jit=True, traces=None):
  def step(params, state, batch):
    if traces is not None:
      traces.append(1)
    return tx.update(_zeros(params), state, params, apply_fn=apply_fn, batch=batch)
  return jax.jit(step) if jit else step


@pytest.mark.parametrize("score, scope, loss", [("obd", "layer", "softmax_cross_entropy"),
                                                ("curvature", "global", "mse")])
def test_in_step_gauss_newton_scores_equal_the_one_shot_diagonal(score, scope, loss):
  tx = jp.prune(0.5, score, scope=scope, hessian="gauss_newton", gauss_newton_loss=loss)
  state0 = tx.init(PARAMS)
  got = {}
  for jit in (True, False):
    got[jit] = _step(tx, jit)(PARAMS, state0, BATCHES[0])
  jax.tree.map(np.testing.assert_array_equal, got[True], got[False])
  updates, state = got[True]

  diag = jp.gauss_newton_diag(apply_fn, PARAMS, [BATCHES[0]], loss=loss)
  scores = jp.obd(PARAMS, diag) if score == "obd" else jp.curvature(diag)
  want = jp.unstructured_mask(scores, 0.5, scope=scope)
  jax.tree.map(np.testing.assert_array_equal, state.masks, want)
  kernels = [state.masks["l1"]["kernel"], state.masks["l2"]["kernel"]]
  if scope == "layer":
    assert [int((~m).sum()) for m in kernels] == [24, 12]   # round(0.5 * 48), round(0.5 * 24)
  else:
    assert sum(int((~m).sum()) for m in kernels) == 36       # round(0.5 * 72)
  assert bool(state.masks["l1"]["bias"].all()) and bool(state.masks["l2"]["bias"].all())
  # Pruned weights land on exactly zero; no probes, so the key does not move.
  pruned = optax.apply_updates(PARAMS, updates)
  assert float(jp.sparsity(pruned)) == 0.5
  np.testing.assert_array_equal(state.key, state0.key)


def test_average_hessian_averages_the_gauss_newton_diagonals_without_retrace():
  tx = jp.prune(schedules.one_shot_schedule(0.5, step=2), "obd", hessian="gauss_newton",
                average_hessian=True)
  traces = []
  step = _step(tx, traces=traces)
  state = tx.init(PARAMS)
  diags = [jp.gauss_newton_diag(apply_fn, PARAMS, [b]) for b in BATCHES]
  for i, batch in enumerate(BATCHES[:2]):
    _, state = step(PARAMS, state, batch)
    assert int(state.hess_steps) == i + 1
  for name in ("l1", "l2"):
    np.testing.assert_allclose(state.hess_sum[name]["kernel"],
                               diags[0][name]["kernel"] + diags[1][name]["kernel"], rtol=1e-6)
    assert state.hess_sum[name]["bias"].shape == ()   # unprunable: a scalar placeholder
  assert all(bool(m.all()) for m in jax.tree.leaves(state.masks))

  _, state = step(PARAMS, state, BATCHES[2])
  mean = jax.tree.map(lambda a, b, c: (a + b + c) / 3, *diags)
  want = jp.unstructured_mask(jp.obd(PARAMS, mean), 0.5)
  jax.tree.map(np.testing.assert_array_equal, state.masks, want)
  assert int(state.hess_steps) == 0 and len(traces) == 1


def test_callable_score_receives_apply_fn():
  def score(params, *, apply_fn, batch):
    return jp.obd(params, jp.gauss_newton_diag(apply_fn, params, [batch]))

  tx = jp.prune(0.5, score)
  _, state = tx.update(_zeros(PARAMS), tx.init(PARAMS), PARAMS, apply_fn=apply_fn,
                       batch=BATCHES[1])
  want = jp.unstructured_mask(score(PARAMS, apply_fn=apply_fn, batch=BATCHES[1]), 0.5)
  jax.tree.map(np.testing.assert_array_equal, state.masks, want)


def test_missing_inputs_and_bad_options_rejected():
  tx = jp.prune(0.5, "obd", hessian="gauss_newton")
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"^apply_fn: expected a function \(params, batch\) -> "
                                       r"logits passed to update for score='obd', got None"):
    tx.update(_zeros(PARAMS), state, PARAMS, batch=BATCHES[0])
  with pytest.raises(ValueError, match=r"^batch: expected the batch of apply_fn passed to "
                                       r"update for score='obd', got None"):
    tx.update(_zeros(PARAMS), state, PARAMS, apply_fn=apply_fn)
  with pytest.raises(ValueError, match=r"^loss_fn: expected a loss function passed to update "
                                       r"for score='curvature', got None"):
    tx = jp.prune(0.5, "curvature")
    tx.update(_zeros(PARAMS), tx.init(PARAMS), PARAMS, apply_fn=apply_fn, batch=BATCHES[0])
  with pytest.raises(ValueError, match=r"^hessian: expected one of \('hutchinson', "
                                       r"'gauss_newton'\), got 'exact'"):
    jp.prune(0.5, "obd", hessian="exact")
  with pytest.raises(ValueError, match=r"^hessian: expected 'hutchinson' unless score is one of "
                                       r"\('obd', 'curvature'\), got 'gauss_newton'"):
    jp.prune(0.5, "magnitude", hessian="gauss_newton")
  with pytest.raises(ValueError, match=r"^gauss_newton_loss: expected one of "
                                       r"\('softmax_cross_entropy', 'mse'\), got 'l1'"):
    jp.prune(0.5, "obd", hessian="gauss_newton", gauss_newton_loss="l1")
  with pytest.raises(ValueError, match=r"^gauss_newton_loss: expected 'softmax_cross_entropy' "
                                       r"unless hessian='gauss_newton', got 'mse'"):
    jp.prune(0.5, "obd", gauss_newton_loss="mse")
