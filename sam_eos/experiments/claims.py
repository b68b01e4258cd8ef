"""The paper's claims, checked on a run's metrics.

For every configuration of a run, over the last third of its steps (after
the initial transient; the paper's figures show the same window settling):

- GD (``rho = 0``), Cohen et al. (2021): the sharpness hovers at ``2/eta``,
  so the median of ``sharpness / gd_edge = sharpness * eta / 2`` lies in
  ``GD_RANGE = [0.9, 1.1]``.
- SAM (``rho > 0``), Long & Bartlett (2023): the sharpness hovers at the
  SAM-edge ``lam_SAM(eta, rho, ||g||)``, so the median of
  ``sharpness / sam_edge`` lies in ``SAM_RANGE = [0.85, 1.15]`` (wider than
  GD's because ``||g||``, hence the edge, moves from step to step);
- and SAM operates well below GD's edge: the median of
  ``sharpness / gd_edge`` is below ``SAM_BELOW_GD = 0.8``. The SAM-edge is
  below ``2/eta`` by construction; 0.8 asks for a clear gap, not a
  rounding one (the paper's runs sit at 0.1-0.5 of ``2/eta``).

Before the claims, ``check_history(metrics, config)`` checks that a run's
history is what it should be: every column present and finite, one
configuration per entry of the sweep with a row every ``track_every``
steps, and the edge columns equal to their formulas.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Section 4.
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability", ICLR 2021.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Mapping

import numpy as np

from sam_eos.history import CONFIG_COLUMNS, HISTORY_COLUMNS

if TYPE_CHECKING:
  from sam_eos.experiments.presets import ExperimentConfig

GD_RANGE = (0.9, 1.1)
SAM_RANGE = (0.85, 1.15)
SAM_BELOW_GD = 0.8
TAIL_FRACTION = 1 / 3
# Relative tolerances of ``check_history``: the edges are computed in float32
# during training; metrics.csv and the returned history hold the same values.
_EDGE_RTOL = 1e-4
_HISTORY_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Claim:
  """One checked claim about one configuration.

  Attributes:
    name: ``"gd_at_edge"``, ``"sam_at_sam_edge"`` or ``"sam_below_gd_edge"``.
    config: the configuration index in ``metrics.csv``.
    learning_rate: its step size.
    rho: its SAM radius.
    seed: its seed.
    value: the measured median ratio.
    range: the accepted closed interval ``(low, high)``.
    passed: whether ``value`` lies in ``range``.
  """
  name: str
  config: int
  learning_rate: float
  rho: float
  seed: int
  value: float
  range: tuple[float, float]
  passed: bool

  def __str__(self) -> str:
    status = "PASS" if self.passed else "FAIL"
    what = {"gd_at_edge": "sharpness / (2/eta)",
            "sam_at_sam_edge": "sharpness / SAM-edge",
            "sam_below_gd_edge": "sharpness / (2/eta)"}[self.name]
    return (f"{status}  config {self.config} (eta={self.learning_rate:.4g}, "
            f"rho={self.rho:g}, seed={self.seed}): median {what} = "
            f"{self.value:.3f}, want [{self.range[0]:g}, {self.range[1]:g}]")


def split_configs(metrics: Mapping[str, np.ndarray]
                  ) -> dict[int, dict[str, np.ndarray]]:
  """The flat ``se.read_csv`` columns split by configuration.

  Args:
    metrics: dict column -> 1-D array, with a ``config`` column.

  Returns:
    Dict configuration index -> its columns, rows sorted by step.

  Raises:
    ValueError: if a required column is missing.
  """
  missing = {"config", "learning_rate", "rho", "seed", "step", "sharpness",
             "gd_edge", "sam_edge"} - set(metrics)
  if missing:
    raise ValueError(f"`metrics` lacks the columns {sorted(missing)}; pass "
                     "se.read_csv('RUN/metrics.csv').")
  out = {}
  for c in np.unique(metrics["config"]):
    mask = np.asarray(metrics["config"]) == c
    order = np.argsort(np.asarray(metrics["step"])[mask], kind="stable")
    out[int(c)] = {k: np.asarray(v)[mask][order] for k, v in metrics.items()}
  return out


def tail_median(rows: Mapping[str, np.ndarray], numerator: str,
                denominator: str, *, fraction: float = TAIL_FRACTION) -> float:
  """Median of ``numerator / denominator`` over the last ``fraction`` of steps.

  The window is the rows with ``step >= last_step * (1 - fraction)`` (at
  least one row). A NaN anywhere in the window gives NaN, which fails any
  claim.

  Args:
    rows: one configuration's columns (see ``split_configs``).
    numerator: column name, e.g. ``"sharpness"``.
    denominator: column name, e.g. ``"sam_edge"``.
    fraction: the window's share of the run, in ``(0, 1]``.

  Returns:
    The median ratio (NaN for an empty history).

  Examples:
    >>> import numpy as np
    >>> rows = {"step": np.arange(6), "a": np.array([9., 9, 9, 9, 2, 4]),
    ...         "b": np.full(6, 2.0)}
    >>> tail_median(rows, "a", "b")  # steps 4 and 5: ratios 1 and 2
    1.5
  """
  steps = np.asarray(rows["step"])
  if steps.size == 0:
    return float("nan")
  window = steps >= steps.max() * (1 - fraction)
  ratio = (np.asarray(rows[numerator], float)[window]
           / np.asarray(rows[denominator], float)[window])
  return float(np.median(ratio))


def _claim(name: str, config: int, rows: Mapping[str, np.ndarray],
           value: float, bounds: tuple[float, float]) -> Claim:
  return Claim(name=name, config=config,
               learning_rate=float(rows["learning_rate"][0]),
               rho=float(rows["rho"][0]), seed=int(rows["seed"][0]),
               value=value, range=bounds,
               passed=bool(bounds[0] <= value <= bounds[1]))


def check_claims(metrics: Mapping[str, np.ndarray], *,
                 fraction: float = TAIL_FRACTION) -> list[Claim]:
  """Checks the edge-of-stability claims on every configuration of a run.

  Args:
    metrics: the flat columns of a run's ``metrics.csv`` (``se.read_csv``).
    fraction: the share of the run at its end that is checked.

  Returns:
    One ``Claim`` per GD configuration (``gd_at_edge``) and two per SAM
    configuration (``sam_at_sam_edge``, ``sam_below_gd_edge``), by
    configuration index.

  Raises:
    ValueError: if ``metrics`` lacks a column or has no rows.

  Examples:
    >>> import numpy as np
    >>> metrics = {"config": np.zeros(3, int), "learning_rate": np.ones(3),
    ...            "rho": np.zeros(3), "seed": np.zeros(3, int),
    ...            "step": np.arange(3), "sharpness": np.array([1.0, 1.9, 2.0]),
    ...            "gd_edge": np.full(3, 2.0), "sam_edge": np.full(3, 2.0)}
    >>> [(c.name, round(c.value, 3), c.passed) for c in check_claims(metrics)]
    [('gd_at_edge', 1.0, True)]

  References:
    Cohen et al. 2021 (GD at ``2/eta``); Long & Bartlett 2023 (SAM at the
    SAM-edge, below ``2/eta``).
  """
  configs = split_configs(metrics)
  if not configs:
    raise ValueError("`metrics` has no rows: the run recorded nothing yet.")
  claims = []
  for c, rows in configs.items():
    gd_ratio = tail_median(rows, "sharpness", "gd_edge", fraction=fraction)
    if float(rows["rho"][0]) == 0:
      claims.append(_claim("gd_at_edge", c, rows, gd_ratio, GD_RANGE))
    else:
      sam_ratio = tail_median(rows, "sharpness", "sam_edge", fraction=fraction)
      claims.append(_claim("sam_at_sam_edge", c, rows, sam_ratio, SAM_RANGE))
      claims.append(_claim("sam_below_gd_edge", c, rows, gd_ratio,
                           (0.0, SAM_BELOW_GD)))
  return claims


def _edges(config: ExperimentConfig, rows: Mapping[str, np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
  """``(gd_edge, sam_edge)`` of one configuration's rows, in NumPy.

  ``c = 2 (1 + beta)``; ``gd_edge = c / eta``; the SAM-edge is the positive
  root of ``eta lam (1 + r lam) = c`` with ``r = rho / ||g||`` (SAM) or
  ``r = rho`` (USAM), written ``2c / (eta (1 + sqrt(1 + 4 c r / eta)))``,
  which is ``gd_edge`` at ``rho = 0`` and 0 at ``||g|| = 0``.
  """
  eta = np.asarray(rows["learning_rate"], float)
  rho = np.asarray(rows["rho"], float)
  grad_norm = np.asarray(rows["grad_norm"], float)
  c = 2 * (1 + config.momentum)
  if config.normalize:
    with np.errstate(divide="ignore", invalid="ignore"):
      r = np.where(rho > 0, rho / grad_norm, 0.0)
  else:
    r = rho
  return c / eta, 2 * c / (eta * (1 + np.sqrt(1 + 4 * c * r / eta)))


def check_history(metrics: Mapping[str, np.ndarray],
                  config: ExperimentConfig, *, complete: bool = False,
                  history: Mapping[str, np.ndarray] | None = None
                  ) -> dict[int, dict[str, np.ndarray]]:
  """Checks that a run's metrics are a sound history of ``config``'s sweep.

  Checks, in order:

  - every column of ``metrics.csv`` is present (``config``,
    ``learning_rate``, ``rho``, ``seed`` and ``se.HISTORY_COLUMNS``) and
    every value is finite;
  - there is one configuration per entry of the sweep (``runner.sweep``
    order: learning rate slowest, seed fastest), with its own step size,
    radius and seed;
  - each configuration has a row at steps ``0, track_every, 2 track_every,
    ...`` below ``num_steps``: all ``ceil(num_steps / track_every)`` of them
    if ``complete``, else a prefix (a run that diverged or was stopped);
  - ``gd_edge = 2 (1 + beta) / eta`` (``2/eta`` without momentum), and
    ``sam_edge`` is the SAM-edge at the recorded ``grad_norm``, recomputed
    in NumPy: ``||g|| / (2 rho) (sqrt(1 + 8 rho / (eta ||g||)) - 1)``
    without momentum (the USAM edge if not ``config.normalize``), and
    ``2/eta`` for GD;
  - if ``history`` is given, the rows equal it.

  Args:
    metrics: the flat columns of a run's ``metrics.csv`` (``se.read_csv``).
    config: the run's settings (``ExperimentConfig``).
    complete: require every tracked step (a run that finished).
    history: the history ``se.train`` returned for this run
      (``result.history``: column -> ``(num_configs, num_rows)``), to compare
      with the file.

  Returns:
    The rows of each configuration, as ``split_configs(metrics)``.

  Raises:
    ValueError: naming the first check that fails.

  Examples:
    >>> import numpy as np
    >>> from sam_eos.experiments.presets import get_experiment
    >>> config = get_experiment("quadratic").replace(
    ...     learning_rates=0.5, rhos=0.0, num_steps=30, track_every=10)
    >>> metrics = {"config": np.zeros(3, int), "learning_rate": np.full(3, 0.5),
    ...            "rho": np.zeros(3), "seed": np.zeros(3, int),
    ...            "step": np.array([0, 10, 20]), "gd_edge": np.full(3, 4.0),
    ...            "sam_edge": np.full(3, 4.0)}
    >>> for name in ("loss", "grad_norm", "sharpness", "grad_alignment",
    ...              "sam_grad_alignment", "wall_time"):
    ...   metrics[name] = np.ones(3)
    >>> runs = check_history(metrics, config, complete=True)
    >>> list(runs), runs[0]["step"].tolist()
    ([0], [0, 10, 20])
    >>> metrics["gd_edge"][2] = 3.0
    >>> check_history(metrics, config)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: config 0 (eta=0.5, rho=0): gd_edge is not ... at steps [20]...
  """
  missing = [c for c in CONFIG_COLUMNS + HISTORY_COLUMNS if c not in metrics]
  if missing:
    raise ValueError(f"`metrics` lacks the columns {missing}; pass "
                     "se.read_csv('RUN/metrics.csv').")
  bad = [c for c in CONFIG_COLUMNS + HISTORY_COLUMNS
         if not np.all(np.isfinite(np.asarray(metrics[c], float)))]
  if bad:
    raise ValueError(f"non-finite values in the columns {bad}.")
  runs = split_configs(metrics)
  sweep = list(itertools.product(config.learning_rates, config.rhos,
                                 config.seeds))
  if sorted(runs) != list(range(len(sweep))):
    raise ValueError(
        f"`metrics` holds the configurations {sorted(runs)}; {config.name} "
        f"({config.preset}) sweeps {len(sweep)}: "
        f"{list(range(len(sweep)))}.")
  steps = np.arange(0, config.num_steps, config.track_every)
  for c, rows in runs.items():
    eta, rho, seed = sweep[c]
    label = f"config {c} (eta={eta:g}, rho={rho:g})"
    for column, want in (("learning_rate", eta), ("rho", rho),
                         ("seed", seed)):
      if not np.allclose(rows[column], want, rtol=_HISTORY_RTOL, atol=0):
        raise ValueError(f"{label}: column {column} is not {want:g} "
                         f"throughout: {np.unique(rows[column])}.")
    num_rows = len(rows["step"])
    if complete and num_rows != len(steps):
      raise ValueError(
          f"{label}: {num_rows} rows, want ceil(num_steps / track_every) = "
          f"ceil({config.num_steps} / {config.track_every}) = {len(steps)} "
          "for a finished run.")
    if not np.array_equal(rows["step"], steps[:num_rows]):
      raise ValueError(
          f"{label}: rows at steps {rows['step'].tolist()}, want (a prefix "
          f"of) 0, {config.track_every}, 2 x {config.track_every}, ... below "
          f"num_steps = {config.num_steps}.")
    gd_edge, sam_edge = _edges(config, rows)
    for column, want, formula in (
        ("gd_edge", gd_edge, "2 (1 + beta) / eta"),
        ("sam_edge", sam_edge, "the SAM-edge at grad_norm")):
      off = ~np.isclose(rows[column], want, rtol=_EDGE_RTOL, atol=0)
      if np.any(off):
        raise ValueError(
            f"{label}: {column} is not {formula} at steps "
            f"{rows['step'][off].tolist()}: {rows[column][off][0]:g} instead "
            f"of {want[off][0]:g}.")
  if history is not None:
    for column in HISTORY_COLUMNS:
      want = np.asarray(history[column])
      want = want[None] if want.ndim == 1 else want  # a single run, squeezed
      for c, rows in runs.items():
        if not (want.shape[0] == len(runs)
                and want[c].shape == rows[column].shape
                and np.allclose(rows[column], want[c], rtol=_HISTORY_RTOL,
                                atol=0)):
          raise ValueError(f"config {c}: column {column} of `metrics` "
                           "differs from `history`.")
  return runs
