"""The paper's figures from ``metrics.csv``: sharpness, edges, ratio, loss.

Each function takes runs as ``(label, metrics)`` pairs, where ``metrics`` is
the flat dict of ``se.read_csv`` (one entry per line of ``metrics.csv``, all
configurations of a sweep together), so figures can be redrawn from files
and several run folders overlaid. The x-axis is the step or the training
wall time.

How the figures are drawn, so that they can be trusted:

- Seeds: the configurations of one setting (run, learning rate ``eta``,
  radius ``rho``) that differ only in the seed are one group, drawn as the
  median over seeds with a shaded min-max band (``seed_bands``; a single
  seed is just its line). A seed that stopped early (diverged) drops out of
  the median after its last step.
- Colours: GD (``rho = 0``) in blues/purples, SAM in reds/oranges, one
  colour and marker per group; the edges are thin dashed (SAM-edge) and
  dotted (``2/eta``) lines under the sharpness.
- Y-range: set by the points after the first ``TRANSIENT_FRACTION = 10%``
  of the steps (percentiles ``YLIM_PERCENTILES`` plus a margin,
  ``robust_ylim``), so an early spike is clipped (and said so in the
  corner) instead of squashing the rest of the curve.
- Minibatch runs (``batch_size`` in the run's metadata is not None) say
  "minibatch sharpness" and "SAM-edge at the minibatch ||g||".

Matplotlib is imported here only, lazily, and drawn with its Agg canvas (no
pyplot, no global backend switch): the core package never imports it.

Figures (``FIGURES``), as in Long & Bartlett (2023), Figs. 1-6:

- ``sharpness.png``: sharpness (solid), SAM-edge (dashed) and ``2/eta``
  (dotted) per setting; small crosses where the bottom Ritz value is larger
  in magnitude than the top one (``|lambda_min| > lambda_max``).
- ``sharpness_sam_edge.png``: SAM's sharpness and SAM-edge only (they lie
  far below ``2/eta``), log y when the curves span more than a decade.
- ``alignment.png``: ``|cos(g, v1)|`` and ``|cos(g_SAM, v1)|`` with the top
  Hessian eigenvector ``v1``.
- ``loss.png``: the training loss (solid) and held-out loss (dashed, when
  the run has ``test_loss``), log y; a second panel with ``test_accuracy``
  when the run has it.
- ``ratio.png``: sharpness over its edge, ``sharpness / (2/eta)`` for GD and
  ``sharpness / sam_edge`` for SAM (one panel each), with the bands
  ``sam-eos check`` accepts (``claims.GD_RANGE``, ``claims.SAM_RANGE``), a
  line at 1 and the claim window (the last ``claims.TAIL_FRACTION`` of the
  steps) shaded.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (figure layout: the authors' ``sam_edge.py``).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sam_eos.experiments.claims import (
    ADAM_B1,
    GD_RANGE,
    SAM_RANGE,
    TAIL_FRACTION,
    with_adam_edge,
)
from sam_eos.history import read_csv

FIGURES = (
    "sharpness.png",
    "sharpness_sam_edge.png",
    "alignment.png",
    "loss.png",
    "ratio.png",
)
# Drawn, besides FIGURES, for runs with an Adam base and for runs that
# record the batch sharpness.
ADAM_FIGURE = "preconditioned_sharpness.png"
BATCH_FIGURE = "batch_sharpness.png"
X_AXES = {"step": "step", "wall_time": "wall time (s)"}
# The y-range is set by the points after this share of the steps.
TRANSIENT_FRACTION = 0.1
# Percentiles of those points that bound the y-range, and the margin added
# on each side (a share of the range; of the decades on a log axis).
YLIM_PERCENTILES = (1.0, 99.0)
YLIM_MARGIN = 0.1
# GD and SAM in two families of colours; one marker per group.
GD_COLORS = ("#1f77b4", "#9467bd", "#17becf", "#393b79", "#2ca02c")
SAM_COLORS = ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BAND_ALPHA = 0.18
# Labelled ratios on the edge map's log y-axis.
RATIO_TICKS = (
    0.1,
    0.2,
    0.3,
    0.5,
    0.7,
    0.85,
    1.0,
    1.15,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
)
Metrics = Mapping[str, np.ndarray]
Runs = Sequence[tuple[str, Metrics]]


def seed_bands(
    rows_by_seed: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Median and min-max band over seeds, step by step.

  Every seed's values are put on the union of the seeds' steps; at each
  step the statistics are over the seeds with a finite value there, so a
  seed with fewer rows (diverged, stopped) or a NaN/inf point is left out
  of that step rather than dragging the median. Steps without any finite
  value are NaN (a gap in the line).

  Args:
    rows_by_seed: one ``(steps, values)`` pair of 1-D arrays per seed.

  Returns:
    ``(steps, median, low, high)``, 1-D arrays of the union's length:
    the sorted steps, and ``nanmedian``, ``nanmin``, ``nanmax`` over seeds.

  Examples:
    >>> steps, median, low, high = seed_bands([
    ...     (np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0])),
    ...     (np.array([0, 1, 2]), np.array([3.0, 4.0, 5.0])),
    ...     (np.array([0, 1]), np.array([2.0, np.inf]))])
    >>> steps.tolist(), median.tolist(), low.tolist(), high.tolist()
    ([0, 1, 2], [2.0, 3.0, 4.0], [1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
  """
  if not rows_by_seed:
    empty = np.zeros(0)
    return empty, empty, empty, empty
  steps = np.unique(
      np.concatenate([np.asarray(s).ravel() for s, _ in rows_by_seed])
  )
  table = np.full((len(rows_by_seed), steps.size), np.nan)
  for i, (seed_steps, values) in enumerate(rows_by_seed):
    values = np.asarray(values, float).ravel()
    table[i, np.searchsorted(steps, np.asarray(seed_steps).ravel())] = np.where(
        np.isfinite(values), values, np.nan
    )
  if steps.size == 0:
    return steps, np.zeros(0), np.zeros(0), np.zeros(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN steps.
    return (
        steps,
        np.nanmedian(table, axis=0),
        np.nanmin(table, axis=0),
        np.nanmax(table, axis=0),
    )


def robust_ylim(
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    log: bool = False,
    include: Sequence[float] = (),
    transient: float = TRANSIENT_FRACTION,
    percentiles: tuple[float, float] = YLIM_PERCENTILES,
    margin: float = YLIM_MARGIN,
) -> tuple[float, float] | None:
  """A y-range that the initial transient does not set.

  Only points with ``step >= transient * last_step`` count (all points if
  none do); their ``percentiles`` bound the range, widened by ``margin``
  times its width on each side (in decades with ``log``, which also drops
  points ``<= 0``). The values of ``include`` (e.g. 1 for a ratio) are
  always inside.

  Args:
    rows: ``(steps, values)`` pairs of 1-D arrays, e.g. one per curve.
    log: the range is for a log axis.
    include: values the range must contain.
    transient: the share of the steps, from the start, left out.
    percentiles: lower and upper percentile, in ``[0, 100]``.
    margin: added on each side, as a share of the range's width.

  Returns:
    ``(low, high)``, or None when there is no usable value.

  Examples:
    >>> steps = np.arange(100)
    >>> values = np.where(steps == 0, 1e6, 1.0 + 0.01 * (steps % 2))
    >>> low, high = robust_ylim([(steps, values)], margin=0.5)
    >>> round(low, 3), round(high, 3)
    (0.995, 1.015)
  """
  kept, everything = [], []
  last = max((np.max(s) for s, _ in rows if np.size(s)), default=None)
  for steps, values in rows:
    steps = np.asarray(steps, float).ravel()
    values = np.asarray(values, float).ravel()
    ok = np.isfinite(values) & ((values > 0) if log else True)
    everything.append(values[ok])
    if last is not None:
      kept.append(values[ok & (steps >= transient * last)])
  kept = np.concatenate(kept) if kept else np.zeros(0)
  if kept.size == 0:
    kept = np.concatenate(everything) if everything else np.zeros(0)
  include = np.asarray(
      [v for v in include if np.isfinite(v) and (v > 0 or not log)], float
  )
  if kept.size == 0 and include.size == 0:
    return None
  scale = np.log10 if log else (lambda v: v)
  low, high = (
      np.percentile(scale(kept), percentiles)
      if kept.size
      else (np.inf, -np.inf)
  )
  if include.size:
    low = min(low, scale(include).min())
    high = max(high, scale(include).max())
  width = high - low
  if width <= 0:
    width = 0.2 if log else max(abs(high), 1.0) * 0.2
  low, high = low - margin * width, high + margin * width
  if log:
    return float(10**low), float(10**high)
  return float(low), float(high)


def _figure(num_axes: int = 1, *, sharey: bool = True) -> tuple[Any, Any]:
  """A matplotlib Figure on an Agg canvas, and its axes in a row."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(
      figsize=(9.0 if num_axes == 1 else 5.2 * num_axes + 2.6, 4.6),
      layout="constrained",
  )
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, num_axes, sharey=sharey, squeeze=False)[0]
  return fig, axes


def _as_runs(runs: Runs | Metrics) -> Runs:
  """A single metrics dict as one unlabelled run."""
  if isinstance(runs, Mapping):
    return [("", runs)]
  return runs


def _groups(runs: Runs | Metrics) -> list[dict[str, Any]]:
  """One entry per (run, learning rate, rho): its seeds' rows and style.

  Returns:
    Dicts with ``run``, ``learning_rate``, ``rho``, ``seeds`` (one dict of
    columns per configuration, in file order), ``label``, ``color``,
    ``marker`` and ``index`` (the group's position, for z-order).
  """
  groups: dict[tuple[str, float, float], dict[str, Any]] = {}
  for label, metrics in _as_runs(runs):
    if "config" not in metrics:
      raise ValueError(
          f"Run {label!r}: `metrics` must be a dict of "
          "se.read_csv columns (config, learning_rate, rho, "
          f"seed, step, ...), got keys {sorted(metrics)}."
      )
    config = np.asarray(metrics["config"])
    for c in np.unique(config):
      mask = config == c
      rows = {k: np.asarray(v)[mask] for k, v in metrics.items()}
      key = (label, float(rows["learning_rate"][0]), float(rows["rho"][0]))
      group = groups.setdefault(
          key,
          {"run": key[0], "learning_rate": key[1], "rho": key[2], "seeds": []},
      )
      group["seeds"].append(rows)
  groups = list(groups.values())
  several_lr = len({g["learning_rate"] for g in groups}) > 1
  num_seeds = {len(g["seeds"]) for g in groups}
  counts = {"gd": 0, "sam": 0}
  for index, group in enumerate(groups):
    parts = [group["run"]] if group["run"] else []
    if several_lr:
      parts.append(f"eta={group['learning_rate']:.4g}")
    parts.append("GD" if group["rho"] == 0 else f"SAM rho={group['rho']:g}")
    group["label"] = ", ".join(parts)
    if len(num_seeds) > 1:
      n = len(group["seeds"])
      group["label"] += f" ({n} seed{'s' if n > 1 else ''})"
    kind = "gd" if group["rho"] == 0 else "sam"
    palette = GD_COLORS if kind == "gd" else SAM_COLORS
    group["color"] = palette[counts[kind] % len(palette)]
    counts[kind] += 1
    group["marker"] = MARKERS[index % len(MARKERS)]
    group["index"] = index
  return groups


def _check_x_axis(x_axis: str) -> None:
  if x_axis not in X_AXES:
    raise ValueError(
        f"`x_axis` must be one of {sorted(X_AXES)}, got " f"{x_axis!r}."
    )


def _column(name: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  return lambda rows: rows[name]


def _band(
    group: Mapping[str, Any], values: Callable[..., np.ndarray], x_axis: str
) -> tuple[np.ndarray, ...]:
  """``(steps, x, median, low, high)`` of ``values(rows)`` over the seeds.

  With ``x_axis = "wall_time"`` the x of a step is the seeds' median wall
  time at that step.
  """
  seeds = group["seeds"]
  steps, median, low, high = seed_bands(
      [(rows["step"], values(rows)) for rows in seeds]
  )
  if x_axis == "step":
    x = steps
  else:
    x = seed_bands([(rows["step"], rows[x_axis]) for rows in seeds])[1]
  return steps, x, median, low, high


def _markevery(num_points: int, index: int) -> tuple[int, int]:
  """About 8 markers per line, offset per group so they do not coincide."""
  every = max(1, num_points // 8)
  return (index * max(1, every // 4)) % every, every


def _draw(
    ax,
    group: Mapping[str, Any],
    band: tuple[np.ndarray, ...],
    *,
    label: str | None = None,
    ls: str = "-",
    lw: float = 1.6,
    marker: bool = True,
    fill: bool = True,
    zorder: float = 3,
) -> None:
  """The median line of ``band`` (and its min-max over several seeds)."""
  _, x, median, low, high = band
  if x.size == 0:
    return
  if fill and len(group["seeds"]) > 1:
    ax.fill_between(
        x,
        low,
        high,
        color=group["color"],
        alpha=BAND_ALPHA,
        lw=0,
        zorder=zorder - 2,
    )
  ax.plot(
      x,
      median,
      color=group["color"],
      ls=ls,
      lw=lw,
      label=label,
      alpha=0.95,
      zorder=zorder + 0.01 * group["index"],
      marker=group["marker"] if marker else None,
      ms=4,
      markevery=_markevery(x.size, group["index"]) if marker else None,
  )


def _band_rows(band: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, ...]]:
  """The ``(steps, values)`` pairs of a band for ``robust_ylim``."""
  steps, _, median, low, high = band
  return [(steps, median), (steps, low), (steps, high)]


def _set_ylim(
    ax,
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    log: bool,
    include: Sequence[float] = (),
) -> None:
  """``robust_ylim`` on ``ax``, noting in a corner when points are clipped."""
  limits = robust_ylim(rows, log=log, include=include)
  if limits is None:
    return
  ax.set_ylim(*limits)
  values = np.concatenate(
      [np.asarray(v, float).ravel() for _, v in rows] or [np.zeros(0)]
  )
  values = values[np.isfinite(values)]
  if np.any((values < limits[0]) | (values > limits[1])):
    ax.text(
        0.99,
        0.01,
        f"y-range set after the first "
        f"{TRANSIENT_FRACTION:.0%} of steps; points beyond it clipped",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="0.35",
    )


def _legend(
    fig,
    axes,
    styles: Sequence[tuple[str, dict[str, Any]]] = (),
    groups: Sequence[Mapping[str, Any]] = (),
) -> None:
  """One legend right of the axes: the groups, then the other entries.

  Args:
    fig: the Figure.
    axes: its axes; their labelled artists are the entries (groups first).
    styles: ``(label, Line2D keyword arguments)`` of grey legend entries.
    groups: the drawn groups; with several seeds a band entry is added.
  """
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  handles, labels = [], []
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      if label not in labels:
        handles.append(handle)
        labels.append(label)
  if not handles:
    return
  names = [g["label"] for g in groups]
  order = sorted(
      range(len(handles)),
      key=lambda i: (
          labels[i] not in names,
          names.index(labels[i]) if labels[i] in names else i,
      ),
  )
  handles = [handles[i] for i in order]
  handles += [
      Line2D([], [], color="0.4", label=name, **kwargs)
      for name, kwargs in styles
  ]
  num_seeds = {len(g["seeds"]) for g in groups}
  if max(num_seeds, default=1) > 1:
    seeds = f"{num_seeds.pop()} seeds" if len(num_seeds) == 1 else "the seeds"
    handles.append(
        Patch(
            color="0.4", alpha=0.3, label=f"min-max over {seeds} (line: median)"
        )
    )
  fig.legend(handles=handles, loc="outside right center", fontsize=8)


def _log_y(ax) -> None:
  """Log scale on y with plain numbers (50, not 5 x 10^1) as tick labels."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(ticker.LogFormatter())
  ax.yaxis.set_minor_formatter(
      ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
  )


def _save(fig, path: str | os.PathLike, title: str | None) -> str:
  if title:
    fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=120)
  return os.fspath(path)


def _sharpness_name(minibatch: bool) -> str:
  return "minibatch sharpness" if minibatch else "sharpness"


def _sam_edge_name(minibatch: bool) -> str:
  return "SAM-edge at the minibatch ||g||" if minibatch else "SAM-edge"


def plot_sharpness(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    x_axis: str = "step",
    show_gd_edge: bool = True,
    log_y: bool | None = None,
    title: str | None = None,
    minibatch: bool = False,
) -> str:
  """Sharpness with the SAM-edge (dashed) and ``2/eta`` (dotted).

  For GD (``rho = 0``) the SAM-edge equals ``2/eta``; with
  ``show_gd_edge`` only the latter is drawn. Without it the figure zooms in
  on SAM: GD settings are left out (their sharpness sits at ``2/eta``),
  unless the runs have no SAM configuration at all. Seeds are drawn as
  their median with a min-max band; crosses mark the points (of any seed)
  where ``|lambda_min| > lambda_max``, i.e. where the largest-magnitude
  eigenvalue is negative. The y-range ignores the first
  ``TRANSIENT_FRACTION`` of the steps.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict (``se.read_csv``).
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    show_gd_edge: draw ``2/eta`` (``sharpness.png``); without it, the
      figure is ``sharpness_sam_edge.png``.
    log_y: log scale on y; None chooses it when the curves span more than a
      factor of 10 (after the transient).
    title: figure title.
    minibatch: the sharpness and the SAM-edge's ``||g||`` are of
      minibatches (labels say so).

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the CSV columns.

  References:
    Long & Bartlett 2023, Figs. 1-6 (top panels).
  """
  _check_x_axis(x_axis)
  fig, (ax,) = _figure()
  groups = _groups(runs)
  if not show_gd_edge and any(g["rho"] > 0 for g in groups):
    groups = [g for g in groups if g["rho"] > 0]
  limit_rows, negative = [], False
  for group in groups:
    band = _band(group, _column("sharpness"), x_axis)
    _draw(ax, group, band, label=group["label"])
    limit_rows += _band_rows(band)
    if group["rho"] > 0 or not show_gd_edge:
      edge = _band(group, _column("sam_edge"), x_axis)
      _draw(
          ax, group, edge, ls="--", lw=0.9, marker=False, fill=False, zorder=2
      )
      limit_rows.append((edge[0], edge[2]))
    if show_gd_edge:
      edge = _band(group, _column("gd_edge"), x_axis)
      _draw(ax, group, edge, ls=":", lw=1.0, marker=False, fill=False, zorder=2)
      limit_rows.append((edge[0], edge[2]))
    for rows in group["seeds"]:
      if "lambda_min" not in rows:
        continue
      sharpness = np.asarray(rows["sharpness"], float)
      flip = np.abs(np.asarray(rows["lambda_min"], float)) > sharpness
      if flip.any():
        negative = True
        ax.plot(
            np.asarray(rows[x_axis])[flip],
            sharpness[flip],
            ls="none",
            marker="x",
            ms=4,
            mew=0.9,
            color=group["color"],
            zorder=4,
        )
  if log_y is None:
    limits = robust_ylim(limit_rows, log=True, margin=0.0)
    log_y = limits is not None and limits[1] > 10 * limits[0]
  if log_y:
    _log_y(ax)
  _set_ylim(ax, limit_rows, log=log_y)
  ax.set_xlabel(X_AXES[x_axis])
  ax.set_ylabel(
      "minibatch top Hessian eigenvalue"
      if minibatch
      else "top Hessian eigenvalue"
  )
  styles = [
      (_sharpness_name(minibatch), {"ls": "-", "lw": 1.6}),
      (_sam_edge_name(minibatch), {"ls": "--", "lw": 0.9}),
  ]
  if show_gd_edge:
    styles.append(("2/eta", {"ls": ":", "lw": 1.0}))
  if negative:
    styles.append(
        ("|lambda_min| > lambda_max", {"ls": "none", "marker": "x", "ms": 5})
    )
  _legend(fig, [ax], styles, groups)
  return _save(fig, path, title)


def _value_with_edges(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    value: str,
    edges: Callable[[Mapping[str, Any]], list[tuple[Callable, str, float]]],
    ylabel: str,
    styles: Sequence[tuple[str, dict[str, Any]]],
    x_axis: str,
    title: str | None,
    relabel: Callable[[str], str] = lambda label: label,
) -> str:
  """One column per setting (median and min-max band over seeds) and the
  edges ``edges(group)`` (``(values(rows), ls, lw)`` each) as thin lines,
  on a linear y-range that ignores the first ``TRANSIENT_FRACTION``."""
  _check_x_axis(x_axis)
  fig, (ax,) = _figure()
  groups = _groups(runs)
  limit_rows = []
  for group in groups:
    group["label"] = relabel(group["label"])
    band = _band(group, _column(value), x_axis)
    _draw(ax, group, band, label=group["label"])
    limit_rows += _band_rows(band)
    for values, ls, lw in edges(group):
      edge = _band(group, values, x_axis)
      _draw(ax, group, edge, ls=ls, lw=lw, marker=False, fill=False, zorder=2)
      limit_rows.append((edge[0], edge[2]))
  _set_ylim(ax, limit_rows, log=False)
  ax.set_xlabel(X_AXES[x_axis])
  ax.set_ylabel(ylabel)
  _legend(fig, [ax], styles, groups)
  return _save(fig, path, title)


def plot_preconditioned(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    x_axis: str = "step",
    title: str | None = None,
) -> str:
  """Adam's preconditioned sharpness with Adam's edge ``38/eta`` (dashed).

  The top eigenvalue of ``P^{-1/2} H P^{-1/2}`` (the column
  ``preconditioned_sharpness``) per setting, seeds as their median with a
  min-max band, against ``(2 + 2 b1) / (eta (1 - b1))`` with
  ``b1 = claims.ADAM_B1``. The y-range ignores the first
  ``TRANSIENT_FRACTION`` of the steps.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict, with the column
      ``preconditioned_sharpness``.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the columns.

  References:
    Cohen et al., "Adaptive Gradient Methods at the Edge of Stability",
    2022 (Fig. 1).
  """
  adam_edge = lambda rows: with_adam_edge(rows)["adam_edge"]
  return _value_with_edges(
      runs,
      path,
      value="preconditioned_sharpness",
      edges=lambda group: [(adam_edge, "--", 0.9)],
      ylabel="top eigenvalue of P^-1/2 H P^-1/2",
      styles=[
          ("preconditioned sharpness", {"ls": "-", "lw": 1.6}),
          (
              f"adam_edge (2 + 2 b1) / (eta (1 - b1)), b1 = {ADAM_B1:g}",
              {"ls": "--", "lw": 0.9},
          ),
      ],
      x_axis=x_axis,
      title=title,
      relabel=lambda label: label.replace("SAM", "SAM on Adam").replace(
          "GD", "Adam"
      ),
  )


def plot_batch_sharpness(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    x_axis: str = "step",
    title: str | None = None,
) -> str:
  """Batch sharpness with ``2/eta`` (dotted) and the batch SAM-edge (dashed).

  The column ``batch_sharpness`` (``E_B[g_B^T H_B g_B] / E_B[||g_B||^2]``)
  per setting, seeds as their median with a min-max band, against GD's edge
  ``gd_edge`` and, for SAM, ``batch_sam_edge`` (the mean SAM-edge at the
  batches' gradient norms). The y-range ignores the first
  ``TRANSIENT_FRACTION`` of the steps.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict, with the columns
      ``batch_sharpness`` and ``batch_sam_edge``.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the columns.

  References:
    Andreyev & Beneventano, "Edge of Stochastic Stability", 2024 (Fig. 1).
  """
  return _value_with_edges(
      runs,
      path,
      value="batch_sharpness",
      edges=lambda group: [(_column("gd_edge"), ":", 1.0)]
      + ([(_column("batch_sam_edge"), "--", 0.9)] if group["rho"] > 0 else []),
      ylabel="batch sharpness E[g^T H g] / E[||g||^2]",
      styles=[
          ("batch sharpness", {"ls": "-", "lw": 1.6}),
          ("batch SAM-edge E_B[sam_edge(||g_B||)]", {"ls": "--", "lw": 0.9}),
          ("2/eta", {"ls": ":", "lw": 1.0}),
      ],
      x_axis=x_axis,
      title=title,
  )


def plot_ratio(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    x_axis: str = "step",
    title: str | None = None,
    minibatch: bool = False,
) -> str:
  """Sharpness over its edge, with the bands ``sam-eos check`` accepts.

  GD settings (left panel): ``sharpness / (2/eta)``, accepted band
  ``GD_RANGE``; SAM settings (right panel): ``sharpness / sam_edge``,
  accepted band ``SAM_RANGE``. Both have a line at 1 and the claim window
  (the last ``TAIL_FRACTION`` of the steps, where the claims take their
  medians) shaded grey; the y-range ignores the first
  ``TRANSIENT_FRACTION`` of the steps.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.
    minibatch: the sharpness and the SAM-edge's ``||g||`` are of
      minibatches (labels say so).

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the CSV columns.

  References:
    Long & Bartlett 2023, Section 4 (the SAM-edge); the claims of
    ``sam_eos.experiments.claims`` (``gd_at_edge``, ``sam_at_sam_edge``).
  """
  _check_x_axis(x_axis)
  groups = _groups(runs)
  sharpness = _sharpness_name(minibatch)
  panels = [
      (kind, [g for g in groups if (g["rho"] > 0) == (kind == "sam")])
      for kind in ("gd", "sam")
  ]
  panels = [(kind, members) for kind, members in panels if members] or [
      ("gd", [])
  ]
  fig, axes = _figure(len(panels))
  limit_rows = []
  for ax, (kind, members) in zip(axes, panels):
    accepted = GD_RANGE if kind == "gd" else SAM_RANGE
    edge = "gd_edge" if kind == "gd" else "sam_edge"
    claim = "gd_at_edge" if kind == "gd" else "sam_at_sam_edge"
    ax.axhspan(
        *accepted,
        color=(GD_COLORS if kind == "gd" else SAM_COLORS)[0],
        alpha=0.1,
        lw=0,
        zorder=0,
        label=f"accepted ({claim}): {accepted[0]:g}-{accepted[1]:g}",
    )
    ax.axhline(1.0, color="0.2", lw=0.8, zorder=1)
    starts = []
    for group in members:
      band = _band(
          group,
          lambda rows, e=edge: (
              np.asarray(rows["sharpness"], float) / np.asarray(rows[e], float)
          ),
          x_axis,
      )
      _draw(ax, group, band, label=group["label"])
      limit_rows += _band_rows(band)
      steps, x = band[0], band[1]
      if steps.size:
        start = steps.max() * (1 - TAIL_FRACTION)
        starts.append(
            (float(np.interp(start, steps, x)), float(x.max()), group["color"])
        )
    if starts and np.allclose([s for s, _, _ in starts], starts[0][0]):
      ax.axvspan(
          starts[0][0],
          max(e for _, e, _ in starts),
          color="0.5",
          alpha=0.12,
          lw=0,
          zorder=0,
          label=f"claim window (last {TAIL_FRACTION:.0%} of steps)",
      )
      ax.axvline(starts[0][0], color="0.4", lw=0.8, ls="-.", zorder=1)
    else:
      for start, _, color in starts:
        ax.axvline(
            start,
            color=color,
            lw=0.8,
            ls="-.",
            zorder=1,
            label=f"claim window start (last {TAIL_FRACTION:.0%})",
        )
    ax.set_title(
        f"GD: {sharpness} / (2/eta)"
        if kind == "gd"
        else f"SAM: {sharpness} / {_sam_edge_name(minibatch)}",
        fontsize=9,
    )
    ax.set_xlabel(X_AXES[x_axis])
  includes = [1.0] + [
      b for kind, _ in panels for b in (GD_RANGE if kind == "gd" else SAM_RANGE)
  ]
  _set_ylim(axes[0], limit_rows, log=False, include=includes)
  axes[0].set_ylabel(f"{sharpness} / edge")
  _legend(fig, axes, (), groups)
  return _save(fig, path, title)


def plot_alignment(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    x_axis: str = "step",
    title: str | None = None,
    minibatch: bool = False,
) -> str:
  """``|cos(g, v1)|`` (left) and ``|cos(g_SAM, v1)|`` (right).

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.
    minibatch: the gradients are of minibatches (titles say so).

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the CSV columns.

  References:
    Long & Bartlett 2023 (alignment panels: SAM's gradient lines up with
    the top eigenvector).
  """
  _check_x_axis(x_axis)
  fig, axes = _figure(2)
  groups = _groups(runs)
  for group in groups:
    for ax, column in zip(axes, ("grad_alignment", "sam_grad_alignment")):
      _draw(
          ax,
          group,
          _band(group, _column(column), x_axis),
          lw=1.2,
          label=group["label"],
      )
  axes[0].set_ylabel("|cos(gradient, top eigenvector)|")
  gradient = "minibatch gradient" if minibatch else "gradient"
  axes[0].set_title(f"{gradient} at w", fontsize=9)
  axes[1].set_title(f"SAM {gradient} at w + rho g/||g||", fontsize=9)
  for ax in axes:
    ax.set_xlabel(X_AXES[x_axis])
    ax.set_ylim(0, 1.02)
  _legend(fig, axes, (), groups)
  return _save(fig, path, title)


def _has(groups: Sequence[Mapping[str, Any]], column: str) -> bool:
  return any(column in rows for g in groups for rows in g["seeds"])


def plot_loss(
    runs: Runs | Metrics,
    path: str | os.PathLike,
    *,
    x_axis: str = "step",
    title: str | None = None,
    minibatch: bool = False,
) -> str:
  """Training (solid) and held-out loss (dashed), and held-out accuracy.

  The held-out loss is drawn when the runs have a ``test_loss`` column; a
  second panel shows ``test_accuracy`` when they have that column.

  Args:
    runs: ``(label, metrics)`` pairs, or one metrics dict.
    path: the PNG to write.
    x_axis: ``"step"`` or ``"wall_time"``.
    title: figure title.
    minibatch: the training loss is of minibatches (the label says so).

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: for a bad ``x_axis`` or metrics without the CSV columns.
  """
  _check_x_axis(x_axis)
  groups = _groups(runs)
  has_test, has_accuracy = (
      _has(groups, "test_loss"),
      _has(groups, "test_accuracy"),
  )
  fig, axes = _figure(2 if has_accuracy else 1, sharey=False)

  def positive(name):
    return lambda rows: np.where(
        np.asarray(rows[name], float) > 0, rows[name], np.nan
    )

  train = "minibatch training loss" if minibatch else "training loss"
  for group in groups:
    _draw(
        axes[0],
        group,
        _band(group, positive("loss"), x_axis),
        label=group["label"],
        lw=1.4,
    )
    if all("test_loss" in rows for rows in group["seeds"]):
      _draw(
          axes[0],
          group,
          _band(group, positive("test_loss"), x_axis),
          ls="--",
          lw=1.2,
          marker=False,
      )
    if has_accuracy and all("test_accuracy" in rows for rows in group["seeds"]):
      _draw(
          axes[1], group, _band(group, _column("test_accuracy"), x_axis), lw=1.2
      )
  _log_y(axes[0])
  axes[0].set_ylabel("loss" if has_test else train)
  if has_accuracy:
    axes[1].set_ylabel("held-out accuracy")
    axes[1].set_ylim(0, 1.02)
  for ax in axes:
    ax.set_xlabel(X_AXES[x_axis])
  styles = (
      [(train, {"ls": "-"}), ("held-out loss", {"ls": "--"})]
      if has_test
      else []
  )
  _legend(fig, axes, styles, groups)
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
    raise FileNotFoundError(
        f"{path} does not exist: `run_dir` must be a run "
        "folder written by `sam-eos run` or se.train."
    )
  metadata = {}
  config_path = os.path.join(run_dir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      metadata = json.load(f).get("metadata") or {}
  return read_csv(path), metadata


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    x_axis: str = "step",
) -> list[str]:
  """Draws the figures of ``FIGURES`` for one or more run folders.

  With several folders the runs are overlaid, labelled by folder name. The
  labels say "minibatch" when a run's metadata has a ``batch_size`` (with
  several folders: when any has). Runs with an Adam base (every run has
  ``preconditioned_sharpness``) also get ``ADAM_FIGURE``, runs that record
  the batch sharpness ``BATCH_FIGURE``.

  Args:
    run_dirs: run folders (each with a ``metrics.csv``).
    out_dir: where to write the PNGs (created if needed).
    x_axis: ``"step"`` or ``"wall_time"``.

  Returns:
    The paths written, in the order of ``FIGURES`` (then ``ADAM_FIGURE``,
    ``BATCH_FIGURE``).

  Raises:
    FileNotFoundError: if a folder has no ``metrics.csv``.
    ValueError: for an empty ``run_dirs`` or a bad ``x_axis``.
  """
  if not run_dirs:
    raise ValueError("`run_dirs` must name at least one run folder.")
  _check_x_axis(x_axis)
  loaded = [load_run(d) for d in run_dirs]
  minibatch = any(meta.get("batch_size") is not None for _, meta in loaded)
  if len(run_dirs) == 1:
    runs = [("", loaded[0][0])]
    meta = loaded[0][1]
    title = (
        f"{meta['name']} ({meta.get('preset', '')}): "
        f"{meta.get('description', '')}"
        if "name" in meta
        else None
    )
  else:
    runs = [
        (os.path.basename(os.path.normpath(d)), m)
        for d, (m, _) in zip(run_dirs, loaded)
    ]
    title = None
  os.makedirs(out_dir, exist_ok=True)
  kwargs = {"x_axis": x_axis, "title": title, "minibatch": minibatch}
  draw = {
      "sharpness.png": lambda p: plot_sharpness(runs, p, **kwargs),
      "sharpness_sam_edge.png": lambda p: plot_sharpness(
          runs, p, show_gd_edge=False, **kwargs
      ),
      "alignment.png": lambda p: plot_alignment(runs, p, **kwargs),
      "loss.png": lambda p: plot_loss(runs, p, **kwargs),
      "ratio.png": lambda p: plot_ratio(runs, p, **kwargs),
  }
  names = list(FIGURES)
  if all("preconditioned_sharpness" in m for _, m in runs):
    names.append(ADAM_FIGURE)
    draw[ADAM_FIGURE] = lambda p: plot_preconditioned(
        runs, p, x_axis=x_axis, title=title
    )
  if all("batch_sharpness" in m for _, m in runs):
    names.append(BATCH_FIGURE)
    draw[BATCH_FIGURE] = lambda p: plot_batch_sharpness(
        runs, p, x_axis=x_axis, title=title
    )
  return [draw[name](os.path.join(out_dir, name)) for name in names]


def _plain_log(ax) -> None:
  """Log x and y; x labelled at 1, 2 and 5 times powers of ten (0.02, 5)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  def label(value: float, _) -> str:
    if value <= 0:
      return ""
    mantissa = value / 10 ** np.floor(np.log10(value))
    return f"{value:g}" if np.round(mantissa, 6) in (1.0, 2.0, 5.0) else ""

  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(label))
  ax.xaxis.set_minor_formatter(ticker.FuncFormatter(label))
  ax.tick_params(which="minor", labelsize=7)


def plot_edge_map(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    band: tuple[float, float] = SAM_RANGE,
    title: str | None = None,
) -> str:
  """The SAM-edge map: sharpness / SAM-edge against ``rho/||g||``, ``rho*S``.

  One point per SAM configuration and seed (``rho > 0``) of
  ``edge_map.csv`` (``edge_map.map_rows``): its window median of
  ``sharpness / sam_edge`` with the bootstrap 90% interval as an error bar,
  against the window medians of ``rho / ||g||`` (left) and ``rho *
  sharpness`` (right), log-log, one colour per step size ``eta``, the
  accepted band shaded and a line at 1. Diverged configurations are not
  placed (they have no window); the corner says how many.

  Args:
    rows: the map's rows (dicts with ``edge_map.MAP_COLUMNS``).
    path: the PNG to write.
    band: the accepted interval of the ratio (``claims.SAM_RANGE``).
    title: figure title.

  Returns:
    ``path`` as a string.

  References:
    Long & Bartlett 2023 (the SAM-edge).
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

  sam = [r for r in rows if r["rho"] > 0]
  etas = sorted({r["learning_rate"] for r in sam})
  cmap = colormaps["viridis"]
  colors = {
      eta: cmap(0.9 * i / max(len(etas) - 1, 1)) for i, eta in enumerate(etas)
  }
  fig, axes = _figure(2)
  placed = [
      r
      for r in sam
      if not r["diverged"]
      and np.isfinite(r["median_ratio"])
      and r["median_ratio"] > 0
  ]
  for ax, axis, name in zip(
      axes,
      ("median_rho_over_grad_norm", "median_rho_times_sharpness"),
      ("rho / ||g||", "rho * sharpness"),
  ):
    ax.axhspan(
        *band,
        color=SAM_COLORS[0],
        alpha=0.12,
        lw=0,
        zorder=0,
        label=f"SAM-edge holds: {band[0]:g}-{band[1]:g}",
    )
    ax.axhline(1.0, color="0.2", lw=0.8, zorder=1)
    for eta in etas:
      mine = [r for r in placed if r["learning_rate"] == eta]
      if not mine:
        continue
      x = np.array([r[axis] for r in mine])
      y = np.array([r["median_ratio"] for r in mine])
      low = np.array([r["ratio_low"] for r in mine])
      high = np.array([r["ratio_high"] for r in mine])
      ax.errorbar(
          x,
          y,
          yerr=np.vstack(
              [np.clip(y - low, 0, None), np.clip(high - y, 0, None)]
          ),
          fmt="o",
          ms=4,
          lw=0.8,
          capsize=2,
          color=colors[eta],
          label=f"eta = {eta:g}",
          zorder=3,
      )
    _plain_log(ax)
    ax.set_xlabel(f"{name} (median over the claim window)")
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  low, high = axes[0].get_ylim()
  ticks = [t for t in RATIO_TICKS if low <= t <= high]
  axes[0].yaxis.set_major_locator(ticker.FixedLocator(ticks))
  axes[0].yaxis.set_minor_locator(ticker.NullLocator())
  axes[0].yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  axes[0].set_ylabel("sharpness / SAM-edge (median, 90% CI)")
  diverged = [r for r in sam if r["diverged"]]
  note = f"{len(placed)} of {len(sam)} SAM runs placed" + (
      f"; {len(diverged)} diverged (not shown)" if diverged else ""
  )
  axes[1].text(
      0.98, 0.02, note, transform=axes[1].transAxes, ha="right", fontsize=8
  )
  _legend(fig, axes)
  return _save(fig, path, title)
