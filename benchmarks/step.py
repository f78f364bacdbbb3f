"""Cost of `jp.prune` in a jitted train step, next to the plain optax step on the same MLP.

Three jitted train steps (forward, backward, Adam, apply_updates; params and optimizer state
donated) are timed side by side, interleaved so machine noise hits all of them alike:

* ``plain``: ``optax.adam``.
* ``pruned, no mask update``: ``chain(adam, jp.prune(0.9))`` after its masks were computed —
  every timed step only rewrites the updates with the masks (target: optimizer part <= 1.03x
  plain, as cheap as the fixed-mask ablation below).
* ``pruned, update every 100``: ``chain(adam, jp.prune(polynomial_schedule(..., frequency=100)))``
  timed over windows of 100 steps that each contain exactly one mask recomputation
  (target: train step <= 1.02x plain, amortized).
* ``pruned, update every step``: a schedule whose value changes on every step, so every step
  recomputes the masks; with the no-update time it gives the cost of one mask update and a
  steadier amortized figure (``derived``) than the windows.
* ``ablation: fixed masks``: fixed masks held in the state, masking with no update branch.

The optimizer part alone (``tx.update`` + ``apply_updates`` on fixed gradients) is timed too,
since with a small batch the forward/backward pass dominates the train step.

Usage: ``python benchmarks/step.py [--quick] [--batch B] [--score taylor] [--scope global]``;
``--compare-scores`` times the no-update step of every score and scope side by side instead.
The XLA temp column is the compiled step's scratch memory, and "mask copies" counts the copies
of boolean arrays in the step's top-level computation (those run on every step, mask update or
not; copies inside the update branch run only when it is taken).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from _timing import machine, mlp_loss as loss_fn, mlp_params as init_mlp


def fixed_masks(masks) -> optax.GradientTransformation:
  """Ablation: `prune`'s masking with the masks held in the state and no update branch."""
  def update(updates, state, params=None):
    return jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, state), state
  # A fresh copy per init: the benchmark donates the state.
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.copy, masks), update)


def make_train_step(tx: optax.GradientTransformation):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, grad=grads)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def make_opt_step(tx: optax.GradientTransformation):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, grad=grads)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def time_side_by_side(txs: dict, make_fn, args: tuple, params0, reps: int, window: int) -> dict:
  """Times ``make_fn(tx)(params, state, *args)`` for every optimizer in ``txs``, interleaved.

  Each variant is warmed up for one window (compiling it and, for a constant target, computing
  its masks at count 0, and leaving the count at a multiple of the window), then timed over
  ``reps`` windows of ``window`` steps, the variants taking turns so machine noise hits all alike.

  Returns:
    name -> ``(median seconds per step, XLA temp MiB, final optimizer state, mask copies,
    seconds per step of the fastest window)``.
  """
  runners = {}
  for name, tx in txs.items():
    fn = make_fn(tx)
    params = copy_tree(params0)
    state = tx.init(params)
    compiled = fn.lower(params, state, *args).compile()
    temp_mb = compiled.memory_analysis().temp_size_in_bytes
    hlo = compiled.as_text()
    copies = len(re.findall(r"= pred\[[\d,]+\]\S* copy\(", hlo[hlo.index("\nENTRY"):]))
    for _ in range(window):
      params, state = fn(params, state, *args)[:2]
    jax.block_until_ready(params)
    runners[name] = [fn, params, state, [], temp_mb / 2**20, copies]
  for _ in range(reps):
    for r in runners.values():
      fn, params, state, times = r[:4]
      start = time.perf_counter()
      for _ in range(window):
        params, state = fn(params, state, *args)[:2]
      jax.block_until_ready((params, state))
      times.append((time.perf_counter() - start) / window)
      r[1], r[2] = params, state
  return {name: (statistics.median(r[3]), r[4], r[2], r[5], min(r[3]))
          for name, r in runners.items()}


def print_ratios(title: str, results: dict) -> None:
  base, best_base = results["plain"][0], results["plain"][4]
  print(f"\n{title} (median window; fastest window, which load on a shared machine disturbs "
        "least):")
  for name, (t, temp_mb, _, copies, best) in results.items():
    print(f"  {name:28s} {t * 1e3:9.3f} ms/step   ratio {t / base:5.3f}x   fastest "
          f"{best / best_base:5.3f}x   XLA temp {temp_mb:6.1f} MiB   mask copies {copies}")


def compare_scores(params0, x, y, reps: int, window: int) -> None:
  """Whole train steps (no mask update) for each score and scope, side by side in one process.

  Run to run, one program's ratio moves by up to 10% on a shared VM, so variants are compared
  inside one run rather than across runs.
  """
  txs = {"plain": optax.adam(1e-3)}
  for score in ("magnitude", "taylor", "gradient"):
    for scope in ("layer", "global"):
      txs[f"{score}, {scope}"] = optax.chain(optax.adam(1e-3),
                                             jp.prune(0.9, score=score, scope=scope))
  print_ratios("train step, no mask update, by score and scope",
               time_side_by_side(txs, make_train_step, (x, y), params0, reps, window))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small model, few steps (smoke run)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
  parser.add_argument("--score", default="magnitude", choices=["magnitude", "gradient", "taylor"])
  parser.add_argument("--scope", default="layer", choices=["layer", "global"])
  parser.add_argument("--compare-scores", action="store_true",
                      help="only: every score x scope side by side, without mask updates")
  args = parser.parse_args()

  sizes = [256, 512, 256, 10] if args.quick else [784, 2048, 1024, 10]
  window = 100  # steps per timed window; the scheduled variant updates once per window
  reps = args.reps or (2 if args.quick else 5)
  params0 = init_mlp(sizes)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, sizes[-1], size=args.batch), jnp.int32)

  options = dict(score=args.score, scope=args.scope)
  txs = {
      "plain": optax.adam(1e-3),
      "pruned, no mask update": optax.chain(optax.adam(1e-3), jp.prune(0.9, **options)),
      f"pruned, update every {window}": optax.chain(
          optax.adam(1e-3),
          jp.prune(jp.polynomial_schedule(0.0, 0.9, 0, 1000 * window, frequency=window),
                   **options)),
      "pruned, update every step": optax.chain(
          optax.adam(1e-3),
          jp.prune(jp.polynomial_schedule(0.0, 0.9, 0, 10**7), **options)),
      "ablation: fixed masks": optax.chain(
          optax.adam(1e-3), fixed_masks(jp.unstructured_mask(jp.magnitude(params0), 0.9))),
  }
  print(machine())
  print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes share the cores)")
  if args.compare_scores:
    print(f"MLP {sizes}: {n_params / 1e6:.2f}M params, batch {args.batch}; "
          f"{reps} interleaved reps of {window} steps each")
    compare_scores(params0, x, y, reps, window)
    return
  print(f"MLP {sizes}: {n_params / 1e6:.2f}M params, batch {args.batch}; "
        f"{reps} interleaved reps of {window} steps each; prune(score={args.score!r}, "
        f"scope={args.scope!r})")

  grads = jax.grad(loss_fn)(params0, x, y)
  for kind, make_fn, args_ in (("train step", make_train_step, (x, y)),
                               ("optimizer only", make_opt_step, (grads,))):
    results = time_side_by_side(txs, make_fn, args_, params0, reps, window)
    print_ratios(kind, results)
    # The windowed figure is noisy (one update per window); the same amortization computed
    # from the no-update and every-step medians is steadier.
    t_none = results["pruned, no mask update"][0]
    t_every = results["pruned, update every step"][0]
    amortized = ((window - 1) * t_none + t_every) / window
    print(f"  {'derived: one update per ' + str(window):28s} {amortized * 1e3:9.3f} ms/step   "
          f"ratio {amortized / results['plain'][0]:5.3f}x   (mask update alone: "
          f"{(t_every - t_none) * 1e3:.3f} ms)")
    pruned_state = optax.tree_utils.tree_get(results[f"pruned, update every {window}"][2],
                                             "PruneState")
    print(f"  (scheduled variant: count {int(pruned_state.count)}, "
          f"target {float(pruned_state.target):.6f})")
  print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
