"""Hardware presets: N:M along the input axis, TPU tiles, unstructured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import masks as masks_lib
from jaxprune._src import presets


def test_gpu_2_4_along_input_axis():
  rng = np.random.default_rng(3)
  scores = {"k": jnp.asarray(rng.random((8, 6)), jnp.float32),
            "conv": jnp.asarray(rng.random((3, 3, 8, 4)), jnp.float32),
            "bias": jnp.ones(6)}
  masks = jax.jit(lambda s: presets.hardware_mask(s, "gpu_2:4"))(scores)
  k = np.asarray(masks["k"]).reshape(2, 4, 6)
  np.testing.assert_array_equal(k.sum(axis=1), 2)
  # the kept pair is the top-2 scores of its group of 4 along axis 0
  s = np.asarray(scores["k"]).reshape(2, 4, 6)
  top2 = np.argsort(-s, axis=1)[:, :2]
  np.testing.assert_array_equal(np.take_along_axis(k, top2, axis=1), True)
  c = np.asarray(masks["conv"]).reshape(3, 3, 2, 4, 4)
  np.testing.assert_array_equal(c.sum(axis=3), 2)
  assert bool(masks["bias"].all())
  with pytest.raises(ValueError, match="sparsity"):
    presets.hardware_mask(scores, "gpu_2:4", sparsity=0.7)


def test_tpu_blocks_and_incompatible_leaves():
  rng = np.random.default_rng(4)
  scores = {"big": jnp.asarray(rng.random((16, 256)), jnp.float32),
            "small": jnp.asarray(rng.random((16, 10)), jnp.float32)}
  with pytest.raises(ValueError, match=r"\['small'\]"):
    presets.hardware_mask(scores, "tpu_8x128", sparsity=0.5)
  masks = jax.jit(lambda s: presets.hardware_mask(s, "tpu_8x128", sparsity=0.5,
                                                  incompatible="dense"))(scores)
  blocks = np.asarray(masks["big"]).reshape(2, 8, 2, 128)
  per_block = blocks.all(axis=(1, 3))
  np.testing.assert_array_equal(per_block, ~(~blocks).all(axis=(1, 3)))  # constant per block
  assert int(per_block.sum()) == 2
  assert bool(masks["small"].all())
  assert presets.compatible("tpu_128x128", (256, 384)) and not presets.compatible(
      "tpu_128x128", (256, 100))


def test_cpu_preset_is_unstructured_and_unknown_preset():
  scores = {"k": jnp.arange(40.0).reshape(5, 8)}
  masks = jax.jit(lambda s: presets.hardware_mask(s, "cpu_unstructured", sparsity=0.25))(scores)
  np.testing.assert_array_equal(
      masks["k"], jax.jit(lambda s: masks_lib.unstructured_mask(s, 0.25))(scores)["k"])
  assert int((~masks["k"]).sum()) == 10
  with pytest.raises(ValueError, match="preset"):
    presets.hardware_mask(scores, "fpga")
