"""jaxprune: neural-network pruning for JAX.

A flat public API over pure functions: score functions map parameter pytrees to
importance pytrees, mask functions turn scores into boolean masks, and optax
transformations keep pruned weights at exactly zero inside jitted train steps.
"""

# --- core: scores, masks, selection (issue 2) ---
# --- end core ---

# --- optax integration: prune, schedules, penalties (issue 3) ---
# --- end optax ---

# --- structured pruning and surgery (issue 5) ---
# --- end structured ---

# --- reports, sensitivity, export (issue 6) ---
from jaxprune._src.report import LeafReport, Report, matmul_flops_by_leaf, report, xla_flops
# --- end reports ---

# --- sharding (issue 7) ---
# --- end sharding ---

__version__ = "0.1.0"
