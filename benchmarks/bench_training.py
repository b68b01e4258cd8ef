"""Training loop: tracking overhead, scan vs Python loop, the authors' loop.

Experiment: full-batch SAM (eta = 1, rho = 0.1) on the benchmark MNIST MLP
(784-256-256-10 ReLU, 269,322 parameters, first 2,000 training
images, ``mean((f(x) - y)^2)``) from a Glorot init, 200 steps, measuring
every 10 steps.

* Accuracy: ``se.train`` tracking with ``m`` warm-started Lanczos iterations
  is compared, check by check, with the same run tracked at 40 iterations
  (the reference; tracking does not change the trajectory, which the loss
  columns confirm). The smallest ``m`` of the grid whose warm checks (all
  but step 0, which starts cold) are all within 1e-3 is used below.
* (i) Tracking overhead: ``se.train`` with tracking every 10 steps at that
  ``m`` vs ``se.train`` with ``track_every > num_steps`` (only step 0 is
  measured). Target: overhead <= 70%.
* (ii) ``se.train``'s compiled ``lax.scan`` loop (tracking off as above) vs
  a Python loop of jitted SAM steps (``se.sam_gradient`` + ``optax.sgd``)
  doing the same work (plus one sharpness check at step 0, as ``se.train``
  does); also the scan core alone (``sam_eos.loop.run_chunk``, no driver).
  Target: the scan is never slower.
* (iii) The authors' loop style (github.com/google-deepmind/sam_edge,
  ``sam_edge.train``) on the same experiment, same steps and checks: a
  Python loop of a jitted update; at each check the gradient (``grad`` of
  the jitted loss, called eagerly), the SAM gradient, their power iteration
  re-jitted (``benchmarks/_peers.py``), alignments, loss and SAM-edge on
  the host. Their check cadence is in wall-clock hours; here it is every 10
  steps so that both do the same checks. Their printing and file writing
  are left out.

``se.train`` runs with ``progress=False`` and no ``out_dir``; its time
excludes tracing and compilation (summed from ``jax.monitoring`` events),
the Python loop and the core are compiled ahead of time, the authors'
helpers are warmed up once (their per-check re-jit stays in). Wall time per
step is the median over repeats, interleaved round robin so that load drifts
hit every variant alike (the authors' loop: one run).

Run: ``.venv/bin/python -m benchmarks.bench_training [--quick]``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_eos as se
from benchmarks import _common, _peers
from sam_eos import loop  # the pure core that se.train drives

PyTree = Any
LOSS = _common.mse_loss
TARGET_ERROR = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
  """Sizes of one run of this benchmark."""

  hidden: tuple[int, ...]
  num_examples: int
  num_steps: int
  track_every: int
  learning_rate: float
  rho: float
  lanczos_grid: tuple[int, ...]
  reference_iters: int


FULL = Case((256, 256), 2000, 200, 10, 1.0, 0.1, (4, 8, 12, 16, 20, 24, 30), 40)
QUICK = Case((16,), 128, 20, 5, 1.0, 0.1, (3,), 12)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  seconds: float  # per step, median over repeats
  checks: int
  repeats: int
  note: str


def train_once(
    case: Case,
    params: PyTree,
    batch: Any,
    *,
    track_every: int,
    num_lanczos_iters: int,
) -> tuple[float, dict[str, np.ndarray]]:
  """One ``se.train`` run: (seconds per step without compilation, history)."""
  compile_before = _common.compile_seconds()
  start = time.perf_counter()
  result = se.train(
      LOSS,
      params,
      batch,
      learning_rate=case.learning_rate,
      rho=case.rho,
      num_steps=case.num_steps,
      track_every=track_every,
      num_lanczos_iters=num_lanczos_iters,
      key=0,
      progress=False,
  )
  jax.block_until_ready(result.params)
  elapsed = time.perf_counter() - start
  compiled = _common.compile_seconds() - compile_before
  return (elapsed - compiled) / case.num_steps, result.history


@dataclasses.dataclass(frozen=True)
class Accuracy:
  num_iters: int
  median_err: float
  max_err: float
  first_err: float  # the cold check at step 0
  loss_diff: float  # max relative loss difference vs the reference run


def accuracy(
    case: Case,
    params: PyTree,
    batch: Any,
    num_iters: int,
    reference: dict[str, np.ndarray],
) -> Accuracy:
  """Tracked sharpness at ``num_iters`` vs the high-iteration reference run."""
  _, history = train_once(
      case,
      params,
      batch,
      track_every=case.track_every,
      num_lanczos_iters=num_iters,
  )
  errors = np.abs(history["sharpness"] - reference["sharpness"]) / np.abs(
      reference["sharpness"]
  )
  loss_diff = np.max(
      np.abs(history["loss"] - reference["loss"]) / np.abs(reference["loss"])
  )
  return Accuracy(
      num_iters=num_iters,
      median_err=float(np.median(errors[1:])),
      max_err=float(np.max(errors[1:])),
      first_err=float(errors[0]),
      loss_diff=float(loss_diff),
  )


def top_eigenvalues(params: PyTree, batch: Any, case: Case) -> np.ndarray:
  """The top 4 Hessian eigenvalues after the SAM run (how crowded the top is)."""
  final = se.train(
      LOSS,
      params,
      batch,
      learning_rate=case.learning_rate,
      rho=case.rho,
      num_steps=case.num_steps,
      track_every=case.num_steps + 1,
      num_lanczos_iters=2,
      key=0,
      progress=False,
  ).params
  out = jax.jit(
      lambda p: se.hessian_eigenpairs(
          LOSS, p, batch, k=4, num_iters=case.reference_iters
      )
  )(final)
  return np.asarray(out.values)


def python_loop(
    case: Case, params: PyTree, batch: Any, *, num_iters: int
) -> Callable[[], float]:
  """A Python loop of jitted SAM steps (+ one check at step 0), ready to time.

  Returns:
    A function that runs the ``num_steps`` once and returns seconds per step.
  """
  sgd = optax.sgd(case.learning_rate)

  def step(params, state):
    out = se.sam_gradient(LOSS, params, batch, rho=case.rho)
    updates, state = sgd.update(out.sam_grads, state, params)
    return optax.apply_updates(params, updates), state, out.loss

  state = sgd.init(params)
  compiled = jax.jit(step).lower(params, state).compile()
  check = (
      jax.jit(lambda p: se.sharpness(LOSS, p, batch, num_iters=num_iters))
      .lower(params)
      .compile()
  )
  jax.block_until_ready((compiled(params, state), check(params)))

  def once() -> float:
    p, s = params, state
    start = time.perf_counter()
    check(p)
    for _ in range(case.num_steps):
      p, s, _ = compiled(p, s)
    jax.block_until_ready(p)
    return (time.perf_counter() - start) / case.num_steps

  return once


def scan_core(
    case: Case, params: PyTree, batch: Any, *, num_iters: int
) -> Callable[[], float]:
  """The compiled core alone (``sam_eos.loop.run_chunk``), ready to time.

  The same ``lax.scan`` program ``se.train`` runs (unvmapped here), tracking
  only step 0, without the driver's host work (argument checks, state
  initialization, moving histories to the host).

  Returns:
    A function that runs the ``num_steps`` once and returns seconds per step.
  """
  config = loop.LoopConfig(
      loss_fn=LOSS, track_every=case.num_steps + 1, num_lanczos_iters=num_iters
  )
  hparams = loop.Hyperparams(
      learning_rate=jnp.float32(case.learning_rate), rho=jnp.float32(case.rho)
  )
  state = loop.init_state(config, params, hparams, jax.random.key(0))
  args = (state, batch, hparams, jnp.int32(0), jnp.int32(case.num_steps))
  fn = lambda s, d, h, a, b: loop.run_chunk(
      config, s, d, None, h, a, b, case.num_steps
  )
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))

  def once() -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / case.num_steps

  return once


def _tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def authors_loop(case: Case, params: PyTree, batch: Any) -> float:
  """Seconds per step of the authors' training loop style (one run)."""
  x, y = batch
  rho, eta = case.rho, case.learning_rate

  @jax.jit
  def loss_by_params(params, x, y):
    return LOSS(params, (x, y))

  @jax.jit
  def sam_neighbor(params, x, y):
    grads = jax.grad(loss_by_params)(params, x, y)
    norm = _tree_norm(grads)
    return jax.tree.map(lambda p, g: p + rho * g / (norm + 1e-5), params, grads)

  @jax.jit
  def update(params, x, y):
    grads = jax.grad(loss_by_params)(sam_neighbor(params, x, y), x, y)
    return jax.tree.map(lambda p, g: p - eta * g, params, grads)

  @jax.jit
  def get_sam_gradient(params, x, y):
    return jax.grad(loss_by_params)(sam_neighbor(params, x, y), x, y)

  @jax.jit
  def alignment(s, t):
    dot = sum(
        jnp.sum(a * b) for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(t))
    )
    return jnp.abs(dot) / (_tree_norm(s) * _tree_norm(t))

  def check(params, key):
    gradient = jax.grad(loss_by_params)(params, x, y)
    sam_gradient = get_sam_gradient(params, x, y)
    estimate = _peers.authors_power_iteration(LOSS, params, batch, key)
    g_align = float(alignment(gradient, estimate.vector))
    sg_align = float(alignment(sam_gradient, estimate.vector))
    grad_norm = float(_tree_norm(gradient))
    loss = float(loss_by_params(params, x, y))
    sam_edge = (grad_norm / (2 * rho)) * (
        math.sqrt(1 + 8 * rho / (eta * grad_norm)) - 1
    )
    return estimate.value, sam_edge, g_align, sg_align, loss

  key = jax.random.key(0)
  check(params, key)  # warm-up of the helpers (not of the per-check re-jit)
  jax.block_until_ready(update(params, x, y))
  start = time.perf_counter()
  for t in range(case.num_steps):
    if t % case.track_every == 0:
      key, sub = jax.random.split(key)
      check(params, sub)
    params = update(params, x, y)
  jax.block_until_ready(params)
  return (time.perf_counter() - start) / case.num_steps


def run(quick: bool = False, repeats: int | None = None) -> str:
  """The markdown section of this benchmark."""
  repeats = _common.default_repeats(quick, repeats)
  repeats = min(repeats, 3)  # each repeat is a whole training run
  case = QUICK if quick else FULL
  batch = _common.batch_of(case.num_examples)
  params = _common.mlp_init(jax.random.key(0), _common.mlp_widths(case.hidden))
  num_checks = math.ceil(case.num_steps / case.track_every)

  _common.log("training: reference run")
  _, reference = train_once(
      case,
      params,
      batch,
      track_every=case.track_every,
      num_lanczos_iters=case.reference_iters,
  )
  results = []
  for m in case.lanczos_grid:
    _common.log(f"training: tracked run, {m} Lanczos iterations")
    result = accuracy(case, params, batch, m, reference)
    results.append(result)
    if result.max_err <= TARGET_ERROR:
      break
  chosen = next((a for a in results if a.max_err <= TARGET_ERROR), results[-1])
  m = chosen.num_iters

  _common.log("training: timing, round robin")
  timers = {
      "tracked": lambda: train_once(
          case, params, batch, track_every=case.track_every, num_lanczos_iters=m
      )[0],
      "untracked": lambda: train_once(
          case,
          params,
          batch,
          track_every=case.num_steps + 1,
          num_lanczos_iters=m,
      )[0],
      "core": scan_core(case, params, batch, num_iters=m),
      "python": python_loop(case, params, batch, num_iters=m),
  }
  samples = {name: [] for name in timers}
  for _ in range(repeats):
    for name, timer in timers.items():
      samples[name].append(timer())
  tracked, untracked, core, python = (
      statistics.median(samples[name]) for name in timers
  )
  _common.log("training: the authors' loop")
  authors = authors_loop(case, params, batch)
  runs = [
      Run(
          f"se.train, tracking every {case.track_every} ({m} warm Lanczos "
          "iters)",
          tracked,
          num_checks,
          repeats,
          "lax.scan, in-graph checks",
      ),
      Run(
          "se.train, tracking off (step 0 only)",
          untracked,
          1,
          repeats,
          "lax.scan",
      ),
      Run(
          "its lax.scan core alone (sam_eos.loop.run_chunk)",
          core,
          1,
          repeats,
          "one compiled call, no driver",
      ),
      Run(
          "Python loop of jitted SAM steps (+ check at step 0)",
          python,
          1,
          repeats,
          "se.sam_gradient + optax.sgd, one call per step",
      ),
      Run(
          f"authors' loop style, check every {case.track_every}",
          authors,
          num_checks,
          1,
          "power iteration (tol 1e-3, <= 100 it) re-jitted " "per check",
      ),
  ]
  overhead = tracked / untracked - 1
  check_cost = (tracked - untracked) * case.track_every
  acc_rows = [
      [
          a.num_iters,
          _common.fmt_err(a.median_err),
          _common.fmt_err(a.max_err),
          _common.fmt_err(a.first_err),
          f"{a.loss_diff:.1e}",
      ]
      for a in results
  ]
  run_rows = [
      [
          r.name,
          _common.fmt_time(r.seconds),
          f"{r.seconds / untracked:.2f}",
          r.checks,
          r.repeats,
          r.note,
      ]
      for r in runs
  ]
  accuracy_note = (
      f"{m} iterations reach {TARGET_ERROR:g} on every warm check"
      if chosen.max_err <= TARGET_ERROR
      else f"no tried iteration count reached {TARGET_ERROR:g}; " f"{m} is used"
  )
  targets = [
      f"- (i) tracking overhead <= 70%: {overhead:.0%} -> "
      f"{_common.met(overhead <= 0.70)}.",
      f"- (ii) the scan loop never slower than the Python loop: scan core "
      f"{_common.fmt_time(core)} vs loop {_common.fmt_time(python)} per step "
      f"({core / python:.2f}x) -> {_common.met(core <= python)}; se.train "
      f"end to end {_common.fmt_time(untracked)} ({untracked / python:.2f}x), "
      + (
          f"its driver adding "
          f"{_common.fmt_time((untracked - core) * case.num_steps)} per call "
          "(argument checks, state init, history to host)."
          if untracked > core
          else "its driver's cost per call (argument checks, state init, history "
          "to host) is below the timing noise."
      ),
      f"- (iii) authors' loop style / se.train with tracking: "
      f"{authors / tracked:.1f}x per step.",
  ]
  if overhead > 0.70:
    top = top_eigenvalues(params, batch, case)
    cheap = next((a for a in results if a.median_err <= TARGET_ERROR), None)
    targets.append(
        f"- why (i) fails: a check costs {_common.fmt_time(check_cost)} = "
        f"{check_cost / untracked:.1f} SAM steps ({m} linearized products, "
        f"each about a gradient, plus Lanczos bookkeeping), spread over "
        f"{case.track_every} steps. Under SAM the top of the spectrum is "
        f"crowded (top 4 eigenvalues after the run: "
        f"{', '.join(f'{v:.4f}' for v in top)}), so the previous top "
        f"eigenvector is a poor start whenever the order changes: "
        + (
            f"{cheap.num_iters} warm iterations already give a median error "
            f"of {_common.fmt_err(cheap.median_err)} but a worst check of "
            f"{_common.fmt_err(cheap.max_err)}. "
            if cheap
            else ""
        )
        + "Tried and rejected (2026-11-25): starting each check from the "
        "unit sum of the previous top 4 Ritz vectors, a one-vector stand-in "
        "for a block restart, was worse (median 3.3e-02 at 4 iterations, "
        "worst 7.5e-03 at 16). The floor for 70% is 10 steps x 2 gradients "
        "x 0.7 = 14 gradients per check, about 11 linearized products, "
        "fewer than a cold start needs for 1e-3 (14, see the sharpness "
        "section) whenever a new direction takes over the top of the "
        "spectrum. What could close it: block Lanczos warm-started from "
        "the top Ritz subspace, checking less often, or accepting 1e-2 "
        "accuracy on the worst check (8 iterations)."
    )
  n = _common.num_params(params)
  return "\n".join(
      [
          "## Training loop (bench_training.py)\n",
          f"SAM, eta = {case.learning_rate:g}, rho = {case.rho:g}, full batch of "
          f"{case.num_examples:,} examples, MLP "
          f"{'-'.join(map(str, _common.mlp_widths(case.hidden)))} ({n:,} "
          f"parameters), {case.num_steps} steps, {num_checks} checks.\n",
          f"Tracking accuracy vs the same run tracked with "
          f"{case.reference_iters} Lanczos iterations ({accuracy_note}):\n",
          _common.markdown_table(
              [
                  "Lanczos iters",
                  "median rel. err (warm checks)",
                  "max rel. err (warm checks)",
                  "rel. err at step 0 (cold)",
                  "max rel. loss diff vs reference run",
              ],
              acc_rows,
          ),
          "",
          _common.markdown_table(
              [
                  "run",
                  "time / step",
                  "/ se.train tracking off",
                  "checks",
                  "repeats",
                  "how",
              ],
              run_rows,
          ),
          "",
          "Targets:\n",
          "\n".join(targets),
          "",
      ]
  )


def main(argv: Sequence[str] | None = None) -> int:
  args = _common.parser(__doc__.splitlines()[0]).parse_args(argv)
  return _common.finish(run(args.quick, args.repeats), args.out)


if __name__ == "__main__":
  raise SystemExit(main())
