"""Logger scalars from a pruning state: values, names shared with `Report.to_dict`, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune._src import scalars


def setup():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                  "bias": jnp.zeros(5)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
            "empty": jnp.zeros((0, 3))}
  tx = optax.chain(optax.sgd(0.1), jp.prune(0.6, overrides={"['b']['kernel']": 0.2}))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  return optax.apply_updates(params, updates), state


def test_values_and_names_match_the_report():
  params, state = setup()
  eager = scalars.prune_scalars(state, params)
  assert list(eager) == ["prune/step", "prune/target", "sparsity/total", "sparsity/a/kernel",
                         "sparsity/b/kernel", "sparsity/empty"]
  assert int(eager["prune/step"]) == 1 and float(eager["prune/target"]) == np.float32(0.6)
  # round(0.6 * 20) = 12 and round(0.2 * 15) = 3 pruned; the empty leaf counts as 0.0.
  assert float(eager["sparsity/a/kernel"]) == np.float32(12 / 20)
  assert float(eager["sparsity/b/kernel"]) == np.float32(3 / 15)
  assert float(eager["sparsity/empty"]) == 0.0
  assert float(eager["sparsity/total"]) == np.float32(15 / 35)
  logged = jax.device_get(eager)
  for key, value in jp.report(params, masks=state).to_dict().items():
    if key.startswith("sparsity/"):
      assert logged[key] == np.float32(value), key


def test_jit_equals_eager_and_prunable_rule():
  params, state = setup()
  eager = scalars.prune_scalars(state, params)
  jitted = jax.jit(scalars.prune_scalars)(state, params)
  assert jax.tree.map(lambda a, b: bool(a == b), eager, jitted) == {k: True for k in eager}
  only_a = scalars.prune_scalars(state, params,
                                 prunable=lambda path, x: "a" in jax.tree_util.keystr(path)
                                 and x.ndim == 2)
  assert set(only_a) == {"prune/step", "prune/target", "sparsity/total", "sparsity/a/kernel"}
  assert float(only_a["sparsity/total"]) == np.float32(0.6)
