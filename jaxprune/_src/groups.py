"""Dependency groups for structured pruning, found from the model's jaxpr.

Removing a hidden neuron of a Dense layer means deleting a column of its
kernel, an entry of its bias, the matching BatchNorm statistics and the
matching input row of every layer that reads it -- and, through residual
additions and concatenations, of layers further away. Instead of asking users
to list these couplings, we trace ``apply_fn(variables, *args)`` with
:func:`jax.make_jaxpr` and propagate a *channel identity* for every axis of
every intermediate array through the equations. Axes that must be pruned
together end up in one union-find class; each class that touches the
variables and is safe to prune is a :class:`Group`.

An axis identity is a small tree:

* a node (one union-find element with a size),
* a product of identities (row-major: a flatten of ``(H, W, C)`` is
  ``H x W x C``; a ``(d, heads * head_dim)`` kernel reshaped to heads is
  ``heads x head_dim``), or
* a sum of identities (concatenation along the axis).

A node that later turns out to be a product (a reshape splits it) is *refined*
in place, so couplings found before and after the reshape agree.

Classes are excluded ("pinned") when pruning them could not keep the function
unchanged: they reach a model input or output or a constant array, are reduced
over (LayerNorm statistics, softmax), sliced, padded, gathered, sorted, or are
contracted/free axes of a product of two data-dependent arrays (attention
logits and mixing: pruning them would change shape-derived constants such as
the ``1/sqrt(head_dim)`` scale; the head axis, a batch axis of those products,
stays prunable). A primitive that is not understood *poisons* the classes of
its operands and results: if such a class would otherwise be prunable,
:func:`find_groups` raises a ``ValueError`` naming the primitive.

Supported primitives (couplings tracked): ``dot_general``,
``conv_general_dilated`` (``feature_group_count == 1``), all elementwise
arithmetic / comparison / transcendental primitives, ``select_n``, ``clamp``,
``convert_element_type``, ``broadcast_in_dim``, ``reshape``, ``squeeze``,
``transpose``, ``concatenate``, ``reduce_*``, ``argmax``/``argmin``,
``cum*``, ``pad``, ``slice``, ``dynamic_slice``, ``dynamic_update_slice``,
``gather``/``scatter*`` (pinned), ``sort``, ``top_k``, ``split``, ``rev``,
``iota`` and random-number primitives (pinned), ``reduce_window_*`` (pooling:
pooled axes pinned, channels pass through), and sub-jaxprs of ``pjit``/``jit``,
``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``/
``checkpoint``, ``cond``, ``while`` and ``scan`` (carries coupled with
themselves across iterations; the scanned-over axis is pinned, so layers
stacked for ``nn.scan`` are pruned alike). Anything else (``fft``, grouped
convolutions, ``custom_linear_solve`` ...) is unsupported.

Traced in inference mode: BatchNorm reading its running statistics, no
dropout (random masks pin their axes), no mutable collections returned.
Scalar constants that user code derives from a layer's width (``x /
x.shape[-1]``) are invisible in a jaxpr: the shrunk model recomputes them from
its new width, so such layers are only safe if those constants do not
depend on the pruned axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend
import numpy as np

__all__ = [
    "SUPPORTED_PRIMITIVES", "Group", "Member", "find_groups", "find_groups_nnx", "make_group",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One axis of one leaf that belongs to a group.

  Attributes:
    path: ``jax.tree_util.keystr`` of the leaf in the traced variables.
    axis: the axis of the leaf (non-negative).
    units: int32 array of length ``leaf.shape[axis]``: the unit (0..size-1)
      each index along ``axis`` belongs to, or -1 where this group does not
      cover the index (concatenations). A flattened conv feeding a Dense has
      ``units = [0, 1, .., C-1, 0, 1, ..]`` on the Dense kernel's input axis.
  """

  path: str
  axis: int
  units: np.ndarray

  def __repr__(self) -> str:
    return f"Member({self.path}, axis={self.axis}, len={len(self.units)})"


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """A set of leaf axes whose units (neurons, channels, heads) are pruned together.

  Attributes:
    size: number of units (e.g. neurons of the layer).
    members: the coupled ``(leaf, axis)`` pairs.
    name: readable label: the first member of a leaf with ``ndim >= 2``.
  """

  size: int
  members: tuple[Member, ...]
  name: str

  def __repr__(self) -> str:
    return f"Group({self.name}, size={self.size}, members={len(self.members)})"


def make_group(variables: Any, axes: Sequence[tuple[str, int]], name: str | None = None) -> Group:
  """Builds a group by hand (the manual override of :func:`find_groups`).

  Every listed axis must have the same length; unit ``i`` is index ``i`` of
  every listed axis.

  Args:
    variables: the pytree the paths refer to.
    axes: ``(path, axis)`` pairs; ``path`` is ``jax.tree_util.keystr`` of a leaf.
    name: optional label (default: the first path).

  Returns:
    A :class:`Group`.
  """
  leaves = _leaves_by_path(variables)
  members = []
  size = None
  for path, axis in axes:
    if path not in leaves:
      raise ValueError(f"make_group: expected a leaf path of variables, got {path!r}; "
                       f"known paths start with {list(leaves)[:4]}")
    shape = np.shape(leaves[path])
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"make_group: axis {axis} out of range for leaf {path} of shape {shape}")
    axis = axis % len(shape)
    if size is None:
      size = shape[axis]
    elif shape[axis] != size:
      raise ValueError(f"make_group: every axis must have length {size}; leaf {path} axis {axis} "
                       f"has {shape[axis]}")
    members.append(Member(path, axis, np.arange(shape[axis], dtype=np.int32)))
  if size is None:
    raise ValueError("make_group: expected at least one (path, axis) pair, got none")
  return Group(int(size), tuple(members), name or f"{axes[0][0]}[axis {members[0].axis}]")


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): x for p, x in flat}


# ---------------------------------------------------------------------------
# Axis identities: union-find over nodes, refined into products / sums.
# Label = None (size-1 axis) | ("n", id) | ("p", (labels..)) | ("s", (labels..)).
# In a sum, None stands for one uncoupled index.

Label = Any


class _Unsupported(Exception):
  pass


class _Graph:
  """Union-find over axis identities with in-place refinement."""

  def __init__(self) -> None:
    self.parent: list[int] = []
    self.size: list[int] = []
    self.ref: dict[int, Label] = {}
    self.pin: dict[int, str] = {}
    self.poison: dict[int, str] = {}

  def new(self, n: int) -> Label:
    if n == 1:
      return None
    i = len(self.parent)
    self.parent.append(i)
    self.size.append(int(n))
    return ("n", i)

  def find(self, i: int) -> int:
    root = i
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[i] != root:
      self.parent[i], i = root, self.parent[i]
    return root

  def lsize(self, lab: Label) -> int:
    if lab is None:
      return 1
    if lab[0] == "n":
      return self.size[lab[1]]
    sizes = [self.lsize(k) for k in lab[1]]
    return math.prod(sizes) if lab[0] == "p" else sum(sizes)

  def resolve(self, lab: Label) -> Label:
    if lab is None:
      return None
    if lab[0] == "n":
      r = self.find(lab[1])
      if r in self.ref:
        return self.resolve(self.ref[r])
      return ("n", r)
    kids = [self.resolve(k) for k in lab[1]]
    flat: list[Label] = []
    for k in kids:
      if lab[0] == "p" and k is None:
        continue  # size-1 factors carry no index
      if k is not None and k[0] == lab[0]:
        flat.extend(k[1])
      else:
        flat.append(k)
    if not flat:
      return None
    if len(flat) == 1:
      return flat[0]
    return (lab[0], tuple(flat))

  def leaves(self, lab: Label) -> list[int]:
    lab = self.resolve(lab)
    if lab is None:
      return []
    if lab[0] == "n":
      return [lab[1]]
    return [i for k in lab[1] for i in self.leaves(k)]

  def mark(self, lab: Label, kind: str, reason: str) -> None:
    store = self.pin if kind == "pin" else self.poison
    for i in self.leaves(lab):
      store.setdefault(i, reason)

  def _refine(self, root: int, lab: Label) -> None:
    if root in self.leaves(lab):
      raise _Unsupported("an axis coupled with a product/sum that contains itself")
    self.ref[root] = lab
    for i in self.leaves(lab):
      if root in self.pin:
        self.pin.setdefault(i, self.pin[root])
      if root in self.poison:
        self.poison.setdefault(i, self.poison[root])

  def split(self, lab: Label, first: int) -> tuple[Label, Label]:
    """Refines node ``lab`` (size n) into ``first x n/first`` (row-major)."""
    n = self.lsize(lab)
    a, b = self.new(first), self.new(n // first)
    self._refine(lab[1], ("p", (a, b)))
    return a, b

  def union(self, a: Label, b: Label) -> None:
    a, b = self.resolve(a), self.resolve(b)
    if a is None and b is None or a == b:
      return
    if self.lsize(a) != self.lsize(b):
      raise _Unsupported(f"coupled axes of different lengths {self.lsize(a)} and {self.lsize(b)}")
    if a[0] == "n" and b[0] == "n":
      ra, rb = a[1], b[1]
      self.parent[rb] = ra
      for store in (self.pin, self.poison):
        if rb in store:
          store.setdefault(ra, store[rb])
    elif a[0] == "n":
      self._refine(a[1], b)
    elif b[0] == "n":
      self._refine(b[1], a)
    elif a[0] == b[0] == "s":
      if [self.lsize(k) for k in a[1]] != [self.lsize(k) for k in b[1]]:
        raise _Unsupported("concatenations with different segment lengths")
      for x, y in zip(a[1], b[1]):
        self.union(x, y)
    elif a[0] == b[0] == "p":
      self._union_products(list(a[1]), list(b[1]))
    else:
      raise _Unsupported("a concatenated axis coupled with a flattened axis")

  def _union_products(self, fa: list[Label], fb: list[Label]) -> None:
    while fa and fb:
      x, y = self.resolve(fa.pop(0)), self.resolve(fb.pop(0))
      if x is not None and x[0] == "p":
        fa[:0] = list(x[1][1:])
        x = x[1][0]
      if y is not None and y[0] == "p":
        fb[:0] = list(y[1][1:])
        y = y[1][0]
      sx, sy = self.lsize(x), self.lsize(y)
      if sx == sy:
        self.union(x, y)
      elif sx > sy and x[0] == "n" and sx % sy == 0:
        head, tail = self.split(x, sy)
        self.union(head, y)
        fa.insert(0, tail)
      elif sy > sx and y[0] == "n" and sy % sx == 0:
        head, tail = self.split(y, sx)
        self.union(x, head)
        fb.insert(0, tail)
      else:
        raise _Unsupported("flattened axes whose factors do not align")
    if fa or fb:
      raise _Unsupported("flattened axes whose factors do not align")

  def factors(self, lab: Label) -> list[Label]:
    lab = self.resolve(lab)
    if lab is None:
      return []
    return list(lab[1]) if lab[0] == "p" else [lab]

  def regroup(self, in_labels: Sequence[Label], out_sizes: Sequence[int]) -> list[Label]:
    """Labels of a reshape's output axes (row-major regrouping of factors)."""
    fs = [f for lab in in_labels for f in self.factors(lab)]
    out = []
    for s in out_sizes:
      take: list[Label] = []
      acc = 1
      while acc < s:
        if not fs or s % acc:
          raise _Unsupported("reshape whose axes do not factor")
        f = self.resolve(fs.pop(0))
        if f is not None and f[0] == "p":
          fs[:0] = list(f[1][1:])
          f = f[1][0]
        fsz = self.lsize(f)
        need = s // acc
        if need % fsz == 0:
          take.append(f)
          acc *= fsz
        elif f[0] == "n" and fsz % need == 0:
          head, tail = self.split(f, need)
          take.append(head)
          fs.insert(0, tail)
          acc *= need
        else:
          raise _Unsupported("reshape whose axes do not factor")
      if acc != s:
        raise _Unsupported("reshape whose axes do not factor")
      out.append(self.resolve(("p", tuple(take))) if take else None)
    if any(self.lsize(f) != 1 for f in fs):
      raise _Unsupported("reshape whose axes do not factor")
    return out

  def unit_maps(self, lab: Label) -> list[tuple[int, np.ndarray]]:
    """(class root, unit index per position or -1) for every class in ``lab``."""
    lab = self.resolve(lab)
    if lab is None:
      return []
    if lab[0] == "n":
      return [(lab[1], np.arange(self.size[lab[1]], dtype=np.int32))]
    sizes = [self.lsize(k) for k in lab[1]]
    n = self.lsize(lab)
    out = []
    if lab[0] == "p":
      idx = np.arange(n)
      stride = n
      for k, s in zip(lab[1], sizes):
        stride //= s
        pos = (idx // stride) % s
        for root, m in self.unit_maps(k):
          out.append((root, m[pos]))
    else:
      off = 0
      for k, s in zip(lab[1], sizes):
        for root, m in self.unit_maps(k):
          full = np.full(n, -1, dtype=np.int32)
          full[off:off + s] = m
          out.append((root, full))
        off += s
    return out


# ---------------------------------------------------------------------------
# Propagation through the jaxpr.

_ELEMENTWISE = frozenset("""
add sub mul div rem max min pow atan2 nextafter and or xor not eq ne lt le gt ge
neg abs sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos
tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt square integer_pow erf
erfc erf_inv lgamma digamma igamma igammac bessel_i0e bessel_i1e real imag conj
convert_element_type copy copy_p reduce_precision stop_gradient select_n clamp add_any
shift_left shift_right_logical shift_right_arithmetic population_count clz
sharding_constraint mesh_cast reshard polygamma zeta regularized_incomplete_beta
random_gamma_grad
""".split())
_REDUCE = frozenset("""reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or
reduce_xor argmax argmin""".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_PIN_ALL = frozenset("""gather scatter scatter-add scatter_add scatter-mul scatter_mul
scatter-min scatter_min scatter-max scatter_max iota rng_bit_generator rng_uniform
random_bits random_seed random_wrap random_unwrap random_split random_fold_in
threefry2x32""".split())
_IDENTITY_MULTI = frozenset("optimization_barrier device_put".split())
_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Primitives whose sub-jaxpr is called once on the operands, in order.
_CALLS = frozenset("""pjit jit closed_call core_call custom_jvp_call custom_vjp_call
custom_vjp_call_jaxpr remat remat2 checkpoint""".split())

SUPPORTED_PRIMITIVES: frozenset[str] = (
    _ELEMENTWISE | _REDUCE | _CUMULATIVE | _PIN_ALL | _IDENTITY_MULTI
    | _CALLS | frozenset("""dot_general conv_general_dilated broadcast_in_dim reshape squeeze
    transpose concatenate pad slice dynamic_slice dynamic_update_slice sort top_k split rev
    cond scan while reduce_window_sum reduce_window_max reduce_window_min
    reduce_window""".split()))


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in getattr(v.aval, "shape", ()))


class _Tracer:
  """Walks a jaxpr, assigning axis identities to every variable."""

  def __init__(self, graph: _Graph) -> None:
    self.g = graph

  def fresh(self, shape: Sequence[int]) -> list[Label]:
    return [self.g.new(n) for n in shape]

  def read(self, env: dict, data: dict, v: Any) -> tuple[list[Label], bool]:
    if isinstance(v, jax.extend.core.Literal):
      labs = self.fresh(np.shape(v.val))
      for lab in labs:
        self.g.mark(lab, "pin", "literal array")
      return labs, False
    return env[v], data[v]

  def run(self, jaxpr: Any, consts_labels: list, in_labels: list, in_data: list,
          ) -> list[list[Label]]:
    env: dict = {}
    data: dict = {}
    for v, labs in zip(jaxpr.constvars, consts_labels):
      env[v], data[v] = labs, False
    for v, labs, d in zip(jaxpr.invars, in_labels, in_data):
      env[v], data[v] = labs, d
    for eqn in jaxpr.eqns:
      ins = [self.read(env, data, v) for v in eqn.invars]
      labs_in = [x[0] for x in ins]
      d_in = [x[1] for x in ins]
      out_shapes = [_shape(v) for v in eqn.outvars]
      name = eqn.primitive.name
      try:
        in_shapes = [np.shape(v.val) if isinstance(v, jax.extend.core.Literal) else _shape(v)
                     for v in eqn.invars]
        outs = self.eqn(name, eqn, labs_in, d_in, in_shapes, out_shapes)
      except _Unsupported as e:
        reason = f"{name} ({e})" if str(e) else name
        for labs in labs_in:
          for lab in labs:
            self.g.mark(lab, "poison", reason)
        outs = []
        for s in out_shapes:
          labs = self.fresh(s)
          for lab in labs:
            self.g.mark(lab, "poison", reason)
          outs.append(labs)
      d_out = any(d_in)
      for v, labs in zip(eqn.outvars, outs):
        env[v], data[v] = labs, d_out
    return [self.read(env, data, v)[0] for v in jaxpr.outvars]

  def call(self, closed: Any, labs_in: list, d_in: list) -> list[list[Label]]:
    jaxpr = getattr(closed, "jaxpr", closed)
    consts = getattr(closed, "consts", [])
    const_labels = []
    for c in consts:
      labs = self.fresh(np.shape(c))
      for lab in labs:
        self.g.mark(lab, "pin", "constant array")
      const_labels.append(labs)
    for v in jaxpr.constvars[len(const_labels):]:  # an open jaxpr's constvars: constants too
      labs = self.fresh(_shape(v))
      for lab in labs:
        self.g.mark(lab, "pin", "constant array")
      const_labels.append(labs)
    if len(jaxpr.invars) != len(labs_in):
      raise _Unsupported("sub-jaxpr with a different number of operands")
    return self.run(jaxpr, const_labels, labs_in, d_in)

  def eqn(self, name: str, eqn: Any, L: list, D: list, S: list, out_shapes: list,
          ) -> list[list[Label]]:
    g, p = self.g, eqn.params
    if name in _ELEMENTWISE:
      nd = max(len(s) for s in S) if S else 0
      out = [None] * nd
      for labs, s in zip(L, S):
        if len(s) == 0:
          continue
        if len(s) != nd:
          raise _Unsupported("operands of different rank")
        for i, lab in enumerate(labs):
          if s[i] == 1:
            continue  # size-1 axes broadcast: a constant across the channel
          if out[i] is None:
            out[i] = lab
          else:
            g.union(out[i], lab)
      out = [g.resolve(x) for x in out]
      return [list(out) for _ in out_shapes]
    if name in _IDENTITY_MULTI:
      return [list(x) for x in L]
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      (ll, rl) = L
      for i, j in zip(lc, rc):
        g.union(ll[i], rl[j])
      for i, j in zip(lb, rb):
        g.union(ll[i], rl[j])
      lfree = [i for i in range(len(ll)) if i not in lc and i not in lb]
      rfree = [j for j in range(len(rl)) if j not in rc and j not in rb]
      if D[0] and D[1]:
        # Attention-like product of two activations: its contracted and free
        # axes typically carry shape-derived constants (1/sqrt(d)).
        why = "contracted or free axis of a product of two activations (attention)"
        for i in list(lc) + lfree:
          g.mark(ll[i], "pin", why)
        for j in list(rc) + rfree:
          g.mark(rl[j], "pin", why)
      return [[g.resolve(ll[i]) for i in lb] + [ll[i] for i in lfree] + [rl[j] for j in rfree]]
    if name == "conv_general_dilated":
      if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise _Unsupported("feature_group_count or batch_group_count > 1 "
                           "(grouped / depthwise convolution)")
      dn = p["dimension_numbers"]
      lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
      ll, rl = L
      g.union(ll[lhs_spec[1]], rl[rhs_spec[1]])
      for j in rhs_spec[2:]:
        g.mark(rl[j], "pin", "convolution window axis")
      out = self.fresh(out_shapes[0])
      for j in out_spec[2:]:
        g.mark(out[j], "pin", "convolution spatial axis")
      out[out_spec[0]] = ll[lhs_spec[0]]
      out[out_spec[1]] = rl[rhs_spec[0]]
      return [out]
    if name == "broadcast_in_dim":
      shape = tuple(p["shape"])
      out = self.fresh(shape)
      for i, d in enumerate(p["broadcast_dimensions"]):
        if S[0][i] == shape[d]:
          out[d] = L[0][i]
      return [out]
    if name == "reshape":
      if p.get("dimensions") is not None:
        raise _Unsupported("reshape with dimensions")
      return [g.regroup(L[0], out_shapes[0])]
    if name == "squeeze":
      dims = {d % len(S[0]) for d in p["dimensions"]}
      return [[lab for i, lab in enumerate(L[0]) if i not in dims]]
    if name == "transpose":
      return [[L[0][i] for i in p["permutation"]]]
    if name in _REDUCE:
      axes = set(p["axes"])
      for i in axes:
        g.mark(L[0][i], "pin", f"reduced over by {name}")
      return [[lab for i, lab in enumerate(L[0]) if i not in axes]]
    if name in _CUMULATIVE:
      g.mark(L[0][p["axis"]], "pin", f"accumulated along by {name}")
      return [list(L[0])]
    if name == "concatenate":
      dim = p["dimension"]
      out = list(L[0])
      for labs in L[1:]:
        for i, lab in enumerate(labs):
          if i != dim:
            g.union(out[i], lab)
      out = [g.resolve(x) for x in out]
      out[dim] = g.resolve(("s", tuple(labs[dim] for labs in L)))
      return [out]
    if name == "pad":
      out = list(L[0])
      for i, cfg in enumerate(p["padding_config"]):
        if tuple(cfg) != (0, 0, 0):
          g.mark(L[0][i], "pin", "padded axis")
          out[i] = g.new(out_shapes[0][i])
          g.mark(out[i], "pin", "padded axis")
      return [out]
    if name in ("slice", "dynamic_slice"):
      out = list(L[0])
      for i, (n, m) in enumerate(zip(S[0], out_shapes[0])):
        strides = p.get("strides") if name == "slice" else None
        if n != m or (strides is not None and strides[i] not in (None, 1)):
          g.mark(L[0][i], "pin", f"{name}d axis")
          out[i] = g.new(m)
          g.mark(out[i], "pin", f"{name}d axis")
      return [out]
    if name == "dynamic_update_slice":
      out = list(L[0])
      for i, (n, m) in enumerate(zip(S[0], S[1])):
        if n == m:
          g.union(out[i], L[1][i])
        else:
          g.mark(out[i], "pin", "dynamic_update_slice axis")
          g.mark(L[1][i], "pin", "dynamic_update_slice axis")
      return [[g.resolve(x) for x in out]]
    if name in ("sort", "top_k", "split", "rev"):
      nd = len(S[0])
      if name == "sort":
        axes = {p["dimension"] % nd}
      elif name == "top_k":
        axes = {nd - 1}
      elif name == "split":
        axes = {p["axis"] % nd}
      else:
        axes = {d % nd for d in p["dimensions"]}
      for labs in L:
        for i in axes:
          g.mark(labs[i], "pin", f"{name} axis")
      base = list(L[0])
      for labs in L[1:]:
        for i in range(nd):
          if i not in axes:
            g.union(base[i], labs[i])
      outs = []
      for s in out_shapes:
        labs = [g.resolve(base[i]) if i not in axes else g.new(s[i]) for i in range(nd)]
        for i in axes:
          g.mark(labs[i], "pin", f"{name} axis")
        outs.append(labs)
      return outs
    if name in _PIN_ALL:
      for labs in L:
        for lab in labs:
          g.mark(lab, "pin", f"operand of {name}")
      outs = []
      for s in out_shapes:
        labs = self.fresh(s)
        for lab in labs:
          g.mark(lab, "pin", f"result of {name}")
        outs.append(labs)
      return outs
    if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"):
      n_op = len(L) // 2 if name == "reduce_window" else 1
      wd, ws = p["window_dimensions"], p["window_strides"]
      pad = p["padding"]
      bd, wdl = p.get("base_dilation"), p.get("window_dilation")
      outs = []
      for o in range(n_op):
        labs = list(L[o])
        for i in range(len(labs)):
          untouched = (wd[i] == 1 and ws[i] == 1 and tuple(pad[i]) == (0, 0)
                       and (bd is None or bd[i] == 1) and (wdl is None or wdl[i] == 1))
          if not untouched:  # pooled (spatial) axis: a new, unprunable identity
            g.mark(labs[i], "pin", f"window axis of {name}")
            labs[i] = g.new(out_shapes[o][i])
            g.mark(labs[i], "pin", f"window axis of {name}")
        outs.append(labs)
      for labs in outs[1:]:
        for a, b in zip(outs[0], labs):
          g.union(a, b)
      return [[g.resolve(x) for x in labs] for labs in outs]
    if name == "scan":
      nc, ncar = p["num_consts"], p["num_carry"]
      body = p["jaxpr"]
      xs = []
      for labs in L[nc + ncar:]:
        g.mark(labs[0], "pin", "scanned-over axis")
        xs.append(labs[1:])
      # a carry may become data-dependent in a later iteration: assume it is
      res = self.call(body, L[:nc] + L[nc:nc + ncar] + xs,
                      D[:nc] + [any(D)] * ncar + D[nc + ncar:])
      # the body runs on its own output carry: couple carry in and out (one
      # pass suffices, the body's couplings are the same every iteration)
      for a, b in zip(L[nc:nc + ncar], res[:ncar]):
        for x, y in zip(a, b):
          g.union(x, y)
      outs = [[g.resolve(x) for x in labs] for labs in res[:ncar]]
      for labs, s in zip(res[ncar:], out_shapes[ncar:]):
        lead = g.new(s[0])
        g.mark(lead, "pin", "scanned-over axis")
        outs.append([lead] + list(labs))
      return outs
    if name == "while":
      cn, bn = p["cond_nconsts"], p["body_nconsts"]
      carry = L[cn + bn:]
      d = [any(D)] * len(carry)
      res = self.call(p["body_jaxpr"], L[cn:cn + bn] + carry, D[cn:cn + bn] + d)
      for a, b in zip(carry, res):
        for x, y in zip(a, b):
          g.union(x, y)
      self.call(p["cond_jaxpr"], L[:cn] + carry, D[:cn] + d)
      return [[g.resolve(x) for x in labs] for labs in carry]
    if name == "cond":
      branches = p["branches"]
      results = [self.call(b, L[1:], D[1:]) for b in branches]
      for other in results[1:]:
        for a, b in zip(results[0], other):
          for x, y in zip(a, b):
            g.union(x, y)
      return [[g.resolve(x) for x in labs] for labs in results[0]]
    if name in _CALLS:
      for key in _CALL_KEYS:
        sub = p.get(key)
        if sub is not None and hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          return self.call(sub, L, D)
    raise _Unsupported("")


def _trace(apply_fn: Callable[..., Any], variables: Any, args: tuple, kwargs: dict,
           ) -> tuple[_Graph, list[tuple[str, tuple[int, ...], list[Label]]]]:
  flat_vars, _ = jax.tree_util.tree_flatten_with_path(variables)
  closed = jax.make_jaxpr(lambda v, a: apply_fn(v, *a, **kwargs))(variables, args)
  jaxpr = closed.jaxpr
  g = _Graph()
  t = _Tracer(g)
  n_vars = len(flat_vars)
  in_labels, in_data = [], []
  var_labels = []
  for i, v in enumerate(jaxpr.invars):
    labs = t.fresh(_shape(v))
    if i < n_vars:
      path = jax.tree_util.keystr(flat_vars[i][0])
      var_labels.append((path, _shape(v), labs))
      in_data.append(False)
    else:
      for lab in labs:
        g.mark(lab, "pin", "model input")
      in_data.append(True)
    in_labels.append(labs)
  outs = t.call(closed, in_labels, in_data)
  for labs in outs:
    for lab in labs:
      g.mark(lab, "pin", "model output")
  used = set()
  for eqn in jaxpr.eqns:
    used.update(id(v) for v in eqn.invars)
  used.update(id(v) for v in jaxpr.outvars)
  var_labels = [(p, s, labs) for (p, s, labs), v in zip(var_labels, jaxpr.invars[:n_vars])
                if id(v) in used]
  return g, var_labels


def find_groups(apply_fn: Callable[..., Any], variables: Any, *args: Any,
                on_unsupported: str = "raise", **kwargs: Any) -> tuple[Group, ...]:
  """Finds the prunable dependency groups of a model, automatically.

  Traces ``apply_fn(variables, *args, **kwargs)`` to a jaxpr and couples every
  axis of every leaf of ``variables`` with the axes it must be pruned together
  with. For a Flax Linen model pass ``variables = {"params": ..., "batch_stats":
  ...}`` and ``apply_fn = lambda v, x: model.apply(v, x)`` (inference mode):
  BatchNorm statistics then join their channel's group. For Flax NNX, see
  :func:`find_groups_nnx`.

  Args:
    apply_fn: ``apply_fn(variables, *args, **kwargs) -> outputs``.
    variables: pytree of arrays (parameters and any other collections).
    *args: example inputs (only shapes and dtypes matter).
    on_unsupported: ``"raise"`` (default): a primitive that is not understood
      on the path of an otherwise prunable group raises a ``ValueError`` naming
      it; ``"skip"``: such groups are left out.
    **kwargs: passed to ``apply_fn``.

  Example::

    variables = model.init(key, x)                      # Linen, BatchNorm in eval mode
    groups = jp.find_groups(model.apply, variables, x)  # shapes suffice: eval_shape works too
    scores = jp.group_scores(groups, jp.magnitude(variables))
    keep = jp.group_masks(scores, 0.5)                  # True = keep, per group
    small = jp.shrink(variables, groups, keep)
    sizes = jp.linen_features(small["params"])          # rebuild the module with these

  Returns:
    Groups in order of their first member's leaf (order of
    ``jax.tree.leaves(variables)``); groups touching the model's inputs or
    outputs, constants, reductions and the other cases listed in the module
    docstring are left out.
  """
  if on_unsupported not in ("raise", "skip"):
    raise ValueError(f"on_unsupported: expected 'raise' or 'skip', got {on_unsupported!r}")
  g, var_labels = _trace(apply_fn, variables, args, kwargs)
  classes: dict[int, list[Member]] = {}
  order: list[int] = []
  ndims: dict[str, int] = {}
  for path, shape, labs in var_labels:
    ndims[path] = len(shape)
    for axis, lab in enumerate(labs):
      for root, units in g.unit_maps(lab):
        root = g.find(root)
        if root not in classes:
          classes[root] = []
          order.append(root)
        classes[root].append(Member(path, axis, units))
  groups = []
  for root in order:
    if root in g.pin:
      continue
    members = classes[root]
    if root in g.poison:
      if on_unsupported == "skip":
        continue
      paths = sorted({m.path for m in members})
      raise ValueError(
          f"find_groups: unsupported primitive {g.poison[root]!r} on the coupled path of "
          f"leaves {paths}; expected only the primitives in jaxprune.SUPPORTED_PRIMITIVES "
          "(pass explicit groups built with make_group, or on_unsupported='skip')")
    named = [m for m in members if ndims[m.path] >= 2] or members
    name = f"{named[0].path}[axis {named[0].axis}]"
    groups.append(Group(g.size[root], tuple(members), name))
  return tuple(groups)


def find_groups_nnx(model: Any, *args: Any, on_unsupported: str = "raise",
                    **kwargs: Any) -> tuple[Group, ...]:
  """:func:`find_groups` for a Flax NNX module.

  Paths refer to ``nnx.split(model)[1]`` (the model's full state, including
  BatchNorm statistics); call ``model.eval()`` first for inference behaviour.

  Args:
    model: an ``nnx.Module``.
    *args: example inputs for ``model(*args, **kwargs)``.
    on_unsupported: see :func:`find_groups`.
    **kwargs: passed to the model.

  Returns:
    The groups, with paths into the model's state.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)

  def apply(st, *a, **kw):
    return nnx.merge(graphdef, st)(*a, **kw)

  return find_groups(apply, state, *args, on_unsupported=on_unsupported, **kwargs)
