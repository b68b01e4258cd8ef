"""The compiled programs of a training run, over a sweep's configurations.

``se.train`` advances the carry of all its configurations chunk by chunk
through a runner with one method, ``advance(state, data, eval_data,
hparams, start, stop) -> (state, ChunkOutput)``:

* ``InGraphRunner``: one compiled ``loop.run_chunk`` per chunk (a scan with
  the measurement inside): the form for GPUs and TPUs, and for CPU models
  without convolutions;
* ``StagedRunner``: the programs of ``sam_eos.staged`` (straight-line
  segments of untracked steps; a tracked step as a measurement in stages
  with the stopping test on the host, then the update), for CPU conv
  models (jax-ml/jax#12868).

Both give the same history. ``grouped`` turns a one-configuration program
into a sweep's: GD configurations (``rho = 0``) of a sweep that also has
SAM ones run as their own vmapped group without the SAM gradient (rows
gathered before, scattered back after), a group of one runs unvmapped, and
a ``"config"`` mesh axis keeps one group. Each runner compiles a program
once, ahead of time, and counts the seconds it spent compiling
(``compile_seconds``), which ``se.train`` leaves out of the wall time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sam_eos import loop, parallel, staged
from sam_eos._types import PyTree

# The name of the vmap axis over a sweep's configurations.
SWEEP_AXIS = "sweep"

Program = Callable[[Any, Any, Any], Any]


def grouped(
    config: loop.LoopConfig,
    rhos: np.ndarray,
    spmd_axis: str | None,
    make: Callable[[loop.LoopConfig], Program],
    split: bool = True,
) -> Program:
  """A sweep's program from a one-configuration one (see the module).

  Args:
    config: the static settings.
    rhos: ``(C,)`` the configurations' radii.
    spmd_axis: the ``"config"`` mesh axis name, or None.
    make: ``cfg -> f(carry, fixed, shared)`` for one configuration, its
      outputs all per configuration.
    split: whether GD configurations of a mixed sweep form their own
      group (else every row computes the SAM gradient, ``g`` itself at
      ``rho = 0``: the same results, one more gradient per GD step).

  Returns:
    ``f(carry, fixed, shared)`` with ``carry`` and ``fixed`` stacked along
    a leading config axis (``carry`` may be donated) and ``shared``
    unbatched; outputs stacked likewise.
  """

  def vmapped(cfg: loop.LoopConfig, size: int) -> Program:
    if size == 1 and spmd_axis is None:
      fn = make(cfg)
      first = lambda tree: jax.tree.map(lambda x: x[0], tree)
      return lambda c, f, s: jax.tree.map(
          lambda x: x[None], fn(first(c), first(f), s)
      )
    return jax.vmap(
        make(dataclasses.replace(cfg, axis_name=SWEEP_AXIS)),
        in_axes=(0, 0, None),
        axis_name=SWEEP_AXIS,
        spmd_axis_name=spmd_axis,
    )

  gd, sam = np.flatnonzero(rhos == 0), np.flatnonzero(rhos > 0)
  if not split or not config.use_sam or gd.size == 0 or spmd_axis is not None:
    return vmapped(config, rhos.size)
  groups = (
      (vmapped(dataclasses.replace(config, use_sam=False), gd.size), gd),
      (vmapped(config, sam.size), sam),
  )
  order = np.argsort(np.concatenate([gd, sam]))

  def program(carry, fixed, shared):
    take = lambda tree, rows: jax.tree.map(lambda x: x[rows], tree)
    outs = [
        run(take(carry, rows), take(fixed, rows), shared)
        for run, rows in groups
    ]
    return jax.tree.map(
        lambda a, b: jnp.concatenate([a, b])[order], outs[0], outs[1]
    )

  return program


class _Compiled:
  """Programs compiled ahead of time on first use, by key."""

  def __init__(self):
    self.programs: dict[Any, Any] = {}
    self.compile_seconds = 0.0

  def __call__(self, key: Any, make: Callable[[], Program], *args: Any):
    if key not in self.programs:
      start = time.perf_counter()
      self.programs[key] = (
          jax.jit(make(), donate_argnums=(0,)).lower(*args).compile()
      )
      self.compile_seconds += time.perf_counter() - start
    return self.programs[key](*args)


class InGraphRunner:
  """``loop.run_chunk`` of ``chunk_size`` steps, one program per chunk."""

  def __init__(
      self,
      config: loop.LoopConfig,
      rhos: np.ndarray,
      spmd_axis: str | None,
      chunk_size: int,
  ):
    self._compiled = _Compiled()

    def make(cfg):
      def chunk(state, hparams, shared):
        data, eval_data, start, end = shared
        return loop.run_chunk(
            cfg, state, data, eval_data, hparams, start, end, chunk_size
        )

      return chunk

    self._program = lambda: grouped(config, rhos, spmd_axis, make)

  @property
  def compile_seconds(self) -> float:
    return self._compiled.compile_seconds

  def advance(
      self,
      state: loop.TrainState,
      data: PyTree,
      eval_data: Any,
      hparams: loop.Hyperparams,
      start: int,
      stop: int,
  ) -> tuple[loop.TrainState, loop.ChunkOutput]:
    """Steps ``start .. stop - 1`` (at most ``chunk_size``)."""
    shared = (data, eval_data, jnp.int32(start), jnp.int32(stop))
    return self._compiled("chunk", self._program, state, hparams, shared)


class StagedRunner:
  """The staged programs of ``sam_eos.staged``, driven from the host.

  ``predicted`` (the products of the last check, the most over the
  configurations) plans the next check's stages (``staged.stage_sizes``).
  """

  def __init__(
      self,
      config: loop.LoopConfig,
      rhos: np.ndarray,
      spmd_axis: str | None,
  ):
    self._config = config
    # One group: two vmapped groups of 3 conv configurations in one
    # staged program (the cifar10-cnn preset's sweep) deadlocked XLA's CPU
    # runtime (jaxlib 0.10.2; no CPU in use, reproducible), one group of 6
    # did not.
    self._group = lambda make: grouped(
        config, rhos, spmd_axis, make, split=False
    )
    self._compiled = _Compiled()
    self.predicted = 0
    self.num_stages = 0

  @property
  def compile_seconds(self) -> float:
    return self._compiled.compile_seconds

  def _steps(self, num_steps: int) -> Program:
    def make(cfg):
      def steps(state, hparams, shared):
        data, eval_data, start = shared
        return staged.run_steps(
            cfg, hparams, data, eval_data, state, start, num_steps
        )

      return steps

    return self._group(make)

  def _measure(self, num_products: int, first: bool) -> Program:
    def make(cfg):
      def begin(_, state, shared):
        data, step = shared
        primal, solves = staged.begin_measurement(
            cfg, state, data, step, num_products
        )
        return primal, solves, staged.measurement_running(solves)

      def advance(solves, state, shared):
        data, step = shared
        solves = staged.advance_measurement(
            cfg, state, data, step, solves, num_products
        )
        return solves, staged.measurement_running(solves)

      return begin if first else advance

    return self._group(make)

  def _finish(self) -> Program:
    def make(cfg):
      def finish(state, fixed, shared):
        hparams, primal, solves = fixed
        data, eval_data, step = shared
        return staged.finish_tracked_step(
            cfg, hparams, data, eval_data, state, step, primal, solves
        )

      return finish

    return self._group(make)

  def _tracked_step(self, state, data, eval_data, hparams, step):
    """Step ``step``: the measurement in stages, then the update."""
    cap = self._config.num_lanczos_iters
    predicted = self.predicted or (
        self._config.num_warm_vectors + staged.COLD_EXTRA
    )
    sizes = staged.stage_sizes(predicted, cap)
    num = next(sizes)
    shared = (data, jnp.int32(step))
    primal, solves, (running, done) = self._compiled(
        ("begin", num), lambda: self._measure(num, True), (), state, shared
    )
    self.num_stages += 1
    for num in sizes:
      running, done = parallel.to_host((running, done))
      if not np.any(running) or np.max(done) >= cap:
        break
      solves, (running, done) = self._compiled(
          ("advance", num),
          lambda: self._measure(num, False),
          solves,
          state,
          shared,
      )
      self.num_stages += 1
    state, (tracked, metrics) = self._compiled(
        "finish",
        self._finish,
        state,
        (hparams, primal, solves),
        (data, eval_data, jnp.int32(step)),
    )
    tracked, metrics = parallel.to_host((tracked, metrics))
    iters = metrics["lanczos_iters"]
    if np.any(np.isfinite(iters)):
      self.predicted = int(np.nanmax(iters))
    return state, loop.ChunkOutput(
        step=np.full(tracked.shape + (1,), step, np.int32),
        tracked=tracked[:, None],
        metrics={k: v[:, None] for k, v in metrics.items()},
    )

  def advance(
      self,
      state: loop.TrainState,
      data: PyTree,
      eval_data: Any,
      hparams: loop.Hyperparams,
      start: int,
      stop: int,
  ) -> tuple[loop.TrainState, loop.ChunkOutput]:
    """Steps ``start .. stop - 1``: tracked steps and untracked segments."""
    every = self._config.track_every
    outs = []
    step = start
    while step < stop:
      if step % every == 0:
        state, out = self._tracked_step(state, data, eval_data, hparams, step)
        step += 1
      else:
        due = (step // every + 1) * every
        num = min(due, stop, step + staged.MAX_SEGMENT) - step
        state, out = self._compiled(
            ("steps", num),
            lambda: self._steps(num),
            state,
            hparams,
            (data, eval_data, jnp.int32(step)),
        )
        out = parallel.to_host(out)
        step += num
      outs.append(out)
    join = lambda *xs: np.concatenate(xs, axis=1)
    return state, jax.tree.map(join, *outs)
