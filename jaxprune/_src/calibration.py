"""Calibration for layer-wise pruning: H = XᵀX over each kernel's input activations.

Layer-wise Optimal Brain Surgeon (Hassibi & Stork, 1993), OBC (Frantar & Alistarh, "Optimal
Brain Compression", 2022) and SparseGPT (Frantar & Alistarh, 2023) prune a linear layer
``y = x @ W`` by minimising the reconstruction error ``‖X W - X Ŵ‖²`` over calibration inputs
``X``, whose curvature is ``H = XᵀX``. `calibrate` finds every kernel's inputs in
``apply_fn(params, batch)`` through the jaxpr (`jaxpr_sites.find_sites`): Dense kernels ``(in,
out)``, ``(out, in)`` weights used as ``x @ W.T`` or ``W @ x``, einsum kernels such as ``(heads,
d_model, d_head)`` and convolution kernels in any layout (through their input patches). The rows
of ``H`` follow `interpret.to_matrix`'s rows.

Tokens are every position of the activation except its features (batch, sequence, image
positions). ``token_mask`` leaves out padding; ``H`` is a sum over tokens, not a mean, and
``count`` is the (weighted) number of tokens. A kernel read by several sites with the same layout
(a layer applied twice) pools all its uses: ``H`` and ``count`` sum over them, as do the
iterations of a ``scan`` whose body reads a kernel it closes over. A kernel stacked along a
``scan`` (scanned over, one layer per slice of its leading axis, as ``nn.scan`` stacks them) gets
one ``H`` per slice, from the inputs of its own iteration. A batch sharded
over a mesh's data axis gives the same ``H``, the reduction over tokens becoming a cross-device
sum in the compiled program.

The forward pass runs in segments of the jaxpr (`calibration_step`), compiled once per segment
structure and batch shape: a `Calibrator` held across the stages of sequential pruning compiles
the segments of a repeated block once for all blocks and resumes each call from the state just
before the kernels that changed. Which kernels are calibrated, and the dependency order of
`stages`, come from `calibration_sites`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import numpy as np

from jaxprune._src import calibration_step
from jaxprune._src import interpret
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.calibration_sites import Kernels, select_sites, stage_order
from jaxprune._src.interpret import Traced
from jaxprune._src.jaxpr_sites import Site

PyTree = Any

gram = calibration_step.gram
token_weights = calibration_step.token_weights


class Calibration(NamedTuple):
  """What calibration collected for one kernel.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]], np.float32)
    >>> params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> cal = jp.layerwise.calibrate(apply_fn, params, [x])["['w']"]
    >>> float(cal.count), cal.h.shape, cal.cross is None
    (4.0, (4, 4), True)

  Attributes:
    h: ``(d_in, d_in)`` float32, ``Σ_t w_t x_t x_tᵀ`` over calibration tokens ``t`` (weights
      ``w_t`` from ``token_mask``, 1 without it); with ``diagonal=True`` only its diagonal,
      ``(d_in,)`` ``Σ_t w_t x_t²``. A kernel stacked along a ``scan`` (one layer per slice of
      its leading axis, as ``nn.scan`` stacks them) has one per slice, ``(slices, ...)``.
    count: float32 scalar, ``Σ_t w_t`` (the number of tokens for a boolean mask; of one slice
      for a stacked kernel, and summed over the iterations for a kernel read at each).
    cross: ``(d_in, d_in)`` float32 ``Σ_t w_t x_t x̄_tᵀ`` with ``x̄`` the same site's input when
      ``apply_fn`` runs on ``reference_params``, or None without them (per slice if stacked).
    site: the kernel's `Site` (its first one when it is read several times, all alike).
  """
  h: jax.Array
  count: jax.Array
  cross: Optional[jax.Array]
  site: Site


class _Batch(NamedTuple):
  """What a `Calibrator` keeps of one batch for one parameter set."""
  program: calibration_step.Program
  leaves: tuple
  cuts: list[calibration_step.Cut]


class Calibrator:
  """`calibrate` that reuses compiled programs and forward-pass states across calls.

  Sequential pruning calibrates a few kernels at a time (`stages`), each time on a model whose
  earlier kernels were just pruned. A Calibrator keeps, per batch and per parameter set (params
  and reference params), the state of the forward pass just before the first use of the kernels
  it last calibrated and just after their sites (`calibration_step.Cut`). The next call compares
  the parameter leaves with those the states were taken with (by identity, then by value) and
  resumes from the furthest state that no changed leaf feeds: each stage runs only the layers
  from the previous stage's kernels to its own, not the whole model. The reference pass resumes
  at the same place, so both run one program. Programs are compiled per segment structure and
  batch shape: the segments of repeated blocks are one program whatever the depth of the model.

  Batches are recognised by identity: pass the same batch objects on every call and do not
  modify them, or numpy parameter leaves, in place. The kept states hold activations of every
  batch (about two layers' worth each).

  Examples:
    >>> import jax.numpy as jnp, numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]], np.float32)
    >>> params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> calibrator = jp.layerwise.Calibrator(apply_fn)
    >>> cal = calibrator(params, [x[:2], x[2:]])
    >>> cal["['w']"].h[0].tolist()
    [6.0, 6.0, 4.0, 3.0]

    Sequential pruning, stage by stage, each stage's inputs taken from the model whose earlier
    stages are pruned (new arrays for the pruned kernels, the other leaves as they are):

    >>> params = {"a": jnp.arange(12.0).reshape(4, 3) - 5, "b": jnp.ones((3, 2))}
    >>> apply_fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    >>> calibrator = jp.layerwise.Calibrator(apply_fn)
    >>> for stage in jp.layerwise.stages(apply_fn, params, x):   # [["['a']"], ["['b']"]]
    ...   cal = calibrator(params, [x], kernels=stage)
    ...   for path in stage:
    ...     name = path.strip("[]'")
    ...     w, _ = jp.layerwise.sparsegpt(params[name], cal[path].h, 0.5)
    ...     params = {**params, name: w}
    >>> float(jp.sparsity(params))
    0.5

  Attributes:
    apply_fn: ``apply_fn(params, batch)``.
    token_mask: see `calibrate`.
    prunable: see `calibrate`.
    resume: whether states are kept between calls (False: every call runs from the start).
    diagonal: see `calibrate`.
  """

  def __init__(self, apply_fn: Callable[[PyTree, Any], Any], *,
               token_mask: Optional[Callable[[Any], jax.Array]] = None,
               prunable: tree_lib.Prunable = None, resume: bool = True,
               diagonal: bool = False) -> None:
    if not isinstance(diagonal, bool):
      raise validation.error("diagonal", "a bool", diagonal)
    self.apply_fn = apply_fn
    self.token_mask = token_mask
    self.prunable = prunable
    self.resume = resume
    self.diagonal = diagonal
    self._programs: dict = {}
    self._sets: dict[str, tuple[list, dict[int, _Batch]]] = {}

  def _program(self, params: PyTree, batch: Any) -> calibration_step.Program:
    key = tuple((jax.tree.structure(t), tuple(jax.typeof(x) for x in jax.tree.leaves(t)))
                for t in (params, batch))
    if key not in self._programs:
      self._programs[key] = calibration_step.Program(interpret.trace(self.apply_fn, params, batch))
    return self._programs[key]

  def trace(self, params: PyTree, batch: Any) -> Traced:
    """``apply_fn`` traced on arguments shaped like ``(params, batch)``, the trace every call on
    such arguments reuses (one trace per parameter and batch structure and shapes)."""
    return self._program(params, batch).traced

  def _changed(self, name: str, leaves: list) -> Optional[list[int]]:
    """Indices of the leaves that differ from those the kept states of ``name`` were taken with."""
    if name not in self._sets:
      return None
    old = self._sets[name][0]
    if len(old) != len(leaves):
      return None
    return [i for i, (a, b) in enumerate(zip(old, leaves)) if a is not b and not (
        np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b)))]

  def _inputs(self, name: str, index: int, program: calibration_step.Program,
              sites: list[Site], leaves: list, batch_leaves: list,
              changed: Optional[list[int]], align: int, kept: dict[int, _Batch]
              ) -> tuple[list[jax.Array], int]:
    """The sites' inputs under parameter set ``name`` and where its forward pass resumed."""
    old = self._sets.get(name, ([], {}))[1].get(index)
    cuts, limit = [], 0
    if (old is not None and changed is not None and old.program is program
        and len(old.leaves) == len(batch_leaves)
        and all(a is b for a, b in zip(old.leaves, batch_leaves))):
      cuts = old.cuts
      limit = min([program.first_read[i] for i in changed] + [align])
    xs, new, start = calibration_step.advance(program, cuts, limit, sites, leaves, batch_leaves,
                                              self.resume)
    if self.resume:
      kept[index] = _Batch(program, tuple(batch_leaves), new)
    return xs, start

  def __call__(self, params: PyTree, batches: Iterable[Any], *, kernels: Kernels = None,
               reference_params: Optional[PyTree] = None) -> dict[str, Calibration]:
    """Calibrates ``kernels`` on ``batches``; arguments and results as in `calibrate`."""
    first, batches = first_batch(batches)
    if reference_params is not None:
      if self.diagonal:
        raise ValueError("reference_params: expected None with diagonal=True (the cross term "
                         "is a full matrix), got a parameter tree.")
      tree_lib.check_same_structure(params, reference_params, "params", "reference_params")
    sets = [("params", jax.tree.leaves(params))]
    if reference_params is not None:
      sets.append(("reference", jax.tree.leaves(reference_params)))
    selected = select_sites(self._program(params, first).traced, params, kernels, self.prunable,
                            stacked=True)
    acc = {}
    for path, sites in selected.items():
      d, stack = sites[0].d_in, (sites[0].slices,) if sites[0].loop_axes else ()
      acc[path] = (np.zeros(stack + ((d,) if self.diagonal else (d, d)), np.float32),
                   np.zeros((), np.float32),
                   None if reference_params is None else np.zeros(stack + (d, d), np.float32))
    changed = {name: self._changed(name, leaves) for name, leaves in sets}
    kept: dict[str, dict[int, _Batch]] = {name: {} for name, _ in sets}
    try:
      for index, batch in enumerate(batches):
        program = self._program(params, batch)
        by_path = select_sites(program.traced, params, tuple(selected), None, stacked=True)
        for path, group in by_path.items():
          if acc[path][0].shape[-1] != group[0].d_in:
            raise ValueError(f"batches: expected every batch to give {path} inputs of "
                             f"{acc[path][0].shape[-1]} features, got {group[0].d_in}")
        sites = [s for group in by_path.values() for s in group]
        batch_leaves = jax.tree.leaves(batch)
        # The reference pass resumes where the pass under params did: one segment, one program.
        align, xs = program.size, []
        for name, leaves in sets:
          x, align = self._inputs(name, index, program, sites, leaves, batch_leaves,
                                  changed[name], align, kept[name])
          xs.append(x)
        mask = None if self.token_mask is None else self.token_mask(batch)
        rows: dict[tuple[int, ...], tuple[Optional[np.ndarray], np.ndarray]] = {}
        for k, s in enumerate(sites):
          x = xs[0][k]
          lead = int("scan" in s.scope)  # inputs inside a scan come stacked over its iterations
          tokens = x.shape[lead:-1]
          if mask is not None and tokens not in rows:
            w = token_weights(mask, tokens, s.path)
            # Selecting rows would gather a sharded batch onto every device.
            sharded = len(x.sharding.device_set) > 1
            rows[tokens] = (None, w.reshape(-1)) if sharded else calibration_step.token_rows(w)
          used, w = rows.get(tokens, (None, None))
          acc[s.path] = calibration_step.accumulate(
              acc[s.path], x, xs[1][k] if len(xs) > 1 else None, used, w,
              diagonal=self.diagonal, lead=lead, stacked=bool(s.loop_axes))
    finally:
      # States of batches this call did not reach were taken with other parameters.
      self._sets = {name: (leaves, kept[name]) for name, leaves in sets} if self.resume else {}
    out = {}
    for path, (h, count, cross) in acc.items():
      for name, value in (("H", h), ("cross", cross)):
        if value is not None and not np.isfinite(np.asarray(value)).all():
          raise ValueError(f"batches: the calibration {name} of {path} has NaN or inf entries "
                           "(bad calibration data or a diverging model)")
      out[path] = Calibration(h=h, count=count, cross=cross, site=selected[path][0])
    return out


def first_batch(batches: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
  """The first batch and an iterator over all of them (ValueError when there is none)."""
  batches = iter(batches)
  try:
    first = next(batches)
  except StopIteration:
    raise ValueError("batches: expected at least one batch, got an empty iterable") from None
  return first, itertools.chain([first], batches)


def calibrate(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any], *,
              kernels: Kernels = None,
              token_mask: Optional[Callable[[Any], jax.Array]] = None,
              reference_params: Optional[PyTree] = None,
              prunable: tree_lib.Prunable = None,
              diagonal: bool = False) -> dict[str, Calibration]:
  """Accumulates ``H = Σ xxᵀ`` over calibration tokens for each kernel of ``apply_fn``.

  One call, streaming over ``batches``; sequential pruning, which calibrates stage after stage,
  should hold one `Calibrator` instead.

  References: Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain
  Surgeon", 1993; Frantar & Alistarh, "Optimal Brain Compression", 2022.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, jaxprune as jp
    >>> x = np.array([[1, 1, 0, 2], [2, 2, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]], np.float32)
    >>> params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> cal = jp.layerwise.calibrate(apply_fn, params, [x[:2], x[2:]])   # two batches
    >>> list(cal), float(cal["['w']"].count)
    (["['w']"], 4.0)
    >>> np.array_equal(cal["['w']"].h, x.T @ x)
    True

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: parameter pytree (the model the inputs are taken from, e.g. already partly pruned).
    batches: an iterable of batches (each one argument of ``apply_fn``).
    kernels: leaf paths (`jax.tree_util.keystr` style) to calibrate; None for every prunable
      leaf read as a dot/conv operand. Only these ``H`` are held.
    token_mask: ``batch -> bool or float array`` weighting tokens (0 leaves out padding); its
      dims align with the leading token dims of each kernel's input (see `token_weights`).
    reference_params: parameters with the structure of ``params`` (e.g. the dense model); when
      given, ``cross`` pairs each input with the same site's input under them.
    prunable: which leaves are prunable (None: floating, ``ndim >= 2``; a predicate or a bool
      pytree); used when ``kernels`` is None.
    diagonal: accumulate only the diagonal of ``H``, ``Σ x²`` per input feature (``O(d_in)``
      memory: all Wanda needs); not with ``reference_params``.

  Returns:
    ``{path: Calibration}`` in leaf order.
  """
  calibrator = Calibrator(apply_fn, token_mask=token_mask, prunable=prunable, resume=False,
                          diagonal=diagonal)
  return calibrator(params, batches, kernels=kernels, reference_params=reference_params)


def stages(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any,
           kernels: Kernels = None, *, prunable: tree_lib.Prunable = None) -> list[list[str]]:
  """Dependency stages for sequential (layer-by-layer) pruning.

  A kernel's stage is 1 + the largest stage of the kernels whose site outputs flow, through any
  operations, into its input (0 when none does). Kernels of one stage (the q, k and v
  projections of one attention block) can be calibrated together once every earlier stage is
  pruned. Loop carries are followed for one iteration.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"a": jnp.ones((4, 3)), "b": jnp.ones((3, 2))}
    >>> apply_fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    >>> jp.layerwise.stages(apply_fn, params, jnp.ones((1, 4)))   # b's inputs depend on a
    [["['a']"], ["['b']"]]

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: parameter pytree.
    batch: one batch (only its shapes matter).
    kernels: the kernels to order (paths), or None for the default ones of `calibrate`.
    prunable: as in `calibrate`.

  Returns:
    The stages, each a list of paths in leaf order.
  """
  traced = interpret.trace(apply_fn, params, batch)
  return stage_order(traced, select_sites(traced, params, kernels, prunable, stacked=True))
