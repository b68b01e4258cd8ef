"""SAM's 2-cycle on quadratics: where it exists, attracts, and stays exact.

Normalized SAM (``eps = 0``) on ``L(w) = 1/2 w^T H w`` with ``H = Q diag(lam)
Q^T`` positive definite, ``lam_1 > lam_2 >= ...``, in the eigen-coordinates
``u = Q^T w`` with ``G = ||g|| = ||H w||``::

  u_i <- m_i(G) u_i,    m_i(G) = 1 - eta lam_i (1 + rho lam_i / G).

The SAM-edge ``sam_edge(eta, rho, G)`` is the ``lam`` with ``m(G) = -1``.
Derived here and checked below in float64 against simulation, for a
diagonal and a rotated (non-diagonal) Hessian:

1. Existence. The cycle ``u_1 = +-a``, ``u_i = 0`` otherwise, needs
   ``m_1(G) = -1`` with ``G = lam_1 a``: ``a = eta rho lam_1 / (2 - eta
   lam_1)``, ``G = eta rho lam_1^2 / (2 - eta lam_1)``, so it exists iff
   ``eta lam_1 < 2``, and then ``sam_edge(eta, rho, G) = lam_1`` exactly.
2. Attraction along ``v_1``: there ``u <- (1 - eta lam_1) u - eta rho lam_1
   sign(u)``, whose 2-cycle has multiplier ``(1 - eta lam_1)^2 < 1``.
3. Attraction across: on the cycle every other direction is multiplied by
   ``m_i(G)`` per step, and ``|m_i(G)| < 1`` iff ``0 < lam_i < sam_edge(eta,
   rho, G) = lam_1``: always. So the top cycle attracts every start with
   ``u_1 != 0``, at the rate ``max(|1 - eta lam_1|, max_i |m_i(G)|)``.
4. The cycles along lower eigenvectors ``v_k`` (``eta lam_k < 2``) exist but
   are saddles: at their ``G_k`` the edge is ``lam_k < lam_1``, so
   ``m_1(G_k) < -1`` and any top component grows by ``|m_1(G_k)|``.
5. ``eta lam_1 >= 2``: no cycle; ``|m_1| >= |1 - eta lam_1| >= 1`` at every
   ``G``, and SAM diverges (for ``eta lam_1 > 2``).
6. On the cycle ``rho / ||g|| = (2 - eta lam_1) / (eta lam_1^2)``, whatever
   ``rho``: on a quadratic the prediction is exact at every ``rho`` and
   ``rho/||g||``. It stops being exact where the Hessian changes over the
   perturbation. With a quartic ``kappa/4 (v_1 . w)^4`` added, the symmetric
   cycle ``+-a`` along ``v_1`` solves ``2a = eta (lam_1 (a + rho) + kappa
   (a + rho)^3)``; in ``y = 1 + a/rho``, ``h = eta lam_1``, ``k = kappa
   rho^2 / lam_1``: ``k h y^3 + (h - 2) y + 2 = 0``. There ``S = lam_1 + 3
   kappa a^2`` and ``||g|| = lam_1 a + kappa a^3``, and ``S / sam_edge``
   departs from 1 as ``k`` grows. The two positive roots merge, and the
   cycle disappears, at ``y = 3 / (2 - h)``: the cycle exists iff
   ``kappa rho^2 / lam_1 <= (2 - h)^3 / (27 h)``; the smaller root is the
   stable one (``eta L''(a + rho) < 2``). Past that radius SAM diverges:
   at fixed ``eta`` and curvature, a growing ``rho`` first bends
   ``S / sam_edge`` away from 1, then removes the cycle.

References:
  Bartlett, Long & Bousquet, "The Dynamics of Sharpness-Aware
  Minimization", JMLR 2023; Long & Bartlett, "Sharpness-Aware Minimization
  and the Edge of Stability", arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import sam_eos as se

LAMS = np.array([50.0, 20.0, 5.0, 1.0])


def _rotation(seed: int = 0) -> np.ndarray:
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(4, 4)))
  return q * np.sign(np.diag(r))


HESSIANS = {
    "diagonal": (np.diag(LAMS), np.eye(4)),
    "rotated": (
        _rotation() @ np.diag(LAMS) @ _rotation().T,
        _rotation(),
    ),
}


def _sam(hess, w0, eta, rho, num_steps, kappa=0.0, v1=None):
  """Normalized SAM in float64; returns the iterates (num_steps + 1, d)."""

  def grad(w):
    g = hess @ w
    if kappa:
      g = g + kappa * (v1 @ w) ** 3 * v1
    return g

  ws = [np.asarray(w0, float)]
  for _ in range(num_steps):
    w = ws[-1]
    g = grad(w)
    norm = np.linalg.norm(g)
    if not np.isfinite(norm) or norm > 1e12:
      break
    ws.append(w - eta * grad(w + rho * g / norm))
  return np.array(ws)


def _cycle_grad_norm(eta, rho, lam):
  return eta * rho * lam**2 / (2 - eta * lam)


def _multiplier(eta, rho, lam, grad_norm):
  return 1 - eta * lam * (1 + rho * lam / grad_norm)


def _sam_edge(eta, rho, grad_norm) -> float:
  with jax.enable_x64(True):
    return float(se.sam_edge(eta, rho, np.float64(grad_norm)))


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
@pytest.mark.parametrize(
    "eta, rho", [(0.01, 0.1), (0.002, 0.1), (0.03, 1.0), (0.038, 0.01)]
)
def test_top_cycle_matches_closed_form(hessian, eta, rho):
  hess, q = HESSIANS[hessian]
  target = _cycle_grad_norm(eta, rho, LAMS[0])
  # Enough steps for the slowest direction, |m_4| (near 1 at small eta),
  # to fall by 1e-13.
  rate = np.max(np.abs(_multiplier(eta, rho, LAMS[1:], target)))
  num_steps = int(np.log(1e-13) / np.log(rate)) + 200
  ws = _sam(hess, q @ np.ones(4), eta, rho, num_steps)
  u = ws[-2:] @ q  # eigen-coordinates of the last two iterates
  grad_norm = np.linalg.norm(hess @ ws[-1])
  np.testing.assert_allclose(grad_norm, target, rtol=1e-9)
  np.testing.assert_allclose(
      np.abs(u[:, 0]), target / LAMS[0], rtol=1e-9
  )  # a = eta rho lam1 / (2 - eta lam1)
  assert u[0, 0] == pytest.approx(-u[1, 0], rel=1e-9)
  assert np.all(np.abs(u[:, 1:]) < 1e-9 * target / LAMS[0])
  # The SAM-edge at the cycle's gradient norm is lam1, exactly.
  assert _sam_edge(eta, rho, grad_norm) == pytest.approx(LAMS[0], rel=1e-9)
  assert _sam_edge(eta, rho, target) == pytest.approx(LAMS[0], rel=1e-13)
  # rho/||g|| on the cycle is set by eta lam1 alone.
  h = eta * LAMS[0]
  assert rho / grad_norm == pytest.approx((2 - h) / (h * LAMS[0]), rel=1e-9)


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
def test_other_directions_decay_at_the_closed_form_rate(hessian):
  hess, q = HESSIANS[hessian]
  eta, rho = 0.01, 0.1
  grad_norm = _cycle_grad_norm(eta, rho, LAMS[0])
  rates = np.abs(_multiplier(eta, rho, LAMS, grad_norm))
  np.testing.assert_allclose(rates[0], 1.0)  # the cycle itself
  assert np.all(rates[1:] < 1)  # lam_i < lam1 = the edge at the cycle
  np.testing.assert_allclose(rates[1:], [0.56, 0.935, 0.9894], rtol=1e-12)
  ws = _sam(hess, q @ np.ones(4), eta, rho, 400)
  u = np.abs(ws @ q)
  # Steps 200-260, on the cycle: u_3 and u_4 shrink by |m_i(G)| per step
  # (u_2 falls below float64 rounding of the rotated iterate too soon to
  # measure; the approach to the cycle is as slow as the slowest |m_i|).
  measured = (u[260, 2:] / u[200, 2:]) ** (1 / 60)
  np.testing.assert_allclose(measured, rates[2:], rtol=1e-4)


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
def test_lower_cycles_are_saddles(hessian):
  hess, q = HESSIANS[hessian]
  eta, rho = 0.01, 0.1
  g2 = _cycle_grad_norm(eta, rho, LAMS[1])  # the cycle along v2
  growth = abs(_multiplier(eta, rho, LAMS[0], g2))
  assert _sam_edge(eta, rho, g2) == pytest.approx(LAMS[1], rel=1e-12)
  assert growth > 1 and growth == pytest.approx(10.75, rel=1e-12)
  u0 = np.array([1e-10, g2 / LAMS[1], 0.0, 0.0])
  ws = _sam(hess, q @ u0, eta, rho, 2000)
  u = np.abs(ws @ q)
  # The top component grows by |m_1(G_2)| per step while on the v2 cycle...
  assert (u[4, 0] / u[0, 0]) ** (1 / 4) == pytest.approx(growth, rel=1e-3)
  # ...and SAM ends on the top cycle.
  np.testing.assert_allclose(
      np.linalg.norm(hess @ ws[-1]),
      _cycle_grad_norm(eta, rho, LAMS[0]),
      rtol=1e-9,
  )


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
def test_no_cycle_past_the_gd_edge(hessian):
  hess, q = HESSIANS[hessian]
  eta = 2.2 / LAMS[0]
  for grad_norm in np.geomspace(1e-6, 1e6, 13):
    assert abs(_multiplier(eta, 0.1, LAMS[0], grad_norm)) > 1.2 - 1e-12
  ws = _sam(hess, q @ np.ones(4), eta, 0.1, 2000)
  assert np.linalg.norm(hess @ ws[-1]) > 1e10  # stopped: diverged


def _quartic_cycles(h: float, k: float) -> np.ndarray:
  """Positive roots ``x = a/rho`` of ``k h y^3 + (h - 2) y + 2 = 0``."""
  roots = np.roots([k * h, 0.0, h - 2, 2.0])
  y = np.sort(roots[np.abs(roots.imag) < 1e-12].real)
  return y[y > 1] - 1


def _critical_k(h: float) -> float:
  return (2 - h) ** 3 / (27 * h)


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
@pytest.mark.parametrize(
    "eta, rho, k",
    [(0.01, 0.1, 0.01), (0.01, 0.1, 0.1), (0.005, 0.1, 0.1), (0.02, 0.1, 0.03)],
)
def test_a_quartic_term_makes_the_prediction_inexact(hessian, eta, rho, k):
  hess, q = HESSIANS[hessian]
  lam1, v1 = LAMS[0], q[:, 0]
  h, kappa = eta * lam1, k * lam1 / rho**2
  assert k < _critical_k(h)
  x = _quartic_cycles(h, k)[0]  # the smaller root: the stable cycle
  a = x * rho
  assert eta * (lam1 + 3 * kappa * (a + rho) ** 2) < 2
  sharpness = lam1 + 3 * kappa * a**2
  grad_norm = lam1 * a + kappa * a**3
  predicted = sharpness / _sam_edge(eta, rho, grad_norm)
  ws = _sam(hess, q @ np.ones(4) * 0.05, eta, rho, 6000, kappa=kappa, v1=v1)
  u1 = ws[-2:] @ v1
  np.testing.assert_allclose(np.abs(u1), a, rtol=1e-8)
  assert u1[0] == pytest.approx(-u1[1], rel=1e-8)
  g = hess @ ws[-1] + kappa * u1[1] ** 3 * v1
  np.testing.assert_allclose(np.linalg.norm(g), grad_norm, rtol=1e-8)
  top = np.linalg.eigvalsh(hess + 3 * kappa * u1[1] ** 2 * np.outer(v1, v1))
  measured = top[-1] / _sam_edge(eta, rho, np.linalg.norm(g))
  assert measured == pytest.approx(predicted, rel=1e-8)
  assert abs(predicted - 1) > 1e-3  # no longer exact


def test_quartic_cycle_exists_up_to_the_critical_curvature():
  for h in (0.25, 0.5, 1.0, 1.5):
    k_star = _critical_k(h)
    assert len(_quartic_cycles(h, 0.99 * k_star)) == 2
    assert len(_quartic_cycles(h, 1.01 * k_star)) == 0
    # At the merger y = 3 / (2 - h), and the cycle is marginally stable.
    y = 3 / (2 - h)
    assert k_star * h * y**3 + (h - 2) * y + 2 == pytest.approx(0, abs=1e-12)
    assert h * (1 + 3 * k_star * y**2) == pytest.approx(2, rel=1e-12)
  # At eta lam1 = 0.5 and k = 0.01 the closed form gives S / edge = 0.9928.
  x = _quartic_cycles(0.5, 0.01)[0]
  ratio = (
      0.5
      * (1 + 3 * 0.01 * x**2)
      * (1 + np.sqrt(1 + 8 / (0.5 * (x + 0.01 * x**3))))
      / 4
  )
  assert ratio == pytest.approx(0.99277, abs=5e-5)


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
@pytest.mark.parametrize("eta", [0.005, 0.01, 0.02])
def test_past_the_critical_radius_sam_diverges(hessian, eta):
  # kappa = 50, lam1 = 50: k = rho^2, so the cycle exists iff rho <= rho*.
  hess, q = HESSIANS[hessian]
  v1, kappa, h = q[:, 0], 50.0, eta * LAMS[0]
  rho_star = np.sqrt(_critical_k(h))
  start = q @ np.ones(4) * 0.05
  below = _sam(hess, start, eta, 0.95 * rho_star, 4000, kappa=kappa, v1=v1)
  x = _quartic_cycles(h, 0.95**2 * _critical_k(h))[0]
  np.testing.assert_allclose(
      np.abs(below[-1] @ v1), x * 0.95 * rho_star, rtol=1e-6
  )
  above = _sam(hess, start, eta, 1.05 * rho_star, 4000, kappa=kappa, v1=v1)
  assert len(above) < 100  # stopped early: ||g|| > 1e12
