"""Sparsity schedules: pure, jit-able functions of the step count returning a target sparsity.

Like optax schedules, a sparsity schedule is any callable ``step -> sparsity`` (``step`` an int or
int32 scalar, the result a float32 scalar in [0, 1]). The schedules here are *staircases*: their
value only changes on the steps where masks should be recomputed, and `jaxprune.prune`
recomputes masks exactly on the steps where the scheduled target differs from the target its
current masks were computed for. So a schedule's update steps are simply the steps where its
value changes; nothing else has to be declared. Every schedule returns 0.0 before it starts (no
pruning yet).

Arguments are checked where a schedule is built: fractions in [0, 1] and integer steps in
``[0, 2**31 - 1]`` (the train step counts in int32), given as Python numbers or as concrete
numpy / JAX scalars; anything else raises a `ValueError` naming the argument.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxprune._src import validation
from jaxprune._src.types import Array, Schedule, Step

# Steps are int32 inside the train step (optax counts are int32): a schedule whose steps do not
# fit would overflow where it is evaluated, so it is refused where it is built.
MAX_STEP = 2**31 - 1


def _fraction(value: float, name: str) -> float:
  return validation.check_fraction(value, name, allow_traced=False)


def _step(value: int, name: str, minimum: int = 0) -> int:
  return validation.check_int(value, name, minimum, MAX_STEP)


def constant_schedule(sparsity: float) -> Schedule:
  """The same target from step 0 on: prune once at the first step, then keep the masks.

  Examples:
    >>> import jaxprune as jp
    >>> schedule = jp.constant_schedule(0.75)
    >>> [float(schedule(t)) for t in (0, 1, 1000)]
    [0.75, 0.75, 0.75]

  Args:
    sparsity: target fraction in [0, 1].

  Returns:
    A schedule ``step -> float32``.
  """
  s = _fraction(sparsity, "sparsity")

  def schedule(step: Step) -> Array:
    del step
    return jnp.full((), s, jnp.float32)

  return schedule


def one_shot_schedule(sparsity: float, step: int) -> Schedule:
  """Dense until ``step``, then ``sparsity`` for ever: train, prune once, fine-tune.

  Examples:
    >>> import jaxprune as jp
    >>> schedule = jp.one_shot_schedule(0.75, step=100)
    >>> [float(schedule(t)) for t in (0, 99, 100, 5000)]
    [0.0, 0.0, 0.75, 0.75]

  Args:
    sparsity: target fraction in [0, 1] from ``step`` on.
    step: the step at which the masks are computed (scores of the parameters at that step).

  Returns:
    A schedule ``step -> float32``.
  """
  s = _fraction(sparsity, "sparsity")
  at = _step(step, "step")

  def schedule(count: Step) -> Array:
    return jnp.where(jnp.asarray(count) >= at, jnp.float32(s), jnp.float32(0.0))

  return schedule


def polynomial_schedule(init_sparsity: float, final_sparsity: float, begin_step: int,
                        end_step: int, frequency: int = 1, power: float = 3.0) -> Schedule:
  """Gradual pruning schedule of Zhu & Gupta (2017), reaching ``final_sparsity`` at ``end_step``.

  ``s(t) = s_f + (s_i - s_f) * (1 - (u - t_0) / (t_e - t_0))**power`` where ``u`` is the last
  update step at or before ``t``. Update steps are ``t_0, t_0 + frequency, t_0 + 2 frequency,
  ...`` below ``t_e``, and ``t_e`` itself: the final value is reached exactly at ``end_step``
  even when ``end_step - begin_step`` is not a multiple of ``frequency`` (the last interval is
  then shorter). Before ``begin_step`` the value is 0 (no pruning); after ``end_step`` it is
  ``final_sparsity``.

  Examples:
    Updates every 4 steps; the last interval is shorter, so 0.9 is reached exactly at step 10:

    >>> import jaxprune as jp
    >>> schedule = jp.polynomial_schedule(0.0, 0.9, begin_step=0, end_step=10, frequency=4)
    >>> [round(float(schedule(t)), 3) for t in (0, 3, 4, 7, 8, 9, 10, 11)]
    [0.0, 0.0, 0.706, 0.706, 0.893, 0.893, 0.9, 0.9]

  Args:
    init_sparsity: sparsity applied at ``begin_step``, in [0, 1].
    final_sparsity: sparsity from ``end_step`` on, in [0, 1].
    begin_step: first pruning step.
    end_step: step at which ``final_sparsity`` is reached (``>= begin_step``).
    frequency: steps between mask updates (``>= 1``).
    power: exponent of the polynomial (3 in the paper; 1 is linear).

  Returns:
    A schedule ``step -> float32``.

  References:
    Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
    compression", 2017, eq. (1).
  """
  s_i = _fraction(init_sparsity, "init_sparsity")
  s_f = _fraction(final_sparsity, "final_sparsity")
  t0 = _step(begin_step, "begin_step")
  te = _step(end_step, "end_step")
  if te < t0:
    raise validation.error("end_step", f"end_step >= begin_step = {t0}", te)
  freq = _step(frequency, "frequency", 1)
  if not validation.is_real_scalar(power) or not (math.isfinite(power) and power > 0):
    raise validation.error("power", "a finite number > 0", power)
  power = float(power)
  span = max(te - t0, 1)

  def schedule(step: Step) -> Array:
    t = jnp.asarray(step, jnp.int32)
    # Snap to the last update step so the value is constant between updates.
    u = t0 + ((t - t0) // freq) * freq
    progress = jnp.clip((u - t0).astype(jnp.float32) / span, 0.0, 1.0)
    w = (1.0 - progress) ** power
    # Weighted sum rather than s_f + (s_i - s_f) * w: exact s_i at w == 1 and s_f at w == 0.
    ramp = jnp.float32(s_i) * w + jnp.float32(s_f) * (1.0 - w)
    value = jnp.where(t >= te, jnp.float32(s_f), ramp)
    return jnp.where(t < t0, jnp.float32(0.0), value).astype(jnp.float32)

  return schedule


def iterative_schedule(fraction: float, every: int, rounds: int, begin_step: int = 0) -> Schedule:
  """Iterative pruning: each round prunes ``fraction`` of the weights still alive.

  Round ``r = 1 .. rounds`` happens at step ``begin_step + (r - 1) * every``; after it the
  sparsity is ``1 - (1 - fraction)**r``. Between rounds training continues with the masks fixed
  (prune, retrain, repeat).

  Examples:
    >>> import jaxprune as jp
    >>> schedule = jp.iterative_schedule(0.5, every=100, rounds=3)
    >>> [float(schedule(t)) for t in (0, 99, 100, 200, 1000)]
    [0.5, 0.5, 0.75, 0.875, 0.875]

  Args:
    fraction: fraction of the remaining weights pruned per round, in [0, 1].
    every: steps between rounds (``>= 1``).
    rounds: number of rounds (``>= 1``).
    begin_step: step of the first round.

  Returns:
    A schedule ``step -> float32``; its final value is ``1 - (1 - fraction)**rounds``.

  References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks",
    NeurIPS 2015 (iterative pruning and retraining).
  """
  f = _fraction(fraction, "fraction")
  k = _step(every, "every", 1)
  n = _step(rounds, "rounds", 1)
  t0 = _step(begin_step, "begin_step")
  if t0 + (n - 1) * k > MAX_STEP:
    raise validation.error("rounds", f"rounds whose last step begin_step + (rounds - 1) * every "
                           f"fits int32 (<= {MAX_STEP})", n)
  # Per-round values computed once in float64 then rounded: no pow drift inside jit.
  table = jnp.asarray([0.0] + [1.0 - (1.0 - f) ** r for r in range(1, n + 1)], jnp.float32)

  def schedule(step: Step) -> Array:
    t = jnp.asarray(step, jnp.int32)
    done = jnp.where(t < t0, 0, jnp.minimum((t - t0) // k + 1, n))
    return table[done]

  return schedule
