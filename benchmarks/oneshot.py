"""One-shot pruning without fine-tuning on real MNIST: test error vs sparsity per criterion.

LeNet-300-100 and LeNet-5 are trained dense (or read from ``--cache``), then pruned at once with
2048 calibration images (training set) and evaluated on the 10,000 test images:

* ``magnitude``: ``|w|`` mask, no update;
* ``obd``: ``½·h·w²`` with ``h`` the exact Gauss–Newton diagonal (`gauss_newton_diag`);
* ``wanda``: ``|w|·‖x‖`` mask, no update;
* ``magnitude+refit``: the magnitude mask, kept weights refitted by least squares;
* ``sparsegpt``, ``obc``: layer-wise OBS (SparseGPT's blocked lazy updates; exact greedy OBC);
* ``obc/obs``: OBC with per-layer sparsities allocated over its layer errors;
* ``obc/wanda``: OBC with per-layer sparsities from one ranking of Wanda scores over all layers.

Every criterion without a ``/allocation`` suffix gets the same per-layer sparsities (one global
magnitude ranking); a suffix passes that ``allocation`` to `jaxprune.oneshot`.
Prints one table per model with the wall time of each pruning.

    python benchmarks/oneshot.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import data as data_lib  # noqa: E402
import models as models_lib  # noqa: E402
import training as training_lib  # noqa: E402

import jaxprune as jp  # noqa: E402
from _timing import machine  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
METHODS = ("magnitude", "obd", "wanda", "magnitude+refit", "sparsegpt", "obc", "obc/obs",
           "obc/wanda", "obc/obd", "sparsegpt/obd", "sparsegpt/uniform", "obc/uniform")
EPOCHS = {"lenet300": 20, "lenet5": 8}


def dense_params(name: str, dataset: data_lib.Dataset, cache: Path) -> object:
  """Trained dense parameters, from ``cache`` when present."""
  model = models_lib.MODELS[name]()
  like = model.init(jax.random.PRNGKey(0), jnp.asarray(dataset.x_train[:1]))["params"]
  path = cache / f"{name}.msgpack"
  if path.exists():
    return serialization.from_bytes(like, path.read_bytes())
  params = training_lib.train_dense(model, dataset, epochs=EPOCHS[name], batch_size=128,
                                    lr=1e-3, seed=0, progress=False)
  cache.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.to_bytes(jax.device_get(params)))
  return params


def prune(method: str, apply_fn, params, batches, sparsity: float, per_layer: dict):
  """Pruned params for one criterion at one sparsity."""
  if method in ("magnitude", "obd"):
    if method == "magnitude":
      scores = jp.magnitude(params)
    else:
      h = jp.gauss_newton_diag(apply_fn, params, batches)
      scores = jp.obd(params, h)
    masks = jp.unstructured_mask(scores, _prefix(params, per_layer))
    return jp.apply_masks(params, masks)
  head, _, allocation = method.partition("/")
  name, _, extra = head.partition("+")
  out, _ = jp.oneshot(apply_fn, params, batches, sparsity if allocation else None, method=name,
                      refit=extra == "refit", allocation=allocation or per_layer, progress=False)
  return out


def _prefix(params, per_layer: dict):
  """A per-leaf sparsity pytree (0 for unpruned leaves) from ``{path: fraction}``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: per_layer.get(jax.tree_util.keystr(p), 0.0), params)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared"
                                                / "data" / "mnist"))
  parser.add_argument("--models", default="lenet300,lenet5")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
  parser.add_argument("--calibration", type=int, default=2048)
  parser.add_argument("--cache", default=os.environ.get("JAXPRUNE_CACHE", "runs/dense"))
  args = parser.parse_args(argv)
  dataset = data_lib.load_mnist(args.data_dir)
  methods = args.methods.split(",")
  sparsities = [float(s) for s in args.sparsities.split(",")]
  print(machine())
  for name in args.models.split(","):
    model = models_lib.MODELS[name]()
    apply_fn = lambda p, x, model=model: model.apply({"params": p}, x)
    params = dense_params(name, dataset, Path(args.cache))
    x_cal = jnp.asarray(dataset.x_train[:args.calibration])
    batches = [x_cal[i:i + 256] for i in range(0, args.calibration, 256)]
    err = lambda p, model=model: 1.0 - models_lib.accuracy(model, p, dataset.x_test,
                                                           dataset.y_test)
    print(f"\n{name}: dense test error {100 * err(params):.2f} %, {args.calibration} calibration "
          "images, no fine-tuning; test error % (wall s)")
    print("| criterion | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |")
    print("| --- |" + " --- |" * len(sparsities))
    # The per-layer sparsities every criterion shares: one global magnitude ranking.
    per_layer = {}
    for s in sparsities:
      kept = jp.unstructured_mask(jp.magnitude(params), s, scope="global")
      per_layer[s] = {jax.tree_util.keystr(p): int(jnp.sum(~m)) / m.size
                      for p, m in jax.tree_util.tree_flatten_with_path(kept)[0]
                      if np.ndim(m) >= 2}
    for method in methods:
      cells = []
      for s in sparsities:
        t = time.perf_counter()
        pruned = prune(method, apply_fn, params, batches, s, per_layer[s])
        jax.block_until_ready(pruned)
        wall = time.perf_counter() - t
        cells.append(f"{100 * err(pruned):.2f} ({wall:.1f})")
      print(f"| {method} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
