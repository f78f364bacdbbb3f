"""jp.prune and the penalties inside optax wrappers, Flax training loops, pytrees, and orbax."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

from jaxprune._src import penalties, schedules
from jaxprune._src.transform import prune

SCHED = schedules.polynomial_schedule(0.0, 0.8, begin_step=0, end_step=6, frequency=3)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense1": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)},
          "dense2": {"kernel": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}}


def _grads(params, t):
  return jax.tree.map(lambda x: jnp.sin(5.0 * x + t) + 0.2, params)


def _prune_states(state):
  return [s for _, s in optax.tree_utils.tree_get_all_with_path(state, "PruneState")]


def _kernel_zeros(params):
  return {k: int(jnp.sum(v["kernel"] == 0)) for k, v in params.items()}


def _run(tx, params, steps, grads_fn=_grads):
  @jax.jit
  def step(params, state, t):
    updates, state = tx.update(grads_fn(params, t), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(steps):
    params, state = step(params, state, jnp.float32(t))
  return params, state


def _assert_masked_zero(params, masks):
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    assert bool(jnp.all(jnp.where(m, True, p == 0)))


def test_inject_hyperparams_inner_and_prune_itself():
  tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=0.05), prune(SCHED))
  params, state = _run(tx, _params(), 8)
  assert _kernel_zeros(params) == {"dense1": 102, "dense2": 51}
  # Injecting the target itself: the schedule is evaluated by inject_hyperparams and prune sees
  # a new constant each step; masks follow it.
  tx = optax.chain(optax.adam(0.05),
                   optax.inject_hyperparams(prune, static_args=(
                       "num_probes", "seed", "average_hessian"))(schedule=SCHED))
  params, state = _run(tx, _params(), 8)
  assert _kernel_zeros(params) == {"dense1": 102, "dense2": 51}
  assert float(state[1].hyperparams["schedule"]) == np.float32(0.8)


def test_inject_hyperparams_proximal_strength():
  tx = optax.inject_hyperparams(penalties.proximal_l1)(strength=0.0, learning_rate=1.0)
  params = {"w": jnp.asarray([[0.5, -0.05], [0.2, 2.0]])}
  state = tx.init(params)
  state.hyperparams["strength"] = jnp.asarray(0.25)
  u, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, u)
  np.testing.assert_allclose(new["w"], [[0.25, 0.0], [0.0, 1.75]], atol=1e-7)


def test_multisteps():
  tx = optax.MultiSteps(optax.chain(optax.adam(0.05), prune(SCHED)), every_k_schedule=2)
  params, state = _run(tx, _params(), 16)  # 8 inner steps
  assert _kernel_zeros(params) == {"dense1": 102, "dense2": 51}
  inner = _prune_states(state.inner_opt_state)[0]
  assert int(inner.count) == 8
  _assert_masked_zero(params, inner.masks)


def test_masked_prunes_only_selected_leaves():
  sel = {"dense1": {"kernel": True, "bias": False}, "dense2": {"kernel": False}}
  tx = optax.chain(optax.adam(0.05), optax.masked(prune(SCHED), sel))
  params, _ = _run(tx, _params(), 8)
  assert _kernel_zeros(params) == {"dense1": 102, "dense2": 0}


def test_apply_if_finite_skips_nan_step_and_keeps_zeros():
  def grads_fn(params, t):
    g = _grads(params, t)
    return jax.tree.map(lambda x: jnp.where(t == 7.0, jnp.nan, x), g)

  tx = optax.apply_if_finite(optax.chain(optax.adam(0.05), prune(SCHED)), 3)
  params, state = _run(tx, _params(), 10, grads_fn)
  assert int(state.total_notfinite) == 1
  assert _kernel_zeros(params) == {"dense1": 102, "dense2": 51}
  assert int(_prune_states(state.inner_state)[0].count) == 9


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(32)(x)))


def test_flax_linen_train_state_loop():
  model = _MLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 10))
  y = jnp.argmax(x[:, :3], axis=1)
  variables = model.init(jax.random.PRNGKey(1), x)
  tx = optax.chain(optax.adam(1e-2), prune(SCHED))
  st = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  @jax.jit
  def train_step(st):
    def loss_fn(p):
      logits = st.apply_fn({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(st.params)
    return st.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(12):
    st, loss = train_step(st)
    losses.append(float(loss))
  p = st.params
  # Linen names submodules in construction order: Dense_0 is the (32, 3) output layer.
  assert int(jnp.sum(p["Dense_1"]["kernel"] == 0)) == round(0.8 * 320)
  assert int(jnp.sum(p["Dense_0"]["kernel"] == 0)) == round(0.8 * 96)
  assert int(jnp.sum(p["Dense_1"]["bias"] == 0)) < 32
  assert losses[-1] < losses[0]


class _NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(10, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_flax_nnx_optimizer_loop():
  model = _NNXMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 10))
  y = jnp.argmax(x[:, :3], axis=1)
  opt = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), prune(SCHED, "taylor")),
                      wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads, grad=nnx.state(grads, nnx.Param))
    return loss

  for _ in range(8):
    train_step(model, opt)
  assert int(jnp.sum(model.l1.kernel[...] == 0)) == round(0.8 * 320)
  assert int(jnp.sum(model.l2.kernel[...] == 0)) == round(0.8 * 96)
  assert int(jnp.sum(model.l1.bias[...] == 0)) < 32


@chex.dataclass
class _ChexParams:
  w: jax.Array
  b: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DataclassParams:
  w: jax.Array
  extra: list


def test_plain_and_dataclass_pytrees():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(10,)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  params = {"list": [w, b, {"x": w2}], "tuple": (w, (b, w2)), "chex": _ChexParams(w=w, b=b),
            "dataclass": _DataclassParams(w=w, extra=[b, w2])}
  tx = optax.chain(optax.sgd(0.1), prune(0.5))
  new, _ = _run(tx, params, 3)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  for kind in params:
    assert jax.tree.structure(new[kind]) == jax.tree.structure(params[kind])
    for p in jax.tree.leaves(new[kind]):
      assert int(jnp.sum(p == 0)) == (round(0.5 * p.size) if p.ndim >= 2 else 0)
  assert isinstance(new["chex"], _ChexParams) and isinstance(new["dataclass"], _DataclassParams)


def test_orbax_checkpoint_mid_schedule_resumes_bitwise(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  sched = schedules.polynomial_schedule(0.1, 0.9, begin_step=2, end_step=12, frequency=3)
  tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), prune(sched, "random", seed=3))

  @jax.jit
  def step(params, state, t):
    updates, state = tx.update(_grads(params, t), state, params)
    return optax.apply_updates(params, updates), state

  def run(params, state, start, stop):
    for t in range(start, stop):
      params, state = step(params, state, jnp.float32(t))
    return params, state

  p0 = _params()
  full_params, full_state = run(p0, tx.init(p0), 0, 16)

  mid_params, mid_state = run(p0, tx.init(p0), 0, 7)
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  ckpt.save(path, {"params": mid_params, "opt_state": mid_state})
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": mid_params, "opt_state": mid_state})
  restored = ckpt.restore(path, abstract)
  r_params, r_state = run(restored["params"], restored["opt_state"], 7, 16)

  jax.tree.map(np.testing.assert_array_equal, r_params, full_params)
  jax.tree.map(np.testing.assert_array_equal, r_state, full_state)
  assert _kernel_zeros(r_params) == {"dense1": round(0.9 * 128), "dense2": round(0.9 * 64)}
