"""flax NNX models with BatchNorm through se.nnx_loss, against direct calls."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_eos as se

nnx = pytest.importorskip("flax.nnx")


class BNMLP(nnx.Module):
  """Linear -> BatchNorm -> tanh -> Linear."""

  def __init__(self, *, width=4, dtype=jnp.float32, seed=0):
    rngs = nnx.Rngs(seed)
    kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.linear1 = nnx.Linear(3, width, **kw)
    self.norm = nnx.BatchNorm(width, momentum=0.9, **kw)
    self.linear2 = nnx.Linear(width, 2, **kw)

  def __call__(self, x):
    return self.linear2(jnp.tanh(self.norm(self.linear1(x))))


def mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


def make_batch(dtype=jnp.float32, num=8, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num, 3)) + 0.5
  y = rng.normal(size=(num, 2))
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def test_loss_fn_matches_the_model_and_updates_its_state():
  model = BNMLP()
  batch = make_batch()
  loss_fn, params, state = se.nnx_loss(model, mse)
  value, new_state = jax.jit(loss_fn)(params, batch, state)
  direct = mse(model, batch)  # updates model's running stats in place
  np.testing.assert_allclose(value, direct, rtol=1e-6)
  np.testing.assert_allclose(
      new_state["norm"]["mean"], model.norm.mean[...], rtol=1e-6
  )
  np.testing.assert_allclose(
      new_state["norm"]["var"], model.norm.var[...], rtol=1e-6
  )
  assert not np.allclose(new_state["norm"]["mean"], state["norm"]["mean"])
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  # Gradients of the pure loss equal nnx.grad of the model's loss.
  grads = jax.grad(lambda p: loss_fn(p, batch, state)[0])(params)
  fresh = BNMLP()
  nnx_grads = nnx.grad(mse)(fresh, batch)
  for a, b in zip(
      jax.tree.leaves(grads), jax.tree.leaves(nnx.as_pure(nnx_grads))
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  merged = se.nnx_merge(loss_fn, params, new_state)
  np.testing.assert_allclose(merged.norm.mean[...], new_state["norm"]["mean"])
  np.testing.assert_allclose(mse(merged, batch), direct, rtol=1e-6)


def test_sharpness_with_fixed_state_matches_dense_hessian():
  with jax.enable_x64(True):
    model = BNMLP(dtype=jnp.float64)
    batch = make_batch(jnp.float64)
    loss_fn, params, state = se.nnx_loss(model, mse)
    fixed = lambda p, b: loss_fn(p, b, state)[0]
    flat, unravel = ravel_pytree(params)
    dense = jax.jit(jax.hessian(lambda f: fixed(unravel(f), batch)))(flat)
    eigs = np.linalg.eigvalsh(np.asarray(dense))
    out = jax.jit(
        lambda p: se.hessian_eigenpairs(
            fixed, p, batch, num_iters=flat.size, tol=1e-8
        )
    )(params)
    np.testing.assert_allclose(out.values[0], eigs[-1], rtol=1e-7)
    # The tracker with has_aux and the state passed sees the same Hessian.
    tracker = se.SharpnessTracker(
        loss_fn, track_every=1, tol=1e-8, has_aux=True
    )
    _, m = jax.jit(
        lambda p, st: tracker.update(
            tracker.init(p), p, batch, learning_rate=0.1, model_state=st
        )
    )(params, state)
    np.testing.assert_allclose(m.sharpness, eigs[-1], rtol=1e-7)


def test_bad_arguments():
  with pytest.raises(ValueError, match="model"):
    se.nnx_loss(lambda x: x, mse)
  with pytest.raises(ValueError, match="loss"):
    se.nnx_loss(BNMLP(), "mse")
  with pytest.raises(ValueError, match="loss_fn"):
    se.nnx_merge(mse, {}, {})


@pytest.mark.skipif(
    "model_state" not in inspect.signature(se.train).parameters,
    reason="se.train has no model_state yet",
)
def test_train_sam_with_batchnorm_state():
  model = BNMLP()
  data = make_batch(num=32)
  loss_fn, params, state = se.nnx_loss(model, mse)
  result = se.train(
      loss_fn,
      params,
      data,
      num_steps=12,
      learning_rate=0.1,
      rho=0.05,
      batch_size=8,
      model_state=state,
      track_every=4,
      num_lanczos_iters=10,
      progress=False,
  )
  hist = result.history
  assert jax.tree.structure(result.model_state) == jax.tree.structure(state)
  assert not np.allclose(
      result.model_state["norm"]["mean"], state["norm"]["mean"]
  )
  assert np.all(np.isfinite(hist["sharpness"])) and hist["sharpness"].size == 3
  assert np.all(np.isfinite(hist["loss"])) and np.all(
      np.isfinite(hist["sam_edge"])
  )
  trained = se.nnx_merge(loss_fn, result.params, result.model_state)
  np.testing.assert_allclose(
      trained.norm.mean[...], result.model_state["norm"]["mean"]
  )
