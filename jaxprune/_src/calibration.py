"""Calibration for layer-wise pruning: H = XᵀX over each kernel's input activations.

Layer-wise Optimal Brain Surgeon (Hassibi & Stork, 1993), OBC (Frantar & Alistarh, "Optimal
Brain Compression", 2022) and SparseGPT (Frantar & Alistarh, 2023) prune a linear layer
``y = x @ W`` by minimising the reconstruction error ``‖X W - X Ŵ‖²`` over calibration inputs
``X``, whose curvature is ``H = XᵀX``. `calibrate` finds every kernel's inputs in
``apply_fn(params, batch)`` through the jaxpr (`jaxpr_walk.find_sites`): Dense kernels ``(in,
out)``, ``(out, in)`` weights used as ``x @ W.T`` or ``W @ x``, einsum kernels such as ``(heads,
d_model, d_head)`` and convolution kernels in any layout (through their input patches). The rows
of ``H`` follow `interpret.to_matrix`'s rows.

Tokens are every position of the activation except its features (batch, sequence, image
positions). ``token_mask`` leaves out padding; ``H`` is a sum over tokens, not a mean, and
``count`` is the (weighted) number of tokens. A kernel read by several sites with the same layout
(a layer applied twice) pools all its uses: ``H`` and ``count`` sum over them. One function is
compiled per ``(apply_fn, kernels, token_mask)`` and batch shape, and reused across calls. A batch
sharded over a mesh's data axis gives the same ``H``, the reduction over tokens becoming a
cross-device sum in the compiled program.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxprune._src import interpret
from jaxprune._src import jaxpr_walk
from jaxprune._src import tree as tree_lib
from jaxprune._src.interpret import Traced
from jaxprune._src.jaxpr_walk import Site

PyTree = Any
Kernels = Union[None, str, Sequence[str]]


class Calibration(NamedTuple):
  """What calibration collected for one kernel.

  Attributes:
    h: ``(d_in, d_in)`` float32, ``Σ_t w_t x_t x_tᵀ`` over calibration tokens ``t`` (weights
      ``w_t`` from ``token_mask``, 1 without it).
    count: float32 scalar, ``Σ_t w_t`` (the number of tokens for a boolean mask).
    cross: ``(d_in, d_in)`` float32 ``Σ_t w_t x_t x̄_tᵀ`` with ``x̄`` the same site's input when
      ``apply_fn`` runs on ``reference_params``, or None without them.
    site: the kernel's `Site` (its first one when it is read several times, all alike).
  """
  h: jax.Array
  count: jax.Array
  cross: Optional[jax.Array]
  site: Site


def select_sites(traced: Traced, params: PyTree, kernels: Kernels,
                 prunable: tree_lib.Prunable, *, pooled: bool = True) -> dict[str, list[Site]]:
  """Chooses the kernels to calibrate and checks that each can be.

  Args:
    traced: `interpret.trace` of ``apply_fn``.
    params: the parameters.
    kernels: paths to calibrate, or None for every prunable leaf read by a dot/conv site.
    prunable: the prunable specification (`jaxprune._src.tree.prunable_flags`).
    pooled: whether the sites of one kernel must share one layout (their inputs are pooled).

  Returns:
    ``{path: sites}`` in leaf order.
  """
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  by_path: dict[str, list[Site]] = {}
  for s in traced.sites:
    by_path.setdefault(s.path, []).append(s)
  for i, (path, flag) in enumerate(zip(traced.paths, flags)):
    if flag and i not in traced.read:
      raise ValueError(f"params: prunable kernel {path} is never read by apply_fn; exclude it "
                       "with prunable= or pass the parameters apply_fn uses")
  if kernels is None:
    chosen = [p for p, f in zip(traced.paths, flags) if f and p in by_path]
    if not chosen:
      raise ValueError("apply_fn: expected a prunable kernel read by a dot_general or "
                       "conv_general_dilated, got none")
  else:
    wanted = {kernels} if isinstance(kernels, str) else set(kernels)
    for path in sorted(wanted - set(traced.paths)):
      raise ValueError(f"kernels: expected leaf paths of params such as {traced.paths[0]}, "
                       f"got {path}")
    for path in sorted(wanted - set(by_path)):
      raise ValueError(f"kernels: {path} is never read by apply_fn as an operand of a "
                       "dot_general or conv_general_dilated")
    chosen = [p for p in traced.paths if p in wanted]
  for path in chosen:
    sites = by_path[path]
    for s in sites:
      if s.problem:
        raise ValueError(f"kernels: {path} cannot be calibrated: {s.problem}")
      loops = [n for n in s.scope if n in jaxpr_walk.CONTROL_FLOW]
      if loops:
        raise ValueError(f"kernels: {path} is read inside {loops[0]}; stacked layers inside "
                         "scan (and kernels inside while or cond) are not supported by "
                         "calibration")
    if pooled and len({s.layout for s in sites}) > 1:
      dims = sorted({(s.d_in, s.d_out) for s in sites})
      raise ValueError(f"kernels: {path} is read by {len(sites)} sites with different input "
                       f"layouts ((d_in, d_out) {dims}); calibration pools the inputs of one "
                       "kernel only across sites that use it alike")
  return {p: by_path[p] for p in chosen}


def token_weights(mask: jax.Array, tokens: Sequence[int], path: str) -> jax.Array:
  """Broadcasts a token mask to a site's token dims ``tokens`` (float32).

  The mask's dims align with the leading token dims (a ``(batch,)`` mask covers ``(batch,
  seq)``); a mask with as many entries as there are tokens is reshaped to them (a model that
  flattens ``(batch, seq)`` before a layer).
  """
  tokens = tuple(tokens)
  m = jnp.asarray(mask, jnp.float32)
  if m.ndim <= len(tokens):
    shape = m.shape + (1,) * (len(tokens) - m.ndim)
    if all(a in (1, b) for a, b in zip(shape, tokens)):
      return jnp.broadcast_to(m.reshape(shape), tokens)
  if m.size == int(np.prod(tokens, dtype=np.int64)):
    return m.reshape(tokens)
  raise ValueError(f"token_mask: expected a mask broadcastable against the token dims {tokens} "
                   f"of the input of {path}, got shape {m.shape}")


def capture_inputs(traced: Traced, sites: Iterable[Site], leaves: Sequence[jax.Array],
                   batch: Any) -> dict[str, list[jax.Array]]:
  """Runs the traced function and returns each site's `interpret.site_inputs`, by kernel path."""
  xs: dict[str, list[jax.Array]] = {}

  def hook(ops: Sequence[jax.Array], out: jax.Array, site: Site) -> jax.Array:
    xs.setdefault(site.path, []).append(interpret.site_inputs(site, ops[1 - site.operand]))
    return out

  hooks = {s.location: functools.partial(hook, site=s) for s in sites}
  interpret.evaluate(traced.jaxpr, list(leaves) + jax.tree.leaves(batch), hooks)
  return xs


def gram(a: jax.Array, b: jax.Array) -> jax.Array:
  """``aᵀb`` in float32 over rows that may be sharded over a mesh (the result is replicated)."""
  mesh = getattr(jax.typeof(a).sharding, "mesh", None)
  out = None
  if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
    out = NamedSharding(mesh, PartitionSpec())  # explicit axes ask where the row sum lands
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32, out_sharding=out)


@functools.partial(jax.jit, static_argnames=("apply_fn", "kernels", "token_mask"))
def _step(acc: dict, params: PyTree, reference_params: Optional[PyTree], batch: Any, *,
          apply_fn: Callable[[PyTree, Any], Any], kernels: tuple[str, ...],
          token_mask: Optional[Callable[[Any], jax.Array]]) -> dict:
  """Adds one batch to ``acc``; compiled once per (apply_fn, kernels, token_mask, shapes)."""
  traced = interpret.trace(apply_fn, params, batch)
  selected = select_sites(traced, params, kernels, None)
  for path, sites in selected.items():
    if acc[path][0].shape != (sites[0].d_in,) * 2:
      raise ValueError(f"batches: expected every batch to give {path} inputs of "
                       f"{acc[path][0].shape[0]} features, got {sites[0].d_in}")
  sites = [s for group in selected.values() for s in group]
  mask = None if token_mask is None else token_mask(batch)
  xs = capture_inputs(traced, sites, jax.tree.leaves(params), batch)
  xd = None
  if reference_params is not None:
    xd = capture_inputs(traced, sites, jax.tree.leaves(reference_params), batch)
  new = {}
  for path, (h, count, cross) in acc.items():
    for j, x in enumerate(xs[path]):
      tokens = x.shape[:-1]
      w = (jnp.ones(tokens, jnp.float32) if mask is None
           else token_weights(mask, tokens, path)).reshape(-1, 1)
      x = x.reshape(-1, x.shape[-1])
      h = h + gram(x * w, x)
      count = count + jnp.sum(w)
      if xd is not None:
        cross = cross + gram(x * w, xd[path][j].reshape(x.shape))
    new[path] = (h, count, cross)
  return new


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
              prunable: tree_lib.Prunable = None) -> dict[str, Calibration]:
  """Accumulates ``H = Σ xxᵀ`` over calibration tokens for each kernel of ``apply_fn``.

  References: Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain
  Surgeon", 1993; Frantar & Alistarh, "Optimal Brain Compression", 2022.

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

  Returns:
    ``{path: Calibration}`` in leaf order.
  """
  first, batches = first_batch(batches)
  if reference_params is not None:
    tree_lib.check_same_structure(params, reference_params, "params", "reference_params")
  selected = select_sites(interpret.trace(apply_fn, params, first), params, kernels, prunable)
  acc = {}
  for path, sites in selected.items():
    zeros = jnp.zeros((sites[0].d_in, sites[0].d_in), jnp.float32)
    acc[path] = (zeros, jnp.zeros((), jnp.float32),
                 None if reference_params is None else zeros)
  for batch in batches:
    acc = _step(acc, params, reference_params, batch, apply_fn=apply_fn,
                kernels=tuple(selected), token_mask=token_mask)
  out = {}
  for path, (h, count, cross) in acc.items():
    for name, value in (("H", h), ("cross", cross)):
      if value is not None and not bool(jnp.all(jnp.isfinite(value))):
        raise ValueError(f"batches: the calibration {name} of {path} has NaN or inf entries "
                         "(bad calibration data or a diverging model)")
    out[path] = Calibration(h=h, count=count, cross=cross, site=selected[path][0])
  return out


def stages(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any,
           kernels: Kernels = None, *, prunable: tree_lib.Prunable = None) -> list[list[str]]:
  """Dependency stages for sequential (layer-by-layer) pruning.

  A kernel's stage is 1 + the largest stage of the kernels whose site outputs flow, through any
  operations, into its input (0 when none does). Kernels of one stage (the q, k and v
  projections of one attention block) can be calibrated together once every earlier stage is
  pruned. Loop carries are followed for one iteration.

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
  selected = select_sites(traced, params, kernels, prunable)
  at = {s.location: s for sites in selected.values() for s in sites}
  deps: dict[str, set[str]] = {p: set() for p in selected}
  union = lambda values: frozenset().union(*values)

  def on_eqn(eqn: Any, ins: list, ctx: jaxpr_walk.Context) -> Optional[list]:
    if jaxpr_walk.call_body(eqn) is not None or eqn.primitive.name in jaxpr_walk.CONTROL_FLOW:
      return None
    site = at.get(ctx.location)
    if site is not None:
      deps[site.path] |= ins[1 - site.operand]
      return [frozenset({site.path})]
    return [union(ins)] * len(eqn.outvars)

  rule = jaxpr_walk.Rule(eqn=on_eqn, opaque=lambda e, ins, ctx: [union(ins)] * len(e.outvars),
                         literal=lambda c: frozenset(), join=union, scan_in=lambda v: v,
                         scan_out=lambda v: v)
  jaxpr_walk.walk(traced.jaxpr, [frozenset()] * len(traced.jaxpr.jaxpr.invars), rule)

  level: dict[str, int] = {}

  def stage_of(path: str, seen: tuple[str, ...]) -> int:
    if path in seen:
      raise ValueError(f"kernels: {path} feeds its own input (a layer applied more than once in "
                       "sequence); it cannot be placed in one stage")
    if path not in level:
      level[path] = 1 + max((stage_of(d, seen + (path,)) for d in deps[path]), default=-1)
    return level[path]

  for path in selected:
    stage_of(path, ())
  out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
  for path in selected:
    out[level[path]].append(path)
  return out
