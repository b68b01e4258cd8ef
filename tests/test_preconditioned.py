"""Preconditioned sharpness and Adam's preconditioner against dense ``eigh``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se
from sam_eos.preconditioned import preconditioned_eigenpairs


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


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


def dense_preconditioned(params, batch, preconditioner):
  """Eigenvalues (descending) of ``D^{-1/2} H D^{-1/2}`` by dense ``eigh``."""
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat))
  d = 1 / np.sqrt(np.asarray(ravel_pytree(preconditioner)[0]))
  return np.linalg.eigvalsh(d[:, None] * hess * d[None, :])[::-1]


def adam_state(params, batch, num_steps=5, opt=None):
  opt = opt or optax.adam(0.01)
  state = opt.init(params)
  for _ in range(num_steps):
    updates, state = opt.update(
        jax.grad(mlp_loss)(params, batch), state, params
    )
    params = optax.apply_updates(params, updates)
  return params, state


def test_matches_dense_with_a_random_preconditioner():
  params, batch = mlp_problem()
  rng = np.random.default_rng(1)
  precond = jax.tree.map(
      lambda p: jnp.asarray(rng.uniform(0.05, 2.0, p.shape)), params
  )
  dense = dense_preconditioned(params, batch, precond)
  n = dense.size  # 24
  out = preconditioned_eigenpairs(
      mlp_loss, params, batch, precond, k=3, num_iters=n
  )
  chex.assert_trees_all_close(out.values, dense[:3], rtol=1e-9, atol=1e-10)
  top = se.preconditioned_sharpness(
      mlp_loss, params, batch, precond, num_iters=n
  )
  chex.assert_trees_all_close(top, dense[0], rtol=1e-10)
  # The eigenvector of P^{-1/2} H P^{-1/2} satisfies its eigen-equation.
  flat, unravel = ravel_pytree(params)
  y = ravel_pytree(jax.tree.map(lambda v: v[0], out.vectors))[0]
  d = ravel_pytree(precond)[0]
  hy = ravel_pytree(se.hvp(mlp_loss, params, batch, unravel(y / jnp.sqrt(d))))[
      0
  ]
  chex.assert_trees_all_close(
      hy / jnp.sqrt(d), out.values[0] * y, atol=1e-9 * float(dense[0])
  )


def test_unit_preconditioner_is_sharpness_and_warm_start():
  params, batch = mlp_problem(2)
  ones = jax.tree.map(jnp.ones_like, params)
  chex.assert_trees_all_close(
      se.preconditioned_sharpness(mlp_loss, params, batch, ones, num_iters=24),
      se.sharpness(mlp_loss, params, batch, num_iters=24),
      rtol=1e-10,
  )
  out = preconditioned_eigenpairs(mlp_loss, params, batch, ones, num_iters=24)
  warm = jax.tree.map(lambda v: v[0], out.vectors)
  again = se.preconditioned_sharpness(
      mlp_loss, params, batch, ones, num_iters=2, init=warm
  )
  chex.assert_trees_all_close(again, out.values[0], rtol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.adam(0.01),
        lambda: optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.01)),
        lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.01),
        lambda: se.sam(optax.adam(0.01), rho=0.05),
    ],
    ids=["adam", "chain", "inject", "sam"],
)
def test_adam_preconditioner_from_any_state(make):
  params, batch = mlp_problem()
  plain_params, plain = adam_state(params, batch)
  num_steps = 5
  opt = make()
  state = opt.init(params)
  p = params
  for _ in range(num_steps):
    g = jax.grad(mlp_loss)(p, batch)
    updates, state = opt.update(
        g, state, p, grad_fn=lambda q: jax.grad(mlp_loss)(q, batch)
    )
    p = optax.apply_updates(p, updates)
  precond = se.adam_preconditioner(state)
  adam = [
      s
      for s in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
      )
      if isinstance(s, optax.ScaleByAdamState)
  ][0]
  expected = jax.tree.map(
      lambda nu: jnp.sqrt(nu / (1 - 0.999**num_steps)) + 1e-8, adam.nu
  )
  chex.assert_trees_all_close(precond, expected, rtol=1e-12)
  assert int(adam.count) == num_steps
  del plain_params, plain


def test_adam_preconditioner_reproduces_the_adam_step():
  # Adam's step is -eta * mu_hat / P: recompute it from P.
  params, batch = mlp_problem()
  params, state = adam_state(params, batch, num_steps=3)
  opt = optax.adam(0.01)
  g = jax.grad(mlp_loss)(params, batch)
  updates, new_state = opt.update(g, state, params)
  precond = se.adam_preconditioner(new_state)
  mu_hat = jax.tree.map(lambda m: m / (1 - 0.9**4), new_state[0].mu)
  chex.assert_trees_all_close(
      updates,
      jax.tree.map(lambda m, p: -0.01 * m / p, mu_hat, precond),
      rtol=1e-10,
  )


def test_adam_preconditioned_sharpness_matches_dense():
  params, batch = mlp_problem(3)
  params, state = adam_state(params, batch, num_steps=10)
  precond = se.adam_preconditioner(state)
  dense = dense_preconditioned(params, batch, precond)
  top = se.preconditioned_sharpness(
      mlp_loss, params, batch, precond, num_iters=24
  )
  chex.assert_trees_all_close(top, dense[0], rtol=1e-9)


def test_count_zero_and_errors():
  params, _ = mlp_problem()
  state = optax.adam(0.1).init(params)
  precond = se.adam_preconditioner(state, eps=1e-8)
  chex.assert_trees_all_close(
      precond, jax.tree.map(lambda p: jnp.full_like(p, 1e-8), params)
  )
  assert float(se.eps_floor_fraction(precond, 1e-8)) == 1.0
  with pytest.raises(ValueError, match="ScaleByAdamState"):
    se.adam_preconditioner(optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="ScaleByAdamState"):
    se.adam_preconditioner((state, state))
  _, batch = mlp_problem()
  zero = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="preconditioner"):
    se.preconditioned_sharpness(mlp_loss, params, batch, zero)
  with pytest.raises(ValueError, match="preconditioner"):
    se.preconditioned_sharpness(mlp_loss, params, batch, {"w1": 1.0})


def test_eps_floor_inflates_the_preconditioned_sharpness():
  # A coordinate with v_hat = 0 and a tiny curvature 1e-4 dominates once its
  # preconditioner sits at eps = 1e-8: 1e-4 / 1e-8 = 1e4 >> the rest.
  h = jnp.array([2.0, 1.0, 1e-4])
  loss = lambda w, h: 0.5 * jnp.sum(h * w**2)
  precond = jnp.array([0.1, 0.1, 1e-8])
  top = se.preconditioned_sharpness(loss, jnp.zeros(3), h, precond, num_iters=3)
  chex.assert_trees_all_close(top, 1e4, rtol=1e-9)
  chex.assert_trees_all_close(se.eps_floor_fraction(precond, 1e-8), 1 / 3)
  assert float(se.eps_floor_fraction(precond, 1e-8, factor=0.5)) == 1 / 3
  assert float(se.eps_floor_fraction(jnp.array([0.1, 0.2]), 1e-8)) == 0.0


def test_jit():
  params, batch = mlp_problem()
  precond = jax.tree.map(jnp.ones_like, params)
  f = jax.jit(
      se.preconditioned_sharpness, static_argnums=0, static_argnames="num_iters"
  )
  chex.assert_trees_all_close(
      f(mlp_loss, params, batch, precond, num_iters=24),
      se.sharpness(mlp_loss, params, batch, num_iters=24),
      rtol=1e-10,
  )
