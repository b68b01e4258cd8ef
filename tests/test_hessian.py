"""Hessian-vector products against dense ``jax.hessian`` and closed forms."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se
from sam_eos.hessian import flat_matvec, linearize_gradient


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def mlp_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(3, 4)),
      "b1": 0.1 * rng.normal(size=4),
      "w2": rng.normal(size=(4, 2)),
      "b2": np.zeros(2),
  }
  batch = (rng.normal(size=(6, 3)), rng.normal(size=(6, 2)))
  return jax.tree.map(jnp.asarray, (params, batch))


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian(loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


def dense_hessian(loss_fn, params, batch):
  return np.asarray(_dense_hessian(loss_fn, params, batch))


def random_like(params, seed):
  flat, unravel = ravel_pytree(params)
  rng = np.random.default_rng(seed)
  return unravel(jnp.asarray(rng.normal(size=flat.size)))


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def test_hvp_matches_dense_hessian_on_mlp():
  params, batch = mlp_problem()
  hess = dense_hessian(mlp_loss, params, batch)
  for seed in range(3):
    v = random_like(params, seed)
    out = se.hvp(mlp_loss, params, batch, v)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    np.testing.assert_allclose(
        flat(out), hess @ flat(v), rtol=1e-10, atol=1e-12
    )


def test_hvp_on_quadratic_is_matrix_product():
  rng = np.random.default_rng(1)
  m = rng.normal(size=(5, 5))
  a = m + m.T
  b = rng.normal(size=5)
  loss = lambda w, ab: 0.5 * w["x"] @ ab[0] @ w["x"] + ab[1] @ w["x"]
  batch = (jnp.asarray(a), jnp.asarray(b))
  for seed in range(2):
    w = {"x": jnp.asarray(rng.normal(size=5))}
    v = {"x": jnp.asarray(rng.normal(size=5))}
    chex.assert_trees_all_close(
        se.hvp(loss, w, batch, v), {"x": a @ v["x"]}, rtol=1e-12
    )


def test_hessian_matvec_equals_hvp_and_linearizes_once():
  params, batch = mlp_problem(seed=2)
  traces = []

  def counted_loss(p, b):
    traces.append(1)
    return mlp_loss(p, b)

  matvec = se.hessian_matvec(counted_loss, params, batch)
  traced = len(traces)
  hess = dense_hessian(mlp_loss, params, batch)
  for seed in range(3):
    v = random_like(params, seed)
    chex.assert_trees_all_close(
        matvec(v), se.hvp(mlp_loss, params, batch, v), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        flat(matvec(v)), hess @ flat(v), rtol=1e-10, atol=1e-12
    )
  assert len(traces) == traced  # products reuse the linearization


def test_has_aux_is_ignored():
  params, batch = mlp_problem(seed=3)
  with_aux = lambda p, b: (mlp_loss(p, b), {"h": p["w1"].sum()})
  v = random_like(params, 4)
  expected = se.hvp(mlp_loss, params, batch, v)
  chex.assert_trees_all_close(
      se.hvp(with_aux, params, batch, v, has_aux=True), expected, rtol=1e-12
  )
  matvec = se.hessian_matvec(with_aux, params, batch, has_aux=True)
  chex.assert_trees_all_close(matvec(v), expected, rtol=1e-12)


def test_vector_is_cast_to_param_dtype():
  params, batch = mlp_problem(seed=4)
  v = random_like(params, 5)
  v32 = jax.tree.map(lambda x: x.astype(jnp.float32), v)
  out = se.hvp(mlp_loss, params, batch, v32)
  chex.assert_trees_all_equal_dtypes(out, params)
  hess = dense_hessian(mlp_loss, params, batch)
  np.testing.assert_allclose(
      flat(out), hess @ flat(v32).astype(np.float64), rtol=1e-10, atol=1e-12
  )


def test_jit_without_recompilation():
  traces = []

  @jax.jit
  def product(params, batch, v):
    traces.append(1)
    return se.hvp(mlp_loss, params, batch, v)

  for seed in range(3):
    params, batch = mlp_problem(seed=seed)
    v = random_like(params, seed)
    hess = dense_hessian(mlp_loss, params, batch)
    np.testing.assert_allclose(
        flat(product(params, batch, v)), hess @ flat(v), rtol=1e-10, atol=1e-12
    )
  assert len(traces) == 1


def test_mismatched_vector_raises():
  params, batch = mlp_problem()
  bad = {"w1": jnp.ones((3, 4))}
  with pytest.raises(ValueError, match="vector"):
    se.hvp(mlp_loss, params, batch, bad)
  wrong_shape = dict(random_like(params, 0), b2=jnp.ones(3))
  with pytest.raises(ValueError, match="vector"):
    se.hessian_matvec(mlp_loss, params, batch)(wrong_shape)


def test_finite_difference_hvp_beside_exact_hvp():
  from sam_eos import hessian  # pylint: disable=import-outside-toplevel

  params, batch = mlp_problem(3)
  vector = random_like(params, 4)
  exact = flat(se.hvp(mlp_loss, params, batch, vector))
  approx = flat(
      hessian.finite_difference_hvp(
          mlp_loss, params, batch, vector, fd_eps=1e-4
      )
  )
  # Central difference: O(fd_eps^2) error.
  np.testing.assert_allclose(approx, exact, atol=1e-6 * np.abs(exact).max())
  matvec = hessian.finite_difference_matvec(
      mlp_loss, params, batch, fd_eps=1e-4
  )
  np.testing.assert_allclose(flat(matvec(vector)), approx, rtol=1e-14)
  grad = hessian.gradient_fn(mlp_loss, batch)
  chex.assert_trees_all_close(grad(params), jax.grad(mlp_loss)(params, batch))


def test_linearize_gradient_gives_loss_gradient_and_hvp_from_one_trace():
  params, batch = mlp_problem(seed=6)
  traces = []

  def counted_aux(p, b):
    traces.append(1)
    return mlp_loss(p, b), {"step": jnp.array(3)}  # an integer aux is dropped

  loss, grads, matvec = linearize_gradient(
      counted_aux, params, batch, has_aux=True
  )
  assert len(traces) == 1
  chex.assert_trees_all_close(loss, mlp_loss(params, batch), rtol=1e-14)
  chex.assert_trees_all_close(
      grads, jax.grad(mlp_loss)(params, batch), rtol=1e-14
  )
  hess = dense_hessian(mlp_loss, params, batch)
  v = random_like(params, 7)
  np.testing.assert_allclose(
      flat(matvec(v)), hess @ flat(v), rtol=1e-10, atol=1e-12
  )
  assert len(traces) == 1  # products reuse the linearization
  with pytest.raises(ValueError, match="vector"):
    matvec({"w1": v["w1"]})


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
def test_flat_matvec_in_ravel_order_and_param_dtype(dtype):
  params, batch = mlp_problem(seed=8)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  matvec = se.hessian_matvec(mlp_loss, params, batch)
  v = jnp.asarray(np.random.default_rng(9).normal(size=flat(params).size))
  out = flat_matvec(matvec, params)(v)  # float64 v, as a wide Lanczos vector
  assert out.dtype == dtype and out.shape == v.shape
  tree = ravel_pytree(params)[1](v.astype(dtype))
  chex.assert_trees_all_equal(out, ravel_pytree(matvec(tree))[0])
