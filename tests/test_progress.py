"""Progress bars: optional tqdm, off without a terminal, same results either way."""

import io

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._src import progress
from jaxprune._src import sensitivity as sens_lib


def test_off_without_a_terminal_and_when_asked():
  # pytest captures stderr: not a terminal, so no bar unless forced.
  assert not progress.progress_enabled()
  assert not progress.progress_enabled(False)
  assert list(progress.progress(range(3))) == [0, 1, 2]


def test_forced_bar_draws_on_stderr(monkeypatch):
  pytest.importorskip("tqdm")
  err = io.StringIO()
  monkeypatch.setattr(progress.sys, "stderr", err)
  assert progress.progress_enabled(True)
  assert list(progress.progress(iter([5, 6]), total=2, desc="probe", enable=True)) == [5, 6]
  assert "probe" in err.getvalue()


def test_without_tqdm(monkeypatch):
  monkeypatch.setattr(progress, "_tqdm", lambda: None)
  assert not progress.progress_enabled(True)
  assert list(progress.progress([1, 2], enable=True)) == [1, 2]


def test_sensitivity_results_do_not_depend_on_the_bar(monkeypatch):
  pytest.importorskip("tqdm")
  monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
  params = {"a": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.arange(1.0, 5.0).reshape(2, 2)}
  metric = lambda p: jnp.sum(p["a"]) + jnp.sum(p["b"])
  with_bar = sens_lib.sensitivity_analysis(params, metric, [0.0, 0.5], progress=True)
  without = sens_lib.sensitivity_analysis(params, metric, [0.0, 0.5], progress=False)
  np.testing.assert_array_equal(with_bar.metrics, without.metrics)
  np.testing.assert_array_equal(with_bar.metrics, [[31.0, 25.0], [31.0, 28.0]])
