"""Layer-wise sensitivity analysis: prune one leaf at a time, measure a metric, plot the curves.

For every prunable leaf and every sparsity of a grid, that leaf alone is pruned (its lowest-scored
``round(s * n)`` entries, the same selection as ``unstructured_mask(..., scope="layer")``) and
``metric_fn`` is evaluated on the result. The whole sweep runs through ONE jitted function: the
leaf is chosen by ``lax.switch`` on a traced index and the count is a traced int, so
``metric_fn`` is traced and compiled once however many points are evaluated.

References:
  Han, Pool, Tran and Dally, "Learning both Weights and Connections for Efficient Neural
  Networks", NeurIPS 2015 (per-layer sensitivity curves).
  Zmora et al., "Neural Network Distiller", 2019 (the metric-vs-sparsity plot, one line per
  layer).
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import progress as progress_lib
from jaxprune._src import scores as scores_lib
from jaxprune._src import select as select_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Prunable, PyTree

ScoresOrFn = Union[None, PyTree, Callable[[PyTree], PyTree]]

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


class SensitivityResult(NamedTuple):
  """Metric of the network with one leaf pruned, per leaf and per sparsity.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> result = jp.SensitivityResult(paths=("['w']",), sizes=(4,), sparsities=np.array([0.0, 0.5]),
    ...                               metrics=np.array([[0.75, 0.5]]), baseline=0.75)
    >>> result.to_dict()
    {'baseline': 0.75, 'sparsities': [0.0, 0.5], 'metrics': {"['w']": [0.75, 0.5]}}

  Attributes:
    paths: the analysed leaves (path strings), in `jax.tree.leaves` order.
    sizes: entry counts of those leaves.
    sparsities: the grid, shape ``(S,)``, ascending.
    metrics: ``metrics[l, j]`` = metric with leaf ``l`` alone pruned to ``sparsities[j]``.
    baseline: metric of the unpruned parameters.
  """
  paths: tuple[str, ...]
  sizes: tuple[int, ...]
  sparsities: np.ndarray
  metrics: np.ndarray
  baseline: float

  def to_dict(self) -> dict[str, Any]:
    """Plain Python containers: ``{'baseline', 'sparsities', 'metrics': {path: [...]}}``."""
    return {
        "baseline": float(self.baseline),
        "sparsities": [float(s) for s in self.sparsities],
        "metrics": {p: [float(v) for v in row] for p, row in zip(self.paths, self.metrics)},
    }


def _resolve_scores(params: PyTree, scores: ScoresOrFn) -> PyTree:
  if scores is None:
    return scores_lib.magnitude(params)
  if tree_lib.is_function(scores):  # an Equinox-shaped score tree is callable too, yet data
    return scores(params)
  return scores


def _check_grid(sparsities: Any) -> np.ndarray:
  if isinstance(sparsities, (str, bytes)) or not hasattr(sparsities, "__iter__"):
    raise validation.error("sparsities", "a sequence of fractions in [0, 1]",
                           validation.describe(sparsities))
  values = [validation.check_fraction(s, "sparsities", allow_traced=False)
            for s in np.asarray(sparsities, dtype=object).reshape(-1)]
  if not values:
    raise ValueError("sparsities: expected at least one fraction, got an empty grid.")
  return np.asarray(sorted(values), np.float64)


def _check_metric(out: Any) -> None:
  """The metric must be a real scalar: a vector would be stored as garbage per point."""
  if not validation.is_real_scalar(out):
    raise validation.error("metric_fn", "a real scalar metric (e.g. accuracy or loss)",
                           validation.describe(out))


def sensitivity_analysis(params: PyTree, metric_fn: Callable[[PyTree], jax.Array],
                         sparsities: Sequence[float] = DEFAULT_GRID, *,
                         scores: ScoresOrFn = None,
                         prunable: Prunable = None,
                         plot_path: Optional[Union[str, os.PathLike]] = None,
                         metric_name: str = "metric",
                         progress: Optional[bool] = None) -> SensitivityResult:
  """Prunes each prunable leaf alone over a grid of sparsities and evaluates ``metric_fn``.

  Examples:
    With the sum of the weights as the metric, pruning half of ``b`` (its two smallest entries,
    10 and 20) costs more than pruning half of ``a``:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
    ...           "b": jnp.array([[10.0, 20.0], [30.0, 40.0]])}
    >>> metric_fn = lambda p: jnp.sum(p["a"]) + jnp.sum(p["b"])
    >>> result = jp.sensitivity_analysis(params, metric_fn, (0.0, 0.5, 1.0), progress=False)
    >>> result.paths, result.baseline
    (("['a']", "['b']"), 110.0)
    >>> result.metrics.tolist()
    [[110.0, 107.0, 100.0], [110.0, 80.0, 10.0]]

  Args:
    params: parameter pytree.
    metric_fn: ``metric_fn(params) -> scalar`` (e.g. validation accuracy or loss on a fixed
      batch, closed over). It is traced once.
    sparsities: the grid; fractions in [0, 1], sorted ascending on output.
    scores: criterion: a score pytree like ``params``, a function ``params -> scores`` (e.g.
      `jaxprune.magnitude`, or a closure over gradients for `jaxprune.taylor`), or None for
      magnitude.
    prunable: which leaves are analysed (see `jaxprune.prunable_flags`).
    plot_path: if given, a PNG of the curves is written there (`plot_sensitivity`).
    metric_name: y-axis label of the plot.
    progress: a progress bar over the analysed leaves (tqdm): None for one
      when tqdm is installed and stderr is a terminal, True or False to force it.

  Returns:
    A `SensitivityResult`.

  Raises:
    ValueError: for a grid value outside [0, 1], a ``metric_fn`` that does not return a real
      scalar, scores that do not match ``params``, or no prunable leaf.
  """
  grid = _check_grid(sparsities)
  show = progress_lib.progress_enabled(progress)
  if not callable(metric_fn):
    raise validation.error("metric_fn", "a function params -> scalar",
                           validation.describe(metric_fn))
  scores = _resolve_scores(params, scores)
  tree_lib.check_same_structure(params, scores, "params", "scores")
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in with_paths]
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  chosen = [i for i, f in enumerate(flags) if f]
  if not chosen:
    raise validation.error("prunable", "at least one prunable leaf to analyse",
                           validation.Text("none"))

  def prune_leaf(i):
    def branch(leaves, score_leaves, k):
      out = list(leaves)
      pruned = select_lib.prune_lowest([score_leaves[i]], k)[0]
      out[i] = jnp.where(pruned, jnp.zeros((), leaves[i].dtype), leaves[i])
      return out
    return branch

  branches = [prune_leaf(i) for i in chosen]

  @jax.jit
  def evaluate(leaves, score_leaves, branch_index, k):
    pruned = jax.lax.switch(branch_index, branches, leaves, score_leaves, k)
    out = metric_fn(jax.tree.unflatten(treedef, pruned))
    _check_metric(out)  # at trace time, so metric_fn is still traced only once
    return out

  score_leaves = jax.tree.leaves(scores)
  baseline = evaluate(leaves, score_leaves, 0, jnp.int32(0))
  # Dispatch every point before reading any back (no host wait per point); pruning nothing
  # is the baseline, evaluated once rather than once per leaf. With a progress bar, each leaf's
  # row is waited for so that the bar tracks the work done.
  values = []
  for row, i in progress_lib.progress(list(enumerate(chosen)), desc="sensitivity",
                                      enable=show):
    counts = (select_lib.num_to_prune(float(s), int(np.size(leaves[i]))) for s in grid)
    values.append([baseline if k == 0 else evaluate(leaves, score_leaves, row, jnp.int32(k))
                   for k in counts])
    if show:
      jax.block_until_ready(values[-1])
  baseline, values = jax.device_get((baseline, values))
  baseline = float(baseline)
  metrics = np.asarray(values, np.float64).reshape(len(chosen), grid.size)

  result = SensitivityResult(
      paths=tuple(tree_lib.path_str(with_paths[i][0]) for i in chosen),
      sizes=tuple(int(np.size(leaves[i])) for i in chosen),
      sparsities=grid, metrics=metrics, baseline=baseline)
  if plot_path is not None:
    plot_sensitivity(result, plot_path, metric_name=metric_name)
  return result


def plot_sensitivity(result: SensitivityResult, path: Union[str, os.PathLike], *,
                     metric_name: str = "metric", title: str = "Pruning sensitivity") -> None:
  """Writes a PNG: metric vs sparsity, one line per leaf, the dense baseline dashed.

  Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).

  Examples:
    >>> import os, tempfile, numpy as np, jaxprune as jp
    >>> result = jp.SensitivityResult(paths=("['a']", "['b']"), sizes=(4, 4),
    ...                               sparsities=np.array([0.0, 0.5, 1.0]),
    ...                               metrics=np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.9]]),
    ...                               baseline=1.0)
    >>> path = os.path.join(tempfile.mkdtemp(), "sensitivity.png")
    >>> jp.plot_sensitivity(result, path, metric_name="accuracy")
    >>> open(path, "rb").read(4)
    b'\x89PNG'

  Args:
    result: output of `sensitivity_analysis`.
    path: PNG file to write.
    metric_name: y-axis label.
    title: figure title.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for p, row in zip(result.paths, result.metrics):
    ax.plot(result.sparsities, row, marker="o", markersize=3, label=p)
  ax.axhline(result.baseline, color="k", linestyle="--", linewidth=1, label="dense")
  ax.set_xlabel("sparsity of the pruned leaf")
  ax.set_ylabel(metric_name)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="x-small", loc="best")
  fig.tight_layout()
  fig.savefig(os.fspath(path), format="png", dpi=100)
