"""Small models and parameter trees shared by several test modules."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# Leaf paths of `sum_params`' two kernels.
A, B_ = "['a']['kernel']", "['b']['kernel']"


def sum_params():
  # Distinct positive values: pruning k entries of a leaf lowers the sum by its k smallest.
  rng = np.random.default_rng(0)
  vals = rng.permutation(np.arange(1, 36, dtype=np.float32))
  return {"a": {"kernel": jnp.asarray(vals[:20].reshape(4, 5))},
          "b": {"kernel": jnp.asarray(vals[20:].reshape(5, 3))},
          "bias": jnp.asarray([0.5, 0.25, 0.125], jnp.float32)}


class MLP(nn.Module):
  features: tuple = (6, 5, 3)

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


class ResCNN(nn.Module):
  """conv-BN-relu, a residual 1x1 conv, flatten, dense head."""
  c: int = 4

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.c, (3, 3))(x)))
    y = y + nn.Conv(self.c, (1, 1))(y)
    y = y.reshape((y.shape[0], -1))
    return nn.Dense(3)(y)


class Block(nn.Module):
  """Attention, residual + LayerNorm, then an MLP with a residual."""
  heads: int = 2
  qkv: int = 8
  hidden: int = 12

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.qkv)(x, x)
    x = nn.LayerNorm()(x + y)
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))
