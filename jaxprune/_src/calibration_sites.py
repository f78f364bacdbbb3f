"""Which kernels calibration reads, and in what order sequential pruning visits them.

`select_sites` picks the dot/conv sites (`jaxpr_sites.Site`) of the kernels to calibrate in a
traced model and checks that each kernel can be calibrated: read by ``apply_fn``, viewable as
``x @ W``, outside control flow other than one ``scan``, and, when its inputs are pooled, read
alike by all its sites. `stage_order` groups the selected kernels into dependency stages: a
kernel comes after every kernel whose outputs flow into its input.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax

from jaxprune._src import jaxpr_walk
from jaxprune._src import tree as tree_lib
from jaxprune._src.interpret import Traced
from jaxprune._src.jaxpr_sites import Site
from jaxprune._src.types import PyTree

Kernels = Union[None, str, Sequence[str]]


def select_sites(traced: Traced, params: PyTree, kernels: Kernels,
                 prunable: tree_lib.Prunable, *, pooled: bool = True,
                 stacked: bool = False) -> dict[str, list[Site]]:
  """Chooses the kernels to calibrate and checks that each can be.

  Args:
    traced: `interpret.trace` of ``apply_fn``.
    params: the parameters.
    kernels: paths to calibrate, or None for every prunable leaf read by a dot/conv site.
    prunable: the prunable specification (`jaxprune._src.tree.prunable_flags`).
    pooled: whether the sites of one kernel must share one layout (their inputs are pooled).
    stacked: whether sites inside one ``scan`` (not nested, not inside ``while`` or ``cond``)
      are accepted: stacked layers, or a kernel read at every iteration.

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
      if loops and not stacked:
        raise ValueError(f"kernels: {path} is read inside {loops[0]}; of the calibrated "
                         "computations only H (calibrate, oneshot) supports kernels inside "
                         "scan")
      if loops and loops != ["scan"]:
        raise ValueError(f"kernels: {path} is read inside {' > '.join(loops)}; calibration "
                         "supports kernels inside one scan (stacked layers), not inside while, "
                         "cond or nested scans")
    if pooled and len({s.layout for s in sites}) > 1:
      dims = sorted({(s.d_in, s.d_out) for s in sites})
      raise ValueError(f"kernels: {path} is read by {len(sites)} sites with different input "
                       f"layouts ((d_in, d_out) {dims}); calibration pools the inputs of one "
                       "kernel only across sites that use it alike")
  return {p: by_path[p] for p in chosen}


def stage_order(traced: Traced, selected: dict[str, list[Site]]) -> list[list[str]]:
  """`stages` of the kernels ``selected`` (`select_sites`) in an already traced model."""
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
