"""Sensitivity analysis: one leaf pruned at a time over a grid, one trace of the metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import sensitivity as sens_lib

from models import A, B_, sum_params


def test_sensitivity_exact_and_traced_once(tmp_path):
  params = sum_params()
  traces = []

  def metric(p):
    traces.append(1)
    return sum(jnp.sum(x) for x in jax.tree.leaves(p))

  grid = [0.5, 0.0, 0.25, 1.0]
  png = tmp_path / "sens.png"
  res = sens_lib.sensitivity_analysis(params, metric, grid, plot_path=png)
  assert len(traces) == 1
  assert res.paths == (A, B_) and res.sizes == (20, 15)
  np.testing.assert_array_equal(res.sparsities, [0.0, 0.25, 0.5, 1.0])
  total = float(sum(np.sum(x) for x in jax.tree.leaves(params)))
  assert res.baseline == pytest.approx(total)
  for row, leaf in zip(res.metrics, (params["a"]["kernel"], params["b"]["kernel"])):
    srt = np.sort(np.asarray(leaf).ravel())
    ks = [round(s * srt.size) for s in res.sparsities]
    np.testing.assert_allclose(row, [total - srt[:k].sum() for k in ks], rtol=1e-6)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  d = res.to_dict()
  assert d["metrics"][A][0] == pytest.approx(total) and d["sparsities"] == [0.0, 0.25, 0.5, 1.0]


def test_sensitivity_score_fn_and_pytree_agree():
  params = sum_params()
  metric = lambda p: jnp.sum(p["a"]["kernel"]) + jnp.sum(p["b"]["kernel"])
  neg = lambda p: jax.tree.map(lambda x: -x, p)
  r1 = sens_lib.sensitivity_analysis(params, metric, [0.0, 0.5], scores=neg)
  r2 = sens_lib.sensitivity_analysis(params, metric, [0.0, 0.5], scores=neg(params))
  np.testing.assert_array_equal(r1.metrics, r2.metrics)
  srt = np.sort(np.asarray(params["a"]["kernel"]).ravel())
  assert r1.metrics[0, 1] == pytest.approx(r1.baseline - srt[-10:].sum())


def test_sensitivity_bad_grid():
  with pytest.raises(ValueError, match="sparsities"):
    sens_lib.sensitivity_analysis(sum_params(), lambda p: 0.0, [0.1, 1.5])
