"""Shared helpers for the benchmark scripts (not part of the library): timing, machine, MLP."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def machine() -> str:
  """One line naming the machine the figures come from."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"devices: {[str(d) for d in jax.devices()]}")


def best_time(fn: Callable[..., object], *args: object, repeats: int = 5,
              warmup: int = 1) -> float:
  """Minimum wall time of ``fn(*args)`` over ``repeats`` runs, after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def mlp_params(sizes: list[int], seed: int = 0) -> dict:
  """He-initialised MLP parameters: {'dense<i>': {'kernel', 'bias'}}."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return {f"dense{i}": {"kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a),
                        "bias": jnp.zeros((b,))}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean cross-entropy of a ReLU MLP built by `mlp_params`."""
  layers = [params[f"dense{i}"] for i in range(len(params))]
  h = x
  for layer in layers[:-1]:
    h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
  logits = h @ layers[-1]["kernel"] + layers[-1]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
