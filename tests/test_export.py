"""Export: masking for export, sparse compaction with a working matmul, compressed checkpoints."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import sparse

import jaxprune as jp

from jaxprune._src import export
from jaxprune._src import masks as masks_lib
from jaxprune._src import report as report_lib


def make_params(sparsity, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  k1 = rng.normal(size=(32, 16))
  k1[rng.random(k1.shape) < sparsity] = 0
  conv = rng.normal(size=(3, 3, 4, 8))
  conv[rng.random(conv.shape) < sparsity] = 0
  return {
      "conv": jnp.asarray(conv, dtype),
      "dense": {"kernel": jnp.asarray(k1, dtype), "bias": jnp.asarray(rng.normal(size=16), dtype)},
  }


def random_masks(params, sparsity, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.random(x.shape) >= sparsity) if x.ndim >= 2
      else jnp.ones(x.shape, bool), params)


class FakePruneState(NamedTuple):
  count: jax.Array
  masks: dict


def test_apply_masks_with_masks_and_from_optax_state():
  params = make_params(0.0)
  masks = random_masks(params, 0.6)
  stripped = masks_lib.apply_masks(params, masks)
  for x, m, s in zip(*map(jax.tree.leaves, (params, masks, stripped))):
    np.testing.assert_array_equal(s, np.where(m, x, 0))
    assert s.dtype == x.dtype
  # The masks live somewhere inside a chained optax state.
  state = (optax.ScaleByAdamState(jnp.zeros([]), params, params),
           FakePruneState(jnp.zeros([]), masks), optax.EmptyState())
  from_state = masks_lib.apply_masks(params, state)
  jax.tree.map(np.testing.assert_array_equal, from_state, stripped)
  with pytest.raises(ValueError, match="masks"):
    masks_lib.apply_masks(params, (optax.EmptyState(),))


def test_apply_masks_from_prune_transform_state():
  from jaxprune._src import schedules, transform
  params = make_params(0.0)
  tx = optax.chain(optax.sgd(0.1),
                   transform.prune(schedules.polynomial_schedule(0.0, 0.5, 0, 1)))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  stripped = masks_lib.apply_masks(params, state)
  masks = jp.find_masks(state, params)
  r = report_lib.report(params, masks=state)  # the report reads the masks from the state too
  assert r.sparsity == pytest.approx(400 / (512 + 288))
  jax.tree.map(lambda s, m: np.testing.assert_array_equal(np.asarray(s)[~np.asarray(m)], 0),
               stripped, masks)
  assert int((~masks["dense"]["kernel"]).sum()) == 256 and int((~masks["conv"]).sum()) == 144
  assert bool(masks["dense"]["bias"].all())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compact_formats_bytes_and_roundtrip(dtype):
  params = make_params(0.95, dtype=dtype)  # COO of a 4-D leaf pays below ~1/9 density (bf16)
  compacted = export.compact(params)
  k = compacted["dense"]["kernel"]
  assert isinstance(k, sparse.BCSR)
  assert isinstance(compacted["conv"], sparse.BCOO)
  assert not isinstance(compacted["dense"]["bias"], (sparse.BCSR, sparse.BCOO))
  nse_k = int(np.count_nonzero(np.asarray(params["dense"]["kernel"])))
  nse_c = int(np.count_nonzero(np.asarray(params["conv"])))
  isz = np.dtype(dtype).itemsize
  assert k.nse == nse_k and compacted["conv"].nse == nse_c
  assert export.compact_bytes(compacted) == (
      nse_k * (isz + 4) + 4 * 33            # CSR of (32, 16)
      + nse_c * (isz + 4 * 4)               # COO with 4 int32 indices per value
      + 16 * isz)                           # dense bias
  back = export.densify(compacted)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_compact_keeps_dense_when_it_does_not_pay():
  params = make_params(0.3)
  compacted = export.compact(params)
  # 30% zeros: CSR needs 8 bytes per kept f32 value, more than dense.
  assert compacted["dense"]["kernel"] is params["dense"]["kernel"]
  assert export.compact_bytes(compacted) == report_lib.report(params).dense_bytes


def test_sparse_matmul_matches_dense():
  params = make_params(0.9)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 7, 32)), jnp.float32)
  w = params["dense"]["kernel"]
  want = x @ w
  bcsr = export.compact(params)["dense"]["kernel"]
  matmul = jax.jit(export.sparse_matmul)  # eager sparse ops dispatch dozens of small kernels
  np.testing.assert_allclose(matmul(x, bcsr), want, atol=1e-5, rtol=1e-5)
  nse = int(np.count_nonzero(np.asarray(w)))
  bcoo = jax.jit(lambda w: sparse.BCOO.fromdense(w, nse=nse))(w)
  np.testing.assert_allclose(matmul(x, bcoo), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(matmul(x, w), jax.jit(jnp.matmul)(x, w))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_checkpoint_roundtrip_bitwise(tmp_path, dtype):
  params = make_params(0.0, dtype=dtype)
  masks = random_masks(params, 0.7)
  size = export.save_compressed(tmp_path / "ckpt", params, masks)
  assert size == (tmp_path / "ckpt.npz").stat().st_size
  loaded = export.load_compressed(tmp_path / "ckpt.npz", like=params)
  stripped = masks_lib.apply_masks(params, masks)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(stripped)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  flat = export.load_compressed(tmp_path / "ckpt.npz")
  assert sorted(flat) == ["['conv']", "['dense']['bias']", "['dense']['kernel']"]
  # Without masks the zeros of the (stripped) params define what is kept.
  export.save_compressed(tmp_path / "z.npz", stripped)
  again = export.load_compressed(tmp_path / "z.npz", like=params)
  jax.tree.map(np.testing.assert_array_equal, again, stripped)


def test_checkpoint_bytes_shrink_with_sparsity(tmp_path):
  sizes = []
  for i, s in enumerate([0.0, 0.5, 0.8, 0.95]):
    params = make_params(s)
    sizes.append(export.save_compressed(tmp_path / f"c{i}.npz", params))
    r = report_lib.report(params)
    best = sum(min(row.dense_bytes, row.bitmask_bytes) for row in r.rows)
    # The payload is exactly the bitmask-or-dense byte count; npz adds a bounded overhead.
    assert best < sizes[-1] < best + 2048
  assert all(a > b for a, b in zip(sizes, sizes[1:])) and sizes[-1] < sizes[0] / 2


def test_checkpoint_like_mismatch(tmp_path):
  params = make_params(0.5)
  export.save_compressed(tmp_path / "c.npz", params)
  with pytest.raises(ValueError, match="extra"):
    export.load_compressed(tmp_path / "c.npz", like={**params, "extra": jnp.zeros(2)})
  bad = {**params, "conv": jnp.zeros((3, 3, 4, 9))}
  with pytest.raises(ValueError, match=r"\['conv'\]"):
    export.load_compressed(tmp_path / "c.npz", like=bad)


def test_quantized_checkpoint_roundtrip_and_size(tmp_path):
  from jaxprune._src import quantize as q_lib
  rng = np.random.default_rng(5)
  w = rng.normal(size=(128, 64)) * (rng.random((128, 64)) > 0.8)
  params = {"conv": make_params(0.8)["conv"], "dense": {"kernel": jnp.asarray(w, jnp.float32)}}
  qparams = q_lib.quantize(params)
  f32_size = export.save_compressed(tmp_path / "f.npz", params)
  q_size = export.save_compressed(tmp_path / "q.npz", qparams)
  kept = int(np.count_nonzero(w)) + int(np.count_nonzero(np.asarray(params["conv"])))
  # 4-byte values became 1-byte ones; scales and two more npz entries per leaf cost < 1 KiB.
  assert 3 * kept - 1024 < f32_size - q_size <= 3 * kept
  loaded = export.load_compressed(tmp_path / "q.npz", like=qparams)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  assert isinstance(loaded["dense"]["kernel"], q_lib.QuantizedArray)
  flat = export.load_compressed(tmp_path / "q.npz")
  assert isinstance(flat["['conv']"], q_lib.QuantizedArray)
