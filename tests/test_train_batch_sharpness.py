"""``se.train(..., batch_sharpness_batches=K)`` against hand computations."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se
from sam_eos import loop
from small_problems import mlp_loss, mlp_problem

COLUMNS = (
    "batch_sharpness",
    "batch_sharpness_low",
    "batch_sharpness_high",
    "batch_sam_edge",
)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def by_hand(loss_fn, params, data, key, step, **kwargs):
  """``se.batch_sharpness`` and ``se.batch_sam_edge`` at step ``step``."""
  sample = dict(key=loop.batch_sharpness_key(key, step), **kwargs)
  edge_args = {k: sample.pop(k) for k in ("learning_rate", "rho", "momentum")}
  sharpness = se.batch_sharpness(loss_fn, params, data, **sample)
  edge = se.batch_sam_edge(loss_fn, params, data, **sample, **edge_args)
  return sharpness, edge.value


def test_columns_equal_the_estimators_at_the_iterates():
  # Minibatch SAM with momentum, tracked at steps 0 and 2; the hand loop
  # draws the step batches as the loop does (fold_in(key, t)).
  params, data = mlp_problem()
  eta, rho, beta, size, num = 0.1, 0.05, 0.5, 4, 6
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      rho=rho,
      momentum=beta,
      num_steps=4,
      track_every=2,
      batch_size=size,
      batch_sharpness_batches=num,
      num_lanczos_iters=4,
      key=3,
      progress=False,
  )
  hist = result.history
  assert tuple(hist)[-len(COLUMNS) :] == COLUMNS
  key = jax.random.key(3)
  opt = se.sam(optax.sgd(eta, momentum=beta), rho)
  w, state = params, opt.init(params)
  for t in range(4):
    if t % 2 == 0:
      sharpness, edge = by_hand(
          mlp_loss,
          w,
          data,
          key,
          t,
          batch_size=size,
          num_batches=num,
          learning_rate=eta,
          rho=rho,
          momentum=beta,
      )
      row = t // 2
      chex.assert_trees_all_close(
          [hist[name][row] for name in COLUMNS],
          [sharpness.value, sharpness.lower, sharpness.upper, edge],
          rtol=1e-10,
      )
      assert hist["batch_sharpness_low"][row] < hist["batch_sharpness"][row]
      assert hist["batch_sharpness"][row] < hist["batch_sharpness_high"][row]
    batch = loop.sample_batch(data, jax.random.fold_in(key, t), size)
    grad_fn = lambda p, b=batch: jax.grad(mlp_loss)(p, b)
    updates, state = opt.update(grad_fn(w), state, w, grad_fn=grad_fn)
    w = jax.tree.map(jnp.add, w, updates)
  chex.assert_trees_all_close(result.params, w, rtol=1e-10)


def test_full_batch_is_the_dense_rayleigh_quotient_and_gd_edge():
  # batch_size = N: every batch is the data set, so the estimate is
  # g^T H g / ||g||^2 with a zero-width interval; at rho = 0 the mean
  # SAM-edge is 2 / eta.
  params, data = mlp_problem(seed=1, num_examples=6)
  eta = 0.2
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      num_steps=1,
      batch_size=6,
      batch_sharpness_batches=3,
      num_lanczos_iters=4,
      progress=False,
  )
  flat, unravel = ravel_pytree(params)
  f = lambda v: mlp_loss(unravel(v), data)
  g = np.asarray(jax.grad(f)(flat))
  h = np.asarray(jax.hessian(f)(flat))
  quotient = g @ h @ g / (g @ g)
  hist = result.history
  chex.assert_trees_all_close(
      hist["batch_sharpness"], np.array([quotient]), rtol=1e-10
  )
  # The half-width is z sqrt(variance), the square root of rounding noise.
  for name in ("batch_sharpness_low", "batch_sharpness_high"):
    chex.assert_trees_all_close(hist[name], np.array([quotient]), rtol=1e-6)
  chex.assert_trees_all_close(
      hist["batch_sam_edge"], np.array([2 / eta]), rtol=1e-14
  )


def stateful_problem():
  """A loss that reads and updates a running mean of the inputs."""
  params, data = mlp_problem(seed=2)

  def loss_fn(p, batch, state):
    x, y = batch
    h = jnp.tanh((x - state["mean"]) @ p["w1"] + p["b1"])
    new = {"mean": 0.5 * state["mean"] + 0.5 * jnp.mean(x, 0)}
    return jnp.mean((h @ p["w2"] - y) ** 2), new

  return loss_fn, params, {"mean": jnp.full(3, 0.3)}, data


def test_model_state_losses_use_the_step_state():
  loss_fn, params, state, data = stateful_problem()
  eta, rho, size, num = 0.1, 0.05, 4, 5
  result = se.train(
      loss_fn,
      params,
      data,
      model_state=state,
      learning_rate=eta,
      rho=rho,
      num_steps=2,
      track_every=1,
      batch_size=size,
      batch_sharpness_batches=num,
      num_lanczos_iters=4,
      progress=False,
  )
  key, hist = jax.random.key(0), result.history
  w, s = params, state
  for t in range(2):
    sharpness, edge = by_hand(
        lambda p, b, s=s: loss_fn(p, b, s),
        w,
        data,
        key,
        t,
        batch_size=size,
        num_batches=num,
        learning_rate=eta,
        rho=rho,
        momentum=0.0,
        has_aux=True,
    )
    chex.assert_trees_all_close(
        [hist["batch_sharpness"][t], hist["batch_sam_edge"][t]],
        [sharpness.value, edge],
        rtol=1e-10,
    )
    batch = loop.sample_batch(data, jax.random.fold_in(key, t), size)
    sam, s_next = se.sam_gradient(
        lambda p, b, s=s: loss_fn(p, b, s), w, batch, rho=rho, has_aux=True
    )
    w, s = jax.tree.map(lambda p, g: p - eta * g, w, sam.sam_grads), s_next
  chex.assert_trees_all_close(result.model_state, s, rtol=1e-12)


def test_sweep_equals_separate_runs():
  # Two SAM configurations: one vmapped program (a mixed GD/SAM sweep would
  # run each as its own unvmapped group).
  params, data = mlp_problem(seed=3)
  lrs, rhos = [0.05, 0.2], [0.05, 0.1]
  kwargs = dict(
      num_steps=3,
      track_every=2,
      batch_size=4,
      batch_sharpness_batches=4,
      num_lanczos_iters=4,
      progress=False,
  )
  sweep = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=lrs,
      rho=rhos,
      key=[0, 1],
      **kwargs,
  )
  assert sweep.history["batch_sharpness"].shape == (2, 2)
  for c, (lr, rho) in enumerate(zip(lrs, rhos)):
    alone = se.train(
        mlp_loss, params, data, learning_rate=lr, rho=rho, key=c, **kwargs
    )
    for name in COLUMNS:
      chex.assert_trees_all_close(
          sweep.history[name][c], alone.history[name], rtol=1e-10
      )


def test_mesh_padding_is_never_drawn():
  # 10 examples padded to 12 over a 4-device "data" axis: the batches come
  # from the 10 real rows, as without a mesh.
  params, data = mlp_problem(seed=4, num_examples=10)
  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      num_steps=1,
      batch_size=4,
      batch_sharpness_batches=4,
      num_lanczos_iters=4,
      progress=False,
  )
  alone = se.train(mlp_loss, params, data, **kwargs)
  sharded = se.train(mlp_loss, params, data, mesh=se.data_mesh(4), **kwargs)
  for name in COLUMNS:
    chex.assert_trees_all_close(
        sharded.history[name], alone.history[name], rtol=1e-10
    )


def test_diverged_configuration_records_nan():
  quad = lambda w, h: 0.5 * jnp.sum(jnp.mean(h, 0) * w**2)
  data = jnp.array([[3.0, 1.0], [5.0, 2.0], [4.0, 1.0], [2.0, 3.0]])
  with pytest.warns(UserWarning, match="Diverged"):
    result = se.train(
        quad,
        jnp.ones(2),
        data,
        learning_rate=[0.1, 1e100],
        num_steps=6,
        track_every=1,
        batch_size=2,
        batch_sharpness_batches=2,
        num_lanczos_iters=2,
        progress=False,
    )
  bad = int(result.diverged_at[1])
  assert 0 < bad < 6
  for name in COLUMNS:
    assert np.all(np.isfinite(result.history[name][0]))
    assert np.all(np.isnan(result.history[name][1, bad:]))
  # Before it, the interval (whose variance squares g^T H g ~ |w|^2) may
  # overflow first; the estimate and the edge stay finite.
  for name in ("batch_sharpness", "batch_sam_edge"):
    assert np.all(np.isfinite(result.history[name][1, :bad]))


def test_columns_are_absent_by_default_and_saved_in_the_config(tmp_path):
  params, data = mlp_problem()
  kwargs = dict(
      learning_rate=0.1,
      batch_size=4,
      num_lanczos_iters=3,
      progress=False,
      out_dir=tmp_path,
  )
  plain = se.train(mlp_loss, params, data, num_steps=1, **kwargs)
  assert not set(COLUMNS) & set(plain.history)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["batch_sharpness_batches"] is None
  with pytest.raises(ValueError, match="other settings.*batch_sharpness"):
    se.train(
        mlp_loss,
        params,
        data,
        num_steps=2,
        batch_sharpness_batches=2,
        **kwargs,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_sharpness_batches=4), "needs a `batch_size`"),
        (dict(batch_size=4, batch_sharpness_batches=0), ">= 1"),
        (dict(batch_size=4, batch_sharpness_batches=2.0), ">= 1"),
        (dict(batch_size=4, batch_sharpness_batches=True), ">= 1"),
    ],
)
def test_bad_batch_sharpness_batches_names_the_argument(kwargs, match):
  params, data = mlp_problem()
  with pytest.raises(ValueError, match="batch_sharpness_batches") as err:
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        num_steps=1,
        progress=False,
        **kwargs,
    )
  assert match in str(err.value)
