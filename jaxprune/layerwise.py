"""Layer-wise pruning with weight reconstruction: calibration and Optimal Brain Surgeon solvers.

Each kernel ``W`` (inputs × outputs, as `calibrate` views it) is pruned to keep its layer's
outputs ``XW`` on calibration inputs ``X``: the loss ``trace(ΔWᵀ H ΔW)`` with ``H = XᵀX``.
`calibrate` collects ``H`` per kernel from any ``apply_fn``; `obc` (exact greedy OBS),
`sparsegpt` (blocked OBS) and `refit` (least squares for a given mask) solve one layer.
`jaxprune.oneshot` runs them over a whole model.

References: Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain
Surgeon", 1993; Frantar & Alistarh, "Optimal Brain Compression", 2022; Frantar & Alistarh,
"SparseGPT", 2023; Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models" (Wanda), 2023.
"""

from jaxprune._src.calibration import calibrate as calibrate
from jaxprune._src.calibration import stages as stages
from jaxprune._src.calibration import Calibration as Calibration
from jaxprune._src.calibration import Calibrator as Calibrator
from jaxprune._src.obc import obc as obc
from jaxprune._src.obc import obc_path as obc_path
from jaxprune._src.obc import obc_mask as obc_mask
from jaxprune._src.obc import obc_losses as obc_losses
from jaxprune._src.obc import ObcPath as ObcPath
from jaxprune._src.sparsegpt import sparsegpt as sparsegpt
from jaxprune._src.sparsegpt import sparsegpt_losses as sparsegpt_losses
from jaxprune._src.refit import refit as refit
from jaxprune._src.obs import wanda as wanda
from jaxprune._src.obs import dense_target as dense_target
from jaxprune._src.obs import layer_loss as layer_loss
from jaxprune._src.oneshot import Layer as Layer

__all__ = [
    "Calibration", "Calibrator", "Layer", "ObcPath", "calibrate", "dense_target", "layer_loss",
    "obc", "obc_losses", "obc_mask", "obc_path", "refit", "sparsegpt", "sparsegpt_losses",
    "stages", "wanda",
]
