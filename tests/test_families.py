"""Model families: the recipes of docs/families.md, each trained a few steps with `jp.prune`.

Every family reaches an exact sparsity (``round(s * n)`` pruned entries per kernel, biases dense)
and its masks, found in the optimizer state, give the same `jp.report` as the zeros of the
trained parameters.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import jaxprune as jp
from jaxprune._src.scalars import prune_scalars

SPARSITY = 0.75
STEPS = 3


def schedule():
  # Two mask updates (steps 0 and 1), then fine-tuning with the masks fixed.
  return jp.polynomial_schedule(0.5, SPARSITY, 0, 1, frequency=1)


def batch(n_in=4, n_out=2, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(6, n_in)), jnp.float32),
          jnp.asarray(rng.normal(size=(6, n_out)), jnp.float32))


def check_exact(params, prunable_shapes):
  """Every kernel exactly at SPARSITY; every other leaf dense."""
  rows = {r.path: r for r in jp.report(params).rows}
  assert {p for p, r in rows.items() if r.prunable} == set(prunable_shapes)
  for path, shape in prunable_shapes.items():
    n = int(np.prod(shape))
    assert rows[path].shape == shape
    assert rows[path].count - rows[path].kept == round(SPARSITY * n), path


def check_report_round_trip(params, state, **flops):
  from_masks = jp.report(params, masks=state, **flops)
  from_zeros = jp.report(params, **flops)
  assert from_masks == from_zeros
  logged = jax.device_get(prune_scalars(state, params))
  expected = from_masks.to_dict()
  assert logged["prune/target"] == np.float32(SPARSITY) and logged["prune/step"] == STEPS
  for key, value in logged.items():
    if key.startswith("sparsity/"):
      assert value == np.float32(expected[key]), key
  return from_masks


def train(apply, params):
  """``STEPS`` jitted Adam steps on a squared error with `jp.prune` chained after Adam."""
  tx = optax.chain(optax.adam(1e-2), jp.prune(schedule()))
  opt_state = tx.init(params)
  x, y = batch()

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
  return params, opt_state, x


def test_dict_params():
  rng = np.random.default_rng(1)
  params = {"dense1": {"kernel": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
                       "bias": jnp.zeros(8)},
            "dense2": {"kernel": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
                       "bias": jnp.zeros(2)}}

  def apply(p, x):
    h = jax.nn.relu(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    return h @ p["dense2"]["kernel"] + p["dense2"]["bias"]

  params, opt_state, x = train(apply, params)
  check_exact(params, {"['dense1']['kernel']": (4, 8), "['dense2']['kernel']": (8, 2)})
  r = check_report_round_trip(params, opt_state, apply_fn=apply, inputs=(x,))
  assert r.flops_effective < r.flops_dense


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


def test_flax_linen_train_state():
  model = LinenMLP()
  x, y = batch()
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = optax.chain(optax.adam(1e-2), jp.prune(schedule()))
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  @jax.jit
  def step(state):
    loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  for _ in range(STEPS):
    state = step(state)
  check_exact(state.params, {"['hidden']['kernel']": (4, 8), "['out']['kernel']": (8, 2)})
  masks = jp.find_masks(state.opt_state, state.params)
  assert jax.tree.structure(masks) == jax.tree.structure(state.params)
  check_report_round_trip(state.params, state.opt_state,
                          apply_fn=lambda p, x: model.apply({"params": p}, x), inputs=(x,))


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_flax_nnx_optimizer():
  model = NNXMLP(nnx.Rngs(0))
  # Leaf paths carry no NNX `.value` suffix: overrides use the Linen spelling.
  tx = optax.chain(optax.adam(1e-2),
                   jp.prune(schedule(), overrides={"['out']['kernel']": SPARSITY}))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = batch()

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(STEPS):
    step(model, optimizer)
  params = nnx.state(model, nnx.Param)
  check_exact(params, {"['hidden']['kernel']": (4, 8), "['out']['kernel']": (8, 2)})
  masks = jp.find_masks(optimizer.opt_state, params)
  assert jax.tree.structure(masks) == jax.tree.structure(params)  # Param nodes, not OptVariable
  np.testing.assert_array_equal(masks["out"]["kernel"][...], params["out"]["kernel"][...] != 0)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  apply = lambda s, x: nnx.merge(graphdef, s, rest)(x)
  r = check_report_round_trip(state, optimizer.opt_state, apply_fn=apply, inputs=(x,))
  assert [row.path for row in r.prunable_rows] == ["['hidden']['kernel']", "['out']['kernel']"]


def test_equinox_filter():
  model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.PRNGKey(0))
  params, static = eqx.partition(model, eqx.is_array)
  apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  params, opt_state, x = train(apply, params)
  # Equinox weights are (out, in).
  check_exact(params, {".layers[0].weight": (8, 4), ".layers[1].weight": (2, 8)})
  r = check_report_round_trip(params, opt_state, apply_fn=apply, inputs=(x,))
  assert r.to_dict()["sparsity/layers/0/weight"] == SPARSITY
  # A tree of bools shaped like the model is a prunable tree, although the module is callable.
  only_first = jax.tree.map(lambda _: False, params)
  only_first = eqx.tree_at(lambda m: m.layers[0].weight, only_first, True)
  flags = jp.prunable_flags(params, only_first)
  assert jax.tree.leaves(flags) == [True, False, False, False]


def test_equinox_nm_along_input_axis():
  model = eqx.nn.MLP(8, 4, 8, 1, key=jax.random.PRNGKey(1))
  params = eqx.filter(model, eqx.is_array)
  scores = jp.magnitude(params)
  # The input axis of an (out, in) weight is -1; one compiled call makes both masks.
  masks, preset = jax.jit(lambda s: (jp.nm_mask(s, 2, 4, axis=-1),
                                     jp.hardware_mask(s, "gpu_2:4", axis=-1)))(scores)
  for layer in (0, 1):
    w = np.asarray(masks.layers[layer].weight)
    s = np.asarray(scores.layers[layer].weight).reshape(w.shape[0], -1, 4)
    groups = w.reshape(s.shape)
    np.testing.assert_array_equal(groups.sum(axis=-1), 2)
    top2 = np.argsort(-s, axis=-1)[..., :2]
    np.testing.assert_array_equal(np.take_along_axis(groups, top2, axis=-1), True)
    np.testing.assert_array_equal(preset.layers[layer].weight, w)
  assert bool(masks.layers[0].bias.all())
