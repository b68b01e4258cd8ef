"""sam_eos: sharpness-aware minimization at the edge of stability, in JAX.

The public API (see DESIGN.md): stability edges, SAM as a pure function and
as an optax transform, Hessian-vector products, Lanczos, sharpness, and a
compiled training loop that tracks them.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
"""

from sam_eos.edges import gd_edge, sam_edge, usam_edge
from sam_eos.sam import SAMGrad, sam_gradient, sam_perturbation
from sam_eos.transform import SAMState, sam

__version__ = "0.1.0"

__all__ = [
    "SAMGrad",
    "SAMState",
    "gd_edge",
    "sam",
    "sam_edge",
    "sam_gradient",
    "sam_perturbation",
    "usam_edge",
]
