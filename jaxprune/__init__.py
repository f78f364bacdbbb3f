"""jaxprune: neural-network pruning for JAX.

A flat public API over pure functions: score functions map parameter pytrees to
importance pytrees, mask functions turn scores into boolean masks, and optax
transformations keep pruned weights at exactly zero inside jitted train steps.
"""

# --- core: scores, masks, selection (issue 2) ---
from jaxprune._src.summary import LeafSummary
from jaxprune._src.masks import apply_masks
from jaxprune._src.masks import block_mask
from jaxprune._src.summary import format_summary
from jaxprune._src.masks import nm_mask
from jaxprune._src.summary import sparsity
from jaxprune._src.masks import structured_mask
from jaxprune._src.summary import summarize
from jaxprune._src.masks import unstructured_mask
from jaxprune._src.scores import curvature
from jaxprune._src.scores import gradient
from jaxprune._src.scores import hessian_diag
from jaxprune._src.scores import magnitude
from jaxprune._src.scores import obd
from jaxprune._src.scores import random_scores
from jaxprune._src.scores import taylor
from jaxprune._src.elementwise import Elementwise
from jaxprune._src.select import prune_lowest
from jaxprune._src.select import score_keys
from jaxprune._src.tree import default_prunable
from jaxprune._src.tree import prunable_flags
# --- end core ---

# --- optax integration: prune, schedules, penalties (issue 3) ---
from jaxprune._src.distribution import erk_sparsities
from jaxprune._src.distribution import uniform_sparsities
from jaxprune._src.penalties import PenaltyState
from jaxprune._src.penalties import add_l1
from jaxprune._src.penalties import proximal_group_lasso
from jaxprune._src.penalties import proximal_l1
from jaxprune._src.schedules import constant_schedule
from jaxprune._src.schedules import iterative_schedule
from jaxprune._src.schedules import one_shot_schedule
from jaxprune._src.schedules import polynomial_schedule
from jaxprune._src.transform import PruneState
from jaxprune._src.transform import prune
from jaxprune._src.policy import BlockPattern
from jaxprune._src.policy import NMPattern
from jaxprune._src.policy import pruning_masks
# --- end optax ---

# --- structured pruning and surgery (issue 5) ---
from jaxprune._src.group_scores import apply_group_masks as apply_group_masks
from jaxprune._src.group_scores import group_masks as group_masks
from jaxprune._src.group_scores import group_scores as group_scores
from jaxprune._src.groups import SUPPORTED_PRIMITIVES as SUPPORTED_PRIMITIVES
from jaxprune._src.groups import Group as Group
from jaxprune._src.groups import Member as Member
from jaxprune._src.groups import find_groups as find_groups
from jaxprune._src.groups import find_groups_nnx as find_groups_nnx
from jaxprune._src.groups import make_group as make_group
from jaxprune._src.surgery import linen_features as linen_features
from jaxprune._src.surgery import shrink as shrink
from jaxprune._src.surgery import shrink_nnx as shrink_nnx
# --- end structured ---

# --- reports, sensitivity, export (issue 6) ---
from jaxprune._src.allocation import allocate_sparsities as allocate_sparsities
from jaxprune._src.allocation import as_overrides as as_overrides
from jaxprune._src.allocation import predicted_metric as predicted_metric
from jaxprune._src.distill import distillation_loss as distillation_loss
from jaxprune._src.export import compact as compact
from jaxprune._src.export import compact_bytes as compact_bytes
from jaxprune._src.export import densify as densify
from jaxprune._src.export import load_compressed as load_compressed
from jaxprune._src.export import save_compressed as save_compressed
from jaxprune._src.export import sparse_matmul as sparse_matmul
from jaxprune._src.export import strip as strip
from jaxprune._src.presets import HardwarePreset as HardwarePreset
from jaxprune._src.presets import hardware_mask as hardware_mask
from jaxprune._src.quantize import QuantizedArray as QuantizedArray
from jaxprune._src.quantize import dequantize as dequantize
from jaxprune._src.quantize import dequantize_array as dequantize_array
from jaxprune._src.quantize import quantization_error as quantization_error
from jaxprune._src.quantize import quantize as quantize
from jaxprune._src.quantize import quantize_array as quantize_array
from jaxprune._src.report import LeafReport as LeafReport
from jaxprune._src.report import Report as Report
from jaxprune._src.report import log_name as log_name
from jaxprune._src.report import find_masks as find_masks
from jaxprune._src.report import matmul_flops_by_leaf as matmul_flops_by_leaf
from jaxprune._src.report import report as report
from jaxprune._src.report import xla_flops as xla_flops
from jaxprune._src.sensitivity import SensitivityResult as SensitivityResult
from jaxprune._src.sensitivity import plot_sensitivity as plot_sensitivity
from jaxprune._src.sensitivity import sensitivity_analysis as sensitivity_analysis
from jaxprune._src.presets import PRESETS as HARDWARE_PRESETS
# --- end reports ---

# --- sharding (issue 7) ---
from jaxprune._src.sharding import data_parallel_hessian_diag as data_parallel_hessian_diag
from jaxprune._src.sharding import resolve_specs as resolve_specs
from jaxprune._src.sharding import sharded_unstructured_mask as sharded_unstructured_mask
from jaxprune._src.sharding import state_shardings as state_shardings
# --- end sharding ---

__version__ = "0.1.0"
from jaxprune._src.oneshot import oneshot as oneshot
from jaxprune._src.gauss_newton import gauss_newton_diag as gauss_newton_diag
from jaxprune._src.oneshot import wanda_scores as wanda_scores
