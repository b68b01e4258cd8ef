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
