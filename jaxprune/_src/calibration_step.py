"""Running a traced model piecewise: segments of its top-level equations, compiled by structure.

Sequential (layer-by-layer) calibration asks for the inputs of a few kernels at a time, from a
model whose earlier kernels have just changed. A `Segment` is a run ``[start, stop)`` of the
top-level equations of `interpret.Traced.jaxpr`, as a function of the variables it reads (its
live-ins: parameter leaves, batch leaves, constants and activations computed before ``start``)
returning the activations still needed after each of its cut points and the inputs of its hooked
sites. Segments hash by their printed jaxpr, in which variables are named by order of appearance,
so the same computation on another layer's weights (the next block of a transformer) reuses one
compiled program: `run` is jitted with the segment as a static argument.

A `Cut` is the state of the forward pass before equation ``position``: every variable defined
before it and read at or after it. Resuming from a cut recomputes nothing before it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxprune._src import interpret
from jaxprune._src.interpret import Traced
from jaxprune._src.jaxpr_sites import Site
from jaxprune._src.jaxpr_walk import Location



class Cut(NamedTuple):
  """The forward pass stopped before top-level equation ``position``.

  Attributes:
    position: index of the next equation to run.
    env: value of every variable defined before ``position`` and read at or after it.
  """
  position: int
  env: dict


class Segment:
  """Top-level equations ``[start, stop)`` as a closed jaxpr with hooked sites.

  Equality and hash are those of ``key`` (the printed jaxpr and the hooks), so structurally
  identical segments share one compiled `run`.

  Attributes:
    jaxpr: closed jaxpr over the live-ins, returning the variables saved at each cut.
    sites: ``(location in jaxpr, Site)`` of each hooked site.
    key: the structural identity.
  """

  def __init__(self, jaxpr: Any, sites: Sequence[tuple[Location, Site]], key: str) -> None:
    self.jaxpr = jaxpr
    self.sites = tuple(sites)
    self.key = key
    self._hash = hash(key)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Segment) and self.key == other.key

  def __hash__(self) -> int:
    return self._hash


class Plan(NamedTuple):
  """A `Segment` and how to feed it and read it.

  Attributes:
    segment: the segment.
    inputs: per live-in, ``("leaf", i)``, ``("batch", j)``, ``("const", k)`` or ``("env", var)``.
    saves: per cut point, its position and the variables it keeps: ``(var, source)`` with source
      an output index of the segment or None for a variable carried over from the start cut.
  """
  segment: Segment
  inputs: tuple[tuple[str, Any], ...]
  saves: tuple[tuple[int, tuple[tuple[Any, Optional[int]], ...]], ...]


class Program:
  """Liveness facts about a `Traced` model, and its segments (memoised).

  Attributes:
    traced: the traced model.
    first_read: per parameter leaf, the first top-level equation that reads it (``size`` when
      none does).
    size: the number of top-level equations.
  """

  def __init__(self, traced: Traced) -> None:
    self.traced = traced
    inner = traced.jaxpr.jaxpr
    n = len(traced.paths)
    self._source: dict = {v: ("leaf", i) for i, v in enumerate(inner.invars[:n])}
    self._source.update({v: ("batch", j) for j, v in enumerate(inner.invars[n:])})
    self._source.update({v: ("const", k) for k, v in enumerate(inner.constvars)})
    self._defined: dict = {}
    self._last_use: dict = {}
    self.size = len(inner.eqns)
    first = [self.size] * n
    for i, eqn in enumerate(inner.eqns):
      for v in eqn.invars:
        if isinstance(v, jex_core.Literal):
          continue
        self._last_use[v] = i
        src = self._source.get(v)
        if src is not None and src[0] == "leaf":
          first[src[1]] = min(first[src[1]], i)
      for v in eqn.outvars:
        self._defined[v] = i
    self.first_read = tuple(first)
    self._plans: dict = {}

  def live(self, position: int, since: int = 0) -> list:
    """Variables defined in ``[since, position)`` and read at or after ``position``."""
    return [v for v, d in self._defined.items()
            if since <= d < position and self._last_use.get(v, -1) >= position]

  def plan(self, start: int, stop: int, saves: Sequence[int], sites: Sequence[Site]) -> Plan:
    """The segment ``[start, stop)`` keeping the state at each of ``saves`` and hooking ``sites``.

    Args:
      start: first equation (the position of the cut it resumes from).
      stop: one past the last equation; every site's top-level equation lies in between.
      saves: cut positions in ``(start, stop]`` whose state the segment returns.
      sites: the sites whose inputs it returns, in this order.

    Returns:
      A `Plan`.
    """
    memo = (start, stop, tuple(saves), tuple(s.location for s in sites))
    if memo not in self._plans:
      self._plans[memo] = self._make_plan(start, stop, saves, sites)
    return self._plans[memo]

  def _make_plan(self, start: int, stop: int, saves: Sequence[int],
                 sites: Sequence[Site]) -> Plan:
    inner = self.traced.jaxpr.jaxpr
    eqns = inner.eqns[start:stop]
    local = {v for e in eqns for v in e.outvars}
    ins: dict = {}
    for e in eqns:
      for v in e.invars:
        if not isinstance(v, jex_core.Literal) and v not in local and v not in ins:
          ins[v] = self._source.get(v, ("env", v))
    outs: list = []
    kept = []
    for q in saves:
      carried = [(v, None) for v in self.live(q) if self._defined[v] < start]
      computed = [(v, len(outs) + k) for k, v in enumerate(self.live(q, start))]
      outs += [v for v, _ in computed]
      kept.append((q, tuple(carried + computed)))
    hooks = tuple(((s.location[0] - start,) + s.location[1:], s) for s in sites)
    info = jex_core.DebugInfo("calibration segment", None, None, None)
    jaxpr = jex_core.Jaxpr([], list(ins), outs, eqns, debug_info=info)
    spec = repr([(loc, s.operand, s.d_in, s.primitive) for loc, s in hooks])
    consts = _inner_consts(eqns)
    segment = Segment(jex_core.ClosedJaxpr(jaxpr, []), hooks, f"{jaxpr}\n{spec}\n{consts}")
    return Plan(segment, tuple(ins.values()), tuple(kept))


def _inner_consts(eqns: Sequence[Any]) -> list[int]:
  """Identities of the constants closed over by sub-jaxprs, which their printed form omits."""
  found = []
  for eqn in eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          found += [id(c) for c in sub.consts] + _inner_consts(sub.jaxpr.eqns)
        elif isinstance(sub, jex_core.Jaxpr):
          found += _inner_consts(sub.eqns)
  return found


@functools.partial(jax.jit, static_argnums=0)
def run(segment: Segment, args: Sequence[jax.Array]) -> tuple[list, list]:
  """Evaluates a `Segment` on its live-in values (compiled once per structure and shapes).

  Args:
    segment: the segment.
    args: one value per live-in.

  Returns:
    ``(outputs, site inputs)``: the values the segment saves, and `interpret.site_inputs` of each
    hooked site, float32 ``(*tokens, d_in)``, for a site inside a ``scan`` stacked over its
    iterations, ``(iterations, *tokens, d_in)``.
  """
  def tap(ops: Sequence[jax.Array], out: jax.Array, site: Site) -> jax.Array:
    return interpret.site_inputs(site, ops[1 - site.operand])

  taps = {loc: functools.partial(tap, site=s) for loc, s in segment.sites}
  outs, found = interpret.evaluate_with_taps(segment.jaxpr, args, taps)
  return outs, [found[loc] for loc, _ in segment.sites]


def advance(program: Program, cuts: Sequence[Cut], limit: int, sites: Sequence[Site],
            leaves: Sequence[jax.Array], batch_leaves: Sequence[Any], keep: bool
            ) -> tuple[list[jax.Array], list[Cut], int]:
  """Runs the forward pass from the furthest usable cut through the equations of ``sites``.

  Args:
    program: the traced model.
    cuts: saved states of this batch.
    limit: resume at or before this position: the first equation reading a leaf that changed
      since ``cuts`` were taken (or earlier, to run the same segment as another parameter set).
    sites: the sites whose inputs are wanted.
    leaves: the parameter leaves.
    batch_leaves: the batch's leaves.
    keep: whether to return new cuts (else none are saved).

  Returns:
    ``(inputs per site, cuts to keep, position resumed from)``. The new cuts are the state just
    before the first equation reading one of the sites' kernels (where a run after pruning them
    resumes) and the state after the last site; at most two cuts are kept.
  """
  top = [s.location[0] for s in sites]
  bound = min(limit, min(top))
  usable = [c for c in cuts if c.position <= bound]
  start = max(usable, key=lambda c: c.position, default=Cut(0, {}))
  stop = max(top) + 1
  saves = []
  if keep:
    before = min(program.first_read[s.leaf] for s in sites)
    saves = [q for q in (before,) if start.position < q < stop] + [stop]
  plan = program.plan(start.position, stop, saves, sites)
  consts = program.traced.jaxpr.consts
  pick = {"leaf": lambda i: leaves[i], "batch": lambda j: batch_leaves[j],
          "const": lambda k: consts[k], "env": lambda v: start.env[v]}
  outs, xs = run(plan.segment, [pick[kind](ref) for kind, ref in plan.inputs])
  new = [Cut(q, {v: start.env[v] if k is None else outs[k] for v, k in kept})
         for q, kept in plan.saves]
  kept_cuts = sorted(usable + new, key=lambda c: c.position)[-2:] if keep else []
  return xs, kept_cuts, start.position


def token_weights(mask: Any, tokens: Sequence[int], path: str) -> np.ndarray:
  """Broadcasts a token mask to a site's token dims ``tokens`` (float32, on the host).

  The mask's dims align with the leading token dims (a ``(batch,)`` mask covers ``(batch,
  seq)``); a mask with as many entries as there are tokens is reshaped to them (a model that
  flattens ``(batch, seq)`` before a layer).
  """
  tokens = tuple(tokens)
  m = np.asarray(mask, np.float32)
  if m.ndim <= len(tokens):
    shape = m.shape + (1,) * (len(tokens) - m.ndim)
    if all(a in (1, b) for a, b in zip(shape, tokens)):
      return np.broadcast_to(m.reshape(shape), tokens)
  if m.size == int(np.prod(tokens, dtype=np.int64)):
    return m.reshape(tokens)
  raise ValueError(f"token_mask: expected a mask broadcastable against the token dims {tokens} "
                   f"of the input of {path}, got shape {m.shape}")


# Kept token rows are padded to a multiple of this, so that few row counts get compiled.
ROW_BLOCK = 256


def token_rows(weights: np.ndarray) -> tuple[Optional[np.ndarray], np.ndarray]:
  """The rows of ``weights`` (flattened) that count, for a Gram product over fewer rows.

  Padding tokens (weight 0) add nothing to ``XᵀX`` but cost as much as real ones; the kept rows
  are the nonzero weights, padded with zero-weight rows to a multiple of `ROW_BLOCK`.

  Args:
    weights: token weights (`token_weights`).

  Returns:
    ``(rows, row weights)``: int32 indices into the flattened tokens, or None for all of them.
  """
  w = np.asarray(weights, np.float32).reshape(-1)
  (nonzero,) = np.nonzero(w)
  size = -(-len(nonzero) // ROW_BLOCK) * ROW_BLOCK
  if size >= len(w):
    return None, w
  rows = np.zeros(size, np.int32)
  rows[:len(nonzero)] = nonzero
  kept = np.zeros(size, np.float32)
  kept[:len(nonzero)] = w[nonzero]
  return rows, kept


def gram(a: jax.Array, b: jax.Array) -> jax.Array:
  """``aᵀb`` in float32 over rows that may be sharded over a mesh (the result is replicated)."""
  mesh = getattr(jax.typeof(a).sharding, "mesh", None)
  out = None
  if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
    out = NamedSharding(mesh, PartitionSpec())  # explicit axes ask where the row sum lands
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32, out_sharding=out)


def gram_diagonal(a: jax.Array, b: jax.Array) -> jax.Array:
  """The diagonal of ``aᵀb``, ``Σ_t a_ti b_ti``, like `gram` over rows that may be sharded."""
  mesh = getattr(jax.typeof(a).sharding, "mesh", None)
  out = None
  if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
    out = NamedSharding(mesh, PartitionSpec())
  return lax.dot_general(a, b, (((0,), (0,)), ((1,), (1,))), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32, out_sharding=out)


@functools.partial(jax.jit, static_argnames=("diagonal", "lead", "stacked"))
def accumulate(acc: tuple[jax.Array, jax.Array, Optional[jax.Array]], x: jax.Array,
               reference: Optional[jax.Array], rows: Optional[jax.Array],
               weights: Optional[jax.Array], *, diagonal: bool = False, lead: int = 0,
               stacked: bool = False) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
  """Adds one site's inputs to ``(H, count, cross)``.

  Args:
    acc: ``(h, count, cross)``, cross None without reference inputs.
    x: ``(*tokens, d)`` inputs, after ``lead`` axes of scan iterations.
    reference: the same site's inputs under the reference parameters, or None.
    rows: which of the flattened tokens to use (`token_rows`), or None for all.
    weights: one weight per used token, or None for all ones.
    diagonal: ``h`` is the ``(d,)`` diagonal only.
    lead: 1 for the inputs of a site inside a ``scan``, stacked over its iterations, else 0.
    stacked: with ``lead``, one ``h`` per iteration (a kernel stacked along the scan, sliced
      per iteration); otherwise the iterations are pooled as more tokens.

  Returns:
    ``(h + xᵀ diag(w) x, count + Σ w, cross + xᵀ diag(w) x̄)``; with ``diagonal`` the first
    term is ``h + Σ_t w_t x_t²``; with ``stacked`` every term has a leading iteration axis
    except the count, the tokens of one iteration.
  """
  h, count, cross = acc
  d = x.shape[-1]
  stack = x.shape[:lead]
  x2 = x.reshape(*stack, -1, d)
  if rows is not None:
    x2 = jnp.take(x2, rows, axis=lead)
  w = (jnp.ones(x2.shape[lead:-1], jnp.float32) if weights is None else weights).reshape(-1, 1)
  xd = None
  if reference is not None:
    xd = reference.reshape(*stack, -1, d)
    xd = xd if rows is None else jnp.take(xd, rows, axis=lead)
  if not stacked:  # pool the iterations of a kernel read at every one of them
    x2 = x2.reshape(-1, d)
    w = jnp.tile(w, (int(np.prod(stack, dtype=np.int64)), 1))
    xd = None if xd is None else xd.reshape(-1, d)
  product = gram_diagonal if diagonal else gram
  if stacked:
    product = jax.vmap(product)
  h = h + product(x2 * w, x2)
  if xd is not None:
    cross = cross + (jax.vmap(gram) if stacked else gram)(x2 * w, xd)
  return h, count + jnp.sum(w), cross
