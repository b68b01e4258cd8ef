"""The compiled training loop and its driver, against exact references."""

import csv
import importlib
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import flax.linen as nn

import sam_eos as se
from sam_eos import checkpoint, loop


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def quad_loss(w, data):
  """0.5 * w^T diag(h) w, the Hessian row `h` passed as the (single) example."""
  return 0.5 * jnp.sum(data[0] * w**2)


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(num_examples=12, dtype=jnp.float32, key=0):
  k = jax.random.split(jax.random.key(key), 4)
  params = {
      "w1": jax.random.normal(k[0], (3, 6), dtype) * 0.8,
      "b1": jnp.zeros(6, dtype),
      "w2": jax.random.normal(k[1], (6, 2), dtype) * 0.5,
  }
  data = (
      jax.random.normal(k[2], (num_examples, 3), dtype),
      jax.random.normal(k[3], (num_examples, 2), dtype),
  )
  return params, data


def dense_top(loss_fn, params, batch):
  """Top eigenpair of the dense Hessian (float64 NumPy eigh)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = jax.hessian(lambda v: loss_fn(unravel(v), batch))(flat)
  vals, vecs = np.linalg.eigh(np.asarray(hess, np.float64))
  return vals[-1], vecs[:, -1]


def test_quadratic_sharpness_is_exact(x64):
  hess = jnp.array([[7.0, 3.0, 1.0, 0.5]])
  result = se.train(
      quad_loss,
      jnp.ones(4),
      hess,
      learning_rate=0.05,
      num_steps=40,
      track_every=5,
      num_lanczos_iters=4,
      progress=False,
  )
  hist = result.history
  np.testing.assert_array_equal(hist["step"], np.arange(0, 40, 5))
  chex.assert_trees_all_close(hist["sharpness"], np.full(8, 7.0), rtol=1e-12)
  chex.assert_trees_all_close(hist["gd_edge"], np.full(8, 40.0))
  chex.assert_trees_all_close(hist["sam_edge"], hist["gd_edge"])
  # GD on a quadratic: w_t = (1 - eta h)^t w_0 exactly.
  w_t = (1 - 0.05 * np.array([7.0, 3.0, 1.0, 0.5])) ** 40
  chex.assert_trees_all_close(result.params, w_t, rtol=1e-10)
  for i, t in enumerate(hist["step"]):
    g = (
        np.array([7.0, 3.0, 1.0, 0.5])
        * (1 - 0.05 * np.array([7.0, 3.0, 1.0, 0.5])) ** t
    )
    chex.assert_trees_all_close(
        hist["grad_norm"][i], np.linalg.norm(g), rtol=1e-10
    )
    chex.assert_trees_all_close(
        hist["grad_alignment"][i], abs(g[0]) / np.linalg.norm(g), rtol=1e-8
    )


def test_gd_above_edge_diverges_at_the_right_step(tmp_path):
  lam = np.float32(10.0)
  eta = np.float32(0.25)  # eta * lam = 2.5 > 2: |1 - eta lam| = 1.5 per step
  hess = jnp.array([[lam, 1.0]], jnp.float32)
  # The first step whose loss, gradient or next iterate overflows, simulated
  # in float32 (the gradient norm is overflow-safe: finite for a finite
  # gradient, whose squares may overflow).
  h = np.array([lam, 1.0], np.float32)
  w = np.ones(2, np.float32)
  expected = None
  with np.errstate(over="ignore", invalid="ignore"):
    for t in range(1000):
      loss = np.float32(0.5) * np.sum(h * w**2)
      grad = h * w
      w_next = w - eta * grad
      if not (
          np.isfinite(loss)
          and np.all(np.isfinite(grad))
          and np.all(np.isfinite(w_next))
      ):
        expected = t
        break
      w = w_next
  assert expected is not None
  with pytest.raises(se.TrainingDiverged, match=f"step {expected}") as info:
    se.train(
        quad_loss,
        jnp.ones(2),
        hess,
        learning_rate=float(eta),
        num_steps=1000,
        track_every=1,
        num_lanczos_iters=2,
        progress=False,
        out_dir=tmp_path,
        chunk_size=64,
    )
  assert isinstance(info.value, FloatingPointError)
  assert info.value.step == expected
  hist = info.value.history
  np.testing.assert_array_equal(hist["step"], np.arange(expected))
  for name, values in hist.items():
    assert np.all(np.isfinite(values)), name
  lines = list(csv.DictReader(open(tmp_path / "metrics.csv")))
  assert len(lines) == expected
  assert all(np.isfinite(float(v)) for line in lines for v in line.values())


def test_sam_settles_at_the_two_cycle(x64):
  """DESIGN.md test vector: diag(50, 20, 5, 1), eta=0.01, rho=0.1."""
  hess = jnp.array([[50.0, 20.0, 5.0, 1.0]])
  result = se.train(
      quad_loss,
      jnp.ones(4),
      hess,
      learning_rate=0.01,
      rho=0.1,
      num_steps=3000,
      track_every=100,
      num_lanczos_iters=4,
      progress=False,
      eps=0.0,
  )
  last = {k: v[-5:] for k, v in result.history.items()}
  expected_norm = 0.01 * 0.1 * 50.0**2 / (2 - 0.01 * 50.0)
  chex.assert_trees_all_close(
      last["grad_norm"], np.full(5, expected_norm), rtol=1e-8
  )
  chex.assert_trees_all_close(last["sam_edge"], np.full(5, 50.0), rtol=1e-8)
  chex.assert_trees_all_close(last["sharpness"], np.full(5, 50.0), rtol=1e-10)
  # The iterate has collapsed onto the top eigenvector.
  chex.assert_trees_all_close(last["grad_alignment"], np.ones(5), rtol=1e-8)


def test_tracking_matches_dense_reference_on_mlp(x64):
  params, data = mlp_problem(dtype=jnp.float64)
  eta, rho = 0.1, 0.05
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      rho=rho,
      num_steps=30,
      track_every=3,
      num_lanczos_iters=12,
      sharpness_tol=None,
      num_warm_vectors=1,
      progress=False,
  )
  hist = result.history
  np.testing.assert_array_equal(hist["lanczos_iters"], 12)
  sam_gradient = jax.jit(lambda w: se.sam_gradient(mlp_loss, w, data, rho=rho))
  _, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda v: mlp_loss(unravel(v), data)))
  w = params
  for t in range(30):
    out = sam_gradient(w)
    if t % 3 == 0:
      i = t // 3
      vals, vecs = np.linalg.eigh(
          np.asarray(hessian(jax.flatten_util.ravel_pytree(w)[0]))
      )
      top, vec = vals[-1], vecs[:, -1]
      g = np.asarray(jax.flatten_util.ravel_pytree(out.grads)[0])
      gs = np.asarray(jax.flatten_util.ravel_pytree(out.sam_grads)[0])
      chex.assert_trees_all_close(hist["sharpness"][i], top, rtol=1e-8)
      chex.assert_trees_all_close(hist["loss"][i], out.loss, rtol=1e-10)
      chex.assert_trees_all_close(
          hist["grad_norm"][i], np.linalg.norm(g), rtol=1e-10
      )
      chex.assert_trees_all_close(
          hist["sam_edge"][i],
          se.sam_edge(eta, rho, np.linalg.norm(g)),
          rtol=1e-10,
      )
      chex.assert_trees_all_close(
          hist["grad_alignment"][i],
          abs(g @ vec) / np.linalg.norm(g),
          rtol=1e-6,
          atol=1e-9,
      )
      chex.assert_trees_all_close(
          hist["sam_grad_alignment"][i],
          abs(gs @ vec) / np.linalg.norm(gs),
          rtol=1e-6,
          atol=1e-9,
      )
    w = jax.tree.map(lambda p, s: p - eta * s, w, out.sam_grads)
  chex.assert_trees_all_close(result.params, w, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, base",
    [
        ({"momentum": 0.9}, lambda: optax.sgd(0.05, momentum=0.9)),
        ({"optimizer": optax.adam(1e-2)}, lambda: optax.adam(1e-2)),
    ],
)
def test_loop_equals_optax_transform(x64, kwargs, base):
  params, data = mlp_problem(dtype=jnp.float64, key=1)
  rho = 0.05
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.05,
      rho=rho,
      num_steps=8,
      track_every=4,
      num_lanczos_iters=3,
      progress=False,
      **kwargs,
  )
  opt = se.sam(base(), rho)
  state = opt.init(params)
  grad = jax.grad(mlp_loss)
  w = params
  for _ in range(8):
    updates, state = opt.update(
        grad(w, data), state, w, grad_fn=lambda p: grad(p, data)
    )
    w = optax.apply_updates(w, updates)
  chex.assert_trees_all_close(result.params, w, rtol=1e-10)
  if "momentum" in kwargs:
    chex.assert_trees_all_close(
        result.history["gd_edge"], np.full(2, 2 * 1.9 / 0.05)
    )


def test_resume_is_bit_identical(tmp_path):
  params, data = mlp_problem(num_examples=16)
  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      batch_size=8,
      track_every=5,
      num_lanczos_iters=5,
      progress=False,
      chunk_size=10,
      key=3,
  )
  full = se.train(
      mlp_loss, params, data, num_steps=40, out_dir=tmp_path / "a", **kwargs
  )
  se.train(
      mlp_loss, params, data, num_steps=25, out_dir=tmp_path / "b", **kwargs
  )
  resumed = se.train(
      mlp_loss, params, data, num_steps=40, out_dir=tmp_path / "b", **kwargs
  )
  chex.assert_trees_all_equal(full.params, resumed.params)
  for name in se.HISTORY_COLUMNS:
    if name != "wall_time":
      np.testing.assert_array_equal(full.history[name], resumed.history[name])
  a = se.read_csv(tmp_path / "a" / "metrics.csv")
  b = se.read_csv(tmp_path / "b" / "metrics.csv")
  np.testing.assert_array_equal(a["step"], np.arange(0, 40, 5))
  for name in a:
    if name != "wall_time":
      np.testing.assert_array_equal(a[name], b[name])
  # Asking for no more steps than done just returns the stored result.
  again = se.train(
      mlp_loss, params, data, num_steps=40, out_dir=tmp_path / "b", **kwargs
  )
  chex.assert_trees_all_equal(again.params, full.params)
  with pytest.raises(ValueError, match="other settings"):
    se.train(
        mlp_loss,
        params,
        data,
        num_steps=50,
        out_dir=tmp_path / "b",
        **{**kwargs, "rho": 0.1},
    )


def test_vmapped_sweep_equals_separate_runs(x64):
  params, data = mlp_problem(dtype=jnp.float64, key=2)
  rhos = [0.0, 0.02, 0.1]
  kwargs = dict(
      learning_rate=0.1,
      num_steps=12,
      track_every=4,
      num_lanczos_iters=8,
      progress=False,
      key=[0, 1, 2],
      batch_size=6,
  )
  sweep = se.train(mlp_loss, params, data, rho=rhos, **kwargs)
  assert sweep.history["sharpness"].shape == (3, 3)
  for i, rho in enumerate(rhos):
    single = se.train(mlp_loss, params, data, rho=rho, **{**kwargs, "key": i})
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[i], sweep.params), single.params, rtol=1e-10
    )
    for name in (
        "loss",
        "grad_norm",
        "sharpness",
        "sam_edge",
        "grad_alignment",
        "lanczos_iters",
        "sharpness_residual",
    ):
      chex.assert_trees_all_close(
          sweep.history[name][i], single.history[name], rtol=1e-8, atol=1e-12
      )


def test_minibatch_is_drawn_by_key(x64):
  params, data = mlp_problem(num_examples=20, dtype=jnp.float64)
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.1,
      num_steps=1,
      batch_size=5,
      key=7,
      track_every=1,
      num_lanczos_iters=30,
      sharpness_tol=None,
      progress=False,
  )
  batch = loop.sample_batch(data, jax.random.fold_in(jax.random.key(7), 0), 5)
  chex.assert_trees_all_close(
      result.history["loss"][0], mlp_loss(params, batch), rtol=1e-12
  )
  top, _ = dense_top(mlp_loss, params, batch)
  assert result.history["sharpness"][0] == pytest.approx(top, rel=1e-8)
  other = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.1,
      num_steps=1,
      batch_size=5,
      key=8,
      track_every=1,
      num_lanczos_iters=4,
      progress=False,
  )
  assert other.history["loss"][0] != result.history["loss"][0]


def test_progress_bar_and_files(tmp_path, capfd):
  params, data = mlp_problem()
  se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.1,
      rho=0.05,
      num_steps=20,
      track_every=5,
      num_lanczos_iters=4,
      out_dir=tmp_path,
      chunk_size=10,
      metadata={"experiment": "unit"},
  )
  err = capfd.readouterr().err
  assert "20/20" in err and "sharp" in err and "sam_edge" in err
  assert sorted(os.listdir(tmp_path)) == [
      "checkpoint.npz",
      "config.json",
      "metrics.csv",
  ]
  config = json.load(open(tmp_path / "config.json"))
  assert config["configs"] == [{"learning_rate": 0.1, "rho": 0.05, "seed": 0}]
  assert config["metadata"] == {"experiment": "unit"}
  header = next(csv.reader(open(tmp_path / "metrics.csv")))
  assert header == [
      "config",
      "learning_rate",
      "rho",
      "seed",
      *se.HISTORY_COLUMNS,
  ]
  assert se.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [
      0,
      5,
      10,
      15,
  ]


def test_compiled_once_across_chunks():
  params, data = mlp_problem()
  calls = []

  def counting_loss(p, b):
    calls.append(1)
    return mlp_loss(p, b)

  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      track_every=2,
      num_lanczos_iters=3,
      progress=False,
      chunk_size=4,
  )
  jax.clear_caches()
  se.train(counting_loss, params, data, num_steps=4, **kwargs)
  one_chunk = len(calls)
  calls.clear()
  jax.clear_caches()
  se.train(counting_loss, params, data, num_steps=22, **kwargs)
  assert len(calls) == one_chunk


def test_bad_input(tmp_path):
  params, data = mlp_problem(num_examples=10)
  ok = dict(learning_rate=0.1, num_steps=5, progress=False)
  cases = [
      (dict(ok, track_every=0), "track_every"),
      (dict(ok, num_steps=0), "num_steps"),
      (dict(ok, batch_size=11), "batch_size"),
      (dict(ok, learning_rate=-0.1), "learning_rate"),
      (dict(ok, rho=-0.1), "rho"),
      (dict(ok, num_lanczos_iters=0), "num_lanczos_iters"),
      (
          dict(ok, rho=[0.1, 0.2], learning_rate=[0.1, 0.2, 0.3]),
          "common length",
      ),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      se.train(mlp_loss, params, data, **kwargs)
  with pytest.raises(ValueError, match="data"):
    se.train(mlp_loss, params, (data[0], data[1][:5]), **ok)
  with pytest.raises(ValueError, match="loss_fn"):
    se.train(
        lambda p, b: jnp.mean((b[0] @ p["w1"]), axis=0), params, data, **ok
    )
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="out_dir"):
    se.train(mlp_loss, params, data, out_dir=blocker / "sub", **ok)


def test_interrupted_run_keeps_finished_chunks_and_resumes(
    tmp_path, monkeypatch
):
  params, data = mlp_problem()
  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      track_every=5,
      num_lanczos_iters=4,
      progress=False,
      chunk_size=10,
      num_steps=40,
  )
  full = se.train(mlp_loss, params, data, out_dir=tmp_path / "full", **kwargs)
  real_save = checkpoint.save
  calls = []

  def interrupting_save(*args, **kw):
    real_save(*args, **kw)
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint, "save", interrupting_save)
  with pytest.raises(KeyboardInterrupt):
    se.train(mlp_loss, params, data, out_dir=tmp_path / "cut", **kwargs)
  monkeypatch.setattr(checkpoint, "save", real_save)
  kept = se.read_csv(tmp_path / "cut" / "metrics.csv")
  assert kept["step"].tolist() == [0, 5, 10, 15]
  resumed = se.train(mlp_loss, params, data, out_dir=tmp_path / "cut", **kwargs)
  chex.assert_trees_all_equal(resumed.params, full.params)
  np.testing.assert_array_equal(
      resumed.history["sharpness"], full.history["sharpness"]
  )


def test_lambda_min_is_the_bottom_eigenvalue(x64):
  # Full Lanczos (iterations = parameters) gives the exact spectrum.
  params, data = mlp_problem(dtype=jnp.float64)
  n = jax.flatten_util.ravel_pytree(params)[0].size
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.1,
      num_steps=3,
      track_every=1,
      num_lanczos_iters=n,
      sharpness_tol=None,
      progress=False,
  )
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = jax.hessian(lambda v: mlp_loss(unravel(v), data))(flat)
  vals = np.linalg.eigvalsh(np.asarray(hess))
  chex.assert_trees_all_close(
      result.history["lambda_min"][0], vals[0], rtol=1e-8, atol=1e-10
  )
  chex.assert_trees_all_close(
      result.history["sharpness"][0], vals[-1], rtol=1e-8
  )
  assert np.all(result.history["lambda_min"] <= result.history["sharpness"])


def test_eval_fn_columns_equal_eval_at_the_tracked_iterates(x64):
  params, data = mlp_problem(dtype=jnp.float64)
  held_out = mlp_problem(num_examples=5, dtype=jnp.float64, key=1)[1]

  def eval_fn(p, batch):
    return {
        "test_loss": mlp_loss(p, batch),
        "test_max": jnp.max(jnp.abs(p["w2"])),
    }

  kwargs = dict(
      learning_rate=0.2,
      rho=0.05,
      num_steps=6,
      track_every=3,
      num_lanczos_iters=4,
      progress=False,
  )
  result = se.train(
      mlp_loss, params, data, eval_fn=eval_fn, eval_data=held_out, **kwargs
  )
  assert list(result.history)[-2:] == ["test_loss", "test_max"]
  # The iterate at step 3 is the final params of a 3-step run.
  for t, row in ((0, 0), (3, 1)):
    w_t = (
        params
        if t == 0
        else se.train(
            mlp_loss, params, data, **{**kwargs, "num_steps": t}
        ).params
    )
    want = eval_fn(w_t, held_out)
    for name in ("test_loss", "test_max"):
      chex.assert_trees_all_close(
          result.history[name][row], want[name], rtol=1e-10
      )


def test_eval_fn_errors_name_the_argument():
  params, data = mlp_problem()
  with pytest.raises(ValueError, match="eval_fn"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        num_steps=2,
        eval_fn=lambda p, d: mlp_loss(p, d),
        eval_data=data,
        progress=False,
    )
  with pytest.raises(ValueError, match="clash"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        num_steps=2,
        eval_fn=lambda p, d: {"loss": mlp_loss(p, d)},
        eval_data=data,
        progress=False,
    )
  with pytest.raises(ValueError, match="eval_data"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        num_steps=2,
        eval_data=data,
        progress=False,
    )


def test_per_config_params_equal_separate_runs(x64, tmp_path):
  inits = [mlp_problem(dtype=jnp.float64, key=k)[0] for k in (0, 1)]
  data = mlp_problem(dtype=jnp.float64)[1]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *inits)
  kwargs = dict(
      learning_rate=0.2,
      rho=0.05,
      num_steps=6,
      track_every=2,
      num_lanczos_iters=4,
      progress=False,
  )
  sweep = se.train(
      mlp_loss,
      stacked,
      data,
      key=[0, 1],
      per_config_params=True,
      out_dir=tmp_path / "run",
      **kwargs,
  )
  for c, init in enumerate(inits):
    single = se.train(mlp_loss, init, data, key=c, **kwargs)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[c], sweep.params), single.params, rtol=1e-10
    )
    chex.assert_trees_all_close(
        sweep.history["sharpness"][c], single.history["sharpness"], rtol=1e-8
    )
  # Resumable like any run, and the stacking is checked.
  again = se.train(
      mlp_loss,
      stacked,
      data,
      key=[0, 1],
      per_config_params=True,
      out_dir=tmp_path / "run",
      **kwargs,
  )
  chex.assert_trees_all_close(again.params, sweep.params)
  with pytest.raises(ValueError, match="per_config_params"):
    se.train(
        mlp_loss,
        inits[0],
        data,
        key=[0, 1, 2],
        per_config_params=True,
        **kwargs,
    )


def test_learning_rate_and_momentum_need_the_default_optimizer():
  params, data = mlp_problem()
  ok = dict(num_steps=2, track_every=1, num_lanczos_iters=2, progress=False)
  with pytest.raises(ValueError, match="learning_rate"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=[0.01, 0.5],
        optimizer=optax.sgd(0.1),
        **ok,
    )
  with pytest.raises(ValueError, match="momentum"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        momentum=0.9,
        optimizer=optax.sgd(0.1),
        **ok,
    )


def test_injected_learning_rate_is_swept_and_drives_the_edges(x64):
  params, data = mlp_problem(dtype=jnp.float64)
  ok = dict(num_steps=4, track_every=2, num_lanczos_iters=2, progress=False)
  inject = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
  sweep = se.train(
      mlp_loss, params, data, learning_rate=[0.01, 0.2], optimizer=inject, **ok
  )
  chex.assert_trees_all_close(
      sweep.history["gd_edge"][:, 0], np.array([2 * 1.5 / 0.01, 2 * 1.5 / 0.2])
  )
  for c, lr in enumerate((0.01, 0.2)):
    single = se.train(
        mlp_loss, params, data, learning_rate=lr, momentum=0.5, **ok
    )
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[c], sweep.params), single.params, rtol=1e-12
    )


def test_sweep_keeps_its_finite_configurations(tmp_path):
  hess = jnp.array([[10.0, 1.0]], jnp.float32)
  kwargs = dict(
      num_steps=150,
      track_every=1,
      num_lanczos_iters=2,
      progress=False,
      chunk_size=32,
  )
  with pytest.raises(se.TrainingDiverged) as info:
    se.train(quad_loss, jnp.ones(2), hess, learning_rate=0.25, **kwargs)
  step = info.value.step
  assert 0 < step < 150
  with pytest.warns(UserWarning, match=r"configuration 1 .*step " + str(step)):
    result = se.train(
        quad_loss,
        jnp.ones(2),
        hess,
        learning_rate=[0.1, 0.25],
        out_dir=tmp_path,
        **kwargs,
    )
  np.testing.assert_array_equal(result.diverged_at, [-1, step])
  single = se.train(quad_loss, jnp.ones(2), hess, learning_rate=0.1, **kwargs)
  assert single.diverged_at == -1
  chex.assert_trees_all_close(result.params[0], single.params)
  assert np.all(np.isfinite(result.params[1]))
  loss = result.history["loss"]
  assert loss.shape == (2, 150) and np.all(np.isfinite(loss[0]))
  assert np.all(np.isfinite(loss[1, :step])) and np.all(
      np.isnan(loss[1, step:])
  )
  rows = se.read_csv(tmp_path / "metrics.csv")
  assert rows["step"][rows["config"] == 0].tolist() == list(range(150))
  assert rows["step"][rows["config"] == 1].tolist() == list(range(step))
  assert all(np.all(np.isfinite(v)) for v in rows.values())
  with np.load(tmp_path / "checkpoint.npz") as saved:
    for name in saved.files:
      if name.startswith("state_") and saved[name].dtype.kind == "f":
        assert np.all(np.isfinite(saved[name])), name
  # Resumed further, the diverged configuration stays stopped.
  with pytest.warns(UserWarning, match="configuration 1"):
    more = se.train(
        quad_loss,
        jnp.ones(2),
        hess,
        learning_rate=[0.1, 0.25],
        out_dir=tmp_path,
        **{**kwargs, "num_steps": 160},
    )
  np.testing.assert_array_equal(more.diverged_at, [-1, step])
  chex.assert_trees_all_equal(more.params[1], result.params[1])


def test_non_finite_sharpness_is_divergence(tmp_path):
  loss = lambda w, d: jnp.sum(jnp.abs(w) ** 1.5)  # infinite curvature at 0
  with pytest.raises(se.TrainingDiverged, match="step 0"):
    se.train(
        loss,
        jnp.array([0.0, 1.0]),
        jnp.zeros((1, 1)),
        learning_rate=0.1,
        num_steps=4,
        track_every=1,
        num_lanczos_iters=2,
        progress=False,
        out_dir=tmp_path,
    )
  assert (
      not (tmp_path / "metrics.csv").exists()
      or not se.read_csv(tmp_path / "metrics.csv")["step"].size
  )


def test_non_finite_params_are_never_checkpointed(tmp_path):
  loss = lambda w, d: 1e3 * jnp.sum(jnp.tanh(w))  # finite at w = inf
  with pytest.raises(se.TrainingDiverged, match="step 0"):
    se.train(
        loss,
        jnp.ones(2, jnp.float32),
        jnp.zeros((1, 1)),
        learning_rate=1e37,
        num_steps=2,
        track_every=1,
        num_lanczos_iters=2,
        progress=False,
        out_dir=tmp_path,
        chunk_size=1,
    )
  assert not (tmp_path / "checkpoint.npz").exists()


def test_default_chunk_is_capped_by_num_steps():
  train_module = importlib.import_module("sam_eos.train")
  assert train_module._default_chunk(10, 10**9) == 10
  assert train_module._default_chunk(10**7, 10**9) <= 1000
  assert train_module._default_chunk(1000, 10) == 200


def test_more_bad_input_names_the_argument():
  params, data = mlp_problem(num_examples=10)
  ok = dict(learning_rate=0.1, num_steps=2, progress=False)
  cases = [
      (dict(ok, learning_rate=float("inf")), "learning_rate"),
      (dict(ok, rho=float("nan")), "rho"),
      (dict(ok, normalize="yes"), "normalize"),
      (dict(ok, key=np.array([1, 2, 3], np.uint32)), "key"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      se.train(mlp_loss, params, data, **kwargs)
  with pytest.raises(ValueError, match="data"):
    se.train(mlp_loss, params, jax.tree.map(lambda x: x[:0], data), **ok)
  with pytest.raises(ValueError, match="params"):
    se.train(quad_loss, jnp.ones(2, jnp.int32), jnp.ones((1, 2)), **ok)


def test_raw_uint32_key_data_is_one_key():
  params, data = mlp_problem()
  ok = dict(
      learning_rate=0.1,
      num_steps=2,
      batch_size=4,
      track_every=1,
      num_lanczos_iters=2,
      progress=False,
  )
  raw = np.asarray(jax.random.key_data(jax.random.key(5)))
  assert raw.dtype == np.uint32
  result = se.train(mlp_loss, params, data, key=raw, **ok)
  reference = se.train(mlp_loss, params, data, key=5, **ok)
  chex.assert_trees_all_equal(result.history["loss"], reference.history["loss"])


def test_default_tolerance_is_certified_against_dense_reference(x64):
  # Every tracked row's sharpness lies within its recorded relative residual
  # of the dense top eigenvalue, the residual meets the tolerance whenever
  # the cap was not reached, and warm starts need fewer products than the
  # cold first check.
  params, data = mlp_problem(num_examples=20, dtype=jnp.float64)
  tol = 1e-4
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.5,
      rho=0.05,
      num_steps=40,
      track_every=4,
      num_lanczos_iters=32,
      sharpness_tol=tol,
      num_warm_vectors=3,
      progress=False,
  )
  hist = result.history
  _, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda v, d: mlp_loss(unravel(v), d)))
  step = jax.jit(lambda w: se.sam_gradient(mlp_loss, w, data, rho=0.05))
  w = params
  for t in range(40):
    if t % 4 == 0:
      i = t // 4
      flat = jax.flatten_util.ravel_pytree(w)[0]
      top = np.linalg.eigvalsh(np.asarray(hessian(flat, data)))[-1]
      bound = hist["sharpness_residual"][i] * abs(hist["sharpness"][i])
      assert abs(hist["sharpness"][i] - top) <= bound * (1 + 1e-8) + 1e-12
      assert hist["sharpness"][i] <= top * (1 + 1e-12)  # a Rayleigh quotient
    w = jax.tree.map(lambda p, g: p - 0.5 * g, w, step(w).sam_grads)
  iters = hist["lanczos_iters"]
  assert np.all(iters < 32)
  assert np.all(hist["sharpness_residual"] <= tol)
  assert np.median(iters[1:]) < iters[0]
  assert np.all(iters >= 3)  # the three carried vectors come first


def test_fixed_iterations_without_tolerance(x64):
  params, data = mlp_problem(dtype=jnp.float64)
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.1,
      num_steps=6,
      track_every=2,
      num_lanczos_iters=7,
      sharpness_tol=None,
      progress=False,
  )
  np.testing.assert_array_equal(result.history["lanczos_iters"], 7)
  assert np.all(result.history["sharpness_residual"] > 0)


def test_mixed_sweep_rows_equal_separate_runs(x64):
  # GD rows of a GD+SAM sweep run without the SAM gradient, in their own
  # program; every row must equal the same configuration run alone.
  params, data = mlp_problem(dtype=jnp.float64)
  kwargs = dict(num_steps=12, track_every=3, progress=False)
  sweep = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=[0.1, 0.2, 0.1],
      rho=[0.05, 0.0, 0.0],
      key=[0, 1, 2],
      **kwargs,
  )
  for c, (lr, rho, seed) in enumerate(
      [(0.1, 0.05, 0), (0.2, 0.0, 1), (0.1, 0.0, 2)]
  ):
    alone = se.train(
        mlp_loss,
        params,
        data,
        learning_rate=lr,
        rho=rho,
        key=seed,
        **kwargs,
    )
    for name in ("loss", "grad_norm", "sharpness", "sam_edge"):
      chex.assert_trees_all_close(
          sweep.history[name][c], alone.history[name], rtol=1e-12
      )
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[c], sweep.params), alone.params, rtol=1e-12
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sharpness_tol=0.0), "sharpness_tol"),
        (dict(sharpness_tol=-1e-3), "sharpness_tol"),
        (dict(num_warm_vectors=0), "num_warm_vectors"),
        (dict(adaptive=1), "adaptive"),
        (dict(adaptive=True, adaptive_eta=-0.1), "adaptive_eta"),
        (dict(eigen_weight=-0.5), "eigen_weight"),
        (dict(eigen_weight=float("inf")), "eigen_weight"),
        (dict(adaptive=True, eigen_weight=0.5), "eigen_weight"),
        (dict(num_top_eigenvalues=0), "num_top_eigenvalues"),
        (
            dict(num_top_eigenvalues=5, num_lanczos_iters=4),
            "num_top_eigenvalues",
        ),
        (
            dict(num_top_eigenvalues=37, num_lanczos_iters=40),
            "num_top_eigenvalues",
        ),
    ],
)
def test_tracking_and_variant_arguments_are_checked(kwargs, name):
  params, data = mlp_problem()
  with pytest.raises(ValueError, match=name):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        rho=0.05,
        num_steps=2,
        progress=False,
        **kwargs,
    )


class _BatchNormNet(nn.Module):
  """Dense -> BatchNorm -> tanh -> Dense, the smallest stateful model."""

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(2)(jnp.tanh(x))


def batchnorm_problem():
  net = _BatchNormNet()
  params, data = mlp_problem(num_examples=16, dtype=jnp.float64)
  variables = net.init(jax.random.key(3), data[0])
  to64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)

  def loss_fn(p, batch, state):
    out, updates = net.apply(
        {"params": p, "batch_stats": state}, batch[0], mutable=["batch_stats"]
    )
    return jnp.mean((out - batch[1]) ** 2), updates["batch_stats"]

  def eval_fn(p, batch, state):
    out = net.apply({"params": p, "batch_stats": state}, batch[0], train=False)
    return {"test_loss": jnp.mean((out - batch[1]) ** 2)}

  return (
      loss_fn,
      eval_fn,
      to64(variables["params"]),
      to64(variables["batch_stats"]),
      data,
  )


def test_batchnorm_state_is_carried_and_matches_a_hand_loop(x64):
  loss_fn, eval_fn, params, stats, data = batchnorm_problem()
  eta, rho = 0.1, 0.05
  result = se.train(
      loss_fn,
      params,
      data,
      learning_rate=eta,
      rho=rho,
      num_steps=12,
      track_every=4,
      model_state=stats,
      eval_fn=eval_fn,
      eval_data=data,
      progress=False,
  )
  w, s = params, stats
  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  for t in range(12):
    (loss, new_s), g = grad(w, data, s)
    scalar = lambda p, b: loss_fn(p, b, s)[0]
    if t % 4 == 0:
      i = t // 4
      flat, unravel = jax.flatten_util.ravel_pytree(w)
      hess = jax.hessian(lambda f: scalar(unravel(f), data))(flat)
      top = np.linalg.eigvalsh(np.asarray(hess))[-1]
      bound = result.history["sharpness_residual"][i] * top
      assert abs(result.history["sharpness"][i] - top) <= bound * 1.001
      chex.assert_trees_all_close(result.history["loss"][i], loss, rtol=1e-10)
      chex.assert_trees_all_close(
          result.history["test_loss"][i],
          eval_fn(w, data, s)["test_loss"],
          rtol=1e-10,
      )
    sam = se.sam_gradient(scalar, w, data, rho=rho)
    w = jax.tree.map(lambda p, u: p - eta * u, w, sam.sam_grads)
    s = new_s
  chex.assert_trees_all_close(result.params, w, rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_close(result.model_state, s, rtol=1e-9, atol=1e-12)
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, s, stats))


def test_model_state_is_checkpointed_and_resumed(tmp_path, x64):
  loss_fn, _, params, stats, data = batchnorm_problem()
  kwargs = dict(
      learning_rate=[0.1, 0.2], rho=0.05, track_every=3, progress=False
  )
  straight = se.train(
      loss_fn, params, data, num_steps=10, model_state=stats, **kwargs
  )
  out = str(tmp_path / "run")
  se.train(
      loss_fn,
      params,
      data,
      num_steps=5,
      model_state=stats,
      out_dir=out,
      chunk_size=5,
      **kwargs,
  )
  resumed = se.train(
      loss_fn,
      params,
      data,
      num_steps=10,
      model_state=stats,
      out_dir=out,
      chunk_size=5,
      **kwargs,
  )
  chex.assert_trees_all_close(resumed.model_state, straight.model_state)
  chex.assert_trees_all_close(resumed.params, straight.params)
  other = jax.tree.map(lambda a: a + 1, stats)
  with pytest.raises(ValueError, match="model_state"):
    se.train(
        loss_fn,
        params,
        data,
        num_steps=10,
        model_state=other,
        out_dir=out,
        **kwargs,
    )


def test_has_aux_drops_the_aux_output(x64):
  params, data = mlp_problem(dtype=jnp.float64)
  with_aux = lambda p, b: (mlp_loss(p, b), {"logits": b[0]})
  kwargs = dict(
      learning_rate=0.1, rho=0.05, num_steps=6, track_every=2, progress=False
  )
  plain = se.train(mlp_loss, params, data, **kwargs)
  aux = se.train(with_aux, params, data, has_aux=True, **kwargs)
  for name in ("loss", "sharpness", "grad_norm"):
    chex.assert_trees_all_close(aux.history[name], plain.history[name])
  assert aux.model_state is None


@pytest.mark.parametrize(
    "case, name",
    [
        ("aux_without_flag", "has_aux"),
        ("aux_and_state", "has_aux"),
        ("scalar_with_state", "new_model_state"),
        ("other_state", "model_state"),
        ("bad_flag", "has_aux"),
    ],
)
def test_model_state_and_aux_errors_name_the_fix(case, name, x64):
  loss_fn, _, params, stats, data = batchnorm_problem()
  kwargs = dict(learning_rate=0.1, num_steps=2, progress=False)
  calls = {
      "aux_without_flag": lambda: se.train(
          lambda p, b: loss_fn(p, b, stats), params, data, **kwargs
      ),
      "aux_and_state": lambda: se.train(
          loss_fn, params, data, has_aux=True, model_state=stats, **kwargs
      ),
      "scalar_with_state": lambda: se.train(
          lambda p, b, s: loss_fn(p, b, s)[0],
          params,
          data,
          model_state=stats,
          **kwargs,
      ),
      "other_state": lambda: se.train(
          lambda p, b, s: (loss_fn(p, b, stats)[0], {"x": jnp.zeros(2)}),
          params,
          data,
          model_state=stats,
          **kwargs,
      ),
      "bad_flag": lambda: se.train(
          mlp_loss, *mlp_problem(), has_aux="yes", **kwargs
      ),
  }
  with pytest.raises(ValueError, match=name):
    calls[case]()


def test_adam_base_tracks_the_preconditioned_sharpness(x64):
  # P comes from the Adam state that reached w_t; the tracked value is the
  # top eigenvalue of P^-1/2 H P^-1/2 there, within its certified residual.
  params, data = mlp_problem(dtype=jnp.float64)
  eta = 0.01
  optimizer = optax.adam(eta)
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      optimizer=optimizer,
      preconditioner=se.adam_preconditioner,
      num_steps=9,
      track_every=3,
      sharpness_tol=1e-8,
      num_lanczos_iters=36,
      progress=False,
  )
  hist = result.history
  assert "preconditioned_sharpness" in hist
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda v: mlp_loss(unravel(v), data)))
  w, opt_state = params, optimizer.init(params)
  grad = jax.jit(jax.grad(mlp_loss))
  for t in range(9):
    if t % 3 == 0 and t > 0:
      d = jax.flatten_util.ravel_pytree(se.adam_preconditioner(opt_state))[0]
      h = np.asarray(hessian(jax.flatten_util.ravel_pytree(w)[0]))
      scaled = h / np.sqrt(np.outer(d, d))
      top = np.linalg.eigvalsh(scaled)[-1]
      chex.assert_trees_all_close(
          hist["preconditioned_sharpness"][t // 3], top, rtol=1e-6
      )
    updates, opt_state = optimizer.update(grad(w, data), opt_state, w)
    w = optax.apply_updates(w, updates)
  chex.assert_trees_all_close(result.params, w, rtol=1e-10, atol=1e-14)


def test_preconditioner_must_read_the_optimizer_state():
  params, data = mlp_problem()
  with pytest.raises(ValueError, match="preconditioner"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        num_steps=2,
        preconditioner=se.adam_preconditioner,  # plain SGD has no Adam state
        progress=False,
    )
  with pytest.raises(ValueError, match="preconditioner"):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        num_steps=2,
        optimizer=optax.adam(0.1),
        preconditioner="adam",
        progress=False,
    )


@pytest.mark.parametrize(
    "variant",
    [dict(adaptive=True, adaptive_eta=0.1), dict(eigen_weight=0.5)],
    ids=["asam", "eigen_sam"],
)
def test_sam_variants_equal_a_hand_loop(x64, variant):
  # Eigen-SAM's vector is the dense top eigenvector at the last tracked
  # iterate (sign-free: the perturbation uses sign(<g, v>)). The sweep's GD
  # row must stay plain GD.
  params, data = mlp_problem(dtype=jnp.float64, key=4)
  eta, rho, every, steps = 0.1, 0.2, 3, 9
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      rho=[0.0, rho],
      num_steps=steps,
      track_every=every,
      num_lanczos_iters=36,
      sharpness_tol=1e-10,
      progress=False,
      **variant,
  )
  _, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda v: mlp_loss(unravel(v), data)))
  sam = jax.jit(
      lambda w, v, r: se.sam_gradient(
          mlp_loss,
          w,
          data,
          rho=r,
          adaptive=variant.get("adaptive", False),
          adaptive_eta=variant.get("adaptive_eta", 0.01),
          eigenvector=v,
          eigen_weight=variant.get("eigen_weight", 0.0),
      ).sam_grads
  )
  plain = jax.jit(lambda w: se.sam_gradient(mlp_loss, w, data, rho=rho))
  gd = jax.jit(jax.grad(mlp_loss))
  eigen = "eigen_weight" in variant
  w, w_plain, w_gd, v = params, params, params, None
  for t in range(steps):
    if eigen and t % every == 0:
      h = np.asarray(hessian(jax.flatten_util.ravel_pytree(w)[0]))
      v = unravel(jnp.asarray(np.linalg.eigh(h)[1][:, -1]))
    w = jax.tree.map(lambda p, g: p - eta * g, w, sam(w, v, rho))
    w_plain = jax.tree.map(
        lambda p, g: p - eta * g, w_plain, plain(w_plain).sam_grads
    )
    w_gd = jax.tree.map(lambda p, g: p - eta * g, w_gd, gd(w_gd, data))
  second = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  chex.assert_trees_all_close(second(result.params, 1), w, rtol=1e-8)
  chex.assert_trees_all_close(second(result.params, 0), w_gd, rtol=1e-12)
  gap = optax.tree.norm(optax.tree.sub(w, w_plain))
  assert gap > 1e-3 * optax.tree.norm(w), "the variant changed nothing"


def test_top_eigenvalues_match_the_dense_spectrum(x64):
  params, data = mlp_problem(dtype=jnp.float64, key=5)
  eta, every, steps, k, tol = 0.1, 3, 9, 4, 1e-6
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      num_steps=steps,
      track_every=every,
      num_lanczos_iters=36,
      sharpness_tol=tol,
      num_warm_vectors=2,
      num_top_eigenvalues=k,
      progress=False,
  )
  hist = result.history
  names = [f"top_eigenvalue_{i}" for i in range(2, k + 1)]
  assert list(hist)[-len(names) :] == names
  assert np.all(hist["lanczos_iters"] < 36)  # stopped on the certificate
  _, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda v: mlp_loss(unravel(v), data)))
  grad = jax.jit(jax.grad(mlp_loss))
  w = params
  for t in range(steps):
    if t % every == 0:
      dense = np.linalg.eigvalsh(
          np.asarray(hessian(jax.flatten_util.ravel_pytree(w)[0]))
      )[::-1][:k]
      ritz = np.array(
          [hist["sharpness"][t // every]]
          + [hist[name][t // every] for name in names]
      )
      assert np.all(np.diff(ritz) <= 0)
      np.testing.assert_array_less(np.abs(ritz - dense), tol * np.abs(ritz))
    w = jax.tree.map(lambda p, g: p - eta * g, w, grad(w, data))
  plain = se.train(
      mlp_loss, params, data, learning_rate=eta, num_steps=1, progress=False
  )
  assert not set(names) & set(plain.history)


@pytest.mark.parametrize(
    "first, second, name",
    [
        (dict(eigen_weight=0.5), dict(), "eigen_weight"),
        (dict(adaptive=True), dict(adaptive=True, adaptive_eta=0.1), "eta"),
        (dict(), dict(num_top_eigenvalues=2), "num_top_eigenvalues"),
    ],
)
def test_resume_refuses_other_sam_variant_or_top_k(
    tmp_path, first, second, name
):
  params, data = mlp_problem()
  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      track_every=2,
      num_lanczos_iters=3,
      progress=False,
      out_dir=tmp_path,
  )
  se.train(mlp_loss, params, data, num_steps=2, **kwargs, **first)
  config = json.loads((tmp_path / "config.json").read_text())
  assert {**config, **first} == config  # the options are saved
  with pytest.raises(ValueError, match=f"other settings.*{name}"):
    se.train(mlp_loss, params, data, num_steps=4, **kwargs, **second)


def test_rows_stopped_at_the_cap_are_reported_once(x64):
  params, data = mlp_problem(8, jnp.float64)
  with pytest.warns(UserWarning, match="stopped at the cap of 2") as record:
    result = se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.5,
        num_steps=9,
        track_every=4,
        num_lanczos_iters=2,
        num_warm_vectors=1,
        sharpness_tol=1e-9,
        progress=False,
    )
  messages = [str(w.message) for w in record if "at the cap" in str(w.message)]
  assert len(messages) == 1
  assert np.all(result.history["sharpness_residual"] > 1e-9)
  assert messages[0].startswith("3 of 3 tracked rows")
