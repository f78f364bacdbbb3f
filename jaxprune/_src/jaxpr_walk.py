"""One jaxpr walker: forward dataflow over a closed jaxpr and its sub-jaxprs, and what it finds.

`walk` runs an abstract interpretation given by a `Rule` (a value per variable, one callback per
equation), recursing into the sub-jaxprs of ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``/``checkpoint`` (bound operand for operand), ``cond`` (every branch,
results joined), ``scan`` and ``while`` (one pass over the body, carries joined with their
initial values). Every callback sees a `Context`: the enclosing higher-order equations and the
equation's index, i.e. a `location` that names the equation uniquely even when one traced
function is called at several places.

On top of it, `find_sites` binds every variable to the parameter leaf it views (`LeafView`,
through casts, copies, transposes, reshapes (splitting a leaf axis refines it into atoms), size-1
broadcasts and elementwise masking) and records each ``dot_general`` / ``conv_general_dilated``
that reads a leaf as one operand and an activation as the other: a `Site`, which fixes the
canonical 2-D view of its kernel (`interpret.to_matrix`): rows are the contracted features in the
order the activation's features are flattened, columns the output features.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------
# Provenance: which parameter leaf a variable views.


class LeafView(NamedTuple):
  """A variable that is a rearrangement of one parameter leaf.

  The variable equals ``leaf.reshape(atoms).transpose(...).reshape(its shape)``: ``atoms`` refines
  the leaf's shape (a leaf axis that a reshape split becomes several atoms, outer first) and each
  axis of the variable flattens a run of atoms.

  Attributes:
    leaf: index of the leaf in `jax.tree.leaves` order.
    atoms: the refined shape; ``leaf.reshape(atoms)`` keeps the leaf's element order.
    groups: per axis of the variable, the atoms it flattens (row-major, outer first). Atoms of
      size 1 may be missing.
    loop_axes: atoms indexed by the iteration of an enclosing ``scan`` (stacked layers).
  """
  leaf: int
  atoms: tuple[int, ...]
  groups: tuple[tuple[int, ...], ...]
  loop_axes: tuple[int, ...] = ()

  def size(self, axis: int) -> int:
    return math.prod(self.atoms[a] for a in self.groups[axis])


def _split(v: LeafView, atom: int, outer: int) -> LeafView:
  """Splits one atom into ``(outer, size // outer)``, renumbering the atoms after it."""
  atoms = v.atoms[:atom] + (outer, v.atoms[atom] // outer) + v.atoms[atom + 1:]
  shift = lambda a: (a,) if a < atom else (a + 1,) if a > atom else (atom, atom + 1)
  groups = tuple(tuple(b for a in g for b in shift(a)) for g in v.groups)
  return LeafView(v.leaf, atoms, groups, tuple(b for a in v.loop_axes for b in shift(a)))


def _reshape(v: LeafView, shape: Sequence[int]) -> Optional[LeafView]:
  refined = True
  while refined:
    refined = False
    seq = [a for g in v.groups for a in g if v.atoms[a] != 1]
    groups, k = [], 0
    for d in shape:
      group, n = [], 1
      while n < d and k < len(seq):
        s = v.atoms[seq[k]]
        if n * s > d:
          if d % n or s % (d // n):
            return None  # the new axis straddles atoms unevenly
          v, refined = _split(v, seq[k], d // n), True
          break
        group.append(seq[k])
        n *= s
        k += 1
      if refined:
        break
      if n != d:
        return None
      groups.append(tuple(group))
  return v._replace(groups=tuple(groups)) if k == len(seq) else None


_SAME_VIEW = frozenset({
    "convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
    "mesh_cast", "reshard",
})
_EACH_SAME_VIEW = frozenset({"optimization_barrier", "device_put"})


def _broadcast(v: LeafView, shape: Sequence[int], dims: Sequence[int]) -> Optional[LeafView]:
  groups: list[tuple[int, ...]] = [()] * len(shape)
  for i, d in enumerate(dims):
    if shape[d] != v.size(i):
      return None
    groups[d] = v.groups[i]
  if any(shape[d] != 1 for d in range(len(shape)) if d not in set(dims)):
    return None
  return v._replace(groups=tuple(groups))


def view_rule(eqn: Any, views: Sequence[Optional[LeafView]]) -> list[Optional[LeafView]]:
  """Leaf views of a first-order equation's outputs given its operands' views.

  Casts, copies, transposes, reshapes (that do not straddle atoms), ``squeeze``, broadcasts that
  only add size-1 axes, and ``mul`` by a mask or scale (a masked kernel keeps its feature layout)
  keep the view; anything else loses it.
  """
  name, p = eqn.primitive.name, eqn.params
  out_shape = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
  none = [None] * len(eqn.outvars)
  if name in _EACH_SAME_VIEW:
    return list(views)[:len(eqn.outvars)] + none[len(views):]
  if name == "mul":
    held = [v for v in views if v is not None]
    own = [v for v in held if tuple(v.size(i) for i in range(len(v.groups))) == out_shape]
    return [own[0]] if len(held) == 1 and own else none
  v = views[0] if views else None
  if v is None:
    return none
  if name in _SAME_VIEW:
    return [v]
  if name == "transpose":
    return [v._replace(groups=tuple(v.groups[i] for i in p["permutation"]))]
  if name == "reshape" and p.get("dimensions") is None:
    return [_reshape(v, out_shape)]
  if name == "squeeze":
    dims = {d % len(v.groups) for d in p["dimensions"]}
    return [v._replace(groups=tuple(g for i, g in enumerate(v.groups) if i not in dims))]
  if name == "broadcast_in_dim":
    return [_broadcast(v, p["shape"], p["broadcast_dimensions"])]
  return none


def scan_slice(v: Optional[LeafView]) -> Optional[LeafView]:
  """`Rule.scan_in` for leaf views: one iteration's slice is indexed by the loop on axis 0."""
  if v is None:
    return None
  return v._replace(groups=v.groups[1:], loop_axes=v.loop_axes + v.groups[0])


# ---------------------------------------------------------------------------------------------
# Sites: dot_general / conv_general_dilated reading a parameter leaf.


class Site(NamedTuple):
  """One ``dot_general`` / ``conv_general_dilated`` with a parameter leaf as one operand.

  Attributes:
    path: the leaf's path, as `jaxprune._src.tree.path_str` renders it.
    leaf: the leaf's index in `jax.tree.leaves` order.
    shape: the leaf's shape.
    atoms: the leaf's shape refined where a reshape split an axis (`LeafView`); the axes below
      index ``leaf.reshape(atoms)``, which is the leaf itself when nothing was split.
    primitive: ``dot_general`` or ``conv_general_dilated``.
    operand: which operand of the equation the kernel is (0: lhs, 1: rhs).
    contract_axes: atoms contracted with the activation, in the order the activation's
      features are flattened (convolutions: the kernel's spatial axes in order, then its input
      channels, so that the rows of one tap are consecutive).
    out_axes: the other atoms, in the order they appear in the equation's output.
    loop_axes: atoms indexed by an enclosing ``scan`` (stacked layers), else empty.
    location: `Context.location` of the equation.
    scope: primitive names of the enclosing higher-order equations, outermost first.
    problem: why this site cannot be viewed as ``x @ W`` (a batched or grouped product), else
      None.
    eqn: the equation itself.
  """
  path: str
  leaf: int
  shape: tuple[int, ...]
  atoms: tuple[int, ...]
  primitive: str
  operand: int
  contract_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  loop_axes: tuple[int, ...]
  location: Location
  scope: tuple[str, ...]
  problem: Optional[str]
  eqn: Any

  @property
  def d_in(self) -> int:
    return math.prod(self.atoms[a] for a in self.contract_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.atoms[a] for a in self.out_axes)

  @property
  def slices(self) -> int:
    """Number of stacked layers the kernel holds (1 outside ``scan``)."""
    return math.prod(self.atoms[a] for a in self.loop_axes)

  @property
  def layout(self) -> tuple:
    """What two sites of one leaf must share for their inputs to be pooled."""
    return (self.atoms, self.contract_axes, self.out_axes, self.loop_axes)


def _site(eqn: Any, views: Sequence[Optional[LeafView]], ctx: Context, paths: Sequence[str],
          shapes: Sequence[tuple[int, ...]]) -> Optional[Site]:
  held = [i for i in (1, 0) if views[i] is not None]
  if len(held) != 1:
    return None  # no parameter, or a product of two parameters: no activation to calibrate on
  op = held[0]
  v, p, name = views[op], eqn.params, eqn.primitive.name
  problem = None
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    contract, batch = (rc, rb) if op == 1 else (lc, lb)
    free = [d for d in range(len(v.groups)) if d not in contract and d not in batch]
    if batch:
      problem = "the kernel has batch dimensions in this dot_general (a batched product)"
  else:
    dn = p["dimension_numbers"]
    # Taps outer, input channels inner: N:M groups of consecutive rows are then runs of input
    # channels at one tap, the grouping sparse tensor cores read (and `nm_mask`'s on HWIO).
    contract, free = (*dn.rhs_spec[2:], dn.rhs_spec[1]), [dn.rhs_spec[0]]
    if op == 0:
      contract, free = (), range(len(v.groups))
      problem = "the kernel is the lhs of the convolution"
    elif p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      problem = (f"grouped or depthwise convolution (feature_group_count="
                 f"{p['feature_group_count']}, batch_group_count={p['batch_group_count']})")
  rows = tuple(a for d in contract for a in v.groups[d])
  cols = tuple(a for d in free for a in v.groups[d])
  rest = tuple(a for a in range(len(v.atoms)) if a not in {*rows, *cols, *v.loop_axes})
  return Site(path=paths[v.leaf], leaf=v.leaf, shape=shapes[v.leaf], atoms=v.atoms,
              primitive=name, operand=op,
              contract_axes=rows, out_axes=cols + rest, loop_axes=v.loop_axes,
              location=ctx.location, scope=tuple(f.primitive for f in ctx.scope),
              problem=problem, eqn=eqn)


def find_sites(jaxpr: Any, leaf_paths: Sequence[str], leaf_shapes: Sequence[tuple[int, ...]],
               ) -> list[Site]:
  """Every dot/conv site of ``jaxpr`` whose kernel is one of its first ``len(leaf_paths)`` invars.

  Args:
    jaxpr: a closed jaxpr whose leading invars are the flattened parameter leaves.
    leaf_paths: path string of each leaf.
    leaf_shapes: shape of each leaf.

  Returns:
    The sites in program order (sub-jaxprs where they are called).
  """
  sites: list[Site] = []

  def on_eqn(eqn: Any, ins: list, ctx: Context) -> Optional[list]:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      site = _site(eqn, ins, ctx, leaf_paths, leaf_shapes)
      if site is not None:
        sites.append(site)
      return [None]
    if call_body(eqn) is not None or name in CONTROL_FLOW:
      return None
    return view_rule(eqn, ins)

  inner = getattr(jaxpr, "jaxpr", jaxpr)
  n = len(leaf_paths)
  args = [LeafView(i, tuple(s), tuple((a,) for a in range(len(s))))
          for i, s in enumerate(leaf_shapes)] + [None] * (len(inner.invars) - n)
  walk(jaxpr, args, Rule(eqn=on_eqn, scan_in=scan_slice))
  return sites
