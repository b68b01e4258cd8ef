"""Scaling: time per SAM step, per sharpness estimate and memory vs size.

Two sweeps on MNIST MLPs ``784-w-w-10`` (ReLU, ``mean((f(x) - y)^2)``, full
batch): the width ``w`` at a fixed number of examples, and the number of
examples at a fixed width (the sizes are in ``FULL`` and in the tables).

Measured at each size, at the Glorot initialization:

* SAM step: one jitted ``se.sam(optax.sgd)`` step (two gradients);
* sharpness estimate: one jitted ``se.sharpness`` with a fixed number of
  Lanczos iterations (cold start), i.e. that many HVPs plus bookkeeping;
  the bookkeeping alone is ``se.lanczos`` on a free diagonal matvec;
* memory: XLA's buffer need of each compiled program (arguments + outputs +
  temporaries, from ``compiled.memory_analysis()``, exact) and the peak
  growth of the process's resident set during one call (Linux ``VmHWM``
  reset through ``/proc/self/clear_refs``; includes allocator slack).

Times are medians over repeats after a warm-up call (fewer repeats for calls
over a second), compilation excluded. Slopes are least-squares fits of
``log(time)`` or ``log(memory)`` on ``log(size)`` over the larger half of each
sweep, where fixed per-call costs no longer dominate; a slope above 1.1 is
flagged as superlinear. The figure is ``benchmarks/scaling.png``.

Run: ``.venv/bin/python -m benchmarks.bench_scaling [--quick]``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_eos as se
from benchmarks import _common

PyTree = Any
LOSS = _common.mse_loss
SUPERLINEAR = 1.1
FIGURE = pathlib.Path(__file__).resolve().parent / "scaling.png"
QUICK_FIGURE = pathlib.Path(tempfile.gettempdir()) / "sam_eos_scaling_quick.png"


@dataclasses.dataclass(frozen=True)
class Sweep:
  widths: tuple[int, ...]
  width_examples: int
  examples: tuple[int, ...]
  example_width: int
  lanczos_iters: int


# Sized for a shared 2-core machine (the 2048 width and 60,000 examples of
# earlier runs took a third of the whole benchmark's time).
FULL = Sweep(
    (64, 128, 256, 512, 1024),
    2000,
    (500, 1000, 2000, 5000, 10000, 20000),
    256,
    8,
)
QUICK = Sweep((8, 16), 64, (64, 128), 8, 3)


@dataclasses.dataclass(frozen=True)
class Point:
  width: int
  num_examples: int
  num_params: int
  step: float
  sharpness: float
  bookkeeping: float
  step_bytes: int
  sharpness_bytes: int
  step_rss: float
  sharpness_rss: float


def measure(
    width: int, num_examples: int, lanczos_iters: int, repeats: int
) -> tuple[Point, str]:
  """Times and memory of one SAM step and one sharpness estimate."""
  batch = _common.batch_of(num_examples)
  params = _common.mlp_init(
      jax.random.key(0), _common.mlp_widths((width, width))
  )
  opt = se.sam(optax.sgd(1.0), 0.1)
  state = opt.init(params)
  grad = jax.grad(LOSS)

  def step(params, state, batch):
    updates, state = opt.update(
        grad(params, batch), state, params, grad_fn=lambda p: grad(p, batch)
    )
    return optax.apply_updates(params, updates), state

  def sharpness(params, batch):
    return se.sharpness(LOSS, params, batch, num_iters=lanczos_iters)

  step_fn = jax.jit(step).lower(params, state, batch).compile()
  sharp_fn = jax.jit(sharpness).lower(params, batch).compile()
  step_t, _ = _common.time_compiled(
      step_fn, params, state, batch, repeats=repeats, budget=3.0
  )
  sharp_t, _ = _common.time_compiled(
      sharp_fn, params, batch, repeats=repeats, budget=3.0
  )
  flat = jnp.ones(_common.num_params(params))
  book_t, _ = _common.time_jit(
      lambda v, d: se.lanczos(lambda x: d * x, v, lanczos_iters).ritz_values[0],
      flat,
      jnp.linspace(0.0, 1.0, flat.size),
      repeats=repeats,
      budget=3.0,
  )
  step_rss, method = _common.peak_rss_delta(
      lambda: step_fn(params, state, batch)
  )
  sharp_rss, _ = _common.peak_rss_delta(lambda: sharp_fn(params, batch))
  return (
      Point(
          width=width,
          num_examples=num_examples,
          num_params=_common.num_params(params),
          step=step_t.median,
          sharpness=sharp_t.median,
          bookkeeping=book_t.median,
          step_bytes=_common.compiled_bytes(step_fn),
          sharpness_bytes=_common.compiled_bytes(sharp_fn),
          step_rss=step_rss,
          sharpness_rss=sharp_rss,
      ),
      method,
  )


def slope(sizes: Sequence[float], values: Sequence[float]) -> float:
  """Least-squares slope of log(values) on log(sizes), larger half."""
  half = max(2, (len(sizes) + 1) // 2)
  x = np.log(np.asarray(sizes, float)[-half:])
  y = np.log(np.maximum(np.asarray(values, float)[-half:], 1e-12))
  return float(np.polyfit(x, y, 1)[0])


def _slopes(
    sizes: Sequence[float], points: Sequence[Point], *, bookkeeping: bool
) -> dict[str, float]:
  """Fitted slopes; the bookkeeping (independent of the data) on request."""
  out = {
      "SAM step time": slope(sizes, [p.step for p in points]),
      "sharpness time": slope(sizes, [p.sharpness for p in points]),
      "SAM step XLA bytes": slope(sizes, [p.step_bytes for p in points]),
      "sharpness XLA bytes": slope(sizes, [p.sharpness_bytes for p in points]),
  }
  if bookkeeping:
    out["Lanczos bookkeeping time"] = slope(
        sizes, [p.bookkeeping for p in points]
    )
  return out


def _table(points: Sequence[Point]) -> str:
  return _common.markdown_table(
      [
          "width",
          "examples",
          "parameters",
          "SAM step",
          "sharpness",
          "of which Lanczos bookkeeping",
          "step XLA buffers",
          "sharpness XLA buffers",
          "step peak RSS growth",
          "sharpness peak RSS growth",
      ],
      [
          [
              p.width,
              f"{p.num_examples:,}",
              f"{p.num_params:,}",
              _common.fmt_time(p.step),
              _common.fmt_time(p.sharpness),
              _common.fmt_time(p.bookkeeping),
              _common.fmt_bytes(p.step_bytes),
              _common.fmt_bytes(p.sharpness_bytes),
              _common.fmt_bytes(p.step_rss),
              _common.fmt_bytes(p.sharpness_rss),
          ]
          for p in points
      ],
  )


def _slope_lines(name: str, slopes: dict[str, float]) -> list[str]:
  return [
      f"- {name}: {what} slope {value:.2f}"
      + (" **superlinear**" if value > SUPERLINEAR else "")
      for what, value in slopes.items()
  ]


def _bookkeeping_note(largest: Point) -> str:
  """How much of the largest model's sharpness time is bookkeeping."""
  share = largest.bookkeeping / largest.sharpness
  return (
      f"\nAt {largest.num_params:,} parameters the Lanczos bookkeeping "
      f"(reorthogonalization against the stored basis) is "
      f"{_common.fmt_time(largest.bookkeeping)} of "
      f"{_common.fmt_time(largest.sharpness)} ({share:.0%}); it is linear "
      "in the parameters in flops but streams the whole basis from memory "
      "several times per iteration, so it slows down once the basis "
      "leaves the caches."
  )


def plot(
    by_width: Sequence[Point], by_examples: Sequence[Point], path: pathlib.Path
) -> None:
  """Log-log panels: time and XLA memory against parameters and examples."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
  sweeps = (
      (by_width, [p.num_params for p in by_width], "parameters"),
      (by_examples, [p.num_examples for p in by_examples], "examples"),
  )
  for col, (points, sizes, label) in enumerate(sweeps):
    ax = axes[0, col]
    ax.loglog(sizes, [p.step for p in points], "o-", label="SAM step")
    ax.loglog(
        sizes,
        [p.sharpness for p in points],
        "s-",
        label="sharpness (fixed Lanczos iters)",
    )
    ax.set_ylabel("seconds")
    ax = axes[1, col]
    ax.loglog(
        sizes,
        [p.step_bytes / 2**20 for p in points],
        "o-",
        label="SAM step (XLA buffers)",
    )
    ax.loglog(
        sizes,
        [p.sharpness_bytes / 2**20 for p in points],
        "s-",
        label="sharpness (XLA buffers)",
    )
    ax.set_ylabel("MiB")
    for row in range(2):
      ref = np.asarray(sizes, float)
      y0 = axes[row, col].get_lines()[0].get_ydata()[-1]
      axes[row, col].loglog(
          ref, y0 * ref / ref[-1], "k:", lw=1, label="slope 1"
      )
      axes[row, col].set_xlabel(label)
      axes[row, col].legend(fontsize=8)
      axes[row, col].grid(True, which="both", alpha=0.3)
  axes[0, 0].set_title("MLP 784-w-w-10, 2,000 examples")
  axes[0, 1].set_title("MLP 784-256-256-10")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(
    quick: bool = False,
    repeats: int | None = None,
    figure: pathlib.Path | None = None,
) -> str:
  """The markdown section of this benchmark.

  The figure goes to ``figure``, by default ``benchmarks/scaling.png`` (quick
  runs: the temporary folder, so a smoke test never replaces it).
  """
  repeats = _common.default_repeats(quick, repeats)
  if figure is None:
    figure = QUICK_FIGURE if quick else FIGURE
  sweep = QUICK if quick else FULL
  cache: dict[tuple[int, int], tuple[Point, str]] = {}

  def point(width: int, num_examples: int) -> Point:
    if (width, num_examples) not in cache:
      _common.log(f"scaling: width {width}, {num_examples} examples")
      cache[width, num_examples] = measure(
          width, num_examples, sweep.lanczos_iters, repeats
      )
    return cache[width, num_examples][0]

  by_width = [point(w, sweep.width_examples) for w in sweep.widths]
  by_examples = [point(sweep.example_width, n) for n in sweep.examples]
  method = next(iter(cache.values()))[1]
  width_slopes = _slopes(
      [p.num_params for p in by_width], by_width, bookkeeping=True
  )
  example_slopes = _slopes(
      [p.num_examples for p in by_examples], by_examples, bookkeeping=False
  )
  flagged = [
      k
      for k, v in {
          **{f"{k} vs parameters": v for k, v in width_slopes.items()},
          **{f"{k} vs examples": v for k, v in example_slopes.items()},
      }.items()
      if v > SUPERLINEAR
  ]
  plot(by_width, by_examples, figure)
  return "\n".join(
      [
          "## Scaling (bench_scaling.py)\n",
          f"SAM step and sharpness estimate ({sweep.lanczos_iters} Lanczos "
          f"iterations, cold) at the Glorot init; memory: XLA buffers "
          f"(memory_analysis) and peak resident-set growth ({method}).\n",
          f"Width sweep ({sweep.width_examples:,} examples):\n",
          _table(by_width),
          "",
          f"Example sweep (width {sweep.example_width}):\n",
          _table(by_examples),
          "",
          "Fitted log-log slopes (larger half of each sweep):\n",
          "\n".join(
              _slope_lines("vs parameters", width_slopes)
              + _slope_lines("vs examples", example_slopes)
          ),
          "",
          (
              "Superlinear (slope > 1.1): " + ", ".join(flagged) + "."
              if flagged
              else "Nothing superlinear (all slopes <= 1.1)."
          ),
          _bookkeeping_note(by_width[-1]),
          f"\n![scaling]({figure.name})\n",
      ]
  )


def main(argv: Sequence[str] | None = None) -> int:
  p = _common.parser(__doc__.splitlines()[0])
  p.add_argument(
      "--figure",
      type=pathlib.Path,
      default=None,
      help="where to write the log-log PNG (default "
      "benchmarks/scaling.png; quick: the temp folder)",
  )
  args = p.parse_args(argv)
  return _common.finish(run(args.quick, args.repeats, args.figure), args.out)


if __name__ == "__main__":
  raise SystemExit(main())
