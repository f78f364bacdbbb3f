"""Sharded masks, data x model parallel training, data-parallel Hessians, two processes.

The multi-device checks need 8 CPU devices, which must be configured before JAX starts, while
the rest of the suite runs with one device in this process: they live in
`tests/_sharding_checks.py`, run once in a subprocess (one compile-heavy script), and each named
check is a test here. The two-process check launches `tests/_sharding_multiprocess.py` twice.
Argument validation runs in-process on a one-device mesh.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxprune as jp
from jaxprune._src import sharding as sh_lib
import reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHECK_NAMES = [
    "global_bit_identical_ties_nan",
    "global_random_trials",
    "elementwise_scores_read_per_block",
    "masks_keep_sharding",
    "layer_scope_per_leaf_sparsity_traced",
    "hlo_histograms_only",
    "explicit_axes",
    "uneven_sharding_error",
    "train_step_data_model_parallel",
    "hessian_model_sharded_params_in_shard_map",
]
# The compile-heaviest checks run in the slow set, in a second subprocess.
SLOW_CHECK_NAMES = [
    "chunked_blocks_bit_identical",
    "eager_concrete_sparsity_and_prunable",
    "plain_unstructured_mask_gathers_under_gspmd",
    "prune_mask_fn_gather_free",
    "hessian_data_parallel",
]


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_pair(tmp_path_factory):
  """Starts the two-process run; it proceeds in the background while the 8-device checks run
  (compilation is single-threaded, so the two overlap on a multi-core machine)."""
  port = _free_port()
  script = os.path.join(HERE, "_sharding_multiprocess.py")
  tmp = tmp_path_factory.mktemp("pair")
  outs = [tmp / f"p{i}.npz" for i in range(2)]
  logs = [open(tmp / f"p{i}.log", "w+") for i in range(2)]  # files: a full pipe would block
  procs = [subprocess.Popen([sys.executable, script, str(i), "2", str(port), str(outs[i])],
                            stdout=logs[i], stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
           for i in range(2)]
  yield procs, outs, logs
  for p, log in zip(procs, logs):
    if p.poll() is None:
      p.kill()
      p.wait()
    log.close()


def _run_checks(names: list[str]) -> dict:
  proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharding_checks.py"), *names],
                        capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  if proc.returncode or not lines:
    pytest.fail(f"_sharding_checks.py failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def device_checks(process_pair) -> dict:
  del process_pair  # started first, to run alongside
  return _run_checks(CHECK_NAMES)


@pytest.fixture(scope="module")
def slow_device_checks() -> dict:
  return _run_checks(SLOW_CHECK_NAMES)


def test_every_check_ran(device_checks):
  assert sorted(device_checks) == sorted(CHECK_NAMES)
  # every check the script defines is in one of the two lists
  text = open(os.path.join(HERE, "_sharding_checks.py")).read()
  defined = {line[len("def check_"):].split("(")[0] for line in text.splitlines()
             if line.startswith("def check_")}
  assert defined == set(CHECK_NAMES) | set(SLOW_CHECK_NAMES)


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_eight_devices(device_checks, name):
  result = device_checks.get(name, "missing from the subprocess results")
  assert result == "ok", result


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CHECK_NAMES)
def test_eight_devices_slow(slow_device_checks, name):
  result = slow_device_checks.get(name, "missing from the subprocess results")
  assert result == "ok", result


def test_two_processes_agree(process_pair):
  procs, outs, logs = process_pair
  for i, (p, log) in enumerate(zip(procs, logs)):
    p.wait(timeout=180)
    log.seek(0)
    assert p.returncode == 0, f"process {i} failed:\n{log.read()[-4000:]}"

  sys.path.insert(0, HERE)
  import _sharding_multiprocess as mp  # noqa: PLC0415 - shapes and values, no JAX work at import

  values = mp.scores()
  names = sorted(values)
  k = round(mp.SPARSITY * sum(values[n].size for n in names))
  want = dict(zip(names, reference.prune_lowest([values[n] for n in names], k)))
  single = jp.unstructured_mask(values, mp.SPARSITY, scope="global")
  results = [np.load(o) for o in outs]
  for name in names:
    for r in results:
      np.testing.assert_array_equal(r[f"gathered_{name}"], ~want[name], err_msg=name)
      np.testing.assert_array_equal(r[f"alone_{name}"], np.asarray(single[name]), err_msg=name)
    np.testing.assert_array_equal(results[0][f"gathered_{name}"], results[1][f"gathered_{name}"])


# --- in-process: one device ---------------------------------------------------------------------

@functools.cache
def _mesh1():
  # built lazily: creating a mesh at collection time would start JAX's backend early
  return jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])


def _scores():
  rng = np.random.default_rng(0)
  return {"w": rng.integers(0, 3, (4, 6)).astype(np.float32), "b": np.ones(6, np.float32)}


def test_one_device_mesh_matches_unsharded():
  scores = _scores()
  x = jax.device_put(scores, NamedSharding(_mesh1(), P()))
  got = jp.sharding.sharded_unstructured_mask(x, 0.5, _mesh1(), scope="global")
  want = reference.prune_lowest([scores["w"]], 12)[0]
  np.testing.assert_array_equal(np.asarray(got["w"]), ~want)
  assert np.asarray(got["b"]).all()
  assert got["w"].sharding.is_equivalent_to(NamedSharding(_mesh1(), P()), 2)


def test_traced_auto_axes_need_specs():
  with pytest.raises(ValueError, match=r"specs: the sharding of leaf \['b'\]"):
    jax.jit(lambda s: jp.sharding.sharded_unstructured_mask(s, 0.5, _mesh1()))(_scores())
  # with specs it traces fine
  fn = jax.jit(lambda s: jp.sharding.sharded_unstructured_mask(s, 0.5, _mesh1(), specs=P()))
  assert jax.eval_shape(fn, _scores())["w"].dtype == jnp.bool_


def test_spec_errors_name_the_leaf():
  with pytest.raises(ValueError, match=r"leaf \['w'\] is sharded over 'data'"):
    jp.sharding.sharded_unstructured_mask(_scores(), 0.5, _mesh1(),
                                          specs={"w": P("data"), "b": P()})
  with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(6,\), got the longer spec"):
    jp.sharding.sharded_unstructured_mask(_scores(), 0.5, _mesh1(), specs=P(None, "model"))
  with pytest.raises(ValueError, match="specs: expected a PartitionSpec"):
    jp.sharding.sharded_unstructured_mask(_scores(), 0.5, _mesh1(), specs={"w": P()})
  with pytest.raises(ValueError, match="mesh: expected a jax.sharding.Mesh"):
    jp.sharding.sharded_unstructured_mask(_scores(), 0.5)
  with pytest.raises(ValueError, match=r"sparsity: expected a fraction in \[0, 1\], got 1.5"):
    jp.sharding.sharded_unstructured_mask(_scores(), 1.5, _mesh1(), scope="global")
  with pytest.raises(ValueError, match="scope"):
    jp.sharding.sharded_unstructured_mask(_scores(), 0.5, _mesh1(), scope="all")


def test_resolve_specs_reads_arrays_and_prefixes():
  x = jax.device_put(_scores(), NamedSharding(_mesh1(), P("model")))
  mesh, specs = sh_lib.resolve_specs(x)
  assert mesh.shape == _mesh1().shape
  assert specs == {"w": P("model"), "b": P("model")}
  _, specs = sh_lib.resolve_specs({"a": _scores(), "c": np.ones((2, 2))}, _mesh1(),
                              {"a": P("model"), "c": NamedSharding(_mesh1(), P(None, "model"))})
  assert specs == {"a": {"w": P("model"), "b": P("model")}, "c": P(None, "model")}


def test_state_shardings_param_shaped_leaves_follow_params():
  params = {"w": np.ones((4, 6), np.float32), "b": np.zeros(6, np.float32)}
  mesh = _mesh1()
  shardings = {"w": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P("model"))}
  tx = optax.chain(optax.adam(1e-3), jp.prune(0.5, "obd", average_hessian=True))
  got = jp.sharding.state_shardings(tx, params, shardings)
  adam, pstate = got[0][0], got[1]
  replicated = NamedSharding(_mesh1(), P())
  assert adam.mu == shardings and adam.nu == shardings and pstate.masks == shardings
  assert adam.count == replicated and pstate.count == replicated and pstate.key == replicated
  # Hessian sums hold a scalar placeholder on the unprunable bias: replicated, not P('model')
  assert pstate.hess_sum == {"w": shardings["w"], "b": replicated}
  assert jax.tree.structure(got) == jax.tree.structure(jax.eval_shape(tx.init, params))


def test_data_parallel_hessian_validates():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
  loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
  params = {"w": np.ones((3, 2), np.float32)}
  with pytest.raises(ValueError, match="batch_axis: expected mesh axes among"):
    jp.sharding.data_parallel_hessian_diag(loss, params, np.ones((4, 3)), key=jax.random.key(0),
                                  mesh=mesh, batch_axis="batch")
  with pytest.raises(ValueError, match="must have a leading dimension divisible"):
    jp.sharding.data_parallel_hessian_diag(loss, params, np.float32(1.0), key=jax.random.key(0),
                                  mesh=mesh)
  x = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
  got = jp.sharding.data_parallel_hessian_diag(loss, params, x, key=jax.random.key(0), mesh=mesh,
                                      num_probes=2)
  # one shard: exactly the plain estimate with the same probes
  want = jp.hessian_diag(loss, params, x, key=jax.random.key(0), num_probes=2)
  np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)


def test_data_parallel_hessian_places_an_unsharded_batch_on_the_mesh():
  # jax.make_mesh gives Explicit axes, under which shard_map refuses an unsharded operand.
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  loss_fn = lambda p, c: 0.5 * jnp.mean(jnp.sum(c * p["w"] ** 2, axis=(1, 2)))
  c = jnp.stack([jnp.ones((2, 3)), 3 * jnp.ones((2, 3))])
  h = jp.sharding.data_parallel_hessian_diag(loss_fn, {"w": jnp.ones((2, 3))}, c,
                                             key=jax.random.key(0), mesh=mesh)
  np.testing.assert_allclose(np.asarray(h["w"]), np.full((2, 3), 2.0), rtol=1e-6)
