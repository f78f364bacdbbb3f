"""The README's code runs as written and does what its comments say."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_runs():
  block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"dense": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
            "out": {"kernel": jax.random.normal(k2, (16, 3)), "bias": jnp.zeros(3)}}

  def loss_fn(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 3), -1))

  scope = {"params": params, "loss_fn": loss_fn}
  exec(block, scope)  # noqa: S102 - the README's own code
  pruned = scope["params"]
  assert float(jp.sparsity(pruned)) == np.float32(round(0.9 * 176)) / np.float32(176)
  # the gradual part: run the README's step through its whole schedule
  step, state = scope["step"], scope["state"]
  batch = (jax.random.normal(jax.random.key(1), (4, 8)), jnp.array([0, 1, 2, 0]))
  p = params
  for _ in range(1001):
    p, state = step(p, state, batch)
  masks = state[1].masks
  for k in ("dense", "out"):
    m, w = np.asarray(masks[k]["kernel"]), np.asarray(p[k]["kernel"])
    assert int((~m).sum()) == round(0.9 * w.size)  # exact target at end_step
    assert np.all(w[~m] == 0.0)                     # exactly zero wherever pruned
    assert np.all(np.asarray(masks[k]["bias"]))     # biases stay dense


def test_readme_oneshot_snippet_runs():
  import flax.linen as nn
  import optax

  block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
  x = jax.random.normal(jax.random.key(0), (64, 12))
  params = model.init(jax.random.key(1), x)["params"]
  scope = {"params": params, "model": model, "calibration_batches": [x[:32], x[32:]],
           "jp": jp, "optax": optax}
  exec(block, scope)  # noqa: S102 - the README's own code
  n = sum(int(np.size(w["kernel"])) for w in params.values())
  kept = sum(int(np.sum(m["kernel"])) for m in scope["masks"].values())
  assert n - kept == round(0.9 * n)
  for w in scope["sparse24"].values():
    groups = (np.asarray(w["kernel"]) != 0).reshape(-1, 4, w["kernel"].shape[1])
    assert np.all(groups.sum(axis=1) <= 2)
  assert isinstance(scope["tx"], optax.GradientTransformation)
