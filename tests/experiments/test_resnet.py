"""cifar10-resnet: the ResNet's BatchNorm state, the runner's functions and run.

- ``models.ResNet`` updates its ``batch_stats`` in training mode and uses
  them in inference mode;
- the ``loss_fn``/``eval_fn``/base optimizer that ``runner.build_problem``
  builds equal direct flax/optax calls;
- a shrunk real ``sam-eos run cifar10-resnet`` writes ``test_accuracy`` and
  carries the model state (the checkpoint, resumed, returns it);
- the committed run in ``docs/figures/cifar10-resnet`` is of today's cpu
  preset.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_eos as se
from sam_eos.experiments import cli, models, presets, runner

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN = ROOT / "docs" / "figures" / "cifar10-resnet"
CPU = presets.get_experiment("cifar10-resnet", "cpu")


def _variables(model, x):
  return models.init_variables(model, jax.random.key(0), x)


def test_batch_norm_state_updates_in_training_and_is_used_in_eval():
  model = models.ResNet(widths=(2, 4))
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3)) * 3 + 1
  params, stats = _variables(model, x)
  # At initialization the running means are 0 and the variances 1.
  assert all(np.all(s["mean"] == 0) for s in _bn_stats(stats))
  assert all(np.all(s["var"] == 1) for s in _bn_stats(stats))
  logits, new = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      train=True,
      mutable=["batch_stats"],
  )
  new = new["batch_stats"]
  assert jax.tree.structure(new) == jax.tree.structure(stats)
  assert any(
      not np.allclose(a, b)
      for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(stats))
  )
  # Training mode normalizes with the batch: an example's logits depend on
  # the others. Inference mode does not, and it reads the running averages.
  alone = model.apply(
      {"params": params, "batch_stats": new}, x[:1], train=False
  )
  together = model.apply({"params": params, "batch_stats": new}, x, train=False)
  np.testing.assert_allclose(alone, together[:1], rtol=1e-5, atol=1e-6)
  train_alone = model.apply(
      {"params": params, "batch_stats": stats},
      x[:2],
      train=True,
      mutable=["batch_stats"],
  )[0]
  assert not np.allclose(train_alone, logits[:2], atol=1e-4)
  before = model.apply({"params": params, "batch_stats": stats}, x, train=False)
  assert not np.allclose(before, together, atol=1e-4)


def _bn_stats(tree):
  """Every BatchNorm's ``{"mean", "var"}`` dict in a ``batch_stats`` tree."""
  if isinstance(tree, dict) and set(tree) == {"mean", "var"}:
    return [tree]
  return [s for v in tree.values() for s in _bn_stats(v)]


def test_stem_running_mean_is_the_momentum_average_of_the_batch_mean():
  model = models.ResNet(widths=(2,), bn_momentum=0.9)
  x = jax.random.normal(jax.random.key(2), (5, 4, 4, 3)) + 2
  params, stats = _variables(model, x)
  _, new = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      train=True,
      mutable=["batch_stats"],
  )
  h = jax.lax.conv_general_dilated(
      x,
      params["Conv_0"]["kernel"],
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(
      new["batch_stats"]["BatchNorm_0"]["mean"],
      0.1 * h.mean(axis=(0, 1, 2)),
      rtol=1e-5,
      atol=1e-6,
  )


@pytest.fixture(scope="module")
def small():
  config = CPU.replace(
      num_examples=8, num_test_examples=8, seeds=(0,), rhos=(0.0,)
  )
  return config, runner.build_problem(config)


def test_runner_functions_match_direct_flax_calls(small):
  config, problem = small
  kwargs = dict(config.model_kwargs)
  kwargs.pop("weight_decay")
  model = models.ResNet(**kwargs)
  params = jax.tree.map(lambda a: a[0], problem.params)
  state = jax.tree.map(lambda a: a[0], problem.model_state)
  want_params, want_state = models.init_variables(
      model,
      jax.random.fold_in(jax.random.key(config.init_seed), 0),
      problem.data[0][:1],
  )
  assert jax.tree.all(jax.tree.map(np.array_equal, params, want_params))
  assert jax.tree.all(jax.tree.map(np.array_equal, state, want_state))
  x, y = problem.data
  labels = jnp.argmax(y, -1)
  loss, new = problem.loss_fn(params, (x, y), state)
  logits, want_new = model.apply(
      {"params": params, "batch_stats": state},
      x,
      train=True,
      mutable=["batch_stats"],
  )
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  assert jax.tree.all(jax.tree.map(np.allclose, new, want_new["batch_stats"]))
  tx, ty = problem.eval_data
  out = problem.eval_fn(params, (tx, ty), new)
  test_logits = model.apply(
      {"params": params, "batch_stats": new}, tx, train=False
  )
  tl = jnp.argmax(ty, -1)
  np.testing.assert_allclose(
      out["test_loss"],
      optax.softmax_cross_entropy_with_integer_labels(test_logits, tl).mean(),
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      out["test_accuracy"], np.mean(np.argmax(test_logits, -1) == tl)
  )


def test_base_optimizer_is_momentum_sgd_with_weight_decay_inside(small):
  config, problem = small
  opt = problem.optimizer
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  state = opt.init(params)
  assert float(state.hyperparams["momentum"]) == pytest.approx(0.9)
  assert float(state.hyperparams["weight_decay"]) == pytest.approx(5e-4)
  eta, wd = config.learning_rates[0], 5e-4
  u1, state = opt.update(grads, state, params)
  g1 = grads["w"] + wd * params["w"]
  np.testing.assert_allclose(u1["w"], -eta * g1, rtol=1e-6)
  u2, _ = opt.update(grads, state, params)
  np.testing.assert_allclose(u2["w"], -eta * (0.9 * g1 + g1), rtol=1e-6)


# Compiling the ResNet's SAM step, Lanczos and evaluation dominates: 170 s on
# 2 cores shared with a preset run (load ~7), so it is a slow test.
@pytest.mark.slow
def test_shrunk_cli_run_writes_test_accuracy_and_carries_the_state(tmp_path):
  out = tmp_path / "run"
  args = [
      "run",
      "cifar10-resnet",
      "--steps",
      "6",
      "--track-every",
      "3",
      "--seed",
      "0",
      "--rho",
      "0",
      "0.05",
      "--num-examples",
      "32",
      "--num-test-examples",
      "16",
      "--batch-size",
      "8",
      "--lanczos-iters",
      "3",
      "--out",
      str(out),
      "--no-progress",
  ]
  assert cli.main(args) == 0
  metrics = se.read_csv(out / "metrics.csv")
  assert len(metrics["step"]) == 4  # 2 configurations x steps 0, 3
  accuracy = np.asarray(metrics["test_accuracy"])
  assert np.all((accuracy >= 0) & (accuracy <= 1))
  # The edges use the injected momentum 0.9: 2 (1 + 0.9) / 0.1 = 38.
  np.testing.assert_allclose(metrics["gd_edge"], 38.0, rtol=1e-5)
  with open(out / "config.json") as f:
    saved = presets.ExperimentConfig.from_dict(json.load(f)["metadata"])
  # Resuming the finished run trains nothing and returns its model state.
  result = runner.run_experiment(saved, out, progress=False, plot=False)
  stats = result.model_state
  assert stats is not None and "BatchNorm_0" in stats
  assert all(np.shape(m)[0] == 2 for m in jax.tree.leaves(stats))
  assert not np.allclose(stats["BatchNorm_0"]["mean"], 0)


def test_committed_run_is_of_the_current_cpu_preset():
  with open(RUN / "config.json") as f:
    saved = json.load(f)["metadata"]
  assert saved == json.loads(json.dumps(CPU.to_dict()))
  metrics = se.read_csv(RUN / "metrics.csv")
  assert "test_accuracy" in metrics
  assert not (RUN / "checkpoint.npz").exists() or not _tracked(
      "docs/figures/cifar10-resnet/checkpoint.npz"
  )


def _tracked(path: str) -> bool:
  import subprocess  # pylint: disable=g-import-not-at-top

  done = subprocess.run(
      ["git", "-C", str(ROOT), "ls-files", "--error-unmatch", path],
      capture_output=True,
  )
  return done.returncode == 0
