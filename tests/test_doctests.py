"""The docstring examples of the public API: every public name has one, and each one runs.

Public names are those of the ``__all__`` lists of `jaxprune` and its subpackages. Functions and
classes carry their examples in their docstrings (methods included); a constant carries them in
the string literal that follows its assignment, the attribute docstring the API reference shows.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
import sys
from types import ModuleType
from typing import Any

import pytest

import jaxprune._src

NAMESPACES = ("jaxprune", "jaxprune.structured", "jaxprune.layerwise", "jaxprune.compress",
              "jaxprune.sharding")


def _public() -> list[tuple[str, str, Any]]:
  """(namespace, name, object) of every public name but the subpackages themselves."""
  out = []
  for ns in NAMESPACES:
    module = importlib.import_module(ns)
    for name in module.__all__:
      obj = getattr(module, name)
      if not inspect.ismodule(obj):  # subpackages are checked through their own names
        out.append((ns, name, obj))
  return out


def _attribute_docstring(obj: Any) -> tuple[str, str, int] | None:
  """(docstring, file, line) of the module-level assignment in ``jaxprune._src`` that binds
  ``obj``, read from the source as griffe reads it; None when there is none."""
  for info in pkgutil.iter_modules(jaxprune._src.__path__):
    module = importlib.import_module(f"jaxprune._src.{info.name}")
    names = [n for n, v in vars(module).items() if v is obj]
    if not names:
      continue
    source = inspect.getsource(module)
    body = ast.parse(source).body
    for stmt, nxt in zip(body, body[1:]):
      targets = stmt.targets if isinstance(stmt, ast.Assign) else (
          [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
      if (any(isinstance(t, ast.Name) and t.id in names for t in targets)
          and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
          and isinstance(nxt.value.value, str)):
        return inspect.cleandoc(nxt.value.value), module.__file__, nxt.lineno - 1
  return None


def _doctests(ns: str, name: str, obj: Any) -> list[doctest.DocTest]:
  """The non-empty doctests of a public name (of its methods too, for a class)."""
  qualname = f"{ns}.{name}"
  obj = inspect.unwrap(obj) if callable(obj) else obj   # a jitted function's docstring
  if inspect.isfunction(obj) or inspect.isclass(obj):
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    tests = finder.find(obj, qualname, module=sys.modules[obj.__module__], globs={})
  else:
    found = _attribute_docstring(obj)
    if found is None:
      return []
    text, filename, lineno = found
    tests = [doctest.DocTestParser().get_doctest(text, {}, qualname, filename, lineno)]
  return [t for t in tests if t.examples]


PUBLIC = _public()

# Examples that compile a solver, a selection or a shard_map program, run many first-time eager
# ops, build an NNX model or draw a plot: they run with `-m slow`; the rest keep this file fast.
SLOW = frozenset({
    "jaxprune.Elementwise", "jaxprune.add_l1", "jaxprune.block_mask", "jaxprune.distillation_loss",
    "jaxprune.erk_sparsities", "jaxprune.find_masks", "jaxprune.hessian_diag",
    "jaxprune.iterative_schedule", "jaxprune.oneshot", "jaxprune.plot_sensitivity",
    "jaxprune.polynomial_schedule", "jaxprune.proximal_group_lasso", "jaxprune.proximal_l1",
    "jaxprune.prune", "jaxprune.prune_scalars", "jaxprune.pruning_masks", "jaxprune.random_scores",
    "jaxprune.sensitivity_analysis", "jaxprune.unstructured_mask", "jaxprune.wanda_scores",
    "jaxprune.structured.find_groups", "jaxprune.structured.find_groups_nnx",
    "jaxprune.structured.group_masks", "jaxprune.structured.shrink_nnx",
    "jaxprune.layerwise.Calibrator", "jaxprune.layerwise.ObcPath",
    "jaxprune.layerwise.dense_target", "jaxprune.layerwise.obc", "jaxprune.layerwise.obc_losses",
    "jaxprune.layerwise.obc_mask", "jaxprune.layerwise.obc_path", "jaxprune.layerwise.refit",
    "jaxprune.layerwise.sparsegpt", "jaxprune.layerwise.sparsegpt_losses",
    "jaxprune.compress.compact", "jaxprune.compress.compact_bytes", "jaxprune.compress.densify",
    "jaxprune.compress.dequantize", "jaxprune.compress.dequantize_array",
    "jaxprune.compress.quantization_error", "jaxprune.compress.quantize",
    "jaxprune.compress.quantize_array", "jaxprune.compress.sparse_matmul",
    "jaxprune.sharding.data_parallel_hessian_diag", "jaxprune.sharding.sharded_unstructured_mask",
})


def test_every_public_name_has_an_example() -> None:
  missing = [f"{ns}.{name}" for ns, name, obj in PUBLIC
             if not any(t.name == f"{ns}.{name}" for t in _doctests(ns, name, obj))]
  assert not missing, f"public names without a >>> example in their docstring: {missing}"


def test_namespaces_have_no_public_module_left_out() -> None:
  subpackages = {n for n, o in vars(importlib.import_module("jaxprune")).items()
                 if isinstance(o, ModuleType) and o.__name__.startswith("jaxprune.")
                 and not n.startswith("_") and o.__name__ != "jaxprune._src"}
  assert {f"jaxprune.{n}" for n in subpackages} <= set(NAMESPACES)


def test_slow_names_are_public() -> None:
  assert SLOW <= {f"{ns}.{name}" for ns, name, _ in PUBLIC}


@pytest.mark.parametrize("ns,name,obj", [
    pytest.param(ns, name, obj, id=f"{ns}.{name}",
                 marks=[pytest.mark.slow] if f"{ns}.{name}" in SLOW else [])
    for ns, name, obj in PUBLIC])
def test_docstring_examples(ns: str, name: str, obj: Any) -> None:
  runner = doctest.DocTestRunner(optionflags=0)
  report: list[str] = []
  failed = sum(runner.run(test, out=report.append).failed for test in _doctests(ns, name, obj))
  assert failed == 0, "".join(report)
