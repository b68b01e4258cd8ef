"""The paper's claims, checked on a run's metrics, for every seed.

Every configuration of a run (one learning rate, radius and seed) is judged
on its own tracked points; a claim of a setting holds only if it holds for
every seed. The claims, named as in ``sam-eos check``:

- ``window_points``: the claim window (the last third of the steps, after
  the initial transient) holds at least ``MIN_WINDOW_POINTS = 20`` tracked
  points, so one point cannot flip a median.
- ``gd_sharpens`` (GD, ``rho = 0``): GD starts clearly below its edge, in
  the regime the paper is about: the median of ``sharpness / (2/eta)`` over
  the first ``START_FRACTION = 5%`` of the steps is at most
  ``GD_START_MAX = 0.8`` (Cohen et al.'s progressive sharpening).
- ``gd_at_edge`` (GD): the sharpness hovers at ``2/eta``: the window median
  of ``sharpness * eta / 2`` lies in ``GD_RANGE = [0.9, 1.1]``.
- ``gd_oscillates`` (GD): the edge-of-stability signature, not stable
  descent just below the edge: the gradient is aligned with the top
  eigenvector (window median of ``|cos(g, v1)|``, the claim's value, at
  least ``ALIGNMENT_MIN = 0.3``; a random direction gives
  ``~1/sqrt(#params)``), or the loss rises between two tracked points of the
  window at least once.
- ``sam_at_sam_edge`` (SAM, ``rho > 0``): the sharpness hovers at the
  SAM-edge ``lam_SAM(eta, rho, ||g||)``: the window median of
  ``sharpness / sam_edge`` lies in ``SAM_RANGE = [0.85, 1.15]`` (wider than
  GD's because ``||g||``, hence the edge, moves from step to step).
- ``sam_below_gd_edge`` (SAM): SAM operates well below GD's edge: the window
  median of ``sharpness / (2/eta)`` is below ``SAM_BELOW_GD = 0.8`` (the
  paper's runs sit at 0.1-0.5 of ``2/eta``).
- ``early_flattening`` (SAM, against GD of the same ``eta`` and seed): SAM
  moves to flat regions early, while the loss is still high: over the steps
  in ``EARLY_WINDOW = [5%, 10%]`` of training, the median of
  ``S_SAM / S_GD`` is below ``EARLY_SHARPNESS_MAX = 0.7`` while the median of
  ``loss_SAM / loss_GD`` is at least ``EARLY_LOSS_MIN = 0.5``.
- ``edge_tracking`` (SAM): where the SAM-edge moves by at least
  ``EDGE_MOVE_MIN = 1.5x`` after the first ``TRACKING_START = 10%`` of the
  steps, the sharpness follows it: the correlation of ``log sharpness`` and
  ``log sam_edge`` over those points is at least ``TRACKING_CORR_MIN =
  0.8``. Where the edge moves less, or the sharpness itself moves by less
  than ``FIXED_CURVATURE = 1.05x`` (a fixed Hessian, as on a quadratic,
  where the edge converges to the sharpness instead), the claim does not
  apply (``N/A``).
- ``adam_at_edge`` (runs with an Adam base, recognised by their
  ``preconditioned_sharpness`` column; ``rho = 0``): full-batch Adam's
  preconditioned sharpness ``lambda_max(P^{-1/2} H P^{-1/2})`` hovers at
  ``se.adam_edge(eta, ADAM_B1)`` (``38/eta``): its window median ratio lies in
  ``SAM_RANGE`` (Cohen et al. 2022). The GD and SAM claims above are about
  plain gradient steps and are not checked on Adam runs; SAM on top of Adam
  has no edge formula, so its ratio to Adam's edge is a finding
  (``findings``), not a claim.

``summarize`` groups the claims over seeds (median, seed range, and a
bootstrap 90% interval of the median over the pooled tracked points);
``findings`` reports what the claims' bands hide: the systematic offset of
SAM's sharpness above its edge, and points where the bottom Ritz value is
larger in magnitude than the top one (there the authors' ``|lambda|_max``
by power iteration is a negative eigenvalue, not our ``lambda_max``).

Before the claims, ``check_history(metrics, config)`` checks that a run's
history is what it should be: every column present and finite, one
configuration per entry of the sweep with a row every ``track_every``
steps, and the edge columns equal to their formulas.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Section 4.
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability", ICLR 2021.
  Cohen et al., "Adaptive Gradient Methods at the Edge of Stability",
  arXiv:2207.14484, 2022 (``adam_at_edge``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from sam_eos.history import CONFIG_COLUMNS, HISTORY_COLUMNS

if TYPE_CHECKING:
  from sam_eos.experiments.presets import ExperimentConfig

GD_RANGE = (0.9, 1.1)
SAM_RANGE = (0.85, 1.15)
SAM_BELOW_GD = 0.8
TAIL_FRACTION = 1 / 3
MIN_WINDOW_POINTS = 20
START_FRACTION = 0.05
GD_START_MAX = 0.8
ALIGNMENT_MIN = 0.3
EARLY_WINDOW = (0.05, 0.10)
EARLY_SHARPNESS_MAX = 0.7
EARLY_LOSS_MIN = 0.5
TRACKING_START = 0.10
EDGE_MOVE_MIN = 1.5
TRACKING_CORR_MIN = 0.8
FIXED_CURVATURE = 1.05
# Adam's first-moment decay in the registry's Adam runs (optax's default).
ADAM_B1 = 0.9
BOOTSTRAP_SAMPLES = 2000
# Relative tolerances of ``check_history``: the edges are computed in float32
# during training; metrics.csv and the returned history hold the same values.
_EDGE_RTOL = 1e-4
_HISTORY_RTOL = 1e-6
_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Claim:
  """One checked claim about one configuration.

  Attributes:
    name: the claim (see the module docstring), e.g. ``"gd_at_edge"``.
    config: the configuration index in ``metrics.csv``.
    learning_rate: its step size.
    rho: its SAM radius.
    seed: its seed.
    value: the measured statistic (a median ratio, a count, a correlation).
    range: the accepted closed interval ``(low, high)`` of ``value``.
    passed: whether the claim holds (True where it does not apply).
    samples: the per-point values ``value`` is the median of (for the
      bootstrap interval of ``summarize``); empty for other statistics.
    detail: what was measured, in words, for the report.
    applicable: False where the claim's premise is absent (``N/A``).
  """

  name: str
  config: int
  learning_rate: float
  rho: float
  seed: int
  value: float
  range: tuple[float, float]
  passed: bool
  samples: tuple[float, ...] = dataclasses.field(
      default=(), repr=False, compare=False
  )
  detail: str = ""
  applicable: bool = True

  @property
  def status(self) -> str:
    """``"PASS"``, ``"FAIL"`` or ``"N/A"``."""
    if not self.applicable:
      return "N/A"
    return "PASS" if self.passed else "FAIL"

  def __str__(self) -> str:
    return (
        f"{self.status:4}  {self.name:18} config {self.config} "
        f"(eta={self.learning_rate:.4g}, rho={self.rho:g}, "
        f"seed={self.seed}): {self.detail}"
    )


def split_configs(
    metrics: Mapping[str, np.ndarray],
) -> dict[int, dict[str, np.ndarray]]:
  """The flat ``se.read_csv`` columns split by configuration.

  Args:
    metrics: dict column -> 1-D array, with a ``config`` column.

  Returns:
    Dict configuration index -> its columns, rows sorted by step.

  Raises:
    ValueError: if a required column is missing.
  """
  missing = {
      "config",
      "learning_rate",
      "rho",
      "seed",
      "step",
      "sharpness",
      "gd_edge",
      "sam_edge",
  } - set(metrics)
  if missing:
    raise ValueError(
        f"`metrics` lacks the columns {sorted(missing)}; pass "
        "se.read_csv('RUN/metrics.csv')."
    )
  out = {}
  for c in np.unique(metrics["config"]):
    mask = np.asarray(metrics["config"]) == c
    order = np.argsort(np.asarray(metrics["step"])[mask], kind="stable")
    out[int(c)] = {k: np.asarray(v)[mask][order] for k, v in metrics.items()}
  return out


def tail_window(
    rows: Mapping[str, np.ndarray], *, fraction: float = TAIL_FRACTION
) -> np.ndarray:
  """Boolean mask of the rows with ``step >= last_step * (1 - fraction)``."""
  steps = np.asarray(rows["step"])
  if steps.size == 0:
    return np.zeros(0, bool)
  return steps >= steps.max() * (1 - fraction)


def tail_median(
    rows: Mapping[str, np.ndarray],
    numerator: str,
    denominator: str,
    *,
    fraction: float = TAIL_FRACTION,
) -> float:
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
  window = tail_window(rows, fraction=fraction)
  if not window.any():
    return float("nan")
  ratio = (
      np.asarray(rows[numerator], float)[window]
      / np.asarray(rows[denominator], float)[window]
  )
  return float(np.median(ratio))


def bootstrap_interval(
    samples: Sequence[float],
    *,
    level: float = 0.9,
    num_resamples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
  """Percentile bootstrap interval of the median of ``samples``.

  Args:
    samples: the values (e.g. a window's ratios); NaN gives a NaN interval.
    level: the interval's coverage, in ``(0, 1)``.
    num_resamples: bootstrap resamples (seeded, so reports are reproducible).
    seed: the resampling seed.

  Returns:
    ``(low, high)``; ``(nan, nan)`` for no samples.

  Examples:
    >>> low, high = bootstrap_interval([1.0, 1.0, 1.0])
    >>> low, high
    (1.0, 1.0)
  """
  x = np.asarray(samples, float)
  if x.size == 0 or not np.all(np.isfinite(x)):
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  medians = np.median(
      x[rng.integers(0, x.size, (num_resamples, x.size))], axis=1
  )
  tail = (1 - level) / 2
  return (
      float(np.quantile(medians, tail)),
      float(np.quantile(medians, 1 - tail)),
  )


def _claim(
    name: str,
    config: int,
    rows: Mapping[str, np.ndarray],
    value: float,
    bounds: tuple[float, float],
    detail: str,
    *,
    passed: bool | None = None,
    samples: np.ndarray | None = None,
    applicable: bool = True,
) -> Claim:
  if passed is None:
    passed = bool(bounds[0] <= value <= bounds[1])
  return Claim(
      name=name,
      config=config,
      learning_rate=float(rows["learning_rate"][0]),
      rho=float(rows["rho"][0]),
      seed=int(rows["seed"][0]),
      value=float(value),
      range=bounds,
      passed=bool(passed),
      samples=() if samples is None else tuple(map(float, samples)),
      detail=detail,
      applicable=applicable,
  )


def _ratio_claim(
    name: str,
    c: int,
    rows: Mapping[str, np.ndarray],
    window: np.ndarray,
    numerator: str,
    denominator: str,
    bounds: tuple[float, float],
    what: str,
) -> Claim:
  """A claim on the window median of ``numerator / denominator``."""
  ratios = (
      np.asarray(rows[numerator], float)[window]
      / np.asarray(rows[denominator], float)[window]
  )
  value = float(np.median(ratios)) if ratios.size else float("nan")
  shown = (
      f"[{bounds[0]:g}, {bounds[1]:g}]"
      if bounds[0] > 0
      else f"< {bounds[1]:g}"
      if bounds[1] < _INF
      else f">= {bounds[0]:g}"
  )
  return _claim(
      name,
      c,
      rows,
      value,
      bounds,
      f"median {what} = {value:.3f} over {ratios.size} points, "
      f"want {shown}",
      samples=ratios,
  )


def _gd_claims(
    c: int, rows: Mapping[str, np.ndarray], window: np.ndarray
) -> list[Claim]:
  """``gd_sharpens``, ``gd_at_edge`` and ``gd_oscillates`` of a GD run."""
  steps = np.asarray(rows["step"])
  start = steps <= steps.max() * START_FRACTION
  claims = [
      _ratio_claim(
          "gd_sharpens",
          c,
          rows,
          start,
          "sharpness",
          "gd_edge",
          (0.0, GD_START_MAX),
          "sharpness / (2/eta) at the start " f"(first {START_FRACTION:.0%})",
      ),
      _ratio_claim(
          "gd_at_edge",
          c,
          rows,
          window,
          "sharpness",
          "gd_edge",
          GD_RANGE,
          "sharpness / (2/eta)",
      ),
  ]
  loss = np.asarray(rows["loss"], float)[window]
  rises = int(np.sum(np.diff(loss) > 0))
  alignment = float(
      np.median(np.asarray(rows["grad_alignment"], float)[window])
  )
  claims.append(
      _claim(
          "gd_oscillates",
          c,
          rows,
          alignment,
          (ALIGNMENT_MIN, 1.0),
          f"median |cos(g, v1)| = {alignment:.3f} (want >= {ALIGNMENT_MIN:g}) "
          f"or a loss rise between window points ({rises} rises)",
          passed=rises >= 1 or alignment >= ALIGNMENT_MIN,
      )
  )
  return claims


def _early_flattening(
    c: int, rows: Mapping[str, np.ndarray], gd: Mapping[str, np.ndarray]
) -> Claim:
  """SAM's sharpness and loss against GD's early in training."""
  steps = np.asarray(rows["step"])
  low, high = (f * steps.max() for f in EARLY_WINDOW)
  early = (steps >= low) & (steps <= high)
  if not early.any():  # a coarse grid: the first point at or after 5%
    early = steps == steps[np.searchsorted(steps, low)]
  common = np.isin(steps, gd["step"]) & early
  gd_index = np.searchsorted(gd["step"], steps[common])
  sharp = (
      np.asarray(rows["sharpness"], float)[common]
      / np.asarray(gd["sharpness"], float)[gd_index]
  )
  loss = (
      np.asarray(rows["loss"], float)[common]
      / np.asarray(gd["loss"], float)[gd_index]
  )
  value = float(np.median(sharp)) if sharp.size else float("nan")
  loss_ratio = float(np.median(loss)) if loss.size else float("nan")
  return _claim(
      "early_flattening",
      c,
      rows,
      value,
      (0.0, EARLY_SHARPNESS_MAX),
      f"steps {int(steps[common].min()) if sharp.size else '-'}-"
      f"{int(steps[common].max()) if sharp.size else '-'}: median S_SAM/S_GD "
      f"= {value:.3f} (want < {EARLY_SHARPNESS_MAX:g}) while loss_SAM/loss_GD "
      f"= {loss_ratio:.3f} (want >= {EARLY_LOSS_MIN:g})",
      passed=value < EARLY_SHARPNESS_MAX and loss_ratio >= EARLY_LOSS_MIN,
      samples=sharp,
  )


def _edge_tracking(c: int, rows: Mapping[str, np.ndarray]) -> Claim:
  """Correlation of log sharpness and log SAM-edge where the edge moves."""
  steps = np.asarray(rows["step"])
  after = steps >= steps.max() * TRACKING_START
  edge = np.asarray(rows["sam_edge"], float)[after]
  sharp = np.asarray(rows["sharpness"], float)[after]
  move = float(edge.max() / edge.min()) if edge.size else float("nan")
  positive = sharp.size > 0 and bool(np.all(sharp > 0))
  spread = float(sharp.max() / sharp.min()) if positive else float("nan")
  premise = None
  if not move >= EDGE_MOVE_MIN:
    premise = (
        f"the SAM-edge moves only {move:.2f}x after {TRACKING_START:.0%} of "
        f"the steps (< {EDGE_MOVE_MIN:g}x)"
    )
  elif not spread >= FIXED_CURVATURE:
    premise = (
        f"the sharpness moves only {spread:.3f}x (a fixed curvature, as on "
        "a quadratic, or a non-positive value): the edge converges to it"
    )
  if premise is not None:
    return _claim(
        "edge_tracking",
        c,
        rows,
        float("nan"),
        (TRACKING_CORR_MIN, 1.0),
        premise,
        passed=True,
        applicable=False,
    )
  corr = float(np.corrcoef(np.log(sharp), np.log(edge))[0, 1])
  return _claim(
      "edge_tracking",
      c,
      rows,
      corr,
      (TRACKING_CORR_MIN, 1.0),
      f"the SAM-edge moves {move:.2f}x; corr(log S, log SAM-edge) "
      f"= {corr:.3f} over {edge.size} points, want >= "
      f"{TRACKING_CORR_MIN:g}",
  )


def with_adam_edge(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``rows`` with the column ``adam_edge = (2 + 2 b1) / (eta (1 - b1))``.

  Args:
    rows: one configuration's columns, with ``learning_rate``.

  Returns:
    A new dict: ``rows`` and ``adam_edge`` per row, with ``b1 = ADAM_B1``
    (``38 / eta``; Cohen et al. 2022, as ``se.adam_edge``).
  """
  eta = np.asarray(rows["learning_rate"], float)
  return {**rows, "adam_edge": (2 + 2 * ADAM_B1) / (eta * (1 - ADAM_B1))}


def _adam_claim(
    c: int, rows: Mapping[str, np.ndarray], window: np.ndarray
) -> Claim:
  """``adam_at_edge``: preconditioned sharpness / Adam's edge in the band."""
  return _ratio_claim(
      "adam_at_edge",
      c,
      with_adam_edge(rows),
      window,
      "preconditioned_sharpness",
      "adam_edge",
      SAM_RANGE,
      "preconditioned sharpness / adam_edge",
  )


def check_claims(
    metrics: Mapping[str, np.ndarray],
    *,
    fraction: float = TAIL_FRACTION,
    min_points: int = MIN_WINDOW_POINTS,
) -> list[Claim]:
  """Checks the edge-of-stability claims on every configuration of a run.

  Args:
    metrics: the flat columns of a run's ``metrics.csv`` (``se.read_csv``).
    fraction: the share of the run at its end that is the claim window.
    min_points: the fewest tracked points the window may hold.

  Returns:
    Per configuration, by index: ``window_points``, then for GD
    ``gd_sharpens``, ``gd_at_edge``, ``gd_oscillates``, for SAM
    ``sam_at_sam_edge``, ``sam_below_gd_edge``, ``edge_tracking`` and, when
    the run has GD at the same learning rate and seed, ``early_flattening``;
    for a run with ``preconditioned_sharpness`` (an Adam base), only
    ``adam_at_edge`` for ``rho = 0``.

  Raises:
    ValueError: if ``metrics`` lacks a column or has no rows.

  Examples:
    >>> import numpy as np
    >>> n = 30
    >>> metrics = {"config": np.zeros(n, int), "learning_rate": np.ones(n),
    ...            "rho": np.zeros(n), "seed": np.zeros(n, int),
    ...            "step": np.arange(n), "sharpness": np.linspace(1, 2, n),
    ...            "gd_edge": np.full(n, 2.0), "sam_edge": np.full(n, 2.0),
    ...            "loss": np.ones(n), "grad_alignment": np.full(n, 0.5)}
    >>> [(c.name, c.status) for c in check_claims(metrics, min_points=5)]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('window_points', 'PASS'), ('gd_sharpens', 'PASS'),
     ('gd_at_edge', 'PASS'), ('gd_oscillates', 'PASS')]

  References:
    Cohen et al. 2021 (GD at ``2/eta``); Long & Bartlett 2023 (SAM at the
    SAM-edge, below ``2/eta``, flat early, tracking the edge).
  """
  configs = split_configs(metrics)
  if not configs or not any(len(r["step"]) for r in configs.values()):
    raise ValueError("`metrics` has no rows: the run recorded nothing yet.")
  gd_runs = {
      (float(r["learning_rate"][0]), int(r["seed"][0])): r
      for r in configs.values()
      if float(r["rho"][0]) == 0
  }
  claims = []
  for c, rows in configs.items():
    window = tail_window(rows, fraction=fraction)
    count = int(window.sum())
    claims.append(
        _claim(
            "window_points",
            c,
            rows,
            count,
            (min_points, _INF),
            f"{count} tracked points in the last "
            f"{fraction:.0%} of the steps, want >= {min_points}",
        )
    )
    if "preconditioned_sharpness" in rows:
      if float(rows["rho"][0]) == 0:
        claims.append(_adam_claim(c, rows, window))
      continue
    if float(rows["rho"][0]) == 0:
      claims.extend(_gd_claims(c, rows, window))
      continue
    claims.append(
        _ratio_claim(
            "sam_at_sam_edge",
            c,
            rows,
            window,
            "sharpness",
            "sam_edge",
            SAM_RANGE,
            "sharpness / SAM-edge",
        )
    )
    claims.append(
        _ratio_claim(
            "sam_below_gd_edge",
            c,
            rows,
            window,
            "sharpness",
            "gd_edge",
            (0.0, SAM_BELOW_GD),
            "sharpness / (2/eta)",
        )
    )
    claims.append(_edge_tracking(c, rows))
    gd = gd_runs.get((float(rows["learning_rate"][0]), int(rows["seed"][0])))
    if gd is not None:
      claims.append(_early_flattening(c, rows, gd))
  return claims


def summarize(claims: Sequence[Claim]) -> list[str]:
  """One line per claim and setting (``eta``, ``rho``), over its seeds.

  Each line gives PASS only if every seed passes, the median of the seeds'
  values, their range, and for medians of per-point ratios a bootstrap 90%
  interval of the median over the seeds' pooled points.

  Args:
    claims: ``check_claims`` output.

  Returns:
    Printable lines.

  Examples:
    >>> mk = lambda seed, v: Claim("gd_at_edge", seed, 1.0, 0.0, seed, v,
    ...                            (0.9, 1.1), True, samples=(v, v))
    >>> summarize([mk(0, 1.0), mk(1, 1.02)])[1]
    'PASS  gd_at_edge         eta=1     rho=0     2 seeds: median 1.010, range [1.000, 1.020], 90% CI [1.000, 1.020]'
  """
  lines = [
      "status claim              setting           seeds: median over "
      "seeds, seed range, bootstrap 90% CI"
  ]
  groups: dict[tuple, list[Claim]] = {}
  for claim in claims:
    groups.setdefault((claim.name, claim.learning_rate, claim.rho), []).append(
        claim
    )
  for (name, eta, rho), group in groups.items():
    applicable = [c for c in group if c.applicable]
    if not applicable:
      lines.append(
          f"N/A   {name:18} eta={eta:<5.4g} rho={rho:<5g} "
          f"{len(group)} seeds: {group[0].detail}"
      )
      continue
    values = np.array([c.value for c in applicable])
    status = "PASS" if all(c.passed for c in group) else "FAIL"
    line = (
        f"{status:5} {name:18} eta={eta:<5.4g} rho={rho:<5g} "
        f"{len(group)} seeds: median {np.median(values):.3f}, range "
        f"[{values.min():.3f}, {values.max():.3f}]"
    )
    pooled = [x for c in applicable for x in c.samples]
    if pooled:
      low, high = bootstrap_interval(pooled)
      line += f", 90% CI [{low:.3f}, {high:.3f}]"
    lines.append(line)
  return lines


def findings(
    metrics: Mapping[str, np.ndarray], *, fraction: float = TAIL_FRACTION
) -> list[str]:
  """What the claims' bands do not show, in words.

  - SAM's offset from its edge: per setting, the median of ``sharpness /
    sam_edge`` over the pooled window points of its seeds, its bootstrap
    90% interval and the share of points above the edge.
  - Negative curvature: configurations with window points where the bottom
    Ritz value ``lambda_min`` exceeds the sharpness in magnitude.
  - Adam runs: per configuration (SAM on top of Adam included, which has
    no edge formula), the window median of preconditioned sharpness /
    ``adam_edge``.
  - Runs that record the batch sharpness: per setting, the window median of
    ``batch_sharpness / (2/eta)`` (GD) or ``batch_sharpness /
    batch_sam_edge`` (SAM) over the pooled points of its seeds, with its
    bootstrap 90% interval and the seeds' medians (Andreyev & Beneventano
    2024 find SGD's batch sharpness at ``2/eta``; no claim is made).

  Args:
    metrics: the flat columns of a run's ``metrics.csv``.
    fraction: the claim window's share of the run.

  Returns:
    Printable lines (empty if there is nothing to report).
  """
  lines = []
  settings: dict[tuple[float, float], list[np.ndarray]] = {}
  batch: dict[tuple[float, float], list[np.ndarray]] = {}
  for c, rows in split_configs(metrics).items():
    window = tail_window(rows, fraction=fraction)
    if "batch_sharpness" in rows:
      edge = "gd_edge" if float(rows["rho"][0]) == 0 else "batch_sam_edge"
      batch.setdefault(
          (float(rows["learning_rate"][0]), float(rows["rho"][0])), []
      ).append(
          np.asarray(rows["batch_sharpness"], float)[window]
          / np.asarray(rows[edge], float)[window]
      )
    if "preconditioned_sharpness" in rows:
      rows = with_adam_edge(rows)
      ratio = (
          np.asarray(rows["preconditioned_sharpness"], float)[window]
          / rows["adam_edge"][window]
      )
      lines.append(
          f"config {c} (Adam, eta={float(rows['learning_rate'][0]):.4g}, "
          f"rho={float(rows['rho'][0]):g}, seed {int(rows['seed'][0])}): "
          f"median preconditioned sharpness / adam_edge {np.median(ratio):.3f} "
          f"over {ratio.size} window points."
      )
    elif float(rows["rho"][0]) > 0:
      settings.setdefault(
          (float(rows["learning_rate"][0]), float(rows["rho"][0])), []
      ).append(
          np.asarray(rows["sharpness"], float)[window]
          / np.asarray(rows["sam_edge"], float)[window]
      )
    if "lambda_min" in rows:
      negative = (
          np.abs(np.asarray(rows["lambda_min"], float)[window])
          > np.asarray(rows["sharpness"], float)[window]
      )
      if negative.any():
        lines.append(
            f"config {c}: |lambda_min| > lambda_max at {int(negative.sum())} "
            f"of {int(window.sum())} window points: there the dominant "
            "eigenvalue |lambda| (the authors' power iteration) is negative."
        )
  for (eta, rho), parts in settings.items():
    pooled = np.concatenate(parts)
    low, high = bootstrap_interval(pooled)
    lines.append(
        f"SAM offset (eta={eta:.4g}, rho={rho:g}): median sharpness / "
        f"SAM-edge {np.median(pooled):.3f}, 90% CI [{low:.3f}, {high:.3f}]; "
        f"{np.mean(pooled > 1):.0%} of {pooled.size} window points lie above "
        "the edge."
    )
  for (eta, rho), parts in batch.items():
    pooled = np.concatenate(parts)
    low, high = bootstrap_interval(pooled)
    edge = "(2/eta)" if rho == 0 else "batch SAM-edge"
    seeds = ", ".join(f"{np.median(part):.3f}" for part in parts)
    lines.append(
        f"Batch sharpness (eta={eta:.4g}, rho={rho:g}): median batch "
        f"sharpness / {edge} {np.median(pooled):.3f}, 90% CI [{low:.3f}, "
        f"{high:.3f}] over {pooled.size} window points; per seed {seeds}."
    )
  return lines


def _edges(
    config: ExperimentConfig, rows: Mapping[str, np.ndarray]
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


def check_history(
    metrics: Mapping[str, np.ndarray],
    config: ExperimentConfig,
    *,
    complete: bool = False,
    history: Mapping[str, np.ndarray] | None = None,
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
    ...     learning_rates=0.5, rhos=0.0, seeds=0, num_steps=30, track_every=10)
    >>> metrics = {"config": np.zeros(3, int), "learning_rate": np.full(3, 0.5),
    ...            "rho": np.zeros(3), "seed": np.zeros(3, int),
    ...            "step": np.array([0, 10, 20]), "gd_edge": np.full(3, 4.0),
    ...            "sam_edge": np.full(3, 4.0)}
    >>> for name in ("loss", "grad_norm", "sharpness", "lambda_min",
    ...              "grad_alignment", "sam_grad_alignment", "lanczos_iters",
    ...              "sharpness_residual", "wall_time"):
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
    raise ValueError(
        f"`metrics` lacks the columns {missing}; pass "
        "se.read_csv('RUN/metrics.csv')."
    )
  bad = [
      c
      for c in CONFIG_COLUMNS + HISTORY_COLUMNS
      if not np.all(np.isfinite(np.asarray(metrics[c], float)))
  ]
  if bad:
    raise ValueError(f"non-finite values in the columns {bad}.")
  runs = split_configs(metrics)
  sweep = list(
      itertools.product(config.learning_rates, config.rhos, config.seeds)
  )
  if sorted(runs) != list(range(len(sweep))):
    raise ValueError(
        f"`metrics` holds the configurations {sorted(runs)}; {config.name} "
        f"({config.preset}) sweeps {len(sweep)}: "
        f"{list(range(len(sweep)))}."
    )
  steps = np.arange(0, config.num_steps, config.track_every)
  for c, rows in runs.items():
    eta, rho, seed = sweep[c]
    label = f"config {c} (eta={eta:g}, rho={rho:g})"
    for column, want in (("learning_rate", eta), ("rho", rho), ("seed", seed)):
      if not np.allclose(rows[column], want, rtol=_HISTORY_RTOL, atol=0):
        raise ValueError(
            f"{label}: column {column} is not {want:g} "
            f"throughout: {np.unique(rows[column])}."
        )
    num_rows = len(rows["step"])
    if complete and num_rows != len(steps):
      raise ValueError(
          f"{label}: {num_rows} rows, want ceil(num_steps / track_every) = "
          f"ceil({config.num_steps} / {config.track_every}) = {len(steps)} "
          "for a finished run."
      )
    if not np.array_equal(rows["step"], steps[:num_rows]):
      raise ValueError(
          f"{label}: rows at steps {rows['step'].tolist()}, want (a prefix "
          f"of) 0, {config.track_every}, 2 x {config.track_every}, ... below "
          f"num_steps = {config.num_steps}."
      )
    gd_edge, sam_edge = _edges(config, rows)
    for column, want, formula in (
        ("gd_edge", gd_edge, "2 (1 + beta) / eta"),
        ("sam_edge", sam_edge, "the SAM-edge at grad_norm"),
    ):
      off = ~np.isclose(rows[column], want, rtol=_EDGE_RTOL, atol=0)
      if np.any(off):
        raise ValueError(
            f"{label}: {column} is not {formula} at steps "
            f"{rows['step'][off].tolist()}: {rows[column][off][0]:g} instead "
            f"of {want[off][0]:g}."
        )
  if history is not None:
    for column in HISTORY_COLUMNS:
      want = np.asarray(history[column])
      want = want[None] if want.ndim == 1 else want  # a single run, squeezed
      for c, rows in runs.items():
        if not (
            want.shape[0] == len(runs)
            and want[c].shape == rows[column].shape
            and np.allclose(rows[column], want[c], rtol=_HISTORY_RTOL, atol=0)
        ):
          raise ValueError(
              f"config {c}: column {column} of `metrics` "
              "differs from `history`."
          )
  return runs
