"""Global mask selection time vs one pass over the parameters, and vs sort-based selection.

Prints, for several total sizes spread over a few leaves, the time of `jp.unstructured_mask`
(global scope) as a multiple of one `jnp.sum(jnp.abs(x))` pass over the same leaves, next to the
same multiple for the sort-based threshold (`jnp.sort` of the concatenated scores) and for
`lax.top_k`. All measured in one run on this machine. (Not named ``select.py``: that would shadow
the standard library's ``select`` module, which jax imports, for every script in this folder.)

  python benchmarks/selection.py            # 1e6, 1e7, 5e7
  python benchmarks/selection.py --quick    # 1e6 only
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

import jaxprune as jp
from _timing import best_time, machine

# Leaf fractions of the total: a few kernels of different sizes plus a small one.
_FRACTIONS = (0.5, 0.3, 0.15, 0.05)


def make_leaves(total: int, key) -> dict:
  leaves = {}
  for i, f in enumerate(_FRACTIONS):
    n = int(total * f)
    cols = 1000 if n >= 1000 else 1
    leaves[f"layer{i}"] = jax.random.normal(jax.random.fold_in(key, i), (n // cols, cols))
  return leaves


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="only 10^6 parameters")
  ap.add_argument("--no-sort", action="store_true", help="skip the slow sort/top_k baselines")
  ap.add_argument("--sparsity", type=float, default=0.9)
  args = ap.parse_args()
  sizes = [10**6] if args.quick else [10**6, 10**7, 5 * 10**7]
  s = args.sparsity
  print(machine())
  print(f"global unstructured mask at sparsity {s}; times are multiples of one "
        f"jnp.sum(jnp.abs(x)) pass over the same leaves\n")
  print("scratch: XLA temporary memory of the selection itself, given the scores\n")
  print(f"{'params':>12} {'one pass':>10} {'jaxprune':>10} {'x pass':>8} {'scratch':>9} "
        f"{'jnp.sort':>10} {'x pass':>8} {'lax.top_k':>10} {'x pass':>8}")

  one_pass = jax.jit(lambda t: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)))
  ours = jax.jit(lambda t: jp.unstructured_mask(jp.magnitude(t), s, scope="global"))
  selection_only = jax.jit(lambda scores: jp.unstructured_mask(scores, s, scope="global"))

  def by_sort(t):
    flat = jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree.leaves(t)])
    k = round(s * flat.size)
    thr = jnp.sort(flat)[k - 1]
    return jax.tree.map(lambda x: jnp.abs(x) > thr, t)

  def by_top_k(t):
    flat = jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree.leaves(t)])
    keep = flat.size - round(s * flat.size)
    thr = lax.top_k(flat, keep)[0][-1]
    return jax.tree.map(lambda x: jnp.abs(x) >= thr, t)

  for n in sizes:
    leaves = make_leaves(n, jax.random.key(0))
    total = sum(x.size for x in jax.tree.leaves(leaves))
    t_pass = best_time(one_pass, leaves, repeats=10)
    t_ours = best_time(ours, leaves, repeats=10 if n <= 10**7 else 3)
    masks = ours(leaves)
    pruned = sum(int((~m).sum()) for m in jax.tree.leaves(masks))
    assert pruned == round(s * total), (pruned, round(s * total))
    scratch = selection_only.lower(leaves).compile().memory_analysis().temp_size_in_bytes
    row = (f"{total:>12,} {t_pass:>9.4f}s {t_ours:>9.4f}s {t_ours / t_pass:>7.1f}x "
           f"{scratch / 2**20:>5.1f} MiB")
    if args.no_sort:
      print(row)
      continue
    sort_fn, topk_fn = jax.jit(by_sort), jax.jit(by_top_k)
    reps = 1 if n > 10**7 else 3
    t_sort = best_time(sort_fn, leaves, repeats=reps)
    t_topk = best_time(topk_fn, leaves, repeats=reps)
    print(f"{row} {t_sort:>9.3f}s {t_sort / t_pass:>7.0f}x {t_topk:>9.3f}s "
          f"{t_topk / t_pass:>7.0f}x")


if __name__ == "__main__":
  main()
