"""The Gauss–Newton (Fisher) diagonal of Dense and Conv kernels: exact for a loss, probed for
the change of the outputs.

For a linear site ``y = x @ W`` the gradient of one example's loss is ``xᵀ δ`` with ``δ`` the
loss's gradient at ``y``. The Gauss–Newton matrix of the summed loss is ``Σ_n J_nᵀ Λ_n J_n`` with
``Λ_n`` the Hessian of the loss in the model's output; for softmax cross-entropy ``Λ = diag(p) -
ppᵀ = Σ_c p_c (e_c - p)(e_c - p)ᵀ``, so (Martens, "New insights and perspectives on the natural
gradient method", 2020, where it is also the true Fisher)

    diag(G)[i, o] = Σ_n Σ_c p_nc (Σ_t x_nti δ^c_nto)²,   δ^c = ∂(-log p_c) / ∂y,

and for ``mse`` (``½‖f - t‖²``, ``Λ = I``) the same with ``p_nc = 1`` and ``δ^c = ∂f_c / ∂y``.
All examples' ``δ^c`` come from one reverse pass per class: the model is re-evaluated with a zero
perturbation added to every site output (`interpret.evaluate`) and pulled back from the
cotangent ``√p_c (p - e_c)``. Per example, the square of the token sum is replaced by the sum of
squares, ``Σ_t x_nti² (δ^c_nto)²`` (squared inputs × squared output gradients): exact when a
site sees one token per example (a Dense layer on a feature vector), an approximation that drops
the cross-token terms for convolutions and sequence models. A kernel read by several sites gets
the sum of its sites' diagonals (the cross-site terms are dropped alike). This is the diagonal
that Optimal Brain Damage (LeCun, Denker & Solla, 1990) asks for, without the sampling noise of
Hutchinson's estimator (`jaxprune.hessian_diag`).

The same perturbed model also gives two measures of how the model's outputs ``f`` move, with
Rademacher probes over the outputs in place of a loss's classes (Hutchinson, 1990):
`output_sensitivity`, the trace of the Gauss–Newton matrix of ``½‖f - f₀‖²`` in each kernel's
outputs, and `output_diag`, its diagonal in each kernel's weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxprune._src import calibration
from jaxprune._src import calibration_sites
from jaxprune._src import interpret
from jaxprune._src import tree as tree_lib
from jaxprune._src.jaxpr_sites import Site

PyTree = Any
LOSSES = ("softmax_cross_entropy", "mse")


def _cotangents(logits: jax.Array, loss: str, labels: Optional[jax.Array]) -> jax.Array:
  """``(K, batch, classes)`` cotangents whose pullbacks, squared and summed over K, give Σ_c."""
  num = logits.shape[-1]
  eye = jnp.eye(num, dtype=jnp.float32)
  if loss == "mse":
    cots = jnp.broadcast_to(eye[:, None, :], (num, *logits.shape))
  else:
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if labels is None:
      cots = jnp.sqrt(p.T)[:, :, None] * (p[None] - eye[:, None, :])
    else:
      cots = (p - jax.nn.one_hot(labels, num, dtype=jnp.float32))[None]
  return lax.stop_gradient(cots).astype(logits.dtype)


def _perturbed(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any,
               kernels: tuple[str, ...], *, stacked: bool) -> tuple[list, Callable, list]:
  """The model as a function of shifts added to the outputs of ``kernels``' sites.

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: the parameters.
    batch: one batch.
    kernels: the kernels' paths.
    stacked: whether sites inside one ``scan`` are accepted (their shifts and inputs then have
      a leading axis over the iterations).

  Returns:
    ``(sites, forward, zeros)``: ``forward(eps) -> (outputs, inputs)`` evaluates ``apply_fn``
    with ``eps[k]`` added to site ``k``'s output and returns the flat outputs and each site's
    input (`interpret.site_inputs`); ``zeros`` is the unshifted ``eps``.
  """
  traced = interpret.trace(apply_fn, params, batch)
  sites = [s for group in calibration_sites.select_sites(
      traced, params, kernels, None, pooled=False, stacked=stacked).values() for s in group]
  args = jax.tree.leaves(params) + jax.tree.leaves(batch)
  taps = {s.location: functools.partial(lambda ops, out, s: interpret.site_inputs(
      s, ops[1 - s.operand]), s=s) for s in sites}

  def forward(eps: list) -> tuple[list, list]:
    outs, found = interpret.evaluate_with_taps(
        traced.jaxpr, args, taps, {s.location: e for s, e in zip(sites, eps)})
    return outs, [found[s.location] for s in sites]

  zeros = [jnp.zeros(interpret.scan_lengths(traced.jaxpr, s.location)
                     + s.eqn.outvars[0].aval.shape, s.eqn.outvars[0].aval.dtype) for s in sites]
  return sites, forward, zeros


@functools.partial(jax.jit, static_argnames=("apply_fn", "kernels", "loss", "labels"))
def _step(acc: dict, params: PyTree, batch: Any, *, apply_fn: Callable[[PyTree, Any], jax.Array],
          kernels: tuple[str, ...], loss: str,
          labels: Optional[Callable[[Any], jax.Array]]) -> dict:
  """Adds one batch to ``acc``; compiled once per (apply_fn, kernels, loss, labels, shapes)."""
  sites, forward, eps = _perturbed(apply_fn, params, batch, kernels, stacked=False)

  def logits_of(e: list) -> tuple[jax.Array, list]:
    outs, xs = forward(e)
    return outs[0], xs

  logits, pullback, xs = jax.vjp(logits_of, eps, has_aux=True)
  if logits.ndim != 2:
    raise ValueError("apply_fn: expected one logits array of shape (batch, classes), got "
                     f"shape {logits.shape}")
  y = None if labels is None else jnp.asarray(labels(batch))
  if y is not None and y.shape != logits.shape[:1]:
    raise ValueError(f"labels: expected integer labels of shape {logits.shape[:1]}, got "
                     f"shape {y.shape}")
  (deltas,) = jax.vmap(pullback)(_cotangents(logits, loss, y))
  return _add_diagonals(acc, sites, deltas, xs, 1.0)


def _token_major(site: Site, d2: jax.Array, lead: int) -> jax.Array:
  """`interpret.site_outputs` of ``d2`` under ``lead`` leading iteration axes."""
  fn = functools.partial(interpret.site_outputs, site)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(d2)


def _add_diagonals(acc: dict, sites: list, deltas: list, xs: list, scale: float) -> dict:
  """Adds ``scale · Σ_t x_ti² Σ_K (δ_K)_to²`` per site (in its leaf's layout) to ``acc``.

  A site inside a ``scan`` has inputs and cotangents per iteration: a kernel stacked along it
  gets one diagonal per slice, one read at every iteration the sum over the iterations.
  """
  new = dict(acc)
  for k, s in enumerate(sites):
    lead = deltas[k].ndim - 1 - s.eqn.outvars[0].aval.ndim
    d2 = jnp.sum(jnp.square(deltas[k].astype(jnp.float32)), axis=0) * scale
    d2 = _token_major(s, d2, lead)
    x2 = jnp.square(xs[k])
    if s.loop_axes:
      shape = (s.slices, -1)
      diag = jax.vmap(calibration.gram)(x2.reshape(*shape, s.d_in), d2.reshape(*shape, s.d_out))
    else:
      diag = calibration.gram(x2.reshape(-1, s.d_in), d2.reshape(-1, s.d_out))
    new[s.path] = new[s.path] + interpret.from_matrix(diag, s)
  return new


def _probed(forward: Callable, eps: list, key: jax.Array, num_probes: int) -> tuple[list, list]:
  """Pullbacks of ``num_probes`` Rademacher probes over every floating output of ``forward``
  to the site outputs (Hutchinson, 1990), and the sites' inputs."""
  def floating(e: list) -> tuple[list, list]:
    outs, xs = forward(e)
    return [o for o in outs if jnp.issubdtype(o.dtype, jnp.floating)], xs

  outs, pullback, xs = jax.vjp(floating, eps, has_aux=True)
  if not outs:
    raise ValueError("apply_fn: expected at least one floating-point output to measure the "
                     "kernels' effect on, got none (oneshot's allocations 'obd' and 'obs' "
                     "need one; 'global' does not)")
  keys = jax.random.split(key, len(outs))
  probes = [jax.random.rademacher(k, (num_probes, *o.shape), o.dtype) for k, o in zip(keys, outs)]
  (grads,) = jax.vmap(pullback)(probes)
  return grads, xs


@functools.partial(jax.jit, static_argnames=("apply_fn", "kernels", "num_probes"))
def _sensitivity_step(acc: dict, params: PyTree, batch: Any, key: jax.Array, *,
                      apply_fn: Callable[[PyTree, Any], Any], kernels: tuple[str, ...],
                      num_probes: int) -> dict:
  """Adds one batch's probe estimate of ``Σ ‖∂f/∂y‖²`` per kernel to ``acc``."""
  sites, forward, eps = _perturbed(apply_fn, params, batch, kernels, stacked=True)
  grads, _ = _probed(forward, eps, key, num_probes)  # the unused site inputs: jit drops them
  new = dict(acc)
  for k, s in enumerate(sites):
    new[s.path] = new[s.path] + jnp.sum(jnp.square(grads[k].astype(jnp.float32))) / num_probes
  return new


def output_sensitivity(apply_fn: Callable[[PyTree, Any], Any], params: PyTree,
                       batches: Iterable[Any], kernels: Sequence[str], *, num_probes: int = 4,
                       seed: int = 0) -> dict[str, float]:
  """How much each kernel's outputs move the model's outputs: ``Σ_t ‖∂f/∂y_t‖²_F`` per kernel.

  ``y_t`` is the kernel's output at calibration position ``t`` and ``f`` every floating output
  of ``apply_fn``; the sum runs over all positions and batches. It is the trace of the
  Gauss–Newton matrix of ``½‖f - f₀‖²`` with respect to the kernel's outputs, estimated with
  Rademacher probes ``v`` over the outputs (Hutchinson, 1990: ``E‖Jᵀv‖² = tr(JᵀJ)``); divided by
  the number of positions and output features it is the factor that turns a layer's
  reconstruction error ``‖ΔY‖²`` into the expected squared change of the model's outputs when
  ``ΔY`` spreads evenly (an isotropic approximation of that Gauss–Newton matrix). Positions the
  outputs do not depend on (padding under a mask) add nothing. A kernel read in several places,
  or at every iteration of a ``scan``, gets the sum over its uses; a kernel stacked along a
  ``scan`` the sum over its slices.

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: the parameters.
    batches: an iterable of batches.
    kernels: paths of the kernels (each read by a dot/conv site).
    num_probes: probes per batch.
    seed: seed of the probes.

  Returns:
    ``{path: float}`` for ``kernels``.
  """
  kernels = tuple(kernels)
  acc = {p: jnp.zeros((), jnp.float32) for p in kernels}
  key = jax.random.key(seed)
  for i, batch in enumerate(batches):
    acc = _sensitivity_step(acc, params, batch, jax.random.fold_in(key, i), apply_fn=apply_fn,
                            kernels=kernels, num_probes=num_probes)
  return {p: float(v) for p, v in jax.device_get(acc).items()}


@functools.partial(jax.jit, static_argnames=("apply_fn", "kernels", "num_probes"))
def _output_diag_step(acc: dict, params: PyTree, batch: Any, key: jax.Array, *,
                      apply_fn: Callable[[PyTree, Any], Any], kernels: tuple[str, ...],
                      num_probes: int) -> dict:
  """Adds one batch's probe estimate of the output Gauss–Newton diagonal to ``acc``."""
  sites, forward, eps = _perturbed(apply_fn, params, batch, kernels, stacked=True)
  grads, xs = _probed(forward, eps, key, num_probes)
  return _add_diagonals(acc, sites, grads, xs, 1.0 / num_probes)


def output_diag(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, batches: Iterable[Any],
                kernels: Sequence[str], *, num_probes: int = 4,
                seed: int = 0) -> dict[str, jax.Array]:
  """Diagonal of the Gauss–Newton matrix of ``½‖f - f₀‖²`` in each kernel's weights.

  ``f`` is every floating output of ``apply_fn``: the diagonal says how much the model's outputs
  move when one weight moves, so ``w² · diag`` is each weight's Optimal Brain Damage saliency
  for the outputs (LeCun, Denker & Solla, 1990), in one unit for every kernel. Unlike magnitudes
  it does not change when a kernel is scaled up and the next one down (a query and a key
  kernel, or a layer before a normalisation): the output gradients scale the other way.
  ``Σ_t x_ti² E_v[(Jᵀv)_to²]`` with Rademacher probes ``v`` over the outputs (Hutchinson, 1990),
  per position ``t``, so cross-position terms are dropped as in `gauss_newton_diag`.

  Args:
    apply_fn: ``apply_fn(params, batch)``.
    params: the parameters.
    batches: an iterable of batches.
    kernels: paths of the kernels (each read by a dot/conv site, also inside one ``scan``: a
      kernel stacked along it gets each slice's diagonal, one read at every iteration the sum
      over the iterations).
    num_probes: probes per batch.
    seed: seed of the probes.

  Returns:
    ``{path: float32 array shaped like the kernel}`` for ``kernels``.
  """
  kernels = tuple(kernels)
  leaves = dict(tree_lib.leaves_with_paths(params))
  acc = {p: jnp.zeros(jnp.shape(leaves[p]), jnp.float32) for p in kernels}
  key = jax.random.key(seed)
  for i, batch in enumerate(batches):
    acc = _output_diag_step(acc, params, batch, jax.random.fold_in(key, i), apply_fn=apply_fn,
                            kernels=kernels, num_probes=num_probes)
  return acc


def gauss_newton_diag(apply_fn: Callable[[PyTree, Any], jax.Array], params: PyTree,
                      batches: Iterable[Any], *, loss: str = "softmax_cross_entropy",
                      labels: Optional[Callable[[Any], jax.Array]] = None,
                      prunable: tree_lib.Prunable = None) -> PyTree:
  """Gauss–Newton diagonal of the summed loss for every prunable Dense / Conv kernel.

  References: Martens, "New insights and perspectives on the natural gradient method", 2020;
  LeCun, Denker & Solla, "Optimal Brain Damage", 1990.

  Examples:
    For a linear model and ``loss="mse"`` the diagonal is ``Σ_n x_ni²``, the same for every output:

    >>> import jax.numpy as jnp, jaxprune as jp
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> x = jnp.array([[1.0, 2.0], [3.0, 0.0]])
    >>> diag = jp.gauss_newton_diag(apply_fn, {"w": jnp.ones((2, 3))}, [x], loss="mse")
    >>> diag["w"].tolist()
    [[10.0, 10.0, 10.0], [4.0, 4.0, 4.0]]

  Args:
    apply_fn: ``apply_fn(params, batch) -> logits`` of shape ``(batch, classes)``.
    params: parameter pytree.
    batches: an iterable of batches.
    loss: ``"softmax_cross_entropy"`` (the Gauss–Newton matrix, equal to the true Fisher) or
      ``"mse"`` (``½‖f - t‖²`` summed, whose Gauss–Newton matrix is ``JᵀJ``).
    labels: optional ``batch -> int labels (batch,)``: with softmax cross-entropy, weight only
      the labelled class (the empirical Fisher) instead of every class by its probability.
    prunable: which leaves to compute (None: floating, ``ndim >= 2``; a predicate or a bool
      pytree). Every one must be read by a dot/conv site.

  Returns:
    A float32 pytree with ``params``' structure: the diagonal, summed over examples, for the
    prunable kernels and zeros elsewhere. It is exact for kernels that see one token per
    example; otherwise the cross-token terms are dropped (the square of each example's sum
    over tokens becomes the sum of the squares).
  """
  if loss not in LOSSES:
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
  if labels is not None and loss != "softmax_cross_entropy":
    raise ValueError(f"labels: only used with loss='softmax_cross_entropy', got loss={loss!r}")
  tree_lib.check_float(params, "params")
  first, batches = calibration.first_batch(batches)
  traced = interpret.trace(apply_fn, params, first)
  outs = traced.jaxpr.out_avals
  if len(outs) != 1 or len(outs[0].shape) != 2:
    raise ValueError("apply_fn: expected one logits array of shape (batch, classes), got "
                     f"{[tuple(o.shape) for o in outs]}")
  selected = calibration_sites.select_sites(traced, params, None, prunable, pooled=False)
  flags = jax.tree.leaves(tree_lib.prunable_flags(params, prunable))
  for path, flag in zip(traced.paths, flags):
    if flag and path not in selected:
      raise ValueError(f"params: prunable leaf {path} is not read as a dot/conv operand, so it "
                       "has no Gauss-Newton diagonal here; exclude it with prunable=")
  acc = {p: jnp.zeros(s[0].shape, jnp.float32) for p, s in selected.items()}
  for batch in batches:
    acc = _step(acc, params, batch, apply_fn=apply_fn, kernels=tuple(selected), loss=loss,
                labels=labels)
  leaves, treedef = jax.tree.flatten(params)
  paths = [tree_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out = [acc.get(p, jnp.zeros(jnp.shape(x), jnp.float32)) for p, x in zip(paths, leaves)]
  return jax.tree.unflatten(treedef, out)
