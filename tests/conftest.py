"""Shared test helpers: numerical functions run eagerly and under `jax.jit`, compared exactly."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import pytest


def assert_trees_equal(a: Any, b: Any) -> None:
  """Same structure, dtypes, shapes and bit-identical values (NaN equal to NaN)."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                          jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
    np.testing.assert_array_equal(x, y)


_JITTED: dict = {}  # one jit wrapper per function: repeated checks reuse its compilations


def jit_eager(fn: Callable[..., Any], *args: Any) -> Any:
  """Runs ``fn(*args)`` eagerly and as ``jax.jit(fn)(*args)`` (array and number arguments traced),
  asserts the results are identical, and returns the eager one."""
  eager = fn(*args)
  jitted = _JITTED.setdefault(fn, jax.jit(fn))(*args)
  assert_trees_equal(eager, jitted)
  return eager


@pytest.fixture
def check_jit_eager() -> Callable[..., Any]:
  """`jit_eager`: ``check_jit_eager(fn, *args)`` compares eager and jitted results exactly."""
  return jit_eager
