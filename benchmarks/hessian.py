"""Cost of one Hutchinson probe of `jp.hessian_diag` as a multiple of one gradient.

MLP 784-1024-1024-10 (~1.9M params), batch 256, all jitted, measured side by side in one run:
a gradient, one forward-over-reverse HVP, `jp.hessian_diag` with 8 and 32 probes, and a naive
`vmap` of HVPs over 8 probes for comparison.

  python benchmarks/hessian.py [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxprune as jp
from _timing import best_time, machine, mlp_loss as loss_fn, mlp_params


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="a 10x smaller model")
  args = ap.parse_args()
  sizes = (784, 128, 128, 10) if args.quick else (784, 1024, 1024, 10)
  params = mlp_params(list(sizes))
  n = sum(x.size for x in jax.tree.leaves(params))
  x = jax.random.normal(jax.random.key(1), (256, 784))
  y = jax.random.randint(jax.random.key(2), (256,), 0, 10)
  key = jax.random.key(3)

  grad = jax.jit(jax.grad(loss_fn))
  hvp = jax.jit(lambda p, v, x, y: jax.jvp(lambda q: jax.grad(loss_fn)(q, x, y), (p,), (v,))[1])
  probe = jax.tree.map(jnp.ones_like, params)

  def naive(p, x, y, key):
    keys = jax.random.split(key, 8)
    def one(k):
      v = jax.tree.map(lambda t: jax.random.rademacher(k, t.shape, jnp.float32), p)
      hv = jax.jvp(lambda q: jax.grad(loss_fn)(q, x, y), (p,), (v,))[1]
      return jax.tree.map(lambda a, b: a * b, v, hv)
    return jax.tree.map(lambda t: t.mean(0), jax.vmap(one)(keys))

  naive8 = jax.jit(naive)
  h8 = jax.jit(lambda p, x, y, k: jp.hessian_diag(loss_fn, p, x, y, key=k, num_probes=8))
  h32 = jax.jit(lambda p, x, y, k: jp.hessian_diag(loss_fn, p, x, y, key=k, num_probes=32))

  t_grad = best_time(grad, params, x, y)
  t_hvp = best_time(hvp, params, probe, x, y)
  t_h8 = best_time(h8, params, x, y, key, repeats=3)
  t_h32 = best_time(h32, params, x, y, key, repeats=3)
  t_naive = best_time(naive8, params, x, y, key, repeats=3)
  marginal = (t_h32 - t_h8) / 24

  print(machine())
  print(f"MLP {sizes}, {n:,} params, batch 256; multiples of one gradient ({t_grad * 1e3:.2f} ms)")
  print(f"  one HVP (jvp of grad)                 {t_hvp / t_grad:6.2f}x")
  print(f"  hessian_diag, 8 probes, per probe     {t_h8 / 8 / t_grad:6.2f}x")
  print(f"  hessian_diag, 32 probes, per probe    {t_h32 / 32 / t_grad:6.2f}x")
  print(f"  hessian_diag, marginal probe (8->32)  {marginal / t_grad:6.2f}x")
  print(f"  naive vmap of 8 HVPs, per probe       {t_naive / 8 / t_grad:6.2f}x")


if __name__ == "__main__":
  main()
