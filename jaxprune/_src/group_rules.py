"""How each primitive couples, pins or poisons axis identities: a ``{primitive: rule}`` table.

A rule maps an equation's operand labels to its result labels, uniting the axes that must
be pruned together in a `group_graph.Graph` and pinning those that may not be pruned at all:
reductions (LayerNorm statistics, softmax), slices, pads, gathers, sorts, convolution windows and
the contracted or free axes of a product of two data-dependent arrays (attention logits and
mixing: pruning them would change shape-derived constants such as the ``1/sqrt(head_dim)``
scale; the head axis, a batch axis of those products, stays prunable). A primitive without a
rule, or a rule that meets a coupling it cannot represent, poisons its operands and results.

Supported (`SUPPORTED_PRIMITIVES`, the table's keys): ``dot_general``, ``conv_general_dilated``
(``feature_group_count == 1``), elementwise arithmetic / comparison / transcendental primitives,
``select_n``, ``clamp``, casts, ``broadcast_in_dim``, ``reshape``, ``squeeze``, ``transpose``,
``concatenate``, ``stack`` (the new axis pinned), ``reduce_*``, ``argmax``/``argmin``, ``cum*``,
``pad``, ``slice``, ``dynamic_slice``, ``dynamic_update_slice``, ``gather``/``scatter*``
(pinned), ``sort``, ``top_k``, ``split``, ``rev``, ``iota`` and random-number primitives
(pinned), ``reduce_window*`` (pooling: pooled axes pinned, channels pass through), and the
primitives whose sub-jaxprs `jaxpr_walk.walk` enters (``pjit``/``jit``, ``closed_call``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat``/``checkpoint``, ``cond``, ``while``,
``scan``): ``cond`` branches are coupled output for output, loop carries with themselves across
iterations, and the scanned-over axis is pinned, so layers stacked for ``nn.scan`` are pruned
alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxprune._src import jaxpr_walk
from jaxprune._src.group_graph import Graph, Label, Unsupported

Labels = list[Label]
# (graph, equation, operand labels, operand depends on a model input) -> result labels.
PrimitiveRule = Callable[[Graph, Any, list[Labels], list[bool]], list[Labels]]


def shape_of(v: Any) -> tuple[int, ...]:
  """The static shape of a jaxpr variable or literal."""
  return tuple(int(d) for d in getattr(v.aval, "shape", ()))


def _elementwise(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  shapes = [shape_of(v) for v in eqn.invars]
  nd = max((len(s) for s in shapes), default=0)
  out: Labels = [None] * nd
  for labs, s in zip(L, shapes):
    if len(s) == 0:
      continue
    if len(s) != nd:
      raise Unsupported("operands of different rank")
    for i, lab in enumerate(labs):
      if s[i] == 1:
        continue  # size-1 axes broadcast: a constant across the channel
      if out[i] is None:
        out[i] = lab
      else:
        g.union(out[i], lab)
  return [[g.resolve(x) for x in out] for _ in eqn.outvars]


def _each_identity(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  return [list(x) for x in L]


def _dot_general(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ll, rl = L
  for i, j in (*zip(lc, rc), *zip(lb, rb)):
    g.union(ll[i], rl[j])
  lfree = [i for i in range(len(ll)) if i not in lc and i not in lb]
  rfree = [j for j in range(len(rl)) if j not in rc and j not in rb]
  if D[0] and D[1]:
    # A product of two activations (attention): its contracted and free axes typically carry
    # shape-derived constants such as 1/sqrt(d).
    why = "contracted or free axis of a product of two activations (attention)"
    g.mark_all([ll[i] for i in (*lc, *lfree)], "pin", why)
    g.mark_all([rl[j] for j in (*rc, *rfree)], "pin", why)
  return [[g.resolve(ll[i]) for i in lb] + [ll[i] for i in lfree] + [rl[j] for j in rfree]]


def _conv(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise Unsupported("feature_group_count or batch_group_count > 1 "
                      "(grouped / depthwise convolution)")
  dn = p["dimension_numbers"]
  ll, rl = L
  g.union(ll[dn.lhs_spec[1]], rl[dn.rhs_spec[1]])
  g.mark_all([rl[j] for j in dn.rhs_spec[2:]], "pin", "convolution window axis")
  out = g.fresh(shape_of(eqn.outvars[0]))
  g.mark_all([out[j] for j in dn.out_spec[2:]], "pin", "convolution spatial axis")
  out[dn.out_spec[0]] = ll[dn.lhs_spec[0]]
  out[dn.out_spec[1]] = rl[dn.rhs_spec[0]]
  return [out]


def _broadcast_in_dim(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  shape = tuple(eqn.params["shape"])
  in_shape = shape_of(eqn.invars[0])
  out = g.fresh(shape)
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if in_shape[i] == shape[d]:
      out[d] = L[0][i]
  return [out]


def _reshape(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  if eqn.params.get("dimensions") is not None:
    raise Unsupported("reshape with dimensions")
  return [g.regroup(L[0], shape_of(eqn.outvars[0]))]


def _squeeze(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  dims = {d % len(L[0]) for d in eqn.params["dimensions"]}
  return [[lab for i, lab in enumerate(L[0]) if i not in dims]]


def _transpose(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  return [[L[0][i] for i in eqn.params["permutation"]]]


def _reduce(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  axes = set(eqn.params["axes"])
  g.mark_all([L[0][i] for i in axes], "pin", f"reduced over by {eqn.primitive.name}")
  return [[lab for i, lab in enumerate(L[0]) if i not in axes]]


def _cumulative(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  g.mark(L[0][eqn.params["axis"]], "pin", f"accumulated along by {eqn.primitive.name}")
  return [list(L[0])]


def _concatenate(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  dim = eqn.params["dimension"]
  out = list(L[0])
  for labs in L[1:]:
    for i, lab in enumerate(labs):
      if i != dim:
        g.union(out[i], lab)
  out = [g.resolve(x) for x in out]
  out[dim] = g.resolve(("s", tuple(labs[dim] for labs in L)))
  return [out]


def _stack(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  out = list(L[0])
  for labs in L[1:]:
    for i, lab in enumerate(labs):
      g.union(out[i], lab)
  out = [g.resolve(x) for x in out]
  new = g.new(len(L))
  g.mark(new, "pin", "stacked axis")
  out.insert(eqn.params["axis"] % (len(out) + 1), new)
  return [out]


def _replaced(g: Graph, labs: Labels, i: int, size: int, why: str) -> Labels:
  """``labs`` with axis ``i`` pinned and replaced by a fresh pinned node of ``size``."""
  g.mark(labs[i], "pin", why)
  out = list(labs)
  out[i] = g.new(size)
  g.mark(out[i], "pin", why)
  return out


def _pad(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  out, out_shape = list(L[0]), shape_of(eqn.outvars[0])
  for i, cfg in enumerate(eqn.params["padding_config"]):
    if tuple(cfg) != (0, 0, 0):
      out = _replaced(g, out, i, out_shape[i], "padded axis")
  return [out]


def _slice(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  name = eqn.primitive.name
  strides = eqn.params.get("strides") if name == "slice" else None
  out = list(L[0])
  for i, (n, m) in enumerate(zip(shape_of(eqn.invars[0]), shape_of(eqn.outvars[0]))):
    if n != m or (strides is not None and strides[i] not in (None, 1)):
      out = _replaced(g, out, i, m, f"{name}d axis")
  return [out]


def _dynamic_update_slice(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  out = list(L[0])
  for i, (n, m) in enumerate(zip(shape_of(eqn.invars[0]), shape_of(eqn.invars[1]))):
    if n == m:
      g.union(out[i], L[1][i])
    else:
      g.mark_all([out[i], L[1][i]], "pin", "dynamic_update_slice axis")
  return [[g.resolve(x) for x in out]]


def _reordering_axes(eqn: Any, nd: int) -> set[int]:
  name, p = eqn.primitive.name, eqn.params
  if name == "sort":
    return {p["dimension"] % nd}
  if name == "top_k":
    return {nd - 1}
  if name == "split":
    return {p["axis"] % nd}
  return {d % nd for d in p["dimensions"]}


def _reordering(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  """``sort``, ``top_k``, ``split``, ``rev``: the reordered axis is pinned, the others coupled."""
  nd = len(L[0])
  axes = _reordering_axes(eqn, nd)
  why = f"{eqn.primitive.name} axis"
  for labs in L:
    g.mark_all([labs[i] for i in axes], "pin", why)
  base = list(L[0])
  for labs in L[1:]:
    for i in range(nd):
      if i not in axes:
        g.union(base[i], labs[i])
  outs = []
  for v in eqn.outvars:
    s = shape_of(v)
    labs = [g.resolve(base[i]) if i not in axes else g.new(s[i]) for i in range(nd)]
    g.mark_all([labs[i] for i in axes], "pin", why)
    outs.append(labs)
  return outs


def _pin_all(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  name = eqn.primitive.name
  for labs in L:
    g.mark_all(labs, "pin", f"operand of {name}")
  outs = [g.fresh(shape_of(v)) for v in eqn.outvars]
  for labs in outs:
    g.mark_all(labs, "pin", f"result of {name}")
  return outs


def _reduce_window(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  name, p = eqn.primitive.name, eqn.params
  n_op = len(L) // 2 if name == "reduce_window" else 1
  wd, ws, pad = p["window_dimensions"], p["window_strides"], p["padding"]
  bd, wdl = p.get("base_dilation"), p.get("window_dilation")
  outs = []
  for o in range(n_op):
    labs = list(L[o])
    size = shape_of(eqn.outvars[o])
    for i in range(len(labs)):
      untouched = (wd[i] == 1 and ws[i] == 1 and tuple(pad[i]) == (0, 0)
                   and (bd is None or bd[i] == 1) and (wdl is None or wdl[i] == 1))
      if not untouched:  # a pooled (spatial) axis
        labs = _replaced(g, labs, i, size[i], f"window axis of {name}")
    outs.append(labs)
  for labs in outs[1:]:
    for a, b in zip(outs[0], labs):
      g.union(a, b)
  return [[g.resolve(x) for x in labs] for labs in outs]


def _walked(g: Graph, eqn: Any, L: list[Labels], D: list[bool]) -> list[Labels]:
  # The walker enters these; an equation reaching this rule has a sub-jaxpr that does not take
  # its operands.
  raise Unsupported("sub-jaxpr with a different number of operands")


def _names(text: str) -> list[str]:
  return text.split()


_ELEMENTWISE = _names("""
add sub mul div rem max min pow atan2 nextafter and or xor not eq ne lt le gt ge
neg abs sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos
tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt square integer_pow erf
erfc erf_inv lgamma digamma igamma igammac bessel_i0e bessel_i1e real imag conj
convert_element_type copy copy_p reduce_precision stop_gradient select_n clamp add_any
shift_left shift_right_logical shift_right_arithmetic population_count clz
sharding_constraint mesh_cast reshard polygamma zeta regularized_incomplete_beta
random_gamma_grad
""")
_PIN_ALL = _names("""gather scatter scatter-add scatter_add scatter-mul scatter_mul
scatter-min scatter_min scatter-max scatter_max iota rng_bit_generator rng_uniform
random_bits random_seed random_wrap random_unwrap random_split random_fold_in
threefry2x32""")

RULES: dict[str, PrimitiveRule] = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys(_names("optimization_barrier device_put"), _each_identity),
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "transpose": _transpose,
    **dict.fromkeys(_names("""reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or
        reduce_xor argmax argmin"""), _reduce),
    **dict.fromkeys(_names("cumsum cumprod cummax cummin cumlogsumexp"), _cumulative),
    "concatenate": _concatenate,
    "stack": _stack,
    "pad": _pad,
    "slice": _slice,
    "dynamic_slice": _slice,
    "dynamic_update_slice": _dynamic_update_slice,
    **dict.fromkeys(_names("sort top_k split rev"), _reordering),
    **dict.fromkeys(_PIN_ALL, _pin_all),
    **dict.fromkeys(_names("reduce_window_sum reduce_window_max reduce_window_min reduce_window"),
                    _reduce_window),
    **dict.fromkeys((*jaxpr_walk.CALLS, *jaxpr_walk.CONTROL_FLOW), _walked),
}

SUPPORTED_PRIMITIVES: frozenset[str] = frozenset(RULES)
"""Names of the primitives whose coupling rule `jaxprune.structured.find_groups` knows.

Examples:
  >>> import jaxprune as jp
  >>> sorted(p for p in jp.structured.SUPPORTED_PRIMITIVES if p.startswith("conv"))
  ['conv_general_dilated', 'convert_element_type']
  >>> "dot_general" in jp.structured.SUPPORTED_PRIMITIVES
  True
"""
