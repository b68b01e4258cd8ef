"""Where the SAM-edge holds: a map of sharpness / SAM-edge over (eta, rho).

``run_map(config, out_dir)`` trains every configuration of a grid
``learning_rates x rhos x seeds`` (GD, ``rho = 0``, is always part of it, for
``gd_ratio``) as vmapped ``se.train`` sweeps (``plan_programs``: on an
accelerator as few programs as its memory allows; on a CPU one program per
``(eta, rho)``, its seeds), and writes to ``out_dir``:

- ``metrics.csv``: every tracked row of every configuration (the format of
  ``sam-eos run``); ``config.json``: the settings, what the map changed
  relative to the preset, the programs, the divergence steps and the wall
  time;
- ``edge_map.csv``: one row per configuration and seed (``MAP_COLUMNS``):
  over the claim window of ``claims.py`` (the last ``TAIL_FRACTION`` of the
  steps, as ``sam_at_sam_edge`` uses) the median of ``sharpness /
  sam_edge`` (``median_ratio``) with its bootstrap 90% interval
  (``ratio_low``, ``ratio_high``, ``claims.bootstrap_interval``), the
  medians of the two dimensionless x-axes ``rho / ||g||`` and ``rho *
  sharpness``, the GD ratio ``sharpness / (2/eta)`` of the same ``eta`` and
  seed, and ``diverged`` (a configuration that diverged is kept, with the
  medians of its finite window rows, NaN if none);
- ``edge_map.png`` (``plots.plot_edge_map``) and ``edge_map.md``: the
  finding (``describe``): the range of ``rho / ||g||`` (and of ``rho *
  lambda``) in which the median ratio lies in ``claims.SAM_RANGE`` for every
  configuration and seed (``holding_range``), and what happens beyond it.

The maths: along an eigenvector with eigenvalue ``lam``, one SAM step
multiplies the error by ``1 - eta lam (1 + rho lam / ||g||)``; the SAM-edge
is the ``lam`` at which this is ``-1``. The model is exact on a quadratic
(``tests/test_two_cycle.py``); a network's Hessian changes over the
perturbation of length ``rho``, and ``rho / ||g||`` measures how far the
perturbation reaches compared with the step.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
  Bartlett, Long & Bousquet, "The Dynamics of Sharpness-Aware
  Minimization", JMLR 2023 (the 2-cycle on a quadratic).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

import sam_eos as se
from sam_eos import history as history_lib
from sam_eos.experiments import claims, presets, runner

BAND = claims.SAM_RANGE
MAP_COLUMNS = (
    "learning_rate",
    "rho",
    "seed",
    "median_ratio",
    "ratio_low",
    "ratio_high",
    "median_rho_over_grad_norm",
    "median_rho_times_sharpness",
    "gd_ratio",
    "diverged",
)
MAP_FILES = (
    "config.json",
    "metrics.csv",
    "edge_map.csv",
    "edge_map.png",
    "edge_map.md",
)
# Radii of a map by default: half decades around the paper's 0.01-1.
DEFAULT_RHOS = (0.01, 0.03, 0.1, 0.3, 1.0)
# Memory a configuration needs, estimated from one gradient's temporaries:
# a Hessian-vector product (forward over reverse) and SAM's two gradients
# keep about this many times as much, plus copies of the parameters
# (params, gradient, perturbed point, SAM gradient, optimizer state,
# Lanczos start) beside the Lanczos basis.
HVP_MEMORY_FACTOR = 3
PARAM_COPIES = 8
# Share of the device memory (of the host memory on a CPU) a program may fill.
MEMORY_SHARE = {"cpu": 0.25, "accelerator": 0.5}


@dataclasses.dataclass(frozen=True)
class MapDefaults:
  """The grid and run length of an experiment's default map.

  Attributes:
    learning_rates: step sizes of the grid.
    rhos: SAM radii of the grid (GD, ``rho = 0``, is added).
    num_steps: training steps (None: the preset's).
    track_every: tracking cadence (None: the preset's).
    sharpness_tol: the Lanczos stopping tolerance (None: the preset's).
  """

  learning_rates: tuple[float, ...]
  rhos: tuple[float, ...] = DEFAULT_RHOS
  num_steps: int | None = None
  track_every: int | None = None
  sharpness_tol: float | None = None


# The default map of mnist-mlp: 4 step sizes up to the cpu preset's 0.9
# (equally spaced), 5 radii and GD, 3 seeds: 72 configurations. 500 steps
# (the preset has 1,500) tracked every 10 (preset: 25) keep 17 points in the
# claim window. The map judges ratios against a 15% band, so it certifies
# sharpness to a relative residual of 1e-2 (preset: 1e-3): the Ritz value
# is then within 1% of an eigenvalue (|theta - lambda| <= ||r||).
MAP_DEFAULTS = {
    "mnist-mlp": MapDefaults(
        learning_rates=(0.3, 0.5, 0.7, 0.9),
        num_steps=500,
        track_every=10,
        sharpness_tol=1e-2,
    ),
}


def map_config(
    name: str,
    preset: str = "cpu",
    **overrides: Any,
) -> tuple[presets.ExperimentConfig, str]:
  """The experiment config of a map: the preset with the map's grid.

  The grid is ``MAP_DEFAULTS[name]`` (else the preset's step sizes and
  ``DEFAULT_RHOS``), GD (``rho = 0``) is always added, and ``overrides``
  (config fields, None ignored) replace any of it.

  Args:
    name: a registered experiment.
    preset: its preset the map starts from.
    **overrides: ``ExperimentConfig`` fields, e.g. ``learning_rates``,
      ``rhos``, ``seeds``, ``num_steps``; None values are ignored.

  Returns:
    ``(config, note)``: the config (``rhos`` sorted, starting with 0) and a
    sentence on what the map changed relative to the preset.

  Raises:
    ValueError: for an unknown experiment, preset or field, an invalid
      value, or an experiment whose optimizer is not SGD.

  Examples:
    >>> config, _ = map_config("mnist-mlp")
    >>> config.learning_rates, config.rhos, config.seeds, config.num_steps
    ((0.3, 0.5, 0.7, 0.9), (0.0, 0.01, 0.03, 0.1, 0.3, 1.0), (0, 1, 2), 500)
    >>> map_config("quadratic", rhos=(0.1, 0.05))[0].rhos
    (0.0, 0.05, 0.1)
  """
  base = presets.get_experiment(name, preset)
  defaults = MAP_DEFAULTS.get(name) or MapDefaults(base.learning_rates)
  fields = {
      "learning_rates": defaults.learning_rates,
      "rhos": defaults.rhos,
      "num_steps": defaults.num_steps or base.num_steps,
      "track_every": defaults.track_every or base.track_every,
      "sharpness_tol": defaults.sharpness_tol or base.sharpness_tol,
  }
  fields.update({k: v for k, v in overrides.items() if v is not None})
  rhos = presets._as_tuple(fields["rhos"])  # pylint: disable=protected-access
  fields["rhos"] = (0.0,) + tuple(sorted({float(r) for r in rhos if r != 0}))
  fields["learning_rates"] = tuple(
      sorted({float(v) for v in presets._as_tuple(fields["learning_rates"])})  # pylint: disable=protected-access
  )
  config = base.replace(**fields)
  if config.optimizer != "sgd":
    raise ValueError(
        f"{name!r} trains with optimizer {config.optimizer!r}; the map "
        "judges sharpness against the SAM-edge of gradient steps, so map an "
        "experiment with optimizer 'sgd'."
    )
  changed = [
      f"{k} {getattr(base, k)} -> {getattr(config, k)}"
      for k in (
          "num_steps",
          "track_every",
          "num_lanczos_iters",
          "sharpness_tol",
          "num_examples",
      )
      if getattr(base, k) != getattr(config, k)
  ]
  note = (
      f"the {preset} preset of {name} with the grid eta x rho x seeds; "
      + ("changed: " + "; ".join(changed) if changed else "steps unchanged")
      + "; no held-out evaluation (not used by the map)"
  )
  return config, note


def plan_programs(
    keys: Sequence[Any], max_configs: int, *, pack: bool = True
) -> list[list[int]]:
  """Groups a sweep's configurations into programs of at most ``max_configs``.

  Consecutive configurations with equal ``keys`` form a block (in
  ``runner.sweep`` order: one step size, or one ``(eta, rho)``'s seeds). A
  block stays in one program when it fits, else it is split. With ``pack``,
  whole blocks are packed into a program while it has room; without, every
  block is its own program.

  Why both: a vmapped program's tracking check lasts until its slowest
  member is certified (``krylov.eigenpairs`` with ``axis_name``). On an
  accelerator the members run in parallel, so fewer, larger programs win;
  on a CPU they run one after another, so every member pays for the
  slowest, and programs of alike members (one setting's seeds) win.

  Args:
    keys: per configuration, in sweep order, what a block shares.
    max_configs: the most configurations one program may hold (>= 1).
    pack: pack several blocks into one program.

  Returns:
    Lists of configuration indices, one per program, covering the sweep in
    order.

  Examples:
    >>> plan_programs([0.1] * 3 + [0.2] * 3 + [0.3] * 3, 6)
    [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    >>> plan_programs([0.1] * 3, 2)
    [[0, 1], [2]]
    >>> plan_programs([(0.1, 0.0)] * 2 + [(0.1, 0.05)] * 2, 4, pack=False)
    [[0, 1], [2, 3]]
  """
  max_configs = max(1, int(max_configs))
  blocks: list[list[int]] = []
  for c, key in enumerate(keys):
    if blocks and keys[blocks[-1][0]] == key:
      blocks[-1].append(c)
    else:
      blocks.append([c])
  programs: list[list[int]] = []
  for block in blocks:
    if pack and programs and len(programs[-1]) + len(block) <= max_configs:
      programs[-1].extend(block)
      continue
    for start in range(0, len(block), max_configs):
      programs.append(block[start : start + max_configs])
  return programs


def memory_budget(device: jax.Device | None = None) -> int:
  """Bytes one program may use: a share of the device's memory.

  Args:
    device: the device (default: the first).

  Returns:
    ``MEMORY_SHARE["accelerator"]`` of its ``bytes_limit`` where the device
    reports one, else ``MEMORY_SHARE["cpu"]`` of the host's memory.
  """
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"] * MEMORY_SHARE["accelerator"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(host * MEMORY_SHARE["cpu"])


def config_bytes(
    problem: runner.Problem, config: presets.ExperimentConfig
) -> int:
  """Estimated memory of one configuration of a vmapped sweep, in bytes.

  ``HVP_MEMORY_FACTOR`` times the temporaries of one compiled gradient (from
  XLA's memory analysis) plus ``PARAM_COPIES + num_lanczos_iters`` copies of
  the parameters. The data are shared by the configurations, not counted.

  Args:
    problem: the experiment's ``runner.Problem``.
    config: its settings (``batch_size``, ``num_lanczos_iters``).

  Returns:
    The estimate (at least the parameter copies).
  """
  one = jax.tree.map(lambda x: x[0], problem.params)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(one))
  batch = problem.data
  if config.batch_size is not None:
    batch = jax.tree.map(lambda x: x[: config.batch_size], batch)
  compiled = jax.jit(jax.grad(problem.loss_fn)).lower(one, batch).compile()
  stats = compiled.memory_analysis()
  temp = int(getattr(stats, "temp_size_in_bytes", 0) or 0)
  copies = PARAM_COPIES + config.num_lanczos_iters
  return HVP_MEMORY_FACTOR * temp + copies * param_bytes


class MapResult(NamedTuple):
  """What ``run_map`` wrote, as values.

  Attributes:
    rows: ``map_rows`` output, one dict per configuration.
    lines: the finding (``describe``).
    wall_time: seconds spent training (all programs).
    programs: the configuration indices of each program.
  """

  rows: list[dict[str, Any]]
  lines: list[str]
  wall_time: float
  programs: list[list[int]]


def _train_program(
    problem: runner.Problem,
    config: presets.ExperimentConfig,
    sweep: tuple[list[float], list[float], list[int]],
    members: list[int],
    progress: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One vmapped ``se.train`` over ``members``: ``(history, diverged_at)``.

  A program whose every configuration diverged keeps the rows recorded
  before (``se.TrainingDiverged.history``), padded with NaN.
  """
  learning_rates, rhos, seeds = sweep
  index = np.asarray(members)
  steps = np.arange(0, config.num_steps, config.track_every)
  members_of = lambda tree: jax.tree.map(lambda x: x[index], tree)
  options = runner.train_options(config, problem)
  options["model_state"] = members_of(options["model_state"])
  try:
    result = se.train(
        problem.loss_fn,
        members_of(problem.params),
        problem.data,
        learning_rate=[learning_rates[c] for c in members],
        rho=[rhos[c] for c in members],
        key=[seeds[c] for c in members],
        progress=progress,
        **options,
    )
    history = {k: np.atleast_2d(v) for k, v in result.history.items()}
    return history, np.atleast_1d(np.asarray(result.diverged_at))
  except se.TrainingDiverged as e:
    recorded = {k: np.atleast_2d(np.asarray(v)) for k, v in e.history.items()}
    history = {}
    for name, values in recorded.items():
      padded = np.full((len(members), steps.size), np.nan)
      padded[:, : values.shape[1]] = values
      history[name] = padded
    history["step"] = np.broadcast_to(steps, (len(members), steps.size)).copy()
    diverged_at = np.full(len(members), e.step)
    for c in range(len(members)):
      bad = ~np.isfinite(history["loss"][c])
      if bad.any():
        diverged_at[c] = int(steps[np.argmax(bad)])
    return history, diverged_at


def _window_medians(
    rows: Mapping[str, np.ndarray], window: np.ndarray, rho: float
) -> dict[str, float]:
  """Medians (and the ratio's bootstrap interval) over a config's window."""
  sharpness = np.asarray(rows["sharpness"], float)[window]
  ratio = sharpness / np.asarray(rows["sam_edge"], float)[window]
  grad_norm = np.asarray(rows["grad_norm"], float)[window]
  keep = np.isfinite(ratio) & np.isfinite(grad_norm) & (grad_norm > 0)
  if not keep.any():
    nan = float("nan")
    return dict.fromkeys(MAP_COLUMNS[3:8], nan)
  low, high = claims.bootstrap_interval(ratio[keep])
  return {
      "median_ratio": float(np.median(ratio[keep])),
      "ratio_low": low,
      "ratio_high": high,
      "median_rho_over_grad_norm": float(np.median(rho / grad_norm[keep])),
      "median_rho_times_sharpness": float(np.median(rho * sharpness[keep])),
  }


def map_rows(
    metrics: Mapping[str, np.ndarray],
    sweep: Sequence[tuple[float, float, int]],
    *,
    last_step: int,
    diverged_at: Sequence[int] | None = None,
    fraction: float = claims.TAIL_FRACTION,
) -> list[dict[str, Any]]:
  """One ``edge_map.csv`` row per configuration of a map's metrics.

  The window is the claim window of ``claims.tail_window``: the rows with
  ``step >= last_step * (1 - fraction)``, where ``last_step`` is the run's
  last tracked step (for a configuration that ran to the end, exactly the
  window of ``sam_at_sam_edge``). Every column is read by name, so extra
  history columns do not matter.

  Args:
    metrics: the flat columns of ``metrics.csv`` (``se.read_csv``).
    sweep: ``(learning_rate, rho, seed)`` of each configuration index.
    last_step: the last tracked step of a configuration that ran to the end.
    diverged_at: per configuration, the step it diverged at, -1 if finite;
      None: a configuration diverged iff its rows stop before ``last_step``.
    fraction: the window's share of the steps.

  Returns:
    Dicts with the keys ``MAP_COLUMNS``, in configuration order. For GD
    (``rho = 0``) ``median_ratio`` is ``sharpness / (2/eta)`` (the SAM-edge
    at ``rho = 0``) and the x-axes are 0. ``gd_ratio`` is the GD row's
    ``median_ratio`` of the same ``eta`` and seed (NaN without one).

  Examples:
    A SAM configuration whose sharpness sits at 1.1 x its edge:

    >>> import numpy as np
    >>> n = 9
    >>> metrics = {"config": np.zeros(n, int), "step": np.arange(n),
    ...            "learning_rate": np.ones(n), "rho": np.full(n, 0.1),
    ...            "seed": np.zeros(n, int), "gd_edge": np.full(n, 2.0),
    ...            "sharpness": np.full(n, 1.1), "sam_edge": np.ones(n),
    ...            "grad_norm": np.full(n, 0.5)}
    >>> row = map_rows(metrics, [(1.0, 0.1, 0)], last_step=8)[0]
    >>> row["median_ratio"], row["median_rho_over_grad_norm"], row["diverged"]
    (1.1, 0.2, False)
  """
  configs = claims.split_configs(metrics) if len(metrics["step"]) else {}
  out = []
  for c, (eta, rho, seed) in enumerate(sweep):
    rows = configs.get(c)
    if rows is None:
      values = dict.fromkeys(MAP_COLUMNS[3:8], float("nan"))
      stopped = True
    else:
      steps = np.asarray(rows["step"])
      window = steps >= last_step * (1 - fraction)
      values = _window_medians(rows, window, float(rho))
      if rho == 0:
        values["median_rho_over_grad_norm"] = 0.0
        values["median_rho_times_sharpness"] = 0.0
      stopped = int(steps.max()) < last_step
    diverged = (
        stopped if diverged_at is None else bool(int(diverged_at[c]) >= 0)
    )
    out.append(
        {
            "learning_rate": float(eta),
            "rho": float(rho),
            "seed": int(seed),
            **values,
            "gd_ratio": float("nan"),
            "diverged": diverged,
        }
    )
  gd = {
      (r["learning_rate"], r["seed"]): r["median_ratio"]
      for r in out
      if r["rho"] == 0
  }
  for r in out:
    r["gd_ratio"] = gd.get((r["learning_rate"], r["seed"]), float("nan"))
  return out


def write_map_csv(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
  """Writes ``edge_map.csv``: the header ``MAP_COLUMNS``, one line per row."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(MAP_COLUMNS)
    for row in rows:
      writer.writerow(
          [
              str(row[k]) if k in ("seed", "diverged") else repr(float(row[k]))
              for k in MAP_COLUMNS
          ]
      )


def read_map_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads ``edge_map.csv`` back into the dicts of ``map_rows``.

  Examples:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "edge_map.csv")
    >>> row = dict(learning_rate=0.5, rho=0.1, seed=2, median_ratio=1.0,
    ...            ratio_low=0.9, ratio_high=1.1, median_rho_over_grad_norm=2.0,
    ...            median_rho_times_sharpness=0.3, gd_ratio=float("nan"),
    ...            diverged=False)
    >>> write_map_csv(path, [row])
    >>> read_map_csv(path)[0]["seed"], read_map_csv(path)[0]["diverged"]
    (2, False)
  """
  with open(path, newline="") as f:
    lines = list(csv.DictReader(f))
  return [
      {
          k: (
              int(line[k])
              if k == "seed"
              else line[k] == "True"
              if k == "diverged"
              else float(line[k])
          )
          for k in MAP_COLUMNS
      }
      for line in lines
  ]


def _sam_points(rows: Sequence[Mapping]) -> list[Mapping]:
  return [r for r in rows if r["rho"] > 0]


def _inside(row: Mapping, band: tuple[float, float]) -> bool:
  return (not row["diverged"]) and band[0] <= row["median_ratio"] <= band[1]


def holding_range(
    rows: Sequence[Mapping],
    axis: str = "median_rho_over_grad_norm",
    band: tuple[float, float] = BAND,
) -> tuple[float, float, int]:
  """The widest interval of ``axis`` in which every SAM point holds.

  The SAM configurations (``rho > 0``) with a finite ``axis`` value are
  sorted by it; the longest run of consecutive points whose
  ``median_ratio`` lies in ``band`` and that did not diverge spans the
  interval. Every configuration and seed with ``axis`` inside it holds.

  Args:
    rows: ``map_rows`` output.
    axis: ``"median_rho_over_grad_norm"`` or
      ``"median_rho_times_sharpness"``.
    band: the accepted interval of the ratio.

  Returns:
    ``(low, high, count)``: the interval's ends (the smallest and largest
    ``axis`` of the run) and its number of points; ``(nan, nan, 0)`` if no
    point holds.

  Examples:
    >>> pts = [dict(rho=0.1, diverged=False, median_ratio=r, x=x)
    ...        for r, x in [(0.5, 0.1), (1.0, 0.2), (1.1, 0.4), (1.5, 0.8),
    ...                     (0.9, 1.6)]]
    >>> holding_range(pts, "x")
    (0.2, 0.4, 2)
  """
  points = sorted(
      (r for r in _sam_points(rows) if np.isfinite(r[axis])),
      key=lambda r: r[axis],
  )
  best, start = (0, 0), None
  for i, row in enumerate(points + [None]):
    if row is not None and _inside(row, band):
      start = i if start is None else start
      continue
    if start is not None and i - start > best[1] - best[0]:
      best = (start, i)
    start = None
  if best[1] == best[0]:
    return float("nan"), float("nan"), 0
  run = points[best[0] : best[1]]
  return float(run[0][axis]), float(run[-1][axis]), len(run)


def _beyond(
    points: Sequence[Mapping], band: tuple[float, float], axis: str
) -> str:
  """How the points outside the holding range behave, in words."""
  if not points:
    return "no points"
  finite = [p for p in points if not p["diverged"]]
  ratios = np.array([p["median_ratio"] for p in finite])
  x = np.array([p[axis] for p in points])
  parts = [f"{len(points)} points ({x.min():.3g}-{x.max():.3g})"]
  if finite:
    parts.append(
        f"median ratio {np.median(ratios):.3f} (range {ratios.min():.3f}-"
        f"{ratios.max():.3f}), {int(np.sum(ratios > band[1]))} above "
        f"{band[1]:g}, {int(np.sum(ratios < band[0]))} below {band[0]:g}, "
        f"{int(np.sum((ratios >= band[0]) & (ratios <= band[1])))} inside"
    )
  diverged = len(points) - len(finite)
  if diverged:
    parts.append(f"{diverged} diverged")
  return ", ".join(parts)


def describe(
    rows: Sequence[Mapping],
    *,
    band: tuple[float, float] = BAND,
    label: str = "",
) -> list[str]:
  """The map's finding, in words and numbers computed from ``rows``.

  Args:
    rows: ``map_rows`` output (or ``read_map_csv``).
    band: the accepted interval of sharpness / SAM-edge.
    label: what was mapped, for the first sentence.

  Returns:
    Lines: the finding paragraph (first line), then one line per axis
    beyond the range, the diverged configurations and GD's ratio per step
    size.
  """
  sam = _sam_points(rows)
  num_seeds = len({r["seed"] for r in rows})
  etas = sorted({r["learning_rate"] for r in rows})
  rhos = sorted({r["rho"] for r in sam})
  lines = []
  head = (
      f"{label + ': ' if label else ''}{len(etas)} step sizes x {len(rhos)} "
      f"radii x {num_seeds} seeds ({len(sam)} SAM runs). "
  )
  summary = []
  detail = []
  for axis, name in (
      ("median_rho_over_grad_norm", "rho/||g||"),
      ("median_rho_times_sharpness", "rho*lambda"),
  ):
    low, high, count = holding_range(rows, axis, band)
    if count == 0:
      summary.append(f"no {name} at which any SAM run holds")
      detail.append(f"By {name}: no SAM run within the band.")
      continue
    summary.append(
        f"{name} in [{low:.3g}, {high:.3g}] ({count} of {len(sam)} SAM runs)"
    )
    below = [p for p in sam if np.isfinite(p[axis]) and p[axis] < low]
    above = [p for p in sam if np.isfinite(p[axis]) and p[axis] > high]
    detail.append(
        f"By {name}: below {low:.3g}: {_beyond(below, band, axis)}; "
        f"above {high:.3g}: {_beyond(above, band, axis)}."
    )
  lines.append(
      head + "The median of sharpness / SAM-edge over the claim window (last "
      f"{claims.TAIL_FRACTION:.0%} of the steps) lies within "
      f"[{band[0]:g}, {band[1]:g}] for every run and seed with "
      + " and with ".join(summary)
      + "."
  )
  lines += detail
  by_rho = []
  for rho in rhos:
    values = [
        r["median_ratio"] for r in sam if r["rho"] == rho and not r["diverged"]
    ]
    by_rho.append(f"rho {rho:g}: {_nanmedian(values):.3f}")
  if by_rho:
    lines.append(
        "Median ratio per radius (over step sizes and seeds): "
        + "; ".join(by_rho)
        + "."
    )
  diverged = [r for r in sam if r["diverged"]]
  unplaced = [
      r
      for r in sam
      if not r["diverged"] and not np.isfinite(r["median_rho_over_grad_norm"])
  ]
  if diverged:
    settings = sorted({(r["learning_rate"], r["rho"]) for r in diverged})
    lines.append(
        f"Diverged: {len(diverged)} SAM runs, at (eta, rho) "
        + ", ".join(f"({e:g}, {r:g})" for e, r in settings)
        + "."
    )
  else:
    lines.append("Diverged: none of the SAM runs.")
  if unplaced:
    lines.append(f"{len(unplaced)} finite SAM runs had no window rows.")
  gd = [r for r in rows if r["rho"] == 0]
  if gd:
    parts = []
    for eta in etas:
      values = np.array(
          [r["median_ratio"] for r in gd if r["learning_rate"] == eta]
      )
      runs = [r for r in gd if r["learning_rate"] == eta]
      num_div = sum(r["diverged"] for r in runs)
      text = (
          f"eta {eta:g}: {_nanmedian(values):.3f}"
          if np.isfinite(values).any()
          else f"eta {eta:g}: -"
      )
      parts.append(text + (f" ({num_div} diverged)" if num_div else ""))
    lines.append(
        "GD for reference, median over seeds of sharpness / (2/eta): "
        + "; ".join(parts)
        + "."
    )
  return lines


def _nanmedian(values: Sequence[float]) -> float:
  """The median of the finite values, NaN if there are none."""
  finite = np.asarray(values, float)
  finite = finite[np.isfinite(finite)]
  return float(np.median(finite)) if finite.size else float("nan")


def markdown(
    rows: Sequence[Mapping], lines: Sequence[str], *, title: str
) -> str:
  """``edge_map.md``: the finding, then a table per (eta, rho) over seeds."""
  out = [f"# {title}", "", *[line + "\n" for line in lines], ""]
  out += [
      "| eta | rho | median S/edge per seed | rho/\\|\\|g\\|\\| (median) "
      "| rho*lambda (median) | GD S/(2/eta) | diverged |",
      "|---|---|---|---|---|---|---|",
  ]
  settings = sorted({(r["learning_rate"], r["rho"]) for r in rows})
  for eta, rho in settings:
    group = [r for r in rows if (r["learning_rate"], r["rho"]) == (eta, rho)]
    ratios = ", ".join(f"{r['median_ratio']:.3f}" for r in group)
    x = _nanmedian([r["median_rho_over_grad_norm"] for r in group])
    y = _nanmedian([r["median_rho_times_sharpness"] for r in group])
    gd = _nanmedian([r["gd_ratio"] for r in group])
    out.append(
        f"| {eta:g} | {rho:g} | {ratios} | {x:.3g} | {y:.3g} | {gd:.3f} | "
        f"{sum(r['diverged'] for r in group)} |"
    )
  return "\n".join(out) + "\n"


def write_report(
    out_dir: str | os.PathLike,
    rows: Sequence[Mapping],
    *,
    name: str,
    description: str,
) -> list[str]:
  """Writes ``edge_map.csv``, ``edge_map.md`` and ``edge_map.png`` of rows.

  Everything is computed from ``rows``, so a map's report can be redrawn
  from its ``edge_map.csv`` (``read_map_csv``) alone.

  Args:
    out_dir: the map's folder.
    rows: ``map_rows`` output.
    name: the experiment's name (titles).
    description: its one-line description (the finding's first words).

  Returns:
    The finding (``describe``).
  """
  from sam_eos.experiments import plots  # pylint: disable=g-import-not-at-top

  lines = describe(rows, label=f"{name} ({description})")
  write_map_csv(os.path.join(out_dir, "edge_map.csv"), rows)
  with open(os.path.join(out_dir, "edge_map.md"), "w") as f:
    f.write(markdown(rows, lines, title=f"Where the SAM-edge holds: {name}"))
  plots.plot_edge_map(
      rows,
      os.path.join(out_dir, "edge_map.png"),
      title=f"{name}: sharpness / SAM-edge over the claim window",
  )
  return lines


def _json_ready(config: presets.ExperimentConfig) -> dict[str, Any]:
  return json.loads(json.dumps(config.to_dict()))


def run_map(
    config: presets.ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    note: str = "",
    progress: bool = True,
    max_configs: int | None = None,
    pack: bool | None = None,
) -> MapResult:
  """Trains the map's grid and writes its files (``MAP_FILES``) to ``out_dir``.

  Args:
    config: the grid as an experiment (``map_config``): every
      ``learning_rates x rhos x seeds`` configuration is trained; ``rhos``
      should hold 0 (GD) for ``gd_ratio``.
    out_dir: the folder (created; the map's files in it are replaced).
    note: what the map changed relative to the preset, for ``config.json``.
    progress: show each program's progress bar.
    max_configs: the most configurations per program; None: as many as
      ``memory_budget()`` holds by ``config_bytes``.
    pack: pack step sizes into programs up to ``max_configs``
      (``plan_programs``); False: one program per ``(eta, rho)`` (its
      seeds); None: pack on an accelerator, not on a CPU.

  Returns:
    A ``MapResult``.

  Raises:
    ValueError: for data requests that cannot be met.
    data.DataUnavailableError: if the data are missing.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  problem = runner.build_problem(config)
  sweep = runner.sweep(config)
  if max_configs is None:
    max_configs = max(1, memory_budget() // config_bytes(problem, config))
  if pack is None:
    pack = jax.devices()[0].platform != "cpu"
  keys = sweep[0] if pack else list(zip(sweep[0], sweep[1]))
  programs = plan_programs(keys, max_configs, pack=pack)
  start, cpu_start = time.perf_counter(), time.process_time()
  parts = []
  for k, members in enumerate(programs):
    if progress:
      print(
          f"program {k + 1}/{len(programs)}: {len(members)} configurations",
          flush=True,
      )
    parts.append(_train_program(problem, config, sweep, members, progress))
  wall_time = time.perf_counter() - start
  cpu_time = time.process_time() - cpu_start
  names = list(parts[0][0])
  history = {n: np.concatenate([p[0][n] for p in parts]) for n in names}
  diverged_at = np.concatenate([p[1] for p in parts]).astype(int)
  configs = [
      {"learning_rate": e, "rho": r, "seed": s} for e, r, s in zip(*sweep)
  ]
  history_lib.write_csv(
      os.path.join(out_dir, "metrics.csv"), history, configs, diverged_at
  )
  metrics = history_lib.read_csv(os.path.join(out_dir, "metrics.csv"))
  last_step = (config.num_steps - 1) // config.track_every * config.track_every
  rows = map_rows(
      metrics, list(zip(*sweep)), last_step=last_step, diverged_at=diverged_at
  )
  lines = write_report(
      out_dir, rows, name=config.name, description=config.description
  )
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(
        {
            "metadata": _json_ready(config),
            "map": {
                "note": note,
                "claim_window": f"last {claims.TAIL_FRACTION:.4g} of the steps",
                "band": list(BAND),
                "programs": programs,
                "max_configs_per_program": int(max_configs),
                "packed": bool(pack),
                "diverged_at": diverged_at.tolist(),
                "wall_time_s": round(wall_time, 1),
                "cpu_time_s": round(cpu_time, 1),
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "versions": {"jax": jax.__version__, "numpy": np.__version__},
            },
        },
        f,
        indent=2,
    )
  return MapResult(rows, lines, wall_time, programs)
