"""Wall time and layer loss of the layer-wise OBS solvers at 50 % on single layers.

Layers: 784x300 with H = XᵀX of 2048 real MNIST training images (LeNet-300-100's first layer),
and synthetic layers whose inputs have a power-law spectrum (correlated features, like hidden
activations), 4096 tokens. Kernels are random. For each layer: SparseGPT (block 128), OBC (path,
then mask and refit), and a least-squares refit of the magnitude mask, with their layer losses
relative to magnitude pruning without an update. ``--minilm`` times the refit of per-column
magnitude masks (Wanda's comparison groups) and SparseGPT on all 36 kernels of a MiniLM-L6-sized
encoder (6 x [4 x 384x384, 384x1536, 1536x384]) at 50 % and 70 %.
The refit runs with its default method (direct solves for columns keeping at most a quarter,
conjugate gradients on the removed side for the others) and with ``method="cholesky"``.

  python benchmarks/solvers.py [--layers 784x300,1536x384] [--minilm] [--no-obc] \
      [--data-dir ../shared/data/mnist]

Set OPENBLAS_NUM_THREADS=1 on a busy machine: the batched Cholesky factorisations of `refit` run
in OpenBLAS, whose threads spin against XLA's (measured here: 200 s -> 24 s for one 1536x384
refit with two cores shared by other jobs).
"""

from __future__ import annotations

import argparse
import gzip
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from _timing import machine
from jaxprune._src import obc as obc_lib
from jaxprune._src import obs
from jaxprune._src import refit as refit_lib
from jaxprune._src import sparsegpt as sg

MNIST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def mnist_gram(data_dir: str, n: int = 2048) -> np.ndarray:
  with gzip.open(os.path.join(data_dir, "train-images-idx3-ubyte.gz")) as f:
    x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)[:n]
  x = x.astype(np.float32) / 255.0
  return x.T @ x


def synthetic_gram(d: int, tokens: int = 4096, seed: int = 0) -> np.ndarray:
  """Inputs with a power-law spectrum in a random basis and a few large outlier features."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
  x = rng.normal(size=(tokens, d)) * (np.arange(1, d + 1) ** -0.75) @ basis.T
  x[:, rng.choice(d, 4, replace=False)] *= 20.0
  x = x.astype(np.float32)
  return x.T @ x


def timed(fn, *args):
  """(first call incl. compilation, second call) wall times in seconds, and the result."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return first, time.perf_counter() - t, out


def magnitude_mask(w: np.ndarray, sparsity: float, per_column: bool = False) -> np.ndarray:
  """Keep mask pruning the smallest |w| of the layer, or of each output column (Wanda's
  comparison group)."""
  if per_column:
    k = round(sparsity * w.shape[0])
    ranks = np.argsort(np.argsort(np.abs(w), axis=0, kind="stable"), axis=0, kind="stable")
    return ranks >= k
  k = round(sparsity * w.size)
  order = np.argsort(np.abs(w), axis=None, kind="stable")
  keep = np.ones(w.size, bool)
  keep[order[:k]] = False
  return keep.reshape(w.shape)


def layer_report(name: str, w: np.ndarray, h: np.ndarray, run_obc: bool) -> None:
  loss = lambda new: float(obs.layer_loss(w, new, h))
  keep = magnitude_mask(w, 0.5)
  base = loss(np.where(keep, w, 0))
  print(f"\n{name}: magnitude (no update) layer loss {base:.4g}")
  first, steady, (new, _) = timed(lambda: sg.sparsegpt(w, h, 0.5))
  print(f"  sparsegpt     {steady:7.2f} s  (first call {first:6.2f} s)  "
        f"loss {loss(new) / base:.3f}")
  first, steady, (new, iters) = timed(lambda: refit_lib.refit_with_info(w, h, keep))
  print(f"  refit(mag)    {steady:7.2f} s  (first call {first:6.2f} s)  loss {loss(new) / base:.3f}"
        f"  [{int(iters)} CG iterations]")
  first, steady, exact = timed(lambda: refit_lib.refit(w, h, keep, method="cholesky"))
  err = float(jnp.max(jnp.abs(new - exact)) / jnp.max(jnp.abs(exact)))
  print(f"  refit(mag, cholesky) {steady:7.2f} s  (first call {first:6.2f} s)  "
        f"max rel. difference to auto {err:.1e}")
  if run_obc:
    first, steady, path = timed(lambda: obc_lib.obc_path(w, h))
    t = time.perf_counter()
    mask = jax.block_until_ready(obc_lib.obc_mask(path, 0.5))
    new = jax.block_until_ready(refit_lib.refit(w, h, mask))
    rest = time.perf_counter() - t
    print(f"  obc path      {steady:7.2f} s  (first call {first:6.2f} s); mask+refit {rest:.2f} s"
          f"  loss {loss(new) / base:.3f}")


def minilm() -> None:
  shapes = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]
  grams = {384: synthetic_gram(384, seed=1), 1536: synthetic_gram(1536, seed=2)}
  rng = np.random.default_rng(0)
  layers = [(rng.normal(size=s).astype(np.float32), grams[s[0]]) for _ in range(6) for s in shapes]
  for sparsity in (0.5, 0.7):
    masks = [magnitude_mask(w, sparsity, per_column=True) for w, _ in layers]
    runs = [("refit(per-column magnitude)",
             lambda i, masks=masks: refit_lib.refit(*layers[i], masks[i])),
            ("sparsegpt", lambda i, s=sparsity: sg.sparsegpt(*layers[i], s)[0])]
    for name, fn in runs:
      t = time.perf_counter()
      for i in range(len(layers)):
        jax.block_until_ready(fn(i))
        if i == len(shapes) - 1:
          first_layer = time.perf_counter() - t
      total = time.perf_counter() - t
      print(f"MiniLM-sized encoder, {name} at {sparsity:.0%}: {total:.1f} s for 36 kernels "
            f"(first encoder layer, with compilation, {first_layer:.1f} s; then "
            f"{(total - first_layer) / 5:.2f} s per layer)")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", default="784x300,1536x384")
  ap.add_argument("--minilm", action="store_true")
  ap.add_argument("--no-obc", action="store_true")
  ap.add_argument("--data-dir", default=MNIST_DIR, help="MNIST IDX files (for 784-input layers)")
  args = ap.parse_args()
  print(machine(), f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
  rng = np.random.default_rng(0)
  for spec in args.layers.split(","):
    d_in, d_out = map(int, spec.split("x"))
    h = mnist_gram(args.data_dir) if d_in == 784 else synthetic_gram(d_in)
    w = (rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    layer_report(f"{d_in}x{d_out}", w, h, not args.no_obc)
  if args.minilm:
    minilm()


if __name__ == "__main__":
  main()
