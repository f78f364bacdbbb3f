"""Physical removal of pruned units: smaller arrays that compute the same function.

Given dependency groups (`jaxprune.structured.find_groups`) and one keep mask per
group, every coupled axis of every leaf is sliced to the kept units. The result
equals the model with those units zeroed (`jaxprune.structured.apply_group_masks`)
because every consumer of a removed unit lost the matching input rows, so a
removed unit contributed exactly zero before removal.

Linen modules check parameter shapes against their configuration, so a shrunk
Linen model is rebuilt with `linen_features` giving the new sizes; NNX
modules are rebuilt directly by `shrink_nnx`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.group_layers import axis_keep_by_leaf, check_axis_keep
from jaxprune._src.group_scores import check_keep
from jaxprune._src.groups import Group
from jaxprune._src.types import PyTree


def _concrete_keep(groups: Sequence[Group], keep: Sequence[Any], variables: PyTree,
                   stacked: stacked_lib.Stacked, name: str) -> list[np.ndarray]:
  check_keep(groups, keep, variables, stacked, name)
  out = []
  for g, k in zip(groups, keep):
    if isinstance(k, jax.core.Tracer):
      raise ValueError(f"{name}: keep masks must be concrete (new shapes are static); the mask "
                       f"of group {g.name} is traced. Call it outside jit.")
    k = np.asarray(k, bool)
    if not k.any(axis=-1).all():
      where = "" if k.ndim == 1 else " in some layer"
      raise ValueError(f"{name}: the keep mask of group {g.name} removes all {g.size} units"
                       f"{where}; expected at least one unit kept (a layer cannot be removed "
                       "entirely)")
    out.append(k)
  return out


def _take(x: Any, keep: np.ndarray, axis: int, path: str) -> Any:
  """``x`` with only the kept indices of ``axis``; per layer for a per-layer mask, which must
  keep as many indices in every layer (the shrunk leaf has one shape)."""
  if keep.ndim == 1:
    return jnp.take(x, np.nonzero(keep)[0], axis=axis)
  counts = keep.sum(axis=-1)
  if np.any(counts != counts.flat[0]):
    raise validation.error("keep", "the same number of kept units in every layer (the shrunk "
                           "leaf has one shape)", validation.Text(
                               f"counts {counts.tolist()}"), path)
  # A stable sort of ~keep lists each layer's kept indices first, in their original order.
  idx = np.argsort(~keep, axis=-1, kind="stable")[..., :counts.flat[0]]
  lead = keep.ndim - 1
  shape = list(idx.shape[:-1]) + [1] * (np.ndim(x) - lead)
  shape[axis] = idx.shape[-1]
  return jnp.take_along_axis(jnp.asarray(x), idx.reshape(shape), axis=axis)


def shrink(variables: PyTree, groups: Sequence[Group], keep: Sequence[Any], *,
           stacked: stacked_lib.Stacked = None) -> PyTree:
  """Removes the pruned units of every group from every coupled leaf.

  Examples:
    A convolution's channels and their BatchNorm statistics, in a Linen variables dict:

    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> variables = {"params": {"kernel": jnp.arange(6.0).reshape(1, 2, 3)},
    ...              "batch_stats": {"mean": jnp.array([0.5, 1.5, 2.5])}}
    >>> channels = [("['params']['kernel']", -1), ("['batch_stats']['mean']", -1)]
    >>> group = jp.structured.make_group(variables, channels)
    >>> small = jp.structured.shrink(variables, [group], [jnp.array([True, False, True])])
    >>> small["params"]["kernel"].tolist(), small["batch_stats"]["mean"].tolist()
    ([[[0.0, 2.0], [3.0, 5.0]]], [0.5, 2.5])
    >>> two = jax.tree.map(lambda x: jnp.stack([x, x + 10]), variables)   # two stacked layers
    >>> per_layer = jp.structured.make_group(two, channels)   # negative axes: the same list
    >>> keep = [jnp.array([[True, False, True], [False, True, True]])]   # 2 units per layer
    >>> jp.structured.shrink(two, [per_layer], keep, stacked=1)["batch_stats"]["mean"].tolist()
    [[0.5, 2.5], [11.5, 12.5]]

  Args:
    variables: the pytree the groups were found on (e.g. a Linen
      ``{"params": ..., "batch_stats": ...}`` dict or an NNX state).
    groups: the groups.
    keep: one concrete bool array per group, True = keep; at least one unit
      of every group must be kept. With ``stacked``, the mask of a per-layer group (see
      `jaxprune.structured.group_scores`) may be ``(*layer_shape, size)``, keeping the same
      number of units in every layer: each layer keeps its own units, gathered along the
      unit axis.
    stacked: leading layer axes of each leaf of ``variables``, as in
      `jaxprune.structured.group_scores`.

  Returns:
    A pytree of the same structure with smaller leaves (dtypes kept).
  """
  keep = _concrete_keep(groups, keep, variables, stacked, "shrink")
  axis_keep = axis_keep_by_leaf(groups, keep, np)
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  known = {tree_lib.path_str(p) for p, _ in flat}
  missing = sorted(set(axis_keep) - known)
  if missing:
    raise ValueError(f"shrink: the groups name leaves {missing} that variables does not have; "
                     "expected the pytree the groups were found on")
  out = []
  for p, x in flat:
    path = tree_lib.path_str(p)
    for axis, k in axis_keep.get(path, {}).items():
      check_axis_keep(path, tuple(np.shape(x)), axis, k, "shrink")
      x = _take(x, k, axis, path)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def linen_features(params: Mapping[str, Any]) -> dict[str, Any]:
  """Layer sizes to rebuild a Linen model from (shrunk) parameters.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"Dense_0": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
    ...           "Block_0": {"Dense_1": {"kernel": jnp.zeros((2, 3))}}}
    >>> jp.structured.linen_features(params)   # rebuild with nn.Dense(2), nn.Dense(3)
    {'Dense_0': 2, 'Block_0/Dense_1': 3}

  Args:
    params: a Linen ``params`` collection (nested dicts).

  Returns:
    A flat dict keyed by the module path (``"Block_0/Dense_1"``): for modules
    with a ``kernel`` (Dense, Conv, ...) the number of output features
    ``kernel.shape[-1]``; for attention modules (children ``query``, ``key``,
    ``value``, ``out``) a dict with ``num_heads``, ``qkv_features``
    and ``out_features``.
  """
  out: dict[str, Any] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    if all(k in node for k in ("query", "key", "value", "out")):
      q = np.shape(node["query"]["kernel"])
      out[prefix] = {"num_heads": int(q[-2]), "qkv_features": int(q[-2] * q[-1]),
                     "out_features": int(np.shape(node["out"]["kernel"])[-1])}
      return
    if "kernel" in node and not isinstance(node["kernel"], Mapping):
      out[prefix] = int(np.shape(node["kernel"])[-1])
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}/{k}" if prefix else k)

  walk(params, "")
  return out


def _sync_nnx(model: Any) -> None:
  """Updates size attributes of NNX layers to the shapes of their (shrunk) arrays."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  for _, m in nnx.iter_graph(model):
    if isinstance(m, nnx.MultiHeadAttention):
      qk = m.query.kernel[...].shape  # (in, heads, head_dim)
      m.num_heads = int(qk[1])
      m.head_dim = int(qk[2])
      m.qkv_features = int(qk[1] * qk[2])
      m.in_features = int(qk[0])
      if hasattr(m, "num_kv_heads"):
        m.num_kv_heads = int(m.key.kernel[...].shape[1])
      m.out_features = int(m.out.kernel[...].shape[-1])
    elif isinstance(m, nnx.LinearGeneral):
      shape = m.kernel[...].shape
      n_in = len(m.in_features)
      m.in_features = tuple(int(d) for d in shape[:n_in])
      m.out_features = tuple(int(d) for d in shape[n_in:])
    elif isinstance(m, nnx.Linear):
      m.in_features, m.out_features = (int(d) for d in m.kernel[...].shape)
    elif isinstance(m, nnx.Conv):
      shape = m.kernel[...].shape
      m.in_features = int(shape[-2] * m.feature_group_count)
      m.out_features = int(shape[-1])
    elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
      for name in ("scale", "bias", "mean", "var"):
        v = getattr(m, name, None)
        if v is not None:
          m.num_features = int(v[...].shape[-1])
          break
    elif isinstance(m, nnx.Embed):
      m.num_embeddings, m.features = (int(d) for d in m.embedding[...].shape)


def shrink_nnx(model: Any, groups: Sequence[Group], keep: Sequence[Any]) -> Any:
  """Returns a new NNX model with the pruned units removed (``model`` is untouched).

  Size attributes of the built-in layers (``Linear``, ``LinearGeneral``,
  ``Conv``, ``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``Embed``,
  ``MultiHeadAttention``) are updated to the new shapes.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs),
    ...                        nnx.Linear(3, 1, rngs=rngs))
    >>> model.eval()   # BatchNorm reads its running statistics
    >>> groups = jp.structured.find_groups_nnx(model, jnp.ones((1, 2)))
    >>> small = jp.structured.shrink_nnx(model, groups, [jnp.array([True, False, True])])
    >>> small.layers[0].out_features, small.layers[1].num_features, small.layers[1].mean.shape
    (2, 2, (2,))
    >>> small.layers[2].kernel.shape, small.layers[2].in_features
    ((2, 1), 2)

  Args:
    model: an ``nnx.Module``.
    groups: groups found by `jaxprune.structured.find_groups_nnx` on this model.
    keep: one concrete bool array per group of shape ``(group.size,)``, True = keep.

  Returns:
    A smaller ``nnx.Module`` of the same class.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  small = nnx.merge(graphdef, shrink(state, groups, keep))
  _sync_nnx(small)
  return small
