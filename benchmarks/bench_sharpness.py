"""Sharpness estimation: sam_eos's Lanczos against the floor and the peers.

Problem: the benchmark MNIST MLP (784-256-256-10 ReLU, 269,322
parameters, the first 2,000 training images, ``mean((f(x) - y)^2)``) at
mid-training points of full-batch GD (eta = 1 from a Glorot init; steps 100,
150, 200), and a larger MLP (784-1024-1024-1024-10, 2,913,290 parameters,
same data, step 50 of GD at eta = 0.5). The reference is the top Hessian
eigenvalue by float64 Lanczos (exact float64 HVPs), with its residual bound.

Every method returns the top eigenvalue from a start vector. A cold start is
random (5 seeds at the last point); a warm start is the top eigenvector at
the parameters 10 GD steps earlier, which is what tracking during training
sees (every point). Times are medians of one call per start after one
untimed warm-up call, blocking on the result; compilation is excluded and
reported separately, except for the authors' protocol, whose re-jit at
every check is part of its cost and stays in its time.

Reported: (a) each method at its default settings and our iteration sweeps;
(b) at equal accuracy, the cheapest setting of each method whose relative
error is at most 1e-3 for every start; the floor (iterations x one HVP) and
HVP / gradient; the targets (>= 2x faster than every peer cold at equal
accuracy, >= 5x faster per check warm, within 1.3x of the floor).

Run: ``.venv/bin/python -m benchmarks.bench_sharpness [--quick]``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import sam_eos as se
from benchmarks import _common, _peers

PyTree = Any
Call = Callable[[int, "Point"], tuple[float, int]]

TARGET_ERROR = 1e-3
LOSS = _common.mse_loss
MAX_POWER_ITERS = 200  # cap of the power-iteration settings tighter than 1e-3
LANCZOS_GRID = (4, 6, 8, 10, 12, 14, 16, 20, 24, 30, 40)
WARM_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 20)
TOL_GRID = (1e-3, 1e-4, 1e-5, 1e-6)
LOBPCG_GRID = (2, 3, 4, 6, 8, 12, 16, 24)
EIGSH_GRID = tuple((ncv, 1e-3) for ncv in (4, 6, 8, 12, 16)) + (
    (None, 1e-3),
    (None, 0.0),
)
PEERS = ("authors", "eigsh", "lobpcg", "matfree", "pyhessian")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One benchmark model and how much of the study runs on it.

  Attributes:
    name: label in the tables.
    hidden: hidden widths of the MLP.
    num_examples: MNIST training examples (full batch).
    learning_rate: GD step size of the run that produces the points.
    steps: GD steps at which the points are taken (last: the cold point).
    gap: the warm start is the top eigenvector ``gap`` steps earlier.
    num_starts: random starts per cold measurement.
    ref_iters: float64 Lanczos iterations of the reference (warm-started).
    sweep: our Lanczos iteration counts in table (a), cold.
    warm_sweep: the same, warm.
    hvp_sweep: iteration counts of the re-linearizing (se.hvp) variant.
    search: run the equal-accuracy search (else table (a) only).
    skip: method keys left out on this model.
    max_grid: truncate every search grid to this many settings.
    warmup: one untimed call before timing (off where a call takes seconds;
      compilation is excluded either way).
    bookkeeping_iters: iteration counts of the bookkeeping-only timing.
  """

  name: str
  hidden: tuple[int, ...]
  num_examples: int
  learning_rate: float
  steps: tuple[int, ...]
  gap: int
  num_starts: int
  ref_iters: int
  sweep: tuple[int, ...]
  warm_sweep: tuple[int, ...]
  hvp_sweep: tuple[int, ...]
  search: bool
  skip: tuple[str, ...] = ()
  max_grid: int | None = None
  warmup: bool = True
  bookkeeping_iters: tuple[int, ...] = (10, 20)


FULL_SPECS = (
    ModelSpec(
        "cpu MLP 784-256-256-10",
        (256, 256),
        2000,
        1.0,
        (100, 150, 200),
        10,
        5,
        30,
        (4, 8, 12, 16, 20),
        (1, 2, 4, 8),
        (8, 16),
        True,
    ),
    ModelSpec(
        "large MLP 784-1024x3-10",
        (1024, 1024, 1024),
        2000,
        0.5,
        (50,),
        10,
        1,
        12,
        (8, 16),
        (2, 4),
        (16,),
        False,
        skip=("se_power",),
        warmup=False,
    ),
)
QUICK_SPECS = (
    ModelSpec(
        "quick MLP 784-16-10",
        (16,),
        128,
        1.0,
        (8,),
        4,
        1,
        12,
        (4,),
        (2,),
        (4,),
        True,
        max_grid=1,
        bookkeeping_iters=(4,),
    ),
)


@dataclasses.dataclass(frozen=True)
class Point:
  """A parameter point with its warm start and float64 reference.

  Attributes:
    step: GD step of ``params``.
    params: float32 parameters.
    warm: flat unit top eigenvector at the point ``gap`` steps earlier.
    reference: float64 top eigenvalue at ``params``.
    ritz: float64 Ritz values ``(lambda_1, lambda_2, lambda_min)``.
    residual: residual bound of the reference Ritz pair.
  """

  step: int
  params: PyTree
  warm: jax.Array
  reference: float
  ritz: tuple[float, float, float]
  residual: float


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model, its data and points; ``compiled`` caches shared programs."""

  spec: ModelSpec
  batch: Any
  points: tuple[Point, ...]
  num_params: int
  compiled: dict[str, tuple[Any, float]] = dataclasses.field(
      default_factory=dict, compare=False
  )


@dataclasses.dataclass(frozen=True)
class Method:
  """A sharpness estimator with a grid of accuracy settings.

  Attributes:
    name: label.
    unit: what ``work`` counts ("HVP" or "grad").
    default: the method's default setting.
    grid: settings from cheapest to most accurate, for the search.
    prepare: ``(problem, setting, warm) -> (call, compile seconds)``; a call
      ``(start index, point) -> (value, work)`` blocks on its result.
    fmt: setting -> label.
  """

  name: str
  unit: str
  default: Any
  grid: tuple[Any, ...]
  prepare: Callable[[Problem, Any, bool], tuple[Call, float]]
  fmt: Callable[[Any], str]


@dataclasses.dataclass(frozen=True)
class Row:
  """One (method, setting, start kind) measurement.

  ``complete`` is False when the search stopped at the first start whose
  error exceeded the target (then the statistics cover the starts run).
  """

  method: str
  setting: str
  start: str
  seconds: float
  compile: float
  work: float
  unit: str
  median_err: float
  max_err: float
  complete: bool


# ---------------------------------------------------------------- points --


def _top_vector(params: PyTree, batch: Any, num_iters: int) -> jax.Array:
  """Flat unit top eigenvector by float32 Lanczos (cold, key 123)."""
  out = jax.jit(
      lambda p, b: se.hessian_eigenpairs(
          LOSS, p, b, num_iters=num_iters, key=jax.random.key(123)
      )
  )(params, batch)
  vector = ravel_pytree(jax.tree.map(lambda x: x[0], out.vectors))[0]
  return vector / jnp.linalg.norm(vector)


def _reference(
    params: PyTree, batch: Any, start: jax.Array, num_iters: int
) -> tuple[tuple[float, float, float], float]:
  """Float64 Lanczos from ``start``: Ritz extremes and top residual."""
  with jax.enable_x64(True):
    p64 = _common.cast(params, jnp.float64)
    b64 = _common.cast(batch, jnp.float64)

    @jax.jit
    def run(p, b, v0):
      _, unravel = ravel_pytree(p)
      matvec = se.hessian_matvec(LOSS, p, b)
      return se.lanczos(
          lambda v: ravel_pytree(matvec(unravel(v)))[0], v0, num_iters
      )

    out = run(p64, b64, jnp.asarray(start, jnp.float64))
    values = np.asarray(out.ritz_values)
    return (
        (float(values[0]), float(values[1]), float(values[-1])),
        float(out.residuals[0]),
    )


def make_problem(spec: ModelSpec) -> Problem:
  """Trains to the spec's points; computes warm starts and references."""
  batch = _common.batch_of(spec.num_examples)
  params = _common.mlp_init(jax.random.key(0), _common.mlp_widths(spec.hidden))
  n = _common.num_params(params)
  warm_iters = min(40 if spec.search else 20, n)
  points, step = [], 0
  for target in spec.steps:
    previous = _common.gd_trajectory(
        params,
        batch,
        learning_rate=spec.learning_rate,
        num_steps=target - spec.gap - step,
    )
    params = _common.gd_trajectory(
        previous, batch, learning_rate=spec.learning_rate, num_steps=spec.gap
    )
    step = target
    warm = _top_vector(previous, batch, warm_iters)
    ritz, residual = _reference(params, batch, warm, spec.ref_iters)
    points.append(
        Point(
            step=target,
            params=params,
            warm=warm,
            reference=ritz[0],
            ritz=ritz,
            residual=residual,
        )
    )
  return Problem(spec=spec, batch=batch, points=tuple(points), num_params=n)


# --------------------------------------------------------------- methods --


def _compile(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _start_key(index: int) -> jax.Array:
  return jax.random.key(1000 + index)


def _ours(kind: str) -> Callable[[Problem, int, bool], tuple[Call, float]]:
  """sam_eos Lanczos: ``hessian_eigenpairs`` (linearized once) or on se.hvp."""

  def prepare(
      problem: Problem, num_iters: int, warm: bool
  ) -> tuple[Call, float]:
    point = problem.points[-1]
    flat, unravel = ravel_pytree(point.params)

    def estimate(params, batch, key, init):
      if kind == "matvec":
        return se.hessian_eigenpairs(
            LOSS,
            params,
            batch,
            num_iters=num_iters,
            key=key,
            init=None if init is None else unravel(init),
        ).values[0]
      matvec = lambda v: ravel_pytree(se.hvp(LOSS, params, batch, unravel(v)))[
          0
      ]
      v0 = (
          init
          if init is not None
          else jax.random.normal(key, flat.shape, flat.dtype)
      )
      return se.lanczos(matvec, v0, num_iters).ritz_values[0]

    compiled, seconds = _compile(
        estimate,
        point.params,
        problem.batch,
        _start_key(0),
        point.warm if warm else None,
    )

    def call(index: int, point: Point) -> tuple[float, int]:
      value = compiled(
          point.params,
          problem.batch,
          _start_key(index),
          point.warm if warm else None,
      )
      return float(value), num_iters

    return call, seconds

  return prepare


def _power_iters(tol: float) -> int:
  """The authors' 100 iterations at their tol, more for tighter ones."""
  return (
      _peers.AUTHORS_MAX_ITERS if tol >= _peers.AUTHORS_TOL else MAX_POWER_ITERS
  )


def _se_power(problem: Problem, tol: float, warm: bool) -> tuple[Call, float]:
  del warm
  fn = lambda p, b, key: se.power_iteration(
      LOSS, p, b, key=key, tol=tol, num_iters=_power_iters(tol)
  )
  point = problem.points[-1]
  compiled, seconds = _compile(fn, point.params, problem.batch, _start_key(0))

  def call(index: int, point: Point) -> tuple[float, int]:
    out = compiled(point.params, problem.batch, _start_key(index))
    return float(out.value), 2 * int(out.num_iters)

  return call, seconds


def _authors(problem: Problem, tol: float, warm: bool) -> tuple[Call, float]:
  del warm

  def call(index: int, point: Point) -> tuple[float, int]:
    out = _peers.authors_power_iteration(
        LOSS,
        point.params,
        problem.batch,
        _start_key(index),
        tol=tol,
        max_iters=_power_iters(tol),
    )
    return out.value, 2 * out.iterations

  return call, 0.0


def _eigsh(
    problem: Problem, setting: tuple[int | None, float], warm: bool
) -> tuple[Call, float]:
  del warm
  ncv, tol = setting
  point = problem.points[-1]
  flat = ravel_pytree(point.params)[0]
  if "hvp" not in problem.compiled:  # one HVP program for every setting
    problem.compiled["hvp"] = _compile(
        _peers.flat_hvp_fn(LOSS), point.params, problem.batch, flat
    )
  compiled, seconds = problem.compiled["hvp"]

  def call(index: int, point: Point) -> tuple[float, int]:
    v0 = np.random.default_rng(index).standard_normal(flat.size)
    return _peers.cohen_eigsh(
        compiled, point.params, problem.batch, v0, tol=tol, ncv=ncv
    )

  return call, seconds


def _lobpcg(
    problem: Problem, setting: tuple[int, float | None], warm: bool
) -> tuple[Call, float]:
  del warm
  num_iters, tol = setting
  point = problem.points[-1]
  x0 = lambda i: jax.random.normal(_start_key(i), (problem.num_params, 1))
  compiled, seconds = _compile(
      _peers.lobpcg_fn(LOSS, num_iters, tol), point.params, problem.batch, x0(0)
  )

  def call(index: int, point: Point) -> tuple[float, int]:
    value, iters = compiled(point.params, problem.batch, x0(index))
    # The initial A X, then per iteration a product with the 3-column block
    # [X, P, R] and one with the new X.
    return float(value), 4 * int(iters) + 1

  return call, seconds


def _matfree(
    problem: Problem, num_iters: int, warm: bool
) -> tuple[Call, float]:
  del warm
  point = problem.points[-1]
  v0 = lambda i: jax.random.normal(_start_key(i), (problem.num_params,))
  compiled, seconds = _compile(
      _peers.matfree_fn(LOSS, num_iters), point.params, problem.batch, v0(0)
  )

  def call(index: int, point: Point) -> tuple[float, int]:
    return float(compiled(point.params, problem.batch, v0(index))), num_iters

  return call, seconds


def _pyhessian(problem: Problem, tol: float, warm: bool) -> tuple[Call, float]:
  del warm
  data = _peers.torch_batch(problem.batch)
  models = {}

  def call(index: int, point: Point) -> tuple[float, int]:
    if point.step not in models:  # copying to PyTorch is not part of a check
      models[point.step] = _peers.torch_mlp(point.params)
    return _peers.pyhessian_power_iteration(
        models[point.step], data, index, tol=tol, max_iters=_power_iters(tol)
    )

  return call, 0.0


def _tol_label(tol: float) -> str:
  return f"tol {tol:g}, <= {_power_iters(tol)} it"


def _eigsh_label(setting: tuple[int | None, float]) -> str:
  ncv, tol = setting
  return ("ncv 20 (default)" if ncv is None else f"ncv {ncv}") + (
      ", tol 0 (default)" if tol == 0 else f", tol {tol:g}"
  )


def methods() -> dict[str, Method]:
  """Every estimator, ours first and PyTorch last; absent peers left out."""
  out = {
      "ours": Method(
          "sam_eos hessian_eigenpairs",
          "HVP",
          20,
          LANCZOS_GRID,
          _ours("matvec"),
          lambda m: f"{m} iters",
      ),
      "ours_hvp": Method(
          "sam_eos lanczos on se.hvp",
          "HVP",
          20,
          LANCZOS_GRID,
          _ours("hvp"),
          lambda m: f"{m} iters",
      ),
      "authors": Method(
          "authors' protocol (sam_edge)",
          "grad",
          1e-3,
          TOL_GRID,
          _authors,
          _tol_label,
      ),
      "se_power": Method(
          "se.power_iteration (same, jit once)",
          "grad",
          1e-3,
          TOL_GRID,
          _se_power,
          _tol_label,
      ),
      "eigsh": Method(
          "Cohen et al.: SciPy eigsh",
          "HVP",
          (None, 0.0),
          EIGSH_GRID,
          _eigsh,
          _eigsh_label,
      ),
      "lobpcg": Method(
          "jax lobpcg_standard",
          "HVP",
          (100, None),
          tuple((m, 0.0) for m in LOBPCG_GRID),
          _lobpcg,
          lambda s: f"m {s[0]}, tol " + ("default" if s[1] is None else "0"),
      ),
  }
  if _common.installed("matfree"):
    out["matfree"] = Method(
        "matfree eigh_partial(tridiag_sym)",
        "HVP",
        20,
        LANCZOS_GRID,
        _matfree,
        lambda m: f"{m} matvecs",
    )
  if _common.installed("torch"):
    impl = (
        f"pyhessian {_common.package_version('pyhessian')}"
        if _peers.uses_pyhessian_package()
        else "re-implementation"
    )
    out["pyhessian"] = Method(
        f"PyHessian eigenvalues() ({impl}, PyTorch)",
        "HVP",
        1e-3,
        TOL_GRID,
        _pyhessian,
        _tol_label,
    )
  return out


# ------------------------------------------------------------ evaluation --


def _starts(problem: Problem, warm: bool) -> list[tuple[int, Point]]:
  """(index, point) pairs: random seeds at the last point, or every point."""
  if warm:
    return list(enumerate(problem.points))
  return [(i, problem.points[-1]) for i in range(problem.spec.num_starts)]


class Evaluator:
  """Times methods on one problem, compiling each (method, setting) once."""

  def __init__(self, problem: Problem):
    self.problem = problem
    self._prepared: dict[tuple[str, Any, bool], tuple[Call, float]] = {}
    self._rows: dict[tuple[str, Any, bool], Row] = {}

  def evaluate(
      self,
      method: Method,
      setting: Any,
      warm: bool,
      *,
      stop_above: float | None = None,
  ) -> Row:
    """Times ``method`` at ``setting`` over the starts.

    With ``stop_above``, stops after the first start whose relative error
    exceeds it (the row is then incomplete).
    """
    key = (method.name, setting, warm)
    row = self._rows.get(key)
    if row is not None and (row.complete or stop_above is not None):
      return row
    fresh = key not in self._prepared
    if fresh:
      _common.log(
          f"sharpness: {method.name}, {method.fmt(setting)}, "
          f"{'warm' if warm else 'cold'}"
      )
      self._prepared[key] = method.prepare(self.problem, setting, warm)
    call, compile_s = self._prepared[key]
    starts = _starts(self.problem, warm)
    if fresh and self.problem.spec.warmup:
      call(*starts[0])  # untimed warm-up
    times, errors, works = [], [], []
    for index, point in starts:
      begin = time.perf_counter()
      value, work = call(index, point)
      times.append(time.perf_counter() - begin)
      errors.append(abs(value - point.reference) / abs(point.reference))
      works.append(work)
      if stop_above is not None and errors[-1] > stop_above:
        break
    row = Row(
        method=method.name,
        setting=method.fmt(setting),
        start="warm" if warm else "cold",
        seconds=statistics.median(times),
        compile=compile_s,
        work=float(np.median(works)),
        unit=method.unit,
        median_err=float(np.median(errors)),
        max_err=max(errors),
        complete=len(errors) == len(starts),
    )
    self._rows[key] = row
    return row

  def search(
      self, method: Method, warm: bool, grid: Sequence[Any] | None = None
  ) -> tuple[Row | None, Row]:
    """The cheapest setting with every start within ``TARGET_ERROR``.

    Returns:
      ``(found row or None, last row tried)``.
    """
    grid = tuple(grid or method.grid)[: self.problem.spec.max_grid]
    row = None
    for setting in grid:
      row = self.evaluate(method, setting, warm, stop_above=TARGET_ERROR)
      if row.complete and row.max_err <= TARGET_ERROR:
        return row, row
    return None, row


# ----------------------------------------------------------------- floor --


@dataclasses.dataclass(frozen=True)
class Floor:
  """Per-operation costs on one problem (seconds)."""

  grad: float
  hvp: float
  product: float
  bookkeeping: dict[int, float]
  authors_rejit: float
  torch_grad: float
  torch_hvp: float


def _marginal_product(
    params: PyTree, batch: Any, vector: jax.Array, repeats: int
) -> float:
  """Seconds of one more linearized HVP inside a compiled loop.

  ``(T(20 products) - T(10 products)) / 10`` for a ``fori_loop`` applying
  ``se.hessian_matvec`` (normalizing in between): the cost of a product once
  the forward pass is shared, i.e. Lanczos without its bookkeeping.
  """
  _, unravel = ravel_pytree(params)

  def products(p, b, v, count):
    matvec = se.hessian_matvec(LOSS, p, b)

    def body(_, x):
      y = ravel_pytree(matvec(unravel(x)))[0]
      return y / jnp.linalg.norm(y)

    return jax.lax.fori_loop(0, count, body, v)

  times = [
      _common.time_jit(
          lambda p, b, v: products(p, b, v, count),
          params,
          batch,
          vector,
          repeats=repeats,
      )[0].median
      for count in (10, 20)
  ]
  return max(times[1] - times[0], 0.0) / 10


def measure_floor(problem: Problem, repeats: int) -> Floor:
  """One gradient, one HVP, Lanczos bookkeeping, the authors' re-jit, torch."""
  _common.log(f"sharpness: floor of {problem.spec.name}")
  point = problem.points[-1]
  params, batch = point.params, problem.batch
  grad, _ = _common.time_jit(jax.grad(LOSS), params, batch, repeats=repeats)
  vector = jax.tree.map(jnp.ones_like, params)
  hvp, _ = _common.time_jit(
      lambda p, b, v: se.hvp(LOSS, p, b, v),
      params,
      batch,
      vector,
      repeats=repeats,
  )
  product = _marginal_product(params, batch, point.warm, repeats)
  scale = jnp.linspace(0.0, 1.0, problem.num_params)
  bookkeeping = {}
  for m in problem.spec.bookkeeping_iters:
    t, _ = _common.time_jit(
        lambda v, d: se.lanczos(lambda x: d * x, v, m).ritz_values[0],
        point.warm,
        scale,
        repeats=repeats,
    )
    bookkeeping[m] = t.median
  one_iteration = _common.time_host(
      lambda: _peers.authors_power_iteration(
          LOSS, params, batch, _start_key(0), max_iters=1
      ).value,
      repeats=min(repeats, 3),
  )
  torch_grad = torch_hvp = float("nan")
  if _common.installed("torch"):
    torch_grad, torch_hvp = _peers.torch_hvp_seconds(
        _peers.torch_mlp(params), _peers.torch_batch(batch), repeats
    )
  return Floor(
      grad=grad.median,
      hvp=hvp.median,
      product=product,
      bookkeeping=bookkeeping,
      authors_rejit=max(one_iteration.median - 2 * grad.median, 0.0),
      torch_grad=torch_grad,
      torch_hvp=torch_hvp,
  )


# ---------------------------------------------------------------- report --

ROW_HEADERS = [
    "method",
    "setting",
    "start",
    "time / check",
    "compile",
    "work (median)",
    "time / (work x HVP)",
    "median rel. err",
    "max rel. err",
]


def _row_cells(row: Row, floor: Floor) -> list[str]:
  hvps = row.work / 2 if row.unit == "grad" else row.work
  return [
      row.method,
      row.setting,
      row.start,
      _common.fmt_time(row.seconds),
      _common.fmt_time(row.compile) if row.compile else "-",
      f"{row.work:g} {row.unit}",
      f"{row.seconds / (hvps * floor.hvp):.2f}",
      _common.fmt_err(row.median_err),
      _common.fmt_err(row.max_err),
  ]


def _problem_text(problem: Problem, floor: Floor) -> str:
  spec = problem.spec
  rows = [
      [
          p.step,
          f"{p.reference:.6f}",
          f"{p.ritz[1]:.4f}",
          f"{p.ritz[2]:.4f}",
          f"{p.residual:.1e}",
      ]
      for p in problem.points
  ]
  book = ", ".join(
      f"{m} iters {_common.fmt_time(t)}" for m, t in floor.bookkeeping.items()
  )
  lines = [
      f"- {problem.num_params:,} parameters, {spec.num_examples:,} examples; "
      f"points of full-batch GD at eta = {spec.learning_rate:g} from a Glorot "
      f"init (seed 0); warm start = top eigenvector {spec.gap} steps earlier.",
      f"- one gradient {_common.fmt_time(floor.grad)}, one HVP (se.hvp) "
      f"{_common.fmt_time(floor.hvp)}: HVP / gradient = "
      f"{floor.hvp / floor.grad:.2f}; one more linearized product inside a "
      f"compiled loop (forward pass shared) "
      f"{_common.fmt_time(floor.product)} = "
      f"{floor.product / floor.grad:.2f} gradients.",
      f"- Lanczos bookkeeping alone (se.lanczos on a free diagonal matvec): "
      f"{book}.",
      f"- the authors' re-trace/re-jit per check: "
      f"{_common.fmt_time(floor.authors_rejit)} (a 1-iteration check minus "
      f"its two gradients).",
  ]
  if floor.torch_hvp == floor.torch_hvp:
    lines.append(
        f"- PyTorch on the same model: gradient "
        f"{_common.fmt_time(floor.torch_grad)}, HVP from scratch "
        f"(forward, create_graph backward, double backward) "
        f"{_common.fmt_time(floor.torch_hvp)}."
    )
  table = _common.markdown_table(
      [
          "GD step",
          "lambda_1 (float64)",
          "lambda_2 (Ritz)",
          "lambda_min (Ritz)",
          "residual bound",
      ],
      rows,
  )
  return "\n".join(lines) + "\n\n" + table + "\n"


def _table_a(
    problem: Problem,
    evaluator: Evaluator,
    table: dict[str, Method],
    floor: Floor,
) -> str:
  spec = problem.spec
  rows = []
  plan = (
      ("ours", spec.sweep, False),
      ("ours", spec.warm_sweep, True),
      ("ours_hvp", spec.hvp_sweep, False),
  )
  for key, sweep, warm in plan:
    if key in table:
      rows += [evaluator.evaluate(table[key], m, warm) for m in sweep]
  for key, method in table.items():
    if key not in ("ours", "ours_hvp"):
      rows.append(evaluator.evaluate(method, method.default, False))
  return "\n".join(
      [
          f"(a) Default settings; ours as iteration sweeps. Cold: "
          f"{spec.num_starts} random start(s) at step {problem.points[-1].step}; "
          f"warm: {len(problem.points)} point(s).\n",
          _common.markdown_table(
              ROW_HEADERS, [_row_cells(r, floor) for r in rows]
          ),
          "",
      ]
  )


def _table_b(
    problem: Problem,
    evaluator: Evaluator,
    table: dict[str, Method],
    floor: Floor,
) -> str:
  """Equal-accuracy search and the targets."""
  found: dict[str, Row | None] = {}
  tried: dict[str, Row] = {}
  for key in ("ours",) + PEERS:
    if key in table:
      found[key], tried[key] = evaluator.search(table[key], False)
  ours, _ = evaluator.search(table["ours"], True, WARM_GRID)
  ours_hvp = None
  if found.get("ours") is not None and "ours_hvp" in table:
    ours_hvp = evaluator.evaluate(
        table["ours_hvp"], int(found["ours"].work), False
    )
  rows = []
  for key, row in found.items():
    if row is None:
      last = tried[key]
      rows.append(
          [
              table[key].name,
              f"not reached (last tried: "
              f"{last.setting}, error {_common.fmt_err(last.max_err)})",
              "cold",
          ]
          + ["-"] * 8
      )
      continue
    rows.append(
        _row_cells(row, floor) + _speedups(row, found.get("ours"), ours)
    )
  for row in (ours_hvp, ours):
    if row is not None:
      rows.append(
          _row_cells(row, floor) + _speedups(row, found.get("ours"), ours)
      )
  spec = problem.spec
  return "\n".join(
      [
          f"(b) Equal accuracy: the cheapest setting with relative error <= "
          f"{TARGET_ERROR:g} for all {spec.num_starts} cold starts (warm: all "
          f"{len(problem.points)} points). se.power_iteration is the authors' "
          f"algorithm and is not searched.\n",
          _common.markdown_table(
              ROW_HEADERS + ["time / ours cold", "time / ours warm"], rows
          ),
          "",
          _targets(found, ours, floor),
          "",
      ]
  )


def _speedups(row: Row, cold: Row | None, warm: Row | None) -> list[str]:
  return [
      f"{row.seconds / cold.seconds:.1f}x" if cold else "-",
      f"{row.seconds / warm.seconds:.1f}x" if warm else "-",
  ]


def _targets(
    found: dict[str, Row | None], warm: Row | None, floor: Floor
) -> str:
  """The three targets of the issue, met or not, with numbers."""
  ours = found.get("ours")
  if ours is None:
    return "Targets: our Lanczos did not reach 1e-3 in its grid -> NOT met."
  peers = {k: r for k, r in found.items() if k != "ours"}
  reached = [r for r in peers.values() if r is not None]
  missing = sorted(k for k, r in peers.items() if r is None)
  lines = ["Targets (equal accuracy 1e-3):\n"]
  if reached:
    closest = min(reached, key=lambda r: r.seconds)
    ratio = closest.seconds / ours.seconds
    lines.append(
        f"- >= 2x faster than every peer, cold: the closest, "
        f"{closest.method}, takes {ratio:.1f}x our time -> "
        f"{_common.met(ratio >= 2)}."
    )
    if warm is not None:
      ratio_w = closest.seconds / warm.seconds
      lines.append(
          f"- >= 5x faster per check, warm-started: {ratio_w:.1f}x "
          f"faster than the closest peer's cold check -> "
          f"{_common.met(ratio_w >= 5)}."
      )
  if missing:
    lines.append(f"- never reached 1e-3 in their grids: {', '.join(missing)}.")
  floor_ratio = ours.seconds / (ours.work * floor.hvp)
  tight = ours.seconds / (ours.work * floor.product) if floor.product else 0
  lines.append(
      f"- within 1.3x of the floor ({ours.work:g} iterations x one "
      f"se.hvp = {_common.fmt_time(ours.work * floor.hvp)}): "
      f"{floor_ratio:.2f}x -> {_common.met(floor_ratio <= 1.3)}. "
      f"Inside a compiled loop XLA shares the forward pass, so the "
      f"tighter floor is {ours.work:g} linearized products = "
      f"{_common.fmt_time(ours.work * floor.product)}: {tight:.2f}x "
      "(the rest is Lanczos bookkeeping)."
  )
  return "\n".join(lines + _why_not(found, ours))


def _why_not(found: dict[str, Row | None], ours: Row) -> list[str]:
  """Why the cold 2x target fails, from the measured rows."""
  reached = {k: r for k, r in found.items() if k != "ours" and r is not None}
  slow = [k for k, r in reached.items() if r.seconds < 2 * ours.seconds]
  if not slow:
    return []
  others = ", ".join(
      f"{r.method} {r.seconds / ours.seconds:.1f}x"
      for k, r in reached.items()
      if k not in slow
  )
  why = []
  if "matfree" in slow:
    why.append(
        "matfree runs the same algorithm (Lanczos with full "
        "reorthogonalization) on the same linearized HVP (we hand it "
        "ours), so at equal accuracy it does the same number of "
        "products; only bookkeeping differs, which cannot make 2x."
    )
  rest = [k for k in slow if k != "matfree"]
  if rest:
    why.append(f"also within 2x: {', '.join(rest)}.")
  return [
      f"- why the 2x target fails: {' '.join(why)} Against the other "
      f"peers: {others or 'none reached'}. What would close it: nothing "
      "algorithmic against an equivalent Lanczos; restate the target "
      "against the protocols the edge-of-stability literature uses."
  ]


def study(
    spec: ModelSpec, repeats: int, only: Sequence[str] | None = None
) -> str:
  """All measurements on one model; returns its markdown subsection."""
  _common.log(f"sharpness: preparing {spec.name}")
  problem = make_problem(spec)
  floor = measure_floor(problem, repeats)
  table = {
      k: v
      for k, v in methods().items()
      if k not in spec.skip and (not only or k in only or k == "ours")
  }
  evaluator = Evaluator(problem)
  parts = [
      f"### {spec.name}\n",
      _problem_text(problem, floor),
      _table_a(problem, evaluator, table, floor),
  ]
  if spec.search:
    parts.append(_table_b(problem, evaluator, table, floor))
  return "\n".join(parts)


def run(
    quick: bool = False,
    repeats: int | None = None,
    only: Sequence[str] | None = None,
) -> str:
  """The markdown section of this benchmark."""
  warnings.filterwarnings("ignore", category=UserWarning)
  repeats = _common.default_repeats(quick, repeats)
  parts = [
      "## Sharpness estimation (bench_sharpness.py)\n",
      " ".join(__doc__.split("\n\n")[1:4]).replace("\n", " ") + "\n",
  ]
  missing = [
      name for name in ("matfree", "torch") if not _common.installed(name)
  ]
  if missing:
    parts.append(
        f"Not installed, skipped: {', '.join(missing)} "
        "(`pip install -e .[peers]`).\n"
    )
  for spec in QUICK_SPECS if quick else FULL_SPECS:
    parts.append(study(spec, repeats, only))
  return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument(
      "--only",
      nargs="*",
      default=None,
      help="method keys to run besides ours (ours_hvp, authors, "
      "se_power, eigsh, lobpcg, matfree, pyhessian)",
  )
  args = p.parse_args(argv)
  return _common.finish(run(args.quick, args.repeats, args.only), args.out)


if __name__ == "__main__":
  raise SystemExit(main())
