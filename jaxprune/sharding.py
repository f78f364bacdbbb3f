"""Pruning with sharded parameters and data: masks selected across devices, the shardings of a
prune state, and a data-parallel Hessian-diagonal estimate. See docs/sharding.md.
"""

from jaxprune._src.sharding import sharded_unstructured_mask as sharded_unstructured_mask
from jaxprune._src.sharding import state_shardings as state_shardings
from jaxprune._src.sharded_hessian import data_parallel_hessian_diag as data_parallel_hessian_diag

__all__ = ["data_parallel_hessian_diag", "sharded_unstructured_mask", "state_shardings"]
