"""jaxprune: neural-network pruning for JAX.

The top level holds the everyday path: score functions map parameter pytrees to importance
pytrees, mask functions and the pruning policy (`pruning_masks`) turn scores into boolean masks,
`prune` keeps pruned weights at exactly zero inside jitted optax train steps, `oneshot` prunes a
trained model at once from calibration data, and `report` measures what pruning bought.

Specialist parts live in subpackages:

* `jaxprune.structured`: dependency groups, group masks and surgery that removes whole units;
* `jaxprune.layerwise`: calibration and the layer solvers (OBC, SparseGPT, refit, Wanda);
* `jaxprune.compress`: sparse storage, compressed checkpoints and quantization;
* `jaxprune.sharding`: masks, states and Hessian estimates over device meshes.
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
from jaxprune._src.policy_args import NMPattern as NMPattern
from jaxprune._src.policy_args import BlockPattern as BlockPattern
from jaxprune._src.distribution import uniform_sparsities as uniform_sparsities
from jaxprune._src.distribution import erk_sparsities as erk_sparsities
from jaxprune._src.tree import default_prunable as default_prunable
from jaxprune._src.tree import prunable_flags as prunable_flags
from jaxprune._src.summary import sparsity as sparsity

# optax transformations and schedules.
from jaxprune._src.transform import prune as prune
from jaxprune._src.transform import PruneState as PruneState
from jaxprune._src.mask_state import find_masks as find_masks
from jaxprune._src.scalars import prune_scalars as prune_scalars
from jaxprune._src.schedules import polynomial_schedule as polynomial_schedule
from jaxprune._src.schedules import constant_schedule as constant_schedule
from jaxprune._src.schedules import one_shot_schedule as one_shot_schedule
from jaxprune._src.schedules import iterative_schedule as iterative_schedule
from jaxprune._src.penalties import add_l1 as add_l1
from jaxprune._src.penalties import proximal_l1 as proximal_l1
from jaxprune._src.penalties import proximal_group_lasso as proximal_group_lasso
from jaxprune._src.penalties import PenaltyState as PenaltyState
from jaxprune._src.distill import distillation_loss as distillation_loss

# One-shot pruning with calibration data (layer-wise Optimal Brain Surgeon).
from jaxprune._src.oneshot import oneshot as oneshot

# Measuring and choosing per-layer sparsities.
from jaxprune._src.report import report as report
from jaxprune._src.report import Report as Report
from jaxprune._src.report import LeafReport as LeafReport
from jaxprune._src.flops import matmul_flops_by_leaf as matmul_flops_by_leaf
from jaxprune._src.sensitivity import sensitivity_analysis as sensitivity_analysis
from jaxprune._src.sensitivity import plot_sensitivity as plot_sensitivity
from jaxprune._src.sensitivity import SensitivityResult as SensitivityResult
from jaxprune._src.allocation import allocate_sparsities as allocate_sparsities
from jaxprune._src.allocation import as_overrides as as_overrides
from jaxprune._src.allocation import predicted_metric as predicted_metric

# Specialist subpackages.
from jaxprune import compress as compress
from jaxprune import layerwise as layerwise
from jaxprune import sharding as sharding
from jaxprune import structured as structured

__version__ = "0.1.0"

__all__ = [
    "BlockPattern", "Elementwise", "HARDWARE_PRESETS", "HardwarePreset", "LeafReport",
    "NMPattern", "PenaltyState", "PruneState", "Report", "SensitivityResult", "add_l1",
    "allocate_sparsities", "apply_masks", "as_overrides", "block_mask", "compress",
    "constant_schedule", "curvature", "default_prunable", "distillation_loss", "erk_sparsities",
    "find_masks", "gauss_newton_diag", "gradient", "hardware_mask", "hessian_diag",
    "iterative_schedule", "layerwise", "magnitude", "matmul_flops_by_leaf", "nm_mask", "obd",
    "one_shot_schedule", "oneshot", "plot_sensitivity", "polynomial_schedule", "predicted_metric",
    "proximal_group_lasso", "proximal_l1", "prunable_flags", "prune", "prune_scalars",
    "pruning_masks", "random_scores", "report", "sensitivity_analysis", "sharding", "sparsity",
    "structured", "structured_mask", "taylor", "uniform_sparsities", "unstructured_mask",
    "wanda_scores",
]
