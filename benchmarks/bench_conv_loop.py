"""Convolutions inside compiled control flow: the in-graph and staged forms.

On CPU, XLA runs a convolution's backward pass 10-26x slower inside a
``lax.scan``, ``while_loop`` or ``cond`` (jax-ml/jax#12868). ``se.train``
therefore runs CPU conv models as straight-line programs (``sam_eos.staged``);
this benchmark measures both forms in one run, forced with
``SAM_EOS_PROGRAMS`` ("before" = ``in_graph``, the form every model used
until the change; "after" = ``staged``), on

* the paper CNN (``models.make_model("cnn", channels=(16, 32))``: two
  [3x3 conv, ReLU, LayerNorm, 2x2 max-pool] blocks, then Dense), 256
  CIFAR-10 images, MSE, full batch (the cifar10-cnn preset's loss and
  preprocessing at 256 images and the paper's channels);
* the benchmark MLP (784-256-256-10 on 2,000 MNIST images).

For each: the straight-line jitted GD and SAM steps (the floor), one
standalone ``se.hvp``; ``se.train``'s steady step (the difference of two
runs of different lengths tracking only step 0, read from ``se.train``'s
own ``wall_time``, which leaves out its tracing and compiling); a tracked check (runs tracked every step,
minus the untracked steps; products per check from the history); the
``SharpnessTracker`` in a user's loop (``update`` inside the jitted step,
against ``measure_staged`` called at the check step); compile seconds.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_eos as se
from benchmarks import _common
from sam_eos import staged

ETA = 0.002  # below 2 / sharpness at init (~700) for the paper CNN
RHO = 0.1


@dataclasses.dataclass
class Problem:
  name: str
  loss_fn: Callable[..., Any]
  params: Any
  data: Any


def cnn_problem(num_examples: int, channels: tuple[int, int]) -> Problem:
  """The paper CNN on the first ``num_examples`` CIFAR-10 images."""
  from sam_eos.experiments import presets, runner  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(
      presets.get_experiment("cifar10-cnn", "cpu"),
      num_examples=num_examples,
      model_kwargs={"channels": channels},
      seeds=(0,),
      rhos=(0.0,),
  )
  problem = runner.build_problem(config)
  return Problem(
      f"paper CNN {channels[0]}-{channels[1]} channels, {num_examples} "
      "CIFAR-10 images",
      problem.loss_fn,
      jax.tree.map(lambda x: x[0], problem.params),
      problem.data,
  )


def mlp_problem(quick: bool) -> Problem:
  """The benchmark MLP (tiny in quick mode)."""
  widths = (784, 16, 10) if quick else _common.CPU_WIDTHS
  examples = 64 if quick else _common.CPU_EXAMPLES
  data = tuple(jnp.asarray(a) for a in _common.load_mnist(examples))
  params = _common.mlp_init(jax.random.key(0), widths)
  name = "MLP " + "-".join(map(str, widths)) + f", {examples} MNIST images"
  return Problem(name, _common.mse_loss, params, data)


def _train_seconds(problem: Problem, form: str, **kwargs) -> tuple[float, Any]:
  """Training seconds of one ``se.train`` call, as ``se.train`` counts them.

  ``se.train`` leaves the seconds its runner spends tracing and compiling
  out of ``wall_time``, which it interpolates inside a chunk from the
  chunk's elapsed time: a run of one chunk whose only tracked row is step
  0 has ``elapsed = wall_time[0] * num_steps``; with one step per chunk,
  ``wall_time`` is cumulative per step.
  """
  os.environ[staged.ENV_VAR] = form
  result = se.train(
      problem.loss_fn,
      problem.params,
      problem.data,
      learning_rate=ETA,
      progress=False,
      eps=1e-5,
      **kwargs,
  )
  wall = result.history["wall_time"]
  if kwargs.get("chunk_size") == 1:
    return float(wall[-1]), result
  return float(wall[0]) * kwargs["num_steps"], result


def _compile_seconds(problem: Problem, form: str, **kwargs) -> float:
  """Seconds an ``se.train`` call spends outside training (tracing,
  lowering, compiling, setup): its total minus its ``wall_time``."""
  jax.clear_caches()
  start = time.perf_counter()
  train_s, _ = _train_seconds(problem, form, **kwargs)
  return time.perf_counter() - start - train_s


def measure(problem: Problem, quick: bool, repeats: int) -> dict[str, Any]:
  """Every number of the section for one problem."""
  out: dict[str, Any] = {"name": problem.name}
  loss, params, data = problem.loss_fn, problem.params, problem.data
  out["num_params"] = _common.num_params(params)

  def gd(p):
    return jax.tree.map(lambda w, g: w - ETA * g, p, jax.grad(loss)(p, data))

  def sam(p):
    g = se.sam_gradient(loss, p, data, rho=RHO).sam_grads
    return jax.tree.map(lambda w, u: w - ETA * u, p, g)

  vector = jax.tree.map(jnp.ones_like, params)
  out["gd_floor"] = _common.time_jit(gd, params, repeats=repeats)[0].median
  out["sam_floor"] = _common.time_jit(sam, params, repeats=repeats)[0].median
  out["hvp"] = _common.time_jit(
      lambda p, v: se.hvp(loss, p, data, v), params, vector, repeats=repeats
  )[0].median
  short, long = (5, 9) if quick else (9, 17)
  cheap = dict(track_every=long, chunk_size=long, sharpness_tol=None)
  cheap["num_lanczos_iters"] = 2
  for form in staged.FORMS:
    for name, rho in (("gd", 0.0), ("sam", RHO)):
      t1, _ = _train_seconds(problem, form, rho=rho, num_steps=short, **cheap)
      t2, _ = _train_seconds(problem, form, rho=rho, num_steps=long, **cheap)
      out[f"{form}_{name}_step"] = (t2 - t1) / (long - short)
    checks = 2 if quick else 3
    tracked = dict(track_every=1, chunk_size=1)
    t1, _ = _train_seconds(problem, form, num_steps=1, **tracked)
    t2, res = _train_seconds(problem, form, num_steps=1 + checks, **tracked)
    iters = res.history["lanczos_iters"][1:]
    out[f"{form}_check"] = (t2 - t1) / checks - out[f"{form}_gd_step"]
    out[f"{form}_products"] = float(np.mean(iters))
    out[f"{form}_compile"] = _compile_seconds(
        problem, form, num_steps=1 + checks, **tracked
    )
    _common.log(f"bench_conv_loop: {problem.name} {form} done")
  out.update(_tracker(problem))
  return out


def _tracker(problem: Problem) -> dict[str, float]:
  """A check of ``SharpnessTracker`` in a user's GD loop, both forms."""
  loss, params, data = problem.loss_fn, problem.params, problem.data
  tracker = se.SharpnessTracker(loss, track_every=1, tol=1e-3, max_iters=30)
  opt = optax.sgd(ETA)

  @jax.jit
  def step_in_graph(w, opt_state, tracker_state):
    grads = jax.grad(loss)(w, data)
    tracker_state, metrics = tracker.update(
        tracker_state, w, data, learning_rate=ETA
    )
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(w, updates), opt_state, tracker_state, metrics

  @jax.jit
  def step(w, opt_state):
    updates, opt_state = opt.update(jax.grad(loss)(w, data), opt_state)
    return optax.apply_updates(w, updates), opt_state

  out = {}
  w, opt_state, state = params, opt.init(params), tracker.init(params)
  jax.block_until_ready(step_in_graph(w, opt_state, state))  # compile
  jax.block_until_ready(step(w, opt_state))
  w, opt_state, state, _ = step_in_graph(w, opt_state, state)  # warm
  start = time.perf_counter()
  _, _, _, metrics = jax.block_until_ready(step_in_graph(w, opt_state, state))
  out["in_graph_tracker"] = time.perf_counter() - start
  out["in_graph_tracker_products"] = float(metrics.lanczos_iters)
  kwargs = dict(learning_rate=ETA)
  state2, _ = tracker.measure_staged(state, w, data, **kwargs)  # compile
  start = time.perf_counter()
  _, metrics = jax.block_until_ready(
      tracker.measure_staged(state, w, data, **kwargs)
  )
  out["staged_tracker"] = time.perf_counter() - start
  out["staged_tracker_products"] = float(metrics.lanczos_iters)
  start = time.perf_counter()
  jax.block_until_ready(step(w, opt_state))
  out["user_step"] = time.perf_counter() - start
  del state2
  return out


def section(results: Sequence[dict[str, Any]], quick: bool) -> str:
  """The markdown section."""
  lines = [
      "## Convolutions in compiled loops (bench_conv_loop.py)",
      "",
      "On CPU XLA runs a convolution's backward pass far slower inside a "
      "scan, while loop or cond (jax-ml/jax#12868); `se.train` runs CPU conv "
      "models as straight-line programs (`sam_eos.staged`). Both forms, "
      "forced with `SAM_EOS_PROGRAMS`, in one run: *in-graph* is the form "
      "every model used before (a scan of steps with the measurement in a "
      "cond and a while loop of products), *staged* the new one. Floors: "
      "straight-line jitted steps of the same math and one standalone "
      "`se.hvp`. se.train's step: the difference of two runs of different "
      "lengths tracking only step 0, timed by se.train itself (its `wall_time`, which leaves out the runner's tracing and compiling). A check: runs "
      "tracked every step minus the untracked step, at tol 1e-3 (3 carried "
      f"vectors, cap 30), eta = {ETA}, rho = {RHO}. Tracker: one check of "
      "`SharpnessTracker` (tol 1e-3, cap 30) in a user's GD loop, as "
      "`update` inside the jitted step, and as `measure_staged` called at "
      "the check step.",
      "",
  ]
  if quick:
    lines.append("Quick mode: tiny sizes, a smoke test, not a measurement.\n")
  header = ["", *(r["name"] for r in results)]
  rows = []
  fmt = _common.fmt_time

  def row(label, fn):
    rows.append([label, *(fn(r) for r in results)])

  row("parameters", lambda r: f"{r['num_params']:,}")
  row("straight-line GD step (floor)", lambda r: fmt(r["gd_floor"]))
  row("straight-line SAM step (floor)", lambda r: fmt(r["sam_floor"]))
  row("one se.hvp, standalone", lambda r: fmt(r["hvp"]))
  for form in staged.FORMS:
    for name in ("gd", "sam"):
      row(
          f"{form}: se.train {name.upper()} step / floor",
          lambda r, f=form, n=name: (
              f"{fmt(r[f'{f}_{n}_step'])} = "
              f"{r[f'{f}_{n}_step'] / r[f'{n}_floor']:.2f}x"
          ),
      )
    row(
        f"{form}: a check / (its products x se.hvp)",
        lambda r, f=form: (
            f"{fmt(r[f'{f}_check'])} / ({r[f'{f}_products']:.1f} x "
            f"{fmt(r['hvp'])}) = "
            f"{r[f'{f}_check'] / (r[f'{f}_products'] * r['hvp']):.2f}x"
        ),
    )
    row(
        f"{form}: SharpnessTracker check / (products x se.hvp)",
        lambda r, f=form: (
            f"{fmt(r[f'{f}_tracker'] - (r['user_step'] if f == 'in_graph' else 0))}"
            f" / ({r[f'{f}_tracker_products']:.0f} x {fmt(r['hvp'])}) = "
            f"{(r[f'{f}_tracker'] - (r['user_step'] if f == 'in_graph' else 0)) / (r[f'{f}_tracker_products'] * r['hvp']):.2f}x"
        ),
    )
    row(
        f"{form}: se.train compile and setup (4 tracked steps)",
        lambda r, f=form: f"{r[f'{f}_compile']:.1f} s",
    )
  for name in ("gd", "sam"):
    row(
        f"se.train {name.upper()} step, in-graph / staged",
        lambda r, n=name: (
            f"{r[f'in_graph_{n}_step'] / r[f'staged_{n}_step']:.2f}x"
        ),
    )
  row(
      "a check, in-graph / staged",
      lambda r: f"{r['in_graph_check'] / r['staged_check']:.2f}x",
  )
  lines.append(_common.markdown_table(header, rows))
  lines.append("")
  lines.append(
      "Targets (paper CNN): se.train's GD step <= 1.2x the floor, SAM <= "
      "2.4x the GD floor (here: the SAM floor); a check <= 1.3x its "
      "products x se.hvp; the tracker's staged check <= 1.3x; the MLP no "
      "worse. A check in the table counts the products of the check "
      "(recorded `lanczos_iters`); its time includes the relinearization "
      "of each stage and the Ritz bookkeeping. The MLP has no convolution: "
      "`se.train` runs it in-graph by default."
  )
  return "\n".join(lines)


def run(quick: bool = False, repeats: int | None = None) -> str:
  """Measures both problems in both forms; returns the markdown section."""
  repeats = _common.default_repeats(quick, repeats)
  problems = [
      cnn_problem(16, (4, 8)) if quick else cnn_problem(256, (16, 32)),
      mlp_problem(quick),
  ]
  try:
    results = [measure(p, quick, repeats) for p in problems]
  finally:
    os.environ.pop(staged.ENV_VAR, None)
  return section(results, quick)


def main(argv: Sequence[str] | None = None) -> int:
  args = _common.parser(__doc__.splitlines()[0]).parse_args(argv)
  return _common.finish(run(args.quick, args.repeats), args.out)


if __name__ == "__main__":
  raise SystemExit(main())
