"""Hessian eigenpairs, sharpness and power iteration against dense ``eigh``."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


# Compiled once per loss, shapes and static options, reused across tests (eager
# calls retrace the Lanczos and power-iteration loops).
eigenpairs = jax.jit(
    se.hessian_eigenpairs,
    static_argnums=0,
    static_argnames=("k", "num_iters", "has_aux", "which"),
)
sharpness = jax.jit(
    se.sharpness, static_argnums=0, static_argnames=("num_iters", "has_aux")
)
power_iteration = jax.jit(
    se.power_iteration,
    static_argnums=0,
    static_argnames=("num_iters", "has_aux"),
)


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(3, 4)),
      "b1": 0.1 * rng.normal(size=4),
      "w2": rng.normal(size=(4, 2)),
  }
  batch = (rng.normal(size=(6, 3)), rng.normal(size=(6, 2)))
  return jax.tree.map(jnp.asarray, (params, batch))


@functools.partial(jax.jit, static_argnums=0)
def dense_hessian(loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


def dense_eigh(loss_fn, params, batch):
  """Eigenpairs of the dense Hessian, descending."""
  hess = np.asarray(dense_hessian(loss_fn, params, batch))
  values, vectors = np.linalg.eigh(hess)
  return values[::-1], vectors[:, ::-1]


def quadratic_loss(params, batch):
  """``0.5 w^T A w`` with ``A = batch``, on a two-leaf pytree."""
  w = jnp.concatenate([params["a"], params["b"].ravel()])
  return 0.5 * w @ batch @ w


def quadratic_problem(eigenvalues, seed=0):
  rng = np.random.default_rng(seed)
  n = len(eigenvalues)
  u, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = u @ np.diag(eigenvalues) @ u.T
  params = {
      "a": jnp.asarray(rng.normal(size=2)),
      "b": jnp.asarray(rng.normal(size=(n - 2) // 2 * 2).reshape(-1, 2)),
  }
  return params, jnp.asarray((a + a.T) / 2), u


def flat_rows(tree):
  """``(k, n)`` rows from a pytree whose leaves have a leading axis ``k``."""
  return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def test_top_k_eigenpairs_of_mlp_hessian():
  params, batch = mlp_problem()
  n = ravel_pytree(params)[0].size
  values, vectors = dense_eigh(mlp_loss, params, batch)
  out = eigenpairs(mlp_loss, params, batch, k=3, num_iters=n)
  chex.assert_shape(out.values, (3,))
  chex.assert_trees_all_equal_structs(
      out.vectors, jax.tree.map(lambda x: x[None], params)
  )
  chex.assert_shape(out.vectors["w1"], (3, 3, 4))
  np.testing.assert_allclose(out.values, values[:3], rtol=1e-10)
  rows = flat_rows(out.vectors)
  np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(
      np.abs(np.sum(rows * vectors[:, :3].T, axis=1)), 1.0, atol=1e-8
  )
  np.testing.assert_allclose(out.residuals, 0.0, atol=1e-10)


def test_sharpness_with_default_iterations_matches_dense():
  params, batch = mlp_problem(seed=1)
  values, _ = dense_eigh(mlp_loss, params, batch)
  np.testing.assert_allclose(
      sharpness(mlp_loss, params, batch), values[0], rtol=1e-8
  )


def test_warm_start_with_exact_eigenvector_takes_one_iteration():
  params, batch = mlp_problem(seed=2)
  values, vectors = dense_eigh(mlp_loss, params, batch)
  init = ravel_pytree(params)[1](jnp.asarray(vectors[:, 0]))
  out = eigenpairs(mlp_loss, params, batch, num_iters=1, init=init)
  np.testing.assert_allclose(out.values[0], values[0], rtol=1e-12)
  np.testing.assert_allclose(out.residuals[0], 0.0, atol=1e-10)
  cold = eigenpairs(mlp_loss, params, batch, num_iters=1)
  assert abs(cold.values[0] - values[0]) > 1e-3 * abs(values[0])


def test_tolerance_certifies_the_top_pairs():
  params, batch = mlp_problem(seed=3)
  values, _ = dense_eigh(mlp_loss, params, batch)
  n = ravel_pytree(params)[0].size
  for tol in (1e-2, 1e-5):
    out = eigenpairs(mlp_loss, params, batch, k=2, num_iters=n, tol=tol)
    assert int(out.num_iters) < n
    np.testing.assert_array_less(out.residuals, tol * np.abs(out.values))
    for value, residual in zip(out.values, out.residuals):
      assert np.min(np.abs(values - value)) <= residual * (1 + 1e-9)
  fixed = eigenpairs(mlp_loss, params, batch, num_iters=7)
  assert int(fixed.num_iters) == 7


def test_both_ends_match_dense():
  params, batch = mlp_problem(seed=4)
  values, vectors = dense_eigh(mlp_loss, params, batch)
  n = ravel_pytree(params)[0].size
  out = eigenpairs(mlp_loss, params, batch, k=2, num_iters=n, which="both")
  want = np.concatenate([values[:2], values[-2:]])
  np.testing.assert_allclose(out.values, want, rtol=1e-10, atol=1e-12)
  rows = flat_rows(out.vectors)
  dense_rows = np.concatenate([vectors[:, :2], vectors[:, -2:]], axis=1).T
  np.testing.assert_allclose(
      np.abs(np.sum(rows * dense_rows, axis=1)), 1.0, atol=1e-8
  )


def test_block_init_takes_the_rayleigh_ritz_step_first():
  # A block holding the top two eigenvectors in swapped order gives both,
  # in order, after two products.
  params, batch = mlp_problem(seed=5)
  values, vectors = dense_eigh(mlp_loss, params, batch)
  unravel = ravel_pytree(params)[1]
  block = jax.vmap(unravel)(jnp.asarray(vectors[:, [1, 0]].T))
  out = eigenpairs(mlp_loss, params, batch, k=2, init=block, tol=1e-8)
  assert int(out.num_iters) == 2
  np.testing.assert_allclose(out.values, values[:2], rtol=1e-10)


def test_largest_algebraic_not_largest_magnitude():
  eigenvalues = [-0.5, -1.0, -3.0, -7.0, -10.0, -20.0]
  params, a, _ = quadratic_problem(eigenvalues)
  out = eigenpairs(quadratic_loss, params, a, k=2, num_iters=6)
  np.testing.assert_allclose(out.values, [-0.5, -1.0], rtol=1e-10)
  np.testing.assert_allclose(
      sharpness(quadratic_loss, params, a, num_iters=6), -0.5, rtol=1e-10
  )
  power = power_iteration(quadratic_loss, params, a, tol=1e-6)
  np.testing.assert_allclose(power.value, 20.0, rtol=1e-4)


def test_num_iters_is_capped_at_number_of_parameters():
  eigenvalues = [4.0, 2.0, 1.0, -1.0]
  params, a, _ = quadratic_problem(eigenvalues)
  out = eigenpairs(quadratic_loss, params, a, k=4, num_iters=50)
  np.testing.assert_allclose(out.values, eigenvalues, rtol=1e-10)


def test_power_iteration_on_quadratic_with_gap():
  eigenvalues = [10.0, 5.0, 2.0, 1.0, 0.5, -1.0, 0.0, 0.1]
  params, a, u = quadratic_problem(eigenvalues, seed=3)
  out = power_iteration(quadratic_loss, params, a, key=jax.random.key(4))
  assert 1 < int(out.num_iters) < 100
  # Stops when the relative change is below tol: for ratio 1/2 the error is
  # then at most about tol.
  np.testing.assert_allclose(out.value, 10.0, rtol=2e-3)
  v = ravel_pytree(out.vector)[0]
  np.testing.assert_allclose(jnp.linalg.norm(v), 1.0, rtol=1e-12)
  assert abs(float(v @ u[:, 0])) > 0.99
  capped = power_iteration(quadratic_loss, params, a, num_iters=2)
  assert int(capped.num_iters) == 2


def test_power_iteration_on_mlp_matches_dense_operator_norm():
  params, batch = mlp_problem(seed=5)
  values, _ = dense_eigh(mlp_loss, params, batch)
  out = power_iteration(mlp_loss, params, batch, tol=1e-8, num_iters=500)
  # Finite differences of step 1e-3 are accurate to O(eps^2) on a smooth loss.
  np.testing.assert_allclose(out.value, np.abs(values).max(), rtol=1e-5)


def test_random_start_depends_on_key_and_zero_init_falls_back():
  params, batch = mlp_problem(seed=6)
  keys = jax.random.split(jax.random.key(7), 3)
  starts = jax.vmap(
      lambda key: eigenpairs(
          mlp_loss, params, batch, num_iters=2, key=key
      ).values[0]
  )(keys)
  assert len(np.unique(np.asarray(starts))) == 3
  zeros = jax.tree.map(jnp.zeros_like, params)
  fallback = jax.jit(
      lambda init: eigenpairs(
          mlp_loss, params, batch, num_iters=2, key=keys[1], init=init
      ).values
  )
  fallback = fallback(zeros)
  np.testing.assert_allclose(fallback[0], starts[1], rtol=1e-12)
  chex.assert_tree_all_finite(fallback)


def test_has_aux():
  params, batch = mlp_problem(seed=8)
  values, _ = dense_eigh(mlp_loss, params, batch)
  with_aux = lambda p, b: (mlp_loss(p, b), p["b1"])
  np.testing.assert_allclose(
      sharpness(with_aux, params, batch, has_aux=True), values[0], rtol=1e-8
  )
  np.testing.assert_allclose(
      power_iteration(with_aux, params, batch, has_aux=True).value,
      np.abs(values).max(),
      rtol=5e-2,
  )


def test_no_recompilation_under_jit():
  traces = []

  def counted_loss(p, b):
    traces.append(1)
    return mlp_loss(p, b)

  @jax.jit
  def measure(params, batch, init):
    top = se.hessian_eigenpairs(counted_loss, params, batch, k=2, init=init)
    power = se.power_iteration(counted_loss, params, batch)
    return top, power

  init = jax.tree.map(jnp.zeros_like, mlp_problem()[0])  # random start first
  for seed in range(3):
    params, batch = mlp_problem(seed=seed)
    values, _ = dense_eigh(mlp_loss, params, batch)
    top, power = measure(params, batch, init)
    init = jax.tree.map(lambda x: x[0], top.vectors)
    np.testing.assert_allclose(top.values, values[:2], rtol=1e-8)
    np.testing.assert_allclose(power.value, np.abs(values).max(), rtol=5e-2)
    if seed == 0:
      traced = len(traces)
  assert len(traces) == traced


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_iters=0), "num_iters"),
        (dict(k=0), "k"),
        (dict(k=3, num_iters=2), "k"),
        (dict(k=1.5), "k"),
        (dict(k=40, num_iters=40), "k"),
        (dict(init={"w1": jnp.ones((3, 4))}), "init"),
        (
            dict(
                init={
                    "w1": jnp.ones((3, 4)),
                    "b1": jnp.ones(5),
                    "w2": jnp.ones((4, 2)),
                }
            ),
            "init",
        ),
    ],
)
def test_eigenpairs_bad_arguments(kwargs, name):
  """Also see the cases below the decorator's list."""
  params, batch = mlp_problem()
  with pytest.raises(ValueError, match=f"`{name}`"):
    se.hessian_eigenpairs(mlp_loss, params, batch, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_iters=0), "num_iters"),
        (dict(tol=0.0), "tol"),
        (dict(fd_eps=-1e-3), "fd_eps"),
    ],
)
def test_power_iteration_bad_arguments(kwargs, name):
  """``tol`` here is the power iteration's relative change."""
  params, batch = mlp_problem()
  with pytest.raises(ValueError, match=f"`{name}`"):
    se.power_iteration(mlp_loss, params, batch, **kwargs)


def test_power_iteration_default_key_is_a_fixed_start():
  params, batch = mlp_problem(4)
  default = power_iteration(mlp_loss, params, batch, num_iters=1)
  again = power_iteration(mlp_loss, params, batch, num_iters=1)
  key0 = power_iteration(
      mlp_loss, params, batch, num_iters=1, key=jax.random.key(0)
  )
  key1 = power_iteration(
      mlp_loss, params, batch, num_iters=1, key=jax.random.key(1)
  )
  chex.assert_trees_all_equal(default, again)
  chex.assert_trees_all_equal(default, key0)
  assert not np.allclose(
      flat_rows(jax.tree.map(lambda x: x[None], key1.vector)),
      flat_rows(jax.tree.map(lambda x: x[None], key0.vector)),
  )
  doc = se.power_iteration.__doc__
  assert "fresh" not in doc.split("Args:")[0] or "key" in doc.split("Args:")[0]
  assert "same start" in doc


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(tol=-1.0), "tol"),
        (dict(which="bottom"), "which"),
        (dict(num_iters=2, init="block3"), "init"),
        (dict(init="bad_block"), "init"),
    ],
)
def test_accuracy_and_block_arguments_are_checked(kwargs, name):
  params, batch = mlp_problem()
  blocks = {
      "block3": jax.tree.map(lambda x: jnp.ones((3,) + x.shape), params),
      "bad_block": {
          "w1": jnp.ones((2, 3, 4)),
          "b1": jnp.ones((3, 4)),
          "w2": jnp.ones((2, 4, 2)),
      },
  }
  if "init" in kwargs:
    kwargs = dict(kwargs, init=blocks[kwargs["init"]])
  with pytest.raises(ValueError, match=f"`{name}`"):
    se.hessian_eigenpairs(mlp_loss, params, batch, **kwargs)
