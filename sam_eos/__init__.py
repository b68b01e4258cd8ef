"""sam_eos: sharpness-aware minimization at the edge of stability, in JAX.

The public API (see DESIGN.md): stability edges, SAM as a pure function and
as an optax transform, Hessian-vector products, Lanczos, sharpness, and a
compiled training loop that tracks them.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
"""

from sam_eos.density import hessian_trace, spectral_density
from sam_eos.edges import adam_edge, gd_edge, sam_edge, usam_edge
from sam_eos.hessian import hessian_matvec, hvp
from sam_eos.history import HISTORY_COLUMNS, read_csv
from sam_eos.lanczos import LanczosResult, lanczos
from sam_eos.nnx import NNXLoss, nnx_loss, nnx_merge
from sam_eos.parallel import data_mesh, masked_mean, pad_to_multiple
from sam_eos.preconditioned import (
    adam_preconditioner,
    eps_floor_fraction,
    preconditioned_sharpness,
)
from sam_eos.sam import SAMGrad, sam_gradient, sam_perturbation
from sam_eos.spectrum import (
    Eigenpairs,
    PowerIterationResult,
    hessian_eigenpairs,
    power_iteration,
    sharpness,
)
from sam_eos.stochastic import BatchEstimate, batch_sam_edge, batch_sharpness
from sam_eos.tracker import SharpnessTracker, TrackerMetrics, TrackerState
from sam_eos.train import TrainResult, TrainingDiverged, train
from sam_eos.transform import SAMState, sam

__version__ = "0.1.0"

__all__ = [
    "BatchEstimate",
    "Eigenpairs",
    "HISTORY_COLUMNS",
    "LanczosResult",
    "NNXLoss",
    "PowerIterationResult",
    "SAMGrad",
    "SAMState",
    "SharpnessTracker",
    "TrackerMetrics",
    "TrackerState",
    "TrainResult",
    "TrainingDiverged",
    "adam_edge",
    "adam_preconditioner",
    "batch_sam_edge",
    "batch_sharpness",
    "data_mesh",
    "eps_floor_fraction",
    "gd_edge",
    "hessian_eigenpairs",
    "hessian_matvec",
    "hessian_trace",
    "hvp",
    "lanczos",
    "masked_mean",
    "nnx_loss",
    "nnx_merge",
    "pad_to_multiple",
    "power_iteration",
    "preconditioned_sharpness",
    "read_csv",
    "sam",
    "sam_edge",
    "sam_gradient",
    "sam_perturbation",
    "sharpness",
    "spectral_density",
    "train",
    "usam_edge",
]
