"""Importance scores: pure functions from parameter pytrees to float32 score pytrees.

Higher score = more important. Every function returns a pytree with the structure of its first
argument, float32 leaves of the same shapes, whatever the parameter dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune._src import tree as tree_lib
from jaxprune._src import validation
from jaxprune._src.types import Array, PyTree


def _check_key(key: Any) -> None:
  """A PRNG key: a typed key array or a legacy ``uint32[2]``, one key (not a batch of keys)."""
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if typed and np.ndim(key) == 0:
    return
  if not typed and dtype == np.uint32 and np.shape(key) == (2,):
    return
  got = validation.Text(f"dtype {dtype} and shape {np.shape(key)}" if dtype is not None else
                        type(key).__name__)
  raise validation.error("key", "a single PRNG key (jax.random.key or jax.random.PRNGKey)", got)


def _abs32(x: Array) -> Array:
  return jnp.abs(jnp.asarray(x).astype(jnp.float32))


def _paired(fn: Callable[[Array, Array], Array], params: PyTree, other: PyTree,
            name: str) -> PyTree:
  """``fn`` over the leaves of ``params`` and of ``other``, a second float pytree of the same
  structure and shapes called ``name`` in messages."""
  tree_lib.check_float(params, "params")
  tree_lib.check_float(other, name)
  tree_lib.check_same_structure(params, other, "params", name)
  return jax.tree.map(fn, params, other)


def magnitude(params: PyTree) -> PyTree:
  """Weight magnitude ``|w|`` (Han et al. 2015, "Learning both Weights and Connections").

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -2.0, 0.5], [-0.25, 3.0, 0.0]]), "b": jnp.array([-1.0])}
    >>> jp.magnitude(params)["w"].tolist()
    [[1.0, 2.0, 0.5], [0.25, 3.0, 0.0]]

  Args:
    params: pytree of float arrays.

  Returns:
    float32 pytree of ``|w|``.
  """
  tree_lib.check_float(params, "params")
  return jax.tree.map(_abs32, params)


def gradient(grads: PyTree) -> PyTree:
  """Gradient magnitude ``|g|``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> grads = {"w": jnp.array([[0.5, -2.0, 0.0], [-0.25, 1.0, 3.0]])}
    >>> jp.gradient(grads)["w"].tolist()
    [[0.5, 2.0, 0.0], [0.25, 1.0, 3.0]]

  Args:
    grads: pytree of float arrays (gradients of the loss w.r.t. the parameters).

  Returns:
    float32 pytree of ``|g|``.
  """
  tree_lib.check_float(grads, "grads")
  return jax.tree.map(_abs32, grads)


def taylor(params: PyTree, grads: PyTree) -> PyTree:
  """First-order Taylor saliency ``|w·g|``: the loss change estimated for zeroing ``w``.

  Molchanov et al. 2017, "Pruning Convolutional Neural Networks for Resource Efficient
  Inference" (the per-weight form, as in Molchanov et al. 2019).

  Examples:
    For a linear loss the estimate is exact: zeroing ``w_i`` changes the loss by ``w_i·g_i``.

    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([1.0, -2.0, 4.0])}
    >>> loss_fn = lambda p: jnp.dot(jnp.array([0.5, 0.25, 0.0]), p["w"])
    >>> jp.taylor(params, jax.grad(loss_fn)(params))["w"].tolist()
    [0.5, 0.5, 0.0]

  Args:
    params: pytree of float arrays.
    grads: gradients with the same structure and shapes.

  Returns:
    float32 pytree of ``|w·g|``.
  """
  return _paired(lambda w, g: _abs32(jnp.asarray(w, jnp.float32) * g), params, grads, "grads")


def random_scores(params: PyTree, key: Array) -> PyTree:
  """Uniform random scores in [0, 1): the baseline every criterion must beat.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxprune as jp
    >>> scores = np.asarray(jp.random_scores({"w": jnp.zeros((2, 3))}, jax.random.key(0))["w"])
    >>> scores.shape, str(scores.dtype), bool(np.all((scores >= 0) & (scores < 1)))
    ((2, 3), 'float32', True)

  Args:
    params: pytree of float arrays (only shapes are used).
    key: a JAX PRNG key; each leaf uses ``fold_in(key, leaf_index)``.

  Returns:
    float32 pytree of random scores.
  """
  tree_lib.check_float(params, "params")
  _check_key(key)
  leaves, treedef = jax.tree.flatten(params)
  out = [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)
         for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def _varying_axes(tree: Any) -> frozenset:
  """Inside `jax.shard_map`: the mesh axes any leaf of ``tree`` varies over (empty outside)."""
  axes = frozenset()
  for leaf in jax.tree.leaves(tree):
    aval = jax.typeof(leaf)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; older releases call it `vma`
    axes |= manual.varying if manual is not None else getattr(aval, "vma", frozenset())
  return axes


def _vary(x: Array, axes: frozenset) -> Array:
  return lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def hessian_diag(loss_fn: Callable[..., Array], params: PyTree, *args: Any, key: Array,
                 num_probes: int = 8) -> PyTree:
  """Hutchinson estimate of the diagonal of the Hessian of ``loss_fn(params, *args)``.

  ``diag(H) = E[v ⊙ Hv]`` for Rademacher probes ``v`` (Bekas, Kokiopoulou & Saad 2007, "An
  estimator for the diagonal of a matrix"); each probe's variance on entry i is
  ``Σ_{j≠i} H_ij²``, lower than with Gaussian probes. ``Hv`` is a forward-over-reverse product.
  The gradient is linearized once (`jax.linearize`) and the probes run through the linear map in
  a `lax.scan`, so each probe costs one tangent pass rather than a full HVP and the compiled
  program does not grow with ``num_probes``; each random uint32 supplies the signs of 32 probes.
  Products accumulate in float32 (bf16 params work).

  Examples:
    A separable loss has a diagonal Hessian, which every probe recovers exactly (the variance
    comes from off-diagonal terms only):

    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> c = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    >>> loss_fn = lambda p, c: 0.5 * jnp.sum(c * p["w"] ** 2)
    >>> h = jp.hessian_diag(loss_fn, {"w": jnp.ones((2, 3))}, c, key=jax.random.key(0),
    ...                     num_probes=4)
    >>> h["w"].tolist()
    [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]

  Args:
    loss_fn: scalar function ``loss_fn(params, *args)``.
    params: pytree of float arrays.
    *args: further arguments to ``loss_fn`` (a batch, say).
    key: JAX PRNG key for the probes.
    num_probes: number of Rademacher probes (an integer >= 1, Python or numpy); the error
      shrinks like ``1/sqrt(num_probes)``.

  Returns:
    float32 pytree with ``params``' structure: the estimated Hessian diagonal (unbiased).
  """
  if not callable(loss_fn):
    raise validation.error("loss_fn", "a function loss_fn(params, *args) -> scalar",
                           validation.Text(type(loss_fn).__name__))
  tree_lib.check_float(params, "params")
  num_probes = validation.check_int(num_probes, "num_probes", 1)
  _check_key(key)
  out = jax.eval_shape(loss_fn, params, *args)
  if getattr(out, "shape", None) != ():
    raise ValueError(f"loss_fn: expected a scalar loss, got a value of shape "
                     f"{getattr(out, 'shape', type(out).__name__)}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise validation.error("loss_fn", "a floating-point scalar loss",
                           validation.Text(f"dtype {out.dtype}"))

  grad_fn = jax.grad(lambda p: loss_fn(p, *args))
  _, hvp = jax.linearize(grad_fn, params)
  leaves, treedef = jax.tree.flatten(params)

  def word_probes(acc, word_key, num_bits):
    # One uint32 per entry yields 32 independent Rademacher probes (one per bit): random bits
    # are drawn once per 32 probes, and drawing is as costly as a pass over the parameters.
    bits = [jax.random.bits(jax.random.fold_in(word_key, i), jnp.shape(x), jnp.uint32)
            for i, x in enumerate(leaves)]

    def one_probe(acc, bit):
      signs = [1.0 - 2.0 * ((b >> bit) & 1).astype(jnp.float32) for b in bits]
      # Under shard_map, probes from a replicated key must vary like the params they perturb.
      v = [_vary(sg.astype(jnp.asarray(x).dtype), _varying_axes(x))
           for sg, x in zip(signs, leaves)]
      hv = jax.tree.leaves(hvp(jax.tree.unflatten(treedef, v)))
      return [a + sg * h.astype(jnp.float32) for a, sg, h in zip(acc, signs, hv)], None

    return lax.scan(one_probe, acc, jnp.arange(num_bits, dtype=jnp.uint32))[0]

  # The sums vary over every axis the params or the batch vary over (scan carries must match).
  everywhere = _varying_axes((params, args))
  acc = [_vary(jnp.zeros(jnp.shape(x), jnp.float32), everywhere) for x in leaves]
  if num_probes <= 32:  # one word of signs, one flat scan (the common case)
    acc = word_probes(acc, key, num_probes)
  else:
    full_words, rest = divmod(num_probes, 32)
    word_keys = jax.random.split(key, full_words + 1)
    acc = lax.scan(lambda a, k: (word_probes(a, k, 32), None), acc, word_keys[:full_words])[0]
    if rest:
      acc = word_probes(acc, word_keys[full_words], rest)
  return jax.tree.unflatten(treedef, [a / num_probes for a in acc])


def obd(params: PyTree, hess_diag: PyTree) -> PyTree:
  """Optimal Brain Damage saliency ``½·h·w²`` (LeCun, Denker & Solla 1990).

  The second-order estimate of the loss increase when ``w`` is set to zero, at a minimum where
  the gradient term vanishes and off-diagonal Hessian terms are neglected.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> params = {"w": jnp.array([[1.0, -2.0, 0.5]])}
    >>> hess_diag = {"w": jnp.array([[4.0, 1.0, 8.0]])}
    >>> jp.obd(params, hess_diag)["w"].tolist()
    [[2.0, 2.0, 1.0]]

  Args:
    params: pytree of float arrays.
    hess_diag: Hessian diagonal with the same structure (e.g. from `hessian_diag`).

  Returns:
    float32 pytree of saliencies.
  """
  return _paired(
      lambda w, h: 0.5 * jnp.asarray(h, jnp.float32) * jnp.square(jnp.asarray(w, jnp.float32)),
      params, hess_diag, "hess_diag")


def curvature(hess_diag: PyTree) -> PyTree:
  """Curvature score ``|h|``: weights in flat directions of the loss are pruned first.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> jp.curvature({"w": jnp.array([[-4.0, 1.0, 0.0]])})["w"].tolist()
    [[4.0, 1.0, 0.0]]

  Args:
    hess_diag: pytree of Hessian-diagonal estimates.

  Returns:
    float32 pytree of ``|h|``.
  """
  tree_lib.check_float(hess_diag, "hess_diag")
  return jax.tree.map(_abs32, hess_diag)
