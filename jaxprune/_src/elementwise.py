"""Lazy elementwise scores: ``fn(*operands)`` evaluated a chunk at a time by the selections."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.types import Array


class Elementwise:
  """Scores ``fn(*operands)`` of an elementwise ``fn``, computed a chunk at a time.

  A selection reads its scores four or five times. Given as arrays, the scores (and their keys)
  are parameter-sized temporaries; given as ``Elementwise``, each read recomputes them from the
  operands one chunk at a time, so a mask update inside a train step needs no parameter-sized
  scratch memory beyond its inputs and its output masks.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> w = jnp.array([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]])
    >>> scores = {"w": jp.Elementwise(jnp.abs, (w,))}   # |w|, never materialized whole
    >>> jp.unstructured_mask(scores, 0.5)["w"].tolist()
    [[False, True, False], [True, False, True]]
    >>> scores["w"].evaluate().tolist()
    [[1.0, 4.0, 2.0], [3.0, 0.5, 6.0]]

  Attributes:
    fn: maps the operands to float scores of their shape, entry by entry: a selection calls it
      on flat chunks (1-D arrays of equal length), `evaluate` on the whole operands.
    operands: arrays of one shape.
  """

  def __init__(self, fn: Callable[..., Array], operands: Sequence[Array]):
    operands = tuple(jnp.asarray(o) for o in operands)
    if not operands:
      raise ValueError("Elementwise: expected at least one operand, got none.")
    shapes = {o.shape for o in operands}
    if len(shapes) != 1:
      raise ValueError(f"Elementwise: expected operands of one shape, got shapes "
                       f"{[o.shape for o in operands]}.")
    self.fn = fn
    self.operands = operands
    self._dtype = None

  @property
  def shape(self) -> tuple[int, ...]:
    return self.operands[0].shape

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self) -> np.dtype:
    """The scores' dtype (traced abstractly, without computing anything)."""
    if self._dtype is None:
      chunks = [jax.ShapeDtypeStruct((1,), o.dtype) for o in self.operands]
      self._dtype = jax.eval_shape(self.fn, *chunks).dtype
    return self._dtype

  def evaluate(self) -> Array:
    """The scores as one array shaped like the operands: ``fn`` applied to them whole.

    The operands are not flattened, so sharded operands keep their layout (flattening an array
    split along an inner dimension would gather it).
    """
    out = self.fn(*self.operands)
    if jnp.shape(out) != self.shape:
      raise ValueError(f"Elementwise: fn must map operands of shape {self.shape} to scores of "
                       f"the same shape, got shape {jnp.shape(out)}.")
    return out


ScoreLike = Union[Array, Elementwise]


def split_elementwise(scores: Sequence[ScoreLike]) -> tuple[tuple, list[tuple[Array, ...]]]:
  """``(fns, operands)``: per entry its ``fn`` (None for an array) and its operand arrays.

  The static/array split that lets `Elementwise` scores cross a `jax.jit` or `jax.shard_map`
  boundary; `join_elementwise` undoes it.
  """
  fns = tuple(s.fn if isinstance(s, Elementwise) else None for s in scores)
  operands = [s.operands if isinstance(s, Elementwise) else (s,) for s in scores]
  return fns, operands


def join_elementwise(fns: Sequence, operands: Sequence[Sequence[Array]]) -> list[ScoreLike]:
  return [ops[0] if fn is None else Elementwise(fn, ops) for fn, ops in zip(fns, operands)]


__all__ = ["Elementwise", "ScoreLike", "join_elementwise", "split_elementwise"]
