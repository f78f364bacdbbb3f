"""Tests for the sparsity schedules."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import schedules


def _values(schedule, steps):
  return np.asarray(jax.vmap(schedule)(jnp.asarray(steps, jnp.int32)))


def test_polynomial_matches_zhu_gupta_formula():
  sched = schedules.polynomial_schedule(0.1, 0.9, begin_step=10, end_step=110, frequency=20)
  steps = np.arange(0, 140)
  got = _values(sched, steps)
  want = []
  for t in steps:
    if t < 10:
      want.append(0.0)
    elif t >= 110:
      want.append(0.9)
    else:
      u = 10 + (t - 10) // 20 * 20
      want.append(0.9 + (0.1 - 0.9) * (1 - (u - 10) / 100) ** 3)
  np.testing.assert_allclose(got, np.float32(want), rtol=0, atol=1e-6)
  assert got[10] == np.float32(0.1)  # exactly init at begin
  # Constant between update steps, changes only at 10, 30, 50, 70, 90, 110.
  changes = [int(t) for t in steps[1:] if got[t] != got[t - 1]]
  assert changes == [10, 30, 50, 70, 90, 110]


def test_polynomial_jit_equals_eager():
  sched = schedules.polynomial_schedule(0.0, 0.8, 5, 77, frequency=7, power=2)
  for t in [0, 5, 6, 12, 40, 76, 77, 1000]:
    assert sched(t) == jax.jit(sched)(t)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    begin=st.integers(0, 500), span=st.integers(0, 2000), frequency=st.integers(1, 400),
    init=st.floats(0, 1), final=st.floats(0, 1), power=st.sampled_from([1, 2, 3, 4.5]))
def test_polynomial_hits_final_exactly_at_end(begin, span, frequency, init, final, power):
  end = begin + span
  # Eager: a fresh jit per example would spend the test on compiles (jit == eager is tested).
  sched = schedules.polynomial_schedule(init, final, begin, end, frequency, power)
  assert sched(end) == np.float32(final)
  assert sched(end + frequency + 3) == np.float32(final)
  if span > 0:
    assert sched(begin) == np.float32(init)
  if begin > 0:
    assert sched(begin - 1) == 0.0


def test_polynomial_validation():
  with pytest.raises(ValueError, match="final_sparsity"):
    schedules.polynomial_schedule(0.0, 1.2, 0, 10)
  with pytest.raises(ValueError, match="end_step"):
    schedules.polynomial_schedule(0.0, 0.5, 10, 5)
  with pytest.raises(ValueError, match="frequency"):
    schedules.polynomial_schedule(0.0, 0.5, 0, 10, frequency=0)
  with pytest.raises(ValueError, match="init_sparsity"):
    schedules.polynomial_schedule(float("nan"), 0.5, 0, 10)


def test_constant_and_one_shot():
  c = schedules.constant_schedule(0.7)
  np.testing.assert_array_equal(_values(c, [0, 1, 99]), np.float32([0.7] * 3))
  o = schedules.one_shot_schedule(0.6, step=50)
  np.testing.assert_array_equal(_values(o, [0, 49, 50, 51, 10_000]),
                                np.float32([0, 0, 0.6, 0.6, 0.6]))


def test_iterative_rounds():
  it = schedules.iterative_schedule(0.2, every=10, rounds=3, begin_step=5)
  got = _values(it, [0, 4, 5, 14, 15, 25, 26, 1000])
  want = np.float32([0, 0, 0.2, 0.2, 1 - 0.8**2, 1 - 0.8**3, 1 - 0.8**3, 1 - 0.8**3])
  np.testing.assert_array_equal(got, want)
