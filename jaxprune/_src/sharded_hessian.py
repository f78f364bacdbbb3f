"""The Hutchinson Hessian diagonal with the batch split over a mesh axis: each device
differentiates its local batch and the estimates are averaged with ``pmean``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Union

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune._src import scores as scores_lib
from jaxprune._src import sharding as sharding_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import PyTree

Array = jax.Array


def data_parallel_hessian_diag(loss_fn: Callable[..., Array], params: PyTree, *args: Any,
                               key: Array, mesh: sharding_lib.AnyMesh,
                               batch_axis: Union[str, tuple[str, ...]] = "data",
                               num_probes: int = 8) -> PyTree:
  """`hessian_diag` with the batch split over ``batch_axis``: per-shard HVPs averaged by ``pmean``.

  For a ``loss_fn`` that is a mean over examples and equal-sized batch shards, the mean of the
  per-shard Hessians is the Hessian of the global mean loss, so this is the estimate
  `hessian_diag` gives on the whole batch (same probes: the key is shared by all shards), up to
  float summation order. Each device only differentiates its local batch; the result is
  replicated over ``batch_axis``, so masks computed from it agree on every replica.

  The parameters may also be sharded over other mesh axes (model parallelism): only
  ``batch_axis`` is manual here, the rest stays under the compiler's automatic partitioning.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])   # one device here
    >>> c = jnp.stack([jnp.ones((2, 3)), 3 * jnp.ones((2, 3))])   # a batch of two examples
    >>> c = jax.device_put(c, NamedSharding(mesh, P("data")))
    >>> loss_fn = lambda p, c: 0.5 * jnp.mean(jnp.sum(c * p["w"] ** 2, axis=(1, 2)))
    >>> h = jp.sharding.data_parallel_hessian_diag(loss_fn, {"w": jnp.ones((2, 3))}, c,
    ...                                            key=jax.random.key(0), mesh=mesh)
    >>> h["w"].tolist()   # the mean of the examples' curvatures 1 and 3
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]

  Args:
    loss_fn: scalar ``loss_fn(params, *args)``, a mean over the examples of its batch.
    params: pytree of float arrays (replicated over ``batch_axis``).
    *args: batch arrays whose leading dimension is split over ``batch_axis`` (must divide).
    key: PRNG key for the Rademacher probes, the same on every shard.
    mesh: the device mesh.
    batch_axis: mesh axis name (or tuple of names) the batch is split over.
    num_probes: Hutchinson probes.

  Returns:
    float32 pytree with ``params``' structure: the averaged Hessian-diagonal estimate.

  References:
    Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", 2007.
  """
  names = sharding_lib.axis_names(batch_axis)
  for a in names:
    if a not in mesh.shape:
      raise ValueError(f"batch_axis: expected mesh axes among {tuple(mesh.axis_names)}, "
                       f"got {a!r}.")
  shards = math.prod(mesh.shape[a] for a in names)
  for path, x in tree_lib.leaves_with_paths(args):
    if np.ndim(x) == 0 or np.shape(x)[0] % shards:
      raise ValueError(f"args: batch leaf {path} with shape {np.shape(x)} must have a leading "
                       f"dimension divisible by the {shards} shards of {batch_axis!r}.")

  # A concrete batch is placed on the mesh here: under Explicit mesh axes, shard_map requires its
  # operands to carry the batch spec already (an unsharded array would be a type error).
  if isinstance(mesh, Mesh):
    batch = NamedSharding(mesh, PartitionSpec(names if len(names) > 1 else names[0]))
    args = tuple(jax.tree.map(
        lambda x: x if validation.is_traced(x) else jax.device_put(x, batch), a) for a in args)
  estimate = _data_parallel_estimator(loss_fn, mesh, names, num_probes, len(args))
  return estimate(params, key, *args)


@functools.lru_cache(maxsize=64)
def _data_parallel_estimator(loss_fn: Callable[..., Array], mesh: sharding_lib.AnyMesh,
                             names: tuple[str, ...], num_probes: int,
                             num_args: int) -> Callable[..., PyTree]:
  """The jitted shard_map estimator for one setting, built once (eager callers reuse it)."""

  def body(params, key, *local_args):
    h = scores_lib.hessian_diag(loss_fn, params, *local_args, key=key, num_probes=num_probes)
    return lax.pmean(h, names)

  batch_spec = PartitionSpec(names if len(names) > 1 else names[0])
  mapped = jax.shard_map(body, mesh=mesh, axis_names=set(names),
                         in_specs=(PartitionSpec(), PartitionSpec()) + (batch_spec,) * num_args,
                         out_specs=PartitionSpec(),
                         # Without replication typing, the gradient of the local loss w.r.t. the
                         # replicated params stays local; with it, autodiff would psum the
                         # cotangents over the shards (the transpose of the implicit broadcast)
                         # and the pmean would double count. pmean makes the output replicated.
                         check_vma=False)
  return jax.jit(mapped)


__all__ = ["data_parallel_hessian_diag"]
