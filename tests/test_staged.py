"""The staged programs (``sam_eos.staged``) against the in-graph loop.

Every test runs the same ``se.train`` call in both forms (forced with
``SAM_EOS_PROGRAMS``) in float64 and asserts the same history, parameters
and divergence; the krylov tests compare a staged solve with
``krylov.eigenpairs`` and with dense ``eigh``.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_eos as se
from sam_eos import krylov, staged
from small_problems import mlp_loss, mlp_problem


def _both(monkeypatch, **kwargs):
  """``se.train`` in the in-graph and the staged form, same arguments."""
  out = {}
  for form in staged.FORMS:
    monkeypatch.setenv(staged.ENV_VAR, form)
    out[form] = se.train(progress=False, **kwargs)
  return out["in_graph"], out["staged"]


def _assert_same(a, b, rtol=1e-9, skip=()):
  assert a.history.keys() == b.history.keys()
  for name in a.history:
    if name in ("wall_time", *skip):
      continue
    np.testing.assert_allclose(
        a.history[name], b.history[name], rtol=rtol, atol=1e-12, err_msg=name
    )
  chex.assert_trees_all_close(a.params, b.params, rtol=rtol, atol=1e-12)
  np.testing.assert_array_equal(a.diverged_at, b.diverged_at)


def _problem(num_examples=8):
  params, data = mlp_problem(0, num_examples)
  return dict(loss_fn=mlp_loss, params=params, data=data)


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_gd_and_sam_match_the_in_graph_loop(monkeypatch, x64, rho):
  a, b = _both(
      monkeypatch,
      **_problem(),
      learning_rate=0.5,
      rho=rho,
      num_steps=23,
      track_every=4,
      sharpness_tol=1e-6,
      num_lanczos_iters=14,
  )
  _assert_same(a, b)
  assert np.all(b.history["lanczos_iters"] > 3)  # more than one stage


def test_mixed_sweep_minibatch_and_chunks_match(monkeypatch, x64):
  a, b = _both(
      monkeypatch,
      **_problem(num_examples=16),
      learning_rate=[0.3, 0.3, 0.6],
      rho=[0.0, 0.05, 0.1],
      key=[0, 1, 2],
      batch_size=8,
      num_steps=31,
      track_every=3,
      chunk_size=9,
      num_top_eigenvalues=2,
      eval_fn=lambda p, d: {"test_loss": mlp_loss(p, d)},
      eval_data=mlp_problem(1, 4)[1],
  )
  _assert_same(a, b)
  assert a.history["step"].shape == (3, 11)


def test_divergence_is_the_same_step(monkeypatch, x64):
  problem = _problem()
  # A quartic term: a large step overshoots super-exponentially.
  problem["loss_fn"] = lambda p, b: mlp_loss(p, b) + jnp.sum(p["w1"] ** 4)
  with pytest.warns(UserWarning, match="Diverged"):
    a, b = _both(
        monkeypatch,
        **problem,
        learning_rate=[0.1, 10.0],
        rho=0.1,
        num_steps=20,
        track_every=2,
    )
  # The uncertified bottom Ritz value of the last check before the blow-up
  # (|lambda_min| ~ 1e128) is not reproducible to float rounding.
  _assert_same(a, b, skip=("lambda_min",))
  assert b.diverged_at[0] == -1 and b.diverged_at[1] >= 0


def test_a_staged_run_resumes_where_it_stopped(monkeypatch, x64, tmp_path):
  monkeypatch.setenv(staged.ENV_VAR, "staged")
  kwargs = dict(**_problem(), learning_rate=0.5, rho=0.05, track_every=3)
  se.train(num_steps=10, out_dir=str(tmp_path), progress=False, **kwargs)
  resumed = se.train(
      num_steps=25, out_dir=str(tmp_path), progress=False, **kwargs
  )
  monkeypatch.setenv(staged.ENV_VAR, "in_graph")
  straight = se.train(num_steps=25, progress=False, **kwargs)
  _assert_same(straight, resumed)


def test_preconditioner_and_weight_decay_match(monkeypatch, x64):
  a, b = _both(
      monkeypatch,
      **_problem(),
      learning_rate=0.01,
      optimizer=optax.adam(0.01),
      preconditioner=se.adam_preconditioner,
      weight_decay=0.01,
      rho=0.05,
      num_steps=13,
      track_every=4,
  )
  _assert_same(a, b)
  assert np.all(np.isfinite(b.history["preconditioned_sharpness"]))


class _ConvNet(nn.Module):
  """One 3x3 convolution with BatchNorm, then a dense head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(2)(jnp.tanh(x).reshape((x.shape[0], -1)))


def test_a_conv_model_with_state_stages_by_default_and_matches(
    monkeypatch, x64
):
  net = _ConvNet()
  rng = np.random.default_rng(0)
  data = (rng.normal(size=(6, 5, 5, 2)), rng.normal(size=(6, 2)))
  data = jax.tree.map(jnp.asarray, data)
  variables = jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64),
      net.init(jax.random.key(0), data[0]),
  )

  def loss_fn(p, batch, state):
    out, new = net.apply(
        {"params": p, "batch_stats": state},
        batch[0],
        mutable=["batch_stats"],
    )
    return jnp.mean((out - batch[1]) ** 2), new["batch_stats"]

  monkeypatch.delenv(staged.ENV_VAR, raising=False)
  assert staged.uses_staging(
      lambda p, b, s: loss_fn(p, b, s)[0],
      variables["params"],
      data,
      variables["batch_stats"],
  ) == (jax.default_backend() == "cpu")
  mlp = _problem()
  assert not staged.uses_staging(mlp_loss, mlp["params"], mlp["data"])
  monkeypatch.setenv(staged.ENV_VAR, "staged")
  assert staged.uses_staging(mlp_loss, mlp["params"], mlp["data"])
  a, b = _both(
      monkeypatch,
      loss_fn=loss_fn,
      params=variables["params"],
      model_state=variables["batch_stats"],
      data=data,
      learning_rate=0.05,
      rho=[0.0, 0.05],
      num_steps=9,
      track_every=4,
  )
  _assert_same(a, b)
  chex.assert_trees_all_close(a.model_state, b.model_state, rtol=1e-9)


def test_an_unknown_program_form_is_refused(monkeypatch):
  monkeypatch.setenv(staged.ENV_VAR, "scan")
  with pytest.raises(ValueError, match="SAM_EOS_PROGRAMS"):
    se.train(**_problem(), learning_rate=0.1, num_steps=2, progress=False)


def _dense_operator(seed=0, n=12):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  values = np.concatenate([[5.0, 4.9, 4.8], np.linspace(-3.0, 2.0, n - 3)])
  return q @ np.diag(values) @ q.T, values


@pytest.mark.parametrize("sizes", [(1,) * 12, (3, 2, 4, 3), (12,)])
def test_a_staged_solve_equals_eigenpairs(x64, sizes):
  matrix, values = _dense_operator()
  a = jnp.asarray(matrix)
  matvec = lambda v: a @ v
  start = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12)))
  whole = krylov.eigenpairs(matvec, start, 12, k=3, tol=1e-8)
  spec, state = krylov.begin(matvec, start, 12, k=3, tol=1e-8)
  for size in sizes:
    if not krylov.running(state):
      break
    state = jax.jit(lambda s, size=size: krylov.advance(spec, matvec, s, size))(
        state
    )
  staged_result = krylov.finish(spec, state)
  chex.assert_trees_all_close(staged_result, whole, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(
      staged_result.values, np.sort(values)[::-1][:3], rtol=1e-7
  )


def test_a_vmapped_staged_solve_freezes_each_member(x64):
  mats = [jnp.asarray(_dense_operator(seed)[0]) for seed in (0, 1, 2)]
  stack = jnp.stack(mats)
  starts = jnp.asarray(np.random.default_rng(3).normal(size=(3, 2, 12)))
  tols = jnp.array([1e-2, 1e-5, 1e-8])

  def solo(m, s, tol):
    return krylov.eigenpairs(lambda v: m @ v, s, 12, k=2, tol=tol)

  def stage(m, s, tol, state, size):
    spec, fresh = krylov.begin(
        lambda v: m @ v, s, 12, k=2, tol=tol, axis_name="i"
    )
    state = fresh if state is None else state
    return krylov.advance(spec, lambda v: m @ v, state, size)

  state = jax.vmap(lambda m, s, t: stage(m, s, t, None, 4), axis_name="i")(
      stack, starts, tols
  )
  while bool(jnp.any(jax.vmap(krylov.running)(state))):
    state = jax.vmap(lambda m, s, t, st: stage(m, s, t, st, 3), axis_name="i")(
        stack, starts, tols, state
    )
  for i, (m, s, tol) in enumerate(zip(mats, starts, tols)):
    member = jax.tree.map(lambda x: x[i], state)
    spec, _ = krylov.begin(lambda v: m @ v, s, 12, k=2, tol=tol)
    chex.assert_trees_all_close(
        krylov.finish(spec, member), solo(m, s, tol), rtol=1e-10, atol=1e-12
    )


def test_stage_sizes_come_from_the_menu_and_stop_at_the_cap():
  for predicted in range(1, 40):
    for cap in (1, 5, 20, 30):
      sizes = list(staged.stage_sizes(predicted, cap))
      assert sum(sizes) == cap
      assert all(s in staged.MENU for s in sizes)
      assert sizes[0] <= max(predicted, 1)


@pytest.mark.parametrize("num_top", [1, 2])
def test_tracker_measure_staged_equals_measure(x64, num_top):
  params, data = mlp_problem(2, 8)
  tracker = se.SharpnessTracker(
      mlp_loss, tol=1e-7, max_iters=20, num_top_eigenvalues=num_top
  )
  state = tracker.init(params, key=jax.random.key(3))
  kwargs = dict(learning_rate=0.2, rho=0.05, momentum=0.5)
  new, metrics = tracker.measure_staged(state, params, data, **kwargs)
  ref_state, ref = jax.jit(lambda s, p, d: tracker.measure(s, p, d, **kwargs))(
      state, params, data
  )
  chex.assert_trees_all_close(metrics, ref, rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_close(new, ref_state, rtol=1e-9, atol=1e-12)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = jax.hessian(lambda f: mlp_loss(unravel(f), data))(flat)
  dense = np.linalg.eigvalsh(np.asarray(hess))[::-1][:num_top]
  np.testing.assert_allclose(metrics.top_eigenvalues, dense, rtol=1e-6)
  assert metrics.lanczos_iters > 8  # it took more than the first stage


def test_eager_hessian_eigenpairs_stages_and_matches_jit(monkeypatch, x64):
  params, data = mlp_problem(4, 8)
  kwargs = dict(k=2, num_iters=20, tol=1e-8, key=jax.random.key(1))
  monkeypatch.setenv(staged.ENV_VAR, "staged")
  eager = se.hessian_eigenpairs(mlp_loss, params, data, **kwargs)
  both = se.hessian_eigenpairs(mlp_loss, params, data, which="both", **kwargs)
  monkeypatch.setenv(staged.ENV_VAR, "in_graph")
  jitted = jax.jit(
      lambda p, d: se.hessian_eigenpairs(mlp_loss, p, d, **kwargs)
  )(params, data)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-9, atol=1e-12)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = np.linalg.eigvalsh(
      np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), data))(flat))
  )
  np.testing.assert_allclose(eager.values, hess[::-1][:2], rtol=1e-7)
  np.testing.assert_allclose(both.values[2:], hess[:2][::-1], rtol=1e-6)
  assert int(eager.num_iters) > 8  # several stages
