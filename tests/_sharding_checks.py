"""Multi-device checks for jaxprune's sharding support, run in a subprocess with 8 CPU devices.

`tests/test_sharding.py` runs this script once (the device count must be set before JAX
initializes, and the rest of the suite runs with one device) and turns each named check into a
test. Each check raises AssertionError on failure; the script prints one JSON line
``RESULTS {name: "ok" | traceback}``. Run by hand: ``python tests/_sharding_checks.py [names]``.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune._src import select  # noqa: E402
from jaxprune._src import sharding as sh  # noqa: E402
from jaxprune._src.schedules import polynomial_schedule  # noqa: E402
from jaxprune._src.transform import prune  # noqa: E402

AUTO = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
EXPLICIT = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

# One tree exercising every layout: a dimension split over one axis, over two axes, two sharded
# dimensions, a fully replicated kernel, and an unprunable (1-D) leaf.
SHAPES = {"col": (12, 16), "row": (16, 6), "cube": (4, 3, 8), "rep": (5, 4), "bias": (16,)}
SPECS = {"col": P(None, "model"), "row": P(("data", "model"), None),
         "cube": P("data", None, "model"), "rep": P(), "bias": P("model")}
FULL = 12 * 16 + 16 * 6 + 4 * 3 * 8 + 5 * 4  # prunable entries
SPARSITIES = (0.0, 0.37, 0.5, 0.9, 1.0)

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn):
  CHECKS[fn.__name__.removeprefix("check_")] = fn
  return fn


def tie_scores(seed: int) -> dict[str, np.ndarray]:
  """Few distinct values (many ties), NaN, ±0 and ±inf."""
  rng = np.random.default_rng(seed)
  values = np.array([-1.0, -0.0, 0.0, 1.0, 2.0, np.inf, -np.inf, np.nan], np.float32)
  p = np.array([2, 3, 3, 6, 6, 1, 1, 2], np.float64)
  return {k: rng.choice(values, size=s, p=p / p.sum()).astype(np.float32)
          for k, s in SHAPES.items()}


def same_layout(x, mesh, spec) -> bool:
  return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def put(tree, mesh, specs=SPECS):
  return jax.device_put(tree, {k: NamedSharding(mesh, specs[k]) for k in tree})


def numpy_global(scores, sparsity):
  names = [k for k in sorted(scores) if scores[k].ndim >= 2]
  k = round(sparsity * sum(scores[n].size for n in names))
  pruned = reference.prune_lowest([scores[n] for n in names], k)
  out = {n: ~p for n, p in zip(names, pruned)}
  out.update({n: np.ones(v.shape, bool) for n, v in scores.items() if v.ndim < 2})
  return out


def collectives(hlo: str) -> list[tuple[str, str, int]]:
  """(op, dtype, elements) of every array a collective in an HLO module text produces.

  A combined collective (a tuple of arrays, as XLA emits when it merges several) contributes
  one entry per array.
  """
  out = []
  pattern = (r"= (\([^)]*\)|\w+\[[\d,]*\]\S*) (all-gather|all-reduce|all-to-all|"
             r"collective-permute|reduce-scatter)\(")
  for m in re.finditer(pattern, hlo):
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
      out.append((m.group(2), dtype, n))
  return out


_global_auto = jax.jit(
    lambda s, sp: sh.sharded_unstructured_mask(s, sp, AUTO, scope="global", specs=SPECS))
_global_ref = jax.jit(lambda s, sp: jp.unstructured_mask(s, sp, scope="global"))


@check
def check_global_bit_identical_ties_nan():
  for seed in range(3):
    scores = tie_scores(seed)
    sharded = put(scores, AUTO)
    for s in SPARSITIES:
      got = _global_auto(sharded, s)
      ref = _global_ref(scores, s)
      want = numpy_global(scores, s)
      for k in scores:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=f"{k} s={s}")
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f"{k} s={s}")
      pruned = sum(int((~np.asarray(got[k])).sum()) for k in scores)
      assert pruned == round(s * FULL), (pruned, s)


@check
def check_global_random_trials():
  # Same compiled function, many value sets: random ties, NaN and sparsities.
  rng = np.random.default_rng(7)
  for trial in range(12):
    scores = {k: rng.integers(-3, 4, s).astype(np.float32) for k, s in SHAPES.items()}
    for v in scores.values():
      v[rng.random(v.shape) < 0.05] = np.nan
    s = float(rng.random())
    got = _global_auto(put(scores, AUTO), s)
    want = numpy_global(scores, s)
    for k in scores:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f"trial {trial} {k}")


@check
def check_chunked_blocks_bit_identical():
  # Blocks longer than a (patched, tiny) chunk go through the selection's chunk loop, with
  # positions computed per chunk from flat indices into each block.
  saved = select._CHUNK
  select._CHUNK = 5
  sh._sharded_selection.cache_clear()
  try:
    for scope in ("global", "layer"):
      fn = jax.jit(lambda s, sp, scope=scope: sh.sharded_unstructured_mask(
          s, sp, AUTO, scope=scope, specs=SPECS))
      for seed in (5, 6):
        scores = tie_scores(seed)
        for s in (0.37, 0.9):
          got = fn(put(scores, AUTO), s)
          if scope == "global":
            want = numpy_global(scores, s)
          else:
            want = {k: ~reference.prune_lowest([v], round(s * v.size))[0] if v.ndim >= 2 else
                    np.ones(v.shape, bool) for k, v in scores.items()}
          for k in scores:
            np.testing.assert_array_equal(np.asarray(got[k]), want[k],
                                          err_msg=f"{scope} {k} s={s}")
  finally:
    select._CHUNK = saved
    sh._sharded_selection.cache_clear()


@check
def check_elementwise_scores_read_per_block():
  # Scores a - b computed on each device from its blocks of a and b; the layout is read from
  # the operands' shardings (no specs), eagerly.
  a, b = tie_scores(3), tie_scores(4)
  pa, pb = put(a, AUTO), put(b, AUTO)
  lazy = {k: jp.Elementwise(jnp.subtract, (pa[k], pb[k])) for k in a}
  for s in (0.37, 0.9):
    got = sh.sharded_unstructured_mask(lazy, s, AUTO, scope="global")
    want = numpy_global({k: a[k] - b[k] for k in a}, s)
    for k in a:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=f"{k} s={s}")
      assert same_layout(got[k], AUTO, SPECS[k]), (k, got[k].sharding)


@check
def check_masks_keep_sharding():
  got = _global_auto(put(tie_scores(0), AUTO), 0.5)
  for k, spec in SPECS.items():
    assert same_layout(got[k], AUTO, spec), (k, got[k].sharding)
    assert got[k].dtype == jnp.bool_


_layer_auto = jax.jit(
    lambda s, sp: sh.sharded_unstructured_mask(s, sp, AUTO, scope="layer", specs=SPECS))
_LAYER_SPARSITIES = {"col": 0.3, "row": 0.55, "cube": 1.0, "rep": 0.5, "bias": 0.0}


@check
def check_layer_scope_per_leaf_sparsity_traced():
  ref_fn = jax.jit(lambda s, sp: jp.unstructured_mask(s, sp, scope="layer"))
  scores = tie_scores(1)
  sparsities = _LAYER_SPARSITIES
  got = _layer_auto(put(scores, AUTO), sparsities)
  ref = ref_fn(scores, sparsities)
  for k in scores:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
    if scores[k].ndim >= 2:
      want = reference.unit_keep(scores[k].ravel(), sparsities[k]).reshape(scores[k].shape)
      np.testing.assert_array_equal(np.asarray(got[k]), want, err_msg=k)
    assert same_layout(got[k], AUTO, SPECS[k]), (k, got[k].sharding)


@check
def check_eager_concrete_sparsity_and_prunable():
  # Eager call: specs read from the arrays; a predicate drops the replicated kernel.
  scores = tie_scores(2)
  keep_rep = lambda path, x: x.ndim >= 2 and "rep" not in jax.tree_util.keystr(path)
  got = sh.sharded_unstructured_mask(put(scores, AUTO), 0.4, scope="global", prunable=keep_rep)
  ref = jax.jit(lambda s: jp.unstructured_mask(s, 0.4, scope="global", prunable=keep_rep))(scores)
  for k in scores:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
    assert same_layout(got[k], AUTO, SPECS[k]), (k, got[k].sharding)
  assert np.asarray(got["rep"]).all()


@check
def check_hlo_histograms_only():
  hlo = _global_auto.lower(put(tie_scores(0), AUTO), 0.5).compile().as_text()
  ops = collectives(hlo)
  kinds = sorted({op for op, _, _ in ops})
  assert kinds == ["all-reduce"], ops
  # two radix passes on the scores, two on positions (tie pass): 2^16 counts each, nothing more
  assert all(n == 65536 and dt == "s32" for _, dt, n in ops), ops
  assert len(ops) == 4, ops
  ops = collectives(
      _layer_auto.lower(put(tie_scores(0), AUTO), _LAYER_SPARSITIES).compile().as_text())
  assert {op for op, _, _ in ops} == {"all-reduce"}, ops
  assert all(n == 65536 and dt == "s32" for _, dt, n in ops), ops
  assert len(ops) <= 4 * 4, ops  # at most 4 histograms per prunable leaf


@check
def check_plain_unstructured_mask_gathers_under_gspmd():
  # Documented in docs/sharding.md: under GSPMD the plain function is correct but XLA
  # all-gathers full-size arrays around the histogram scatter (hence the sharded variant).
  scores = put(tie_scores(0), AUTO)
  hlo = _global_ref.lower(scores, 0.5).compile().as_text()
  sizes = {int(np.prod(s)) for k, s in SHAPES.items() if k != "bias"}
  gathered = [n for op, _, n in collectives(hlo) if op == "all-gather"]
  assert any(n in sizes for n in gathered), collectives(hlo)
  got = _global_ref(scores, 0.5)
  want = numpy_global(tie_scores(0), 0.5)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
  # ...but when every leaf is split along its leading dimension only, the row-major flattening
  # stays a contiguous split and XLA partitions the histogram scatter itself: no all-gather.
  rows = {k: P("model") if k != "rep" else P() for k in SPECS}
  hlo = _global_ref.lower(put(tie_scores(0), AUTO, rows), 0.5).compile().as_text()
  ops = collectives(hlo)
  assert ops and {op for op, _, _ in ops} == {"all-reduce"}, ops
  # Histograms, plus the scalars the selection's ordering tokens read (the first bin of a
  # leaf's first chunk, in `select._histogram`): 4 bytes each, nothing parameter-sized.
  assert all(n in (65536, 1) for _, _, n in ops), ops
  assert sum(n == 65536 for _, _, n in ops) >= 4, ops


@check
def check_explicit_axes():
  scores = tie_scores(0)
  sharded = put(scores, EXPLICIT)
  # specs come from the traced values' types under Explicit axes
  fn = jax.jit(lambda s, sp: sh.sharded_unstructured_mask(s, sp, EXPLICIT, scope="global"))
  got = fn(sharded, 0.37)
  want = numpy_global(scores, 0.37)
  for k in scores:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    assert same_layout(got[k], EXPLICIT, SPECS[k]), (k, got[k].sharding)
  try:
    jax.jit(lambda s: jp.unstructured_mask(s, 0.37, scope="global"))(sharded)
  except Exception as e:  # noqa: BLE001 - documents the current behaviour of the plain function
    assert "reshape" in str(e), e
  else:
    raise AssertionError("plain unstructured_mask now accepts Explicit-sharded inputs: update "
                         "docs/sharding.md")


@check
def check_uneven_sharding_error():
  x = {"w": np.ones((6, 4), np.float32)}
  try:
    sh.sharded_unstructured_mask(x, 0.5, AUTO, specs={"w": P("model")})
  except ValueError as e:
    assert "['w']" in str(e) and "multiple of the 4 shards" in str(e), e
  else:
    raise AssertionError("expected a ValueError for 6 rows over 4 shards")


# --- training: data x model parallel -----------------------------------------------------------

MLP_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}


def mlp_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(8, 16)).astype(np.float32), "b1": np.zeros(16, np.float32),
            "w2": rng.normal(size=(16, 4)).astype(np.float32)}
  batch = (rng.normal(size=(32, 8)).astype(np.float32), rng.integers(0, 4, 32))
  return params, batch


def mlp_loss(p, batch):
  x, y = batch
  logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@check
def check_train_step_data_model_parallel():
  params, batch = mlp_problem()
  shard = {k: NamedSharding(AUTO, s) for k, s in MLP_SPECS.items()}
  batch_sharding = NamedSharding(AUTO, P("data"))
  tx = optax.chain(optax.adam(1e-2),
                   prune(polynomial_schedule(0.0, 0.75, 0, 4, frequency=2), scope="global"))

  def step(p, s, b):
    loss, g = jax.value_and_grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state_sh = sh.state_shardings(tx, params, shard)
  p = jax.device_put(params, shard)
  s = jax.jit(tx.init, out_shardings=state_sh)(p)
  train = jax.jit(step, in_shardings=(shard, state_sh, batch_sharding),
                  out_shardings=(shard, state_sh, None), donate_argnums=(0, 1))
  b = jax.device_put(batch, batch_sharding)
  for _ in range(6):
    p, s, _ = train(p, s, b)
  adam, prune_state = s[0][0], s[1]
  for k, spec in MLP_SPECS.items():
    for leaf in (p[k], adam.mu[k], adam.nu[k], prune_state.masks[k]):
      assert same_layout(leaf, AUTO, spec), (k, leaf.sharding)
  assert same_layout(prune_state.count, AUTO, P())
  masks = {k: np.asarray(v) for k, v in prune_state.masks.items()}
  assert (~masks["w1"]).sum() + (~masks["w2"]).sum() == round(0.75 * (8 * 16 + 16 * 4))
  assert masks["b1"].all()
  for k in ("w1", "w2"):
    assert np.all(np.asarray(p[k])[~masks[k]] == 0), k

  # the same steps on one device: same masks, same params up to summation order
  pu, su = params, tx.init(params)
  single = jax.jit(step)
  for _ in range(6):
    pu, su, _ = single(pu, su, batch)
  for k in MLP_SPECS:
    np.testing.assert_array_equal(masks[k], np.asarray(su[1].masks[k]), err_msg=k)
    np.testing.assert_allclose(np.asarray(p[k]), np.asarray(pu[k]), rtol=1e-5, atol=1e-6)


@check
def check_prune_mask_fn_gather_free():
  # With the sharded selection as `jp.prune`'s mask_fn the whole train step has no all-gather.
  params, batch = mlp_problem()
  shard = {k: NamedSharding(AUTO, s) for k, s in MLP_SPECS.items()}
  batch_sharding = NamedSharding(AUTO, P("data"))
  masks = []
  for mask_fn in (None, functools.partial(sh.sharded_unstructured_mask, mesh=AUTO,
                                          specs=MLP_SPECS)):
    tx = optax.chain(optax.adam(1e-2), prune(polynomial_schedule(0.0, 0.75, 0, 4, frequency=2),
                                             scope="global", pattern=mask_fn or "unstructured"))

    def step(p, s, b, tx=tx):
      g = jax.grad(mlp_loss)(p, b)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    state_sh = sh.state_shardings(tx, params, shard)
    p = jax.device_put(params, shard)
    s = jax.jit(tx.init, out_shardings=state_sh)(p)
    train = jax.jit(step, in_shardings=(shard, state_sh, batch_sharding),
                    out_shardings=(shard, state_sh))
    b = jax.device_put(batch, batch_sharding)
    if mask_fn is not None:
      ops = collectives(train.lower(p, s, b).compile().as_text())
      assert "all-gather" not in {op for op, _, _ in ops}, ops
    for _ in range(6):
      p, s = train(p, s, b)
    masks.append({k: np.asarray(v) for k, v in s[1].masks.items()})
  for k in MLP_SPECS:
    np.testing.assert_array_equal(masks[0][k], masks[1][k], err_msg=k)


# --- Hessian under data parallelism ------------------------------------------------------------


@check
def check_hessian_data_parallel():
  params, batch = mlp_problem(1)
  key = jax.random.key(3)
  x, y = batch
  # Each half of the batch alone estimates a different diagonal (same probes: same key); the
  # Hessian of the mean loss is the mean of the halves' Hessians.
  estimate = jax.jit(lambda p, b: jp.hessian_diag(mlp_loss, p, b, key=key, num_probes=4))
  h0 = estimate(params, (x[:16], y[:16]))
  h1 = estimate(params, (x[16:], y[16:]))
  assert np.max(np.abs(np.asarray(h0["w1"]) - np.asarray(h1["w1"]))) > 1e-2
  ref = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, h0, h1)
  p = put(params, AUTO, MLP_SPECS)
  b = jax.device_put(batch, NamedSharding(AUTO, P("data")))

  # (1) plain jit: GSPMD differentiates the global mean loss, so the estimate is global
  gspmd = jax.jit(lambda p, b: jp.hessian_diag(mlp_loss, p, b, key=key, num_probes=4))(p, b)
  # (2) shard_map over 'data': per-shard HVPs, pmean
  dp = jax.jit(lambda p, b: jp.sharding.data_parallel_hessian_diag(
      mlp_loss, p, b, key=key, mesh=AUTO, batch_axis="data", num_probes=4))(p, b)
  for k in params:
    np.testing.assert_allclose(np.asarray(gspmd[k]), ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(dp[k]), ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert same_layout(dp[k], AUTO, MLP_SPECS[k]), (k, dp[k].sharding)  # model-sharded, no 'data'

  # OBD masks from the averaged estimate: every replica holds the same mask bits
  obd = jax.jit(lambda p, h: sh.sharded_unstructured_mask(
      jp.obd(p, h), 0.5, AUTO, scope="global", specs=MLP_SPECS))(p, dp)
  for k in ("w1", "w2"):
    shards: dict = {}
    for piece in obd[k].addressable_shards:
      shards.setdefault(str(piece.index), []).append(np.asarray(piece.data))
    assert any(len(v) == 2 for v in shards.values()), k  # replicated over 'data'
    for copies in shards.values():
      for c in copies[1:]:
        np.testing.assert_array_equal(c, copies[0])
  want = _global_ref(jp.obd(params, jax.tree.map(np.asarray, dp)), 0.5)
  for k in params:
    np.testing.assert_array_equal(np.asarray(obd[k]), np.asarray(want[k]), err_msg=k)


@check
def check_hessian_model_sharded_params_in_shard_map():
  # Probes drawn from a replicated key are tangents of params that vary over 'model': the
  # estimator must type them as varying. The loss is separable with a diagonal Hessian
  # 2·c_j·Σ_b x_bi², which every Rademacher probe recovers exactly.
  w = jax.random.normal(jax.random.key(5), (6, 8))
  x = jax.random.normal(jax.random.key(6), (16, 6))
  c = jnp.arange(1.0, 9.0)
  loss = lambda p, x, c: jnp.sum(jnp.sum(x * x, 0)[:, None] * c * p ** 3 / 3 + c * p ** 2)
  sharded = jax.jit(jax.shard_map(
      lambda p, x, c: jp.hessian_diag(loss, p, x, c, key=jax.random.key(2), num_probes=3),
      mesh=AUTO, in_specs=(P(None, "model"), P(), P("model")), out_specs=P(None, "model")))(
          w, x, c)
  exact = 2 * jnp.sum(x * x, 0)[:, None] * c * w + 2 * c
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(exact), rtol=1e-5)


def main(names: list[str]) -> None:
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for name in names or list(CHECKS):
    start = time.perf_counter()
    try:
      CHECKS[name]()
      results[name] = "ok"
    except Exception:  # noqa: BLE001 - reported per check to the parent test
      results[name] = traceback.format_exc()
    print(f"{name}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
  print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
