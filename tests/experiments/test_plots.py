"""Figures from metrics files: seed bands, robust y-range, ratio, no pyplot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import claims, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    run_dir,
    *,
    num_rows=12,
    rhos=(0.0, 0.1),
    learning_rate=0.5,
    num_seeds=1,
    spike=None,
    test_columns=False,
    flip_at=(),
    diverged_at=None,
    batch_size=None,
):
  """A synthetic run folder: metrics.csv written with sam_eos.history.

  Args:
    run_dir: the folder.
    num_rows: tracked steps (every 5 steps).
    rhos: one setting per radius (0 is GD).
    learning_rate: eta of every setting.
    num_seeds: configurations per setting; seed ``s`` scales the sharpness
      by ``1 + 0.01 s``.
    spike: if given, the sharpness at step 0 (an initial transient).
    test_columns: add ``test_loss`` and ``test_accuracy``.
    flip_at: rows where ``|lambda_min| > sharpness``.
    diverged_at: per configuration, the step from which it has no rows.
    batch_size: written to config.json's metadata.
  """
  os.makedirs(run_dir, exist_ok=True)
  configs = [
      {"learning_rate": learning_rate, "rho": r, "seed": s}
      for r in rhos
      for s in range(num_seeds)
  ]
  steps = np.arange(num_rows) * 5
  extra = ("test_loss", "test_accuracy") if test_columns else ()
  rows = {
      name: np.zeros((len(configs), num_rows))
      for name in history.columns(extra)
  }
  for c, config in enumerate(configs):
    gd_edge = 2 / learning_rate
    sam_edge = (
        np.full(num_rows, gd_edge)
        if config["rho"] == 0
        else 0.3 * gd_edge * np.exp(-steps / 50)
    )
    sharpness = 1.02 * sam_edge * (1 + 0.01 * config["seed"])
    if spike is not None and num_rows:
      sharpness[0] = spike
    rows["step"][c] = steps
    rows["loss"][c] = np.geomspace(1, 1e-3, num_rows)
    rows["grad_norm"][c] = np.geomspace(1, 1e-2, num_rows)
    rows["sharpness"][c] = sharpness
    rows["lambda_min"][c] = -0.1 * sharpness
    rows["lambda_min"][c, list(flip_at)] = -2 * sharpness[list(flip_at)]
    rows["gd_edge"][c] = gd_edge
    rows["sam_edge"][c] = sam_edge
    rows["grad_alignment"][c] = 0.3
    rows["sam_grad_alignment"][c] = 0.8
    rows["wall_time"][c] = steps * 0.01
    if test_columns:
      rows["test_loss"][c] = 2 * np.geomspace(1, 1e-2, num_rows)
      rows["test_accuracy"][c] = np.linspace(0.1, 0.9, num_rows)
  rows["step"] = rows["step"].astype(np.int64)
  history.write_csv(
      os.path.join(run_dir, "metrics.csv"), rows, configs, diverged_at
  )
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(
        {
            "metadata": {
                "name": "synthetic",
                "preset": "cpu",
                "description": "made up",
                "batch_size": batch_size,
            }
        },
        f,
    )
  return run_dir


def read(run_dir):
  return history.read_csv(os.path.join(run_dir, "metrics.csv"))


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(path) > 5_000


@pytest.fixture
def figures(monkeypatch):
  """The Figure of each plot_* call by path, instead of writing PNGs."""
  drawn = {}

  def save(fig, path, title):
    del title
    drawn[os.fspath(path)] = fig
    return os.fspath(path)

  monkeypatch.setattr(plots, "_save", save)
  return drawn


def legend_labels(fig):
  return [t.get_text() for t in fig.legends[0].get_texts()]


def test_plot_runs_draws_every_figure_with_ratio(tmp_path):
  run = write_run(str(tmp_path / "run"), num_seeds=3)
  paths = plots.plot_runs([run], str(tmp_path / "figs"))
  assert [os.path.basename(p) for p in paths] == list(plots.FIGURES)
  assert "ratio.png" in plots.FIGURES
  assert plots.FIGURES[:4] == (
      "sharpness.png",
      "sharpness_sam_edge.png",
      "alignment.png",
      "loss.png",
  )
  for path in paths:
    assert_png(path)


def test_each_function_takes_read_csv_metrics(tmp_path):
  metrics = read(write_run(str(tmp_path / "r")))
  for draw, name in [
      (plots.plot_sharpness, "a.png"),
      (plots.plot_alignment, "b.png"),
      (plots.plot_loss, "c.png"),
      (plots.plot_ratio, "e.png"),
  ]:
    assert_png(draw(metrics, tmp_path / name, x_axis="wall_time", title="t"))
  assert_png(
      plots.plot_sharpness(
          [("run", metrics)], tmp_path / "d.png", show_gd_edge=False, log_y=True
      )
  )


def test_seed_bands_match_numpy():
  rng = np.random.default_rng(0)
  steps = np.arange(0, 50, 5)
  values = rng.normal(size=(3, steps.size))
  got_steps, median, low, high = plots.seed_bands([(steps, v) for v in values])
  np.testing.assert_array_equal(got_steps, steps)
  np.testing.assert_allclose(median, np.median(values, axis=0))
  np.testing.assert_allclose(low, values.min(axis=0))
  np.testing.assert_allclose(high, values.max(axis=0))


def test_seed_bands_use_the_seeds_present_at_each_step():
  # Seed 2 diverged after 4 rows (and has an inf): the rest of the median is
  # over seeds 0 and 1; steps are the union.
  steps = np.arange(0, 50, 5)
  values = np.arange(30.0).reshape(3, 10)
  short = values[2, :4].copy()
  short[1] = np.inf
  got_steps, median, low, high = plots.seed_bands(
      [(steps, values[0]), (steps, values[1]), (steps[:4], short)]
  )
  np.testing.assert_array_equal(got_steps, steps)
  table = values.copy()
  table[2, 4:] = np.nan
  table[2, 1] = np.nan
  np.testing.assert_allclose(median, np.nanmedian(table, axis=0))
  np.testing.assert_allclose(low, np.nanmin(table, axis=0))
  np.testing.assert_allclose(high, np.nanmax(table, axis=0))
  assert [a.size for a in plots.seed_bands([])] == [0, 0, 0, 0]


def test_three_seeds_make_one_group_with_a_band(tmp_path, figures):
  metrics = read(write_run(str(tmp_path / "r"), num_seeds=3))
  groups = plots._groups(metrics)
  assert [(g["label"], len(g["seeds"])) for g in groups] == [
      ("GD", 3),
      ("SAM rho=0.1", 3),
  ]
  plots.plot_sharpness(metrics, "s")
  ax = figures["s"].axes[0]
  # One median line per group, labelled once; one band per group.
  labelled = [
      line.get_label()
      for line in ax.get_lines()
      if not line.get_label().startswith("_")
  ]
  assert labelled == ["GD", "SAM rho=0.1"]
  assert len(ax.collections) == 2
  median = ax.get_lines()[0].get_ydata()
  np.testing.assert_allclose(
      median,
      np.median(
          [metrics["sharpness"][metrics["config"] == c] for c in range(3)],
          axis=0,
      ),
  )
  assert "min-max over 3 seeds (line: median)" in legend_labels(figures["s"])


def test_gd_and_sam_get_different_colour_families(tmp_path):
  first = write_run(str(tmp_path / "first"))
  second = write_run(str(tmp_path / "second"), rhos=(0.05,), learning_rate=0.25)
  groups = plots._groups([("first", read(first)), ("second", read(second))])
  assert [g["label"] for g in groups] == [
      "first, eta=0.5, GD",
      "first, eta=0.5, SAM rho=0.1",
      "second, eta=0.25, SAM rho=0.05",
  ]
  assert groups[0]["color"] in plots.GD_COLORS
  assert {groups[1]["color"], groups[2]["color"]} <= set(plots.SAM_COLORS)
  assert len({g["color"] for g in groups}) == 3
  assert len({g["marker"] for g in groups}) == 3


def test_overlay_of_several_runs_and_learning_rates(tmp_path):
  first = write_run(str(tmp_path / "first"), num_seeds=2)
  second = write_run(str(tmp_path / "second"), rhos=(0.05,), learning_rate=0.25)
  for path in plots.plot_runs(
      [first, second], str(tmp_path / "both"), x_axis="wall_time"
  ):
    assert_png(path)


def test_robust_ylim_ignores_an_early_spike():
  steps = np.arange(0, 100)
  values = 2.0 + 0.1 * np.sin(steps)
  values[0] = 1e4
  low, high = plots.robust_ylim([(steps, values)])
  assert 1.7 < low < 1.9 and 2.1 < high < 2.3
  low, high = plots.robust_ylim([(steps, values)], log=True, include=[1.0])
  assert 0.9 < low < 1.0 and 2.1 < high < 2.5
  assert plots.robust_ylim([(steps, np.full(100, np.nan))]) is None
  # Only transient points: they are used rather than nothing.
  assert plots.robust_ylim([(np.array([0]), np.array([3.0]))])[0] < 3.0


@pytest.mark.parametrize("name", ["sharpness", "zoom", "ratio"])
def test_figures_ignore_a_huge_step_0_spike(tmp_path, figures, name):
  metrics = read(
      write_run(str(tmp_path / "r"), num_seeds=3, spike=1e6, num_rows=40)
  )
  if name == "ratio":
    plots.plot_ratio(metrics, name)
  else:
    plots.plot_sharpness(
        metrics, name, show_gd_edge=name == "sharpness", log_y=False
    )
  fig = figures[name]
  top = max(ax.get_ylim()[1] for ax in fig.axes)
  assert top < 10
  assert any("clipped" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_ratio_figure_has_bands_line_at_one_and_claim_window(tmp_path, figures):
  metrics = read(write_run(str(tmp_path / "r"), num_seeds=3, num_rows=30))
  plots.plot_ratio(metrics, "ratio")
  fig = figures["ratio"]
  gd_ax, sam_ax = fig.axes
  assert "GD" in gd_ax.get_title() and "SAM" in sam_ax.get_title()
  labels = legend_labels(fig)
  assert any(
      f"{claims.GD_RANGE[0]:g}-{claims.GD_RANGE[1]:g}" in label
      for label in labels
  )
  assert any(
      f"{claims.SAM_RANGE[0]:g}-{claims.SAM_RANGE[1]:g}" in label
      for label in labels
  )
  assert any("claim window" in label for label in labels)
  low, high = gd_ax.get_ylim()
  assert low <= claims.SAM_RANGE[0] and high >= claims.SAM_RANGE[1]
  # The ratio medians: 1.02 * median(1, 1.01, 1.02) for both GD and SAM.
  for ax in (gd_ax, sam_ax):
    median = [
        line
        for line in ax.get_lines()
        if line.get_label() in ("GD", "SAM rho=0.1")
    ][0]
    np.testing.assert_allclose(median.get_ydata(), 1.02 * 1.01)
  # The claim window starts at (1 - TAIL_FRACTION) of the last step.
  last_step = 29 * 5
  starts = [
      line.get_xdata()[0]
      for line in gd_ax.get_lines()
      if line.get_linestyle() == "-."
  ]
  np.testing.assert_allclose(starts, [last_step * (1 - claims.TAIL_FRACTION)])


def test_ratio_with_gd_only_has_one_panel(tmp_path, figures):
  plots.plot_ratio(read(write_run(str(tmp_path / "r"), rhos=(0.0,))), "gd")
  assert len(figures["gd"].axes) == 1


def test_loss_panels_follow_the_columns(tmp_path, figures):
  plain = read(write_run(str(tmp_path / "plain"), num_seeds=2))
  held_out = read(
      write_run(str(tmp_path / "held"), num_seeds=2, test_columns=True)
  )
  plots.plot_loss(plain, "plain")
  plots.plot_loss(held_out, "held")
  assert len(figures["plain"].axes) == 1
  loss_ax, accuracy_ax = figures["held"].axes
  styles = [line.get_linestyle() for line in loss_ax.get_lines()]
  assert styles.count("-") == 2 and styles.count("--") == 2
  assert accuracy_ax.get_ylabel() == "held-out accuracy"
  assert len(accuracy_ax.get_lines()) == 2
  assert "held-out loss" in legend_labels(figures["held"])


def test_negative_curvature_points_are_marked(tmp_path, figures):
  metrics = read(write_run(str(tmp_path / "r"), num_seeds=3, flip_at=(3, 7)))
  plots.plot_sharpness(metrics, "flip")
  ax = figures["flip"].axes[0]
  crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
  # Per group and seed: the two flipped steps.
  assert len(crosses) == 6
  np.testing.assert_array_equal(crosses[0].get_xdata(), [15, 35])
  assert "|lambda_min| > lambda_max" in legend_labels(figures["flip"])
  plots.plot_sharpness(read(write_run(str(tmp_path / "n"))), "none")
  assert "|lambda_min| > lambda_max" not in legend_labels(figures["none"])


def test_minibatch_runs_say_so(tmp_path, figures):
  for name, batch_size in (("full", None), ("mini", 32)):
    plots.plot_runs(
        [write_run(str(tmp_path / name), batch_size=batch_size)],
        str(tmp_path / name),
    )
  mini = legend_labels(figures[str(tmp_path / "mini" / "sharpness.png")])
  full = legend_labels(figures[str(tmp_path / "full" / "sharpness.png")])
  assert "minibatch sharpness" in mini
  assert "SAM-edge at the minibatch ||g||" in mini
  assert "sharpness" in full and "SAM-edge" in full
  assert not any("minibatch" in label for label in full)
  ratio = figures[str(tmp_path / "mini" / "ratio.png")]
  assert "minibatch" in ratio.axes[1].get_title()


def test_truncated_seed_still_draws(tmp_path, figures):
  # Seed 2 of GD diverged at step 20: the band narrows to two seeds after.
  run = write_run(
      str(tmp_path / "r"), num_seeds=3, diverged_at=[-1, -1, 20, -1, -1, -1]
  )
  metrics = read(run)
  plots.plot_sharpness(metrics, "s")
  median = figures["s"].axes[0].get_lines()[0]
  assert median.get_xdata().size == 12
  assert np.all(np.isfinite(median.get_ydata()))
  for path in plots.plot_runs([run], str(tmp_path / "figs")):
    assert path in figures


def test_empty_history_still_draws(tmp_path):
  run = write_run(str(tmp_path / "empty"), num_rows=0)
  for path in plots.plot_runs([run], run):
    assert os.path.exists(path)


def test_bad_arguments_are_named(tmp_path):
  run = write_run(str(tmp_path / "run"))
  with pytest.raises(ValueError, match="`x_axis`"):
    plots.plot_runs([run], str(tmp_path), x_axis="time")
  with pytest.raises(ValueError, match="`x_axis`"):
    plots.plot_ratio(read(run), tmp_path / "x.png", x_axis="time")
  with pytest.raises(ValueError, match="`run_dirs`"):
    plots.plot_runs([], str(tmp_path))
  with pytest.raises(FileNotFoundError, match="metrics.csv"):
    plots.plot_runs([str(tmp_path / "missing")], str(tmp_path))
  with pytest.raises(ValueError, match="se.read_csv"):
    plots.plot_loss({"step": np.arange(3)}, tmp_path / "x.png")


def test_core_and_experiments_import_no_matplotlib():
  code = (
      "import sys, sam_eos, sam_eos.experiments, sam_eos.experiments.cli; "
      "assert not any(m.startswith('matplotlib') for m in sys.modules)"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_sam_edge_figure_leaves_out_gd(tmp_path, figures):
  # sharpness_sam_edge.png zooms in on SAM: GD (at 2/eta = 4) is left out,
  # so the y-axis ends well below 2/eta; sharpness.png keeps both.
  metrics = read(write_run(str(tmp_path / "r")))
  plots.plot_sharpness(metrics, "zoom", show_gd_edge=False, log_y=False)
  plots.plot_sharpness(metrics, "full", log_y=False)
  zoom, full = (figures[k].axes[0] for k in ("zoom", "full"))
  assert zoom.get_ylim()[1] < 0.5 * 4.0 < full.get_ylim()[1]
  assert legend_labels(figures["zoom"])[0] == "SAM rho=0.1"
