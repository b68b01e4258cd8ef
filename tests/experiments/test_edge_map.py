"""``sam-eos map``: the real command shrunk, closed forms on the quadratic."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import cli, edge_map, plots, runner

# The quadratic preset: Hessian diag(50, 20, 5, 1). On SAM's 2-cycle along
# the top eigenvector ||g|| = eta rho lam1^2 / (2 - eta lam1), so rho/||g|| =
# (2 - eta lam1) / (eta lam1^2), whatever rho, and the SAM-edge is lam1.
LAM1 = 50.0


def _cycle_rho_over_grad_norm(eta: float) -> float:
  return (2 - eta * LAM1) / (eta * LAM1**2)


def _map(tmp_path, *args: str) -> tuple[str, list[dict]]:
  out = str(tmp_path / "map")
  assert cli.main(["map", *args, "--out", out, "--no-progress"]) == 0
  for name in edge_map.MAP_FILES:
    assert os.path.exists(os.path.join(out, name)), name
  return out, edge_map.read_map_csv(os.path.join(out, "edge_map.csv"))


def test_map_of_the_quadratic_matches_the_two_cycle(tmp_path, capsys):
  out, rows = _map(
      tmp_path,
      "quadratic",
      "--lr",
      "0.01",
      "0.02",
      "--rho",
      "0.05",
      "0.1",
      "--seeds",
      "0",
      "1",
      "2",
      "--steps",
      "300",
      "--track-every",
      "5",
      "--lanczos-iters",
      "4",
  )
  printed = capsys.readouterr().out
  with open(os.path.join(out, "edge_map.csv")) as f:
    assert f.readline().strip() == ",".join(edge_map.MAP_COLUMNS)
  # 2 etas x (GD + 2 radii) x 3 seeds, GD first for each eta.
  assert len(rows) == 18
  assert [r["rho"] for r in rows[:9]] == [0.0] * 3 + [0.05] * 3 + [0.1] * 3
  for row in rows:
    eta = row["learning_rate"]
    assert not row["diverged"]
    assert row["gd_ratio"] == pytest.approx(LAM1 * eta / 2, rel=1e-5)
    if row["rho"] == 0:
      assert row["median_rho_over_grad_norm"] == 0.0
      continue
    assert row["median_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert row["ratio_low"] <= row["median_ratio"] <= row["ratio_high"]
    assert row["median_rho_over_grad_norm"] == pytest.approx(
        _cycle_rho_over_grad_norm(eta), rel=1e-3
    )
    assert row["median_rho_times_sharpness"] == pytest.approx(
        row["rho"] * LAM1, rel=1e-5
    )
  # Every SAM run holds: the range spans the two etas' cycle values.
  low, high = (
      _cycle_rho_over_grad_norm(0.02),
      _cycle_rho_over_grad_norm(0.01),
  )
  assert f"rho/||g|| in [{low:.3g}, {high:.3g}] (12 of 12 SAM runs)" in printed
  assert "rho*lambda in [2.5, 5] (12 of 12 SAM runs)" in printed
  assert "Diverged: none of the SAM runs." in printed
  with open(os.path.join(out, "edge_map.md")) as f:
    assert "(12 of 12 SAM runs)" in f.read()
  with open(os.path.join(out, "config.json")) as f:
    saved = json.load(f)
  assert saved["metadata"]["rhos"] == [0.0, 0.05, 0.1]
  assert saved["metadata"]["num_steps"] == 300
  assert "num_steps 500 -> 300" in saved["map"]["note"]
  assert saved["map"]["diverged_at"] == [-1] * 18


@pytest.mark.parametrize(
    "max_configs,pack", [("3", "--no-pack"), ("6", "--pack")]
)
def test_diverged_configurations_are_recorded(
    tmp_path, capsys, max_configs, pack
):
  # eta lam1 = 2.5 > 2: GD and SAM diverge at eta 0.05 and hold at 0.01.
  # One program per (eta, rho): the eta 0.05 programs diverge whole
  # (TrainingDiverged); packed 6 per program, each program holds one step
  # size's GD and SAM.
  out, rows = _map(
      tmp_path,
      "quadratic",
      "--lr",
      "0.01",
      "0.05",
      "--rho",
      "0.1",
      "--seeds",
      "0",
      "1",
      "2",
      "--steps",
      "200",
      "--track-every",
      "5",
      "--lanczos-iters",
      "4",
      "--max-configs-per-program",
      max_configs,
      pack,
  )
  printed = capsys.readouterr().out
  assert len(rows) == 12
  for row in rows:
    assert row["diverged"] == (row["learning_rate"] == 0.05)
    if row["diverged"]:
      assert math.isnan(row["median_ratio"])
    elif row["rho"] > 0:
      assert row["median_ratio"] == pytest.approx(1.0, abs=1e-3)
  assert "Diverged: 3 SAM runs, at (eta, rho) (0.05, 0.1)." in printed
  assert "eta 0.05: - (3 diverged)" in printed
  with open(os.path.join(out, "config.json")) as f:
    saved = json.load(f)["map"]
  assert len(saved["programs"]) == 12 // int(max_configs)
  assert [s >= 0 for s in saved["diverged_at"]] == [False] * 6 + [True] * 6


def test_map_of_mnist_shrunk_runs_the_real_command(tmp_path, capsys):
  out, rows = _map(
      tmp_path,
      "mnist-mlp",
      "--lr",
      "0.5",
      "0.9",
      "--rho",
      "0.05",
      "0.1",
      "--steps",
      "6",
      "--track-every",
      "2",
      "--lanczos-iters",
      "2",
      "--num-examples",
      "32",
  )
  printed = capsys.readouterr().out
  assert "mnist-mlp (cpu preset)" in printed
  # On a CPU each (eta, rho) is its own program of its three seeds.
  assert "in 6 program(s)" in printed
  assert len(rows) == 2 * 3 * 3
  assert {r["seed"] for r in rows} == {0, 1, 2}
  sam = [r for r in rows if r["rho"] > 0]
  for row in sam:
    assert np.isfinite(row["median_ratio"]) and row["median_ratio"] > 0
    assert row["median_rho_over_grad_norm"] > 0
  # The CSV's medians are the metrics' medians over the claim window.
  metrics, _ = plots.load_run(out)
  mask = (metrics["config"] == 3) & (metrics["step"] >= 4 * (1 - 1 / 3))
  ratio = metrics["sharpness"][mask] / metrics["sam_edge"][mask]
  assert rows[3]["median_ratio"] == pytest.approx(np.median(ratio))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["map"]["programs"] == [
        list(range(k, k + 3)) for k in range(0, 18, 3)
    ]


def test_bad_arguments_exit_2(tmp_path):
  out = str(tmp_path / "map")
  assert cli.main(["map", "quadratic", "--rho", "-1", "--out", out]) == 2
  assert cli.main(["map", "no-such-experiment", "--out", out]) == 2


def _row(x, ratio, *, rho=0.1, diverged=False, seed=0):
  return dict(
      learning_rate=0.5,
      rho=rho,
      seed=seed,
      median_ratio=ratio,
      ratio_low=ratio,
      ratio_high=ratio,
      median_rho_over_grad_norm=x,
      median_rho_times_sharpness=x / 10,
      gd_ratio=1.0,
      diverged=diverged,
  )


def test_holding_range_and_finding_beyond_it():
  rows = [
      _row(0.0, 1.0, rho=0.0),  # GD: not part of the SAM range
      _row(0.1, 0.7),
      _row(0.2, 0.9),
      _row(0.4, 1.1, seed=1),
      _row(0.8, 1.14, seed=2),
      _row(1.6, 1.3),
      _row(3.2, 1.6),
      _row(float("nan"), float("nan"), diverged=True),
  ]
  assert edge_map.holding_range(rows) == (0.2, 0.8, 3)
  lines = edge_map.describe(rows)
  assert "rho/||g|| in [0.2, 0.8] (3 of 7 SAM runs)" in lines[0]
  assert "rho*lambda in [0.02, 0.08] (3 of 7 SAM runs)" in lines[0]
  assert (
      "below 0.2: 1 points (0.1-0.1), median ratio 0.700 (range 0.700-0.700),"
      " 0 above 1.15, 1 below 0.85, 0 inside" in lines[1]
  )
  assert (
      "above 0.8: 2 points (1.6-3.2), median ratio 1.450 (range 1.300-1.600),"
      " 2 above 1.15, 0 below 0.85, 0 inside" in lines[1]
  )
  assert "Diverged: 1 SAM runs, at (eta, rho) (0.5, 0.1)." in lines
  # A diverged point inside the range breaks it (the first of equal runs).
  rows[3]["diverged"] = True
  assert edge_map.holding_range(rows) == (0.2, 0.2, 1)
  nothing = [_row(0.1, 2.0)]
  assert edge_map.holding_range(nothing) == (
      pytest.approx(float("nan"), nan_ok=True),
      pytest.approx(float("nan"), nan_ok=True),
      0,
  )


def test_map_rows_keeps_a_configuration_without_rows():
  n = 6
  metrics = {
      "config": np.zeros(n, int),
      "step": np.arange(n),
      "learning_rate": np.ones(n),
      "rho": np.full(n, 0.2),
      "seed": np.zeros(n, int),
      "gd_edge": np.full(n, 2.0),
      "sharpness": np.array([9.0, 9, 9, 9, 1.0, 1.2]),
      "sam_edge": np.ones(n),
      "grad_norm": np.array([1.0, 1, 1, 1, 0.4, 0.5]),
      "lanczos_iters": np.ones(n),  # an extra column is ignored
  }
  rows = edge_map.map_rows(
      metrics, [(1.0, 0.2, 0), (1.0, 0.1, 0)], last_step=5, diverged_at=[-1, 0]
  )
  # Window: steps >= 5 * 2/3, i.e. steps 4 and 5.
  assert rows[0]["median_ratio"] == pytest.approx(1.1)
  assert rows[0]["median_rho_over_grad_norm"] == pytest.approx(0.45)
  assert rows[0]["median_rho_times_sharpness"] == pytest.approx(0.22)
  assert not rows[0]["diverged"] and rows[1]["diverged"]
  assert math.isnan(rows[1]["median_ratio"]) and math.isnan(rows[0]["gd_ratio"])


def test_default_grid_of_mnist():
  config, note = edge_map.map_config("mnist-mlp")
  assert config.num_configs == 4 * 6 * 3
  assert "num_steps 1500 -> 500" in note and "track_every 25 -> 10" in note
  assert "sharpness_tol 0.001 -> 0.01" in note
  window = [
      s
      for s in range(0, config.num_steps, config.track_every)
      if s >= 490 * (1 - 1 / 3)
  ]
  assert len(window) == 17


ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "figures" / "edge_map"


def _make_figures():
  spec = importlib.util.spec_from_file_location(
      "make_figures", ROOT / "docs" / "make_figures.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_map_is_the_default_and_its_csv_follows_its_metrics():
  saved = json.loads((COMMITTED / "config.json").read_text())
  config, _ = edge_map.map_config("mnist-mlp")
  # The grid and the tracking are today's default.
  today = json.loads(json.dumps(config.to_dict()))
  for field in (
      "name",
      "preset",
      "dataset",
      "num_examples",
      "model",
      "model_kwargs",
      "loss",
      "learning_rates",
      "rhos",
      "seeds",
      "num_steps",
      "track_every",
      "num_lanczos_iters",
      "sharpness_tol",
      "eps",
      "init_seed",
  ):
    assert saved["metadata"][field] == today[field], field
  rows = edge_map.read_map_csv(COMMITTED / "edge_map.csv")
  assert len(rows) == config.num_configs == 72
  metrics = history.read_csv(COMMITTED / "metrics.csv")
  sweep = list(zip(*runner.sweep(config)))
  again = edge_map.map_rows(
      metrics,
      sweep,
      last_step=490,
      diverged_at=saved["map"]["diverged_at"],
  )
  for row, want in zip(rows, again):
    for key in edge_map.MAP_COLUMNS:
      if isinstance(want[key], float) and math.isnan(want[key]):
        assert math.isnan(row[key]), key
      else:
        assert row[key] == want[key], key
  lines = edge_map.describe(rows, label="x")
  text = (COMMITTED / "edge_map.md").read_text()
  assert lines[0].split(": ", 1)[1] in text
  assert all(line in text for line in lines[1:])


def test_readme_map_paragraph_is_the_generated_one():
  make_figures = _make_figures()
  readme = (ROOT / "README.md").read_text()
  block = readme.split(make_figures.MAP_START)[1].split(make_figures.MAP_END)[0]
  assert block.strip().splitlines() == make_figures.map_lines(), (
      "README's map paragraph is stale; run `python docs/make_figures.py "
      "--table`."
  )
