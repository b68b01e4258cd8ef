"""Claim checks on synthetic histories, and (slow) on the cpu presets' runs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import claims, cli, presets

NUM_ROWS = 90  # a row every 10 steps: 30 in the last third


def synthetic_metrics(
    tmp_path,
    configs,
    sharpness,
    sam_edge=None,
    *,
    loss=None,
    alignment=0.5,
    lambda_min=None,
):
  """Writes and reads back a metrics.csv with the given rows.

  Args:
    tmp_path: folder for the file.
    configs: list of ``{"learning_rate", "rho", "seed"}``.
    sharpness: ``(C, R)`` sharpness values (``R`` rows, a row every 10 steps).
    sam_edge: ``(C, R)`` SAM-edges; default ``2/eta``.
    loss: ``(C, R)`` losses; default a geometric decay.
    alignment: ``grad_alignment`` everywhere.
    lambda_min: ``(C, R)`` bottom Ritz values; default ``-0.1 sharpness``.
  """
  sharpness = np.atleast_2d(np.asarray(sharpness, float))
  num_configs, num_rows = sharpness.shape
  gd_edge = np.array([[2 / c["learning_rate"]] * num_rows for c in configs])
  rows = {
      "step": np.tile(np.arange(num_rows) * 10, (num_configs, 1)),
      "loss": (
          np.tile(np.geomspace(1.0, 0.01, num_rows), (num_configs, 1))
          if loss is None
          else np.asarray(loss, float)
      ),
      "grad_norm": np.ones((num_configs, num_rows)),
      "sharpness": sharpness,
      "lambda_min": (
          -0.1 * sharpness
          if lambda_min is None
          else np.asarray(lambda_min, float)
      ),
      "gd_edge": gd_edge,
      "sam_edge": gd_edge if sam_edge is None else np.asarray(sam_edge, float),
      "grad_alignment": np.full((num_configs, num_rows), alignment),
      "sam_grad_alignment": np.full((num_configs, num_rows), 0.9),
      "lanczos_iters": np.full((num_configs, num_rows), 7.0),
      "sharpness_residual": np.full((num_configs, num_rows), 1e-4),
      "wall_time": np.tile(np.linspace(0, 3, num_rows), (num_configs, 1)),
  }
  path = os.path.join(tmp_path, "metrics.csv")
  hist = history.empty_history(num_configs)
  history.write_csv(path, history.concat(hist, rows), configs)
  return history.read_csv(path)


def by_name(results, name):
  """The claims of one name, by configuration."""
  return [c for c in results if c.name == name]


GD = {"learning_rate": 0.5, "rho": 0.0, "seed": 0}
SAM = {"learning_rate": 0.5, "rho": 0.1, "seed": 0}


def ramp(final, num_rows=NUM_ROWS, start=0.2):
  """Rises linearly from ``start * final`` to ``final`` by two thirds, stays."""
  knee = 2 * num_rows // 3
  return np.concatenate(
      [np.linspace(start * final, final, knee), np.full(num_rows - knee, final)]
  )


def test_gd_at_its_edge_passes_and_below_fails(tmp_path):
  metrics = synthetic_metrics(
      tmp_path, [GD, GD], [ramp(4.0) * 1.02, ramp(4.0) * 0.6]
  )
  at_edge, below = by_name(claims.check_claims(metrics), "gd_at_edge")
  assert (at_edge.config, at_edge.passed) == (0, True)
  assert at_edge.value == pytest.approx(1.02)
  assert at_edge.range == claims.GD_RANGE
  assert len(at_edge.samples) == 30
  assert (below.config, below.passed) == (1, False)
  assert below.value == pytest.approx(0.6)
  assert "FAIL" in str(below) and "0.600" in str(below)


def test_sam_at_its_edge_below_gd_passes(tmp_path):
  edge = ramp(1.0)
  metrics = synthetic_metrics(tmp_path, [SAM], [edge * 1.05], [edge])
  results = claims.check_claims(metrics)
  (at_edge,) = by_name(results, "sam_at_sam_edge")
  (below_gd,) = by_name(results, "sam_below_gd_edge")
  assert at_edge.passed and at_edge.value == pytest.approx(1.05)
  assert below_gd.passed and below_gd.value == pytest.approx(1.05 / 4)
  assert (at_edge.learning_rate, at_edge.rho, at_edge.seed) == (0.5, 0.1, 0)


def test_sam_at_gd_edge_fails_both(tmp_path):
  gd_edge = np.full(NUM_ROWS, 4.0)
  metrics = synthetic_metrics(tmp_path, [SAM], [gd_edge], [gd_edge * 0.5])
  results = claims.check_claims(metrics)
  assert not by_name(results, "sam_at_sam_edge")[0].passed
  assert not by_name(results, "sam_below_gd_edge")[0].passed


def test_only_the_last_third_counts(tmp_path):
  sharpness = np.concatenate([np.full(60, 100.0), np.full(30, 4.0)])
  (claim,) = by_name(
      claims.check_claims(synthetic_metrics(tmp_path, [GD], [sharpness])),
      "gd_at_edge",
  )
  assert claim.passed and claim.value == pytest.approx(1.0)


def test_too_few_window_points_fail(tmp_path):
  metrics = synthetic_metrics(tmp_path, [GD], [ramp(4.0, num_rows=30)])
  (claim,) = by_name(claims.check_claims(metrics), "window_points")
  assert not claim.passed and claim.value == 10
  assert by_name(claims.check_claims(metrics, min_points=10), "window_points")[
      0
  ].passed


def test_nan_sharpness_fails(tmp_path):
  sharpness = ramp(4.0)
  sharpness[-1] = np.nan
  (claim,) = by_name(
      claims.check_claims(synthetic_metrics(tmp_path, [GD], [sharpness])),
      "gd_at_edge",
  )
  assert not claim.passed


def test_gd_must_start_below_its_edge(tmp_path):
  metrics = synthetic_metrics(
      tmp_path, [GD, GD], [ramp(4.0, start=0.5), ramp(4.0, start=0.95)]
  )
  sharpens, at_edge_from_start = by_name(
      claims.check_claims(metrics), "gd_sharpens"
  )
  assert sharpens.passed and sharpens.value < 0.55
  assert not at_edge_from_start.passed
  assert at_edge_from_start.value > 0.9


def test_gd_oscillates_needs_a_rise_or_alignment(tmp_path):
  monotone = np.tile(np.geomspace(1.0, 0.01, NUM_ROWS), (1, 1))
  stable = synthetic_metrics(
      tmp_path, [GD], [ramp(4.0)], loss=monotone, alignment=0.1
  )
  assert not by_name(claims.check_claims(stable), "gd_oscillates")[0].passed
  aligned = synthetic_metrics(
      tmp_path, [GD], [ramp(4.0)], loss=monotone, alignment=0.5
  )
  assert by_name(claims.check_claims(aligned), "gd_oscillates")[0].passed
  spiky = monotone.copy()
  spiky[0, -5] = 1.0
  rising = synthetic_metrics(
      tmp_path, [GD], [ramp(4.0)], loss=spiky, alignment=0.1
  )
  (claim,) = by_name(claims.check_claims(rising), "gd_oscillates")
  assert claim.passed and claim.value == pytest.approx(0.1)
  assert "(1 rises)" in claim.detail


def test_early_flattening_compares_sam_with_gd_of_the_same_seed(tmp_path):
  gd_sharpness = ramp(4.0, start=0.5)
  steps = np.arange(NUM_ROWS) * 10
  loss = np.geomspace(1.0, 0.01, NUM_ROWS)
  sam_sharpness = 0.3 * gd_sharpness
  metrics = synthetic_metrics(
      tmp_path,
      [GD, SAM],
      [gd_sharpness, sam_sharpness],
      [np.full(NUM_ROWS, 4.0), sam_sharpness],
      loss=[loss, 0.9 * loss],
  )
  (claim,) = by_name(claims.check_claims(metrics), "early_flattening")
  early = (steps >= 0.05 * steps[-1]) & (steps <= 0.1 * steps[-1])
  assert claim.passed and claim.value == pytest.approx(0.3)
  assert len(claim.samples) == early.sum()
  # Flat only once the loss is tiny: not the paper's early flattening.
  late = synthetic_metrics(
      tmp_path,
      [GD, SAM],
      [gd_sharpness, sam_sharpness],
      [np.full(NUM_ROWS, 4.0), sam_sharpness],
      loss=[loss, 0.2 * loss],
  )
  assert not by_name(claims.check_claims(late), "early_flattening")[0].passed
  # Without GD at the same eta and seed there is nothing to compare.
  alone = synthetic_metrics(tmp_path, [SAM], [sam_sharpness], [sam_sharpness])
  assert not by_name(claims.check_claims(alone), "early_flattening")


def test_edge_tracking_where_the_edge_moves(tmp_path):
  edge = np.geomspace(3.0, 1.0, NUM_ROWS)
  follows = synthetic_metrics(tmp_path, [SAM], [1.05 * edge], [edge])
  (claim,) = by_name(claims.check_claims(follows), "edge_tracking")
  assert claim.passed and claim.applicable
  assert claim.value == pytest.approx(1.0)
  flat = synthetic_metrics(
      tmp_path, [SAM], [1.5 + np.sin(np.arange(NUM_ROWS))], [edge]
  )
  assert not by_name(claims.check_claims(flat), "edge_tracking")[0].passed
  still = synthetic_metrics(
      tmp_path, [SAM], [np.full(NUM_ROWS, 1.0)], [np.full(NUM_ROWS, 1.0)]
  )
  (claim,) = by_name(claims.check_claims(still), "edge_tracking")
  assert claim.status == "N/A" and claim.passed


def test_summary_passes_only_if_every_seed_passes(tmp_path):
  configs = [dict(GD, seed=s) for s in range(3)]
  metrics = synthetic_metrics(
      tmp_path, configs, [ramp(4.0) * 1.0, ramp(4.0) * 1.05, ramp(4.0) * 1.2]
  )
  lines = claims.summarize(claims.check_claims(metrics))
  (line,) = [l for l in lines if "gd_at_edge" in l]
  assert line.startswith("FAIL") and "3 seeds" in line
  assert "median 1.050, range [1.000, 1.200]" in line
  low, high = claims.bootstrap_interval(
      np.concatenate([np.full(30, v) for v in (1.0, 1.05, 1.2)])
  )
  assert f"90% CI [{low:.3f}, {high:.3f}]" in line


def test_bootstrap_interval_covers_the_median():
  rng = np.random.default_rng(1)
  x = rng.normal(1.0, 0.1, 200)
  low, high = claims.bootstrap_interval(x)
  assert low < np.median(x) < high and high - low < 0.1
  assert claims.bootstrap_interval(x) == (low, high)  # seeded


def test_findings_report_the_offset_and_negative_curvature(tmp_path):
  edge = ramp(1.0)
  lam_min = -0.1 * edge
  lam_min[-3:] = -2.0  # |lambda_min| > lambda_max at the last three points
  metrics = synthetic_metrics(
      tmp_path, [SAM], [edge * 1.05], [edge], lambda_min=[lam_min]
  )
  lines = claims.findings(metrics)
  assert any(
      "median sharpness / SAM-edge 1.050" in l and "100% of 30" in l
      for l in lines
  )
  assert any("|lambda_min| > lambda_max at 3 of 30" in l for l in lines)


def test_bad_metrics_are_named():
  with pytest.raises(ValueError, match="lacks the columns.*sharpness"):
    claims.check_claims({"config": np.zeros(1, int)})
  empty = {
      name: np.zeros(0)
      for name in history.CONFIG_COLUMNS + history.HISTORY_COLUMNS
  }
  with pytest.raises(ValueError, match="no rows"):
    claims.check_claims(empty)


# Every cpu preset, run through the real entry point with all its seeds
# (about 1-4 minutes each on two CPU cores). Each claim must hold for every
# seed, except the findings listed in presets.KNOWN_FAILURES, which the
# README reports with their numbers.
@pytest.mark.slow
@pytest.mark.parametrize("name", presets.CLAIM_PRESETS)
def test_cpu_preset_shows_the_claims(name, tmp_path, capsys):
  config = presets.get_experiment(name)
  assert len(config.seeds) >= 3
  out = str(tmp_path / name)
  assert cli.main(["run", name, "--out", out, "--no-progress"]) == 0
  results = claims.check_claims(
      history.read_csv(os.path.join(out, "metrics.csv"))
  )
  known = presets.KNOWN_FAILURES.get(name, {})
  gd, sam = 0.0 in config.rhos, any(r > 0 for r in config.rhos)
  expected = {"window_points"}
  if gd:
    expected |= {"gd_at_edge", "gd_sharpens", "gd_oscillates"}
  if sam:
    expected |= {"sam_at_sam_edge", "sam_below_gd_edge", "edge_tracking"}
  if gd and sam:
    expected |= {"early_flattening"}
  assert {c.name for c in results} == expected
  unexpected = [
      str(c)
      for c in results
      if not c.passed and (c.name, c.learning_rate, c.rho) not in known
  ]
  assert not unexpected, "\n".join(unexpected)
  failed = any(not c.passed for c in results)
  assert cli.main(["check", out]) == (1 if failed else 0)
  printed = capsys.readouterr().out
  assert "claims hold" in printed and "SAM offset" in printed
