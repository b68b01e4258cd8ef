"""Figures from metrics files: all four, overlays, wall-time axis, no pyplot."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, *, num_rows=12, rhos=(0.0, 0.1), learning_rate=0.5):
  """A synthetic run folder: metrics.csv written with sam_eos.history."""
  os.makedirs(run_dir, exist_ok=True)
  configs = [{"learning_rate": learning_rate, "rho": r, "seed": 0}
             for r in rhos]
  steps = np.arange(num_rows) * 5
  rows = {name: np.zeros((len(rhos), num_rows))
          for name in history.HISTORY_COLUMNS}
  for c, rho in enumerate(rhos):
    gd_edge = 2 / learning_rate
    sam_edge = gd_edge if rho == 0 else 0.3 * gd_edge * np.exp(-steps / 50)
    rows["step"][c] = steps
    rows["loss"][c] = np.geomspace(1, 1e-3, num_rows)
    rows["grad_norm"][c] = np.geomspace(1, 1e-2, num_rows)
    rows["gd_edge"][c] = gd_edge
    rows["sam_edge"][c] = sam_edge
    rows["sharpness"][c] = 1.02 * sam_edge
    rows["grad_alignment"][c] = 0.3
    rows["sam_grad_alignment"][c] = 0.8
    rows["wall_time"][c] = steps * 0.01
  rows["step"] = rows["step"].astype(np.int64)
  history.write_csv(os.path.join(run_dir, "metrics.csv"), rows, configs)
  return run_dir


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(path) > 5_000


def test_plot_runs_draws_the_four_figures(tmp_path):
  run = write_run(str(tmp_path / "run"))
  paths = plots.plot_runs([run], str(tmp_path / "figs"))
  assert [os.path.basename(p) for p in paths] == list(plots.FIGURES)
  for path in paths:
    assert_png(path)


def test_each_function_takes_read_csv_metrics(tmp_path):
  metrics = history.read_csv(os.path.join(write_run(str(tmp_path / "r")),
                                          "metrics.csv"))
  for draw, name in [(plots.plot_sharpness, "a.png"),
                     (plots.plot_alignment, "b.png"),
                     (plots.plot_loss, "c.png")]:
    assert_png(draw(metrics, tmp_path / name, x_axis="wall_time", title="t"))
  assert_png(plots.plot_sharpness([("run", metrics)], tmp_path / "d.png",
                                  show_gd_edge=False, log_y=True))


def test_overlay_of_several_runs_and_learning_rates(tmp_path):
  first = write_run(str(tmp_path / "first"))
  second = write_run(str(tmp_path / "second"), rhos=(0.05,), learning_rate=0.25)
  for path in plots.plot_runs([first, second], str(tmp_path / "both"),
                              x_axis="wall_time"):
    assert_png(path)
  curves = plots._curves([("first", history.read_csv(
      os.path.join(first, "metrics.csv"))), ("second", history.read_csv(
          os.path.join(second, "metrics.csv")))])
  assert [c["label"] for c in curves] == [
      "first, eta=0.5, GD", "first, eta=0.5, SAM rho=0.1",
      "second, eta=0.25, SAM rho=0.05"]
  assert len({c["color"] for c in curves}) == 3


def test_empty_history_still_draws(tmp_path):
  run = write_run(str(tmp_path / "empty"), num_rows=0)
  for path in plots.plot_runs([run], run):
    assert os.path.exists(path)


def test_bad_arguments_are_named(tmp_path):
  run = write_run(str(tmp_path / "run"))
  with pytest.raises(ValueError, match="`x_axis`"):
    plots.plot_runs([run], str(tmp_path), x_axis="time")
  with pytest.raises(ValueError, match="`run_dirs`"):
    plots.plot_runs([], str(tmp_path))
  with pytest.raises(FileNotFoundError, match="metrics.csv"):
    plots.plot_runs([str(tmp_path / "missing")], str(tmp_path))
  with pytest.raises(ValueError, match="se.read_csv"):
    plots.plot_loss({"step": np.arange(3)}, tmp_path / "x.png")


def test_core_and_experiments_import_no_matplotlib():
  code = ("import sys, sam_eos, sam_eos.experiments, sam_eos.experiments.cli; "
          "assert not any(m.startswith('matplotlib') for m in sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_sam_edge_figure_leaves_out_gd(tmp_path, monkeypatch):
  # sharpness_sam_edge.png zooms in on SAM: GD (at 2/eta = 4) is left out,
  # so the y-axis ends well below 2/eta; sharpness.png keeps both.
  figures = {}
  monkeypatch.setattr(plots, "_save",
                      lambda fig, path, title: figures.setdefault(path, fig))
  metrics = history.read_csv(os.path.join(write_run(str(tmp_path / "r")),
                                          "metrics.csv"))
  plots.plot_sharpness(metrics, "zoom", show_gd_edge=False, log_y=False)
  plots.plot_sharpness(metrics, "full", log_y=False)
  zoom, full = (figures[k].axes[0] for k in ("zoom", "full"))
  assert zoom.get_ylim()[1] < 0.5 * 4.0 < full.get_ylim()[1]
  assert [line.get_label() for line in zoom.get_legend().get_lines()][0] == (
      "SAM rho=0.1")
