"""Shared pieces of the benchmarks: MNIST, a plain-JAX MLP, timers, tables.

Self-contained on purpose (it does not import ``sam_eos.experiments``): an
IDX reader for the original MNIST files, the paper's preprocessing (pixels /
256 minus the mean image, one-hot targets), a ReLU MLP on dict parameters
with Glorot-normal weights and zero biases (the authors' initialization), the
loss ``mean((f(x) - y)^2)`` over examples and classes, and timing helpers
that exclude compilation, block on results and take medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gzip
import inspect
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sam_eos as se

PyTree = Any
Batch = tuple[jax.Array, jax.Array]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
BUNDLED = REPO_ROOT / "sam_eos" / "experiments" / "bundled"
BUNDLED_TRAIN = (
    "mnist-train-images-idx3-ubyte.first2000.gz",
    "mnist-train-labels-idx1-ubyte.first2000.gz",
)
# The benchmark model (the mnist-mlp cpu preset's until 2026-12): 784-256-256-10,
# 269,322 parameters.
CPU_WIDTHS = (784, 256, 256, 10)
CPU_EXAMPLES = 2000


def train_default(name: str) -> Any:
  """The default of ``se.train``'s argument ``name`` (e.g. its tracking
  settings), read from its signature so the benchmarks follow it."""
  return inspect.signature(se.train).parameters[name].default


# ----------------------------------------------------------------- data ----


def _mnist_candidates() -> list[pathlib.Path]:
  """Folders that may hold the four original MNIST files, in order."""
  found = []
  if os.environ.get("SAM_EOS_MNIST_DIR"):
    found.append(pathlib.Path(os.environ["SAM_EOS_MNIST_DIR"]))
  if os.environ.get("SAM_EOS_DATA"):
    found.append(pathlib.Path(os.environ["SAM_EOS_DATA"]) / "mnist")
  found.append(REPO_ROOT.parent / "shared" / "data" / "mnist")
  found.append(REPO_ROOT / "shared" / "data" / "mnist")
  return found


def _mnist_files(num_examples: int) -> tuple[pathlib.Path, pathlib.Path]:
  """Image and label files holding at least ``num_examples`` examples.

  Raises:
    FileNotFoundError: naming every folder that was searched.
  """
  for folder in _mnist_candidates():
    paths = tuple(folder / name for name in MNIST_TRAIN)
    if all(p.is_file() for p in paths):
      return paths
  bundled = tuple(BUNDLED / name for name in BUNDLED_TRAIN)
  if num_examples <= 2000 and all(p.is_file() for p in bundled):
    return bundled
  searched = ", ".join(str(p) for p in _mnist_candidates())
  raise FileNotFoundError(
      f"MNIST training files {MNIST_TRAIN} not found in any of: {searched}. "
      "Set SAM_EOS_MNIST_DIR to the folder holding them (the project's "
      "shared/data/mnist)."
  )


def read_idx(path: pathlib.Path, count: int) -> np.ndarray:
  """The first ``count`` records of a gzipped IDX file (uint8).

  Images (magic 2051) come back as ``(count, rows, cols)``, labels (magic
  2049) as ``(count,)``.
  """
  with gzip.open(path, "rb") as f:
    header = f.read(8)
    magic, total = (int.from_bytes(header[i : i + 4], "big") for i in (0, 4))
    if magic == 2051:
      dims = f.read(8)
      shape = (int.from_bytes(dims[:4], "big"), int.from_bytes(dims[4:], "big"))
    elif magic == 2049:
      shape = ()
    else:
      raise ValueError(f"{path} is not an IDX image or label file.")
    if count > total:
      raise ValueError(f"{path} holds {total} records, asked for {count}.")
    size = count * int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(f.read(size), np.uint8).reshape((count,) + shape)


@functools.lru_cache(maxsize=4)
def load_mnist(
    num_examples: int = CPU_EXAMPLES,
) -> tuple[np.ndarray, np.ndarray]:
  """The first ``num_examples`` MNIST training images, preprocessed.

  ``x = pixels / 256 - mean image`` (mean over the same examples), flattened
  to 784 features, float32; ``y`` one-hot float32 ``(N, 10)``.
  """
  images_path, labels_path = _mnist_files(num_examples)
  images = read_idx(images_path, num_examples).reshape(num_examples, -1)
  labels = read_idx(labels_path, num_examples)
  x = images.astype(np.float32) / np.float32(256.0)
  x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
  return x, np.eye(10, dtype=np.float32)[labels]


def batch_of(
    num_examples: int = CPU_EXAMPLES, dtype: Any = jnp.float32
) -> Batch:
  """``(x, y)`` device arrays of the first ``num_examples`` examples."""
  x, y = load_mnist(num_examples)
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


# ---------------------------------------------------------------- model ----


def mlp_widths(hidden: Sequence[int]) -> tuple[int, ...]:
  """``(784, *hidden, 10)``."""
  return (784, *hidden, 10)


@functools.partial(jax.jit, static_argnums=1)
def mlp_init(key: jax.Array, widths: tuple[int, ...]) -> dict[str, PyTree]:
  """Glorot-normal weights and zero biases, ``{"layer_i": {"w", "b"}}``."""
  init = jax.nn.initializers.glorot_normal()
  keys = jax.random.split(key, len(widths) - 1)
  return {
      f"layer_{i}": {
          "w": init(k, (n_in, n_out), jnp.float32),
          "b": jnp.zeros((n_out,), jnp.float32),
      }
      for i, (k, n_in, n_out) in enumerate(zip(keys, widths[:-1], widths[1:]))
  }


def mlp_apply(params: dict[str, PyTree], x: jax.Array) -> jax.Array:
  """ReLU MLP; the last layer is linear."""
  num_layers = len(params)
  for i in range(num_layers):
    layer = params[f"layer_{i}"]
    x = x @ layer["w"] + layer["b"]
    if i < num_layers - 1:
      x = jax.nn.relu(x)
  return x


def mse_loss(params: dict[str, PyTree], batch: Batch) -> jax.Array:
  """``mean((f(x) - y)^2)`` over examples and classes (the paper's loss)."""
  x, y = batch
  return jnp.mean((mlp_apply(params, x) - y) ** 2)


def num_params(params: PyTree) -> int:
  """Total number of entries of a pytree."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def cast(tree: PyTree, dtype: Any) -> PyTree:
  """Every leaf of ``tree`` cast to ``dtype``."""
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def gd_trajectory(
    params: PyTree, batch: Batch, *, learning_rate: float, num_steps: int
) -> PyTree:
  """``num_steps`` full-batch GD steps on ``mse_loss`` (one compiled scan)."""
  grad = jax.grad(mse_loss)

  @jax.jit
  def run(params, batch):
    def body(p, _):
      return (
          jax.tree.map(lambda w, g: w - learning_rate * g, p, grad(p, batch)),
          None,
      )

    return jax.lax.scan(body, params, None, length=num_steps)[0]

  return run(params, batch)


# --------------------------------------------------------------- timing ----


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock statistics of one operation, in seconds.

  Attributes:
    median: median over the timed repeats (compilation excluded).
    spread: (max - min) / median over the repeats, a noise indicator.
    compile: seconds spent compiling (0 when nothing was compiled).
    repeats: number of timed repeats.
  """

  median: float
  spread: float
  compile: float
  repeats: int


def _stats(times: Sequence[float], compile_s: float) -> Timing:
  median = statistics.median(times)
  spread = (max(times) - min(times)) / median if median > 0 else 0.0
  return Timing(
      median=median, spread=spread, compile=compile_s, repeats=len(times)
  )


def time_host(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1
) -> Timing:
  """Times ``fn()`` (which must block on its own results).

  ``warmup`` untimed calls come first; the first one's excess over the median
  is reported as ``compile`` (tracing, compilation, caches).
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  timing = _stats(times, 0.0)
  return dataclasses.replace(timing, compile=max(first - timing.median, 0.0))


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_total = [0.0]


def _on_duration(event: str, duration: float, **_: Any) -> None:
  if event in _COMPILE_EVENTS:
    _compile_total[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
  """Seconds JAX has spent tracing, lowering and compiling in this process.

  Read it before and after a call that compiles internally (``se.train``) to
  subtract compilation from its wall time.
  """
  return _compile_total[0]


def time_jit(
    fn: Callable[..., Any],
    *args: Any,
    repeats: int,
    budget: float | None = None,
) -> tuple[Timing, Any]:
  """Compiles ``jax.jit(fn)`` ahead of time, then times calls on ``args``.

  Returns:
    The ``Timing`` (``compile`` = lowering plus XLA compilation) and the
    output of the last call; see ``time_compiled`` for the arguments.
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  timing, out = time_compiled(compiled, *args, repeats=repeats, budget=budget)
  return dataclasses.replace(timing, compile=compile_s), out


def time_compiled(
    compiled: Callable[..., Any],
    *args: Any,
    repeats: int,
    budget: float | None = None,
) -> tuple[Timing, Any]:
  """Times an already compiled function on ``args``.

  Args:
    compiled: e.g. ``jax.jit(fn).lower(*args).compile()``.
    *args: its arguments.
    repeats: timed calls after one untimed warm-up call.
    budget: if given, fewer repeats (at least one) so that they take about
      ``budget`` seconds in all, judged from the warm-up call.

  Returns:
    The ``Timing`` (``compile`` 0) and the output of the last call.
  """
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))  # warm-up
  first = time.perf_counter() - start
  if budget is not None:
    repeats = max(1, min(repeats, int(budget / max(first, 1e-9))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return _stats(times, 0.0), out


@dataclasses.dataclass(frozen=True)
class Samples:
  """Repeated measurements of one quantity (seconds, or a ratio).

  Attributes:
    values: one value per repeat.
  """

  values: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.values)

  @property
  def low(self) -> float:
    return min(self.values)

  @property
  def high(self) -> float:
    return max(self.values)

  @property
  def spread(self) -> float:
    """``(max - min) / median``: 0 for one repeat."""
    med = self.median
    return (self.high - self.low) / med if med else 0.0


def fmt_spread(samples: Samples) -> str:
  """``±x%`` over ``n`` repeats (half the max-min range, over the median)."""
  return f"±{samples.spread / 2:.0%} (n={len(samples.values)})"


def log(message: str) -> None:
  """Progress on stderr (tables go to stdout)."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- memory ----


def _status_kib(field: str) -> int | None:
  """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None."""
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (Linux ``clear_refs`` 5)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_delta(fn: Callable[[], Any]) -> tuple[float, str]:
  """Peak resident-set growth (bytes) while ``fn()`` runs, and the method.

  On Linux the peak mark (``VmHWM``) is reset first, so the result is the
  peak during ``fn`` minus the resident set before it. Elsewhere it is the
  growth of ``getrusage``'s lifetime maximum, which reads 0 when an earlier,
  larger peak hides it.
  """
  import resource  # pylint: disable=g-import-not-at-top

  if _reset_peak_rss() and _status_kib("VmRSS") is not None:
    before = _status_kib("VmRSS")
    jax.block_until_ready(fn())
    grown = _status_kib("VmHWM") - before
    return 1024.0 * max(grown, 0), "VmHWM after clear_refs"
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  jax.block_until_ready(fn())
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return 1024.0 * max(after - before, 0), "ru_maxrss delta"


def compiled_bytes(compiled: Any) -> int:
  """XLA's buffer need of a compiled program: arguments, outputs, temps.

  ``compiled`` is e.g. ``jax.jit(fn).lower(*args).compile()``; -1 when the
  backend gives no memory analysis.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return -1
  return int(
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      + stats.temp_size_in_bytes
      - stats.alias_size_in_bytes
  )


def fmt_bytes(num: float) -> str:
  """Bytes in MiB (or KiB)."""
  if num < 0:
    return "-"
  if num < 1 << 20:
    return f"{num / 1024:.0f} KiB"
  return f"{num / (1 << 20):.1f} MiB"


# ---------------------------------------------------------- environment ----


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


VERSIONED = (
    "jax",
    "jaxlib",
    "numpy",
    "scipy",
    "optax",
    "torch",
    "matfree",
    "pyhessian",
    "matplotlib",
)


def git_commit() -> str:
  """The commit the benchmarks run from.

  ``git rev-parse HEAD`` in the repository (with ``+dirty`` when tracked
  files differ from it), else ``$SAM_EOS_COMMIT`` (set it when running from
  a ``git archive`` snapshot, which has no ``.git``), else ``unknown``.
  """
  import subprocess  # pylint: disable=g-import-not-at-top

  try:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return os.environ.get("SAM_EOS_COMMIT", "unknown")


def load_average() -> tuple[float, float, float]:
  """The 1, 5 and 15 minute load averages (NaN where unavailable)."""
  if hasattr(os, "getloadavg"):
    return tuple(os.getloadavg())
  return (float("nan"),) * 3


def fmt_load(load: Sequence[float]) -> str:
  """``a / b / c``."""
  return " / ".join(f"{x:.2f}" for x in load)


def environment() -> dict[str, str]:
  """Machine and software at the time of the call (load: see run_all)."""
  env = {
      "commit": git_commit(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"
      ),
      "cpu": cpu_model(),
      "cores": str(os.cpu_count()),
      "python": platform.python_version(),
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}"
      f", {jax.device_count()} device(s))",
  }
  for name in VERSIONED:
    env[name] = package_version(name) or "not installed"
  return env


def package_version(name: str) -> str | None:
  """Installed version of a distribution, or None."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def installed(module: str) -> bool:
  """Whether ``module`` can be imported."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------- output ----


def fmt_time(seconds: float) -> str:
  """Seconds in a readable unit (us, ms or s)."""
  if seconds != seconds:  # NaN
    return "-"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} us"
  if seconds < 1:
    return f"{seconds * 1e3:.1f} ms"
  return f"{seconds:.2f} s"


def fmt_err(value: float) -> str:
  """A relative error in compact scientific notation."""
  if value != value:
    return "-"
  return f"{value:.1e}"


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> str:
  """A GitHub markdown table."""
  lines = [
      "| " + " | ".join(headers) + " |",
      "|" + "|".join("---" for _ in headers) + "|",
  ]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def met(flag: bool) -> str:
  """``met`` / ``NOT met``."""
  return "met" if flag else "NOT met"


def parser(description: str) -> argparse.ArgumentParser:
  """The common command line: ``--quick``, ``--repeats``, ``--out``."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument(
      "--quick",
      action="store_true",
      help="tiny sizes, one repeat: a smoke test, not a measurement",
  )
  p.add_argument(
      "--repeats",
      type=int,
      default=None,
      help="timed repeats per measurement (default 5, quick 1)",
  )
  p.add_argument(
      "--out",
      type=pathlib.Path,
      default=None,
      help="also write the markdown section to this file",
  )
  return p


def finish(section: str, out: pathlib.Path | None) -> int:
  """Prints ``section`` and writes it to ``out`` if given; returns 0."""
  print(section)
  sys.stdout.flush()
  if out is not None:
    out.write_text(section + "\n", encoding="utf-8")
  return 0


def default_repeats(quick: bool, repeats: int | None) -> int:
  """``repeats``, or 1 in quick mode and 5 otherwise."""
  if repeats is not None:
    return max(1, repeats)
  return 1 if quick else 5
