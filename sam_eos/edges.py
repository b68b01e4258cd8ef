"""Stability edges of GD, SAM and unnormalized SAM on a quadratic.

Along a Hessian eigenvector with eigenvalue ``lam``, one step of each method
multiplies the error by a factor whose magnitude must stay <= 1 (Long &
Bartlett 2023, Sec. 3). With heavy-ball momentum ``beta`` the threshold ``2``
becomes ``c = 2 * (1 + beta)``:

* GD:   ``eta * lam = c``                            -> ``lam = c / eta``
* SAM:  ``eta * lam * (1 + rho * lam / ||g||) = c``  -> SAM-edge
* USAM: ``eta * lam * (1 + rho * lam) = c``          -> USAM-edge

For Adam with a frozen preconditioner, ``adam_edge`` gives the threshold on
the preconditioned sharpness (Cohen et al. 2022).

The quadratics are solved in the cancellation-free form
``lam = 2c / (eta * (1 + sqrt(1 + 4 * c * r / eta)))`` with ``r = rho / ||g||``
(SAM) or ``r = rho`` (USAM), which is exact at ``r = 0`` and never subtracts
nearly equal numbers.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Eq. (2) and Theorem 1.
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021 (the GD edge 2/eta and its momentum form).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sam_eos import _checks
from sam_eos._types import ArrayLike


def _threshold(momentum: ArrayLike) -> jnp.ndarray:
  """Returns ``2 * (1 + momentum)``, the heavy-ball stability threshold."""
  _checks.check_momentum(momentum)
  return 2.0 * (1.0 + jnp.asarray(momentum))


def _quadratic_edge(
    learning_rate: ArrayLike, ratio: jnp.ndarray, threshold: jnp.ndarray
) -> jnp.ndarray:
  """Positive root of ``eta * lam * (1 + ratio * lam) = threshold``."""
  eta = jnp.asarray(learning_rate)
  disc = jnp.sqrt(1.0 + 4.0 * threshold * ratio / eta)
  return 2.0 * threshold / (eta * (1.0 + disc))


def gd_edge(
    learning_rate: ArrayLike, *, momentum: ArrayLike = 0.0
) -> jnp.ndarray:
  """Edge of stability of (heavy-ball) gradient descent, ``2 (1 + beta) / eta``.

  Args:
    learning_rate: step size ``eta > 0``; scalar or array (broadcasts).
    momentum: heavy-ball coefficient ``beta`` in ``[0, 1)``.

  Returns:
    The largest Hessian eigenvalue for which GD is stable on a quadratic.

  Raises:
    ValueError: if a concrete ``learning_rate <= 0`` or ``momentum`` outside
      ``[0, 1)``.

  Examples:
    >>> import sam_eos as se
    >>> float(se.gd_edge(0.01))
    200.0
    >>> float(se.gd_edge(0.01, momentum=0.9))
    380.0

  References:
    Cohen et al. 2021, Sec. 2 and Appendix (momentum); Long & Bartlett 2023.
  """
  _checks.check_positive("learning_rate", learning_rate)
  return _threshold(momentum) / jnp.asarray(learning_rate)


def sam_edge(
    learning_rate: ArrayLike,
    rho: ArrayLike,
    grad_norm: ArrayLike,
    *,
    momentum: ArrayLike = 0.0,
) -> jnp.ndarray:
  """The SAM-edge: the largest eigenvalue normalized SAM is stable at.

  Solves ``eta * lam * (1 + rho * lam / ||g||) = 2 (1 + beta)`` for
  ``lam > 0``:
  ``lam_SAM = 4 (1 + beta) / (eta (1 + sqrt(1 + 8 (1 + beta) rho / (eta ||g||))))``,
  equal to ``||g|| / (2 rho) (sqrt(1 + 8 rho / (eta ||g||)) - 1)`` when
  ``beta = 0``. It is ``gd_edge`` at ``rho = 0`` and tends to 0 as
  ``||g|| -> 0`` (exactly 0 at ``||g|| = 0``, never NaN).

  Momentum (heavy-ball as in ``optax.sgd(eta, momentum=beta)``, the
  perturbation along the raw gradient): with ``||g||`` held fixed this is the
  exact linear stability threshold, and the 2-cycle along the top eigenvector
  of a quadratic sits exactly on it (``||g|| = eta rho lam1^2 / (2 (1 + beta)
  - eta lam1)``), as simulations confirm (tests/test_edges_momentum.py). With
  ``beta >= 0.5`` SAM can also settle on other periodic orbits, on which
  ``||g||`` varies from step to step and the top eigenvalue sits below the
  edge (e.g. a ratio of 0.4-0.7 at ``beta = 0.9``): there the edge is an
  upper bound, not a level SAM hovers at.

  Args:
    learning_rate: step size ``eta > 0``; scalar or array (broadcasts).
    rho: SAM radius ``rho >= 0``.
    grad_norm: ``||grad L(w)||`` at the current iterate on the step's batch,
      ``>= 0``.
    momentum: heavy-ball coefficient ``beta`` in ``[0, 1)``.

  Returns:
    The SAM-edge, broadcast over the inputs.

  Raises:
    ValueError: for concrete ``learning_rate <= 0``, ``rho < 0``,
      ``grad_norm < 0`` or ``momentum`` outside ``[0, 1)``.

  Examples:
    The 2-cycle test vector of DESIGN.md: on ``diag(50, 20, 5, 1)`` with
    ``eta = 0.01`` and ``rho = 0.1`` SAM settles at
    ``||g|| = eta rho lam1^2 / (2 - eta lam1) = 5/3``, where the edge is 50:

    >>> import sam_eos as se
    >>> round(float(se.sam_edge(0.01, 0.1, 0.01 * 0.1 * 50**2 / (2 - 0.5))), 4)
    50.0

  References:
    Long & Bartlett 2023, Eq. (2) and Theorem 1.
  """
  _checks.check_positive("learning_rate", learning_rate)
  _checks.check_nonnegative("rho", rho)
  _checks.check_nonnegative("grad_norm", grad_norm)
  rho = jnp.asarray(rho)
  grad_norm = jnp.asarray(grad_norm)
  safe_norm = jnp.where(rho > 0, grad_norm, 1.0)
  ratio = jnp.where(rho > 0, rho / safe_norm, 0.0)
  return _quadratic_edge(learning_rate, ratio, _threshold(momentum))


def usam_edge(
    learning_rate: ArrayLike, rho: ArrayLike, *, momentum: ArrayLike = 0.0
) -> jnp.ndarray:
  """Edge of unnormalized SAM, the root of ``eta lam (1 + rho lam) = 2(1+beta)``.

  Args:
    learning_rate: step size ``eta > 0``; scalar or array (broadcasts).
    rho: USAM radius ``rho >= 0``.
    momentum: heavy-ball coefficient ``beta`` in ``[0, 1)``.

  Returns:
    ``4 (1 + beta) / (eta (1 + sqrt(1 + 8 (1 + beta) rho / eta)))``.

  Raises:
    ValueError: for concrete ``learning_rate <= 0``, ``rho < 0`` or
      ``momentum`` outside ``[0, 1)``.

  Examples:
    The positive root of ``0.1 lam (1 + 0.5 lam) = 2``:

    >>> import sam_eos as se
    >>> round(float(se.usam_edge(0.1, 0.5)), 4)
    5.4031

  References:
    Long & Bartlett 2023, Sec. 3 (unnormalized SAM); Agarwala & Dauphin,
    "SAM operates far from home", ICML 2023.
  """
  _checks.check_positive("learning_rate", learning_rate)
  _checks.check_nonnegative("rho", rho)
  return _quadratic_edge(learning_rate, jnp.asarray(rho), _threshold(momentum))


def adam_edge(learning_rate: ArrayLike, b1: ArrayLike) -> jnp.ndarray:
  """Adaptive edge of stability of Adam/RMSProp, ``(2 + 2 b1) / (eta (1 - b1))``.

  Freeze Adam's preconditioner ``P = diag(sqrt(v_hat) + eps)`` and its update
  on a quadratic ``0.5 w^T H w`` is heavy-ball momentum on ``P^{-1} H`` in EMA
  form, ``m <- b1 m + (1 - b1) g``, ``w <- w - eta P^{-1} m``: heavy-ball
  with step ``eta (1 - b1)`` and momentum ``b1``. It is stable iff every
  eigenvalue of ``P^{-1} H`` (equivalently of ``P^{-1/2} H P^{-1/2}``, see
  ``se.preconditioned_sharpness``) is at most ``2 (1 + b1) / (eta (1 - b1))``:
  ``38 / eta`` at ``b1 = 0.9`` and ``2 / eta`` at ``b1 = 0`` (RMSProp).
  Cohen et al. (2022) observe full-batch Adam's preconditioned sharpness
  rise to this value and hover there.

  Args:
    learning_rate: step size ``eta > 0``; scalar or array (broadcasts).
    b1: Adam's first-moment decay in ``[0, 1)``.

  Returns:
    The largest preconditioned-Hessian eigenvalue at which frozen-
    preconditioner Adam is stable on a quadratic.

  Raises:
    ValueError: for a concrete ``learning_rate <= 0`` or ``b1`` outside
      ``[0, 1)``.

  Examples:
    >>> import sam_eos as se
    >>> round(float(se.adam_edge(0.01, 0.9)), 2)  # 38 / eta
    3800.0
    >>> float(se.adam_edge(0.01, 0.0)) == float(se.gd_edge(0.01))
    True

  References:
    Cohen et al., "Adaptive Gradient Methods at the Edge of Stability",
    arXiv:2207.14484, 2022, Sec. 3 (the threshold ``(2 + 2 b1) / ((1 - b1)
    eta)``).
  """
  _checks.check_positive("learning_rate", learning_rate)
  arr = _checks.concrete_value(b1)
  if arr is not None and not np.all((arr >= 0) & (arr < 1)):
    raise ValueError(f"`b1` must lie in [0, 1), got {b1!r}.")
  b1 = jnp.asarray(b1)
  return (2.0 + 2.0 * b1) / (jnp.asarray(learning_rate) * (1.0 - b1))


def stability_edges(
    learning_rate: ArrayLike,
    rho: ArrayLike,
    grad_norm: ArrayLike,
    *,
    momentum: ArrayLike = 0.0,
    normalize: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``gd_edge`` and the SAM-edge (the USAM edge if not ``normalize``).

  The pair every tracked step records (``se.train``, ``SharpnessTracker``).

  Args:
    learning_rate: step size ``eta``.
    rho: SAM radius.
    grad_norm: ``||g||`` at the iterate (unused by the USAM edge).
    momentum: heavy-ball coefficient ``beta``.
    normalize: normalized SAM (the SAM-edge) or unnormalized (USAM edge).

  Returns:
    ``(gd_edge, sam_edge)``.

  Examples:
    >>> from sam_eos.edges import stability_edges
    >>> [round(float(x), 4) for x in stability_edges(0.1, 0.0, 1.0)]
    [20.0, 20.0]
  """
  gd = gd_edge(learning_rate, momentum=momentum)
  if normalize:
    return gd, sam_edge(learning_rate, rho, grad_norm, momentum=momentum)
  return gd, usam_edge(learning_rate, rho, momentum=momentum)
