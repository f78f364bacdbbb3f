"""Global selection on 8 (simulated) devices vs one device, and the bytes moved between devices.

For the same total number of scores, spread over a few kernels, prints side by side:

* ``1 device``: `jp.unstructured_mask` (global scope) on one device;
* ``8 dev, <layout>, sharded``: `jp.sharding.sharded_unstructured_mask` on a mesh of 8 devices, each
  holding 1/8 of every kernel (split by rows or by columns): per-shard histograms, ``psum``;
* ``8 dev, <layout>, GSPMD``: the plain `jp.unstructured_mask` jitted on the same sharded
  arrays, leaving the partitioning to XLA.

Bytes are read from the compiled HLO: the result sizes of every all-reduce / all-gather /
all-to-all / collective-permute, per device (the tie pass, a ``cond`` branch that runs only when
the threshold value is tied, is included, so this is an upper bound per call). All masks
are checked to be identical.

The 8 devices are simulated on the host CPU (``--xla_force_host_platform_device_count=8``), so
they share its cores: the timing shows the overhead of the sharded program, not a speed-up; on
real accelerators each device histograms only its 1/8.

  python benchmarks/sharded.py            # 2^22 and 2^25 scores
  python benchmarks/sharded.py --quick    # 2^20 scores
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxprune as jp  # noqa: E402
from _timing import best_time  # noqa: E402

_FRACTIONS = (0.5, 0.3, 0.15, 0.05)
_COLS = 512
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def make_scores(total: int, shards: int) -> dict:
  """A few (rows, 512) kernels, rows a multiple of ``shards``, ~``total`` entries together."""
  rng = np.random.default_rng(0)
  out = {}
  for i, f in enumerate(_FRACTIONS):
    rows = max(shards, int(total * f) // _COLS // shards * shards)
    out[f"layer{i}"] = np.abs(rng.standard_normal((rows, _COLS), np.float32))
  return out


def collective_bytes(hlo: str) -> tuple[int, int, int]:
  """(number of collectives, bytes of all-reduce results, bytes of other collectives' results)."""
  # A collective yields one array or, when XLA combines several, a tuple of them.
  pattern = (r"= (\([^)]*\)|\w+\[[\d,]*\]\S*) (all-gather|all-reduce|all-to-all|"
             r"collective-permute|reduce-scatter)\(")
  count, reduce_bytes, other_bytes = 0, 0, 0
  for m in re.finditer(pattern, hlo):
    count += 1
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
      if m.group(2) == "all-reduce":
        reduce_bytes += n * _BYTES.get(dtype, 4)
      else:
        other_bytes += n * _BYTES.get(dtype, 4)
  return count, reduce_bytes, other_bytes


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="only 2^20 scores")
  ap.add_argument("--sparsity", type=float, default=0.9)
  args = ap.parse_args()
  sizes = [2**20] if args.quick else [2**22, 2**25]
  repeats = 2 if args.quick else 3
  s = args.sparsity
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 simulated devices, got {len(devices)}"
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  layouts = {"rows": P("model", None), "cols": P(None, "model")}
  print(f"{os.cpu_count()} host cores; jax {jax.__version__}; 8 simulated CPU devices; global "
        f"scope, sparsity {s}; time: best of {repeats}; bytes: collective results per device;\n"
        f"layout rows = P('model', None) (kernels split by rows), cols = P(None, 'model')\n")
  header = (f"{'scores':>11} | {'variant':<22} {'time':>9} {'compile':>8} {'collectives':>11} "
            f"{'all-reduce B':>13} {'all-gather B':>13}")
  print(header)
  print("-" * len(header))

  single = jax.jit(lambda t: jp.unstructured_mask(t, s, scope="global"))
  for n in sizes:
    scores = make_scores(n, 8)
    total = sum(x.size for x in scores.values())
    variants = [("1 device", single, jax.device_put(scores, devices[0]))]
    for layout, spec in layouts.items():
      sharded = jax.device_put(scores, NamedSharding(mesh, spec))
      specs = {k: spec for k in scores}
      ours = jax.jit(lambda t, specs=specs: jp.sharding.sharded_unstructured_mask(
          t, s, mesh, scope="global", specs=specs))
      variants += [(f"8 dev, {layout}, sharded", ours, sharded),
                   (f"8 dev, {layout}, GSPMD", single, sharded)]
    results = []
    for name, fn, x in variants:
      t0 = time.perf_counter()
      compiled = fn.lower(x).compile()
      t_compile = time.perf_counter() - t0
      count, red, other = collective_bytes(compiled.as_text())
      t_run = best_time(compiled, x, repeats=repeats)
      results.append(jax.tree.map(np.asarray, compiled(x)))
      print(f"{total:>11,} | {name:<22} {t_run:>8.4f}s {t_compile:>7.2f}s {count:>11} "
            f"{red:>13,} {other:>13,}")
    for r in results[1:]:
      for k in scores:
        assert np.array_equal(r[k], results[0][k]), f"masks differ on {k}"
    pruned = sum(int((~m).sum()) for m in results[0].values())
    assert pruned == round(s * total), (pruned, round(s * total))
  print("\nmasks identical across all variants. jaxprune's sharded selection moves only 2^16-bin "
        "int32 histograms (256 KiB each) whatever the parameter size; under GSPMD the plain "
        "function's all-gathers grow with the parameters.")


if __name__ == "__main__":
  main()
