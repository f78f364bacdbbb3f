"""Knowledge distillation loss for fine-tuning a pruned student from its dense teacher."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      labels: Optional[jax.Array] = None, *, temperature: float = 4.0,
                      alpha: float = 0.9) -> jax.Array:
  """Hinton-style distillation: softened teacher-student KL, optionally mixed with hard labels.

  ``loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)``,
  averaged over the leading (batch) dims. The ``T^2`` factor keeps the soft term's gradient
  magnitude independent of ``T`` (its gradient is ``T * (softmax(s/T) - softmax(t/T))``).
  Without labels the loss is the soft term alone (``alpha`` is ignored). The teacher receives
  no gradient.

  Examples:
    >>> import jax.numpy as jnp, jaxprune as jp
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    >>> labels = jnp.array([0, 1])
    >>> # the student matches its teacher, so only the hard-label half remains: ½·CE
    >>> round(float(jp.distillation_loss(logits, logits, labels, alpha=0.5)), 4)
    0.0635

  Args:
    student_logits: ``(..., classes)``.
    teacher_logits: ``(..., classes)``, same shape.
    labels: optional integer class labels ``(...)``.
    temperature: softening temperature ``T > 0``.
    alpha: weight of the soft term in ``[0, 1]``.

  Returns:
    A float32 scalar.

  References:
    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015
    (arXiv:1503.02531), section 2.
  """
  if jnp.shape(student_logits) != jnp.shape(teacher_logits):
    raise ValueError(f"teacher_logits: expected the shape of student_logits "
                     f"{jnp.shape(student_logits)}, got {jnp.shape(teacher_logits)}.")
  if not temperature > 0:
    raise ValueError(f"temperature: expected a positive number, got {temperature}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}.")
  s = jnp.asarray(student_logits, jnp.float32) / temperature
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature
  soft = temperature**2 * jnp.mean(optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(s), jax.nn.log_softmax(t)))
  if labels is None:
    return soft
  if jnp.shape(labels) != jnp.shape(student_logits)[:-1]:
    raise ValueError(f"labels: expected integer labels of shape {jnp.shape(student_logits)[:-1]}"
                     f", got shape {jnp.shape(labels)}.")
  hard = jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(student_logits, jnp.float32), labels))
  return alpha * soft + (1.0 - alpha) * hard
