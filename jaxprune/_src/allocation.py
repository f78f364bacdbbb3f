"""Per-leaf sparsities from a global target: sensitivity-driven, uniform or ERK.

The sensitivity method treats each analysed leaf's degradation curve
``d_l(s) = baseline - metric_l(s)`` (sign flipped for lower-is-better metrics) as independent and
additive, makes it monotone (a running maximum: pruning more never predicts less damage),
interpolates it linearly between grid points and solves

    minimise  sum_l d_l(k_l / n_l)   subject to   sum_l c_l * k_l >= R,   0 <= k_l <= n_l

over integer pruned counts ``k_l``. ``c_l`` is what one pruned entry of leaf ``l`` saves: one
entry (``budget="sparsity"``), its multiply-adds (``"flops"``: the leaf's matmul/conv FLOPs over
its size, from `jaxprune.report`), or its bytes in bitmask storage (``"bytes"``: its itemsize).
The continuous relaxation is solved exactly on the lower convex hulls of the curves (the
Lagrangian / equal-slope solution: hull segments of all leaves are taken in order of increasing
damage per unit saved), then rounded to integers, topping up by the cheapest marginal slope so
that the target is met: exactly for ``"sparsity"`` (``sum k_l = round(target * N)``), and with an
overshoot below one entry's saving for FLOPs and bytes.

References:
  Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of
  resources", Operations Research 1963 (convex-hull / equal-slope allocation).
  Zhu and Gupta, "To prune, or not to prune", 2017; Evci et al., "Rigging the Lottery", ICML
  2020 (uniform and ERK distributions, see `jaxprune.erk_sparsities`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxprune._src import distribution as distribution_lib
from jaxprune._src import report as report_lib
from jaxprune._src import select as select_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.sensitivity import SensitivityResult
from jaxprune._src.types import Prunable, PyTree

_BUDGETS = ("sparsity", "flops", "bytes")
_METHODS = ("sensitivity", "uniform", "erk")


def check_sensitivity(sensitivity: Any) -> SensitivityResult:
  """Checks a `SensitivityResult` (consistent shapes, a finite baseline) and returns it."""
  if not isinstance(sensitivity, SensitivityResult):
    raise validation.error("sensitivity", "a SensitivityResult from "
                           "jaxprune.sensitivity_analysis", validation.describe(sensitivity))
  num, size = len(sensitivity.paths), np.size(sensitivity.sparsities)
  if len(sensitivity.sizes) != num or np.shape(sensitivity.metrics) != (num, size):
    raise validation.error("sensitivity", f"metrics of shape (leaves, grid) = ({num}, {size}) "
                           "and one size per leaf",
                           validation.Text(f"metrics of shape {np.shape(sensitivity.metrics)} "
                                           f"and {len(sensitivity.sizes)} sizes"))
  if not math.isfinite(float(sensitivity.baseline)):
    raise validation.error("sensitivity", "a finite baseline metric", sensitivity.baseline)
  return sensitivity


def degradation_curves(sensitivity: SensitivityResult,
                       higher_is_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Monotone per-leaf damage curves on a grid that starts at sparsity 0.

  Args:
    sensitivity: output of `jaxprune.sensitivity_analysis`.
    higher_is_better: True for accuracy-like metrics, False for losses.

  Returns:
    ``(grid, damage)``: the grid (with 0 prepended if missing) and ``damage[l, j] >= 0``,
    non-decreasing in ``j``, 0 at sparsity 0.
  """
  check_sensitivity(sensitivity)
  grid = np.asarray(sensitivity.sparsities, np.float64)
  metrics = np.asarray(sensitivity.metrics, np.float64)
  sign = 1.0 if higher_is_better else -1.0
  damage = sign * (sensitivity.baseline - metrics)
  if grid[0] > 0:
    grid = np.concatenate([[0.0], grid])
    damage = np.concatenate([np.zeros((damage.shape[0], 1)), damage], axis=1)
  damage = np.where(np.isnan(damage), np.inf, damage)  # a NaN metric: never prune that far
  damage[:, 0] = 0.0
  return grid, np.maximum.accumulate(np.maximum(damage, 0.0), axis=1)


def _lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
  """Indices of the lower convex hull of points sorted by x (monotone chain)."""
  hull: list[int] = []
  for i in range(len(x)):
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      # Drop b when it lies on or above the chord a -> i.
      if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
        hull.pop()
      else:
        break
    hull.append(i)
  return hull


def solve_counts(curves: list[tuple[np.ndarray, np.ndarray]], sizes: list[int], costs: list[float],
                 required: float, paths: list[str]) -> list[int]:
  """Integer counts minimising the interpolated damage with ``sum c_l k_l >= required``.

  With unit costs and an integer ``required`` the sum is met exactly: the floors of the
  continuous solution fall short by an integer that the top-up adds entry by entry. No leaf is
  pruned beyond its last finite measured point (a NaN metric gives an infinite damage from that
  point on); a target that cannot be met within those limits raises a ValueError.
  """
  num = len(sizes)
  # Per leaf, the most it may lose: everything, unless its metric turned NaN at some measured
  # sparsity; then the last count measured with a finite metric.
  caps = [n if np.isfinite(dmg).all() else
          min(int(math.floor(grid[np.isfinite(dmg)][-1] * n + 1e-9)), n)
          for (grid, dmg), n in zip(curves, sizes)]
  segments = []  # (slope, leaf, start count, end count) of each hull segment
  for l, (grid, dmg) in enumerate(curves):
    if costs[l] <= 0:
      continue  # pruning this leaf saves nothing for this budget
    counts = grid * sizes[l]
    finite = np.isfinite(dmg)
    counts, dmg = counts[finite], dmg[finite]
    hull = _lower_hull(counts, dmg)
    for a, b in itertools.pairwise(hull):
      slope = (dmg[b] - dmg[a]) / ((counts[b] - counts[a]) * costs[l])
      segments.append((slope, l, counts[a], counts[b]))
  segments.sort(key=lambda t: (t[0], t[1]))
  real = [0.0] * num
  remaining = required
  for _, l, a, b in segments:
    if (b - a) * costs[l] >= remaining:
      # The last segment taken, partly: stop here rather than on a float remainder, which would
      # move the leaf to the start of its next segment.
      real[l] = a + remaining / costs[l]
      break
    real[l] = b
    remaining -= (b - a) * costs[l]

  k = [min(int(math.floor(real[l] + 1e-9)), caps[l]) for l in range(num)]
  deficit = required - sum(c * kk for c, kk in zip(costs, k))

  def marginal(l: int) -> float:
    grid, dmg = curves[l]
    finite = np.isfinite(dmg)
    if (k[l] + 1) / sizes[l] > grid[finite][-1] + 1e-12:
      return math.inf  # beyond the measured range: taken last
    return float(np.interp((k[l] + 1) / sizes[l], grid[finite], dmg[finite]) -
                 np.interp(k[l] / sizes[l], grid[finite], dmg[finite])) / costs[l]

  order = sorted((l for l in range(num) if costs[l] > 0 and k[l] < caps[l]),
                 key=lambda l: (marginal(l), l))
  for l in order:
    if deficit <= 1e-9 * max(1.0, abs(required)):
      break
    add = min(caps[l] - k[l], int(math.ceil(deficit / costs[l] - 1e-9)))
    k[l] += add
    deficit -= add * costs[l]
  if deficit > 1e-9 * max(1.0, abs(required)):
    limited = [f"{p} (up to sparsity {c / n:.4g})" for p, c, n in zip(paths, caps, sizes)
               if c < n]
    why = ("; a NaN metric limits " + ", ".join(limited) if limited else
           "; they cannot save that much even fully pruned")
    raise ValueError(f"target: expected a target the analysed leaves can reach, got one they "
                     f"fall short of by {deficit:g}{why}.")
  return k


def allocate_sparsities(params: PyTree, target: float, *, method: str = "sensitivity",
                        sensitivity: Optional[SensitivityResult] = None,
                        budget: str = "sparsity",
                        report: Optional[report_lib.Report] = None,
                        higher_is_better: bool = True,
                        prunable: Prunable = None,
                        erk_scale: float = 1.0) -> PyTree:
  """Per-leaf sparsities that meet a global target.

  Targets (all fractions in [0, 1]):

  * ``budget="sparsity"``: fraction of the prunable entries removed; exactly
    ``round(target * N)`` entries over the prunable leaves.
  * ``budget="flops"``: fraction of ``report.flops_dense`` removed; afterwards
    ``report(...).flops_effective <= (1 - target) * flops_dense``. Needs a `jaxprune.report`
    made with ``apply_fn``.
  * ``budget="bytes"``: fraction of ``report.dense_bytes`` removed, storing prunable leaves as
    bitmask + kept values; afterwards ``report(...).bitmask_bytes <= (1 - target) *
    dense_bytes``.

  Examples:
    Leaf ``a`` loses half the metric at 50 % while ``b`` loses 0.1 even fully pruned, so half of
    all entries are taken from ``b``:

    >>> import jax.numpy as jnp, numpy as np, jaxprune as jp
    >>> params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((2, 2))}
    >>> sens = jp.SensitivityResult(paths=("['a']", "['b']"), sizes=(4, 4),
    ...                             sparsities=np.array([0.0, 0.5, 1.0]),
    ...                             metrics=np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.9]]),
    ...                             baseline=1.0)
    >>> jp.allocate_sparsities(params, 0.5, sensitivity=sens)
    {'a': 0.0, 'b': 1.0}
    >>> jp.allocate_sparsities(params, 0.5, method="uniform")
    {'a': 0.5, 'b': 0.5}

  Args:
    params: parameter pytree.
    target: the fraction described above.
    method: ``"sensitivity"`` (needs ``sensitivity``; minimises the predicted damage),
      ``"uniform"`` or ``"erk"`` (``budget="sparsity"`` only; `jaxprune.uniform_sparsities` /
      `jaxprune.erk_sparsities`).
    sensitivity: output of `jaxprune.sensitivity_analysis` on ``params``; only its leaves are
      pruned.
    budget: ``"sparsity"``, ``"flops"`` or ``"bytes"``.
    report: `jaxprune.report` of the dense ``params`` (built here if None and not needed for
      FLOPs).
    higher_is_better: whether a larger metric is better (accuracy) or worse (loss).
    prunable: prunable rule for the uniform / ERK methods and for the sparsity count.
    erk_scale: ERK's scale factor.

  Returns:
    A pytree of Python floats with the structure of ``params`` (0.0 on leaves left dense), for
    ``unstructured_mask(scores, sparsities, scope="layer")`` and `jaxprune.prune`. Each value
    is ``k / n`` so that ``round(s * n) == k`` recovers the allocated count.

  Raises:
    ValueError: for an argument out of its domain, a ``sensitivity`` or ``report`` of other
      parameters, or a target the analysed leaves cannot reach. A leaf whose metric is NaN
      from some measured sparsity on is never pruned that far; if the target then needs it, the
      message names the leaf and the sparsity it is limited to.
  """
  target = validation.check_fraction(target, "target", allow_traced=False)
  validation.check_choice(method, _METHODS, "method")
  validation.check_choice(budget, _BUDGETS, "budget")
  if not isinstance(higher_is_better, (bool, np.bool_)):
    raise validation.error("higher_is_better", "a bool", higher_is_better)
  if method == "uniform" or method == "erk":
    if budget != "sparsity":
      raise validation.error("budget", f"'sparsity' with method={method!r}", budget)
    if method == "uniform":
      return distribution_lib.uniform_sparsities(params, target, prunable=prunable)
    return distribution_lib.erk_sparsities(params, target, prunable=prunable, scale=erk_scale)
  check_sensitivity(sensitivity)

  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_lib.path_str(p) for p, _ in with_paths]
  index = {p: i for i, p in enumerate(paths)}
  for p, n in zip(sensitivity.paths, sensitivity.sizes):
    if p not in index:
      raise validation.error("sensitivity", "an analysis of these params",
                             validation.Text(f"one of leaf {p}, which params lack"))
    if int(np.size(with_paths[index[p]][1])) != n:
      raise validation.error("sensitivity", f"{np.size(with_paths[index[p]][1])} entries as in "
                             "params", validation.Text(f"{n} entries"), p)
  if report is None:
    if budget == "flops":
      raise validation.error("report", "jaxprune.report(params, apply_fn=..., inputs=...) for "
                             "budget='flops'", None)
    if budget == "bytes":  # a sparsity budget needs no report (it copies every leaf to host)
      report = report_lib.report(params, prunable=prunable)
  if report is not None and not isinstance(report, report_lib.Report):
    raise validation.error("report", "a jaxprune.report Report", validation.describe(report))
  rows = {r.path: r for r in report.rows} if report is not None else {}
  analysed = list(sensitivity.paths)
  sizes = list(sensitivity.sizes)
  if budget != "sparsity":
    for p in analysed:
      if p not in rows:
        raise validation.error("report", "a report of params",
                               validation.Text(f"one without leaf {p}"))

  if budget == "sparsity":
    flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
    total = sum(int(np.size(x)) for (_, x), f in zip(with_paths, flags) if f)
    costs = [1.0] * len(analysed)
    required = float(select_lib.num_to_prune(target, total))
  elif budget == "flops":
    if report.flops_dense is None:
      raise validation.error("report", "a report made with apply_fn for budget='flops'",
                             validation.Text("one without FLOPs"))
    costs = [rows[p].flops_dense / n for p, n in zip(analysed, sizes)]
    required = target * report.flops_dense
  else:
    costs = [float(np.dtype(rows[p].dtype).itemsize) for p in analysed]
    # Bitmask storage of the dense params already pays the mask bits; removals must cover them.
    required = report.bitmask_bytes - (1.0 - target) * report.dense_bytes
  required = max(required, 0.0)

  grid, damage = degradation_curves(sensitivity, higher_is_better)
  curves = [(grid, damage[l]) for l in range(len(analysed))]
  counts = solve_counts(curves, sizes, costs, required, analysed)
  out = [0.0] * len(paths)
  for p, k, n in zip(analysed, counts, sizes):
    out[index[p]] = k / n
  return jax.tree.unflatten(treedef, out)


def as_overrides(sparsities: PyTree,
                 schedule_fn: Optional[Callable[[float], Any]] = None) -> dict[str, Any]:
  """Per-leaf sparsities as ``overrides`` for `jaxprune.prune`.

  Examples:
    >>> import jaxprune as jp
    >>> jp.as_overrides({"a": 0.0, "b": 0.75})   # leaves left dense are left out
    {"['b']": 0.75}
    >>> overrides = jp.as_overrides(
    ...     {"a": 0.0, "b": 0.75},
    ...     lambda s: jp.polynomial_schedule(0.0, s, begin_step=0, end_step=100, frequency=10))
    >>> list(overrides)
    ["['b']"]
    >>> tx = jp.prune(0.0, overrides=overrides)   # b pruned gradually to 75 %, a kept dense

  Args:
    sparsities: pytree of per-leaf fractions (as from `allocate_sparsities`).
    schedule_fn: optional ``final sparsity -> schedule``; without it each leaf gets its constant
      sparsity (one-shot pruning at the first update).

  Returns:
    ``{leaf path: sparsity or schedule}`` for every leaf with a nonzero sparsity.
  """
  if schedule_fn is not None and not callable(schedule_fn):
    raise validation.error("schedule_fn", "None or a function final sparsity -> schedule",
                           validation.describe(schedule_fn))
  out = {}
  for p, s in jax.tree_util.tree_flatten_with_path(sparsities)[0]:
    s = validation.check_fraction(s, "sparsities", tree_lib.path_str(p), allow_traced=False)
    if s > 0:
      out[tree_lib.path_str(p)] = s if schedule_fn is None else schedule_fn(s)
  return out


def predicted_metric(sensitivity: SensitivityResult, sparsities: PyTree,
                     higher_is_better: bool = True) -> float:
  """Metric predicted for per-leaf ``sparsities`` by adding the leaves' interpolated damages.

  Examples:
    >>> import numpy as np, jaxprune as jp
    >>> sens = jp.SensitivityResult(paths=("['a']", "['b']"), sizes=(4, 4),
    ...                             sparsities=np.array([0.0, 0.5, 1.0]),
    ...                             metrics=np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.9]]),
    ...                             baseline=1.0)
    >>> jp.predicted_metric(sens, {"a": 0.25, "b": 1.0})   # 1 - 0.25 - 0.1
    0.65

  Args:
    sensitivity: output of `jaxprune.sensitivity_analysis`.
    sparsities: pytree of per-leaf fractions (as from `allocate_sparsities`).
    higher_is_better: as in `allocate_sparsities`.

  Returns:
    ``baseline - sum_l d_l(s_l)`` (``+`` for lower-is-better metrics).
  """
  by_path = {tree_lib.path_str(p): validation.check_fraction(s, "sparsities", tree_lib.path_str(p),
                                                             allow_traced=False)
             for p, s in jax.tree_util.tree_flatten_with_path(sparsities)[0]}
  grid, damage = degradation_curves(sensitivity, higher_is_better)
  total = sum(float(np.interp(by_path.get(p, 0.0), grid, damage[l]))
              for l, p in enumerate(sensitivity.paths))
  return sensitivity.baseline - total if higher_is_better else sensitivity.baseline + total
