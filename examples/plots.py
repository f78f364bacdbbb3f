"""Plots of pruning runs: accuracy vs sparsity per criterion, per-layer sparsity per run.

matplotlib is imported inside each function (``Agg`` backend, files only), so importing this
module costs nothing when no plot is drawn.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from pruning import SweepPoint

import jaxprune as jp


def _layer_label(path: str) -> str:
  # "['fc1']['kernel']" -> "fc1/kernel": short tick labels.
  return "/".join(re.findall(r"\['([^']*)'\]", path)) or path


def plot_sweep(points: Sequence[SweepPoint], path: os.PathLike, title: str,
               dense_accuracy: Optional[float] = None) -> None:
  """Test accuracy vs sparsity, one line per criterion; panels: no fine-tuning | fine-tuned.

  Args:
    points: from `pruning.sweep`.
    path: PNG file to write.
    title: figure title.
    dense_accuracy: drawn as a dashed reference line when given.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("one-shot, no fine-tuning", "oneshot_accuracy")]
  if any(p.finetuned_accuracy is not None for p in points):
    panels.append(("one-shot + fine-tuning", "finetuned_accuracy"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (panel, field) in zip(axes[0], panels):
    for c in dict.fromkeys(p.criterion for p in points):
      pts = sorted((p.sparsity, getattr(p, field)) for p in points if p.criterion == c)
      ax.plot([100 * s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=c)
    if dense_accuracy is not None:
      ax.axhline(100 * dense_accuracy, color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(panel)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_layers(reports: Sequence[tuple[str, jp.Report]], path: os.PathLike, title: str) -> None:
  """Per-layer sparsity bars: one group per prunable leaf, one bar per run.

  Args:
    reports: ``(run name, jaxprune.report of the run)`` pairs, all of the same model.
    path: PNG file to write.
    title: figure title.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = [_layer_label(x.path) for x in reports[0][1].prunable_rows]
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(layers) * max(2, len(reports))),
                                  4.5 + 0.2 * len(reports)))
  width = 0.8 / len(reports)
  for i, (name, rep) in enumerate(reports):
    vals = [100 * x.sparsity for x in rep.prunable_rows]
    xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(layers))]
    ax.bar(xs, vals, width, label=f"{name} ({100 * rep.sparsity:.1f}%)")
  ax.set_xticks(range(len(layers)), layers)
  ax.set_ylabel("weights pruned (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
