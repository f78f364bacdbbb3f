"""Masks for parameters sharded over a device mesh, without gathering them.

`sharded_unstructured_mask` is `unstructured_mask` for parameters laid out by `NamedSharding`
on a `Mesh`. It runs the same sort-free radix select (`jaxprune._src.select`) inside
`jax.shard_map`: every device builds the 2¹⁶-bin histograms of its own block, the histograms are
combined with a `psum` (2¹⁶ int32 per pass, whatever the parameter size), and every device derives
the same threshold from the combined counts. Each block carries the *global* row-major positions
of its entries, so the tie rule (later leaf, then later row-major index, pruned first) is
the unsharded one and the masks are bit-identical to `unstructured_mask` on the gathered
arrays, NaN and ties included. No parameter or score vector is ever all-gathered; the masks
come back with the scores' sharding.

Under plain `jax.jit` with GSPMD (``Auto`` mesh axes), `unstructured_mask` on sharded inputs is
correct, but unless every leaf is split along its leading dimension only, XLA all-gathers
full-size key and mask arrays around the histogram scatter (the row-major flattening is then not
a contiguous split); with ``Explicit`` mesh axes (the default of `jax.make_mesh` in JAX 0.10) its
flattening reshape is rejected. Use the sharded variant for sharded parameters.
(`data_parallel_hessian_diag`, in `sharded_hessian`, averages the Hutchinson estimate over a
data-parallel mesh's batch shards.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxprune._src import elementwise
from jaxprune._src import masks as masks_lib
from jaxprune._src import select
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, PyTree, Sparsity

AnyMesh = Union[Mesh, jax.sharding.AbstractMesh]
Specs = Union[None, PartitionSpec, NamedSharding, PyTree]

def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def axis_names(entry: Any) -> tuple[str, ...]:
  """Mesh axis names of one PartitionSpec entry (None, a name, or a tuple of names)."""
  if entry is None:
    return ()
  if isinstance(entry, (tuple, list)):
    return tuple(entry)
  return (entry,)


def _array_of(x: Any) -> Any:
  """The array whose layout a leaf has: the first operand of `Elementwise` scores."""
  return x.operands[0] if isinstance(x, elementwise.Elementwise) else x


def _mesh_of(leaves: Sequence[Any], specs: Sequence[Any]) -> Optional[AnyMesh]:
  """The mesh named by a NamedSharding among the specs or the concrete leaves, if any."""
  for s in specs:
    if isinstance(s, NamedSharding):
      return s.mesh
  for x in map(_array_of, leaves):
    sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  current = jax.sharding.get_abstract_mesh()
  return None if current.empty else current


def _all_explicit(mesh: AnyMesh) -> bool:
  return all(t == AxisType.Explicit for t in mesh.axis_types)


def _leaf_spec(x: Any, path: str, mesh: AnyMesh) -> PartitionSpec:
  """Infers the PartitionSpec of one leaf from its sharding (concrete) or its type (traced)."""
  x = _array_of(x)
  if isinstance(x, jax.core.Tracer):
    sharding = getattr(jax.typeof(x), "sharding", None)
    # Under Auto axes a tracer's type says nothing about its layout (it reads as replicated);
    # guessing would make shard_map all-gather the leaf, the very thing this module avoids.
    if not _all_explicit(mesh) or not isinstance(sharding, NamedSharding):
      raise ValueError(
          f"specs: the sharding of leaf {path} cannot be read from a traced value under jit with "
          f"{tuple(str(t) for t in mesh.axis_types)} mesh axes; expected specs= (a PartitionSpec "
          "or NamedSharding per leaf, or a prefix pytree of them), got None.")
    return sharding.spec
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    if tuple(sharding.mesh.axis_names) != tuple(mesh.axis_names) or (
        dict(sharding.mesh.shape) != dict(mesh.shape)):
      raise ValueError(f"mesh: leaf {path} is sharded on a mesh with axes "
                       f"{dict(sharding.mesh.shape)}, expected the mesh {dict(mesh.shape)}.")
    return sharding.spec
  return PartitionSpec()  # numpy / single-device arrays: every device holds the whole leaf


def resolve_specs(tree: PyTree, mesh: Optional[AnyMesh] = None,
                  specs: Specs = None) -> tuple[AnyMesh, PyTree]:
  """The mesh and one `PartitionSpec` per leaf of ``tree``, checked against the mesh.

  Args:
    tree: pytree of arrays (concrete or traced).
    mesh: the device mesh; None takes it from a `NamedSharding` in ``specs`` or on a concrete
      leaf, else from the mesh set by `jax.set_mesh`.
    specs: None to read each leaf's sharding (concrete arrays; traced ones only with ``Explicit``
      mesh axes), or a `PartitionSpec` / `NamedSharding` for every leaf, or a pytree prefix of
      ``tree`` with those as leaves.

  Returns:
    ``(mesh, spec_tree)`` with a `PartitionSpec` per leaf of ``tree``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [tree_lib.path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  if specs is None:
    given = [None] * len(leaves)
  elif _is_spec_leaf(specs):
    given = [specs] * len(leaves)
  else:
    try:
      given = jax.tree.leaves(jax.tree.broadcast(specs, tree, is_leaf=_is_spec_leaf),
                              is_leaf=_is_spec_leaf)
    except (ValueError, TypeError) as e:
      raise ValueError("specs: expected a PartitionSpec or NamedSharding, or a pytree of them "
                       f"that is a prefix of the scores' structure; got a tree that does not "
                       f"match: {e}") from None
  if mesh is None:
    mesh = _mesh_of(leaves, given)
    if mesh is None:
      raise ValueError("mesh: expected a jax.sharding.Mesh (or NamedSharding specs, sharded "
                       "arrays, or a mesh set with jax.set_mesh), got None.")
  out = []
  for x, path, s in zip(leaves, paths, given):
    spec = s.spec if isinstance(s, NamedSharding) else s
    if spec is None:
      spec = _leaf_spec(x, path, mesh)
    shape = np.shape(x)
    if len(spec) > len(shape):
      raise ValueError(f"specs: leaf {path} has shape {shape}, got the longer spec {spec}.")
    seen: set = set()
    for d, entry in enumerate(spec):
      names = axis_names(entry)
      for a in names:
        if a not in mesh.shape:
          raise ValueError(f"specs: leaf {path} is sharded over {a!r}, expected one of the mesh "
                           f"axes {tuple(mesh.axis_names)}.")
        if a in seen:
          raise ValueError(f"specs: leaf {path} uses mesh axis {a!r} twice in {spec}.")
        seen.add(a)
      parts = math.prod(mesh.shape[a] for a in names)
      if shape[d] % parts:
        raise ValueError(f"specs: leaf {path} has size {shape[d]} along dimension {d}, expected "
                         f"a multiple of the {parts} shards of {spec[d]!r}.")
    out.append(PartitionSpec(*spec))
  return mesh, jax.tree.unflatten(treedef, out)


def _local_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: AnyMesh) -> tuple[int, ...]:
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  return tuple(d // math.prod(mesh.shape[a] for a in axis_names(e))
               for d, e in zip(shape, entries))


def _block_positions(shape: tuple[int, ...], spec: PartitionSpec, mesh: AnyMesh,
                     offset: int) -> Callable[[Array], Array]:
  """Inside shard_map: maps flat indices into this block to the entries' global positions.

  The global position is ``offset`` plus the entry's row-major index in the unsharded array; it
  is computed per chunk of flat indices, so no block-sized position array is ever built.
  """
  local = _local_shape(shape, spec, mesh)
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  blocks = []
  for entry in entries:
    block = jnp.uint32(0)
    # A dimension split over several axes is split major-to-minor in the order they are named.
    for a in axis_names(entry):
      block = block * jnp.uint32(mesh.shape[a]) + lax.axis_index(a).astype(jnp.uint32)
    blocks.append(block)

  def positions(flat: Array) -> Array:
    pos = jnp.full(flat.shape, offset, jnp.uint32)
    rest = flat
    for d in reversed(range(len(shape))):
      index = blocks[d] * jnp.uint32(local[d]) + rest % jnp.uint32(max(local[d], 1))
      rest = rest // jnp.uint32(max(local[d], 1))
      pos = pos + index * jnp.uint32(strides[d])
    return pos
  return positions


def _is_primary(spec: PartitionSpec, mesh: AnyMesh) -> Array:
  """True on exactly one device per distinct block: index 0 along the axes it is replicated on."""
  used = {a for e in spec for a in axis_names(e)}
  primary = jnp.bool_(True)
  for a in mesh.axis_names:
    if a not in used:
      primary = primary & (lax.axis_index(a) == 0)
  return primary


def sharded_unstructured_mask(scores: PyTree, sparsity: Sparsity,
                              mesh: Optional[AnyMesh] = None, *, scope: str = "layer",
                              prunable: tree_lib.Prunable = None, specs: Specs = None) -> PyTree:
  """`unstructured_mask` for scores sharded over a mesh: per-shard histograms, one psum per pass.

  Bit-identical to ``unstructured_mask(scores, sparsity, scope=scope, prunable=prunable)`` on the
  same (gathered) values: exactly ``round(s·n)`` per leaf or ``round(s·N)`` overall, lower scores
  first, NaN below every number, ties broken towards the later leaf and later row-major index.
  Inside `jax.shard_map` each device histograms its own block and tags it with the block's
  *global* row-major positions; only 2¹⁶-bin histograms (256 KiB) cross devices, two or four
  times per selection, never a parameter-sized array. Works eagerly and under `jax.jit`, with
  ``Auto`` or ``Explicit`` mesh axes, and across processes (`jax.distributed`).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])   # one device here
    >>> w = jax.device_put(jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]),
    ...                    NamedSharding(mesh, P(None, "model")))
    >>> masks = jp.sharding.sharded_unstructured_mask(jp.magnitude({"w": w}), 0.5)
    >>> masks["w"].tolist(), tuple(masks["w"].sharding.spec)
    ([[False, True, False], [True, False, True]], (None, 'model'))

  Args:
    scores: pytree of float arrays, higher = more important, or of `Elementwise` scores (their
      operands sharded alike), computed block by block and chunk by chunk on each device.
    sparsity: fraction in [0, 1], possibly traced; for ``scope="layer"`` also a pytree prefix of
      per-leaf fractions.
    mesh: the device mesh; None takes it from ``specs``, the arrays' shardings, or `jax.set_mesh`.
    scope: ``"layer"`` or ``"global"``, as in `unstructured_mask`.
    prunable: None (floating, ndim >= 2), a predicate ``(path, leaf) -> bool`` or a bool pytree.
    specs: the scores' layout: None reads it from the arrays (concrete arrays with a
      `NamedSharding`, or traced ones under ``Explicit`` mesh axes); under `jax.jit` with
      ``Auto`` axes pass the params' PartitionSpecs / NamedShardings (a pytree prefix is fine).
      Sharded dimensions must divide evenly.

  Returns:
    Pytree of bool masks shaped and sharded like ``scores`` (``NamedSharding(mesh, spec)``);
    True = keep. Unprunable leaves get all-True masks.

  References:
    The selection is the two-pass radix select of `jaxprune.unstructured_mask`, over 2¹⁶-bin
    histograms of order-preserving integer keys.
  """
  validation.check_choice(scope, masks_lib.SCOPES, "scope")
  leaves, paths, flags, treedef = masks_lib.prepare(scores, prunable)
  mesh, spec_tree = resolve_specs(scores, mesh, specs)
  spec_list = tuple(jax.tree.leaves(spec_tree, is_leaf=_is_spec_leaf))
  idx = tuple(i for i, f in enumerate(flags) if f)
  ks = masks_lib.leaf_counts(sparsity, scores, {i: leaves[i].size for i in idx}, paths, scope)
  ks = ks if idx else []
  # Counts enter shard_map as one replicated vector: concrete or traced alike.
  k_vec = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks]) if ks else jnp.zeros((0,), jnp.int32)
  shapes = tuple(tuple(x.shape) for x in leaves)
  fns, operands = elementwise.split_elementwise([leaves[i] for i in idx])
  selection = _sharded_selection(shapes, spec_list, idx, scope, mesh, fns,
                                 tuple(len(o) for o in operands))
  return jax.tree.unflatten(treedef, selection(k_vec, *[x for o in operands for x in o]))


@functools.lru_cache(maxsize=64)
def _sharded_selection(shapes: tuple, spec_list: tuple, idx: tuple, scope: str, mesh: AnyMesh,
                       fns: tuple, arities: tuple) -> Callable[..., list[Array]]:
  """The jitted shard_map selection for one layout, built once (eager callers reuse it).

  ``fns`` and ``arities``: per selected leaf, its `Elementwise` function (None for an array)
  and its number of operand arrays, which enter `shard_map` flat, each with the leaf's spec.
  """
  axes = tuple(mesh.axis_names)

  def reduce(h):
    # Every device holds or counts a part of each leaf: combine histograms over all axes.
    return lax.psum(h, axes)

  def body(k_vec, *flat_blocks):
    ends = np.cumsum(arities).tolist()
    blocks = elementwise.join_elementwise(
        fns, [flat_blocks[e - a:e] for a, e in zip(arities, ends)])
    counted = [_is_primary(spec_list[i], mesh) for i in idx]
    if scope == "layer":
      positions = [_block_positions(shapes[i], spec_list[i], mesh, 0) for i in idx]
      pruned = [select.prune_lowest([b], k_vec[j], positions=[p], counted=[c],
                                    reduce_counts=reduce)[0]
                for j, (b, p, c) in enumerate(zip(blocks, positions, counted))]
    else:
      offsets = np.cumsum([0] + [math.prod(shapes[i]) for i in idx[:-1]]).tolist()
      positions = [_block_positions(shapes[i], spec_list[i], mesh, o)
                   for i, o in zip(idx, offsets)]
      pruned = (select.prune_lowest(blocks, k_vec[0], positions=positions, counted=counted,
                                    reduce_counts=reduce) if idx else [])
    keep = dict(zip(idx, [~p for p in pruned]))
    return [keep[i] if i in keep else jnp.ones(_local_shape(shapes[i], spec_list[i], mesh), bool)
            for i in range(len(shapes))]

  mapped = jax.shard_map(body, mesh=mesh,
                         in_specs=(PartitionSpec(),) + tuple(
                             spec_list[i] for i, a in zip(idx, arities) for _ in range(a)),
                         out_specs=list(spec_list))
  # jit: an eager shard_map would dispatch every primitive of the body separately.
  return jax.jit(mapped)


def state_shardings(tx: optax.GradientTransformation, params: PyTree,
                    param_shardings: PyTree, mesh: Optional[AnyMesh] = None) -> PyTree:
  """Shardings for ``tx.init(params)``: parameter-shaped state (moments, masks) like the params.

  Pass the result as ``out_shardings`` of ``jax.jit(tx.init)`` (and of the train step) so that
  Adam moments, `prune` masks and Hessian accumulators are sharded exactly like the parameters
  they belong to; every other state leaf (counts, keys, targets) is replicated.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])   # one device here
    >>> import optax
    >>> params = {"w": jnp.ones((2, 4)), "b": jnp.zeros(4)}
    >>> shardings = {"w": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P())}
    >>> tx = optax.chain(optax.adam(1e-3), jp.prune(0.5))
    >>> state_sharding = jp.sharding.state_shardings(tx, params, shardings)
    >>> tuple(state_sharding[0][0].mu["w"].spec), tuple(state_sharding[0][0].count.spec)
    ((None, 'model'), ())
    >>> state = jax.jit(tx.init, out_shardings=state_sharding)(params)

  Args:
    tx: the optimizer (e.g. ``optax.chain(optax.adam(1e-3), jp.prune(...))``).
    params: the parameters, or `jax.ShapeDtypeStruct`s of them.
    param_shardings: a `NamedSharding` per parameter (pytree with the params' structure).
    mesh: mesh for the replicated leaves; defaults to the mesh of the first parameter sharding.

  Returns:
    A pytree of `NamedSharding` with the structure of ``tx.init(params)``.
  """
  shardings = jax.tree.leaves(param_shardings, is_leaf=_is_spec_leaf)
  if mesh is None:
    named = [s for s in shardings if isinstance(s, NamedSharding)]
    if not named:
      raise ValueError("param_shardings: expected NamedSharding leaves (or pass mesh=), got "
                       f"{type(shardings[0]).__name__ if shardings else 'an empty tree'}.")
    mesh = named[0].mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  state_shapes = jax.eval_shape(tx.init, params)

  def pick(leaf, p, s):
    # Some param-structured state holds scalar placeholders on unprunable leaves (e.g. `prune`'s
    # Hessian sums): only a leaf shaped like its parameter takes the parameter's sharding.
    return s if np.shape(leaf) == np.shape(p) else replicated

  return optax.tree_map_params(tx, pick, state_shapes, params, param_shardings,
                               transform_non_params=lambda _: replicated)

