"""SAM gradient and perturbation against closed forms on quadratics and an MLP."""

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


def quadratic_loss(params, hess):
  return 0.5 * jnp.sum(hess * params["w"] ** 2) + 0.5 * jnp.sum(params["b"] ** 2)


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(key=0):
  k = jax.random.split(jax.random.key(key), 4)
  params = {"w1": jax.random.normal(k[0], (3, 5)), "b1": jnp.zeros(5),
            "w2": jax.random.normal(k[1], (5, 2))}
  batch = (jax.random.normal(k[2], (7, 3)), jax.random.normal(k[3], (7, 2)))
  return params, batch


def test_perturbation_normalized_and_unnormalized():
  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
  out = se.sam_perturbation(grads, 2.0, eps=0.0)
  chex.assert_trees_all_close(out, {"a": jnp.array([1.2, 0.0]), "b": jnp.array([[1.6]])})
  chex.assert_trees_all_close(optax_norm(out), 2.0)
  raw = se.sam_perturbation(grads, 2.0, normalize=False)
  chex.assert_trees_all_close(raw, {"a": jnp.array([6.0, 0.0]), "b": jnp.array([[8.0]])})


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_zero_gradient_gives_zero_perturbation(eps):
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  out = se.sam_perturbation(grads, 0.1, eps=eps)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_equal(out, grads)
  with jax.enable_x64(False):
    g32 = jax.jit(lambda g: se.sam_perturbation(g, 0.1, eps=0.0))(
        {"a": jnp.zeros(3, jnp.float32)})
    chex.assert_tree_all_finite(g32)


def test_sam_gradient_closed_form_on_quadratic():
  hess = jnp.array([5.0, 2.0, 0.5])
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
  rho = 0.3
  out = se.sam_gradient(quadratic_loss, params, hess, rho=rho, eps=0.0)
  g = {"w": hess * params["w"], "b": params["b"]}
  norm = optax_norm(g)
  expected = {"w": hess * (params["w"] + rho * g["w"] / norm),
              "b": params["b"] + rho * g["b"] / norm}
  chex.assert_trees_all_close(out.grads, g)
  chex.assert_trees_all_close(out.grad_norm, norm)
  chex.assert_trees_all_close(out.sam_grads, expected)
  chex.assert_trees_all_close(out.loss, quadratic_loss(params, hess))
  usam = se.sam_gradient(quadratic_loss, params, hess, rho=rho, normalize=False)
  chex.assert_trees_all_close(
      usam.sam_grads, {"w": hess * (params["w"] + rho * g["w"]),
                       "b": params["b"] + rho * g["b"]})


def test_sam_gradient_matches_manual_on_mlp_and_aux():
  params, batch = mlp_problem()
  rho, eps = 0.05, 1e-12
  out = jax.jit(lambda p, b: se.sam_gradient(mlp_loss, p, b, rho=rho))(params, batch)
  g = jax.grad(mlp_loss)(params, batch)
  n = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
  moved = jax.tree.map(lambda p, gi: p + rho * gi / (n + eps), params, g)
  chex.assert_trees_all_close(out.sam_grads, jax.grad(mlp_loss)(moved, batch), rtol=1e-12)
  chex.assert_trees_all_close(out.grad_norm, n, rtol=1e-12)

  def loss_aux(p, b):
    return mlp_loss(p, b), {"twice": 2 * mlp_loss(p, b)}

  out_aux, aux = se.sam_gradient(loss_aux, params, batch, rho=rho, has_aux=True)
  chex.assert_trees_all_close(out_aux, out)
  chex.assert_trees_all_close(aux["twice"], 2 * out.loss)


def test_rho_zero_equals_plain_gradient_and_vmap_over_rho():
  params, batch = mlp_problem(1)
  out = se.sam_gradient(mlp_loss, params, batch, rho=0.0)
  chex.assert_trees_all_equal(out.sam_grads, out.grads)
  rhos = jnp.array([0.0, 0.01, 0.1])
  many = jax.vmap(lambda r: se.sam_gradient(mlp_loss, params, batch, rho=r))(rhos)
  for i, r in enumerate(rhos):
    single = se.sam_gradient(mlp_loss, params, batch, rho=float(r))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], many.sam_grads),
                                single.sam_grads, rtol=1e-12)


def test_bad_rho():
  with pytest.raises(ValueError, match="rho"):
    se.sam_perturbation({"a": jnp.ones(2)}, -0.1)
  params, batch = mlp_problem()
  with pytest.raises(ValueError, match="rho"):
    se.sam_gradient(mlp_loss, params, batch, rho=-1.0)


def test_two_cycle_test_vector():
  """DESIGN.md: SAM on diag(50, 20, 5, 1), eta=0.01, rho=0.1 settles at the edge."""
  hess = jnp.array([50.0, 20.0, 5.0, 1.0])
  eta, rho = 0.01, 0.1
  loss = lambda w, h: 0.5 * jnp.sum(h * w ** 2)

  def step(w, _):
    out = se.sam_gradient(loss, w, hess, rho=rho, eps=0.0)
    return w - eta * out.sam_grads, out.grad_norm

  w0 = jnp.array([1.0, 1.0, 1.0, 1.0])
  _, norms = jax.lax.scan(step, w0, None, length=3000)
  expected_norm = eta * rho * 50.0 ** 2 / (2 - eta * 50.0)
  chex.assert_trees_all_close(norms[-10:], jnp.full(10, expected_norm), rtol=1e-8)
  chex.assert_trees_all_close(se.sam_edge(eta, rho, norms[-1]), 50.0, rtol=1e-8)
