"""Presets, the registry and the runner's problem construction."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos.experiments import data, models, presets, runner

ALL = [
    (name, preset)
    for name in presets.list_experiments()
    for preset in presets.PRESETS
]


def test_registry_names_and_presets():
  assert presets.list_experiments() == sorted(
      [
          "cifar10-cnn",
          "cifar10-cnn-relu",
          "cifar10-fc-tanh",
          "cifar10-resnet",
          "mnist-mlp",
          "mnist-mlp-adam",
          "quadratic",
          "shakespeare-transformer",
      ]
  )
  for name, preset in ALL:
    config = presets.get_experiment(name, preset)
    assert (config.name, config.preset) == (name, preset)
    assert config.description
  assert (
      presets.get_experiment("mnist-mlp")
      is presets.EXPERIMENTS["mnist-mlp"]["cpu"]
  )


def test_unknown_name_or_preset_lists_the_valid_ones():
  with pytest.raises(ValueError, match="mnist-mlp.*quadratic"):
    presets.get_experiment("mnist")
  with pytest.raises(ValueError, match=r"preset 'gpu'.*\['cpu', 'paper'\]"):
    presets.get_experiment("mnist-mlp", "gpu")


@pytest.mark.parametrize("name, preset", ALL)
def test_config_round_trips_through_json(name, preset):
  config = presets.get_experiment(name, preset)
  restored = presets.ExperimentConfig.from_dict(
      json.loads(json.dumps(config.to_dict()))
  )
  assert restored == config
  assert restored.model_kwargs == config.model_kwargs


def test_replace_validates_and_names_the_field():
  config = presets.get_experiment("mnist-mlp")
  assert config.replace(rhos=[0.0, 0.05]).rhos == (0.0, 0.05)
  assert config.replace(learning_rates=0.5).learning_rates == (0.5,)
  assert dataclasses.replace(config, num_steps=7).num_steps == 7
  for field, value in [
      ("rhos", (-0.1,)),
      ("learning_rates", (0.0,)),
      ("num_steps", 0),
      ("track_every", 0),
      ("num_examples", 0),
      ("batch_size", -1),
      ("momentum", 1.0),
      ("dataset", "imagenet"),
      ("model", "vit"),
      ("loss", "hinge"),
      ("seeds", (-1,)),
  ]:
    with pytest.raises(ValueError, match=f"`{field}`"):
      config.replace(**{field: value})
  with pytest.raises(ValueError, match="Unknown ExperimentConfig field.*lr"):
    config.replace(lr=0.1)
  with pytest.raises(ValueError, match="context_length"):
    presets.get_experiment("shakespeare-transformer").replace(
        context_length=None
    )


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    presets.get_experiment("mnist-mlp").num_steps = 3  # type: ignore[misc]


def test_paper_presets_hold_the_published_settings():
  mnist = presets.get_experiment("mnist-mlp", "paper")
  assert (mnist.dataset, mnist.num_examples, mnist.model) == (
      "mnist",
      None,
      "mlp",
  )
  assert mnist.model_kwargs == {"hidden_sizes": (1000, 1000, 1000)}
  cifar = presets.get_experiment("cifar10-cnn", "paper")
  assert (cifar.num_examples, cifar.model_kwargs) == (
      1000,
      {"channels": (16, 32)},
  )
  for config in (mnist, cifar):
    assert config.learning_rates == (0.01,)
    assert 0.0 in config.rhos and 0.1 in config.rhos
    assert (
        config.loss,
        config.batch_size,
        config.momentum,
        config.eps,
        config.normalize,
        config.standardize,
    ) == ("mse", None, 0.0, 1e-5, True, False)
  lm = presets.get_experiment("shakespeare-transformer", "paper")
  assert (
      lm.loss,
      lm.learning_rates,
      lm.batch_size,
      lm.context_length,
      lm.momentum,
      lm.eps,
  ) == ("cross_entropy", (0.1,), 128, 64, 0.0, 1e-5)
  assert lm.model_kwargs == {
      "key_size": 32,
      "model_size": 128,
      "num_heads": 8,
      "num_layers": 6,
  }
  cohen = presets.get_experiment("cifar10-fc-tanh", "paper")
  assert (
      cohen.num_examples,
      cohen.model,
      cohen.loss,
      cohen.batch_size,
      cohen.standardize,
  ) == (5000, "fc-tanh", "half_sse", None, True)
  assert cohen.learning_rates == (2 / 30, 2 / 50) and 0.0 in cohen.rhos


def test_sweep_is_the_cartesian_product():
  config = presets.get_experiment("mnist-mlp").replace(
      learning_rates=(0.5, 1.0), rhos=(0.0, 0.1), seeds=(3, 4)
  )
  lrs, rhos, seeds = runner.sweep(config)
  assert config.num_configs == 8 == len(lrs) == len(rhos) == len(seeds)
  assert list(zip(lrs, rhos, seeds))[:3] == [
      (0.5, 0.0, 3),
      (0.5, 0.0, 4),
      (0.5, 0.1, 3),
  ]
  assert len(set(zip(lrs, rhos, seeds))) == 8


@pytest.mark.parametrize("name", presets.list_experiments())
def test_build_problem_of_each_cpu_preset(name):
  config = presets.get_experiment(name)
  if config.dataset != "quadratic":
    config = config.replace(num_examples=8, num_test_examples=8)
  problem = runner.build_problem(config)
  inputs, targets = problem.data
  # One initialization per configuration; configurations of a seed share it.
  assert all(
      x.shape[0] == config.num_configs for x in jax.tree.leaves(problem.params)
  )
  first = jax.tree.map(lambda x: x[0], problem.params)
  assert problem.num_params == models.count_params(first)
  seeds = runner.sweep(config)[2]
  for c, seed in enumerate(seeds):
    same = jax.tree.map(
        lambda x: bool(jnp.all(x[c] == x[seeds.index(seed)])), problem.params
    )
    assert all(jax.tree.leaves(same))
  state = ()
  if problem.model_state is not None:  # BatchNorm: (loss, new_state)
    state = (jax.tree.map(lambda x: x[0], problem.model_state),)
  loss = problem.loss_fn(first, problem.data, *state)
  if state:
    loss = loss[0]
  assert loss.shape == () and np.isfinite(loss)
  if problem.eval_fn is not None:
    out = problem.eval_fn(first, problem.eval_data, *state)
    assert sorted(out) == ["test_accuracy", "test_loss"]
    assert 0 <= float(out["test_accuracy"]) <= 1
  if config.dataset == "quadratic":
    diagonal = np.array(config.model_kwargs["diagonal"])
    assert np.allclose(loss, 0.5 * np.sum(diagonal * first**2))
  elif config.dataset == "shakespeare":
    assert inputs.shape == targets.shape == (8, config.context_length)
  else:
    assert len(inputs) == 8 and targets.shape == (8, 10)
    assert np.allclose(targets.sum(axis=1), 1.0)


def test_cpu_presets_are_evidence_over_seeds():
  # Issue: claims over >= 3 seeds, with >= 20 tracked points in the window.
  for name in presets.CLAIM_PRESETS:
    config = presets.get_experiment(name)
    assert len(config.seeds) >= 3, name
    steps = range(0, config.num_steps, config.track_every)
    window = [s for s in steps if s >= max(steps) * (1 - 1 / 3)]
    assert len(window) >= 20, (name, len(window))
  for name, known in presets.KNOWN_FAILURES.items():
    config = presets.get_experiment(name)
    for claim, eta, rho in known:
      assert eta in config.learning_rates and rho in config.rhos, name


def test_seeds_are_distinct_initializations():
  config = presets.get_experiment("mnist-mlp").replace(
      num_examples=8, num_test_examples=8, rhos=(0.0,), seeds=(0, 1)
  )
  params = runner.build_problem(config).params
  kernel = params["Dense_0"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])


def test_test_data_use_the_training_statistics():
  config = presets.get_experiment("mnist-mlp").replace(
      num_examples=100, num_test_examples=50
  )
  inputs, targets = runner.load_test_data(config)
  train, _ = data.load_mnist(num_examples=100)
  images, labels = data.load_mnist("test", num_examples=50)
  expected = images / 256.0 - (train / 256.0).mean(axis=0)
  np.testing.assert_allclose(inputs, expected, atol=1e-6)
  np.testing.assert_array_equal(targets.argmax(axis=1), labels)


def test_mnist_data_are_centred_paper_pixels():
  inputs, targets = runner.load_data(
      presets.get_experiment("mnist-mlp").replace(num_examples=100)
  )
  images, labels = data.load_mnist(num_examples=100)
  expected = images / 256.0 - (images / 256.0).mean(axis=0)
  np.testing.assert_allclose(inputs, expected, atol=1e-6)
  np.testing.assert_array_equal(targets.argmax(axis=1), labels)


@pytest.mark.dataset("shakespeare")
def test_text_crops_are_non_overlapping_windows():
  config = presets.get_experiment("shakespeare-transformer").replace(
      num_examples=50, context_length=16
  )
  inputs, targets = runner.load_data(config)
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  text = data.load_shakespeare()
  windows = {text[i : i + 17].tobytes() for i in range(0, len(text) - 16, 17)}
  crops = [
      row.astype(np.uint8).tobytes()
      for row in np.concatenate([inputs, targets[:, -1:]], axis=1)
  ]
  assert all(crop in windows for crop in crops)  # 16 + 1 from offset 0
  assert len(set(crops)) == 50
  again, _ = runner.load_data(config)
  np.testing.assert_array_equal(inputs, again)  # drawn by init_seed
  with pytest.raises(ValueError, match="`num_examples`.*crops"):
    runner.load_data(config.replace(num_examples=10**7))


def test_initialization_depends_on_init_seed_and_seed():
  config = presets.get_experiment("mnist-mlp").replace(
      num_examples=8, num_test_examples=8, rhos=(0.0,), seeds=(0,)
  )
  params = lambda cfg: runner.build_problem(cfg).params
  leaves = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
  a = params(config)
  np.testing.assert_array_equal(leaves(a), leaves(params(config)))
  # Seed s starts from fold_in(key(init_seed), s), whatever else is swept.
  swept = params(config.replace(seeds=(5, 0), rhos=(0.0, 0.1)))
  np.testing.assert_array_equal(
      leaves(a), leaves(jax.tree.map(lambda x: x[1], swept))
  )
  for other in (config.replace(seeds=(5,)), config.replace(init_seed=1)):
    assert not np.array_equal(leaves(a), leaves(params(other)))
