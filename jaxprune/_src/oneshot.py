"""One-shot, post-training pruning with calibration data: layer-wise Optimal Brain Surgeon.

Each prunable kernel ``W`` is pruned to minimise its layer's reconstruction error on calibration
inputs ``X``, ``‖X W − X W'‖²``, whose Hessian is ``H = XᵀX``; the kept weights are updated to
compensate for the removed ones. The model is pruned stage by stage (`calibration.stages`): a
kernel's inputs are collected from the model whose earlier kernels are already pruned, and with
``target="dense"`` each layer is fitted to the dense model's outputs for that layer.

References:
  Hassibi and Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
  NeurIPS 1993.
  Frantar and Alistarh, "Optimal Brain Compression", NeurIPS 2022 (exact greedy OBS per output).
  Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
  ICML 2023.
  Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda), 2023.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import allocation as allocation_lib
from jaxprune._src import calibration as calib_lib
from jaxprune._src import calibration_sites
from jaxprune._src import gauss_newton
from jaxprune._src import interpret
from jaxprune._src import masks as masks_lib
from jaxprune._src import obc as obc_lib
from jaxprune._src import obs as obs_lib
from jaxprune._src import progress as progress_lib
from jaxprune._src import refit as refit_lib
from jaxprune._src import select as select_lib
from jaxprune._src import sparsegpt as sparsegpt_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Prunable, PyTree

METHODS = ("magnitude", "wanda", "sparsegpt", "obc")
TARGETS = ("dense", "pruned")
ALLOCATIONS = ("global", "wanda", "obs", "uniform")


class Layer(NamedTuple):
  """What `oneshot` did to one kernel.

  Examples:
    >>> import jaxprune as jp
    >>> layer = jp.layerwise.Layer(path="['w']", sparsity=0.25, loss=1e-5)   # see oneshot
    >>> layer.path, layer.sparsity
    ("['w']", 0.25)

  Attributes:
    path: the kernel's leaf path.
    sparsity: the fraction of its entries pruned.
    loss: its layer reconstruction error ``trace(ΔWᵀ H ΔW)`` against the target weights,
      relative to the target's output energy ``trace(Wᵀ H W)``.
  """
  path: str
  sparsity: float
  loss: float


def _materialise(batches: Iterable[Any]) -> list:
  out = list(batches)
  if not out:
    raise ValueError("batches: expected at least one calibration batch, got an empty iterable.")
  return out


def _layer_sparsities(params: PyTree, paths: Sequence[str], sparsity: Any,
                      pattern: obs_lib.ParsedPattern, allocation: Any,
                      ranking: Callable[[], PyTree]) -> dict[str, float]:
  """Per-kernel sparsities: from the pattern, one ranking over all kernels (``ranking()`` gives
  the Wanda scores), or given per leaf."""
  leaves = dict(tree_lib.leaves_with_paths(params))
  if pattern.kind == "nm":
    obs_lib.check_nm_sparsity(sparsity, pattern)
    return {p: obs_lib.nm_sparsity(pattern) for p in paths}
  if isinstance(allocation, Mapping):
    missing = [p for p in paths if p not in allocation]
    if missing:
      raise validation.error("allocation", "a sparsity for every pruned kernel", "none",
                             missing[0])
    return {p: validation.check_fraction(allocation[p], "allocation", p) for p in paths}
  sparsity = validation.check_fraction(sparsity, "sparsity", allow_traced=False)
  if allocation == "uniform":
    return {p: sparsity for p in paths}
  if allocation in ("global", "wanda"):
    # Exactly round(s·N) over all pruned kernels, by magnitude or Wanda score: the layer sizes
    # this picks are what the per-layer solvers then reach exactly.
    ranked = leaves if allocation == "global" else dict(tree_lib.leaves_with_paths(ranking()))
    pruned = global_counts([np.abs(np.asarray(jax.device_get(ranked[p]), np.float32))
                            for p in paths], select_lib.num_to_prune(
                                sparsity, sum(leaves[p].size for p in paths)))
    return {p: k / leaves[p].size for p, k in zip(paths, pruned)}
  raise AssertionError(allocation)


def global_counts(scores: Sequence[np.ndarray], total: int) -> list[int]:
  """How many entries of each array one global ranking prunes, host side.

  The counts of `jaxprune.unstructured_mask` with ``scope="global"``: the ``total`` lowest
  scores over all arrays, NaN lowest, ties pruned from the last position of the concatenation
  backwards. One partition over the concatenated scores, no compiled program: the allocation
  needs only the counts, and a selection program over every kernel of a large model takes
  longer to compile than the ranking takes to run.

  Args:
    scores: float32 arrays.
    total: the number of entries to prune, ``0 <= total <= Σ size``.

  Returns:
    Per array, its number of pruned entries (summing to ``total``).
  """
  flat = [np.where(np.isnan(s), -np.inf, s).ravel() for s in scores]
  if total == 0:
    return [0] * len(flat)
  threshold = np.partition(np.concatenate(flat), total - 1)[total - 1]
  counts = [int(np.sum(f < threshold)) for f in flat]
  left = total - sum(counts)
  for i in reversed(range(len(flat))):  # ties at the threshold: later positions first
    take = min(left, int(np.sum(flat[i] == threshold)))
    counts[i] += take
    left -= take
  return counts


def _slices(x: Optional[jax.Array], site: Any) -> Optional[jax.Array]:
  """A kernel-shaped calibration array with a leading axis of layers (one for an unstacked
  kernel, one per slice of a kernel stacked along a scan)."""
  return x if x is None or site.loop_axes else x[None]


def _slice_counts(total: int, slices: int) -> list[int]:
  """``total`` removals split over equal slices, exactly, by differences of rounded cumulative
  targets."""
  cum = [0] + [round(total * (k + 1) / slices) for k in range(slices)]
  return [b - a for a, b in zip(cum, cum[1:])]


def _mask(scores: jax.Array, sparsity: float, pattern: obs_lib.ParsedPattern) -> jax.Array:
  """The library's own selection on an ``(inputs, outputs)`` score matrix: exact counts, ties."""
  if pattern.kind == "none":
    return masks_lib.unstructured_mask(scores, sparsity)
  if pattern.kind == "nm":
    return masks_lib.nm_mask(scores, pattern.a, pattern.b, axis=0)
  return masks_lib.block_mask(scores, sparsity, (pattern.a, pattern.b), reduce=pattern.reduce)


def solve_layer(method: str, w: jax.Array, h: jax.Array, sparsity: float,
                pattern: obs_lib.Pattern = None, *, refit: bool = False, damp: float = 0.01,
                block_size: int = 128) -> tuple[jax.Array, jax.Array]:
  """Prunes one kernel in its ``(inputs, outputs)`` view with one of `METHODS`.

  Args:
    method: one of `METHODS`.
    w: ``(d_in, d_out)`` float32 kernel.
    h: ``(d_in, d_in)`` calibration Gram matrix ``XᵀX``.
    sparsity: fraction of the entries (or, with a block pattern, of the tiles) to prune.
    pattern: any spelling of `obs.parse_pattern`, resolved against ``w``'s shape.
    refit: least-squares refit of the kept weights after the mask is chosen.
    damp: relative dampening of ``h``.
    block_size: SparseGPT's column block.

  Returns:
    ``(w', mask)``, ``w'`` zero where the bool mask is False.
  """
  pattern = obs_lib.layer_pattern(pattern, jnp.shape(w))
  if method in ("magnitude", "wanda"):
    scores = jnp.abs(w) if method == "magnitude" else obs_lib.wanda(w, h)
    mask = _mask(scores, sparsity, pattern)
    w_new = refit_lib.refit(w, h, mask, damp=damp) if refit else jnp.where(mask, w, 0)
    return w_new, mask
  if method == "sparsegpt":
    w_new, mask = sparsegpt_lib.sparsegpt(w, h, sparsity, pattern=pattern, block_size=block_size,
                                          damp=damp)
  else:
    w_new, mask = obc_lib.obc(w, h, sparsity, pattern=pattern, damp=damp)
  if refit:
    w_new = refit_lib.refit(w, h, mask, damp=damp)
  return jnp.where(mask, w_new, 0), mask


def wanda_scores(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any],
                 *, prunable: Prunable = None,
                 token_mask: Optional[Callable[[Any], jax.Array]] = None) -> PyTree:
  """Wanda importance ``|w_ij|·‖X_i‖₂`` of every prunable kernel, as an ordinary score pytree.

  ``‖X_i‖₂`` is the norm of input feature ``i`` of the kernel over the calibration tokens (Sun
  et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023). The result
  has the structure of ``params`` and works with `jaxprune.unstructured_mask`, `nm_mask` and as
  fixed scores for `jaxprune.prune`; unprunable leaves score ``|w|``.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]], np.float32)
    >>> params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> params["w"] = jnp.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]])
    >>> scores = jp.wanda_scores(apply_fn, params, [x])   # |w| · ‖x_i‖, all ‖x_i‖ = √6 here
    >>> jp.unstructured_mask(scores, 0.5)["w"].astype(int).tolist()
    [[1, 0], [0, 1], [1, 0], [0, 1]]

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: the parameters.
    batches: calibration batches.
    prunable: which leaves are scored from calibration (see `jaxprune.unstructured_mask`).
    token_mask: ``batch -> mask`` of the positions to calibrate on.

  Returns:
    float32 scores shaped like ``params``.
  """
  # Wanda reads only ‖X_i‖², the diagonal of H: O(d_in) memory per kernel.
  cal = calib_lib.calibrate(apply_fn, params, _materialise(batches), token_mask=token_mask,
                            prunable=prunable, diagonal=True)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for p, x in flat:
    path = tree_lib.path_str(p)
    if path in cal:
      site = cal[path].site
      ws = _slices(interpret.to_matrix(x, site).astype(jnp.float32), site)
      hs = _slices(cal[path].h, site)
      scores = jnp.stack([obs_lib.wanda(w, h) for w, h in zip(ws, hs)])
      out.append(interpret.from_matrix(scores if site.loop_axes else scores[0], site, x.shape))
    else:
      out.append(jnp.abs(jnp.asarray(x)).astype(jnp.float32))
  return jax.tree.unflatten(treedef, out)


def oneshot(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any],
            sparsity: Optional[float] = None, *, method: str = "sparsegpt",
            pattern: obs_lib.Pattern = None, prunable: Prunable = None,
            allocation: Union[str, Mapping[str, float]] = "global", refit: bool = False,
            target: str = "dense", sequential: bool = True,
            token_mask: Optional[Callable[[Any], jax.Array]] = None, damp: float = 0.01,
            block_size: int = 128, progress: Optional[bool] = None,
            return_layers: bool = False) -> Any:
  """Prunes a trained model at once from calibration data, updating the kept weights.

  Examples:
    A dense layer whose inputs 0 and 1 are always equal: SparseGPT removes input 0 and moves its
    weights onto input 1, so the outputs barely change.

    >>> import jax.numpy as jnp, numpy as np, optax, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]], np.float32)
    >>> params = {"w": jnp.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]]),
    ...           "b": jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> pruned, masks, layers = jp.oneshot(apply_fn, params, [x], 0.25, return_layers=True)
    >>> masks["w"].astype(int).tolist()
    [[0, 0], [1, 1], [1, 1], [1, 1]]
    >>> layers[0].sparsity, layers[0].loss < 1e-4   # relative reconstruction error
    (0.25, True)
    >>> tx = optax.chain(optax.adam(1e-4), jp.prune(0.25, masks=masks))   # fine-tune, masks kept

  A kernel stacked along a ``scan`` (``nn.scan`` layers) is pruned slice by slice, each slice
  with the ``H`` of its own iteration and exactly its share of the kernel's count; all slices of
  one kernel are pruned in the same stage, so a slice's inputs come from the model whose earlier
  stages, not earlier slices, are pruned.

  Args:
    apply_fn: ``apply_fn(params, batch)``; every prunable kernel must be an operand of a
      ``dot_general`` or ``conv_general_dilated`` in it (also inside one ``scan``).
    params: the trained parameters (not modified).
    batches: calibration batches (an iterable; read once per pruning stage).
    sparsity: fraction of the prunable entries to prune; ``None`` with an N:M pattern.
    method: ``"sparsegpt"`` (blocked OBS with lazy updates, default), ``"obc"`` (exact greedy
      OBS per output, for small layers), ``"wanda"`` (``|w|·‖x‖`` mask) or ``"magnitude"``
      (``|w|`` mask); the last two update no weight unless ``refit``.
    pattern: ``None`` / ``"unstructured"``; ``"n:m"`` (e.g. ``"2:4"``: N:M along each kernel's
      input features: rows of Dense kernels, input channels at one tap of convolutions);
      `jaxprune.NMPattern` (N:M along its ``axis``, which must be the kernel's innermost input
      axis); `jaxprune.BlockPattern` (blocks of the leaf's trailing dims, each a tile of the
      kernel's ``(inputs, outputs)`` view, removed whole; its ``reduce`` scores tiles for
      ``"magnitude"`` and ``"wanda"``); or ``("block", rows, cols)`` (tiles of that view). All
      methods choose the pattern inside their solver.
    prunable: which leaves are pruned (see `jaxprune.unstructured_mask`).
    allocation: how ``sparsity`` is split across kernels: ``"global"`` (one magnitude ranking
      over all kernels picks each kernel's count, ``round(s·N)`` in total), ``"wanda"`` (the
      same with one ranking of the dense model's Wanda scores ``|w|·‖x‖``), ``"obs"`` (counts
      minimising the sum of the layers' reconstruction errors, measured with the method's
      solver on the dense model's calibration inputs, each weighted by how much that layer's
      outputs move the model's outputs), ``"uniform"`` (the same fraction per
      kernel), or a mapping from leaf path to fraction.
    refit: after the mask is chosen, set the kept weights to their least-squares optimum.
    target: ``"dense"`` fits each layer to the dense model's outputs for that layer (its inputs
      still come from the pruned model); ``"pruned"`` to the outputs its own inputs give.
    sequential: collect each stage's inputs from the already-pruned model (else all from the
      dense model in one pass).
    token_mask: ``batch -> mask`` of the positions to calibrate on (e.g. no padding).
    damp: dampening, ``H + damp·mean(diag H)·I``.
    block_size: SparseGPT's column block.
    progress: a progress bar over the pruning stages (default: when stderr is a terminal).
    return_layers: also return one `Layer` record per kernel.

  Returns:
    ``(params, masks)`` (and the `Layer` list with ``return_layers``): new parameters with the
    pruned entries exactly 0, and bool masks (True = keep; all True on unpruned leaves).
  """
  validation.check_choice(method, METHODS, "method")
  validation.check_choice(target, TARGETS, "target")
  if not isinstance(allocation, Mapping):
    validation.check_choice(allocation, ALLOCATIONS, "allocation")
  pattern = obs_lib.parse_pattern(pattern)
  if sparsity is None and pattern.kind != "nm" and not isinstance(allocation, Mapping):
    raise validation.error("sparsity", "a fraction in [0, 1]", None)
  damp = float(validation.check_nonnegative(damp, "damp"))
  block_size = validation.check_int(block_size, "block_size", 1)
  batches = _materialise(batches)
  dense = params
  # One calibrator, and its one trace of apply_fn, for the sites, the stages, the allocation and
  # every stage's calibration; it resumes the forward pass where the last pruned kernels start
  # to matter instead of running the model from the start.
  calibrator = calib_lib.Calibrator(apply_fn, token_mask=token_mask, prunable=prunable)
  traced = calibrator.trace(params, batches[0])
  selected = calibration_sites.select_sites(traced, params, None, prunable, stacked=True)
  sites = {p: v[0] for p, v in selected.items()}
  paths = list(sites)
  patterns = {p: interpret.site_pattern(pattern, sites[p]) for p in paths}
  if allocation == "obs" and pattern.kind != "nm":
    per_layer = _obs_allocation(calibrator, params, batches, sites, float(
        validation.check_fraction(sparsity, "sparsity", allow_traced=False)), method, patterns,
                                refit, damp, block_size)
  else:
    per_layer = _layer_sparsities(params, paths, sparsity, pattern, allocation, lambda: (
        wanda_scores(apply_fn, params, batches, prunable=prunable, token_mask=token_mask)))
  stages = calibration_sites.stage_order(traced, selected) if sequential else [paths]

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  index = {tree_lib.path_str(p): i for i, (p, _) in enumerate(flat)}
  new_leaves = [x for _, x in flat]
  mask_leaves: list[Any] = [jnp.ones(jnp.shape(x), bool) for _, x in flat]
  layers: list[Layer] = []
  changed = False  # until a kernel changes, every input equals the dense model's
  for stage in progress_lib.progress(stages, desc="oneshot", enable=progress):
    current = jax.tree.unflatten(treedef, new_leaves)
    cal = calibrator(current, batches, kernels=stage,
                     reference_params=dense if target == "dense" and changed else None)
    for path in stage:
      i, site = index[path], sites[path]
      leaf = new_leaves[i]
      total = select_lib.num_to_prune(per_layer[path], leaf.size)
      if total == 0:
        layers.append(Layer(path, 0.0, 0.0))
        continue
      ws, dense_ws, cal_h, cross = (_slices(x, site) for x in (
          interpret.to_matrix(leaf, site).astype(jnp.float32),
          interpret.to_matrix(flat[i][1], site).astype(jnp.float32), cal[path].h,
          cal[path].cross if target == "dense" else None))
      outs, masks, loss, energy = [], [], 0.0, 0.0
      for k, count in enumerate(_slice_counts(total, len(ws))):
        w, h = ws[k], cal_h[k]
        if count == 0:
          outs.append(w)
          masks.append(jnp.ones(w.shape, bool))
          continue
        if cross is not None:
          w = obs_lib.dense_target(dense_ws[k], h, cross[k], damp=damp)
        w_new, mask = solve_layer(method, w, h, count / w.size, patterns[path], refit=refit,
                                  damp=damp, block_size=block_size)
        energy += float(obs_lib.layer_loss(jnp.zeros_like(w), w, h))
        loss += float(obs_lib.layer_loss(w, w_new, h))
        outs.append(w_new)
        masks.append(mask)
      w_new, mask = (jnp.stack(x) if site.loop_axes else x[0] for x in (outs, masks))
      new_leaves[i] = interpret.from_matrix(w_new, site, leaf.shape).astype(leaf.dtype)
      changed = True
      mask_leaves[i] = interpret.from_matrix(mask, site, leaf.shape)
      layers.append(Layer(path, 1.0 - float(jnp.mean(mask)), loss / max(energy, 1e-30)))
  out = (jax.tree.unflatten(treedef, new_leaves), jax.tree.unflatten(treedef, mask_leaves))
  return out + (layers,) if return_layers else out


OBS_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def _obs_allocation(calibrator: calib_lib.Calibrator, params: PyTree, batches: list,
                    sites: Mapping[str, Any], sparsity: float, method: str,
                    patterns: Mapping[str, obs_lib.ParsedPattern], refit: bool, damp: float,
                    block_size: int) -> dict[str, float]:
  """Per-kernel sparsities minimising the predicted change of the model's outputs.

  Each kernel's reconstruction error ``‖ΔY‖²`` is measured with the method's own solver on the
  dense model's calibration inputs at the sparsities of `OBS_GRID`, and weighted by how much
  that kernel's outputs move the model's outputs (`gauss_newton.output_sensitivity` per
  position and output feature), which puts every kernel's error in the same unit: the expected
  squared change of the outputs. The allocation then takes the cheapest change per pruned entry
  first over the curves' lower convex hulls (the equal-slope solution of
  `jaxprune.allocate_sparsities`), with exactly ``round(s·N)`` entries.

  References: Hassibi & Stork, 1993 (the OBS error); Frantar & Alistarh, "Optimal Brain
  Compression", 2022 (allocating sparsity over per-layer OBS errors).
  """
  leaves = dict(tree_lib.leaves_with_paths(params))
  paths = list(sites)
  cal = calibrator(params, batches, kernels=paths)
  sensitivity = gauss_newton.output_sensitivity(calibrator.apply_fn, params, batches, paths)
  grid = np.asarray(OBS_GRID)
  curves, sizes = [], []
  for path in paths:
    site = sites[path]
    ws = _slices(interpret.to_matrix(leaves[path], site).astype(jnp.float32), site)
    positions = float(np.sum(jax.device_get(cal[path].count)))
    weight = sensitivity[path] / max(positions * ws.shape[-1], 1e-30)
    errors = np.zeros(len(grid))
    for w, h in zip(ws, _slices(cal[path].h, site)):  # a stacked kernel's slices add up
      if method == "obc" and not refit:
        path_ = obc_lib.obc_path(w, h, pattern=patterns[path], damp=damp)
        errors += np.asarray(obc_lib.obc_losses(path_, grid))
      else:
        errors[1:] += [float(obs_lib.layer_loss(w, solve_layer(
            method, w, h, float(s), patterns[path], refit=refit, damp=damp,
            block_size=block_size)[0], h)) for s in grid[1:]]
    curves.append((grid, np.maximum.accumulate(errors * weight)))
    sizes.append(int(leaves[path].size))
  total = sum(sizes)
  counts = allocation_lib.solve_counts(curves, sizes, [1.0] * len(sizes),
                                       float(round(sparsity * total)), paths)
  return {p: k / n for p, k, n in zip(paths, counts, sizes)}
