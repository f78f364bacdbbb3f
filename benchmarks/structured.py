"""Structured pruning benchmark: dense vs physically shrunk models, side by side.

For an MLP, a CNN with BatchNorm and residual connections, and a transformer
block, removes 50% of the neurons / channels / heads of every prunable group
(found automatically by ``jp.structured.find_groups``), rebuilds the smaller Linen model
from ``jp.structured.linen_features`` and reports, for the dense and the shrunk model:
parameter count, FLOPs from XLA's cost analysis of the compiled forward pass,
and the median jitted inference latency at batch 256 (both timed in the same
run, interleaved). It also checks that the shrunk model's outputs equal the
masked model's.

    python benchmarks/structured.py            # full sizes
    python benchmarks/structured.py --quick    # small sizes, a few repetitions
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp


class MLP(nn.Module):
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


class ResCNN(nn.Module):
  """conv-BN-relu stem, residual blocks of two 3x3 convs, strided transition, dense head."""
  width: int
  blocks: int = 2

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.width, (3, 3))(x)))
    for _ in range(self.blocks):
      y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.width, (3, 3))(x)))
      y = nn.BatchNorm(use_running_average=True)(nn.Conv(self.width, (3, 3))(y))
      x = nn.relu(x + y)
    x = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(x)


class Block(nn.Module):
  heads: int
  qkv: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.qkv)(x, x)
    x = nn.LayerNorm()(x + y)
    y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))
    return nn.LayerNorm()(x + y)


def _flops(fn: Callable[..., Any], *args: Any) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _latencies(fns: list[Callable[[], Any]], reps: int) -> list[float]:
  """Median seconds per call of each fn, timed interleaved so load affects all alike."""
  for f in fns:
    jax.block_until_ready(f())
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(reps):
    for i, f in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]


def _random_variables(model: nn.Module, x: jax.Array, seed: int) -> Any:
  v = jax.jit(model.init)(jax.random.key(seed), x)
  if "batch_stats" in v:  # non-trivial running statistics, as after training
    rng = np.random.default_rng(seed)
    v["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape) if "var" in
                                 jax.tree_util.keystr(p) else 0.1 * rng.standard_normal(a.shape),
                                 a.dtype), v["batch_stats"])
  return v


def run_case(name: str, model: nn.Module, rebuild: Callable[[dict], nn.Module], x: jax.Array,
             sparsity: float, reps: int) -> dict[str, Any]:
  v = _random_variables(model, x, 0)
  groups = jp.structured.find_groups(model.apply, v, x)
  scores = jp.structured.group_scores(groups, jp.magnitude(v))  # group L2 norm of the kernels
  keep = jp.structured.group_masks(scores, sparsity)
  small_vars = jp.structured.shrink(v, groups, keep)
  small = rebuild(jp.structured.linen_features(small_vars["params"]))

  dense_fn, small_fn = jax.jit(model.apply), jax.jit(small.apply)
  masked = dense_fn(jp.structured.apply_group_masks(v, groups, keep), x)
  max_diff = float(jnp.max(jnp.abs(small_fn(small_vars, x) - masked)))
  t_dense, t_small = _latencies([lambda: dense_fn(v, x), lambda: small_fn(small_vars, x)], reps)
  count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t["params"]))
  row = {
      "model": name, "groups": len(groups),
      "units_removed": int(sum(int((~np.asarray(k)).sum()) for k in keep)),
      "units": int(sum(g.size for g in groups)),
      "params_dense": count(v), "params_shrunk": count(small_vars),
      "flops_dense": _flops(model.apply, v, x), "flops_shrunk": _flops(small.apply, small_vars, x),
      "ms_dense": 1e3 * t_dense, "ms_shrunk": 1e3 * t_small,
      "speedup": t_dense / t_small, "max_abs_diff_vs_masked": max_diff,
  }
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small models, few repetitions")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of units removed")
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--json", type=str, default=None, help="also write the rows to this file")
  args = ap.parse_args()
  q = args.quick
  reps = args.reps or (5 if q else 30)
  b = args.batch
  key = jax.random.key(1)

  hidden = 512 if q else 2048
  cases = [
      ("mlp", MLP((hidden, hidden, hidden, 10)),
       lambda f: MLP((f["Dense_0"], f["Dense_1"], f["Dense_2"], 10)),
       jax.random.normal(key, (b, 784))),
      ("cnn", ResCNN(16 if q else 64), lambda f: ResCNN(f["Conv_0"]),
       jax.random.normal(key, (b, 16, 16, 3) if q else (b, 32, 32, 3))),
      ("transformer", Block(8, 128 if q else 256, 256 if q else 1024),
       lambda f: Block(f["MultiHeadDotProductAttention_0"]["num_heads"],
                       # Linen names submodules in construction order: in
                       # `Dense(d)(gelu(Dense(hidden)(x)))` the outer Dense(d) is Dense_0.
                       f["MultiHeadDotProductAttention_0"]["qkv_features"], f["Dense_1"]),
       jax.random.normal(key, (b, 16 if q else 64, 128 if q else 256))),
  ]
  rows = [run_case(n, m, r, x, args.sparsity, reps) for n, m, r, x in cases]

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch {b}, "
        f"{args.sparsity:.0%} of units removed per group, median of {reps} interleaved runs")
  hdr = (f"{'model':<12}{'groups':>7}{'params':>22}{'GFLOPs':>18}{'latency ms':>20}"
         f"{'speedup':>9}{'max|diff|':>11}")
  print(hdr)
  for r in rows:
    print(f"{r['model']:<12}{r['groups']:>7}"
          f"{r['params_dense']:>11,}{r['params_shrunk']:>11,}"
          f"{r['flops_dense'] / 1e9:>9.3f}{r['flops_shrunk'] / 1e9:>9.3f}"
          f"{r['ms_dense']:>10.2f}{r['ms_shrunk']:>10.2f}"
          f"{r['speedup']:>8.2f}x{r['max_abs_diff_vs_masked']:>11.1e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
