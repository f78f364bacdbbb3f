"""The walk that builds a group graph: axis identities propagated through a model's jaxpr.

`trace_graph` traces ``apply_fn(variables, *args)`` with `jax.make_jaxpr` and walks it
(`jaxpr_walk.walk`) over `Axes` values: every axis of every intermediate array gets a label in a
`group_graph.Graph`, and each primitive's coupling rule (`group_rules`) unites the labels of
axes that must be pruned together. Axes that reach a model input or output or a constant, and
the axes a ``scan`` stacks or scans over, are pinned; a primitive without a rule poisons the
classes of its operands and results. `groups.find_groups` reads the classes into groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax

from jaxprune._src import group_rules
from jaxprune._src import jaxpr_walk
from jaxprune._src import tree as tree_lib
from jaxprune._src.group_graph import Graph, Label, Unsupported


# An axis no group may contain whose length only the equation reading it knows (the stacked axis
# of a scan's outputs); that equation gives it a fresh pinned node.
PINNED = ("pinned",)


class Axes(NamedTuple):
  """The walker's value of one variable.

  Attributes:
    labels: one label (or `PINNED`) per axis; None for a constant, every axis pinned.
    data: whether the variable depends on a model input.
  """
  labels: Optional[tuple[Label, ...]]
  data: bool


def _operand_labels(g: Graph, eqn: Any, ins: Sequence[Axes]) -> list[list[Label]]:
  """Operand labels with constants and `PINNED` axes given fresh pinned nodes."""
  out = []
  for v, x in zip(eqn.invars, ins):
    shape = group_rules.shape_of(v)
    labs = [PINNED] * len(shape) if x.labels is None else list(x.labels)
    for i, lab in enumerate(labs):
      if lab is PINNED:
        labs[i] = g.new(shape[i])
        g.mark(labs[i], "pin", "constant or stacked axis")
    out.append(labs)
  return out


def _apply_rule(g: Graph, eqn: Any, ins: Sequence[Axes]) -> list[Axes]:
  """Applies ``eqn``'s table rule; an unknown primitive or coupling poisons operands and results.

  Args:
    g: the graph.
    eqn: a first-order equation (or one whose sub-jaxpr cannot be entered).
    ins: the operands' values.

  Returns:
    The results' values; each depends on a model input when some operand does.
  """
  name = eqn.primitive.name
  labels, data = _operand_labels(g, eqn, ins), [x.data for x in ins]
  try:
    rule = group_rules.RULES.get(name)
    if rule is None:
      raise Unsupported("")
    outs = rule(g, eqn, labels, data)
  except Unsupported as e:
    reason = f"{name} ({e})" if str(e) else name
    for labs in labels:
      g.mark_all(labs, "poison", reason)
    outs = [g.fresh(group_rules.shape_of(v)) for v in eqn.outvars]
    for labs in outs:
      g.mark_all(labs, "poison", reason)
  return [Axes(tuple(labs), any(data)) for labs in outs]


def _pin_values(g: Graph, values: Sequence[Axes], reason: str) -> None:
  """Pins every axis of ``values``."""
  for x in values:
    g.mark_all([lab for lab in x.labels or () if lab is not PINNED], "pin", reason)


def _join(g: Graph, values: Sequence[Axes]) -> Axes:
  """One value for several: ``cond`` branch results, a loop carry before and after the body."""
  data = any(x.data for x in values)
  known = [list(x.labels) for x in values if x.labels is not None]
  if not known:
    return Axes(None, data)
  if len(known) < len(values):
    _pin_values(g, values, "coupled with a constant")
  out = known[0]
  try:
    for labs in known[1:]:
      for i, lab in enumerate(labs):
        if out[i] is PINNED or lab is PINNED:
          g.mark_all([x for x in (out[i], lab) if x is not PINNED], "pin", "stacked axis")
          out[i] = PINNED
        else:
          g.union(out[i], lab)
  except Unsupported as e:
    for labs in known:
      g.mark_all([x for x in labs if x is not PINNED], "poison", f"cond, scan or while ({e})")
  return Axes(tuple(x if x is PINNED else g.resolve(x) for x in out), data)


def _scan_in(g: Graph, x: Axes) -> Axes:
  if x.labels is None:
    return x
  if x.labels[0] is not PINNED:
    g.mark(x.labels[0], "pin", "scanned-over axis")
  return Axes(x.labels[1:], x.data)


def _scan_out(x: Axes) -> Axes:
  return x if x.labels is None else Axes((PINNED, *x.labels), x.data)


def _carry_in(carry: Sequence[Axes], operands: Sequence[Axes]) -> list[Axes]:
  # A carry may depend on the inputs from a later iteration on: assume it does when any operand
  # of the loop does.
  data = any(x.data for x in operands)
  return [x._replace(data=data) for x in carry]


def _group_rule(g: Graph) -> jaxpr_walk.Rule:
  """The `jaxpr_walk.Rule` that propagates axis identities into ``g``.

  Args:
    g: the graph the couplings, pins and poisons are recorded in.

  Returns:
    A rule over `Axes` values: call-like and control-flow equations are entered by the walker,
    every other equation goes through `_apply_rule`.
  """
  def on_eqn(eqn: Any, ins: list, ctx: jaxpr_walk.Context) -> Optional[list]:
    if jaxpr_walk.call_body(eqn) is not None or eqn.primitive.name in jaxpr_walk.CONTROL_FLOW:
      return None
    return _apply_rule(g, eqn, ins)

  return jaxpr_walk.Rule(
      eqn=on_eqn, opaque=lambda eqn, ins, ctx: _apply_rule(g, eqn, ins),
      literal=lambda c: Axes(None, False), join=lambda values: _join(g, values),
      scan_in=lambda x: _scan_in(g, x), scan_out=_scan_out, carry_in=_carry_in)


def trace_graph(apply_fn: Callable[..., Any], variables: Any, args: tuple, kwargs: dict,
                ) -> tuple[Graph, list[tuple[str, int, Sequence[Label]]]]:
  """Walks ``apply_fn(variables, *args, **kwargs)``'s jaxpr into a group graph.

  Args:
    apply_fn: ``apply_fn(variables, *args, **kwargs) -> outputs``.
    variables: pytree of arrays.
    args: example positional inputs (only shapes and dtypes matter).
    kwargs: keyword arguments passed to ``apply_fn``.

  Returns:
    The graph and, for every leaf of ``variables`` the function reads (in leaf order),
    ``(path, ndim, labels)`` with one label per axis of the leaf.
  """
  flat_vars = jax.tree_util.tree_flatten_with_path(variables)[0]
  closed = jax.make_jaxpr(lambda v, a: apply_fn(v, *a, **kwargs))(variables, args)
  jaxpr = closed.jaxpr
  g = Graph()
  n_vars = len(flat_vars)
  in_axes = []
  for i, v in enumerate(jaxpr.invars):
    labs = g.fresh(group_rules.shape_of(v))
    if i >= n_vars:
      g.mark_all(labs, "pin", "model input")
    in_axes.append(Axes(tuple(labs), i >= n_vars))
  outs = jaxpr_walk.walk(closed, in_axes, _group_rule(g))
  _pin_values(g, outs, "model output")
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  leaf_labels = [(tree_lib.path_str(path), len(x.labels), x.labels)
                 for (path, _), x, v in zip(flat_vars, in_axes, jaxpr.invars) if id(v) in used]
  return g, leaf_labels
