"""The scores `prune` ranks by, from what one ``update`` call is given.

Curvature scores (``"obd"``, ``"curvature"``) need a Hessian diagonal, from one of two sources:

* ``"hutchinson"``: `scores.hessian_diag` of ``loss_fn(params[, batch])``; any loss and any
  leaf, but an unbiased estimate with per-probe variance ``Σ_{j≠i} H_ij²`` for entry ``i``, so on
  a model that fits its data about half the estimates come out negative.
* ``"gauss_newton"``: `gauss_newton.gauss_newton_diag` of ``apply_fn(params, batch)``; the exact
  Gauss–Newton (true Fisher) diagonal of Dense and Conv kernels, nonnegative, without probes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import numpy as np

from jaxprune._src import elementwise
from jaxprune._src import gauss_newton
from jaxprune._src import scores as scores_lib
from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, PyTree

ScoreFn = Callable[..., PyTree]
SCORES = ("magnitude", "gradient", "taylor", "obd", "curvature", "random")
HESSIAN_SCORES = ("obd", "curvature")
HESSIANS = ("hutchinson", "gauss_newton")
# Elementwise score functions of one leaf's operands, read chunk by chunk by the selection.
_ELEMENTWISE = {"gradient": scores_lib.gradient, "taylor": scores_lib.taylor,
                "obd": scores_lib.obd, "curvature": scores_lib.curvature}


class Curvature(NamedTuple):
  """Where the Hessian diagonal of a curvature score comes from (fixed at construction).

  Attributes:
    method: one of ``HESSIANS``.
    num_probes: Hutchinson probes per estimate.
    loss: the loss of the Gauss–Newton diagonal (one of `gauss_newton.LOSSES`).
  """
  method: str
  num_probes: int
  loss: str


class Inputs(NamedTuple):
  """The extra arguments of one ``update`` call that scores may read."""
  grad: Optional[PyTree]
  loss_fn: Optional[Callable[..., Array]]
  batch: Any
  apply_fn: Optional[Callable[[PyTree, Any], Array]]
  extra: dict


def check_options(score: Union[str, ScoreFn], hessian: str, num_probes: int,
                  gauss_newton_loss: str) -> Curvature:
  """Checks `prune`'s score options; returns the curvature source.

  Args:
    score: one of ``SCORES`` or a callable.
    hessian: one of ``HESSIANS``; anything but ``"hutchinson"`` needs a curvature score.
    num_probes: Hutchinson probes per estimate (a positive integer).
    gauss_newton_loss: one of `gauss_newton.LOSSES`; anything but the default needs
      ``hessian="gauss_newton"``.

  Returns:
    A `Curvature`.
  """
  if not callable(score):
    validation.check_choice(score, SCORES, "score")
  validation.check_choice(hessian, HESSIANS, "hessian")
  validation.check_choice(gauss_newton_loss, gauss_newton.LOSSES, "gauss_newton_loss")
  num_probes = validation.check_int(num_probes, "num_probes", 1)
  if hessian != "hutchinson" and (callable(score) or score not in HESSIAN_SCORES):
    raise validation.error("hessian", f"'hutchinson' unless score is one of {HESSIAN_SCORES}",
                           hessian)
  if gauss_newton_loss != gauss_newton.LOSSES[0] and hessian != "gauss_newton":
    raise validation.error("gauss_newton_loss", f"{gauss_newton.LOSSES[0]!r} unless "
                           "hessian='gauss_newton'", gauss_newton_loss)
  return Curvature(hessian, num_probes, gauss_newton_loss)


def uses_key(score: Union[str, ScoreFn], curvature: Curvature) -> bool:
  """Whether the scores draw from the state's PRNG key (random scores, Hutchinson probes)."""
  return score == "random" or (score in HESSIAN_SCORES and curvature.method == "hutchinson")


def _missing(name: str, what: str, score: str) -> ValueError:
  return validation.error(name, f"{what} passed to update for score={score!r}", None)


def hessian_diag(score: str, curvature: Curvature, params: PyTree, flag_tree: PyTree,
                 key: Array, inputs: Inputs) -> PyTree:
  """One Hessian-diagonal estimate for a curvature score (params' structure, float32 leaves).

  Args:
    score: the curvature score it is for (named in error messages).
    curvature: the source (`check_options`).
    params: the current params.
    flag_tree: bool pytree of the prunable leaves (the Gauss–Newton diagonal covers only these).
    key: PRNG key of the Hutchinson probes.
    inputs: the ``update`` call's extra arguments.

  Returns:
    The Hutchinson estimate of ``diag ∇²loss_fn(params[, batch])``, or the Gauss–Newton
    diagonal of the loss of ``apply_fn(params, batch)`` summed over the batch (zeros on leaves
    that are not prunable).
  """
  if curvature.method == "gauss_newton":
    if inputs.apply_fn is None:
      raise _missing("apply_fn", "a function (params, batch) -> logits", score)
    if inputs.batch is None:
      raise _missing("batch", "the batch of apply_fn", score)
    return gauss_newton.gauss_newton_diag(inputs.apply_fn, params, [inputs.batch],
                                          loss=curvature.loss, prunable=flag_tree)
  if inputs.loss_fn is None:
    raise _missing("loss_fn", "a loss function", score)
  args = () if inputs.batch is None else (inputs.batch,)
  return scores_lib.hessian_diag(inputs.loss_fn, params, *args, key=key,
                                 num_probes=curvature.num_probes)


def compute(score: Union[str, ScoreFn], curvature: Curvature, params: PyTree, flags: list,
            key: Array, hess: Optional[PyTree], inputs: Inputs) -> Optional[PyTree]:
  """The scores of `prune`'s ``score``: elementwise ones lazily (`Elementwise`), None for
  magnitude (the policy's default); unprunable leaves hold their param (never read).

  Args:
    score: one of ``SCORES`` or a callable ``fn(params, **extra_args)``.
    curvature: the Hessian-diagonal source of curvature scores.
    params: the current params.
    flags: per leaf, whether it is prunable.
    key: PRNG key of random scores and Hutchinson probes.
    hess: an averaged Hessian diagonal, or None to estimate one now.
    inputs: the ``update`` call's extra arguments.

  Returns:
    A pytree with the params' structure, or None for magnitude.
  """
  if callable(score):
    given = {k: v for k, v in (("grad", inputs.grad), ("loss_fn", inputs.loss_fn),
                               ("batch", inputs.batch), ("apply_fn", inputs.apply_fn))
             if v is not None}
    return score(params, **given, **inputs.extra)
  if score == "magnitude":
    return None
  leaves, treedef = jax.tree.flatten(params)
  if score == "random":
    return jax.tree.unflatten(treedef, [
        jax.random.uniform(jax.random.fold_in(key, i), np.shape(p)) if f else p
        for i, (p, f) in enumerate(zip(leaves, flags))])
  if score in ("gradient", "taylor"):
    if inputs.grad is None:
      raise _missing("grad", "the raw gradients", score)
    tree_lib.check_same_structure(params, inputs.grad, "params", "grad")
    by_leaf = jax.tree.leaves(inputs.grad)
  else:
    if hess is None:
      hess = hessian_diag(score, curvature, params, jax.tree.unflatten(treedef, flags), key,
                          inputs)
    by_leaf = jax.tree.leaves(hess)
  with_params = score in ("taylor", "obd")
  return jax.tree.unflatten(treedef, [
      elementwise.Elementwise(_ELEMENTWISE[score], (p, x) if with_params else (x,)) if f else p
      for p, f, x in zip(leaves, flags, by_leaf)])


__all__ = ["Curvature", "HESSIANS", "HESSIAN_SCORES", "Inputs", "SCORES", "check_options",
           "compute", "hessian_diag", "uses_key"]
