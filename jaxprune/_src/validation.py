"""Argument checks shared by every module.

Every message follows one rule: ``"<argument>: expected <what>, got <what was given>"``, followed
by ``" (leaf <path>)"`` when the value belongs to one leaf of a pytree.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxprune._src.types import PyTree


class Text(str):
  """A description of a value (``"shape (2, 3)"``, ``"dtype int32"``) that `error` shows as is;
  a plain string is a value and is shown quoted."""
  __slots__ = ()

  def __repr__(self) -> str:
    return str(self)


def describe(x: Any) -> Text:
  """A value of the wrong kind as `error` shows it: an array by dtype and shape, anything else
  by its type."""
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    return Text(f"an array of dtype {x.dtype} and shape {tuple(x.shape)}")
  return Text(f"a {type(x).__name__}")


def where(path: Optional[str]) -> str:
  """The message suffix naming a leaf, or nothing."""
  return f" (leaf {path})" if path else ""


def error(name: str, expected: str, got: Any, path: Optional[str] = None) -> ValueError:
  """A `ValueError` worded by the project's rule; ``got`` is rendered with ``repr``."""
  return ValueError(f"{name}: expected {expected}, got {got!r}{where(path)}.")


def is_traced(x: Any) -> bool:
  """True for a tracer: a value whose content is unknown at trace time."""
  return isinstance(x, jax.core.Tracer)


def is_real_scalar(x: Any) -> bool:
  """True for a real Python number or a 0-d real array (bools and strings are not numbers)."""
  if isinstance(x, bool) or isinstance(x, (str, bytes)):
    return False
  if isinstance(x, numbers.Real):
    return True
  dtype = getattr(x, "dtype", None)
  return (dtype is not None and np.ndim(x) == 0 and dtype != np.bool_
          and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)))


def check_fraction(value: Any, name: str, path: Optional[str] = None, *,
                   allow_traced: bool = True) -> Any:
  """Checks a fraction in [0, 1] (NaN is rejected) and returns it.

  Args:
    value: a Python number or a 0-d array; a tracer passes unchecked when ``allow_traced``.
    name: argument name for the message.
    path: leaf path for the message, if the value belongs to one leaf.
    allow_traced: accept tracers (their value is clipped where it is used).

  Returns:
    ``value`` unchanged for tracers, else a Python float.
  """
  if is_traced(value):
    if not allow_traced:
      raise ValueError(f"{name}: expected a concrete fraction in [0, 1], got a traced value"
                       f"{where(path)}.")
    if np.ndim(value) != 0:
      raise error(name, "a scalar fraction in [0, 1]", Text(f"shape {np.shape(value)}"), path)
    return value
  if not is_real_scalar(value):
    shape = np.shape(value) if hasattr(value, "shape") else None
    got = Text(f"shape {shape}") if shape not in (None, ()) else value
    raise error(name, "a fraction in [0, 1]", got, path)
  out = float(value)
  if not 0.0 <= out <= 1.0:  # also rejects NaN
    raise error(name, "a fraction in [0, 1]", out, path)
  return out


def check_int(value: Any, name: str, minimum: Optional[int] = None,
              maximum: Optional[int] = None) -> int:
  """Checks an integer (Python or numpy, not bool) in ``[minimum, maximum]`` and returns it."""
  ok = (not isinstance(value, bool) and
        (isinstance(value, numbers.Integral) or
         (getattr(value, "dtype", None) is not None and np.ndim(value) == 0 and
          np.issubdtype(value.dtype, np.integer) and not is_traced(value))))
  lo = "" if minimum is None else f" >= {minimum}"
  hi = "" if maximum is None else f" <= {maximum}"
  expected = "an integer" + (lo + (" and" if lo and hi else "") + hi)
  if not ok:
    raise error(name, expected, value)
  out = int(value)
  if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
    raise error(name, expected, out)
  return out


def check_nonnegative(value: Any, name: str) -> Any:
  """Checks a finite real ``>= 0`` (tracers pass) and returns it."""
  if is_traced(value):
    return value
  if not is_real_scalar(value) or not (math.isfinite(float(value)) and float(value) >= 0.0):
    raise error(name, "a finite number >= 0", value)
  return value


def check_choice(value: Any, choices: Sequence[Any], name: str) -> Any:
  """Checks that ``value`` is one of ``choices`` and returns it."""
  if not isinstance(value, str) or value not in choices:
    raise error(name, f"one of {tuple(choices)}", value)
  return value


def check_positive_ints(value: Any, name: str) -> tuple[int, ...]:
  """Checks a non-empty sequence of positive (Python or numpy) integers; returns a tuple."""
  expected = "a non-empty sequence of positive integers"
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
    raise error(name, expected, value)
  for v in value:
    check_int(v, name, 1)
  return tuple(int(v) for v in value)


def normalize_axis(axis: Any, ndim: int, name: str = "axis", path: Optional[str] = None) -> int:
  """Checks an integer axis for an array of ``ndim`` dimensions; returns it in ``[0, ndim)``."""
  if isinstance(axis, bool) or not isinstance(axis, (numbers.Integral, np.integer)):
    raise error(name, "an integer axis", axis, path)
  if not -ndim <= int(axis) < ndim:
    raise error(name, f"an axis in [{-ndim}, {ndim}) for {ndim} dimensions", int(axis), path)
  return int(axis) % ndim


def broadcast_prefix(value: PyTree, tree: PyTree, name: str, what: str) -> list:
  """Broadcasts ``value`` (a leaf, or a pytree prefix of ``tree``) to one value per leaf.

  Args:
    value: a single value, or a pytree whose structure is a prefix of ``tree``'s.
    tree: the full pytree.
    name: argument name for the message.
    what: what one leaf value is, e.g. ``"a fraction"``.

  Returns:
    One value per leaf of ``tree``, in `jax.tree.leaves` order.
  """
  n = jax.tree.structure(tree).num_leaves
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
    return [value] * n
  try:
    return jax.tree.leaves(jax.tree.broadcast(value, tree))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name}: expected {what} or a pytree of them that is a prefix of the "
                     f"parameters' structure, got a tree that does not match: {e}") from None


__all__ = ["Text", "broadcast_prefix", "check_choice", "check_fraction", "check_int",
           "check_nonnegative", "check_positive_ints", "describe", "error", "is_real_scalar",
           "is_traced", "normalize_axis", "where"]
