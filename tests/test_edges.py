"""Edges against their defining equations, the paper's form and limits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos as se


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


ETAS = np.array([1e-3, 0.01, 0.1, 1.0])
RHOS = np.array([1e-4, 0.01, 0.1, 1.0])
NORMS = np.array([1e-6, 1e-2, 1.0, 30.0])


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sam_edge_solves_its_equation(momentum):
  eta, rho, g = np.meshgrid(ETAS, RHOS, NORMS, indexing="ij")
  lam = np.asarray(se.sam_edge(eta, rho, g, momentum=momentum))
  chex.assert_trees_all_close(
      eta * lam * (1 + rho * lam / g),
      np.full_like(lam, 2 * (1 + momentum)),
      rtol=1e-12,
  )
  assert np.all(lam > 0)


def test_sam_edge_equals_paper_form():
  eta, rho, g = np.meshgrid(ETAS, RHOS, NORMS, indexing="ij")
  paper = g / (2 * rho) * (np.sqrt(1 + 8 * rho / (eta * g)) - 1)
  # The paper's form cancels catastrophically when 8 rho / (eta g) is tiny.
  ok = 8 * rho / (eta * g) > 1e-6
  chex.assert_trees_all_close(
      np.asarray(se.sam_edge(eta, rho, g))[ok], paper[ok], rtol=1e-9
  )


def test_usam_edge_solves_its_equation():
  for momentum in (0.0, 0.9):
    eta, rho = np.meshgrid(ETAS, RHOS, indexing="ij")
    lam = np.asarray(se.usam_edge(eta, rho, momentum=momentum))
    chex.assert_trees_all_close(
        eta * lam * (1 + rho * lam),
        np.full_like(lam, 2 * (1 + momentum)),
        rtol=1e-12,
    )


def test_limits():
  chex.assert_trees_all_close(se.sam_edge(0.01, 0.0, 3.0), se.gd_edge(0.01))
  chex.assert_trees_all_close(se.sam_edge(0.01, 0.0, 0.0), se.gd_edge(0.01))
  chex.assert_trees_all_close(
      se.usam_edge(0.01, 0.0, momentum=0.5), se.gd_edge(0.01, momentum=0.5)
  )
  assert float(se.sam_edge(0.01, 0.1, 0.0)) == 0.0
  # Monotone: a smaller gradient norm gives a lower edge, below 2/eta.
  edges = np.asarray(se.sam_edge(0.01, 0.1, jnp.array([1e-3, 1e-1, 10.0])))
  assert np.all(np.diff(edges) > 0) and np.all(edges < 200.0)
  # Tiny rho / ||g||: no cancellation, first-order expansion 2/eta - 4 rho/(eta^2 g).
  chex.assert_trees_all_close(
      se.sam_edge(1.0, 1e-12, 1.0), 2.0 - 4e-12, rtol=1e-15
  )


def test_gd_edge_momentum():
  chex.assert_trees_all_close(se.gd_edge(0.1, momentum=0.9), 38.0)


def test_float32_no_nan_and_grad_finite():
  with jax.enable_x64(False):
    out = se.sam_edge(jnp.float32(0.01), jnp.float32(0.1), jnp.float32(0.0))
    chex.assert_tree_all_finite(out)
    grad = jax.grad(lambda g: se.sam_edge(0.01, 0.1, g))(jnp.float32(1.0))
    chex.assert_tree_all_finite(grad)


def test_traced_and_vmapped_hyperparameters():
  f = jax.jit(jax.vmap(lambda eta, rho: se.sam_edge(eta, rho, 1.0)))
  out = f(jnp.array([0.01, 0.1]), jnp.array([0.1, 0.0]))
  chex.assert_trees_all_close(
      out, jnp.array([se.sam_edge(0.01, 0.1, 1.0), 20.0])
  )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: se.gd_edge(0.0), "learning_rate"),
        (lambda: se.gd_edge(-1.0), "learning_rate"),
        (lambda: se.sam_edge(0.1, -0.1, 1.0), "rho"),
        (lambda: se.sam_edge(0.1, 0.1, -1.0), "grad_norm"),
        (lambda: se.usam_edge(0.1, -1.0), "rho"),
        (lambda: se.gd_edge(0.1, momentum=1.0), "momentum"),
    ],
)
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_adam_edge_closed_form_and_limits():
  eta = np.array([1e-4, 1e-3, 0.01, 0.1])
  for b1 in (0.0, 0.5, 0.9, 0.99):
    chex.assert_trees_all_close(
        se.adam_edge(eta, b1), (2 + 2 * b1) / (eta * (1 - b1)), rtol=1e-14
    )
  chex.assert_trees_all_close(se.adam_edge(0.1, 0.9), 380.0, rtol=1e-12)
  # b1 = 0 (RMSProp) is GD's edge; EMA momentum is heavy-ball with step
  # eta (1 - b1), so adam_edge = gd_edge(eta (1 - b1), momentum=b1).
  chex.assert_trees_all_close(se.adam_edge(eta, 0.0), se.gd_edge(eta))
  chex.assert_trees_all_close(
      se.adam_edge(eta, 0.9), se.gd_edge(eta * 0.1, momentum=0.9), rtol=1e-12
  )
  assert jax.jit(se.adam_edge)(0.01, 0.9).shape == ()


def test_adam_edge_stability_on_a_frozen_preconditioned_quadratic():
  # Adam with P fixed: m <- b1 m + (1 - b1) g, w <- w - eta P^{-1} m.
  eta, b1 = 0.01, 0.9
  p = np.array([2.0, 0.5])
  edge = float(se.adam_edge(eta, b1))
  for factor, grows in ((0.99, False), (1.01, True)):
    h = (
        factor * edge * p * np.array([1.0, 0.3])
    )  # P^{-1} H = diag(f edge, .3 f edge)
    w, m = np.ones(2), np.zeros(2)
    for _ in range(4000):
      m = b1 * m + (1 - b1) * h * w
      w = w - eta * m / p
    assert (abs(w[0]) > 1.0) == grows, (factor, w)


def test_adam_edge_bad_values():
  with pytest.raises(ValueError, match="b1"):
    se.adam_edge(0.1, 1.0)
  with pytest.raises(ValueError, match="learning_rate"):
    se.adam_edge(0.0, 0.9)
