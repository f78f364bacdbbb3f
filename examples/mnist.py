"""Train, prune and fine-tune LeNet-300-100 / LeNet-5 on MNIST with jaxprune (Flax Linen).

Quickstart (no download: runs on scikit-learn's bundled 8x8 digits, upsampled to 28x28)::

    pip install -e ".[examples]" && python examples/mnist.py

Real MNIST from gzipped IDX files (``train-images-idx3-ubyte.gz`` ... as distributed)::

    python examples/mnist.py --data-dir ../shared/data/mnist --model lenet300 \
        --mode gradual --criteria magnitude --sparsity 0.95

Modes (``--mode``), all starting from one dense model trained for ``--epochs``:

* ``oneshot``: score the dense weights, prune to ``--sparsity`` at once, fine-tune
  ``--ft-epochs`` with the masks fixed.
* ``gradual``: prune inside the train step with `jaxprune.polynomial_schedule` over
  ``--prune-epochs`` (Zhu & Gupta 2017), then fine-tune ``--ft-epochs``.
* ``iterative``: ``--rounds`` prune / retrain cycles of ``--prune-epochs`` each, each round
  pruning the same fraction of the surviving weights (Han et al. 2015), then fine-tune.
* ``l1`` / ``prox``: ``--prune-epochs`` of L1-regularised training (subgradient `jaxprune.add_l1`
  or the soft-threshold `jaxprune.proximal_l1`), then one-shot pruning and fine-tuning.

Criteria (``--criteria``, comma separated): ``magnitude`` |w|, ``gradient`` |g|, ``taylor``
|w g|, ``obd`` (Optimal Brain Damage ½ h w² with a Hutchinson Hessian diagonal) and ``random``.
For one-shot pruning the gradient, Taylor and Hessian scores are averaged over
``--score-batches`` training batches (one minibatch is too noisy to rank 10⁵ weights); in the
in-step modes `jaxprune.prune` computes them from the current batch.

``--sweep`` adds an accuracy-vs-sparsity sweep: for every criterion and every sparsity in
``--sweep-sparsities``, the dense model is pruned once and evaluated without fine-tuning, and
(unless ``--sweep-ft-epochs 0``) again after a short fine-tuning. Plots go to ``--out-dir``.

Nothing is downloaded at run time. This file is the command line only; the pieces it composes
are ``data.py`` (datasets), ``models.py`` (LeNets, loss, accuracy), ``training.py`` (jitted steps,
`fit`, `train_dense`), ``pruning.py`` (one-shot scores, mask selection, the modes, the sweep) and
``plots.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import plots
import pruning
import training
from data import load_digits28, load_mnist
from models import MODELS
from pruning import CRITERIA, EXTRA_CRITERIA, MODES, Config, RunResult, SweepPoint

# Han et al. 2015 (Tables 2-3) keep, per layer, 8/9/26 % (LeNet-300-100) and 66/12/8/19 %
# (LeNet-5); the first, largest layers are pruned most. Their totals round to 8 % kept; these
# allocations shift fc1 by one point so the total is >= 92 % pruned.
HAN_SPARSITIES = {
    "lenet300": {"fc1": 0.93, "fc2": 0.91, "fc3": 0.74},
    "lenet5": {"conv1": 0.34, "conv2": 0.88, "fc1": 0.93, "fc2": 0.81},
}

# Defaults per dataset: digits has 11 batches per epoch, so it needs more epochs to converge.
DEFAULTS = {
    "digits": dict(epochs=40, prune_epochs=10, ft_epochs=20, prune_every=10, prox=0.5),
    "mnist": dict(epochs=20, prune_epochs=4, ft_epochs=8, prune_every=50, prox=0.15),
    # LeNet-5's convolutions cost ~10x LeNet-300-100 per epoch on CPU, hence a shorter recipe
    # (docs/mnist.md compares it with a longer one).
    "mnist/lenet5": dict(epochs=8, prune_epochs=2, ft_epochs=4),
}


def parse_layer_sparsities(text: Optional[str], model: str) -> pruning.LayerSparsities:
  """``--layer-sparsity``: ``"fc1=0.93,fc2=0.91"`` or ``"han"`` (`HAN_SPARSITIES` of ``model``).

  Returns:
    ``(("fc1", 0.93), ("fc2", 0.91))``, or None for an empty ``text``.
  """
  if not text:
    return None
  if text == "han":
    return tuple(HAN_SPARSITIES[model].items())
  out = []
  for item in text.split(","):
    name, _, value = item.partition("=")
    if not value:
      raise ValueError(f"--layer-sparsity: expected 'han' or 'layer=fraction,...', got {item!r}.")
    out.append((name.strip(), float(value)))
  return tuple(out)


def build_parser() -> argparse.ArgumentParser:
  """The command line; ``None`` defaults are filled in per dataset from `DEFAULTS`."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--data-dir", default=None,
                 help="folder with the gzipped MNIST IDX files; default: sklearn's digits")
  p.add_argument("--model", choices=sorted(MODELS), default="lenet300")
  p.add_argument("--mode", choices=MODES, default="oneshot")
  p.add_argument("--criteria", default=",".join(CRITERIA),
                 help=f"comma-separated subset of {','.join(CRITERIA + EXTRA_CRITERIA)} "
                      "(fisher: OBD with the empirical-Fisher diagonal)")
  p.add_argument("--sparsity", type=float, default=0.92, help="overall fraction pruned")
  p.add_argument("--scope", choices=("global", "layer"), default="global")
  p.add_argument("--layer-sparsity", default=None,
                 help="per-layer fractions 'fc1=0.93,fc2=0.91,...' or 'han' (Han et al.'s "
                      "allocation); replace --sparsity for those layers")
  p.add_argument("--epochs", type=int, default=None, help="dense training epochs")
  p.add_argument("--prune-epochs", type=int, default=None,
                 help="epochs of gradual pruning / per iterative round / of L1 training")
  p.add_argument("--rounds", type=int, default=4, help="iterative prune/retrain rounds")
  p.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--ft-lr", type=float, default=3e-4)
  p.add_argument("--l1", type=float, default=None,
                 help="L1 strength: default 1e-4 for --mode l1 (added to the gradient); for "
                      "--mode prox (soft threshold lr*l1 per step after Adam) 0.15 on MNIST, "
                      "0.5 on digits")
  p.add_argument("--num-probes", type=int, default=8, help="Hutchinson probes per batch")
  p.add_argument("--average-hessian", action="store_true",
                 help="gradual/iterative obd: average the Hutchinson estimate over every step "
                      "between mask updates (one extra Hessian-vector product per probe per step)")
  p.add_argument("--score-batches", type=int, default=16,
                 help="batches the one-shot gradient/Taylor/OBD scores average over")
  p.add_argument("--prune-every", type=int, default=None, help="steps between mask updates")
  p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                 help="accuracy-vs-sparsity sweep per criterion (default: on for digits)")
  p.add_argument("--sweep-sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98")
  p.add_argument("--sweep-ft-epochs", type=int, default=None,
                 help="fine-tuning epochs per sweep point (0: no fine-tuning curve)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default="runs")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--no-verify", action="store_true", help="skip the SHA256SUMS check")
  return p


def config_from(args: argparse.Namespace, dataset: str, criterion: str) -> Config:
  """The run configuration of parsed arguments, unset options from `DEFAULTS` of ``dataset``."""
  d = dict(DEFAULTS[dataset])
  d.update(DEFAULTS.get(f"{dataset}/{args.model}", {}))
  pick = lambda value, key: d[key] if value is None else value
  l1 = args.l1 if args.l1 is not None else (d["prox"] if args.mode == "prox" else 1e-4)
  return Config(model=args.model, mode=args.mode, criterion=criterion, sparsity=args.sparsity,
                scope=args.scope,
                layer_sparsities=parse_layer_sparsities(args.layer_sparsity, args.model),
                epochs=pick(args.epochs, "epochs"),
                prune_epochs=pick(args.prune_epochs, "prune_epochs"), rounds=args.rounds,
                ft_epochs=pick(args.ft_epochs, "ft_epochs"), batch_size=args.batch_size,
                lr=args.lr, ft_lr=args.ft_lr, l1=l1, num_probes=args.num_probes,
                average_hessian=args.average_hessian, score_batches=args.score_batches,
                prune_every=pick(args.prune_every, "prune_every"), seed=args.seed)


def sweep_table(points: Sequence[SweepPoint]) -> str:
  """Test error (%) per criterion (rows) and sparsity (columns), one-shot and fine-tuned."""
  criteria = list(dict.fromkeys(p.criterion for p in points))
  sparsities = sorted({p.sparsity for p in points})
  get = {(p.criterion, p.sparsity): p for p in points}
  lines = []
  for title, field in (("one-shot, no fine-tuning", "oneshot_accuracy"),
                       ("one-shot + fine-tuning", "finetuned_accuracy")):
    if all(getattr(p, field) is None for p in points):
      continue
    lines.append(f"test error % ({title})")
    lines.append(f"{'criterion':<10}" + "".join(f"{f's={s:g}':>9}" for s in sparsities))
    for c in criteria:
      vals = [getattr(get[(c, s)], field) for s in sparsities]
      lines.append(f"{c:<10}" + "".join(f"{100 * (1 - v):9.2f}" for v in vals))
  return "\n".join(lines)


def summary(results: Sequence[RunResult], dense_accuracy: float) -> str:
  """Test error per run; sparsity, bytes and FLOPs are in each run's `jaxprune.report` table."""
  lines = [f"test error: dense {100 * (1 - dense_accuracy):.2f}%"]
  for r in results:
    before = ("" if r.oneshot_accuracy is None else
              f" (one-shot, before fine-tuning: {100 * (1 - r.oneshot_accuracy):.2f}%)")
    lines.append(f"  {r.name}: {100 * r.test_error:.2f}% at {100 * r.report.sparsity:.2f}% "
                 f"sparsity{before}, {r.seconds:.0f}s")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[RunResult]:
  """Runs the command line ``argv``; returns one `RunResult` per criterion."""
  args = build_parser().parse_args(argv)
  t0 = time.perf_counter()
  criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
  for c in criteria or [""]:
    if c not in CRITERIA + EXTRA_CRITERIA:
      raise ValueError(f"--criteria: expected names from {CRITERIA + EXTRA_CRITERIA}, got "
                       f"{c!r}.")
  data = (load_mnist(args.data_dir, verify=not args.no_verify) if args.data_dir
          else load_digits28(seed=args.seed))
  base = config_from(args, data.name, criteria[0])
  progress = not args.no_progress
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test images; "
        f"model {args.model}; mode {args.mode}; devices {jax.devices()}")

  model = MODELS[args.model]()
  trainer = training.make_trainer(model, data, args.batch_size)
  dense = training.train_dense(model, trainer, epochs=base.epochs, lr=base.lr, seed=base.seed,
                               progress=progress)
  dense_acc = trainer.accuracy(dense)
  print(f"dense {args.model}: test error {100 * (1 - dense_acc):.2f}% "
        f"({time.perf_counter() - t0:.0f}s)")

  results = []
  for c in criteria:
    r = pruning.run(trainer, dataclasses.replace(base, criterion=c), dense, progress=progress)
    results.append(r)
    print(f"\n== {r.name}: test error {100 * r.test_error:.2f}% at "
          f"{100 * r.report.sparsity:.2f}% sparsity ({r.seconds:.0f}s)")
    if r.reg_sparsity is not None:
      print(f"   {args.mode} training alone left {100 * r.reg_sparsity:.2f}% exact zeros")
    print(r.report.table())
  print("\n" + summary(results, dense_acc))

  tag = f"{data.name}_{args.model}_{args.mode}"
  written = [out_dir / f"{tag}_layers.png"]
  plots.plot_layers([(r.name, r.report) for r in results], written[0],
                    f"{data.name} {args.model} {args.mode}: per-layer sparsity")
  if args.sweep if args.sweep is not None else not args.data_dir:
    sparsities = [float(s) for s in args.sweep_sparsities.split(",")]
    ft = args.sweep_ft_epochs if args.sweep_ft_epochs is not None else (
        1 if args.data_dir else 5)
    points = pruning.sweep(trainer, base, dense, criteria, sparsities, ft, progress=progress)
    print("\n" + sweep_table(points))
    written.append(out_dir / f"{data.name}_{args.model}_sweep.png")
    plots.plot_sweep(points, written[-1], f"{data.name} {args.model}: one-shot pruning by "
                     f"criterion (scope={base.scope})", dense_acc)
  print(f"\nplots: {', '.join(map(str, written))}; total {time.perf_counter() - t0:.0f}s")
  return results


if __name__ == "__main__":
  main()
