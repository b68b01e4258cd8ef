"""Claim checks on synthetic histories, and (slow) on the cpu presets' runs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import claims, cli

NUM_ROWS = 30


def synthetic_metrics(tmp_path, configs, sharpness, sam_edge=None):
  """Writes and reads back a metrics.csv with the given sharpness rows.

  Args:
    tmp_path: folder for the file.
    configs: list of ``{"learning_rate", "rho", "seed"}``.
    sharpness: ``(C, NUM_ROWS)`` sharpness values.
    sam_edge: ``(C, NUM_ROWS)`` SAM-edges; default ``2/eta``.
  """
  num_configs = len(configs)
  hist = history.empty_history(num_configs)
  gd_edge = np.array([[2 / c["learning_rate"]] * NUM_ROWS for c in configs])
  rows = {
      "step": np.tile(np.arange(NUM_ROWS) * 10, (num_configs, 1)),
      "loss": np.tile(np.geomspace(1.0, 0.01, NUM_ROWS), (num_configs, 1)),
      "grad_norm": np.ones((num_configs, NUM_ROWS)),
      "sharpness": np.asarray(sharpness, float),
      "gd_edge": gd_edge,
      "sam_edge": gd_edge if sam_edge is None else np.asarray(sam_edge, float),
      "grad_alignment": np.full((num_configs, NUM_ROWS), 0.5),
      "sam_grad_alignment": np.full((num_configs, NUM_ROWS), 0.9),
      "wall_time": np.tile(np.linspace(0, 3, NUM_ROWS), (num_configs, 1)),
  }
  path = os.path.join(tmp_path, "metrics.csv")
  history.write_csv(path, history.concat(hist, rows), configs)
  return history.read_csv(path)


GD = {"learning_rate": 0.5, "rho": 0.0, "seed": 0}
SAM = {"learning_rate": 0.5, "rho": 0.1, "seed": 0}


def ramp(final, num_rows=NUM_ROWS):
  """Rises linearly to ``final`` by two thirds of the run, then stays."""
  knee = 2 * num_rows // 3
  return np.concatenate([np.linspace(0.2 * final, final, knee),
                         np.full(num_rows - knee, final)])


def test_gd_at_its_edge_passes_and_below_fails(tmp_path):
  metrics = synthetic_metrics(tmp_path, [GD, GD],
                              [ramp(4.0) * 1.02, ramp(4.0) * 0.6])
  at_edge, below = claims.check_claims(metrics)
  assert (at_edge.name, at_edge.config, at_edge.passed) == ("gd_at_edge", 0,
                                                            True)
  assert at_edge.value == pytest.approx(1.02)
  assert at_edge.range == claims.GD_RANGE
  assert (below.config, below.passed) == (1, False)
  assert below.value == pytest.approx(0.6)
  assert "FAIL" in str(below) and "0.600" in str(below)


def test_sam_at_its_edge_below_gd_passes(tmp_path):
  edge = ramp(1.0)
  metrics = synthetic_metrics(tmp_path, [SAM], [edge * 1.05], [edge])
  at_edge, below_gd = claims.check_claims(metrics)
  assert (at_edge.name, at_edge.passed) == ("sam_at_sam_edge", True)
  assert at_edge.value == pytest.approx(1.05)
  assert (below_gd.name, below_gd.passed) == ("sam_below_gd_edge", True)
  assert below_gd.value == pytest.approx(1.05 / 4)
  assert (at_edge.learning_rate, at_edge.rho, at_edge.seed) == (0.5, 0.1, 0)


def test_sam_at_gd_edge_fails_both(tmp_path):
  gd_edge = np.full(NUM_ROWS, 4.0)
  metrics = synthetic_metrics(tmp_path, [SAM], [gd_edge], [gd_edge * 0.5])
  assert [c.passed for c in claims.check_claims(metrics)] == [False, False]


def test_only_the_last_third_counts(tmp_path):
  sharpness = np.concatenate([np.full(20, 100.0), np.full(10, 4.0)])
  (claim,) = claims.check_claims(synthetic_metrics(tmp_path, [GD],
                                                   [sharpness]))
  assert claim.passed and claim.value == pytest.approx(1.0)


def test_nan_sharpness_fails(tmp_path):
  sharpness = ramp(4.0)
  sharpness[-1] = np.nan
  (claim,) = claims.check_claims(synthetic_metrics(tmp_path, [GD],
                                                   [sharpness]))
  assert not claim.passed


def test_bad_metrics_are_named():
  with pytest.raises(ValueError, match="lacks the columns.*sharpness"):
    claims.check_claims({"config": np.zeros(1, int)})
  empty = {name: np.zeros(0) for name in
           history.CONFIG_COLUMNS + history.HISTORY_COLUMNS}
  with pytest.raises(ValueError, match="no rows"):
    claims.check_claims(empty)


# The cpu presets of the paper's three experiments and Cohen et al.'s
# baseline, run through the real entry point; each takes 1-2.5 minutes on
# two CPU cores (GD and SAM in one vmapped program).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-mlp", "cifar10-cnn",
                                  "shakespeare-transformer", "cifar10-5k"])
def test_cpu_preset_shows_the_claims(name, tmp_path, capsys):
  out = str(tmp_path / name)
  assert cli.main(["run", name, "--out", out, "--no-progress"]) == 0
  results = claims.check_claims(history.read_csv(os.path.join(out,
                                                              "metrics.csv")))
  assert {c.name for c in results} == {"gd_at_edge", "sam_at_sam_edge",
                                       "sam_below_gd_edge"}
  assert all(c.passed for c in results), "\n".join(map(str, results))
  assert cli.main(["check", out]) == 0
  assert "claims hold" in capsys.readouterr().out
