"""Small Flax Linen models shared by the structured-pruning tests (dependency groups, surgery)."""

import flax.linen as nn


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
