"""The momentum edges against simulations of heavy-ball GD and SAM.

Heavy-ball momentum here is optax's ``sgd(eta, momentum=beta)``:
``m <- beta m + g``, ``w <- w - eta m``. On a quadratic with eigenvalue
``lam`` the error obeys ``x' = (1 + beta - eta lam) x - beta x_prev``, stable
iff ``eta lam <= 2 (1 + beta)``. With the gradient norm in SAM's normalization
held fixed at ``G``, SAM is heavy-ball on the effective curvature
``lam (1 + rho lam / G)``, so its threshold is ``sam_edge(eta, rho, G,
momentum=beta)``. For the real (normalized) SAM the edge is what the 2-cycle
along the top eigenvector sits on; with ``beta >= 0.5`` SAM can also settle
on other periodic orbits, below its edge (the last test records one).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_eos as se


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


H = jnp.array([50.0, 20.0, 5.0, 1.0])
ETA, RHO = 0.01, 0.1


def quadratic(w):
  return 0.5 * jnp.sum(H * w**2)


def run_sam(w0, m0, *, eta, rho, beta, num_steps, normalize=True):
  """Heavy-ball SAM on ``0.5 w^T diag(H) w`` by hand; returns ``||g_t||``."""

  def step(carry, _):
    w, m = carry
    g = H * w
    norm = jnp.linalg.norm(g)
    e = rho * g / norm if normalize else rho * g
    m = beta * m + H * (w + e)
    w = w - eta * m
    return (w, m), (jnp.linalg.norm(H * w), w)

  return jax.lax.scan(step, (w0, m0), None, length=num_steps)[1]


run_sam = jax.jit(run_sam, static_argnames=("num_steps", "normalize"))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_hand_written_recursion_is_se_sam_with_optax_momentum(beta):
  w = jnp.array([1.0, -0.5, 0.25, 2.0])
  opt = se.sam(optax.sgd(ETA, momentum=beta), RHO)
  state = opt.init(w)
  path = []
  for _ in range(5):
    updates, state = opt.update(
        jax.grad(quadratic)(w), state, w, grad_fn=jax.grad(quadratic)
    )
    w = optax.apply_updates(w, updates)
    path.append(w)
  _, ws = run_sam(
      jnp.array([1.0, -0.5, 0.25, 2.0]),
      jnp.zeros(4),
      eta=ETA,
      rho=RHO,
      beta=beta,
      num_steps=5,
  )
  chex.assert_trees_all_close(jnp.stack(path), ws, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_heavy_ball_gd_stable_below_unstable_above(beta):
  edge = float(se.gd_edge(ETA, momentum=beta))
  for factor, grows in ((0.99, False), (1.01, True)):
    lam = factor * edge
    x, x_prev = 1.0, 1.0
    for _ in range(3000):
      x, x_prev = (1 + beta - ETA * lam) * x - beta * x_prev, x
    assert (abs(x) > 1.0) == grows, (beta, factor, x)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("grad_norm", [0.3, 3.0])
def test_frozen_norm_sam_stable_below_unstable_above(beta, grad_norm):
  # SAM with ||g|| frozen at G is USAM with radius rho / G.
  edge = float(se.sam_edge(ETA, RHO, grad_norm, momentum=beta))
  chex.assert_trees_all_close(
      edge, se.usam_edge(ETA, RHO / grad_norm, momentum=beta), rtol=1e-12
  )
  for factor, grows in ((0.99, False), (1.01, True)):
    h = jnp.array([factor * edge, 0.5 * edge])
    w = jnp.ones(2)
    m = jnp.zeros(2)
    for _ in range(3):  # 3 x 1000 steps, in a jitted loop
      w, m = _frozen(w, m, h, RHO / grad_norm, beta)
    assert bool(jnp.abs(w[0]) > 1.0) == grows, (beta, factor, w)
    assert float(jnp.abs(w[1])) < 1e-6


@jax.jit
def _frozen(w, m, h, ratio, beta):
  def step(carry, _):
    w, m = carry
    m = beta * m + h * (w + ratio * h * w)
    return (w - ETA * m, m), None

  return jax.lax.scan(step, (w, m), None, length=1000)[0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9])
def test_two_cycle_sits_on_the_momentum_sam_edge(beta):
  lam = float(H[0])
  threshold = 2 * (1 + beta)
  norm = ETA * RHO * lam**2 / (threshold - ETA * lam)
  # The 2-cycle x_t = +-a along e_1 with m_t = -+2 a / eta; start 10% off it
  # (its basin is not global: see the last test).
  a = norm / lam
  w0 = jnp.array([1.1 * a, 0.01, -0.01, 0.01])
  m0 = jnp.array([-2 * a / ETA, 0.0, 0.0, 0.0])
  norms, ws = run_sam(w0, m0, eta=ETA, rho=RHO, beta=beta, num_steps=4000)
  chex.assert_trees_all_close(norms[-10:], jnp.full(10, norm), rtol=1e-9)
  chex.assert_trees_all_close(
      jnp.abs(ws[-1]), jnp.array([a, 0.0, 0.0, 0.0]), atol=1e-9
  )
  chex.assert_trees_all_close(
      se.sam_edge(ETA, RHO, norms[-1], momentum=beta), lam, rtol=1e-9
  )
  if beta > 0:  # the momentum-free edge does not: it is lower
    assert float(se.sam_edge(ETA, RHO, norms[-1])) < 0.9 * lam


def test_large_momentum_can_settle_below_the_edge():
  # From w0 = (1, 1, 1, 1) and m0 = 0, beta = 0.9, SAM ends on a 3-cycle of
  # ||g|| (not the 2-cycle): the per-step edge is 52-115, above lam1 = 50.
  norms, _ = run_sam(
      jnp.ones(4), jnp.zeros(4), eta=ETA, rho=RHO, beta=0.9, num_steps=20000
  )
  last = np.asarray(norms[-30:])
  chex.assert_trees_all_close(last[3:], last[:-3], rtol=1e-8)
  edges = np.asarray(se.sam_edge(ETA, RHO, last, momentum=0.9))
  assert np.all(edges > float(H[0])), edges
  assert np.median(float(H[0]) / edges) < 0.5
