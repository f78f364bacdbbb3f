"""Adversarial inputs for the public functions outside the core pipeline.

Every case gives the documented result or a `ValueError` / `TypeError` whose message names the
argument (and the leaf, where one leaf is at fault): never a deep JAX or numpy error, never a
silent wrong answer. Cases are tiny and run eagerly.
"""

import pickle
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune._src import progress, quantize, scalars
from jaxprune._src.sensitivity import SensitivityResult

KEY = jax.random.PRNGKey(0)


def params():
  return {"w": jnp.asarray([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]]), "b": jnp.ones(3)}


def sens(metrics=((1.0, 0.9, 0.5),), baseline=1.0, paths=("['w']",), sizes=(6,)):
  return SensitivityResult(paths, sizes, np.array([0.0, 0.5, 1.0]), np.array(metrics), baseline)


class Case(NamedTuple):
  name: str
  fn: Callable[[Any], Any]  # takes pytest's tmp_path
  error: Optional[type] = ValueError
  match: str = ""


def raises(name, fn, match, error=ValueError):
  return Case(name, fn, error, match)


def works(name, fn):
  """A documented result; ``fn`` asserts it."""
  return Case(name, fn, None)


# --- scores ------------------------------------------------------------------------------------

def _empty_and_0d(_):
  out = jp.magnitude({"e": jnp.zeros((0, 3)), "s": jnp.float32(-2.0)})
  assert out["e"].shape == (0, 3) and out["e"].dtype == jnp.float32 and float(out["s"]) == 2.0


def _nonfinite_scores(_):
  out = jp.magnitude({"w": jnp.asarray([jnp.nan, -jnp.inf, 1.0])})["w"]
  assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 1.0


def _int64_probes(_):
  h = jp.hessian_diag(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones(2)}, key=KEY,
                      num_probes=np.int64(4))
  np.testing.assert_array_equal(h["w"], [2.0, 2.0])


SCORES = [
    raises("magnitude int leaf", lambda _: jp.magnitude({"n": jnp.ones((2, 2), jnp.int32)}),
           r"params: expected floating-point arrays, got dtype int32 at leaf \['n'\]"),
    raises("magnitude string leaf", lambda _: jp.magnitude({"s": "abc"}),
           r"params: expected floating-point arrays.*\['s'\]"),
    works("magnitude empty and 0-d leaves", _empty_and_0d),
    works("magnitude keeps NaN and inf", _nonfinite_scores),
    raises("taylor missing leaf", lambda _: jp.taylor(params(), {"w": params()["w"]}),
           r"leaf \['b'\] is in params but not in grads"),
    raises("taylor shape mismatch", lambda _: jp.taylor(params(), {**params(), "b": jnp.ones(2)}),
           r"leaf \['b'\] has shape \(3,\) in params and \(2,\) in grads"),
    works("gradient bf16 -> float32",
          lambda _: jp.gradient({"g": jnp.ones(2, jnp.bfloat16)})["g"].dtype == jnp.float32),
    raises("random_scores int key", lambda _: jp.random_scores(params(), 0), r"key: expected"),
    raises("random_scores batch of keys",
           lambda _: jp.random_scores(params(), jax.random.split(KEY)), r"key: .*shape \(2, 2\)"),
    raises("hessian_diag num_probes 0",
           lambda _: jp.hessian_diag(lambda p: jnp.sum(p["w"]), params(), key=KEY, num_probes=0),
           r"num_probes: expected an integer >= 1, got 0"),
    raises("hessian_diag num_probes float",
           lambda _: jp.hessian_diag(lambda p: jnp.sum(p["w"]), params(), key=KEY,
                                     num_probes=2.5), r"num_probes: .*got 2.5"),
    raises("hessian_diag num_probes bool",
           lambda _: jp.hessian_diag(lambda p: jnp.sum(p["w"]), params(), key=KEY,
                                     num_probes=True), r"num_probes: .*got True"),
    raises("hessian_diag vector loss",
           lambda _: jp.hessian_diag(lambda p: p["w"], params(), key=KEY),
           r"loss_fn: expected a scalar loss, got a value of shape \(2, 3\)"),
    raises("hessian_diag int loss",
           lambda _: jp.hessian_diag(lambda p: jnp.int32(1), params(), key=KEY),
           r"loss_fn: expected a floating-point scalar loss, got dtype int32"),
    raises("hessian_diag loss not callable", lambda _: jp.hessian_diag(3.0, params(), key=KEY),
           r"loss_fn: expected a function"),
    works("hessian_diag numpy int num_probes", _int64_probes),
    raises("obd mismatched trees", lambda _: jp.obd(params(), {"w": params()["w"]}),
           r"leaf \['b'\] is in params but not in hess_diag"),
    raises("curvature int leaf", lambda _: jp.curvature({"h": jnp.ones(2, jnp.int8)}),
           r"hess_diag: expected floating-point arrays, got dtype int8 at leaf \['h'\]"),
]

# --- schedules ---------------------------------------------------------------------------------


def _jnp_scalars(_):
  s = jp.polynomial_schedule(jnp.float32(0.0), jnp.float32(0.8), jnp.int32(0), np.int64(10),
                             frequency=jnp.int32(5), power=jnp.float32(1.0))
  assert float(s(10)) == np.float32(0.8) and float(s(5)) == np.float32(0.4)


def _iterative_full(_):
  assert float(jp.iterative_schedule(1.0, 1, 2)(5)) == 1.0


SCHEDULES = [
    raises("polynomial final 1.5", lambda _: jp.polynomial_schedule(0.0, 1.5, 0, 10),
           r"final_sparsity: expected a fraction in \[0, 1\], got 1.5"),
    raises("polynomial init NaN", lambda _: jp.polynomial_schedule(float("nan"), 0.5, 0, 10),
           r"init_sparsity: expected a fraction in \[0, 1\], got nan"),
    raises("polynomial string sparsity", lambda _: jp.polynomial_schedule(0.0, "0.5", 0, 10),
           r"final_sparsity: expected a fraction in \[0, 1\], got '0.5'"),
    raises("polynomial end_step beyond int32",
           lambda _: jp.polynomial_schedule(0.0, 0.5, 0, 2**31 + 5),
           r"end_step: expected an integer >= 0 and <= 2147483647, got 2147483653"),
    raises("polynomial end before begin", lambda _: jp.polynomial_schedule(0.0, 0.5, 10, 5),
           r"end_step: expected end_step >= begin_step = 10, got 5"),
    raises("polynomial frequency 0", lambda _: jp.polynomial_schedule(0.0, 0.5, 0, 10, 0),
           r"frequency: expected an integer >= 1"),
    raises("polynomial float step", lambda _: jp.polynomial_schedule(0.0, 0.5, 0, 10.5),
           r"end_step: expected an integer .*got 10.5"),
    raises("polynomial bool step", lambda _: jp.polynomial_schedule(0.0, 0.5, True, 10),
           r"begin_step: expected an integer .*got True"),
    raises("polynomial negative power",
           lambda _: jp.polynomial_schedule(0.0, 0.5, 0, 10, power=-1.0),
           r"power: expected a finite number > 0, got -1.0"),
    raises("polynomial infinite power",
           lambda _: jp.polynomial_schedule(0.0, 0.5, 0, 10, power=float("inf")),
           r"power: expected a finite number > 0, got inf"),
    works("polynomial jnp and numpy scalars", _jnp_scalars),
    raises("polynomial jnp scalar out of range",
           lambda _: jp.polynomial_schedule(0.0, jnp.float32(1.5), 0, 10),
           r"final_sparsity: expected a fraction in \[0, 1\], got 1.5\.$"),
    raises("constant None", lambda _: jp.constant_schedule(None),
           r"sparsity: expected a fraction in \[0, 1\], got None"),
    raises("constant vector", lambda _: jp.constant_schedule(jnp.asarray([0.5, 0.5])),
           r"sparsity: expected a fraction in \[0, 1\], got shape \(2,\)"),
    raises("one_shot negative step", lambda _: jp.one_shot_schedule(0.5, -1),
           r"step: expected an integer >= 0"),
    raises("iterative zero rounds", lambda _: jp.iterative_schedule(0.5, 10, 0),
           r"rounds: expected an integer >= 1"),
    raises("iterative last round beyond int32",
           lambda _: jp.iterative_schedule(0.5, 2**30, 4), r"rounds: expected rounds whose"),
    works("iterative fraction 1", _iterative_full),
]

# --- penalties ---------------------------------------------------------------------------------


def _update(tx, p=None, u=None):
  p = params() if p is None else p
  return tx.update(p if u is None else u, tx.init(p), p)


def _prox_empty(_):
  p = {"e": jnp.zeros((0, 2))}
  out, _ = _update(jp.proximal_l1(0.1, 0.1, prunable=True), p)
  assert out["e"].shape == (0, 2)


PENALTIES = [
    raises("add_l1 NaN", lambda _: jp.add_l1(float("nan")),
           r"strength: expected a finite number >= 0, got nan"),
    raises("add_l1 negative", lambda _: jp.add_l1(-1.0), r"strength: .*got -1.0"),
    raises("add_l1 inf", lambda _: jp.add_l1(float("inf")), r"strength: .*got inf"),
    raises("add_l1 string", lambda _: jp.add_l1("0.1"), r"strength: .*got '0.1'"),
    raises("proximal_l1 negative strength", lambda _: jp.proximal_l1(-1.0, 0.1),
           r"strength: expected a finite number >= 0, got -1.0"),
    raises("proximal_l1 negative learning rate", lambda _: jp.proximal_l1(0.1, -0.1),
           r"learning_rate: expected a finite number >= 0, got -0.1"),
    raises("proximal_l1 schedule turns negative",
           lambda _: _update(jp.proximal_l1(lambda c: -1.0, 0.1)),
           r"strength: expected a finite number >= 0, got -1.0"),
    raises("add_l1 without params",
           lambda _: jp.add_l1(0.1).update(params(), jp.add_l1(0.1).init(params())),
           r"add_l1: expected the current params"),
    raises("add_l1 updates and params differ",
           lambda _: _update(jp.add_l1(0.1), u={"w": params()["w"]}),
           r"leaf \['b'\] is in params but not in updates"),
    raises("add_l1 int leaf made prunable",
           lambda _: _update(jp.add_l1(0.1, prunable=True), {"n": jnp.ones((2, 2), jnp.int32)}),
           r"params: expected floating-point prunable leaves, got dtype int32 \(leaf \['n'\]\)"),
    raises("group lasso float axis", lambda _: jp.proximal_group_lasso(0.1, 0.1, axis=1.0),
           r"axis: expected an integer, got 1.0"),
    raises("group lasso axis out of range",
           lambda _: _update(jp.proximal_group_lasso(0.1, 0.1, axis=2)),
           r"axis: expected an axis in \[-2, 2\) for 2 dimensions, got 2 \(leaf \['w'\]\)"),
    raises("add_l1 prunable string", lambda _: _update(jp.add_l1(0.1, prunable="kernel")),
           r"prunable: expected None, a predicate .*got 'kernel' \(leaf \['b'\]\)"),
    works("proximal_l1 empty leaf", _prox_empty),
]

# --- quantize ----------------------------------------------------------------------------------


def _quant_empty(_):
  q = jp.compress.quantize({"e": jnp.zeros((0, 3))})["e"]
  assert q.values.shape == (0, 3) and q.values.dtype == jnp.int8 and q.scale.shape == (1, 3)
  assert jp.compress.dequantize_array(q).shape == (0, 3)


def _quant_0d(_):
  out = jp.compress.quantize({"s": jnp.float32(2.0)}, prunable=True)
  assert not quantize.is_quantized(out["s"]) and float(out["s"]) == 2.0


QUANTIZE = [
    raises("quantize inf", lambda _: jp.compress.quantize({"w": jnp.asarray([[1.0, jnp.inf]])}),
           r"params: expected finite values to quantize .*got inf at index \(0, 1\) "
           r"\(leaf \['w'\]\)"),
    raises("quantize NaN", lambda _: jp.compress.quantize({"w": jnp.asarray([[jnp.nan, 1.0]])}),
           r"params: expected finite values .*got nan at index \(0, 0\) \(leaf \['w'\]\)"),
    works("quantize empty leaf", _quant_empty),
    works("quantize 0-d leaf left as is", _quant_0d),
    raises("quantize axis out of range", lambda _: jp.compress.quantize(params(), axis=3),
           r"axis: expected an axis in \[-2, 2\) for 2 dimensions, got 3 \(leaf \['w'\]\)"),
    raises("quantize float axis", lambda _: jp.compress.quantize(params(), axis=0.5),
           r"axis: expected an integer, got 0.5"),
    raises("quantize int leaf made prunable",
           lambda _: jp.compress.quantize({"n": jnp.ones((2, 2), jnp.int32)}, prunable=True),
           r"params: expected floating-point prunable leaves, got dtype int32 \(leaf \['n'\]\)"),
    raises("quantize_array int", lambda _: jp.compress.quantize_array(jnp.ones(3, jnp.int32)),
           r"x: expected a floating-point array, got dtype int32"),
    raises("quantize_array 0-d", lambda _: jp.compress.quantize_array(jnp.float32(1.0)),
           r"x: expected an array with ndim >= 1"),
    raises("dequantize_array of an array", lambda _: jp.compress.dequantize_array(jnp.ones(3)),
           r"q: expected a QuantizedArray"),
    raises("dequantize like mismatch",
           lambda _: jp.compress.dequantize(jp.compress.quantize(params()),
                                            like={"w": params()["w"]}),
           r"leaf \['b'\] is in qparams but not in like"),
    raises("quantization_error mismatch",
           lambda _: jp.compress.quantization_error({"w": params()["w"]},
                                                    jp.compress.quantize(params())),
           r"leaf \['b'\] is in qparams but not in params"),
]

# --- export ------------------------------------------------------------------------------------


def _write_foreign(tmp_path, kind):
  path = tmp_path / f"foreign.{kind}"
  if kind == "npy":
    np.save(path, np.ones(3))
  elif kind == "npz":
    np.savez(path, a=np.ones(2))
  elif kind == "txt":
    path.write_text("hello")
  elif kind == "pkl":
    path.write_bytes(pickle.dumps({"a": 1}))
  elif kind == "objnpz":
    np.savez(tmp_path / "obj.npz", __meta__=np.asarray([{"a": 1}], dtype=object))
    path = tmp_path / "obj.npz"
  elif kind == "cut":
    jp.compress.save_compressed(tmp_path / "whole.npz", params())
    path.write_bytes((tmp_path / "whole.npz").read_bytes()[:200])
  return path


def _load_foreign(kind):
  def fn(tmp_path):
    path = _write_foreign(tmp_path, kind)
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no pickle or resource warning on the way
      jp.compress.load_compressed(path)
  return fn


def _wide_dtypes(tmp_path):
  p = {"f64": np.asarray([[1 / 3, 0.0], [2.0, 1e-300]]),
       "i64": np.arange(4, dtype=np.int64) * 2**40, "u64": np.asarray([2**64 - 1], np.uint64),
       "c128": np.asarray([1 + 2j]),
       "be": np.arange(3, dtype=">f4"), "f16": np.ones((2, 2), np.float16),
       "bf16": jnp.ones((2, 2), jnp.bfloat16), "i4": np.asarray([1, -2], ml_dtypes.int4),
       "bool": np.asarray([True, False])}
  jp.compress.save_compressed(tmp_path / "wide", p)
  out = jp.compress.load_compressed(tmp_path / "wide", like=p)
  for k, x in p.items():
    y = out[k]
    assert np.asarray(y).dtype == np.asarray(x).dtype, k
    np.testing.assert_array_equal(np.asarray(y).view(np.uint8), np.asarray(x).view(np.uint8))


EXPORT = [
    raises("save string leaf",
           lambda t: jp.compress.save_compressed(t / "s", {"s": np.asarray(["a"])}),
           r"params: expected numeric or bool arrays, got dtype <U1 \(leaf \['s'\]\)"),
    raises("save object leaf",
           lambda t: jp.compress.save_compressed(t / "o", {"o": np.asarray([{}], dtype=object)}),
           r"params: expected numeric or bool arrays, got dtype object \(leaf \['o'\]\)"),
    raises("save float masks",
           lambda t: jp.compress.save_compressed(t / "m", params(),
                                                 jax.tree.map(jnp.ones_like, params())),
           r"masks: expected bool arrays .*float32.*\(leaf \['b'\]\)"),
    raises("save mismatched masks",
           lambda t: jp.compress.save_compressed(t / "m", params(), {"w": jnp.ones((2, 3), bool)}),
           r"leaf \['b'\] is in params but not in masks"),
    *[raises(f"load foreign {kind}", _load_foreign(kind),
             r"path: expected a jaxprune checkpoint written by save_compressed, got .*which is "
             r"not one")
      for kind in ("npy", "npz", "txt", "pkl", "objnpz", "cut")],
    raises("load missing file", lambda t: jp.compress.load_compressed(t / "none.npz"), "none.npz",
           FileNotFoundError),
    raises("load like mismatch", lambda t: (jp.compress.save_compressed(t / "c", params()),
                                            jp.compress.load_compressed(t / "c", like={"w": 0})),
           r"like: expected the tree the checkpoint was saved from; checkpoint leaf \['b'\]"),
    works("checkpoint keeps wide and exotic dtypes bitwise", _wide_dtypes),
    raises("apply_masks mismatched masks",
           lambda _: jp.apply_masks(params(), {"w": jnp.ones((2, 3), bool)}), r"masks"),
    raises("compact min_saving 1.5", lambda _: jp.compress.compact(params(), min_saving=1.5),
           r"min_saving: expected a fraction in \[0, 1\], got 1.5"),
]

# --- allocation --------------------------------------------------------------------------------

ALLOCATION = [
    raises("target 1.5", lambda _: jp.allocate_sparsities(params(), 1.5, sensitivity=sens()),
           r"target: expected a fraction in \[0, 1\], got 1.5"),
    raises("target string", lambda _: jp.allocate_sparsities(params(), "0.5", method="uniform"),
           r"target: expected a fraction in \[0, 1\], got '0.5'"),
    raises("unknown method", lambda _: jp.allocate_sparsities(params(), 0.5, method="greedy"),
           r"method: expected one of \('sensitivity', 'uniform', 'erk'\), got 'greedy'"),
    raises("unknown budget",
           lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity=sens(), budget="time"),
           r"budget: expected one of"),
    raises("no sensitivity", lambda _: jp.allocate_sparsities(params(), 0.5),
           r"sensitivity: expected a SensitivityResult .*got a NoneType"),
    raises("sensitivity as dict", lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity={}),
           r"sensitivity: expected a SensitivityResult .*got a dict"),
    raises("NaN baseline",
           lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity=sens(baseline=np.nan)),
           r"sensitivity: expected a finite baseline metric, got nan"),
    raises("metrics of the wrong shape",
           lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity=sens(((1.0, 0.9),))),
           r"sensitivity: expected metrics of shape \(leaves, grid\) = \(1, 3\)"),
    raises("metric NaN at every measured point",
           lambda _: jp.allocate_sparsities(params(), 0.5,
                                            sensitivity=sens(((1.0, np.nan, np.nan),))),
           r"target: expected a target the analysed leaves can reach.*NaN metric limits "
           r"\['w'\] \(up to sparsity 0\)"),
    raises("higher_is_better string",
           lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity=sens(),
                                            higher_is_better="yes"),
           r"higher_is_better: expected a bool, got 'yes'"),
    raises("sensitivity of other params",
           lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity=sens(paths=("['x']",))),
           r"sensitivity: expected an analysis of these params, got one of leaf \['x'\]"),
    raises("flops budget without report",
           lambda _: jp.allocate_sparsities(params(), 0.5, sensitivity=sens(), budget="flops"),
           r"report: expected jaxprune.report\(params, apply_fn=..., inputs=...\) for "
           r"budget='flops', got None"),
    raises("as_overrides 1.5", lambda _: jp.as_overrides({"w": 1.5}),
           r"sparsities: expected a fraction in \[0, 1\], got 1.5 \(leaf \['w'\]\)"),
    raises("as_overrides schedule_fn not callable", lambda _: jp.as_overrides({"w": 0.5}, 3),
           r"schedule_fn: expected None or a function"),
    raises("predicted_metric NaN sparsity",
           lambda _: jp.predicted_metric(sens(), {"w": float("nan"), "b": 0.0}),
           r"sparsities: expected a fraction in \[0, 1\], got nan \(leaf \['w'\]\)"),
]

# --- sensitivity -------------------------------------------------------------------------------

_metric = lambda p: jnp.sum(p["w"])

SENSITIVITY = [
    raises("grid 1.5", lambda _: jp.sensitivity_analysis(params(), _metric, [0.5, 1.5]),
           r"sparsities: expected a fraction in \[0, 1\], got 1.5"),
    raises("empty grid", lambda _: jp.sensitivity_analysis(params(), _metric, []),
           r"sparsities: expected at least one fraction"),
    raises("grid as string", lambda _: jp.sensitivity_analysis(params(), _metric, "0.5"),
           r"sparsities: expected a sequence of fractions in \[0, 1\], got a str"),
    raises("grid NaN", lambda _: jp.sensitivity_analysis(params(), _metric, [float("nan")]),
           r"sparsities: expected a fraction in \[0, 1\], got nan"),
    raises("vector metric", lambda _: jp.sensitivity_analysis(params(), lambda p: p["w"], [0.5]),
           r"metric_fn: expected a real scalar metric .*got an array of dtype float32 and "
           r"shape \(2, 3\)"),
    raises("metric not callable", lambda _: jp.sensitivity_analysis(params(), 1.0, [0.5]),
           r"metric_fn: expected a function params -> scalar, got a float"),
    raises("scores of another tree",
           lambda _: jp.sensitivity_analysis(params(), _metric, [0.5], scores={"w": params()["w"]}),
           r"leaf \['b'\] is in params but not in scores"),
    raises("nothing prunable",
           lambda _: jp.sensitivity_analysis({"b": jnp.ones(3)}, lambda p: jnp.sum(p["b"]), [0.5]),
           r"prunable: expected at least one prunable leaf to analyse, got none"),
    raises("progress not a bool",
           lambda _: jp.sensitivity_analysis(params(), _metric, [0.5], progress="yes"),
           r"enable: expected None, True or False, got 'yes'"),
]

# --- presets -----------------------------------------------------------------------------------

_scores = lambda: {"k": jnp.arange(24.0).reshape(4, 6), "odd": jnp.ones((3, 5))}

PRESETS = [
    raises("unknown preset", lambda _: jp.hardware_mask(_scores(), "fpga"),
           r"preset: expected one of .*got 'fpga'"),
    raises("preset as number", lambda _: jp.hardware_mask(_scores(), 3), r"preset: expected"),
    raises("2:4 at 70%", lambda _: jp.hardware_mask(_scores(), "gpu_2:4", sparsity=0.7,
                                                     incompatible="dense"),
           r"sparsity: expected None or 0.5 \(fixed by preset 'gpu_2:4'\), got 0.7"),
    raises("unknown incompatible", lambda _: jp.hardware_mask(_scores(), "gpu_2:4",
                                                              incompatible="skip"),
           r"incompatible: expected one of \('raise', 'dense'\), got 'skip'"),
    raises("axis on a block preset",
           lambda _: jp.hardware_mask(_scores(), "tpu_8x128", sparsity=0.5, axis=-1),
           r"axis: expected None for the block preset 'tpu_8x128'"),
    raises("incompatible leaf", lambda _: jp.hardware_mask(_scores(), "gpu_2:4"),
           r"scores: expected a shape with axis -2 divisible by 4 .*got shape \(3, 5\) "
           r"\(leaf \['odd'\]\)"),
    raises("block preset without sparsity",
           lambda _: jp.hardware_mask(_scores(), "tpu_8x128", incompatible="dense"),
           r"sparsity: expected a fraction for preset 'tpu_8x128', got None"),
]

# --- report and logging ------------------------------------------------------------------------


def _report_empty_0d(_):
  r = jp.report({"e": jnp.zeros((0, 4)), "s": jnp.float32(1.0)}, prunable=True)
  rows = {row.path: row for row in r.rows}
  assert rows["['e']"].count == 0 and rows["['e']"].sparsity == 0.0
  assert rows["['s']"].count == 1 and rows["['s']"].kept == 1 and r.sparsity == 0.0


class _NoMasks(NamedTuple):
  count: jax.Array


REPORT = [
    raises("report inputs as a bare array",
           lambda _: jp.report(params(), apply_fn=lambda p, x: x @ p["w"].T, inputs=jnp.ones(3)),
           r"inputs: expected a tuple of the remaining arguments of apply_fn, e.g. inputs=\(x,\) "
           r".*got an array of shape \(3,\)"),
    raises("report inputs without apply_fn", lambda _: jp.report(params(), inputs=(1.0,)),
           r"apply_fn: expected a function apply_fn\(params, \*inputs\) since inputs"),
    raises("report apply_fn not callable", lambda _: jp.report(params(), apply_fn="f"),
           r"apply_fn: expected a function"),
    raises("report float masks",
           lambda _: jp.report(params(), masks=jax.tree.map(jnp.ones_like, params())),
           r"masks: expected bool arrays \(True = keep\), got an array of dtype float32 .*"
           r"\(leaf \['b'\]\)"),
    raises("report masks of other shapes",
           lambda _: jp.report(params(), masks={"w": jnp.ones((3, 2), bool),
                                                "b": jnp.ones(3, bool)}),
           r"leaf \['w'\] has shape \(2, 3\) in params and \(3, 2\) in masks"),
    raises("report string leaf", lambda _: jp.report({"s": "abc"}),
           r"params: expected numeric arrays, got a str \(leaf \['s'\]\)"),
    raises("report under jit", lambda _: jax.jit(lambda p: jp.report(p).sparsity)(params()),
           r"params: expected concrete arrays .*got a traced value \(leaf \['b'\]\)"),
    works("report empty and 0-d leaves", _report_empty_0d),
    raises("find_masks in a state without masks",
           lambda _: jp.find_masks((_NoMasks(jnp.int32(0)),), params()),
           r"state: expected an optimizer state containing a `masks` field .*found 0"),
    raises("prune_scalars of a state without masks",
           lambda _: scalars.prune_scalars(optax.adam(0.1).init(params()), params()),
           r"state: expected an optimizer state containing a `masks` field"),
    raises("prune_scalars of other params",
           lambda _: scalars.prune_scalars(jp.prune(0.5).init(params()), {"w": params()["w"]}),
           r"none matching"),
    raises("progress enable string", lambda _: list(progress.progress([1], enable="auto")),
           r"enable: expected None, True or False, got 'auto'"),
]

# --- the prunable rule -------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class CallableNode:
  """A pytree node that is callable, like every Equinox module."""

  def __init__(self, w, b):
    self.w, self.b = w, b

  def __call__(self, x):
    return x @ self.w + self.b

  def tree_flatten(self):
    return (self.w, self.b), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)


def _callable_root(_):
  p = CallableNode(jnp.ones((2, 3)), jnp.ones(3))
  assert jax.tree.leaves(jp.prunable_flags(p)) == [True, False]
  assert jax.tree.leaves(jp.prunable_flags(p, CallableNode(False, True))) == [False, True]


TREE = [
    raises("prunable string", lambda _: jp.prunable_flags(params(), "kernel"),
           r"prunable: expected None, a predicate \(path, leaf\) -> bool, or a pytree of bools, "
           r"got 'kernel' \(leaf \['b'\]\)"),
    raises("prunable int", lambda _: jp.prunable_flags(params(), 1),
           r"prunable: expected None, a predicate .*got 1"),
    raises("predicate returning a string",
           lambda _: jp.prunable_flags(params(), lambda path, x: "yes"),
           r"prunable: expected a predicate returning a bool, got 'yes' \(leaf \['b'\]\)"),
    raises("prunable tree not a prefix", lambda _: jp.prunable_flags(params(), {"x": True}),
           r"prunable: expected None, a predicate .*got a tree that does not match"),
    raises("prunable tree holding arrays",
           lambda _: jp.prunable_flags(params(), {"w": jnp.ones((2, 3), bool), "b": False}),
           r"prunable: expected .*got shape \(2, 3\) \(leaf \['w'\]\)"),
    works("callable pytree root is data, not a predicate", _callable_root),
    raises("prune with prunable string",
           lambda _: jp.prune(0.5, prunable="kernel").init(params()), r"prunable: expected"),
    raises("unstructured_mask with prunable string",
           lambda _: jp.unstructured_mask(params(), 0.5, prunable="kernel"),
           r"prunable: expected"),
]

CASES = (SCORES + SCHEDULES + PENALTIES + QUANTIZE + EXPORT + ALLOCATION + SENSITIVITY + PRESETS
         + REPORT + TREE)


def test_case_count():
  assert len({c.name for c in CASES}) == len(CASES) == 128


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path):
  if case.error is None:
    case.fn(tmp_path)
    return
  with pytest.raises(case.error, match=case.match):
    case.fn(tmp_path)

