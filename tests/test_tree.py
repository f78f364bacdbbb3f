"""Pytree helpers: leaf paths (NNX `.value` dropped), functions vs data, the prunable rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune._src import tree as tree_lib

GetAttr, Dict = jax.tree_util.GetAttrKey, jax.tree_util.DictKey


def test_path_str_drops_only_a_trailing_value():
  assert tree_lib.path_str((Dict("l1"), Dict("kernel"), GetAttr("value"))) == "['l1']['kernel']"
  assert tree_lib.path_str((GetAttr("value"), Dict("x"))) == ".value['x']"
  assert tree_lib.path_str((GetAttr("layers"), jax.tree_util.SequenceKey(0),
                            GetAttr("weight"))) == ".layers[0].weight"
  assert tree_lib.path_str(()) == "<root>"


def test_nnx_params_and_optimizer_masks_share_paths():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  masks = jax.tree.map(lambda x: nnx.OptVariable(jnp.ones(x.shape, bool)), params,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert jax.tree.structure(masks) != jax.tree.structure(params)
  assert [p for p, _ in tree_lib.leaves_with_paths(params)] == ["['bias']", "['kernel']"]
  assert tree_lib.same_paths(masks, params)
  tree_lib.check_same_structure(params, masks, "params", "masks")
  like = tree_lib.like(masks, params)
  assert jax.tree.structure(like) == jax.tree.structure(params)
  np.testing.assert_array_equal(like["kernel"][...], True)


def test_is_function():
  assert tree_lib.is_function(lambda p, x: True)
  assert tree_lib.is_function(functools.partial(lambda a, p, x: a, True))
  assert tree_lib.is_function(jax.tree_util.Partial(lambda p, x: True))
  assert tree_lib.is_function(tree_lib.default_prunable)
  assert not tree_lib.is_function({"w": True})


def test_prunable_flags_accepts_numpy_and_array_bools():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  flags = tree_lib.prunable_flags(params, lambda path, x: np.bool_(x.ndim == 2))
  assert flags == {"w": True, "b": False}
  assert tree_lib.prunable_flags(params, {"w": jnp.asarray(True), "b": np.bool_(False)}) == flags
  assert tree_lib.prunable_flags(params, False) == {"w": False, "b": False}
