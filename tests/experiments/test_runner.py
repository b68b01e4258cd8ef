"""find_run, run_or_load and check_history on tiny quadratic runs."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np
import pytest

from sam_eos.experiments import claims, presets, runner

# GD and SAM on diag(50, 20, 5, 1): 4 rows per configuration, a few seconds.
# One seed: these tests are about the files and their checks, not seeds.
CONFIG = presets.get_experiment("quadratic").replace(
    rhos=(0.0, 0.1), seeds=(0,), num_steps=20, track_every=5
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> runner.ExperimentRun:
  """A finished run of CONFIG in ``.../quadratic-cpu``."""
  out_dir = tmp_path_factory.mktemp("runs") / "quadratic-cpu"
  return runner.run_or_load(CONFIG, out_dir=out_dir, progress=False)


def _touch_run(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True)
  (folder / "metrics.csv").touch()
  return folder


def test_find_run_prefers_the_folder_itself_then_paper_then_cpu(tmp_path):
  with pytest.raises(
      FileNotFoundError,
      match="No run of 'mnist-mlp'.*" "mnist-mlp-paper.*mnist-mlp-cpu",
  ):
    runner.find_run(tmp_path, "mnist-mlp")
  plain = _touch_run(tmp_path / "mnist-mlp")
  assert runner.find_run(tmp_path, "mnist-mlp") == plain
  cpu = _touch_run(tmp_path / "mnist-mlp-cpu")
  assert runner.find_run(tmp_path, "mnist-mlp") == cpu
  paper = _touch_run(tmp_path / "mnist-mlp-paper")
  assert runner.find_run(tmp_path, "mnist-mlp") == paper
  assert runner.find_run(str(cpu), "mnist-mlp") == cpu
  (tmp_path / "metrics.csv").touch()
  assert runner.find_run(tmp_path, "mnist-mlp") == tmp_path


def test_find_run_ignores_other_experiments(tmp_path):
  _touch_run(tmp_path / "mnist-mlp-cpu")
  with pytest.raises(FileNotFoundError, match="cifar10-cnn-cpu"):
    runner.find_run(tmp_path, "cifar10-cnn")


def test_run_or_load_trains_and_reads_back(trained):
  assert trained.trained
  assert trained.config == CONFIG
  assert trained.out_dir.name == "quadratic-cpu"
  assert {p.name for p in trained.out_dir.iterdir()} == set(runner.RUN_FILES)
  rows = math.ceil(CONFIG.num_steps / CONFIG.track_every)
  assert len(trained.metrics["step"]) == CONFIG.num_configs * rows
  np.testing.assert_array_equal(
      trained.result.history["step"], [[0, 5, 10, 15]] * CONFIG.num_configs
  )


def test_run_or_load_loads_a_finished_run_without_training(
    trained, monkeypatch
):
  def no_training(*args, **kwargs):
    raise AssertionError("run_or_load trained with run_dir given")

  monkeypatch.setattr(runner, "run_experiment", no_training)
  other = CONFIG.replace(num_steps=5, rhos=0.0)  # only the name is used
  for run_dir in (trained.out_dir, trained.out_dir.parent):
    loaded = runner.run_or_load(other, run_dir=run_dir, out_dir="ignored")
    assert not loaded.trained and loaded.result is None
    assert loaded.out_dir == trained.out_dir
    assert loaded.config == CONFIG
    for column, values in trained.metrics.items():
      np.testing.assert_array_equal(loaded.metrics[column], values)


def test_run_or_load_rejects_another_experiment_or_no_settings(
    trained, tmp_path
):
  mnist = presets.get_experiment("mnist-mlp")
  with pytest.raises(
      ValueError, match="holds a run of 'quadratic', not " "'mnist-mlp'"
  ):
    runner.run_or_load(mnist, run_dir=trained.out_dir)
  bare = tmp_path / "quadratic"
  bare.mkdir()
  shutil.copy(trained.out_dir / "metrics.csv", bare)
  with pytest.raises(ValueError, match="no experiment settings"):
    runner.run_or_load(CONFIG, run_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="No run of 'quadratic'"):
    runner.run_or_load(CONFIG, run_dir=tmp_path / "nothing")


def test_run_or_load_checks_the_history_unless_told_not_to(trained, tmp_path):
  # A copy whose saved settings disagree with its rows (step size 0.02).
  copy = shutil.copytree(trained.out_dir, tmp_path / "quadratic")
  saved = json.loads((copy / "config.json").read_text())
  saved["metadata"]["learning_rates"] = [0.02]
  (copy / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="column learning_rate is not 0.02"):
    runner.run_or_load(CONFIG, run_dir=copy)
  loaded = runner.run_or_load(CONFIG, run_dir=copy, check=False)
  assert loaded.config.learning_rates == (0.02,)


def test_run_or_load_trains_into_a_temporary_folder():
  config = CONFIG.replace(rhos=0.1, num_steps=5)
  run = runner.run_or_load(config, progress=False)
  try:
    assert run.trained and run.out_dir.name.startswith("sam_eos_quadratic_")
    saved = json.loads((run.out_dir / "config.json").read_text())["metadata"]
    assert presets.ExperimentConfig.from_dict(saved) == config
    assert run.metrics["step"].tolist() == [0]
  finally:
    shutil.rmtree(run.out_dir)


def test_check_history_passes_a_finished_run(trained):
  runs = claims.check_history(
      trained.metrics,
      trained.config,
      complete=True,
      history=trained.result.history,
  )
  assert sorted(runs) == [0, 1]
  assert runs[1]["rho"].tolist() == [0.1] * 4
  # SAM's edge lies below GD's, and GD's edge is 2/eta.
  assert np.all(runs[1]["sam_edge"] < runs[1]["gd_edge"])
  np.testing.assert_allclose(runs[0]["sam_edge"], 2 / 0.01, rtol=1e-6)


def _corrupt(metrics, column, index, value):
  out = {k: np.array(v, copy=True) for k, v in metrics.items()}
  out[column][index] = value
  return out


@pytest.mark.parametrize(
    "column, index, value, message",
    [
        (
            "sharpness",
            3,
            np.nan,
            r"non-finite values in the columns \['sharpness",
        ),
        ("wall_time", 0, np.inf, "non-finite.*wall_time"),
        (
            "gd_edge",
            4,
            150.0,
            r"config 0 .*gd_edge is not 2 \(1 \+ beta\) / eta "
            r"at steps \[10\]: 150 instead of 200",
        ),
        (
            "sam_edge",
            5,
            60.0,
            "config 1 .*sam_edge is not the SAM-edge at "
            r"grad_norm at steps \[10\]",
        ),
        ("sam_edge", 0, 199.0, "config 0 .*sam_edge is not the SAM-edge"),
        (
            "grad_norm",
            7,
            10.0,
            "config 1 .*sam_edge is not the SAM-edge at "
            r"grad_norm at steps \[15\]",
        ),
        ("step", 4, 6, r"config 0 .*rows at steps \[0, 5, 6, 15\]"),
        ("rho", 7, 0.2, "config 1 .*column rho is not 0.1"),
        (
            "config",
            7,
            2,
            r"configurations \[0, 1, 2\]; quadratic \(cpu\) sweeps 2",
        ),
    ],
)
def test_check_history_names_what_is_wrong(
    trained, column, index, value, message
):
  # Row i is configuration i % 2 at step 5 * (i // 2).
  assert claims.check_history(trained.metrics, trained.config)
  bad = _corrupt(trained.metrics, column, index, value)
  with pytest.raises(ValueError, match=message):
    claims.check_history(bad, trained.config)


def test_check_history_rows_against_the_config_and_history(trained):
  metrics, config = trained.metrics, trained.config
  with pytest.raises(ValueError, match="lacks the columns.*sam_grad_alignment"):
    claims.check_history(
        {k: v for k, v in metrics.items() if k != "sam_grad_alignment"}, config
    )
  with pytest.raises(ValueError, match=r"sweeps 3: \[0, 1, 2\]"):
    claims.check_history(metrics, config.replace(rhos=(0.0, 0.1, 0.2)))
  with pytest.raises(ValueError, match="column learning_rate is not 0.02"):
    claims.check_history(metrics, config.replace(learning_rates=0.02))
  # A stopped run (its last row missing) passes unless `complete`.
  stopped = {k: v[metrics["step"] < 15] for k, v in metrics.items()}
  claims.check_history(stopped, config)
  with pytest.raises(
      ValueError,
      match=r"3 rows, want ceil\(num_steps / "
      r"track_every\) = ceil\(20 / 5\) = 4",
  ):
    claims.check_history(stopped, config, complete=True)
  history = {
      k: np.array(v, copy=True) for k, v in trained.result.history.items()
  }
  history["loss"][1, 2] *= 1.01
  with pytest.raises(
      ValueError,
      match="config 1: column loss of `metrics` " "differs from `history`",
  ):
    claims.check_history(metrics, config, history=history)
  with pytest.raises(ValueError, match="column step .*differs"):
    claims.check_history(stopped, config, history=trained.result.history)


@pytest.mark.parametrize("normalize, momentum", [(False, 0.0), (True, 0.5)])
def test_check_history_edges_of_usam_and_momentum(
    normalize, momentum, tmp_path
):
  config = CONFIG.replace(normalize=normalize, momentum=momentum, num_steps=10)
  run = runner.run_or_load(config, out_dir=tmp_path, progress=False)
  runs = claims.check_history(
      run.metrics, config, complete=True, history=run.result.history
  )
  np.testing.assert_allclose(
      runs[0]["gd_edge"], 2 * (1 + momentum) / 0.01, rtol=1e-6
  )
  # The settings matter: checked as plain SAM without momentum, they fail.
  with pytest.raises(
      ValueError, match="config 0 .*gd_edge|config 1 .*sam_edge"
  ):
    claims.check_history(run.metrics, CONFIG.replace(num_steps=10))
