"""Type aliases shared by every module."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax

Array = jax.Array
PyTree = Any
KeyPath = tuple
Prunable = Union[None, Callable[[KeyPath, Any], bool], PyTree]
Step = Union[int, Array]
Schedule = Callable[[Step], Array]
ScheduleLike = Union[float, Array, Schedule]
ScalarOrSchedule = Union[float, Array, Schedule]
# A fraction in [0, 1] (Python number or scalar array, possibly traced), or a pytree prefix of
# per-leaf fractions where a function accepts them.
Sparsity = Union[float, Array, PyTree]

__all__ = ["Array", "KeyPath", "Prunable", "PyTree", "ScalarOrSchedule", "Schedule",
           "ScheduleLike", "Sparsity", "Step"]
