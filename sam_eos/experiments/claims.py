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

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Section 4.
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability", ICLR 2021.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

GD_RANGE = (0.9, 1.1)
SAM_RANGE = (0.85, 1.15)
SAM_BELOW_GD = 0.8
TAIL_FRACTION = 1 / 3


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
