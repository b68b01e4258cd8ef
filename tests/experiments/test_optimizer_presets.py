"""The registry's Adam base, SAM variants and top-k, from preset to claims."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import claims, cli, plots, presets, runner

SHRUNK = [
    "--steps",
    "4",
    "--track-every",
    "2",
    "--lanczos-iters",
    "4",
    "--num-examples",
    "16",
    "--num-test-examples",
    "8",
    "--no-progress",
]


def _run(tmp_path, *args: str) -> tuple[str, dict, dict]:
  out = os.fspath(tmp_path / "run")
  code = cli.main(["run", *args, "--out", out, *SHRUNK])
  assert code in (cli.EXIT_OK, cli.EXIT_FAILED)
  with open(os.path.join(out, "config.json")) as f:
    saved = json.load(f)["metadata"]
  return out, saved, history.read_csv(os.path.join(out, "metrics.csv"))


def test_adam_preset_records_preconditioned_sharpness_and_its_claim(tmp_path):
  out, saved, metrics = _run(tmp_path, "mnist-mlp-adam", "--rho", "0", "0.05")
  assert saved["optimizer"] == "adam"
  assert np.all(np.isfinite(metrics["preconditioned_sharpness"]))
  assert os.path.exists(os.path.join(out, plots.ADAM_FIGURE))
  found = claims.check_claims(metrics, min_points=1)
  names = {(c.name, c.rho) for c in found}
  # Adam runs get only Adam's claim (for rho = 0); GD/SAM claims are about
  # plain gradient steps.
  assert names == {
      ("window_points", 0.0),
      ("window_points", 0.05),
      ("adam_at_edge", 0.0),
  }
  edge = (2 + 2 * claims.ADAM_B1) / (1e-3 * (1 - claims.ADAM_B1))
  assert edge == pytest.approx(38_000)
  rows = claims.split_configs(metrics)[0]
  window = claims.tail_window(rows)
  want = np.median(rows["preconditioned_sharpness"][window] / edge)
  (adam,) = [c for c in found if c.name == "adam_at_edge" and c.config == 0]
  assert adam.value == pytest.approx(want, rel=1e-12)
  assert any("Adam" in line for line in claims.findings(metrics))


def test_adam_optimizer_matches_optax_adam():
  config = presets.get_experiment("mnist-mlp-adam")
  injected = runner.adam_optimizer(config)
  state = injected.init(np.zeros(3))
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
  assert float(state.hyperparams["b1"]) == pytest.approx(claims.ADAM_B1)


def test_variants_and_top_k_from_the_command_line(tmp_path):
  _, saved, metrics = _run(
      tmp_path,
      "quadratic",
      "--rho",
      "0.05",
      "--adaptive",
      "--adaptive-eta",
      "0.1",
      "--top-k",
      "4",
  )
  assert saved["adaptive"] is True and saved["adaptive_eta"] == 0.1
  assert saved["num_top_eigenvalues"] == 4 and saved["num_warm_vectors"] == 4
  assert "eigen_weight" not in saved  # at its default, left out
  top = [metrics["sharpness"]] + [
      metrics[f"top_eigenvalue_{i}"] for i in (2, 3, 4)
  ]
  # Ritz values come sorted, and the quadratic's Hessian is its diagonal.
  assert np.all(np.diff(np.stack(top), axis=0) <= 1e-6)
  diagonal = sorted(
      presets.get_experiment("quadratic").model_kwargs["diagonal"],
      reverse=True,
  )
  np.testing.assert_allclose(
      [t[0] for t in top], diagonal[:4], rtol=1e-4, atol=1e-6
  )


def test_eigen_sam_from_the_command_line_differs_from_sam(tmp_path):
  _, saved, metrics = _run(
      tmp_path / "eigen", "mnist-mlp", "--rho", "0.1", "--eigen-weight", "0.5"
  )
  _, _, plain = _run(tmp_path / "plain", "mnist-mlp", "--rho", "0.1")
  assert saved["eigen_weight"] == 0.5
  # Step 0 is measured before the first update; later losses differ.
  assert metrics["loss"][0] == pytest.approx(plain["loss"][0])
  assert metrics["loss"][-1] != pytest.approx(plain["loss"][-1], rel=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adaptive", "--eigen-weight", "0.5"], "one of them"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--top-k", "0"], "--top-k"),
    ],
)
def test_bad_variant_arguments_exit_2(tmp_path, capsys, args, message):
  code = cli.main(["run", "quadratic", "--out", os.fspath(tmp_path), *args])
  assert code == cli.EXIT_USAGE == 2
  assert message in capsys.readouterr().err


def test_adam_is_refused_for_batchnorm_models_and_by_the_map():
  config = presets.get_experiment("cifar10-resnet").replace(
      optimizer="adam", momentum=0.0
  )
  with pytest.raises(ValueError, match="optimizer 'adam' is for the models"):
    runner.build_problem(config.replace(num_examples=8, num_test_examples=8))
  from sam_eos.experiments import edge_map  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="map an experiment with optimizer"):
    edge_map.map_config("mnist-mlp-adam")


def test_default_optional_fields_keep_older_runs_comparable():
  config = presets.get_experiment("mnist-mlp")
  saved = config.to_dict()
  assert not set(presets.OPTIONAL_FIELDS) & set(saved)
  assert presets.ExperimentConfig.from_dict(saved) == config
  adam = config.replace(optimizer="adam", num_top_eigenvalues=2)
  restored = presets.ExperimentConfig.from_dict(
      json.loads(json.dumps(adam.to_dict()))
  )
  assert restored == adam
  with pytest.raises(ValueError, match="momentum.*must be 0 with optimizer"):
    config.replace(optimizer="adam", momentum=0.9)
  with pytest.raises(ValueError, match="raise num_warm_vectors"):
    config.replace(num_top_eigenvalues=5)


ROOT = pathlib.Path(__file__).resolve().parents[2]


def _make_figures():
  spec = importlib.util.spec_from_file_location(
      "make_figures", ROOT / "docs" / "make_figures.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _readme_block(start: str, end: str) -> list[str]:
  readme = (ROOT / "README.md").read_text()
  return readme.split(start)[1].split(end)[0].strip().splitlines()


def test_committed_adam_run_is_the_preset_and_the_readme_block_is_generated():
  make_figures = _make_figures()
  run = ROOT / "docs" / "figures" / make_figures.ADAM_EXPERIMENT
  saved = json.loads((run / "config.json").read_text())["metadata"]
  preset = presets.get_experiment(make_figures.ADAM_EXPERIMENT)
  assert saved == json.loads(json.dumps(preset.to_dict()))
  assert (run / plots.ADAM_FIGURE).exists()
  found = claims.check_claims(history.read_csv(run / "metrics.csv"))
  assert all(c.passed for c in found), [str(c) for c in found if not c.passed]
  block = _readme_block(make_figures.ADAM_START, make_figures.ADAM_END)
  assert (
      block == make_figures.adam_lines()
  ), "README's Adam block is stale; run `python docs/make_figures.py --table`"


def test_batch_sharpness_from_the_command_line(tmp_path):
  out, saved, metrics = _run(
      tmp_path,
      "shakespeare-transformer",
      "--lr",
      "0.04",
      "--rho",
      "0",
      "0.1",
      "--seed",
      "0",
      "--batch-size",
      "4",
      "--batch-sharpness",
      "3",
  )
  assert saved["batch_sharpness_batches"] == 3
  assert os.path.exists(os.path.join(out, plots.BATCH_FIGURE))
  for column in ("batch_sharpness", "batch_sharpness_low", "batch_sam_edge"):
    assert np.all(np.isfinite(metrics[column])), column
  low, high = metrics["batch_sharpness_low"], metrics["batch_sharpness_high"]
  assert np.all(
      (low <= metrics["batch_sharpness"]) & (metrics["batch_sharpness"] <= high)
  )
  gd = metrics["rho"] == 0
  np.testing.assert_allclose(metrics["batch_sam_edge"][gd], 2 / 0.04, rtol=1e-5)
  assert np.all(metrics["batch_sam_edge"][~gd] < 2 / 0.04)


def test_batch_sharpness_needs_minibatches(tmp_path, capsys):
  code = cli.main(
      [
          "run",
          "quadratic",
          "--out",
          os.fspath(tmp_path),
          "--batch-sharpness",
          "2",
      ]
  )
  assert code == cli.EXIT_USAGE
  assert "set batch_size" in capsys.readouterr().err


def test_committed_batch_sharpness_run_and_its_readme_block():
  make_figures = _make_figures()
  run = ROOT / "docs" / "figures" / make_figures.BATCH_RUN
  saved = json.loads((run / "config.json").read_text())["metadata"]
  want = presets.get_experiment("shakespeare-transformer").replace(
      batch_sharpness_batches=saved["batch_sharpness_batches"]
  )
  assert saved == json.loads(json.dumps(want.to_dict()))
  assert (run / plots.BATCH_FIGURE).exists()
  block = _readme_block(make_figures.BATCH_START, make_figures.BATCH_END)
  assert block == make_figures.batch_lines(), (
      "README's batch-sharpness block is stale; run `python "
      "docs/make_figures.py --table`"
  )
