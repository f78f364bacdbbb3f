"""Shared timing helpers for the benchmark scripts (not part of the library)."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax


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
