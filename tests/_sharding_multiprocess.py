"""One process of the two-process check in `tests/test_sharding.py`.

Usage: ``python tests/_sharding_multiprocess.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``.

Each process owns 2 CPU devices; `jax.distributed.initialize` joins them into one 2x2 mesh
(CPU collectives: gloo, the default of ``jax_cpu_collectives_implementation``). The scores are
built from a seeded numpy generator, each process supplies only the blocks its devices hold, the
global masks are computed with `sharded_unstructured_mask`, gathered to every host and saved
next to the masks each process computes alone on one device.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxprune as jp

SHAPES = {"a": (8, 12), "b": (12, 4), "c": (6, 4)}
SPECS = {"a": P(None, "model"), "b": P(("data", "model"), None), "c": P()}
SPARSITY = 0.45


def scores() -> dict[str, np.ndarray]:
  """Integer-valued scores (many ties) with NaNs; identical in every process."""
  rng = np.random.default_rng(11)
  out = {k: rng.integers(-2, 3, s).astype(np.float32) for k, s in SHAPES.items()}
  out["a"][1, ::3] = np.nan
  return out


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
  # Before any JAX computation (the test imports this module for `scores` without calling main).
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)
  assert jax.process_count() == num_processes and jax.local_device_count() == 2
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  values = scores()
  sharded = {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, SPECS[k]),
                                             lambda idx, v=v: v[idx])
             for k, v in values.items()}
  fn = jax.jit(lambda s: jp.sharding.sharded_unstructured_mask(s, SPARSITY, mesh, scope="global",
                                                      specs=SPECS))
  masks = fn(sharded)
  gathered = multihost_utils.process_allgather(masks, tiled=True)
  # this process alone, on one of its own devices, without any sharding
  local = jax.device_put(values, jax.local_devices()[0])
  alone = jax.jit(lambda s: jp.unstructured_mask(s, SPARSITY, scope="global"))(local)
  np.savez(out_path, **{f"gathered_{k}": np.asarray(v) for k, v in gathered.items()},
           **{f"alone_{k}": np.asarray(v) for k, v in alone.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
