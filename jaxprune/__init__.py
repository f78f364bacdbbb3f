"""jaxprune: neural-network pruning for JAX.

Score functions map parameter pytrees to importance pytrees, mask functions and the pruning policy
turn scores into boolean masks, optax transformations keep pruned weights at exactly zero inside
jitted train steps, and `oneshot` prunes a trained model at once from calibration data.
"""

# Scores: pytrees of float32 importances, higher = more important.
from jaxprune._src.scores import magnitude as magnitude
from jaxprune._src.scores import gradient as gradient
from jaxprune._src.scores import taylor as taylor
from jaxprune._src.scores import random_scores as random_scores
from jaxprune._src.scores import hessian_diag as hessian_diag
from jaxprune._src.scores import obd as obd
from jaxprune._src.scores import curvature as curvature
from jaxprune._src.gauss_newton import gauss_newton_diag as gauss_newton_diag
from jaxprune._src.oneshot import wanda_scores as wanda_scores
from jaxprune._src.elementwise import Elementwise as Elementwise

# Masks: bool pytrees, True = keep; the policy that maps scores to them.
from jaxprune._src.masks import unstructured_mask as unstructured_mask
from jaxprune._src.masks import structured_mask as structured_mask
from jaxprune._src.masks import nm_mask as nm_mask
from jaxprune._src.masks import block_mask as block_mask
from jaxprune._src.masks import apply_masks as apply_masks
from jaxprune._src.presets import hardware_mask as hardware_mask
from jaxprune._src.presets import HardwarePreset as HardwarePreset
from jaxprune._src.presets import PRESETS as HARDWARE_PRESETS
from jaxprune._src.policy import pruning_masks as pruning_masks
from jaxprune._src.policy import NMPattern as NMPattern
from jaxprune._src.policy import BlockPattern as BlockPattern
from jaxprune._src.distribution import uniform_sparsities as uniform_sparsities
from jaxprune._src.distribution import erk_sparsities as erk_sparsities
from jaxprune._src.tree import default_prunable as default_prunable
from jaxprune._src.tree import prunable_flags as prunable_flags
from jaxprune._src.summary import sparsity as sparsity
from jaxprune._src.summary import summarize as summarize
from jaxprune._src.summary import format_summary as format_summary
from jaxprune._src.summary import LeafSummary as LeafSummary

# optax transformations and schedules.
from jaxprune._src.transform import prune as prune
from jaxprune._src.transform import PruneState as PruneState
from jaxprune._src.schedules import polynomial_schedule as polynomial_schedule
from jaxprune._src.schedules import constant_schedule as constant_schedule
from jaxprune._src.schedules import one_shot_schedule as one_shot_schedule
from jaxprune._src.schedules import iterative_schedule as iterative_schedule
from jaxprune._src.penalties import add_l1 as add_l1
from jaxprune._src.penalties import proximal_l1 as proximal_l1
from jaxprune._src.penalties import proximal_group_lasso as proximal_group_lasso
from jaxprune._src.penalties import PenaltyState as PenaltyState

# One-shot pruning with calibration data (layer-wise Optimal Brain Surgeon).
from jaxprune._src.oneshot import oneshot as oneshot

# Structured pruning and surgery.
from jaxprune._src.groups import find_groups as find_groups
from jaxprune._src.groups import find_groups_nnx as find_groups_nnx
from jaxprune._src.groups import make_group as make_group
from jaxprune._src.groups import Group as Group
from jaxprune._src.groups import Member as Member
from jaxprune._src.groups import SUPPORTED_PRIMITIVES as SUPPORTED_PRIMITIVES
from jaxprune._src.group_scores import group_scores as group_scores
from jaxprune._src.group_scores import group_masks as group_masks
from jaxprune._src.group_scores import apply_group_masks as apply_group_masks
from jaxprune._src.surgery import shrink as shrink
from jaxprune._src.surgery import shrink_nnx as shrink_nnx
from jaxprune._src.surgery import linen_features as linen_features

# Measuring and choosing per-layer sparsities.
from jaxprune._src.report import report as report
from jaxprune._src.report import Report as Report
from jaxprune._src.report import LeafReport as LeafReport
from jaxprune._src.report import log_name as log_name
from jaxprune._src.mask_state import find_masks as find_masks
from jaxprune._src.flops import matmul_flops_by_leaf as matmul_flops_by_leaf
from jaxprune._src.flops import xla_flops as xla_flops
from jaxprune._src.scalars import prune_scalars as prune_scalars
from jaxprune._src.progress import progress as progress
from jaxprune._src.sensitivity import sensitivity_analysis as sensitivity_analysis
from jaxprune._src.sensitivity import plot_sensitivity as plot_sensitivity
from jaxprune._src.sensitivity import SensitivityResult as SensitivityResult
from jaxprune._src.allocation import allocate_sparsities as allocate_sparsities
from jaxprune._src.allocation import as_overrides as as_overrides
from jaxprune._src.allocation import predicted_metric as predicted_metric

# Export and compression.
from jaxprune._src.export import strip as strip
from jaxprune._src.export import compact as compact
from jaxprune._src.export import densify as densify
from jaxprune._src.export import compact_bytes as compact_bytes
from jaxprune._src.export import sparse_matmul as sparse_matmul
from jaxprune._src.export import save_compressed as save_compressed
from jaxprune._src.export import load_compressed as load_compressed
from jaxprune._src.quantize import quantize as quantize
from jaxprune._src.quantize import dequantize as dequantize
from jaxprune._src.quantize import quantize_array as quantize_array
from jaxprune._src.quantize import dequantize_array as dequantize_array
from jaxprune._src.quantize import quantization_error as quantization_error
from jaxprune._src.quantize import QuantizedArray as QuantizedArray
from jaxprune._src.distill import distillation_loss as distillation_loss

# Scale-out: sharded parameters and data.
from jaxprune._src.sharding import sharded_unstructured_mask as sharded_unstructured_mask
from jaxprune._src.sharding import state_shardings as state_shardings
from jaxprune._src.sharding import data_parallel_hessian_diag as data_parallel_hessian_diag
from jaxprune._src.sharding import resolve_specs as resolve_specs

__version__ = "0.1.0"

__all__ = [
    "magnitude", "gradient", "taylor", "random_scores", "hessian_diag", "obd", "curvature",
    "gauss_newton_diag", "wanda_scores", "Elementwise", "unstructured_mask", "structured_mask",
    "nm_mask", "block_mask", "apply_masks", "hardware_mask", "HardwarePreset", "HARDWARE_PRESETS",
    "pruning_masks", "NMPattern", "BlockPattern", "uniform_sparsities", "erk_sparsities",
    "default_prunable", "prunable_flags", "sparsity", "summarize", "format_summary", "LeafSummary",
    "prune", "PruneState", "polynomial_schedule", "constant_schedule", "one_shot_schedule",
    "iterative_schedule", "add_l1", "proximal_l1", "proximal_group_lasso", "PenaltyState",
    "oneshot", "find_groups", "find_groups_nnx", "make_group", "Group", "Member",
    "SUPPORTED_PRIMITIVES", "group_scores", "group_masks", "apply_group_masks", "shrink",
    "shrink_nnx", "linen_features", "report", "Report", "LeafReport", "log_name", "find_masks",
    "matmul_flops_by_leaf", "xla_flops", "prune_scalars", "progress", "sensitivity_analysis",
    "plot_sensitivity", "SensitivityResult", "allocate_sparsities", "as_overrides",
    "predicted_metric", "strip", "compact", "densify", "compact_bytes", "sparse_matmul",
    "save_compressed", "load_compressed", "quantize", "dequantize", "quantize_array",
    "dequantize_array", "quantization_error", "QuantizedArray", "distillation_loss",
    "sharded_unstructured_mask", "state_shardings", "data_parallel_hessian_diag", "resolve_specs",
]
