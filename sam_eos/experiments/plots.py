"""The paper's figures from ``metrics.csv``: sharpness, edges, alignment, loss.

Each function takes runs as ``(label, metrics)`` pairs, where ``metrics`` is
the flat dict of ``se.read_csv`` (one entry per line of ``metrics.csv``, all
configurations of a sweep together), so figures can be redrawn from files
and several run folders overlaid. One colour per (run, learning rate, rho);
the x-axis is the step or the training wall time.

Matplotlib is imported here only, lazily, and drawn with its Agg canvas (no
pyplot, no global backend switch): the core package never imports it.

Figures, as in Long & Bartlett (2023), Figs. 1-6:

- ``sharpness.png``: sharpness (solid), SAM-edge (dashed) and ``2/eta``
  (dotted) per configuration.
- ``sharpness_sam_edge.png``: SAM's sharpness and SAM-edge only (they lie
  far below ``2/eta``), log y when the curves span more than a decade.
- ``alignment.png``: ``|cos(g, v1)|`` and ``|cos(g_SAM, v1)|`` with the top
  Hessian eigenvector ``v1``.
- ``loss.png``: the training loss, log y.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (figure layout: the authors' ``sam_edge.py``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sam_eos.history import read_csv

FIGURES = ("sharpness.png", "sharpness_sam_edge.png", "alignment.png",
           "loss.png")
X_AXES = {"step": "step", "wall_time": "wall time (s)"}
Metrics = Mapping[str, np.ndarray]
Runs = Sequence[tuple[str, Metrics]]


def _figure(num_axes: int = 1) -> tuple[Any, Any]:
  """A matplotlib Figure on an Agg canvas, and its axes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.4 * num_axes if num_axes > 1 else 7.0, 4.4),
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, num_axes, sharey=True, squeeze=False)[0]
  return fig, axes


def _as_runs(runs: Runs | Metrics) -> Runs:
  """A single metrics dict as one unlabelled run."""
  if isinstance(runs, Mapping):
    return [("", runs)]
  return runs


def _curves(runs: Runs) -> list[dict[str, Any]]:
  """One entry per (run, configuration): its rows, label and colour."""
  runs = _as_runs(runs)
  curves = []
  for label, metrics in runs:
    if "config" not in metrics:
      raise ValueError(f"Run {label!r}: `metrics` must be a dict of "
                       "se.read_csv columns (config, learning_rate, rho, "
                       f"seed, step, ...), got keys {sorted(metrics)}.")
    for c in np.unique(metrics["config"]):
      mask = np.asarray(metrics["config"]) == c
      rows = {k: np.asarray(v)[mask] for k, v in metrics.items()}
      curves.append({"run": label, "rows": rows,
                     "learning_rate": float(rows["learning_rate"][0]),
                     "rho": float(rows["rho"][0]),
                     "seed": int(rows["seed"][0])})
  several = {name: len({c[name] for c in curves}) > 1
             for name in ("learning_rate", "seed")}
  keys = []
  for curve in curves:
    parts = [curve["run"]] if curve["run"] else []
    if several["learning_rate"]:
      parts.append(f"eta={curve['learning_rate']:.4g}")
    parts.append("GD" if curve["rho"] == 0 else f"SAM rho={curve['rho']:g}")
    if several["seed"]:
      parts.append(f"seed {curve['seed']}")
    curve["label"] = ", ".join(parts)
    key = (curve["run"], curve["learning_rate"], curve["rho"])
    if key not in keys:
      keys.append(key)
    curve["color"] = f"C{keys.index(key) % 10}"
  return curves


def _x(curve: Mapping[str, Any], x_axis: str) -> np.ndarray:
  if x_axis not in X_AXES:
    raise ValueError(f"`x_axis` must be one of {sorted(X_AXES)}, got "
                     f"{x_axis!r}.")
  return curve["rows"][x_axis]


def _legend(ax, styles: Sequence[tuple[str, str]] = ()) -> None:
  """One legend: a line per configuration, then the grey line styles."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  handles, _ = ax.get_legend_handles_labels()
  if handles:
    handles += [Line2D([], [], color="0.4", linestyle=ls, label=name)
                for name, ls in styles]
    ax.legend(handles=handles, loc="best", fontsize=8)


def _log_y(ax) -> None:
  """Log scale on y with plain numbers (50, not 5 x 10^1) as tick labels."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(ticker.LogFormatter())
  ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False,
                                                   minor_thresholds=(2, 0.5)))


def _save(fig, path: str | os.PathLike, title: str | None) -> str:
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=120)
  return os.fspath(path)


def plot_sharpness(runs: Runs | Metrics, path: str | os.PathLike, *,
                   x_axis: str = "step", show_gd_edge: bool = True,
                   log_y: bool | None = None, title: str | None = None) -> str:
  """Sharpness with the SAM-edge (dashed) and ``2/eta`` (dotted).

  For GD (``rho = 0``) the SAM-edge equals ``2/eta``; with
  ``show_gd_edge`` only the latter is drawn. Without it the figure zooms in
  on SAM: GD configurations are left out (their sharpness sits at ``2/eta``),
  unless the runs have no SAM configuration at all.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict (``se.read_csv``).
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    show_gd_edge: draw ``2/eta`` (``sharpness.png``); without it, the
      figure is ``sharpness_sam_edge.png``.
    log_y: log scale on y; None chooses it when the curves span more than a
      factor of 10.
    title: figure title.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the CSV columns.

  References:
    Long & Bartlett 2023, Figs. 1-6 (top panels).
  """
  fig, (ax,) = _figure()
  values = []
  curves = _curves(runs)
  if not show_gd_edge and any(c["rho"] > 0 for c in curves):
    curves = [c for c in curves if c["rho"] > 0]
  for curve in curves:
    x, rows = _x(curve, x_axis), curve["rows"]
    ax.plot(x, rows["sharpness"], color=curve["color"], lw=1.2,
            label=curve["label"])
    values.append(rows["sharpness"])
    if curve["rho"] > 0 or not show_gd_edge:
      ax.plot(x, rows["sam_edge"], color=curve["color"], ls="--", lw=1)
      values.append(rows["sam_edge"])
    if show_gd_edge:
      ax.plot(x, rows["gd_edge"], color=curve["color"], ls=":", lw=1.2)
      values.append(rows["gd_edge"])
  values = np.concatenate(values) if values else np.ones(1)
  values = values[np.isfinite(values) & (values > 0)]
  if log_y is None:
    log_y = values.size > 0 and values.max() > 10 * values.min()
  if log_y:
    _log_y(ax)
  ax.set_xlabel(X_AXES[x_axis])
  ax.set_ylabel("top Hessian eigenvalue")
  styles = [("sharpness", "-"), ("SAM-edge", "--")]
  if show_gd_edge:
    styles.append(("2/eta", ":"))
  _legend(ax, styles)
  return _save(fig, path, title)


def plot_alignment(runs: Runs | Metrics, path: str | os.PathLike, *,
                   x_axis: str = "step", title: str | None = None) -> str:
  """``|cos(g, v1)|`` (left) and ``|cos(g_SAM, v1)|`` (right).

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.

  Returns:
    ``path`` as a string.

  References:
    Long & Bartlett 2023 (alignment panels: SAM's gradient lines up with
    the top eigenvector).
  """
  fig, axes = _figure(2)
  for curve in _curves(runs):
    x = _x(curve, x_axis)
    for ax, column in zip(axes, ("grad_alignment", "sam_grad_alignment")):
      ax.plot(x, curve["rows"][column], color=curve["color"], lw=1,
              label=curve["label"])
  axes[0].set_ylabel("|cos(gradient, top eigenvector)|")
  axes[0].set_title("gradient at w", fontsize=9)
  axes[1].set_title("SAM gradient at w + rho g/||g||", fontsize=9)
  for ax in axes:
    ax.set_xlabel(X_AXES[x_axis])
    ax.set_ylim(0, 1.02)
  _legend(axes[0])
  return _save(fig, path, title)


def plot_loss(runs: Runs | Metrics, path: str | os.PathLike, *,
              x_axis: str = "step", title: str | None = None) -> str:
  """The training loss on a log scale.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.

  Returns:
    ``path`` as a string.
  """
  fig, (ax,) = _figure()
  for curve in _curves(runs):
    loss = np.asarray(curve["rows"]["loss"], float)
    ax.plot(_x(curve, x_axis), np.where(loss > 0, loss, np.nan),
            color=curve["color"], lw=1.2, label=curve["label"])
  _log_y(ax)
  ax.set_xlabel(X_AXES[x_axis])
  ax.set_ylabel("training loss")
  _legend(ax)
  return _save(fig, path, title)


def load_run(run_dir: str | os.PathLike) -> tuple[Metrics, dict[str, Any]]:
  """A run folder's ``metrics.csv`` and the ``metadata`` of its config.json.

  Args:
    run_dir: a folder written by ``se.train`` / ``sam-eos run``.

  Returns:
    ``(metrics, metadata)``; metadata is ``{}`` if absent.

  Raises:
    FileNotFoundError: if ``run_dir/metrics.csv`` does not exist.
  """
  path = os.path.join(run_dir, "metrics.csv")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: `run_dir` must be a run "
                            "folder written by `sam-eos run` or se.train.")
  metadata = {}
  config_path = os.path.join(run_dir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      metadata = json.load(f).get("metadata") or {}
  return read_csv(path), metadata


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              *, x_axis: str = "step") -> list[str]:
  """Draws the four figures of ``FIGURES`` for one or more run folders.

  With several folders the runs are overlaid, labelled by folder name.

  Args:
    run_dirs: run folders (each with a ``metrics.csv``).
    out_dir: where to write the PNGs (created if needed).
    x_axis: ``"step"`` or ``"wall_time"``.

  Returns:
    The paths written, in the order of ``FIGURES``.

  Raises:
    FileNotFoundError: if a folder has no ``metrics.csv``.
    ValueError: for an empty ``run_dirs`` or a bad ``x_axis``.
  """
  if not run_dirs:
    raise ValueError("`run_dirs` must name at least one run folder.")
  if x_axis not in X_AXES:
    raise ValueError(f"`x_axis` must be one of {sorted(X_AXES)}, got "
                     f"{x_axis!r}.")
  loaded = [load_run(d) for d in run_dirs]
  if len(run_dirs) == 1:
    runs = [("", loaded[0][0])]
    meta = loaded[0][1]
    title = (f"{meta['name']} ({meta.get('preset', '')}): "
             f"{meta.get('description', '')}" if "name" in meta else None)
  else:
    runs = [(os.path.basename(os.path.normpath(d)), m)
            for d, (m, _) in zip(run_dirs, loaded)]
    title = None
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, name) for name in FIGURES]
  return [
      plot_sharpness(runs, paths[0], x_axis=x_axis, title=title),
      plot_sharpness(runs, paths[1], x_axis=x_axis, show_gd_edge=False,
                     title=title),
      plot_alignment(runs, paths[2], x_axis=x_axis, title=title),
      plot_loss(runs, paths[3], x_axis=x_axis, title=title),
  ]
