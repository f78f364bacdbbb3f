"""Calibration: H = XᵀX per kernel against numpy, padding, sites inside calls, bad input, stages."""

import logging
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import calibration
from jaxprune._src import calibration_step

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B, T, D = 2, 5, 4


def rand(i, shape):
  return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


def gram(x):
  x = np.asarray(x, np.float64)
  return x.T @ x


def seq_model(p, batch):
  """A Flax Dense (in, out), an einsum kernel (heads, d_model, d_head), an (out, in) weight."""
  h = nn.Dense(6).apply({"params": p["dense"]}, batch["x"])
  a = jnp.einsum("btd,hdk->bthk", h, p["heads"]).reshape(B, T, 6)
  return jnp.tanh(a) @ p["proj"].T


SEQ_PARAMS = {"dense": {"kernel": rand(1, (D, 6)), "bias": rand(2, (6,))},
              "heads": rand(3, (2, 6, 3)), "proj": rand(4, (3, 6))}


def seq_batch(i, lengths):
  return {"x": rand(10 + i, (B, T, D)), "len": np.asarray(lengths)}


def valid(batch):
  return np.arange(T)[None, :] < batch["len"][:, None]


@pytest.mark.parametrize("row_block", [256, 4])
def test_dense_einsum_out_in_h_excludes_padding(monkeypatch, row_block):
  """With blocks of 4 rows, the Gram products run over the real tokens only (8 and 8 of 10)."""
  monkeypatch.setattr(calibration_step, "ROW_BLOCK", row_block)
  batches = [seq_batch(0, [3, 5]), seq_batch(1, [5, 1])]
  got = calibration.calibrate(seq_model, SEQ_PARAMS, batches, token_mask=valid)
  assert list(got) == ["['dense']['kernel']", "['heads']", "['proj']"]
  xs, hs, ts = [], [], []
  for b in batches:
    m = valid(b)
    h = b["x"] @ SEQ_PARAMS["dense"]["kernel"] + SEQ_PARAMS["dense"]["bias"]
    a = np.einsum("btd,hdk->bthk", h, SEQ_PARAMS["heads"]).reshape(B, T, 6)
    xs.append(b["x"][m])
    hs.append(h[m])
    ts.append(np.tanh(a)[m])
  for path, rows in zip(got, (xs, hs, ts)):
    want = gram(np.concatenate(rows))
    np.testing.assert_allclose(got[path].h, want, rtol=2e-5, atol=2e-5)
    assert float(got[path].count) == 3 + 5 + 5 + 1
    assert got[path].cross is None and got[path].h.dtype == jnp.float32
  assert got["['heads']"].site.contract_axes == (1,)
  assert got["['proj']"].site.contract_axes == (1,)


def im2col_same_3x3(x):
  """(n, h, w, c) -> (n*h*w, 3*3*c) patches, features ordered (tap row, tap col, channel)."""
  n, hh, ww, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [xp[i, r:r + 3, s:s + 3, :].ravel()
          for i in range(n) for r in range(hh) for s in range(ww)]
  return np.stack(rows)


def test_flax_conv_h_is_patches_gram():
  conv = nn.Conv(3, (3, 3))
  params = {"params": {"kernel": rand(20, (3, 3, 2, 3)), "bias": rand(21, (3,))}}
  x = rand(22, (2, 4, 5, 2))
  (cal,) = calibration.calibrate(conv.apply, params, [x]).values()
  np.testing.assert_allclose(cal.h, gram(im2col_same_3x3(x)), rtol=2e-5, atol=2e-5)
  assert float(cal.count) == 2 * 4 * 5 and cal.site.contract_axes == (0, 1, 2)
  (diag,) = calibration.calibrate(conv.apply, params, [x], diagonal=True).values()
  np.testing.assert_allclose(diag.h, np.diagonal(cal.h), rtol=1e-6)


def test_diagonal_only_is_the_diagonal_of_h_padding_excluded():
  batches = [seq_batch(0, [3, 5]), seq_batch(1, [5, 1])]
  full = calibration.calibrate(seq_model, SEQ_PARAMS, batches, token_mask=valid)
  diag = calibration.calibrate(seq_model, SEQ_PARAMS, batches, token_mask=valid, diagonal=True)
  for path in full:
    assert diag[path].h.shape == full[path].h.shape[:1]
    np.testing.assert_allclose(diag[path].h, np.diagonal(full[path].h), rtol=1e-6)
    assert float(diag[path].count) == float(full[path].count) == 14
  with pytest.raises(ValueError, match="reference_params: expected None with diagonal=True"):
    calibration.calibrate(seq_model, SEQ_PARAMS, batches, reference_params=SEQ_PARAMS,
                          diagonal=True)


@jax.custom_jvp
def _custom_dense(w, x):
  return x @ w


_custom_dense.defjvp(lambda primals, tangents: (_custom_dense(*primals), tangents[1] @ primals[0]))


def nested_model(p, x):
  h = jax.jit(lambda w, v: jnp.tanh(v @ w))(p["a"], x)
  h = jax.checkpoint(lambda w, v: jnp.tanh(v @ w))(p["b"], h)
  return _custom_dense(p["c"], h)


NESTED = {"a": rand(30, (D, 4)), "b": rand(31, (4, 4)), "c": rand(32, (4, 2))}


def test_sites_inside_jit_checkpoint_custom_jvp_eager_equals_jitted():
  x = rand(33, (6, D))
  got = calibration.calibrate(nested_model, NESTED, [x])
  h1 = np.tanh(x @ NESTED["a"])
  h2 = np.tanh(h1 @ NESTED["b"])
  for path, rows in zip(["['a']", "['b']", "['c']"], (x, h1, h2)):
    np.testing.assert_allclose(got[path].h, gram(rows), rtol=2e-5, atol=2e-5)
  with jax.disable_jit():
    eager = calibration.calibrate(nested_model, NESTED, [x], kernels=["['b']"])
  assert list(eager) == ["['b']"]
  np.testing.assert_allclose(eager["['b']"].h, got["['b']"].h, rtol=1e-6, atol=1e-6)


def test_reference_params_give_cross_term():
  ref = jax.tree.map(lambda w: 0.5 * w, NESTED)
  x = rand(34, (6, D))
  got = calibration.calibrate(nested_model, NESTED, [x], reference_params=ref,
                              kernels="['b']")
  xp = np.tanh(x @ NESTED["a"]).astype(np.float64)
  xd = np.tanh(x @ ref["a"]).astype(np.float64)
  np.testing.assert_allclose(got["['b']"].cross, xp.T @ xd, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got["['b']"].h, xp.T @ xp, rtol=2e-5, atol=2e-5)


def test_kernel_used_twice_alike_pools_both_uses():
  fn = lambda p, x: jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"])
  w, x = rand(40, (D, D)), rand(41, (3, D))
  (cal,) = calibration.calibrate(fn, {"w": w}, [x]).values()
  np.testing.assert_allclose(cal.h, gram(np.concatenate([x, np.tanh(x @ w)])), rtol=2e-5,
                             atol=2e-5)
  assert float(cal.count) == 6


def test_scan_stacked_kernel_one_h_per_slice_padding_excluded():
  """Stacked layers as lax.scan reads them: one H per slice, each from its iteration's inputs."""
  layers = rand(42, (3, D, D)) * 0.5
  fn = lambda p, b: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), b["x"], p["layers"])[0]
  batch = seq_batch(2, [3, 5])
  (cal,) = calibration.calibrate(fn, {"layers": layers}, [batch], token_mask=valid).values()
  assert cal.h.shape == (3, D, D) and float(cal.count) == 8
  assert cal.site.loop_axes == (0,) and cal.site.slices == 3
  x, m = batch["x"].astype(np.float64), valid(batch)
  for layer in range(3):
    np.testing.assert_allclose(cal.h[layer], gram(x[m]), rtol=2e-5, atol=2e-5)
    x = np.tanh(x @ layers[layer])
  (diag,) = calibration.calibrate(fn, {"layers": layers}, [batch], token_mask=valid,
                                  diagonal=True).values()
  np.testing.assert_allclose(diag.h, np.diagonal(cal.h, axis1=1, axis2=2), rtol=1e-6)


def test_flax_nn_scan_and_a_kernel_read_at_every_iteration():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return jnp.tanh(nn.Dense(D)(c)), None

  stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
  x = rand(44, (5, D))
  params = {"Dense_0": {"kernel": rand(47, (3, D, D)) * 0.5, "bias": rand(48, (3, D))}}
  (cal,) = calibration.calibrate(lambda p, v: stack.apply({"params": p}, v, None)[0], params,
                                 [x]).values()
  kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
  h = x.astype(np.float64)
  for layer in range(3):
    np.testing.assert_allclose(cal.h[layer], gram(h), rtol=2e-5, atol=2e-5)
    h = np.tanh(h @ kernel[layer] + bias[layer])
  # a kernel closed over by the scan body pools its iterations
  shared = lambda p, v: jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["w"]), None), v, None,
                                     length=3)[0]
  w = np.asarray(kernel[0])
  (cal,) = calibration.calibrate(shared, {"w": w}, [x]).values()
  rows = [x.astype(np.float64)]
  for _ in range(2):
    rows.append(np.tanh(rows[-1] @ w))
  np.testing.assert_allclose(cal.h, gram(np.concatenate(rows)), rtol=2e-5, atol=2e-5)
  assert float(cal.count) == 15


def test_kernels_inside_while_cond_or_nested_scans_are_refused_naming_them():
  w = {"w": rand(45, (D, D))}
  x = rand(46, (2, D))
  loop = lambda p, v: jax.lax.while_loop(lambda c: jnp.sum(c) < 5, lambda c: jnp.tanh(c @ p["w"]),
                                          v)
  with pytest.raises(ValueError, match=r"\['w'\] is read inside while; calibration supports"):
    calibration.calibrate(loop, w, [x])
  nested = lambda p, v: jax.lax.scan(
      lambda c, _: (jax.lax.scan(lambda d, _: (jnp.tanh(d @ p["w"]), None), c, None,
                                 length=2)[0], None), v, None, length=2)[0]
  with pytest.raises(ValueError, match=r"\['w'\] is read inside scan > scan"):
    calibration.calibrate(nested, w, [x])


def test_bad_input():
  x = rand(50, (3, D))
  dense = lambda p, v: v @ p["w"]
  with pytest.raises(ValueError, match=r"batches: expected at least one batch"):
    calibration.calibrate(dense, {"w": rand(51, (D, 2))}, [])
  with pytest.raises(ValueError, match=r"prunable kernel \['unused'\] is never read"):
    calibration.calibrate(dense, {"w": rand(51, (D, 2)), "unused": rand(52, (2, 2))}, [x])
  embed = lambda p, ids: p["emb"][ids] @ p["w"]
  params = {"emb": rand(53, (7, D)), "w": rand(54, (D, 2))}
  ids = np.array([[1, 2], [3, 4]])
  assert list(calibration.calibrate(embed, params, [ids])) == ["['w']"]
  with pytest.raises(ValueError, match=r"kernels: \['emb'\] is never read by apply_fn as an "
                     "operand of a dot_general"):
    calibration.calibrate(embed, params, [ids], kernels=["['emb']"])
  with pytest.raises(ValueError, match=r"kernels: expected leaf paths .* got \['nope'\]"):
    calibration.calibrate(dense, {"w": rand(51, (D, 2))}, [x], kernels=["['nope']"])
  with pytest.raises(ValueError, match=r"kernels: \['w'\] is read by 2 sites with different"):
    calibration.calibrate(lambda p, v: v @ p["w"] + v @ p["w"].T, {"w": rand(55, (D, D))}, [x])
  bad = x.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"H of \['w'\] has NaN or inf"):
    calibration.calibrate(dense, {"w": rand(51, (D, 2))}, [bad])
  with pytest.raises(ValueError, match=r"token_mask: expected a mask broadcastable against the "
                     r"token dims \(2, 5\) of the input of \['dense'\]\['kernel'\], got shape"):
    calibration.calibrate(seq_model, SEQ_PARAMS, [seq_batch(0, [1, 2])],
                          token_mask=lambda b: np.ones((3, 5), bool))
  grouped = lambda p, v: jax.lax.conv_general_dilated(
      v, p["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=2)
  with pytest.raises(ValueError, match=r"\['w'\] cannot be calibrated: grouped or depthwise"):
    calibration.stages(grouped, {"w": rand(56, (3, 2, 4))}, rand(57, (1, 6, 4)))


def test_token_rows_keep_nonzero_weights_padded_to_a_block(monkeypatch):
  monkeypatch.setattr(calibration_step, "ROW_BLOCK", 2)
  rows, w = calibration_step.token_rows(np.array([[1, 0, 0.5], [0, 0, 1]], np.float32))
  np.testing.assert_array_equal(rows, [0, 2, 5, 0])
  np.testing.assert_array_equal(w, [1, 0.5, 1, 0])
  rows, w = calibration_step.token_rows(np.array([1, 1, 0, 1], np.float32))
  assert rows is None and w.tolist() == [1, 1, 0, 1]


def test_token_weights_broadcast_and_flatten():
  m = np.array([[1, 0, 1], [0, 1, 1]], bool)
  np.testing.assert_array_equal(calibration.token_weights(m, (2, 3), "k"), m)
  np.testing.assert_array_equal(calibration.token_weights(m[:, 0], (2, 3), "k"),
                                np.repeat(m[:, :1], 3, 1))
  np.testing.assert_array_equal(calibration.token_weights(m, (6,), "k"), m.ravel())


class Block(nn.Module):
  """Pre-norm attention (q, k, v, out) and a two-layer MLP."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q, k, v = (nn.DenseGeneral((2, 4), name=n)(h) for n in ("q", "k", "v"))
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    x = x + nn.DenseGeneral(8, axis=(-2, -1), name="o")(jnp.einsum("bhqk,bkhd->bqhd", a, v))
    return x + nn.Dense(8, name="down")(nn.gelu(nn.Dense(16, name="up")(nn.LayerNorm()(x))))


class Toy(nn.Module):
  depth: int = 2

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Block(name=f"b{i}")(x)
    return nn.Dense(3, name="head")(x)


def test_stages_two_block_transformer():
  x = jax.ShapeDtypeStruct((2, 5, 8), jnp.float32)
  params = jax.eval_shape(Toy().init, jax.random.key(0), x)
  got = calibration.stages(Toy().apply, params, x)
  name = lambda b, layer: f"['params']['{b}']['{layer}']['kernel']"
  want = []
  for b in ("b0", "b1"):
    want += [[name(b, "k"), name(b, "q"), name(b, "v")], [name(b, "o")], [name(b, "up")],
             [name(b, "down")]]
  assert got == want + [["['params']['head']['kernel']"]]
  assert calibration.stages(Toy().apply, params, x, [name("b1", "v"), name("b0", "up")]) == [
      [name("b0", "up")], [name("b1", "v")]]


def toy_mask(x):
  return np.abs(np.asarray(x)[..., 0]) < 1.0


def prune_half(path, w, stage):
  """Zeroes the smaller half of a stage's kernels (what pruning hands to the next stage)."""
  if jax.tree_util.keystr(path) not in stage:
    return w
  w = np.asarray(w)
  return jnp.asarray(np.where(np.abs(w) >= np.median(np.abs(w)), w, 0.0).astype(w.dtype))


def test_calibrator_resumes_stage_after_stage_and_compiles_per_block_structure(caplog):
  """Sequential calibration of a 3-block transformer, pruning each stage after calibrating it.

  Every stage equals a fresh calibration of the current model; the second block compiles only
  the segment entering it and the third block nothing.
  """
  model = Toy(depth=3)
  batches = [rand(60 + i, (2, 5, 8)) for i in range(2)]
  shapes = jax.eval_shape(model.init, jax.random.key(3), batches[0])
  dense = jax.tree.map(lambda s: jnp.asarray(rand(s.size, s.shape)), shapes)
  calibrator = calibration.Calibrator(model.apply, token_mask=toy_mask)
  fresh = calibration.Calibrator(model.apply, token_mask=toy_mask, resume=False)
  runs = []

  def check(current, batches, stage):
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
      got = calibrator(current, batches, kernels=stage, reference_params=dense)
    runs.append(sum("compilation of jit(run)" in m for m in caplog.messages))
    want = fresh(current, batches, reference_params=dense)
    assert list(got) == stage
    for path in stage:
      np.testing.assert_allclose(got[path].h, want[path].h, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got[path].cross, want[path].cross, rtol=1e-5, atol=1e-5)
      assert float(got[path].count) == float(want[path].count) > 0

  current = dense
  for k, stage in enumerate(calibration.stages(model.apply, dense, batches[0])):
    if k == 12:
      batches = [1.5 * b for b in batches]  # new batches: no kept state applies
    check(current, batches, stage)
    current = jax.tree_util.tree_map_with_path(
        lambda p, w, stage=stage: prune_half(p, w, stage), current)
  # A change upstream of every kept state (the first block's value projection).
  current = jax.tree_util.tree_map_with_path(
      lambda p, w: 2.0 * w if "b0']['v'" in jax.tree_util.keystr(p) else w, current)
  check(current, batches, stage)
  # Stages: b0 (k q v | o | up | down), b1, b2, head: one program per segment structure (the
  # head's runs from the start, the new batches having no state).
  assert runs == [1, 1, 1, 1] + [1, 0, 0, 0] + [0, 0, 0, 0] + [1, 0]


SHIFTS = [jnp.asarray(rand(70 + i, (D,))) for i in range(3)]


def shifted_model(p, x):
  """Layers alike but for the constants their jitted activations close over."""
  for w, c in zip((p["a"], p["b"], p["c"]), SHIFTS):
    x = jax.jit(lambda y, c=c: jnp.tanh(y + c))(x @ w)
  return x @ p["d"]


def test_calibrator_tells_apart_segments_differing_in_closed_over_constants():
  params = {k: rand(74 + i, (D, D)) for i, k in enumerate("abcd")}
  x = rand(78, (6, D))
  calibrator = calibration.Calibrator(shifted_model)
  rows = [x]
  for k in "abcd":
    got = calibrator(params, [x], kernels=[f"['{k}']"])[f"['{k}']"].h
    np.testing.assert_allclose(got, gram(rows[-1]), rtol=2e-5, atol=2e-5)
    if k != "d":
      rows.append(np.tanh(rows[-1] @ params[k] + np.asarray(SHIFTS["abc".index(k)])))


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxprune._src import calibration
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 6), np.float32),
              "b": rng.standard_normal((6, 3), np.float32)}
    fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    xs = [rng.standard_normal((16, 4), np.float32) for _ in range(2)]
    single = calibration.calibrate(fn, params, xs)
    positive = lambda x: x[:, 0] > 0
    masked = calibration.calibrate(fn, params, xs, token_mask=positive, reference_params=params)
    for kind in (AxisType.Auto, AxisType.Explicit):
      mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
      sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in xs]
      multi = calibration.calibrate(fn, params, sharded)
      multi_masked = calibration.Calibrator(fn, token_mask=positive)(
          params, sharded, reference_params=params)
      diag = calibration.calibrate(fn, params, sharded, diagonal=True)
      for k in single:
        np.testing.assert_allclose(multi[k].h, single[k].h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(diag[k].h, np.diagonal(single[k].h), rtol=1e-5, atol=1e-5)
        assert float(multi[k].count) == 32
        for name in ("h", "cross", "count"):
          np.testing.assert_allclose(getattr(multi_masked[k], name), getattr(masked[k], name),
                                     rtol=1e-5, atol=1e-5)
      hlo = jax.jit(calibration.gram).lower(sharded[0], sharded[0]).compile().as_text()
      assert "all-reduce" in hlo
    print("SHARDED OK")
""")


@pytest.mark.slow
def test_sharded_batches_give_single_device_h():
  """8 simulated CPU devices (a subprocess: the device count is fixed when JAX starts)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        timeout=300, env=env, cwd=ROOT)
  assert "SHARDED OK" in proc.stdout, proc.stderr[-3000:]
