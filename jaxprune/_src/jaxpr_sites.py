"""Which parameter leaf each jaxpr variable views, and the dot/conv sites that read a leaf.

`find_sites` walks a jaxpr (`jaxpr_walk.walk`) binding every variable to the parameter leaf it
views (`LeafView`, through casts, copies, transposes, reshapes (splitting a leaf axis refines it
into atoms), size-1 broadcasts and elementwise masking) and records each ``dot_general`` /
``conv_general_dilated`` that reads a leaf as one operand and an activation as the other: a
`Site`, which fixes the canonical 2-D view of its kernel (`interpret.to_matrix`): rows are the
contracted features in the order the activation's features are flattened, columns the output
features. `view_rule` and `scan_slice` are the provenance rule on its own, for other walks that
follow parameter leaves.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

from jaxprune._src.jaxpr_walk import CONTROL_FLOW, Context, Location, Rule, call_body, walk


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
