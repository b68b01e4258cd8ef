"""Low-precision dtypes: eigensolvers and SAM norms against float64 references.

Every test runs with float64 enabled (the references) and sets the dtype of
its operands explicitly; tolerances scale with ``jnp.finfo(dtype).eps``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se
from sam_eos.sam import global_norm

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float64]
LOW = [jnp.float16, jnp.bfloat16]


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def eps(dtype):
  return float(jnp.finfo(dtype).eps)


def working(dtype):
  """The dtype the eigensolvers and norms compute in: >= float32."""
  return jnp.promote_types(dtype, jnp.float32)


def symmetric(n, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(n, n)))
  values = np.array([10.0, 4.0, 2.0] + list(np.linspace(-1.0, 1.0, n - 3)))
  a = u @ np.diag(values) @ u.T
  return (a + a.T) / 2


@functools.partial(jax.jit, static_argnums=2)
def run_lanczos(a, v0, num_iters):
  return se.lanczos(lambda x: a @ x, v0, num_iters)


@pytest.mark.parametrize("dtype", DTYPES + [jnp.float16])
def test_lanczos_in_low_precision_matches_float64_eigh(dtype):
  a = symmetric(12)
  a_low = jnp.asarray(a, dtype)
  # Reference: the rounded matrix, diagonalized in float64.
  dense = np.linalg.eigvalsh(np.asarray(a_low, np.float64))[::-1]
  v0 = jnp.asarray(np.random.default_rng(1).normal(size=12), dtype)
  out = run_lanczos(a_low, v0, 12)
  chex.assert_tree_all_finite(out)
  for name in ("ritz_values", "ritz_vectors", "residuals", "basis"):
    assert getattr(out, name).dtype == dtype, name
  # Computed in >= float32, rounded once to ``dtype`` on return.
  chex.assert_trees_all_close(
      np.asarray(out.ritz_values, np.float64),
      dense,
      atol=2 * eps(dtype) * 10.0,
      rtol=0,
  )


def test_lanczos_float32_start_vector_gives_float32_results_for_bf16_operator():
  a = jnp.asarray(symmetric(12, seed=2), jnp.bfloat16)
  dense = np.linalg.eigvalsh(np.asarray(a, np.float64))[::-1]
  v0 = jnp.asarray(np.random.default_rng(3).normal(size=12), jnp.float32)
  out = run_lanczos(a, v0, 12)
  assert out.ritz_values.dtype == jnp.float32
  # bf16 @ f32 is computed in float32: float32 accuracy for the bf16 matrix.
  chex.assert_trees_all_close(
      np.asarray(out.ritz_values, np.float64),
      dense,
      atol=100 * eps(jnp.float32) * 10.0,
      rtol=0,
  )


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(dtype, seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(3, 4)),
      "b1": 0.1 * rng.normal(size=4),
      "w2": rng.normal(size=(4, 2)),
  }
  batch = (rng.normal(size=(8, 3)), rng.normal(size=(8, 2)))
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), (params, batch))


def dense_spectrum(params, batch):
  """Descending float64 Hessian eigenvalues of ``mlp_loss`` at the (rounded) point."""
  params, batch = jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64), (params, batch)
  )
  flat, unravel = ravel_pytree(params)
  hess = jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat)
  return np.linalg.eigvalsh(np.asarray(hess))[::-1]


eigenpairs = jax.jit(
    se.hessian_eigenpairs, static_argnums=0, static_argnames=("k", "num_iters")
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hessian_eigenpairs_in_low_precision_match_float64(dtype):
  params, batch = mlp_problem(dtype)
  dense = dense_spectrum(params, batch)
  out = eigenpairs(mlp_loss, params, batch, k=2, num_iters=22)
  chex.assert_tree_all_finite(out)
  assert out.values.dtype == working(dtype)
  assert out.residuals.dtype == working(dtype)
  chex.assert_trees_all_equal_dtypes(
      jax.tree.map(lambda x: x[0], out.vectors), params
  )
  scale = np.abs(dense).max()
  # The HVP runs in ``dtype`` through a two-layer network: a few eps.
  chex.assert_trees_all_close(
      np.asarray(out.values, np.float64),
      dense[:2],
      atol=20 * eps(dtype) * scale,
      rtol=0,
  )
  top = se.sharpness(mlp_loss, params, batch, num_iters=22)
  assert top.dtype == working(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_power_iteration_in_low_precision(dtype):
  params, batch = mlp_problem(dtype, seed=1)
  dense = dense_spectrum(params, batch)
  out = se.power_iteration(
      mlp_loss,
      params,
      batch,
      num_iters=300,
      tol=1e-6,
      fd_eps=0.05 if dtype == jnp.bfloat16 else 1e-3,
  )
  assert out.value.dtype == working(dtype)
  chex.assert_trees_all_equal_dtypes(out.vector, params)
  # The finite-difference product in bf16 is accurate to ~eps / fd_eps.
  rtol = 4 * eps(dtype) if dtype == jnp.bfloat16 else 1e-4
  np.testing.assert_allclose(float(out.value), np.abs(dense).max(), rtol=rtol)


@pytest.mark.parametrize("dtype", LOW + [jnp.float32, jnp.float64])
def test_global_norm_is_overflow_safe_and_wide(dtype):
  rng = np.random.default_rng(5)
  big = float(jnp.finfo(dtype).max) / 4
  tree = {"a": rng.normal(size=(7,)) * big / 8, "b": np.array([big, -big / 2])}
  tree = jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  flat = np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  )
  largest = np.abs(flat).max()
  reference = largest * np.linalg.norm(flat / largest)  # no overflow
  out = global_norm(tree)
  assert out.dtype == working(dtype)
  assert np.isfinite(float(out))
  np.testing.assert_allclose(
      float(out), reference, rtol=10 * eps(working(dtype))
  )
  assert float(global_norm(jax.tree.map(jnp.zeros_like, tree))) == 0.0


@pytest.mark.parametrize("dtype", LOW + [jnp.float32, jnp.float64])
def test_sam_perturbation_large_low_precision_gradient(dtype):
  # ||g|| = 5000: its square overflows float16 (max 65504).
  grads = {"w": jnp.array([3000.0, 4000.0], dtype)}
  out = se.sam_perturbation(grads, 0.5, eps=0.0)
  assert out["w"].dtype == dtype
  np.testing.assert_allclose(
      np.asarray(out["w"], np.float64), [0.3, 0.4], rtol=2 * eps(dtype)
  )


quad_hess = np.array([4.0, 1.0])


def quad_loss(params, batch):
  del batch
  w = params["w"]
  return 0.5 * jnp.sum(quad_hess * w.astype(working(w.dtype)) ** 2)


@pytest.mark.parametrize("dtype", LOW + [jnp.float32, jnp.float64])
def test_sam_transform_with_large_low_precision_gradients(dtype):
  w = {"w": jnp.array([300.0, 100.0], dtype)}  # g = (1200, 100), ||g|| > 256
  grad_fn = lambda p: jax.tree.map(
      lambda g: g.astype(dtype), jax.grad(quad_loss)(p, None)
  )
  rho, eta = 10.0, 1e-3
  opt = se.sam(optax.sgd(eta), rho, eps=0.0)
  state = opt.init(w)
  assert state.grad_norm.dtype == working(dtype)
  updates, state = opt.update(grad_fn(w), state, w, grad_fn=grad_fn)
  assert state.grad_norm.dtype == working(dtype)
  assert updates["w"].dtype == dtype
  # float64 reference of the same step from the rounded iterate.
  w64 = np.asarray(w["w"], np.float64)
  g = quad_hess * w64
  e = rho * g / np.linalg.norm(g)
  expected = -eta * quad_hess * (w64 + e)
  np.testing.assert_allclose(
      float(state.grad_norm), np.linalg.norm(g), rtol=4 * eps(dtype)
  )
  np.testing.assert_allclose(
      np.asarray(updates["w"], np.float64), expected, rtol=8 * eps(dtype)
  )
  # Not silently GD: the SAM term changed the update.
  assert not np.allclose(
      np.asarray(updates["w"], np.float64), -eta * g, rtol=eps(dtype)
  )


@pytest.mark.parametrize("dtype", LOW)
def test_sam_gradient_norm_is_wide(dtype):
  params = {"w": jnp.array([300.0, 100.0], dtype)}
  out = se.sam_gradient(quad_loss, params, None, rho=1.0)
  assert out.grad_norm.dtype == jnp.float32
  np.testing.assert_allclose(
      float(out.grad_norm),
      np.linalg.norm(quad_hess * np.array([300, 100])),
      rtol=4 * eps(dtype),
  )
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("dtype", LOW)
def test_train_with_large_low_precision_gradients(dtype):
  # ||g|| = ||(1200, 100)|| > 256: float16 squares of the gradient overflow,
  # which must neither stop the run as divergence nor blur grad_norm.
  w0 = np.array([300.0, 100.0])
  params = {"w": jnp.asarray(w0, dtype)}
  eta, rho, num_steps = 1e-3, 0.1, 4
  result = se.train(
      quad_loss,
      params,
      (jnp.zeros((1, 1)),),
      learning_rate=eta,
      rho=rho,
      num_steps=num_steps,
      track_every=1,
      progress=False,
  )
  assert result.params["w"].dtype == dtype
  history = result.history
  for name in ("loss", "grad_norm", "sharpness", "sam_edge"):
    assert np.all(np.isfinite(history[name])), name
  np.testing.assert_allclose(
      history["grad_norm"][0], np.linalg.norm(quad_hess * w0), rtol=eps(dtype)
  )
  np.testing.assert_allclose(history["sharpness"], 4.0, rtol=2 * eps(dtype))
  # |cos(g, v1)| with g = (1200, 100) (exact in both dtypes), v1 = e1. The
  # Ritz vector comes from products in the low dtype: its angle to e1 is
  # about eps * lambda_max / gap = (4/3) eps, and d|cos|/dangle = 0.083 here.
  np.testing.assert_allclose(
      history["grad_alignment"][0],
      1200 / np.linalg.norm([1200, 100]),
      rtol=0.1 * eps(dtype),
  )
  # float64 SAM from the same start; the iterates round once per step.
  w = w0
  for _ in range(num_steps):
    g = quad_hess * w
    w = w - eta * quad_hess * (w + rho * g / np.linalg.norm(g))
  np.testing.assert_allclose(
      np.asarray(result.params["w"], np.float64), w, rtol=num_steps * eps(dtype)
  )
