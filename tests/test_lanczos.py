"""Lanczos against dense eigendecompositions of matrices with known spectra."""

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


def matrix_with_spectrum(eigenvalues, seed=0):
  """``U diag(eigenvalues) U^T`` and ``U``, a random orthogonal matrix."""
  rng = np.random.default_rng(seed)
  eigenvalues = np.asarray(eigenvalues, np.float64)
  u, _ = np.linalg.qr(rng.normal(size=(eigenvalues.size,) * 2))
  a = u @ np.diag(eigenvalues) @ u.T
  return (a + a.T) / 2, u


def start_vector(n, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=n))


def lanczos_dense(a, v0, num_iters):
  a = jnp.asarray(a)
  return se.lanczos(lambda x: a @ x, v0, num_iters)


# Compiled once per shape and reused across tests (eager calls retrace).
run = jax.jit(lanczos_dense, static_argnums=2)


SPECTRA = {
    "separated": np.array([50.0, 20.0, 8.0, 3.0] + list(np.linspace(0, 1, 16))),
    "clustered": np.concatenate(
        [1.0 + 1e-3 * np.arange(10), np.linspace(-1, 0, 10)]
    ),
    "negative": -np.geomspace(0.1, 100.0, 20),
    "repeated": np.array(
        [5.0] * 4 + [2.0] * 3 + [-1.0] * 5 + list(np.linspace(0, 1, 8))
    ),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_full_lanczos_recovers_whole_spectrum(name):
  eigenvalues = SPECTRA[name]
  a, _ = matrix_with_spectrum(eigenvalues)
  n = eigenvalues.size
  out = run(a, start_vector(n), n)
  dense = np.linalg.eigvalsh(a)[::-1]
  scale = np.abs(eigenvalues).max()
  chex.assert_trees_all_close(
      out.ritz_values, dense, atol=1e-12 * scale, rtol=0
  )
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_lanczos_relation_and_orthonormal_basis(name):
  eigenvalues = SPECTRA[name]
  a, _ = matrix_with_spectrum(eigenvalues, seed=2)
  m = 8
  out = run(a, start_vector(eigenvalues.size), m)
  chex.assert_shape(out.basis, (m, eigenvalues.size))
  q = np.asarray(out.basis)
  np.testing.assert_allclose(q @ q.T, np.eye(m), atol=1e-13)
  t = (
      np.diag(out.alphas)
      + np.diag(out.betas[:-1], 1)
      + np.diag(out.betas[:-1], -1)
  )
  remainder = a @ q.T - q.T @ t
  scale = np.abs(eigenvalues).max()
  # Only the last column survives: betas[-1] * q_m with q_m orthogonal to Q.
  np.testing.assert_allclose(remainder[:, :-1], 0.0, atol=1e-12 * scale)
  np.testing.assert_allclose(
      np.linalg.norm(remainder[:, -1]), out.betas[-1], rtol=1e-10
  )
  np.testing.assert_allclose(q @ remainder[:, -1], 0.0, atol=1e-12 * scale)
  np.testing.assert_allclose(
      out.alphas, np.einsum("in,nm,im->i", q, a, q), atol=1e-12 * scale
  )


def test_partial_lanczos_converges_to_top_eigenvalues():
  eigenvalues = SPECTRA["separated"]
  a, u = matrix_with_spectrum(eigenvalues, seed=3)
  out = run(a, start_vector(eigenvalues.size), 12)
  chex.assert_trees_all_close(out.ritz_values[:3], eigenvalues[:3], rtol=1e-10)
  top = np.asarray(out.ritz_vectors[0])
  np.testing.assert_allclose(abs(top @ u[:, 0]), 1.0, atol=1e-10)
  assert np.all(np.diff(np.asarray(out.ritz_values)) <= 0)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_reported_residuals_match_ritz_vectors(name):
  eigenvalues = SPECTRA[name]
  a, _ = matrix_with_spectrum(eigenvalues, seed=4)
  out = run(a, start_vector(eigenvalues.size, seed=5), 7)
  y = np.asarray(out.ritz_vectors)
  theta = np.asarray(out.ritz_values)
  np.testing.assert_allclose(y @ y.T, np.eye(7), atol=1e-12)
  true = np.linalg.norm(y @ a - theta[:, None] * y, axis=1)
  scale = np.abs(eigenvalues).max()
  np.testing.assert_allclose(out.residuals, true, atol=1e-11 * scale)
  assert np.asarray(out.residuals).max() > 1e-6 * scale  # not all converged
  np.testing.assert_allclose(
      theta, np.einsum("in,nm,im->i", y, a, y), atol=1e-12 * scale
  )


@pytest.mark.parametrize("rotated", [False, True])
def test_breakdown_on_exact_eigenvector(rotated):
  eigenvalues = np.array([9.0, 4.0, 3.0, 2.5, 1.0, -2.0, 0.5, 0.25])
  if rotated:
    a, u = matrix_with_spectrum(eigenvalues, seed=6)
  else:
    a, u = np.diag(eigenvalues), np.eye(eigenvalues.size)
  out = run(a, jnp.asarray(u[:, 0]), 4)
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(out.ritz_values[0], 9.0, rtol=1e-14)
  np.testing.assert_allclose(out.betas[0], 0.0, atol=1e-14)
  np.testing.assert_allclose(out.residuals[0], 0.0, atol=1e-14)
  q = np.asarray(out.basis)
  np.testing.assert_allclose(q @ q.T, np.eye(4), atol=1e-13)
  # Every Ritz value is a Rayleigh quotient of A (no spurious values).
  y = np.asarray(out.ritz_vectors)
  np.testing.assert_allclose(
      out.ritz_values, np.einsum("in,nm,im->i", y, a, y), atol=1e-12
  )
  assert np.all(np.asarray(out.ritz_values) <= 9.0 + 1e-12)
  assert np.all(np.asarray(out.ritz_values) >= -2.0 - 1e-12)
  full = run(a, jnp.asarray(u[:, 3]), eigenvalues.size)
  chex.assert_tree_all_finite(full)
  chex.assert_trees_all_close(
      full.ritz_values, np.sort(eigenvalues)[::-1], atol=1e-12
  )


def test_breakdown_in_two_dimensional_invariant_subspace():
  eigenvalues = np.arange(1.0, 11.0)
  a = np.diag(eigenvalues)
  v0 = np.zeros(10)
  v0[[2, 6]] = 1.0  # span{e_2, e_6}: eigenvalues 3 and 7
  out = run(a, jnp.asarray(v0), 5)
  chex.assert_tree_all_finite(out)
  np.testing.assert_allclose(out.betas[1], 0.0, atol=1e-14)
  values = np.asarray(out.ritz_values)
  residuals = np.asarray(out.residuals)
  for lam in (3.0, 7.0):
    i = np.argmin(np.abs(values - lam))
    np.testing.assert_allclose(values[i], lam, rtol=1e-14)
    np.testing.assert_allclose(residuals[i], 0.0, atol=1e-14)
  y = np.asarray(out.ritz_vectors)
  true = np.linalg.norm(y @ a - values[:, None] * y, axis=1)
  np.testing.assert_allclose(residuals, true, atol=1e-12)


def test_jit_vmap_and_no_recompilation():
  eigenvalues = SPECTRA["separated"]
  a, _ = matrix_with_spectrum(eigenvalues, seed=7)
  b, _ = matrix_with_spectrum(2 * eigenvalues, seed=8)
  n = a.shape[0]
  traces = []

  @jax.jit
  def solve(a, v0):
    traces.append(1)
    return se.lanczos(lambda x: a @ x, v0, 8)

  v0 = start_vector(n)
  np.testing.assert_allclose(
      solve(jnp.asarray(a), v0).ritz_values[:2], eigenvalues[:2], rtol=1e-9
  )
  np.testing.assert_allclose(
      solve(jnp.asarray(b), v0 + 1.0).ritz_values[:2],
      2 * eigenvalues[:2],
      rtol=1e-9,
  )
  assert len(traces) == 1

  v0s = jnp.stack([start_vector(n, seed=s) for s in range(3)])
  batched = jax.vmap(lambda v: run(a, v, 8))(v0s)
  chex.assert_shape(batched.ritz_vectors, (3, 8, n))
  np.testing.assert_allclose(
      batched.ritz_values[:, :2], np.tile(eigenvalues[:2], (3, 1)), rtol=1e-9
  )
  for i in range(3):
    single = run(a, v0s[i], 8)
    chex.assert_trees_all_close(
        batched.ritz_values[i], single.ritz_values, atol=1e-12
    )
    chex.assert_trees_all_close(
        batched.residuals[i], single.residuals, atol=1e-12
    )


def test_traced_zero_start_vector_gives_valid_result():
  eigenvalues = SPECTRA["repeated"]
  a, _ = matrix_with_spectrum(eigenvalues, seed=9)
  n = eigenvalues.size
  out = run(a, jnp.zeros(n), n)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(
      out.ritz_values, np.sort(eigenvalues)[::-1], atol=1e-12
  )


def test_float32_keeps_dtype_and_is_accurate():
  a, _ = matrix_with_spectrum(SPECTRA["separated"], seed=10)
  out = run(jnp.asarray(a, jnp.float32), jnp.ones(a.shape[0], jnp.float32), 10)
  assert out.ritz_values.dtype == jnp.float32
  assert out.ritz_vectors.dtype == jnp.float32
  np.testing.assert_allclose(out.ritz_values[:2], [50.0, 20.0], rtol=1e-5)


@pytest.mark.parametrize("num_iters", [0, -1, 2.5, True, 21])
def test_bad_num_iters(num_iters):
  with pytest.raises(ValueError, match="num_iters"):
    lanczos_dense(np.eye(20), jnp.ones(20), num_iters)


@pytest.mark.parametrize("v0", [jnp.ones((4, 5)), jnp.ones(()), jnp.zeros(5)])
def test_bad_start_vector(v0):
  with pytest.raises(ValueError, match="v0"):
    lanczos_dense(np.eye(5), v0, 2)


@pytest.mark.parametrize(
    "matvec, what",
    [
        (lambda x: jnp.concatenate([x, x]), "shape"),
        (lambda x: x[:, None], "shape"),
        (lambda x: jnp.sum(x), "shape"),
        (lambda x: x * 1j, "dtype"),
        (lambda x: (x > 0).astype(jnp.int32), "dtype"),
    ],
)
def test_matvec_with_wrong_output_raises_naming_matvec(matvec, what):
  with pytest.raises(ValueError, match=f"`matvec`.*{what}"):
    se.lanczos(matvec, jnp.ones(5), 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_concrete_start_vector_raises(bad):
  v0 = jnp.ones(5).at[2].set(bad)
  with pytest.raises(ValueError, match="`v0`.*finite"):
    lanczos_dense(np.eye(5), v0, 2)


def test_non_finite_traced_start_vector_gives_nan():
  a, _ = matrix_with_spectrum(SPECTRA["separated"], seed=11)
  n = a.shape[0]
  out = run(a, jnp.ones(n).at[3].set(jnp.nan), 4)
  assert np.all(np.isnan(np.asarray(out.ritz_values)))
  assert np.all(np.isnan(np.asarray(out.ritz_vectors)))
