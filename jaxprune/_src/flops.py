"""FLOPs of a model: XLA's count, and the analytic matmul / convolution FLOPs of each weight leaf.

`xla_flops` is XLA's own count (``cost_analysis()['flops']`` of the compiled function).
`matmul_flops_by_leaf` walks the jaxpr of ``apply_fn`` (`jaxpr_walk.walk`) and binds every
variable to the parameter leaf it views (`jaxpr_sites.view_rule`: casts, copies, transposes,
reshapes, size-1 broadcasts, masking). Each ``dot_general`` / ``conv_general_dilated`` with a
leaf as an operand (the rhs when both are) adds its analytic count to that leaf: ``2 * out_size *
contraction_size`` for a product, ``2 * batch * out_features * in_features_per_group *
valid_taps`` for a convolution, where taps over padding or the holes of a dilated input are not
counted (XLA's cost analysis does not count them either). Inside control flow, as in XLA's count,
``scan`` bodies count ``length`` times and ``while`` bodies (and conditions) once, since the trip
count is unknown at trace time; of a ``cond``'s branches only the costliest counts, per leaf.
Equations inside ``jit`` / ``pjit``, ``remat`` and custom-derivative calls count like any other;
the sub-jaxprs of higher-order primitives the walker does not enter are not counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxprune._src import jaxpr_sites
from jaxprune._src import jaxpr_walk
from jaxprune._src.jaxpr_sites import LeafView
from jaxprune._src.jaxpr_walk import Context, Frame
from jaxprune._src.types import PyTree

# (enclosing frames, leaf index, FLOPs of one run of the equation)
_Record = tuple[tuple[Frame, ...], int, float]


def _cost_flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    raise ValueError("apply_fn: XLA cost analysis returned no 'flops' entry on this backend.")
  return float(cost["flops"])


def xla_flops(apply_fn: Callable[..., Any], *args: Any) -> float:
  """XLA's FLOP count of ``apply_fn(*args)``.

  Args:
    apply_fn: the function.
    *args: its arguments (arrays or `jax.ShapeDtypeStruct`).

  Returns:
    ``cost_analysis()['flops']`` of ``jax.jit(apply_fn)`` compiled for ``args``.
  """
  return _cost_flops(jax.jit(apply_fn).lower(*args).compile())


def _dot_flops(eqn: Any) -> float:
  (contract_lhs, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  k = math.prod(lhs_shape[d] for d in contract_lhs)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def _valid_taps(in_size: int, out_size: int, k_size: int, stride: int, pad_lo: int,
                lhs_dil: int, rhs_dil: int) -> int:
  """Number of (output position, kernel tap) pairs of one spatial dim that read a real input."""
  last = (in_size - 1) * lhs_dil
  count = 0
  for o in range(out_size):
    for k in range(k_size):
      pos = o * stride - pad_lo + k * rhs_dil
      count += 0 <= pos <= last and pos % lhs_dil == 0
  return count


def _conv_flops(eqn: Any) -> float:
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs, rhs, out = (v.aval.shape for v in (eqn.invars[0], eqn.invars[1], eqn.outvars[0]))
  taps = 1
  for i in range(len(dn.lhs_spec) - 2):
    taps *= _valid_taps(lhs[dn.lhs_spec[2 + i]], out[dn.out_spec[2 + i]], rhs[dn.rhs_spec[2 + i]],
                        p["window_strides"][i], p["padding"][i][0], p["lhs_dilation"][i],
                        p["rhs_dilation"][i])
  # Per output (batch, feature) pair: one multiply-add per input feature of its group per tap.
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * taps


_FLOPS = {"dot_general": _dot_flops, "conv_general_dilated": _conv_flops}


def _combine(records: list[_Record], depth: int) -> dict[int, float]:
  """FLOPs per leaf of the records below ``depth`` frames.

  Records of one higher-order equation are combined per sub-jaxpr first; a ``cond`` keeps the
  costliest branch per leaf, other equations add theirs up; both are scaled by the frame's trips.
  """
  acc: dict[int, float] = {}
  nested: dict[int, list[_Record]] = {}
  for rec in records:
    scope, leaf, flops = rec
    if len(scope) == depth:
      acc[leaf] = acc.get(leaf, 0.0) + flops
    else:
      nested.setdefault(scope[depth].index, []).append(rec)
  for recs in nested.values():
    frame = recs[0][0][depth]
    branches: dict[int, list[_Record]] = {}
    for rec in recs:
      branches.setdefault(rec[0][depth].branch, []).append(rec)
    per_branch = [_combine(rs, depth + 1) for rs in branches.values()]
    merge = max if frame.primitive == "cond" else sum
    for leaf in {k for d in per_branch for k in d}:
      total = frame.trips * merge(d.get(leaf, 0.0) for d in per_branch)
      acc[leaf] = acc.get(leaf, 0.0) + total
  return acc


def leaf_flops(jaxpr: Any, leaf_shapes: list[tuple[int, ...]]) -> list[float]:
  """Analytic dot/conv FLOPs of a closed jaxpr attributed to its leading invars, the leaves.

  Args:
    jaxpr: a closed jaxpr whose first ``len(leaf_shapes)`` invars are the parameter leaves.
    leaf_shapes: the shape of each leaf.

  Returns:
    One float per leaf; see the module docstring for what is counted.
  """
  records: list[_Record] = []

  def on_eqn(eqn: Any, ins: list, ctx: Context) -> Optional[list]:
    name = eqn.primitive.name
    if name in _FLOPS:
      view = ins[1] if ins[1] is not None else ins[0]
      if view is not None:
        records.append((ctx.scope, view.leaf, _FLOPS[name](eqn)))
      return [None]
    if jaxpr_walk.call_body(eqn) is not None or name in jaxpr_walk.CONTROL_FLOW:
      return None
    return jaxpr_sites.view_rule(eqn, ins)

  n_in = len(getattr(jaxpr, "jaxpr", jaxpr).invars)
  args = [LeafView(i, tuple(s), tuple((a,) for a in range(len(s))))
          for i, s in enumerate(leaf_shapes)] + [None] * (n_in - len(leaf_shapes))
  jaxpr_walk.walk(jaxpr, args, jaxpr_walk.Rule(eqn=on_eqn, scan_in=jaxpr_sites.scan_slice))
  acc = _combine(records, 0)
  return [acc.get(i, 0.0) for i in range(len(leaf_shapes))]


def matmul_flops_by_leaf(apply_fn: Callable[..., Any], params: PyTree,
                         *inputs: Any) -> list[float]:
  """Analytic dot/conv FLOPs of ``apply_fn(params, *inputs)`` attributed to each weight leaf.

  Examples:
    A batch of 4 through a ``(2, 3)`` kernel costs ``2 · 4 · 3 · 2 = 48`` FLOPs; the bias none:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> jp.matmul_flops_by_leaf(apply_fn, params, jnp.ones((4, 2)))   # leaves: b, w
    [0.0, 48.0]

  Args:
    apply_fn: ``apply_fn(params, *inputs)``.
    params: parameter pytree (arrays or `jax.ShapeDtypeStruct`).
    *inputs: the remaining arguments.

  Returns:
    One float per leaf of ``params`` (`jax.tree.leaves` order): ``2 * out_size *
    contraction_size`` summed over the ``dot_general`` / ``conv_general_dilated`` equations that
    take the leaf (or a cast / reshape / transpose of it) as an operand, times ``scan`` lengths,
    the costliest branch of each ``cond``.
  """
  leaves, treedef = jax.tree.flatten(params)
  closed = jax.make_jaxpr(lambda ls, ins: apply_fn(jax.tree.unflatten(treedef, ls), *ins))(
      leaves, inputs)
  return leaf_flops(closed, [tuple(int(d) for d in np.shape(x)) for x in leaves])
