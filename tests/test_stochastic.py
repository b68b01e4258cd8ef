"""Batch sharpness and the minibatch SAM-edge against exact enumeration."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se
from small_problems import mlp_loss, mlp_problem


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def dense_terms(params, batch):
  """``(g^T H g, ||g||^2)`` from the dense gradient and Hessian."""
  flat, unravel = ravel_pytree(params)
  f = lambda v: mlp_loss(unravel(v), batch)
  g = np.asarray(jax.grad(f)(flat))
  h = np.asarray(jax.hessian(f)(flat))
  return g @ h @ g, g @ g


def subset(data, idx):
  return jax.tree.map(lambda x: x[np.asarray(idx)], data)


batch_sharpness = jax.jit(
    se.batch_sharpness,
    static_argnums=0,
    static_argnames=("batch_size", "num_batches", "min_batches"),
)


def test_one_full_batch_is_the_dense_ratio():
  params, data = mlp_problem(num_examples=6)
  a, b = dense_terms(params, data)
  out = batch_sharpness(
      mlp_loss,
      params,
      data,
      batch_size=6,
      num_batches=1,
      key=jax.random.key(0),
  )
  chex.assert_trees_all_close(out.value, a / b, rtol=1e-10)
  assert int(out.num_batches) == 1
  assert np.isinf(out.upper) and np.isinf(out.lower)


def test_estimator_and_interval_reproduced_from_the_documented_batches():
  params, data = mlp_problem(num_examples=6)
  key = jax.random.key(1)
  k = 30
  out = batch_sharpness(
      mlp_loss, params, data, batch_size=2, num_batches=k, key=key
  )
  terms = np.array(
      [
          dense_terms(
              params,
              subset(
                  data,
                  jax.random.choice(
                      jax.random.fold_in(key, i), 6, (2,), replace=False
                  ),
              ),
          )
          for i in range(k)
      ]
  )
  a, b = terms[:, 0], terms[:, 1]
  ratio = a.mean() / b.mean()
  cov = np.cov(a, b)  # ddof = 1
  var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (
      k * b.mean() ** 2
  )
  half = 1.959963984540054 * np.sqrt(var)
  chex.assert_trees_all_close(out.value, ratio, rtol=1e-10)
  chex.assert_trees_all_close(
      (out.lower, out.upper), (ratio - half, ratio + half), rtol=1e-9
  )


def test_converges_to_exact_enumeration_over_all_batches():
  # N = 6, batch size 2: B is uniform over the 15 pairs (sampled without
  # replacement within a batch), so the exact value is a ratio of averages.
  params, data = mlp_problem(2, num_examples=6)
  pairs = list(itertools.combinations(range(6), 2))
  terms = np.array([dense_terms(params, subset(data, p)) for p in pairs])
  exact = terms[:, 0].mean() / terms[:, 1].mean()
  out = batch_sharpness(
      mlp_loss,
      params,
      data,
      batch_size=2,
      num_batches=3000,
      key=jax.random.key(2),
  )
  half = float(out.upper - out.value)
  assert half < 0.1 * abs(exact), (half, exact)
  # The 95% interval is ~2 standard errors: 2 half-widths is ~4 of them.
  assert abs(float(out.value) - exact) < 2 * half, (out, exact)
  # The full-batch ratio differs: the minibatch quantity is its own thing.
  full = dense_terms(params, data)
  assert abs(full[0] / full[1] - exact) > 4 * half


def test_relative_error_stopping_rule():
  params, data = mlp_problem(3, num_examples=6)
  out = batch_sharpness(
      mlp_loss,
      params,
      data,
      batch_size=3,
      num_batches=5000,
      key=jax.random.key(3),
      rel_tol=0.05,
  )
  k = int(out.num_batches)
  assert 10 <= k < 5000
  assert float(out.upper - out.value) <= 0.05 * abs(float(out.value))
  # One batch fewer would not have met the tolerance (or k is the minimum).
  if k > 10:
    fewer = batch_sharpness(
        mlp_loss,
        params,
        data,
        batch_size=3,
        num_batches=k - 1,
        key=jax.random.key(3),
    )
    assert float(fewer.upper - fewer.value) > 0.05 * abs(float(fewer.value))


def test_batch_sam_edge_against_enumeration_and_full_batch():
  params, data = mlp_problem(4, num_examples=6)
  eta, rho = 0.05, 0.1
  norms = [
      np.sqrt(dense_terms(params, subset(data, p))[1])
      for p in itertools.combinations(range(6), 3)
  ]
  exact = np.mean(np.asarray(se.sam_edge(eta, rho, np.array(norms))))
  out = se.batch_sam_edge(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      rho=rho,
      batch_size=3,
      num_batches=2000,
      key=jax.random.key(5),
  )
  half = float(out.upper - out.value)
  assert abs(float(out.value) - exact) < 2 * half, (out, exact)
  full = se.batch_sam_edge(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      rho=rho,
      batch_size=6,
      num_batches=1,
      key=jax.random.key(0),
      momentum=0.5,
  )
  chex.assert_trees_all_close(
      full.value,
      se.sam_edge(
          eta, rho, np.sqrt(dense_terms(params, data)[1]), momentum=0.5
      ),
      rtol=1e-10,
  )


def test_errors():
  params, data = mlp_problem(num_examples=6)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="batch_size"):
    se.batch_sharpness(
        mlp_loss, params, data, batch_size=7, num_batches=1, key=key
    )
  with pytest.raises(ValueError, match="leading axis"):
    se.batch_sharpness(
        mlp_loss,
        params,
        (data[0], data[1][:5]),
        batch_size=2,
        num_batches=1,
        key=key,
    )
  with pytest.raises(ValueError, match="rel_tol"):
    se.batch_sharpness(
        mlp_loss,
        params,
        data,
        batch_size=2,
        num_batches=1,
        key=key,
        rel_tol=0.0,
    )
