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

import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxprune._src import calibration as calib_lib
from jaxprune._src import calibration_sites
from jaxprune._src import gauss_newton
from jaxprune._src import interpret
from jaxprune._src import layer_solve
from jaxprune._src import oneshot_allocation
from jaxprune._src import obs as obs_lib
from jaxprune._src import progress as progress_lib
from jaxprune._src import select as select_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Prunable, PyTree

METHODS = layer_solve.METHODS
TARGETS = ("dense", "pruned")
ALLOCATIONS = oneshot_allocation.ALLOCATIONS


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
      ws = layer_solve.slices(interpret.to_matrix(x, site).astype(jnp.float32), site)
      hs = layer_solve.slices(cal[path].h, site)
      scores = jnp.stack([obs_lib.wanda(w, h) for w, h in zip(ws, hs)])
      out.append(interpret.from_matrix(scores if site.loop_axes else scores[0], site, x.shape))
    else:
      out.append(jnp.abs(jnp.asarray(x)).astype(jnp.float32))
  return jax.tree.unflatten(treedef, out)


def _ranking(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: list,
             paths: list[str], prunable: Prunable,
             token_mask: Optional[Callable[[Any], jax.Array]], name: str) -> dict[str, Any]:
  """``{path: scores}`` that the ``"wanda"`` or ``"obd"`` allocation ranks over all kernels."""
  if name == "wanda":
    scores = wanda_scores(apply_fn, params, batches, prunable=prunable, token_mask=token_mask)
    return dict(tree_lib.leaves_with_paths(scores))
  leaves = dict(tree_lib.leaves_with_paths(params))
  # One probe per batch: each saliency sums over every calibration position, which averages the
  # probes' noise, and the pass then costs about one forward and backward run of the batches.
  diag = gauss_newton.output_diag(apply_fn, params, batches, paths, num_probes=1)
  return {p: jnp.square(jnp.asarray(leaves[p], jnp.float32)) * diag[p] for p in paths}


def oneshot(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any],
            sparsity: Optional[float] = None, *, method: str = "sparsegpt",
            pattern: obs_lib.Pattern = None, prunable: Prunable = None,
            allocation: Union[str, Mapping[str, float]] = "obd", refit: bool = False,
            target: str = "dense", sequential: bool = True,
            token_mask: Optional[Callable[[Any], jax.Array]] = None, damp: float = 0.1,
            block_size: int = 32, progress: Optional[bool] = None,
            return_layers: bool = False) -> Any:
  """Prunes a trained model at once from calibration data, updating the kept weights.

  Examples:
    A dense layer whose inputs 0 and 1 are always equal: SparseGPT removes input 0 and moves its
    weights onto input 1, so the outputs barely change. Four rows are all the calibration data
    here, so the ridge towards the old weights is made lighter than the default.

    >>> import jax.numpy as jnp, numpy as np, optax, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]], np.float32)
    >>> params = {"w": jnp.array([[1.0, -0.5], [0.5, 1.0], [-2.0, 0.25], [0.25, 2.0]]),
    ...           "b": jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> pruned, masks, layers = jp.oneshot(apply_fn, params, [x], 0.25, damp=0.01,
    ...                                    return_layers=True)
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
    allocation: how ``sparsity`` is split across kernels, ``round(s·N)`` in total: ``"obd"``
      (default: one ranking over all kernels of the Optimal Brain Damage saliencies
      ``w²·G_ii``, ``G`` the Gauss–Newton matrix of the change of the model's floating outputs,
      estimated from the dense model with one Rademacher probe per calibration batch; unlike
      magnitudes these are comparable across kernels whose scales trade off, as a query and a
      key kernel's do; it costs one more forward and backward pass over the batches and needs
      ``apply_fn`` differentiable with a floating output), ``"global"`` (the same with one
      magnitude ranking), ``"wanda"`` (the same with the dense model's Wanda scores
      ``|w|·‖x‖``), ``"obs"`` (counts minimising the sum of the layers' reconstruction errors,
      measured with the method's solver on the dense model's calibration inputs, each weighted
      by how much that layer's outputs move the model's outputs), ``"uniform"`` (the same
      fraction per kernel), or a mapping from leaf path to fraction.
    refit: after the mask is chosen, set the kept weights to their least-squares optimum.
    target: ``"dense"`` fits each layer to the dense model's outputs for that layer (its inputs
      still come from the pruned model); ``"pruned"`` to the outputs its own inputs give.
    sequential: collect each stage's inputs from the already-pruned model (else all from the
      dense model in one pass).
    token_mask: ``batch -> mask`` of the positions to calibrate on (e.g. no padding).
    damp: dampening, ``H + damp·mean(diag H)·I``: a ridge towards the original weights. Larger
      than the layer solvers' 0.01 because a few hundred calibration samples give some layers
      hardly more tokens than inputs, and their reconstruction then fits the calibration data
      rather than the model (``benchmarks/results/oneshot.txt``, ``pretrained.txt``).
    block_size: SparseGPT's block of inputs, within which each mask is chosen and across which
      updates are applied lazily; smaller blocks choose the mask from more up-to-date weights.
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
  # One calibrator, and its one trace of apply_fn, for the sites, the stages and every stage's
  # calibration; it resumes the forward pass where the last pruned kernels start to matter
  # instead of running the model from the start. The "wanda", "obd" and "obs" allocations trace
  # once more: a diagonal-only calibration (O(d_in) per kernel, where the calibrator would hold
  # every full H at once), the output Gauss-Newton pass and the output-sensitivity pass.
  calibrator = calib_lib.Calibrator(apply_fn, token_mask=token_mask, prunable=prunable)
  traced = calibrator.trace(params, batches[0])
  selected = calibration_sites.select_sites(traced, params, None, prunable, stacked=True)
  sites = {p: v[0] for p, v in selected.items()}
  paths = list(sites)
  patterns = {p: interpret.site_pattern(pattern, sites[p]) for p in paths}
  if allocation == "obs" and pattern.kind != "nm":
    fraction = float(validation.check_fraction(sparsity, "sparsity", allow_traced=False))
    per_layer = oneshot_allocation.obs_allocation(calibrator, params, batches, sites, fraction,
                                                  method, patterns, refit, damp, block_size)
  else:
    per_layer = oneshot_allocation.layer_sparsities(
        params, paths, sparsity, pattern, allocation,
        functools.partial(_ranking, apply_fn, params, batches, paths, prunable, token_mask))
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
      ws, dense_ws, cal_h, cross = (layer_solve.slices(x, site) for x in (
          interpret.to_matrix(leaf, site).astype(jnp.float32),
          interpret.to_matrix(flat[i][1], site).astype(jnp.float32), cal[path].h,
          cal[path].cross if target == "dense" else None))
      outs, masks, loss, energy = [], [], 0.0, 0.0
      for k, count in enumerate(layer_solve.slice_counts(total, len(ws))):
        w, h = ws[k], cal_h[k]
        if count == 0:
          outs.append(w)
          masks.append(jnp.ones(w.shape, bool))
          continue
        if cross is not None:
          w = obs_lib.dense_target(dense_ws[k], h, cross[k], damp=damp)
        w_new, mask = layer_solve.solve_layer(method, w, h, count / w.size, patterns[path],
                                              refit=refit, damp=damp, block_size=block_size)
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
