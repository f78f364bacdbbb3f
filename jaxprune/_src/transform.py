"""`prune`: gradual pruning as an optax transformation, chained after the optimizer.

Each ``update`` reads the sparsity schedule, recomputes the masks with `pruning_masks` when its
value moved, and rewrites the updates so that ``optax.apply_updates`` leaves the parameters
exactly zero wherever the mask is False:

    updates' = where(mask, updates, -params)      # params + (-params) == +0.0 exactly

This holds on the very step a mask changes and on every step after it, whatever momentum, Adam
moments or weight decay the inner optimizer carries. Masks are monotone: once pruned, an entry
stays pruned.

A weight that is inf or NaN when it is pruned cannot be zeroed by an addition (``inf + u`` is
inf or NaN for every ``u``); where that can happen, mask after applying the updates:
``params = jp.apply_masks(optax.apply_updates(params, updates),
optax.tree_utils.tree_get(opt_state, "masks"))``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune._src import policy
from jaxprune._src import policy_args
from jaxprune._src import prune_scores
from jaxprune._src import stacked as stacked_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, Prunable, PyTree, Schedule, ScheduleLike


class PruneState(NamedTuple):
  """State of `prune`; a plain pytree of arrays (checkpointable with orbax).

  Examples:
    >>> import jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]), "b": jnp.zeros(3)}
    >>> masks = {"w": jnp.array([[False, True, False], [True, False, True]]),
    ...          "b": jnp.ones(3, bool)}
    >>> state = jp.prune(0.5, masks=masks).init(params)   # fine-tuning with given masks
    >>> int(state.count), float(state.target), state.masks["w"].tolist()
    (0, 0.5, [[False, True, False], [True, False, True]])

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
  count: Array
  target: Array
  override_targets: tuple
  masks: PyTree
  key: Array
  hess_sum: PyTree
  hess_steps: Array


def as_schedule(value: ScheduleLike, name: str) -> Schedule:
  """A fraction becomes a constant schedule; a callable is used as is."""
  if callable(value):
    return value
  const = validation.check_fraction(value, name)  # concrete: in [0, 1]; tracers pass
  return lambda count: jnp.asarray(const, jnp.float32)


def check_schedule_start(schedule: Schedule, name: str) -> None:
  """Evaluates a schedule at step 0 and checks the value where it is concrete."""
  value = schedule(np.int32(0))
  if np.shape(value) != ():
    raise validation.error(name, "a scalar sparsity per step", f"shape {np.shape(value)}")
  validation.check_fraction(value, name)


def _evaluate(schedule: Schedule, count: Array, current: Array) -> Array:
  """The schedule's value, clipped to [0, 1]; NaN leaves the current target (masks unchanged)."""
  s = jnp.asarray(schedule(count), jnp.float32)
  if s.shape != ():
    raise validation.error("schedule", "a scalar sparsity per step", f"shape {s.shape}")
  return jnp.where(jnp.isnan(s), current, jnp.clip(s, 0.0, 1.0))


def _maybe_update(changed: Array, update: Callable[[PyTree], PyTree], masks: PyTree) -> PyTree:
  """``update(masks)`` if ``changed`` else ``masks``, updating the masks' buffers in place.

  A loop that runs once or not at all: XLA keeps a while loop's carry in one buffer, whereas a
  conditional's result is a new buffer that the untaken branch fills with a copy of the masks
  on every step.
  """
  return lax.while_loop(lambda c: c[0], lambda c: (jnp.bool_(False), update(c[1])),
                        (changed, masks))[1]


def _resolve(params: PyTree, prunable: Prunable, overrides: Any,
             stacked: stacked_lib.Stacked) -> tuple[list[stacked_lib.Layers], list]:
  """Per leaf its layers and prunable slices, and the ``(leaf or slice path, schedule)`` of every
  overridden slice (host side, at trace time)."""
  layers = stacked_lib.resolve(params, stacked, prunable)
  values = policy_args.slice_overrides(params, layers, overrides)
  chosen = []
  for (p, _), l, vals in zip(jax.tree_util.tree_flatten_with_path(params)[0], layers, values):
    chosen += [(q, as_schedule(v, f"overrides[{q!r}]"))
               for q, v in zip(stacked_lib.slice_paths(p, l), vals) if v is not None]
  return layers, chosen


def prune(schedule: ScheduleLike, score: Union[str, prune_scores.ScoreFn] = "magnitude", *,
          scope: str = "layer", distribution: policy_args.Distribution = "uniform",
          overrides: Optional[Any] = None, prunable: Prunable = None,
          pattern: policy_args.Pattern = "unstructured", hessian: str = "hutchinson",
          gauss_newton_loss: str = "softmax_cross_entropy", num_probes: int = 8,
          average_hessian: bool = False, seed: int = 0, masks: Optional[PyTree] = None,
          stacked: stacked_lib.Stacked = None) -> optax.GradientTransformationExtraArgs:
  """Gradual pruning inside the jitted train step; chain it after the optimizer.

  At each ``update`` the schedule is evaluated at the step count (clipped to [0, 1]; a NaN value
  keeps the current masks). When it differs from the target of the current masks (for a
  staircase such as `polynomial_schedule`: exactly on its update steps) the masks are
  recomputed in the step, without retrace or host sync, by `pruning_masks` from the scores of
  the current params, with the current masks as ``previous`` (monotone). The updates become
  ``where(mask, updates, -params)`` on prunable leaves and stay unchanged elsewhere.

  Scores (``score``), named as the score functions:
    * ``"magnitude"``: ``|w|`` (default).
    * ``"gradient"``: ``|g|``; ``"taylor"``: ``|w * g|``; the raw gradients come as ``grad=``.
    * ``"obd"``: ``0.5 * h * w**2``; ``"curvature"``: ``|h|``, with ``h`` a Hessian diagonal
      chosen by ``hessian``. ``"hutchinson"`` (default): a Hutchinson estimate
      (`hessian_diag`) of ``loss_fn(params, batch)`` (``loss_fn(params)`` without ``batch=``);
      any loss and any leaf, but noisy (per-probe variance ``Σ_{j≠i} H_ij²``: on a model that
      fits its data about half the estimates come out negative, and a negative saliency is
      pruned first). ``"gauss_newton"``: the exact Gauss–Newton (true Fisher) diagonal
      (`gauss_newton_diag`) of ``apply_fn(params, batch)``, which must return logits
      ``(batch, classes)`` and read every prunable leaf as a Dense or Conv kernel; nonnegative,
      no probes, the one to use for OBD on such models (exact for Dense kernels; convolutions
      drop the cross-position terms, see `gauss_newton_diag`). With ``average_hessian=True`` the
      diagonal is computed every step and averaged since the last mask update; otherwise only
      on mask-update steps.
    * ``"random"``: uniform random scores from the state's key (the baseline to beat).
    * a callable ``fn(params, **extra_args) -> scores`` (params' structure, higher = keep); it
      receives every extra argument given to ``update``.

  Examples:
    A constant sparsity prunes at the first step (`polynomial_schedule` prunes gradually):

    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]]), "b": jnp.zeros(3)}
    >>> grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}
    >>> tx = optax.chain(optax.sgd(0.5), jp.prune(0.5))
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)   # as in a train step
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].tolist()   # the smallest half exactly 0, the rest after its SGD step
    [[0.0, -4.25, 0.0], [-3.25, 0.0, 5.75]]
    >>> params["b"].tolist(), float(jp.sparsity(params))
    ([-0.5, -0.5, -0.5], 0.5)

    OBD on the exact Gauss–Newton diagonal: for a linear model under ``"mse"`` it is
    ``Σ_n x_ni²`` in every column, so the first input row (10 · 1²) outranks the larger weights
    of the second (4 · 1.5²), which magnitude would keep:

    >>> tx = jp.prune(0.5, "obd", hessian="gauss_newton", gauss_newton_loss="mse")
    >>> w = {"w": jnp.array([[1.0, 1.0], [1.5, 1.5]])}
    >>> x = jnp.array([[1.0, 2.0], [3.0, 0.0]])
    >>> _, state = tx.update(w, tx.init(w), w, apply_fn=lambda p, x: x @ p["w"], batch=x)
    >>> state.masks["w"].tolist()
    [[True, True], [False, False]]

  Args:
    schedule: ``step -> sparsity`` (e.g. `polynomial_schedule`) or a constant sparsity; checked
      at ``init`` on step 0 where its value is concrete.
    score: one of the names above or a callable.
    scope: ``"layer"`` or ``"global"`` (see `pruning_masks`).
    distribution: ``"uniform"``, ``"erk"`` or ``fn(params, sparsity, *, prunable)`` (see
      `pruning_masks`); ``"uniform"`` with ``scope="global"``.
    overrides: per-leaf sparsities or schedules: a mapping from leaf path (or, with ``stacked``,
      slice path) to a fraction or a schedule, or a callable
      ``(path, leaf) -> fraction | schedule | None``.
    prunable: None (floating arrays with ``ndim >= 2``), a predicate ``(path, leaf) -> bool`` or
      a pytree of bools.
    pattern: ``"unstructured"``, an `NMPattern`, a `BlockPattern` or a mask function (see
      `pruning_masks`; for sharded params ``functools.partial(jp.sharding.sharded_unstructured_mask,
      mesh=mesh, specs=param_specs)``).
    hessian: the Hessian diagonal of ``"obd"`` / ``"curvature"``: ``"hutchinson"`` (needs
      ``loss_fn=``) or ``"gauss_newton"`` (needs ``apply_fn=`` and ``batch=``); see above.
    gauss_newton_loss: the loss of the Gauss–Newton diagonal, ``"softmax_cross_entropy"``
      (classifiers; the true Fisher) or ``"mse"`` (``½‖f - t‖²``); see `gauss_newton_diag`.
      For the empirical Fisher (``labels=``) pass a callable ``score`` instead.
    num_probes: Hutchinson probes per Hessian estimate (a positive integer).
    average_hessian: average the Hessian diagonal over the steps between mask updates.
    seed: seed of the state's PRNG key (random scores, Hessian probes).
    masks: initial masks (bool, the params' structure; e.g. from `jaxprune.oneshot`). The state
      then starts at the schedule's step-0 target, so a constant schedule keeps these masks
      while fine-tuning and a rising one prunes further from them.
    stacked: leading layer axes of each leaf (see `pruning_masks`): each slice is pruned as a
      layer of its own, e.g. ``stacked={"params": {"layers": 1}, ...}`` for ``nn.scan`` blocks.

  Returns:
    An `optax.GradientTransformationExtraArgs` with ``update(updates, state, params, *,
    grad=None, loss_fn=None, batch=None, apply_fn=None, **extra_args)``; ``params`` is
    required. State:
    `PruneState`. Under ``optax.inject_hyperparams`` keep the integer and boolean options
    static: ``static_args=("num_probes", "seed", "average_hessian")``.

  References:
    Zhu & Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning);
    LeCun, Denker & Solla, "Optimal Brain Damage", NeurIPS 1989 (OBD saliency);
    Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990;
    Martens, "New insights and perspectives on the natural gradient method", JMLR 2020
    (Gauss–Newton and Fisher);
    Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019 (Taylor).
  """
  target_schedule = as_schedule(schedule, "schedule")
  curvature = prune_scores.check_options(score, hessian, num_probes, gauss_newton_loss)
  validation.check_choice(scope, ("layer", "global"), "scope")
  policy_args.check_distribution(distribution, scope)
  pattern = policy_args.check_pattern(pattern)
  seed = validation.check_int(seed, "seed")
  accumulate = bool(average_hessian) and score in prune_scores.HESSIAN_SCORES

  def init_fn(params: PyTree) -> PruneState:
    layers, chosen = _resolve(params, prunable, overrides, stacked)
    flags = [l.any for l in layers]
    for (path, leaf), flag in zip(tree_lib.leaves_with_paths(params), flags):
      if flag and not tree_lib.is_floating(leaf):
        raise validation.error("params", "floating-point prunable leaves",
                               f"dtype {getattr(leaf, 'dtype', type(leaf).__name__)}", path)
    check_schedule_start(target_schedule, "schedule")
    for _, s in chosen:
      check_schedule_start(s, "overrides")
    # Given masks stand for every step-0 target (overrides included), so the first update keeps
    # them unless a schedule has moved on.
    zero, step0 = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    start = lambda s: zero if masks is None else _evaluate(s, step0, zero)
    return PruneState(
        count=step0, target=start(target_schedule),
        override_targets=tuple(start(s) for _, s in chosen),
        masks=_initial_masks(params, masks, layers),
        key=jax.random.PRNGKey(seed),
        hess_sum=(jax.tree.unflatten(jax.tree.structure(params), [
            jnp.zeros(np.shape(p) if f else (), jnp.float32)
            for p, f in zip(jax.tree.leaves(params), flags)]) if accumulate else ()),
        hess_steps=jnp.zeros((), jnp.int32))

  def update_fn(updates, state: PruneState, params=None, *, grad=None, loss_fn=None, batch=None,
                apply_fn=None, **extra):
    if params is None:
      raise validation.error("params", "the current params as the third argument of update",
                             None)
    tree_lib.check_same_structure(params, state.masks, "params", "state.masks")
    layers, chosen = _resolve(params, prunable, overrides, stacked)
    flags = [l.any for l in layers]
    flag_tree = jax.tree.unflatten(jax.tree.structure(params), flags)
    target = _evaluate(target_schedule, state.count, state.target)
    override_targets = tuple(_evaluate(s, state.count, old)
                             for (_, s), old in zip(chosen, state.override_targets))
    changed = target != state.target
    for new, old in zip(override_targets, state.override_targets):
      changed = changed | (new != old)
    inputs = prune_scores.Inputs(grad, loss_fn, batch, apply_fn, extra)
    randomized = prune_scores.uses_key(score, curvature)
    key, sub = jax.random.split(state.key) if randomized else (state.key, state.key)
    hess_sum, hess_steps = state.hess_sum, state.hess_steps
    if accumulate:
      h = prune_scores.hessian_diag(score, curvature, params, flag_tree, sub, inputs)
      hess_sum = jax.tree.map(lambda a, x, f: a + jnp.asarray(x, jnp.float32) if f else a,
                              hess_sum, h, flag_tree)
      hess_steps = hess_steps + 1

    def recompute(masks):
      hess = None
      if accumulate:  # unprunable leaves hold a scalar placeholder; their scores are unused
        hess = jax.tree.map(lambda a, p: jnp.broadcast_to(a / hess_steps, np.shape(p)),
                            hess_sum, params)
      scores = prune_scores.compute(score, curvature, params, flags, sub, hess, inputs)
      return policy.pruning_masks(
          params, target, scores=scores, scope=scope, distribution=distribution,
          overrides={q: t for (q, _), t in zip(chosen, override_targets)} or None,
          prunable=stacked_lib.flag_tree(jax.tree.structure(params), layers), pattern=pattern,
          previous=masks, stacked=stacked)

    masks = _maybe_update(changed, recompute, state.masks)
    if accumulate:  # a fresh average after each mask update
      hess_sum = jax.tree.map(lambda a: jnp.where(changed, 0.0, a), hess_sum)
      hess_steps = jnp.where(changed, 0, hess_steps)
    # -p, not 0: p + (-p) is exactly +0.0 whatever the inner optimizer proposed.
    new_updates = jax.tree.map(lambda u, p, m, f: jnp.where(m, u, -p) if f else u,
                               updates, params, masks, flag_tree)
    return new_updates, PruneState(
        count=optax.safe_increment(state.count), target=target,
        override_targets=override_targets, masks=masks, key=key, hess_sum=hess_sum,
        hess_steps=hess_steps)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _initial_masks(params: PyTree, masks: Optional[PyTree],
                   layers: list[stacked_lib.Layers]) -> PyTree:
  """All-True masks, or the given ones checked against the params (all True where not pruned)."""
  if masks is None:
    return jax.tree.map(lambda p: jnp.ones(np.shape(p), jnp.bool_), params)
  tree_lib.check_same_structure(params, masks, "params", "masks")
  out = []
  for (path, p), m, l in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(masks), layers):
    if np.shape(m) != np.shape(p) or jnp.result_type(m) != jnp.bool_:
      raise validation.error("masks", f"a bool array of shape {np.shape(p)}",
                             f"{jnp.result_type(m)} {np.shape(m)}", path)
    pruned = np.asarray(l.flags, bool).reshape(l.lead_shape + (1,) * len(l.shape))
    out.append(jnp.asarray(m) if pruned.all() else jnp.logical_or(jnp.asarray(m), ~pruned))
  return jax.tree.unflatten(jax.tree.structure(params), out)


__all__ = ["PruneState", "as_schedule", "check_schedule_start", "prune"]
