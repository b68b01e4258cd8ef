"""``se.train(..., weight_decay, decay_in_perturbation)`` against ``se.sam`` chains."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_eos as se
from sam_eos import loop
from small_problems import mlp_loss, mlp_problem


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def chained_sam(base, wd, rho, inside):
  """The ``se.sam`` chain whose semantics ``decay_in_perturbation`` names."""
  decay = optax.add_decayed_weights(wd)
  if inside:
    return optax.chain(decay, se.sam(base, rho))
  return se.sam(optax.chain(decay, base), rho)


def hand_loop(params, data, opt, num_steps):
  """Full-batch steps of an ``se.sam`` chain."""
  grad_fn = lambda p: jax.grad(mlp_loss)(p, data)

  @jax.jit
  def step(w, state):
    updates, state = opt.update(grad_fn(w), state, w, grad_fn=grad_fn)
    return optax.apply_updates(w, updates), state

  w, state = params, opt.init(params)
  for _ in range(num_steps):
    w, state = step(w, state)
  return w


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
def test_decay_equals_the_sam_chain(inside, momentum):
  params, data = mlp_problem()
  eta, rho, wd, steps = 0.1, 0.2, 0.3, 5
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=eta,
      rho=rho,
      momentum=momentum,
      weight_decay=wd,
      decay_in_perturbation=inside,
      num_steps=steps,
      track_every=2,
      num_lanczos_iters=4,
      progress=False,
  )
  base = optax.sgd(eta, momentum=momentum or None)
  expected = hand_loop(params, data, chained_sam(base, wd, rho, inside), steps)
  chex.assert_trees_all_close(result.params, expected, rtol=1e-10)
  other = hand_loop(params, data, chained_sam(base, wd, rho, not inside), steps)
  gap = optax.tree.norm(optax.tree.sub(expected, other))
  assert gap > 1e-4 * optax.tree.norm(expected), "inside equals outside"
  # The tracked loss is the data loss, without wd/2 ||w||^2.
  chex.assert_trees_all_close(
      result.history["loss"][0], mlp_loss(params, data), rtol=1e-12
  )


def test_zero_decay_is_the_plain_run_bit_for_bit():
  params, data = mlp_problem(seed=1)
  kwargs = dict(
      learning_rate=0.1,
      rho=[0.0, 0.1],
      num_steps=4,
      track_every=2,
      batch_size=4,
      num_lanczos_iters=4,
      progress=False,
  )
  plain = se.train(mlp_loss, params, data, **kwargs)
  for inside in (False, True):
    zero = se.train(
        mlp_loss,
        params,
        data,
        weight_decay=0.0,
        decay_in_perturbation=inside,
        **kwargs,
    )
    chex.assert_trees_all_equal(zero.params, plain.params)
    for name, values in plain.history.items():
      if name != "wall_time":
        np.testing.assert_array_equal(zero.history[name], values)


def test_rho_zero_inside_the_sam_program_is_gd_with_decay():
  # A mixed sweep runs GD rows without the SAM gradient; here rho = 0 goes
  # through it (as with a "config" mesh axis) and must still be GD + decay.
  params, data = mlp_problem(seed=2)
  eta, wd = 0.1, 0.3
  config = loop.LoopConfig(
      loss_fn=lambda p, b, s: (mlp_loss(p, b), s),
      track_every=2,
      num_lanczos_iters=4,
      weight_decay=wd,
      decay_in_perturbation=True,
  )
  hparams = loop.Hyperparams(jnp.asarray(eta), jnp.asarray(0.0))
  run = jax.jit(
      lambda s: loop.run_chunk(config, s, data, None, hparams, 0, 3, 3)[0]
  )
  state = run(loop.init_state(config, params, hparams, jax.random.key(0)))
  opt = optax.chain(optax.add_decayed_weights(wd), optax.sgd(eta))
  expected = hand_loop(params, data, optax.with_extra_args_support(opt), 3)
  chex.assert_trees_all_close(state.params, expected, rtol=1e-12)


def test_settings_are_saved_and_resume_refuses_others(tmp_path):
  params, data = mlp_problem()
  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      num_lanczos_iters=3,
      progress=False,
      out_dir=tmp_path,
  )
  se.train(
      mlp_loss,
      params,
      data,
      num_steps=1,
      weight_decay=0.01,
      decay_in_perturbation=True,
      **kwargs,
  )
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["weight_decay"] == 0.01
  assert config["decay_in_perturbation"] is True
  with pytest.raises(ValueError, match="other settings.*decay_in_perturbation"):
    se.train(mlp_loss, params, data, num_steps=2, weight_decay=0.01, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(weight_decay="0.1"), "weight_decay"),
        (dict(decay_in_perturbation=1), "decay_in_perturbation"),
        (
            dict(weight_decay=0.1, decay_in_perturbation=True, m_sharpness=2),
            "decay_in_perturbation.*m_sharpness",
        ),
    ],
)
def test_bad_decay_arguments_are_named(kwargs, name):
  params, data = mlp_problem()
  with pytest.raises(ValueError, match=name):
    se.train(
        mlp_loss,
        params,
        data,
        learning_rate=0.1,
        rho=0.05,
        num_steps=1,
        progress=False,
        **kwargs,
    )
