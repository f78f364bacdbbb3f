"""`prune`: gradual magnitude / gradient / Hessian pruning as an optax transformation.

Chained last, after the optimizer, `prune` keeps a boolean mask per parameter in its state,
recomputes the masks inside the jitted step whenever the sparsity schedule's value changes, and
rewrites the updates so that the parameters after `optax.apply_updates` are exactly zero wherever
the mask is False:

    updates' = where(mask, updates, -params)      # params + (-params) == +0.0 exactly

This holds on the very step a mask changes and on every step after it, whatever momentum, Adam
moments or weight decay the inner optimizer carries, so no separate "apply the masks" call is
needed after the update. Masks are monotone: once pruned, an entry stays pruned.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune._src import distribution as distribution_lib
from jaxprune._src import masks as masks_lib
from jaxprune._src import scores as scores_lib
from jaxprune._src import select
from jaxprune._src import sharding as sharding_lib
from jaxprune._src import tree as tree_lib

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
ScheduleLike = Union[float, jax.Array, Schedule]
ScoreFn = Callable[..., PyTree]
DistributionFn = Callable[[jax.Array, PyTree], PyTree]
Overrides = Union[None, Mapping[str, ScheduleLike], Callable[[tuple, Any], Optional[ScheduleLike]]]

SCORES = ("magnitude", "gradient", "taylor", "obd", "hessian", "random")
_HESSIAN_SCORES = ("obd", "hessian")


class PruneState(NamedTuple):
  """State of `prune`; a plain pytree of arrays (checkpointable with orbax).

  Attributes:
    count: number of ``update`` calls so far (int32); the schedules are evaluated at it.
    target: the scheduled overall sparsity the current masks were computed for (float32).
    override_targets: the same for each per-leaf override schedule, in leaf order (a tuple of
      float32 scalars, empty without overrides; a tuple because orbax refuses empty arrays).
    masks: bool pytree with the structure of the params; True = keep. Leaves that are not
      prunable hold an all-True mask.
    key: PRNG key (``uint32[2]``) for random scores and Hessian probes.
    hess_sum: running sum of Hessian-diagonal estimates since the last mask update (float32
      pytree with the params' structure; scalar zeros on unprunable leaves), or ``()`` unless
      ``average_hessian=True``.
    hess_steps: number of estimates in ``hess_sum`` (int32).
  """
  count: jax.Array
  target: jax.Array
  override_targets: tuple
  masks: PyTree
  key: jax.Array
  hess_sum: PyTree
  hess_steps: jax.Array


def _as_schedule(value: ScheduleLike, name: str) -> Schedule:
  """A float / array becomes a constant schedule; a callable is used as is."""
  if callable(value):
    return value
  if not isinstance(value, (numbers.Real, jax.Array, np.ndarray)) or np.ndim(value) != 0:
    raise ValueError(f"{name}: expected a sparsity in [0, 1] or a schedule step -> sparsity, "
                     f"got {type(value).__name__}.")
  select.check_sparsity(value, name)  # concrete values: in [0, 1], not NaN; tracers pass
  const = value
  return lambda count: jnp.asarray(const, jnp.float32)


def _eval(schedule: Schedule, count: jax.Array) -> jax.Array:
  s = jnp.asarray(schedule(count), jnp.float32)
  if s.shape != ():
    raise ValueError(f"schedule: expected a scalar sparsity per step, got shape {s.shape}.")
  # NaN would make every later comparison 'changed'; treat it as 'no pruning' and clip the rest.
  return jnp.clip(jnp.where(jnp.isnan(s), 0.0, s), 0.0, 1.0)


def _resolve_overrides(params: PyTree, flags: PyTree,
                       overrides: Overrides) -> tuple[list[Optional[int]], list[Schedule]]:
  """Per leaf (in leaf order): the index of its override schedule, or None."""
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  flag_leaves = jax.tree.leaves(flags)
  paths = [tree_lib.path_str(p) for p, _ in with_paths]
  per_leaf: list[Optional[ScheduleLike]] = [None] * len(paths)
  if overrides is None:
    pass
  elif callable(overrides):
    per_leaf = [overrides(p, x) for p, x in with_paths]
  elif isinstance(overrides, Mapping):
    unknown = [k for k in overrides if k not in paths]
    if unknown:
      raise ValueError(f"overrides: expected keys that are leaf paths of the params such as "
                       f"{paths[:3]}, got unknown path {unknown[0]!r}.")
    per_leaf = [overrides.get(p) for p in paths]
  else:
    raise ValueError("overrides: expected None, a mapping from leaf path to sparsity/schedule or a "
                     f"callable (path, leaf) -> sparsity/schedule/None; got "
                     f"{type(overrides).__name__}.")
  index: list[Optional[int]] = []
  schedules: list[Schedule] = []
  for path, flag, value in zip(paths, flag_leaves, per_leaf):
    if value is None:
      index.append(None)
      continue
    if not flag:
      raise ValueError(f"overrides: leaf {path} is not prunable; got a sparsity override for it.")
    index.append(len(schedules))
    schedules.append(_as_schedule(value, f"overrides[{path!r}]"))
  return index, schedules


@dataclasses.dataclass(frozen=True)
class _RankedScores:
  """``fn(*operands)`` where ``keep``, NaN where pruned: the score a mask update ranks by.

  Already-pruned entries (NaN) rank below every number, so the k lowest include every pruned
  entry whenever k allows; live NaN scores become -inf to stay above them. Hashable by ``fn``,
  so that selections cached per score function (the sharded one) are reused across traces.
  """
  fn: Optional[Callable[..., jax.Array]]  # None: the first operand already holds the scores

  def __call__(self, keep: jax.Array, *operands: jax.Array) -> jax.Array:
    s = jnp.asarray(operands[0] if self.fn is None else self.fn(*operands), jnp.float32)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    return jnp.where(keep, s, jnp.nan)


def _no_scores(keep: jax.Array) -> jax.Array:
  """Placeholder scores of unprunable leaves; the selections never read them."""
  return jnp.zeros(keep.shape, jnp.float32)


def _reads_elementwise(mask_fn: Callable[..., PyTree]) -> bool:
  """Whether ``mask_fn`` is one of the library's unstructured selections (possibly a partial),
  which read `select.Elementwise` score leaves chunk by chunk; other mask functions get arrays."""
  base = mask_fn.func if isinstance(mask_fn, functools.partial) else mask_fn
  return base in (masks_lib.unstructured_mask, sharding_lib.sharded_unstructured_mask)


def prune(schedule: ScheduleLike,
          score: Union[str, ScoreFn] = "magnitude",
          *,
          scope: str = "layer",
          distribution: Union[str, DistributionFn] = "uniform",
          overrides: Overrides = None,
          prunable: tree_lib.Prunable = None,
          num_probes: int = 8,
          average_hessian: bool = False,
          seed: int = 0,
          mask_fn: Optional[Callable[..., PyTree]] = None) -> optax.GradientTransformationExtraArgs:
  """Gradual pruning inside the jitted train step; chain it after the optimizer.

  Example::

    tx = optax.chain(optax.adam(1e-3),
                     jp.prune(jp.polynomial_schedule(0.0, 0.9, 0, 1000, frequency=100)))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)   # exactly 0 where pruned

  At each ``update`` the schedule is evaluated at the step count. When its value differs from
  the target of the current masks (for a staircase schedule such as `polynomial_schedule`:
  exactly on its update steps), new masks are computed under `jax.lax.cond` — no retrace and no
  host sync — from the scores of the current params; entries already pruned rank below every
  score, and the new masks are intersected with the old ones, so pruning is monotone. The
  emitted updates are ``where(mask, updates, -params)`` on prunable leaves and the inner
  optimizer's updates unchanged elsewhere.

  Scores (``score``):
    * ``"magnitude"``: ``|w|`` (default).
    * ``"gradient"``: ``|g|``; ``"taylor"``: ``|w * g|``. Pass the raw gradients as ``grad=``
      to ``update`` (optax's extra-argument name, as in its line searches; it does not clash
      with ``nnx.Optimizer.update(model, grads, **kwargs)``); ``grads=`` is accepted too.
    * ``"obd"``: ``0.5 * h * w**2``; ``"hessian"``: ``|h|``, with ``h`` a Hutchinson estimate
      of the Hessian diagonal of ``loss_fn(params, batch)``. Pass ``loss_fn=`` and ``batch=`` to
      ``update`` (without ``batch=``, ``loss_fn(params)`` is used). With
      ``average_hessian=True`` ``h`` is estimated at every step and averaged over the steps
      since the last mask update (one Hessian-vector product per probe per step);
      otherwise it is estimated only on mask-update steps.
    * ``"random"``: uniform random scores from the state's key (random pruning baseline).
    * a callable ``fn(params, **extra_args) -> scores`` (same structure as the params, higher
      is more important); it receives every extra argument given to ``update``.

  Args:
    schedule: ``step -> sparsity`` (e.g. `polynomial_schedule`), or a constant sparsity. Under
      ``optax.inject_hyperparams`` the injected value is used as a constant per step.
    score: one of ``"magnitude"``, ``"gradient"``, ``"taylor"``, ``"obd"``, ``"hessian"``,
      ``"random"``, or a callable (see above).
    scope: ``"layer"`` (each leaf pruned to its own sparsity) or ``"global"`` (one threshold
      over all prunable leaves not overridden).
    distribution: for ``scope="layer"``, how the overall target is split across leaves:
      ``"uniform"``, ``"erk"`` (Erdős–Rényi-Kernel: density ∝ sum(shape) / prod(shape)), or a
      callable ``(target, params) -> per-leaf sparsities`` (a pytree prefix of the params; may
      be traced). Must be ``"uniform"`` with ``scope="global"``.
    overrides: per-leaf sparsities that replace the distribution for some leaves: a mapping from
      leaf path (as `jax.tree_util.keystr` renders it, e.g. ``"['dense1']['kernel']"``) to a
      constant sparsity or a schedule, or a callable ``(path, leaf) -> sparsity | schedule |
      None``. Overridden leaves are pruned per leaf in either scope.
    prunable: which leaves are pruned: ``None`` (floating arrays with ``ndim >= 2``), a predicate
      ``(path, leaf) -> bool`` or a pytree of bools.
    num_probes: Hutchinson probes per Hessian estimate.
    average_hessian: average the Hessian diagonal over the steps between mask updates.
    seed: seed of the state's PRNG key (random scores, Hessian probes).
    mask_fn: the selection, called as ``mask_fn(scores, sparsity, scope=..., prunable=...)``;
      default `unstructured_mask`. For parameters sharded over a mesh pass
      ``functools.partial(jp.sharded_unstructured_mask, mesh=mesh, specs=param_specs)`` so that
      only histograms cross devices (see docs/sharding.md).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose ``update(updates, state, params, *,
    grad=None, loss_fn=None, batch=None, **ignored)`` requires ``params``; state `PruneState`.
    Under ``optax.inject_hyperparams`` list the integer/boolean options that must stay static:
    ``static_args=("num_probes", "seed", "average_hessian")``.

  References:
    Zhu & Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning);
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", 2015;
    LeCun, Denker & Solla, "Optimal Brain Damage", NeurIPS 1989 (OBD saliency);
    Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019 (Taylor);
    Evci et al., "Rigging the Lottery", ICML 2020 (ERK distribution).
  """
  target_schedule = _as_schedule(schedule, "schedule")
  if isinstance(score, str):
    if score not in SCORES:
      raise ValueError(f"score: expected one of {SCORES} or a callable, got {score!r}.")
  elif not callable(score):
    raise ValueError(f"score: expected one of {SCORES} or a callable, got "
                     f"{type(score).__name__}.")
  if scope not in ("layer", "global"):
    raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}.")
  if isinstance(distribution, str):
    if distribution not in ("uniform", "erk"):
      raise ValueError(
          f"distribution: expected 'uniform', 'erk' or a callable, got {distribution!r}.")
  elif not callable(distribution):
    raise ValueError(f"distribution: expected 'uniform', 'erk' or a callable, got "
                     f"{type(distribution).__name__}.")
  if scope == "global" and distribution != "uniform":
    raise ValueError(f"distribution: a global threshold has no per-leaf distribution; expected "
                     f"'uniform' with scope='global', got {distribution!r}.")
  if not isinstance(num_probes, numbers.Integral) or num_probes < 1:
    raise ValueError(f"num_probes: expected a positive integer, got {num_probes!r}.")
  accumulate = bool(average_hessian) and score in _HESSIAN_SCORES
  select_masks = masks_lib.unstructured_mask if mask_fn is None else mask_fn

  def init_fn(params: PyTree) -> PruneState:
    flags = tree_lib.prunable_flags(params, prunable)
    for (path, leaf), flag in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(flags)):
      if flag and not tree_lib.is_floating(leaf):
        raise ValueError(f"prune: expected floating-point prunable leaves, got dtype "
                         f"{getattr(leaf, 'dtype', type(leaf).__name__)} at leaf {path}.")
    _, override_schedules = _resolve_overrides(params, flags, overrides)
    masks = jax.tree.map(lambda p: jnp.ones(np.shape(p), jnp.bool_), params)
    hess_sum = (jax.tree.map(
        lambda p, f: jnp.zeros(np.shape(p) if f else (), jnp.float32), params, flags)
                if accumulate else ())
    return PruneState(
        count=jnp.zeros((), jnp.int32),
        target=jnp.zeros((), jnp.float32),
        override_targets=tuple(jnp.zeros((), jnp.float32) for _ in override_schedules),
        masks=masks,
        key=jax.random.PRNGKey(seed),
        hess_sum=hess_sum,
        hess_steps=jnp.zeros((), jnp.int32))

  def hessian_estimate(params, key, extra_args):
    loss_fn = extra_args.get("loss_fn")
    if loss_fn is None:
      raise ValueError(f"prune(score={score!r}): expected loss_fn= (and batch=) extra arguments "
                       f"to update (Hessian of loss_fn(params, batch)); got {sorted(extra_args)}.")
    args = (extra_args["batch"],) if "batch" in extra_args else ()
    return scores_lib.hessian_diag(loss_fn, params, *args, key=key, num_probes=num_probes)

  def score_inputs(params, key, hess, extra_args):
    """``(fn, trees)``: the scores are ``fn(*leaves)`` leaf by leaf, elementwise."""
    if callable(score):
      return None, (score(params, **extra_args),)
    if score == "magnitude":
      return scores_lib.magnitude, (params,)
    if score == "random":
      return None, (scores_lib.random_scores(params, key),)
    if score in ("gradient", "taylor"):
      grads = extra_args.get("grad", extra_args.get("grads"))
      if grads is None:
        raise ValueError(f"prune(score={score!r}): expected grad= extra argument to update "
                         f"(the raw gradients); got {sorted(extra_args)}.")
      tree_lib.check_same_structure(params, grads, "params", "grad")
      return ((scores_lib.gradient, (grads,)) if score == "gradient" else
              (scores_lib.taylor, (params, grads)))
    if hess is None:
      hess = hessian_estimate(params, key, extra_args)
    return ((scores_lib.obd, (params, hess)) if score == "obd" else
            (scores_lib.curvature, (hess,)))

  def leaf_sparsities(params, flags, override_index, target, override_targets):
    """Per-leaf sparsity pytree (traced float32 scalars; 0 on unprunable leaves)."""
    leaves, treedef = jax.tree.flatten(params)
    flag_leaves = jax.tree.leaves(flags)
    free = [i for i, f in enumerate(flag_leaves) if f and override_index[i] is None]
    per_leaf = [jnp.zeros((), jnp.float32)] * len(leaves)
    if distribution == "uniform":
      for i in free:
        per_leaf[i] = target
    elif distribution == "erk":
      if free:
        fr = distribution_lib.erk_fractions([np.shape(leaves[i]) for i in free], target)
        for j, i in enumerate(free):
          per_leaf[i] = fr[j]
    else:
      user = jax.tree.broadcast(distribution(target, params), params)
      user_leaves = jax.tree.leaves(user)
      for i in free:
        per_leaf[i] = jnp.clip(jnp.asarray(user_leaves[i], jnp.float32), 0.0, 1.0)
    for i, o in enumerate(override_index):
      if o is not None:
        per_leaf[i] = override_targets[o]
    return jax.tree.unflatten(treedef, per_leaf)

  def new_masks(params, old_masks, flags, override_index, target, override_targets, key, hess,
                extra_args):
    fn, trees = score_inputs(params, key, hess, extra_args)
    for tree in trees:
      tree_lib.check_same_structure(params, tree, "params", "scores")
    treedef = jax.tree.structure(params)
    rank = _RankedScores(fn)
    # Elementwise scores are recomputed chunk by chunk inside the selection: a mask update needs
    # no parameter-sized scratch memory (which, on XLA:CPU, slowed every step by 1.4x).
    scores = [select.Elementwise(rank, ops) if f else select.Elementwise(_no_scores, ops[:1])
              for f, ops in zip(jax.tree.leaves(flags),
                                zip(jax.tree.leaves(old_masks), *map(jax.tree.leaves, trees)))]
    if not _reads_elementwise(select_masks):
      scores = [s.evaluate() for s in scores]  # a custom selection gets whole arrays
    scores = jax.tree.unflatten(treedef, scores)

    def masks_for(sparsity, scope, chosen):
      return select_masks(scores, sparsity, scope=scope, prunable=chosen)

    per_leaf = leaf_sparsities(params, flags, override_index, target, override_targets)
    overridden = jax.tree.unflatten(treedef, [o is not None for o in override_index])
    if scope == "layer":
      masks = masks_for(per_leaf, "layer", flags)
    else:
      masks = masks_for(target, "global",
                        jax.tree.map(lambda f, o: f and not o, flags, overridden))
      if any(o is not None for o in override_index):
        masks = jax.tree.map(jnp.logical_and, masks, masks_for(per_leaf, "layer", overridden))
    return jax.tree.map(jnp.logical_and, masks, old_masks)

  def update_fn(updates, state: PruneState, params=None, **extra_args):
    if params is None:
      raise ValueError("prune: expected the current params as the third argument of update(), "
                       "got None.")
    tree_lib.check_same_structure(params, state.masks, "params", "state.masks")
    flags = tree_lib.prunable_flags(params, prunable)
    override_index, override_schedules = _resolve_overrides(params, flags, overrides)
    target = _eval(target_schedule, state.count)
    override_targets = tuple(_eval(s, state.count) for s in override_schedules)
    changed = target != state.target
    for new, old in zip(override_targets, state.override_targets):
      changed = changed | (new != old)
    if score in ("random",) + _HESSIAN_SCORES:
      key, sub = jax.random.split(state.key)
    else:  # deterministic scores: skip the per-step split (a few µs on small models)
      key, sub = state.key, state.key

    hess_sum, hess_steps = state.hess_sum, state.hess_steps
    if accumulate:
      h = hessian_estimate(params, sub, extra_args)
      hess_sum = jax.tree.map(
          lambda a, x, f: a + jnp.asarray(x, jnp.float32) if f else a, hess_sum, h, flags)
      hess_steps = state.hess_steps + 1

    def hessian_mean():
      # Only the mask update reads the average. Unprunable leaves carry a scalar placeholder
      # in the sum; their scores are never used.
      if not accumulate:
        return None
      return jax.tree.map(
          lambda a, p, f: a / hess_steps.astype(jnp.float32) if f else jnp.zeros(np.shape(p)),
          hess_sum, params, flags)

    masks = lax.cond(
        changed,
        lambda: new_masks(params, state.masks, flags, override_index, target, override_targets,
                          sub, hessian_mean(), extra_args),
        lambda: state.masks)
    if accumulate:
      # Start a fresh average after each mask update.
      hess_sum = jax.tree.map(lambda a: jnp.where(changed, jnp.zeros_like(a), a), hess_sum)
      hess_steps = jnp.where(changed, 0, hess_steps)

    # -p (not 0) so that p + update is exactly +0.0, whatever the inner optimizer proposed.
    new_updates = jax.tree.map(lambda u, p, m, f: jnp.where(m, u, -p) if f else u,
                               updates, params, masks, flags)
    new_state = PruneState(
        count=optax.safe_increment(state.count),
        target=target,  # equal to state.target unless the masks were just recomputed
        override_targets=override_targets,
        masks=masks,
        key=key,
        hess_sum=hess_sum,
        hess_steps=hess_steps)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
