"""Logger scalars from a pruning state: the current target and the sparsity of every leaf.

The names are those of `jaxprune.Report.to_dict` (``sparsity/total``, ``sparsity/<leaf>`` with
``<leaf>`` the leaf path joined by ``/``), so a run can log both and get one series per name. The
values are JAX scalars computed from the masks alone (no copy of the parameters to the host):
the function works inside a jitted train step as well as outside.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._src import mask_state
from jaxprune._src import report as report_lib
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src.types import Array, Prunable, PyTree


def prune_scalars(state: Any, params: PyTree, *, prunable: Prunable = None,
                  stacked: stacked_lib.Stacked = None) -> dict[str, Array]:
  """Flat ``{name: scalar}`` of a pruning state, for TensorBoard / W&B / CLU style loggers.

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]), "b": jnp.zeros(3)}
    >>> masks = {"w": jnp.array([[False, True, False], [True, False, True]]),
    ...          "b": jnp.ones(3, bool)}
    >>> state = optax.chain(optax.adam(1e-3), jp.prune(0.5, masks=masks)).init(params)
    >>> {name: float(v) for name, v in jp.prune_scalars(state, params).items()}
    {'prune/step': 0.0, 'prune/target': 0.5, 'sparsity/total': 0.5, 'sparsity/w': 0.5}

  Args:
    state: an optimizer state holding masks anywhere (a `jaxprune.PruneState` inside an
      ``optax.chain``, an ``nnx.Optimizer``'s ``opt_state``...; see `jaxprune.find_masks`).
    params: the parameters the masks belong to (only their structure, shapes and dtypes are
      read, so traced parameters work).
    prunable: the prunable rule the transformation was built with (see
      `jaxprune.prunable_flags`); only prunable leaves are reported.
    stacked: the layer axes the transformation was built with (see `jaxprune.prune`): a stacked
      leaf is reported per slice, ``sparsity/<leaf>/<index>``, as `jaxprune.report` does.

  Returns:
    ``prune/step`` (the state's update count) and ``prune/target`` (the overall sparsity the
    current masks were computed for) when the state has them, then ``sparsity/total`` (pruned
    fraction over all prunable entries) and ``sparsity/<leaf>`` per prunable leaf (or slice), as
    float32 (``prune/step`` int32) scalars. Empty leaves count as 0.0.
  """
  node = mask_state.find_mask_state(state, params)
  masks = jax.tree.leaves(tree_lib.like(node.masks, params))
  layers = stacked_lib.resolve(params, stacked, prunable)
  out: dict[str, Array] = {}
  if hasattr(node, "count"):
    out["prune/step"] = jnp.asarray(node.count)
  if hasattr(node, "target"):
    out["prune/target"] = jnp.asarray(node.target, jnp.float32)
  chosen = []  # (path, size, pruned entries) of every pruned layer
  for (path, _), mask, l in zip(jax.tree_util.tree_flatten_with_path(params)[0], masks, layers):
    if not l.any:
      continue
    pruned = (l.size - jnp.sum(jnp.asarray(mask, jnp.int32).reshape(l.num, l.size), axis=1))
    chosen += [(q, l.size, pruned[j].astype(jnp.float32))
               for j, q in enumerate(stacked_lib.slice_paths(path, l)) if l.flags[j]]
  sizes = [n for _, n, _ in chosen]
  # Under jit XLA turns a division by a constant into a product with its reciprocal, one ulp
  # away from the eager quotient at times; opaque sizes keep jitted and eager values equal.
  denominators = jax.lax.optimization_barrier(
      jnp.asarray([max(n, 1) for n in sizes] + [max(sum(sizes), 1)], jnp.float32))
  # float32 sums: an int32 count of pruned entries would overflow past 2**31 parameters.
  out["sparsity/total"] = sum((c for _, _, c in chosen), jnp.zeros((), jnp.float32)) / (
      denominators[-1])
  for i, (path, _, count) in enumerate(chosen):
    out[f"sparsity/{report_lib.log_name(path)}"] = count / denominators[i]
  return out
