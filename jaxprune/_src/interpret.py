"""Sites at work: tracing a model, the 2-D view of a kernel, evaluation with hooks at sites.

`trace` turns ``apply_fn(params, batch)`` into a jaxpr over the flattened parameter leaves and
finds its dot/conv sites (`jaxpr_sites.find_sites`). `to_matrix` / `from_matrix` give a kernel's
canonical ``(d_in, d_out)`` view at a site and its exact inverse.

`evaluate` binds each equation as `jax.core.eval_jaxpr` does, except that a call-like equation
(``jit``, ``checkpoint``, ``custom_jvp_call`` ...) holding a marked site is evaluated inline and a
``scan`` holding one as a `jax.lax.scan` over its evaluated body. A marked site is shifted (a
given array is added to its output, one slice per iteration inside a ``scan``: differentiating
the evaluation with respect to the shifts gives each site's output cotangents) or tapped
(`evaluate_with_taps` returns a value computed from its operands and output, stacked over scan
iterations). Everything is ordinary `jax.numpy` work, so the evaluation traces under `jax.jit`,
`jax.vjp` and `jax.vmap` like the original function. Inlining a ``custom_jvp_call`` or
``custom_vjp_call`` that holds a marked site drops its custom derivative rule (differentiation
then goes through its primal body).

`site_inputs` / `site_outputs` turn a site's activation operand and output into token-major
arrays ``(*tokens, d_in)`` / ``(*tokens, d_out)`` matching `to_matrix`'s rows and columns, so that
for every site ``site_outputs(y) == site_inputs(x) @ to_matrix(kernel)``. Convolution inputs are
their patches (`jax.lax.conv_general_dilated_patches`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src import jaxpr_sites
from jaxprune._src import jaxpr_walk
from jaxprune._src import obs
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.jaxpr_sites import Site
from jaxprune._src.jaxpr_walk import Location

PyTree = Any

# (operands of the site's equation, its output) -> a value to return from the evaluation.
Tap = Callable[[Sequence[jax.Array], jax.Array], Any]


class Traced(NamedTuple):
  """``apply_fn(params, batch)`` as a jaxpr over the flattened leaves, and its sites.

  Attributes:
    jaxpr: closed jaxpr with invars ``leaves + batch leaves``.
    treedef: tree structure of ``params``.
    paths: path string of each leaf.
    shapes: shape of each leaf.
    read: indices of the leaves some equation of the jaxpr reads.
    sites: the dot/conv sites (`find_sites`).
  """
  jaxpr: Any
  treedef: Any
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  read: frozenset[int]
  sites: tuple[Site, ...]


def trace(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any) -> Traced:
  """Traces ``apply_fn(params, batch)`` (abstractly) and finds its sites.

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: parameter pytree (arrays or `jax.ShapeDtypeStruct`).
    batch: one batch (arrays or `jax.ShapeDtypeStruct`).

  Returns:
    A `Traced`.
  """
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in with_paths]
  paths = tuple(tree_lib.path_str(p) for p, _ in with_paths)
  shapes = tuple(tuple(int(d) for d in np.shape(x)) for x in leaves)
  closed = jax.make_jaxpr(lambda ls, b: apply_fn(jax.tree.unflatten(treedef, ls), b))(
      leaves, batch)
  inner = closed.jaxpr
  used = {id(v) for e in inner.eqns for v in e.invars} | {id(v) for v in inner.outvars}
  read = frozenset(i for i, v in enumerate(inner.invars[:len(leaves)]) if id(v) in used)
  sites = jaxpr_sites.find_sites(closed, paths, shapes)
  return Traced(closed, treedef, paths, shapes, read, tuple(sites))


def _permutation(site: Site) -> tuple[int, ...]:
  return site.loop_axes + site.contract_axes + site.out_axes


def _stack(site: Site) -> tuple[int, ...]:
  return (site.slices,) if site.loop_axes else ()


def to_matrix(leaf: jax.Array, site: Site) -> jax.Array:
  """The ``(d_in, d_out)`` view of a kernel at ``site``: ``y = x @ to_matrix(leaf, site)``.

  Args:
    leaf: the kernel (shape ``site.shape``).
    site: a `Site` of that kernel.

  Returns:
    ``leaf.reshape(site.atoms)`` with the contracted atoms moved first and flattened into rows,
    the others into columns; for a kernel stacked along a ``scan`` (``site.loop_axes``) one such
    view per slice, ``(slices, d_in, d_out)``.
  """
  if tuple(jnp.shape(leaf)) != site.shape:
    raise ValueError(f"leaf: expected shape {site.shape}, got {jnp.shape(leaf)} ({site.path})")
  w = jnp.reshape(leaf, site.atoms)
  return jnp.transpose(w, _permutation(site)).reshape(_stack(site) + (site.d_in, site.d_out))


def from_matrix(w2: jax.Array, site: Site, shape: Optional[Sequence[int]] = None) -> jax.Array:
  """Inverse of `to_matrix`: the ``(d_in, d_out)`` matrix back in the kernel's own layout.

  Args:
    w2: a ``(d_in, d_out)`` matrix (``(slices, d_in, d_out)`` for a stacked kernel).
    site: the `Site` it was taken at.
    shape: the kernel's shape (default: ``site.shape``).

  Returns:
    An array of the kernel's shape.
  """
  shape = tuple(site.shape if shape is None else shape)
  want = _stack(site) + (site.d_in, site.d_out)
  if shape != site.shape or tuple(jnp.shape(w2)) != want:
    raise ValueError(f"w2: expected shape {want} for a kernel of shape {site.shape}, got "
                     f"{jnp.shape(w2)} and shape {shape} ({site.path})")
  perm = _permutation(site)
  w = jnp.reshape(w2, tuple(site.atoms[a] for a in perm))
  return jnp.transpose(w, tuple(int(i) for i in np.argsort(perm))).reshape(shape)


def _atom_owners(site: Site) -> list[int]:
  """The leaf axis each atom of ``site.atoms`` refines (a split axis owns consecutive atoms)."""
  owners, k = [], 0
  for axis, d in enumerate(site.shape):
    n, k = site.atoms[k], k + 1
    owners.append(axis)
    while n < d:
      n, k = n * site.atoms[k], k + 1
      owners.append(axis)
  return owners


def _run_size(atoms: Sequence[int], per_atom: Sequence[int], axes: Sequence[int]) -> Optional[int]:
  """Length of the run of consecutive rows (or columns) that a block covers over ``axes``
  flattened outer to inner, or None when the block is not one aligned run: the inner atoms must
  be covered whole up to one partly covered atom, and the outer ones not at all."""
  size, partial = 1, False
  for a in reversed(axes):
    if partial and per_atom[a] != 1:
      return None
    partial = partial or per_atom[a] != atoms[a]
    size *= per_atom[a]
  return size


def site_pattern(pattern: Any, site: Site) -> obs.ParsedPattern:
  """A sparsity pattern resolved to the kernel's ``(d_in, d_out)`` view at ``site``.

  ``"n:m"`` groups run along the view's rows, the kernel's input features whatever its layout;
  a `jaxprune.NMPattern` must name the leaf axis of the innermost input feature (``-2`` for
  Flax Dense ``(in, out)``, Conv ``(kh, kw, in, out)`` and einsum ``(heads, d_model, d_head)``
  kernels, ``-1`` for an ``(out, in)`` weight), where its groups are the same rows. A
  `jaxprune.BlockPattern` blocks the leaf's trailing dims as `jaxprune.block_mask` does, and
  each block must be one rectangle of the view (an ``(r, c)`` block of a Flax Dense kernel is an
  ``r × c`` tile; of an ``(out, in)`` weight a ``c × r`` one).

  Args:
    pattern: any spelling of `jaxprune._src.obs.parse_pattern`.
    site: the kernel's `Site`.

  Returns:
    The `obs.ParsedPattern` for the view, checked against its shape.
  """
  pat = obs.parse_pattern(pattern)
  shape, atoms, owners = site.shape, site.atoms, _atom_owners(site)
  if pat.kind == "nm" and pat.axis is not None:
    axis = validation.normalize_axis(pat.axis, len(shape), "pattern.axis", site.path)
    inner = owners[site.contract_axes[-1]] if site.contract_axes else None
    if axis != inner:
      want = "none" if inner is None else f"{inner} or {inner - len(shape)}"
      raise validation.error("pattern.axis", f"{want}, the innermost input axis of the kernel",
                             pat.axis, site.path)
    if atoms[site.contract_axes[-1]] % pat.b:
      raise validation.error("pattern", f"groups of m={pat.b} dividing the "
                             f"{atoms[site.contract_axes[-1]]} entries of axis {axis}",
                             f"{pat.a}:{pat.b}", site.path)
    pat = pat._replace(axis=None)
  elif pat.kind == "block" and pat.shape is not None:
    if len(pat.shape) > len(shape):
      raise validation.error("pattern.shape", f"at most {len(shape)} dims for shape {shape}",
                             pat.shape, site.path)
    block = (1,) * (len(shape) - len(pat.shape)) + pat.shape
    if any(d % b for d, b in zip(shape, block)):
      raise validation.error("pattern.shape", f"a divisor of shape {shape}", pat.shape, site.path)
    per_atom = [1] * len(atoms)
    for a in reversed(range(len(atoms))):  # inner atoms of an axis take its block first
      b = block[owners[a]]
      per_atom[a] = min(b, atoms[a]) if b % atoms[a] == 0 or atoms[a] % b == 0 else 0
      block = block[:owners[a]] + (max(b // atoms[a], 1),) + block[owners[a] + 1:]
    rows = _run_size(atoms, per_atom, site.contract_axes)
    cols = _run_size(atoms, per_atom, site.out_axes)
    if not rows or not cols or 0 in per_atom:
      raise validation.error("pattern.shape", "blocks that are tiles of the kernel's (inputs, "
                             f"outputs) view (atoms {atoms}, inputs {site.contract_axes})",
                             pat.shape, site.path)
    pat = pat._replace(a=rows, b=cols, shape=None)
  return obs.layer_pattern(pat, (site.d_in, site.d_out), path=site.path)


def _bind(eqn: Any, args: Sequence[Any]) -> list[Any]:
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns: tuple = ()
  if isinstance(params, tuple):  # older jax returned (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *args, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], prefix: Location,
          shifts: Mapping[Location, Any], taps: Mapping[Location, Tap], enclosing: frozenset,
          found: dict) -> list[Any]:
  env: dict = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for i, eqn in enumerate(jaxpr.eqns):
    loc = prefix + (i,)
    ins = [read(v) for v in eqn.invars]
    if loc in enclosing and eqn.primitive.name == "scan":
      outs = _scan(eqn, ins, loc, shifts, taps, enclosing, found)
    elif loc in enclosing:
      body = jaxpr_walk.call_body(eqn)
      if body is None:
        raise ValueError(f"shifts, taps: expected sites outside {eqn.primitive.name}, got a "
                         f"marked site inside it at location {loc}")
      inner = getattr(body, "jaxpr", body)
      outs = _eval(inner, list(getattr(body, "consts", [])), ins, loc + (0,), shifts, taps,
                   enclosing, found)
    else:
      outs = _bind(eqn, ins)
    if loc in taps:
      found[loc] = taps[loc](ins, outs[0])
    if loc in shifts:
      outs = [outs[0] + shifts[loc]]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _scan(eqn: Any, ins: list, loc: Location, shifts: Mapping[Location, Any],
          taps: Mapping[Location, Tap], enclosing: frozenset, found: dict) -> list[Any]:
  """A ``scan`` holding marked sites, as a `jax.lax.scan` over its evaluated body: the shifts of
  its sites are scanned over with its inputs, and the values tapped inside come out stacked over
  the iterations, in the order of the scanned axis."""
  p = eqn.params
  body, nc, ncar = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, init, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
  inside = [k for k in shifts if k[:len(loc)] == loc]

  def step(carry: list, x: tuple[list, list]) -> tuple[list, tuple[list, dict]]:
    sliced, here = x
    inner: dict = {}
    outs = _eval(body.jaxpr, list(body.consts), [*consts, *carry, *sliced], loc + (0,),
                 {**shifts, **dict(zip(inside, here))}, taps, enclosing, inner)
    return outs[:ncar], (outs[ncar:], inner)

  carry, (ys, inner) = lax.scan(step, list(init), (list(xs), [shifts[k] for k in inside]),
                                length=p["length"], reverse=p["reverse"])
  found.update(inner)
  return [*carry, *ys]


def scan_lengths(jaxpr: Any, location: Location) -> tuple[int, ...]:
  """Lengths of the ``scan`` equations enclosing ``location`` in a closed jaxpr, outermost
  first: the leading axes of a shift or tapped value at that location."""
  inner, lengths = jaxpr.jaxpr, []
  for depth in range(0, len(location) - 1, 2):
    eqn = inner.eqns[location[depth]]
    if eqn.primitive.name == "scan":
      lengths.append(int(eqn.params["length"]))
      body = eqn.params["jaxpr"]
    else:
      body = jaxpr_walk.call_body(eqn)
    inner = getattr(body, "jaxpr", body)
  return tuple(lengths)


def evaluate(jaxpr: Any, args: Sequence[Any],
             shifts: Optional[Mapping[Location, Any]] = None) -> list[Any]:
  """Evaluates a closed jaxpr, adding a shift to the output of each shifted site.

  Args:
    jaxpr: a `ClosedJaxpr`.
    args: one value per invar.
    shifts: ``{site location: array}`` added to the site's output; for a site inside a
      ``scan``, stacked over the iterations on a leading axis (in the order of the scanned
      axis), one slice added per iteration.

  Returns:
    One value per outvar.
  """
  return evaluate_with_taps(jaxpr, args, {}, shifts)[0]


def evaluate_with_taps(jaxpr: Any, args: Sequence[Any], taps: Mapping[Location, Tap],
                       shifts: Optional[Mapping[Location, Any]] = None
                       ) -> tuple[list[Any], dict[Location, Any]]:
  """`evaluate`, also returning a value computed at each tapped site.

  Args:
    jaxpr: a `ClosedJaxpr`.
    args: one value per invar.
    taps: ``{site location: tap}``; each tap maps the site's operands and output (before its
      shift) to a value.
    shifts: as in `evaluate`.

  Returns:
    The outvars' values and ``{location: tapped value}``; a site inside a ``scan`` gives its
    values over the iterations stacked on a leading axis.
  """
  shifts = dict(shifts or {})
  marked = list(shifts) + list(taps)
  enclosing = frozenset(loc[:k] for loc in marked for k in range(1, len(loc), 2))
  found: dict = {}
  outs = _eval(jaxpr.jaxpr, list(jaxpr.consts), list(args), (), shifts, dict(taps),
               enclosing, found)
  return outs, found


def _conv_patches(site: Site, x: jax.Array) -> jax.Array:
  eqn = site.eqn
  p = eqn.params
  dn = p["dimension_numbers"]
  kernel_shape = eqn.invars[1].aval.shape
  n = len(dn.lhs_spec) - 2
  # With an OIHW-style kernel spec, patch features are (input channel, tap in spatial order).
  canonical = lax.ConvDimensionNumbers(dn.lhs_spec, tuple(range(n + 2)), dn.out_spec)
  patches = lax.conv_general_dilated_patches(
      x, tuple(kernel_shape[d] for d in dn.rhs_spec[2:]), p["window_strides"], p["padding"],
      lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
      dimension_numbers=canonical, precision=lax.Precision.HIGHEST)
  patches = jnp.transpose(patches, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
  channels = kernel_shape[dn.rhs_spec[1]]
  # Rows as `Site.contract_axes` orders them: tap outer, input channel inner.
  patches = patches.reshape(*patches.shape[:-1], channels, -1)
  return jnp.swapaxes(patches, -1, -2).reshape(*patches.shape[:-2], site.d_in)


def site_inputs(site: Site, x: jax.Array) -> jax.Array:
  """The activation operand of ``site`` as float32 ``(*tokens, d_in)``.

  Args:
    site: a `Site` without a ``problem``.
    x: the equation's activation operand.

  Returns:
    ``dot_general``: ``x`` with its free axes first (the tokens) and its contracted axes
    flattened last; ``conv_general_dilated``: the patches, ``(batch, *output spatial, d_in)``,
    features ordered (kernel tap, input channel) with the channel fastest.
  """
  x = jnp.asarray(x, jnp.float32)
  if site.primitive == "conv_general_dilated":
    return _conv_patches(site, x)
  (lc, rc), _ = site.eqn.params["dimension_numbers"]
  contract = lc if site.operand == 1 else rc
  free = [d for d in range(x.ndim) if d not in contract]
  x = jnp.transpose(x, (*free, *contract))
  return x.reshape(*x.shape[:len(free)], site.d_in)


def site_outputs(site: Site, y: jax.Array) -> jax.Array:
  """The output of ``site`` (or a cotangent of it) as ``(*tokens, d_out)``, like `site_inputs`."""
  if site.primitive == "conv_general_dilated":
    dn = site.eqn.params["dimension_numbers"]
    return jnp.transpose(y, (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
  (lc, rc), _ = site.eqn.params["dimension_numbers"]
  kernel_ndim = len(site.eqn.invars[site.operand].aval.shape)
  n_kernel = kernel_ndim - len(rc if site.operand == 1 else lc)
  n_tokens = y.ndim - n_kernel
  # dot_general's output is (lhs free axes, rhs free axes).
  order = (range(y.ndim) if site.operand == 1 else
           [*range(n_kernel, y.ndim), *range(n_kernel)])
  y = jnp.transpose(y, tuple(order))
  return y.reshape(*y.shape[:n_tokens], int(np.prod(y.shape[n_tokens:], dtype=np.int64)))
