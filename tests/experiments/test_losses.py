"""Losses against hand-written NumPy formulas; the loss_fn convention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos.experiments import losses, models

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(7, 10))
ONE_HOT = np.eye(10)[RNG.integers(0, 10, 7)]


def test_mse_is_the_mean_over_examples_and_classes(x64):
  expected = sum(
      (LOGITS[i, c] - ONE_HOT[i, c]) ** 2 for i in range(7) for c in range(10)
  ) / (7 * 10)
  np.testing.assert_allclose(
      losses.mse_loss(LOGITS, ONE_HOT), expected, rtol=1e-12
  )


def test_half_sse_is_half_the_class_sum_averaged_over_examples(x64):
  expected = np.mean(
      [0.5 * np.sum((LOGITS[i] - ONE_HOT[i]) ** 2) for i in range(7)]
  )
  np.testing.assert_allclose(
      losses.half_sse_loss(LOGITS, ONE_HOT), expected, rtol=1e-12
  )
  np.testing.assert_allclose(
      losses.half_sse_loss(LOGITS, ONE_HOT),
      5 * losses.mse_loss(LOGITS, ONE_HOT),
      rtol=1e-12,
  )


def test_cross_entropy_is_the_mean_token_negative_log_likelihood(x64):
  logits = RNG.normal(size=(3, 5, 11)) * 3
  targets = RNG.integers(0, 11, (3, 5))
  nll = []
  for b in range(3):
    for t in range(5):
      z = logits[b, t]
      log_norm = np.log(np.sum(np.exp(z - z.max()))) + z.max()
      nll.append(log_norm - z[targets[b, t]])
  np.testing.assert_allclose(
      losses.cross_entropy_loss(logits, targets), np.mean(nll), rtol=1e-12
  )


def test_accuracy_with_integer_and_one_hot_targets():
  labels = ONE_HOT.argmax(1)
  expected = np.mean(LOGITS.argmax(1) == labels)
  assert losses.accuracy(LOGITS, labels) == pytest.approx(expected)
  assert losses.accuracy(LOGITS, ONE_HOT) == pytest.approx(expected)
  assert losses.accuracy(ONE_HOT, labels) == 1.0
  tokens = jnp.zeros((2, 3, 4)).at[..., 1].set(1.0)
  assert losses.accuracy(tokens, jnp.array([[1, 1, 0], [1, 0, 0]])) == 0.5


def test_make_loss_fn_matches_the_model_and_loss():
  model = models.MLP((5,), num_outputs=3)
  x = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
  y = jax.nn.one_hot(jnp.array([0, 2, 1, 2]), 3)
  params = models.init_params(model, jax.random.key(0), x)
  logits = model.apply({"params": params}, x)
  for name, fn in losses.LOSSES.items():
    targets = y.argmax(1) if name == "cross_entropy" else y
    loss_fn = losses.make_loss_fn(model, name)
    assert loss_fn(params, (x, targets)) == fn(logits, targets)
    assert loss_fn(params, {"x": x, "y": targets}) == fn(logits, targets)
  custom = losses.make_loss_fn(model, lambda out, t: jnp.sum(out * t))
  np.testing.assert_allclose(
      custom(params, (x, y)), jnp.sum(logits * y), rtol=1e-6
  )
  grads = jax.jit(jax.grad(losses.make_loss_fn(model, "mse")))(params, (x, y))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "loss, batch, match",
    [
        ("l1", None, "Unknown loss"),
        (3, None, "`loss` must be"),
        (
            "mse",
            {"inputs": 1, "targets": 2},
            r"keys 'x'.*\['inputs', 'targets'\]",
        ),
        ("mse", (1, 2, 3), "pair"),
    ],
)
def test_errors(loss, batch, match):
  model = models.MLP((2,))
  with pytest.raises(ValueError, match=match):
    losses.make_loss_fn(model, loss)(None, batch)
