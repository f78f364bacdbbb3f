"""One jaxpr walker: forward dataflow over a closed jaxpr and its sub-jaxprs.

`walk` runs an abstract interpretation given by a `Rule` (a value per variable, one callback per
equation), recursing into the sub-jaxprs of ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``/``checkpoint`` (bound operand for operand), ``cond`` (every branch,
results joined), ``scan`` and ``while`` (one pass over the body, carries joined with their
initial values). Every callback sees a `Context`: the enclosing higher-order equations and the
equation's index, i.e. a `location` that names the equation uniquely even when one traced
function is called at several places.

`jaxpr_sites` builds on it to follow parameter leaves and find the dot/conv sites that read
them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax.extend.core as jex_core

Location = tuple[int, ...]

# Primitives whose one sub-jaxpr is called on the equation's operands, in order.
CALLS: dict[str, str] = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
# Higher-order primitives whose body may run zero, several or a data-dependent number of times.
CONTROL_FLOW = frozenset({"cond", "scan", "while"})


class Frame(NamedTuple):
  """One enclosing higher-order equation.

  Attributes:
    primitive: its primitive name (``jit``, ``scan``, ``cond`` ...).
    index: its index in the enclosing jaxpr's equations.
    branch: which of its sub-jaxprs is being walked (the ``cond`` branch; ``while``: 0 for the
      condition, 1 for the body; 0 otherwise).
    trips: how many times that sub-jaxpr runs per run of the equation (``scan`` length; 1
      otherwise, also for ``while``, whose trip count is unknown at trace time).
  """
  primitive: str
  index: int
  branch: int
  trips: float


class Context(NamedTuple):
  """Where an equation sits: the enclosing frames (outermost first) and its own index."""
  scope: tuple[Frame, ...]
  index: int

  @property
  def location(self) -> Location:
    """``(i0, b0, i1, b1, ..., index)``: equation and branch indices from the top level down."""
    return tuple(x for f in self.scope for x in (f.index, f.branch)) + (self.index,)


def _none(*_: Any) -> None:
  return None


def _same_or_none(values: Sequence[Any]) -> Any:
  first = values[0]
  return first if all(v == first for v in values[1:]) else None


class Rule(NamedTuple):
  """An abstract interpretation for `walk`.

  Attributes:
    eqn: ``(eqn, input values, context) -> output values``. For a higher-order equation it may
      return None to let `walk` recurse into its sub-jaxprs.
    opaque: output values of a higher-order equation `walk` does not know (its sub-jaxprs are
      not entered); default: None for every output.
    literal: value of a literal or a closed-over constant (given the constant, or None for the
      constvars of an open jaxpr).
    join: a value standing for any of several (``cond`` branches, loop iterations).
    scan_in: value of one slice of a scanned-over operand, inside the body.
    scan_out: value of the stacked outputs of a ``scan`` body.
    carry_in: ``(initial carry values, all operand values of the loop) -> carry values`` seen by
      the ``scan`` / ``while`` body and condition; it may widen them to stand for later
      iterations too (default: the initial values).
  """
  eqn: Callable[[Any, list, Context], Optional[list]]
  opaque: Callable[[Any, list, Context], list] = lambda e, ins, ctx: [None] * len(e.outvars)
  literal: Callable[[Any], Any] = _none
  join: Callable[[Sequence[Any]], Any] = _same_or_none
  scan_in: Callable[[Any], Any] = _none
  scan_out: Callable[[Any], Any] = _none
  carry_in: Callable[[Sequence[Any], Sequence[Any]], list] = lambda carry, ins: list(carry)


def call_body(eqn: Any) -> Any:
  """The sub-jaxpr (closed or open) a call-like equation applies to its operands, else None."""
  key = CALLS.get(eqn.primitive.name)
  body = eqn.params.get(key) if key else None
  if body is None or not hasattr(getattr(body, "jaxpr", body), "eqns"):
    return None
  if len(getattr(body, "jaxpr", body).invars) != len(eqn.invars):
    return None
  return body


def walk(jaxpr: Any, args: Sequence[Any], rule: Rule, scope: tuple[Frame, ...] = ()) -> list:
  """Runs ``rule`` forward over ``jaxpr`` (a `ClosedJaxpr` or `Jaxpr`) and its sub-jaxprs.

  Args:
    jaxpr: the jaxpr to walk.
    args: one value per invar.
    rule: the abstract interpretation.
    scope: frames enclosing ``jaxpr`` (empty at the top level).

  Returns:
    One value per outvar.
  """
  inner = getattr(jaxpr, "jaxpr", jaxpr)
  consts = list(getattr(jaxpr, "consts", []))
  consts += [None] * (len(inner.constvars) - len(consts))
  env: dict = {v: rule.literal(c) for v, c in zip(inner.constvars, consts)}
  env.update(zip(inner.invars, args))

  def read(v: Any) -> Any:
    return rule.literal(v.val) if isinstance(v, jex_core.Literal) else env[v]

  for i, eqn in enumerate(inner.eqns):
    ins = [read(v) for v in eqn.invars]
    ctx = Context(scope, i)
    outs = rule.eqn(eqn, ins, ctx)
    if outs is None:
      outs = _recurse(eqn, ins, rule, ctx)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in inner.outvars]


def _recurse(eqn: Any, ins: list, rule: Rule, ctx: Context) -> list:
  name, p = eqn.primitive.name, eqn.params
  frame = lambda branch, trips=1.0: ctx.scope + (Frame(name, ctx.index, branch, trips),)
  body = call_body(eqn)
  if body is not None:
    return walk(body, ins, rule, frame(0))
  if name == "cond":
    results = [walk(b, ins[1:], rule, frame(k)) for k, b in enumerate(p["branches"])]
    return [rule.join(vs) for vs in zip(*results)]
  if name == "scan":
    nc, ncar = p["num_consts"], p["num_carry"]
    carry = rule.carry_in(ins[nc:nc + ncar], ins)
    body_ins = ins[:nc] + carry + [rule.scan_in(v) for v in ins[nc + ncar:]]
    res = walk(p["jaxpr"], body_ins, rule, frame(0, float(p["length"])))
    joined = [rule.join((a, b)) for a, b in zip(carry, res[:ncar])]
    return joined + [rule.scan_out(v) for v in res[ncar:]]
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = rule.carry_in(ins[cn + bn:], ins)
    walk(p["cond_jaxpr"], ins[:cn] + carry, rule, frame(0))
    res = walk(p["body_jaxpr"], ins[cn:cn + bn] + carry, rule, frame(1))
    return [rule.join((a, b)) for a, b in zip(carry, res)]
  return rule.opaque(eqn, ins, ctx)
