"""The certified block-started Lanczos solver against dense ``eigh``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos as se
from sam_eos import krylov


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def random_symmetric(n, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, n))
  return (a + a.T) / 2


def with_spectrum(values, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(len(values), len(values))))
  return u @ np.diag(values) @ u.T, u


solve = jax.jit(
    krylov.eigenpairs,
    static_argnums=(0, 2),
    static_argnames=("k", "which", "num_certified"),
)


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-8])
def test_tolerance_is_certified_and_stops_early(tol):
  a = random_symmetric(60)
  dense = np.linalg.eigvalsh(a)
  matvec = lambda x: jnp.asarray(a) @ x
  out = krylov.eigenpairs(matvec, jnp.ones(60), 50, k=2, tol=tol)
  assert int(out.num_iters) < 50
  for value, vector, residual in zip(out.values, out.vectors, out.residuals):
    true_residual = np.linalg.norm(a @ vector - value * vector)
    chex.assert_trees_all_close(residual, true_residual, rtol=1e-6, atol=1e-12)
    assert residual <= tol * abs(value)
    assert np.min(np.abs(dense - value)) <= residual * (1 + 1e-9)
  assert out.values[0] <= dense[-1] * (1 + 1e-12)  # a Rayleigh quotient
  # Tighter tolerances cost more products.
  looser = krylov.eigenpairs(matvec, jnp.ones(60), 50, k=2, tol=tol * 100)
  assert int(looser.num_iters) <= int(out.num_iters)


def test_single_start_without_tolerance_is_lanczos():
  a = random_symmetric(30, seed=1)
  matvec = lambda x: jnp.asarray(a) @ x
  v0 = jnp.asarray(np.random.default_rng(2).normal(size=30))
  ours = krylov.eigenpairs(matvec, v0, 12, k=3)
  ref = se.lanczos(matvec, v0, 12)
  assert int(ours.num_iters) == 12
  chex.assert_trees_all_close(ours.values, ref.ritz_values[:3], rtol=1e-10)
  chex.assert_trees_all_close(
      ours.bottom_values[0], ref.ritz_values[-1], rtol=1e-10
  )
  chex.assert_trees_all_close(ours.residuals, ref.residuals[:3], rtol=1e-6)


def test_full_basis_gives_the_whole_spectrum_at_both_ends():
  a = random_symmetric(10, seed=3)
  dense = np.linalg.eigvalsh(a)
  out = krylov.eigenpairs(
      lambda x: jnp.asarray(a) @ x, jnp.ones(10), 10, k=3, which="both"
  )
  chex.assert_trees_all_close(out.values, dense[::-1][:3], rtol=1e-10)
  chex.assert_trees_all_close(out.bottom_values, dense[:3], rtol=1e-10)
  np.testing.assert_array_less(out.residuals, 1e-10)
  np.testing.assert_array_less(out.bottom_residuals, 1e-10)


def test_both_ends_are_certified():
  a = random_symmetric(80, seed=4)
  dense = np.linalg.eigvalsh(a)
  out = krylov.eigenpairs(
      lambda x: jnp.asarray(a) @ x, jnp.ones(80), 70, tol=1e-6, which="both"
  )
  assert int(out.num_iters) < 70
  assert abs(out.values[0] - dense[-1]) <= 1e-6 * abs(dense[-1])
  assert abs(out.bottom_values[0] - dense[0]) <= 1e-6 * abs(dense[0])


def test_block_start_finds_the_top_after_an_order_swap():
  # The previous top eigenvector is now the second one: started from it
  # alone, the iteration certifies the wrong eigenvalue after one product
  # (it is an eigenvector); the carried block's Rayleigh-Ritz step finds the
  # new top one.
  a, u = with_spectrum([10.0, 9.0, 8.0, 3.0, 2.0, 1.0, 0.5, 0.2])
  matvec = lambda x: jnp.asarray(a) @ x
  carried = jnp.asarray(u[:, [1, 0, 2]].T)  # old order: 9, 10, 8
  alone = krylov.eigenpairs(matvec, carried[0], 8, tol=1e-6)
  block = krylov.eigenpairs(matvec, carried, 8, k=3, tol=1e-6, num_certified=1)
  assert int(alone.num_iters) == 1
  chex.assert_trees_all_close(alone.values[0], 9.0, rtol=1e-10)
  assert int(block.num_iters) == 3
  chex.assert_trees_all_close(
      block.values, jnp.array([10.0, 9.0, 8.0]), rtol=1e-10
  )


def test_warm_start_needs_fewer_products_than_cold():
  a = random_symmetric(100, seed=5)
  matvec = lambda x: jnp.asarray(a) @ x
  cold = krylov.eigenpairs(matvec, jnp.ones(100), 80, k=3, tol=1e-5)
  nearby = a + 1e-3 * random_symmetric(100, seed=6)
  warm = krylov.eigenpairs(
      lambda x: jnp.asarray(nearby) @ x,
      cold.vectors,
      80,
      k=3,
      tol=1e-5,
      num_certified=1,
  )
  assert int(warm.num_iters) < int(cold.num_iters) / 2
  top = np.linalg.eigvalsh(nearby)[-1]
  assert abs(warm.values[0] - top) <= warm.residuals[0]


@pytest.mark.parametrize("axis_name", [None, "b"])
@pytest.mark.parametrize("num_start", [1, 3])
def test_vmap_over_start_and_traced_tolerance(axis_name, num_start):
  # With axis_name, members that stop early are frozen by masked writes
  # while the others run on: every member must equal its own solo run.
  a = random_symmetric(40, seed=7)
  matvec = lambda x: jnp.asarray(a) @ x
  starts = jnp.asarray(np.random.default_rng(8).normal(size=(3, num_start, 40)))
  tols = jnp.array([1e-2, 1e-5, 1e-8])
  run = lambda v, t: krylov.eigenpairs(
      matvec, v, 40, k=num_start, tol=t, which="both", axis_name=axis_name
  )
  out = jax.jit(jax.vmap(run, axis_name="b"))(starts, tols)
  for i in range(3):
    alone = krylov.eigenpairs(
        matvec, starts[i], 40, k=num_start, tol=float(tols[i]), which="both"
    )
    assert int(out.num_iters[i]) == int(alone.num_iters)
    for field in ("values", "residuals", "bottom_values"):
      chex.assert_trees_all_close(
          getattr(out, field)[i], getattr(alone, field), rtol=1e-8, atol=1e-12
      )
    chex.assert_trees_all_close(
        jnp.abs(out.vectors[i] @ alone.vectors.T),
        jnp.eye(num_start),
        atol=1e-6,
    )
  iters = np.asarray(out.num_iters)
  assert np.all(np.diff(iters) >= 0) and iters[0] < iters[-1]


def test_breakdown_and_zero_operator_give_no_nan():
  out = krylov.eigenpairs(lambda x: x, jnp.ones(5), 5, k=2)
  chex.assert_trees_all_close(out.values, jnp.ones(2))
  assert np.all(np.isfinite(out.vectors))
  zero = krylov.eigenpairs(lambda x: 0 * x, jnp.ones(5), 5, tol=1e-3)
  assert int(zero.num_iters) == 1 and float(zero.values[0]) == 0.0
  # A zero start row and a dependent one are replaced, not propagated.
  block = jnp.stack([jnp.zeros(5), jnp.ones(5), jnp.ones(5)])
  d = jnp.arange(1.0, 6.0)
  out = krylov.eigenpairs(lambda x: d * x, block, 5, k=2)
  chex.assert_trees_all_close(out.values, jnp.array([5.0, 4.0]), rtol=1e-10)


def test_float32_and_bfloat16_operators():
  a = random_symmetric(30, seed=9)
  top = np.linalg.eigvalsh(a)[-1]
  for dtype, tol in [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)]:
    low = jnp.asarray(a, dtype)
    out = krylov.eigenpairs(
        lambda x: (low @ x.astype(dtype)), jnp.ones(30, dtype), 30, tol=tol
    )
    assert out.values.dtype == jnp.float32
    # The residual is exact up to the operator's own rounding.
    bound = tol * abs(top) + 10 * float(jnp.finfo(dtype).eps) * np.abs(a).sum()
    assert abs(float(out.values[0]) - top) <= bound


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((jnp.ones((1, 2, 3)), 2), {}, "start"),
        ((jnp.ones(4), 5), {}, "max_iters"),
        ((jnp.ones((3, 4)), 2), {}, "start"),
        ((jnp.ones(4), 2), dict(k=3), "k"),
        ((jnp.ones(4), 2), dict(which="bottom"), "which"),
        ((jnp.ones(4), 2), dict(tol=0.0), "tol"),
        ((jnp.ones(4), 2), dict(k=1, num_certified=2), "num_certified"),
        ((jnp.array([1.0, jnp.nan, 0, 0]), 2), {}, "start"),
    ],
)
def test_bad_arguments_name_the_argument(args, kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    krylov.eigenpairs(lambda x: x, *args, **kwargs)
