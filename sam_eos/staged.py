"""The training loop and its measurement as straight-line programs.

On CPU, XLA runs the backward pass of a convolution 10-26x slower when it
sits inside a ``lax.scan``, ``while_loop`` or ``cond`` than in straight-line
code (jax-ml/jax#12868, measured in ``benchmarks/bench_conv_loop.py``). The
in-graph form of ``sam_eos.loop`` (a scan of steps, a ``cond`` around the
measurement, a ``while_loop`` of Lanczos products) puts every product and
gradient of a CNN inside such control flow. The staged form computes the
same history with no loop or branch around a gradient or a product:

* ``run_steps``: ``num_steps`` untracked steps, unrolled;
* a tracked step ``t`` in three kinds of program: ``begin_measurement``
  (the step's gradient at ``w_t`` and the first products of the warm-started
  solve), ``advance_measurement`` (more products; each program relinearizes
  at ``w_t``, which costs one forward-backward pass, about a product) while
  ``measurement_running`` says a member is not yet certified (a test the
  host reads between programs), then ``finish_tracked_step`` (the step's
  update and metrics from the measurement, ``loop._train_step`` with the
  measurement supplied).

The products, Ritz values, stopping points and updates are those of the
in-graph form (``krylov.begin``/``advance``/``finish`` are the pieces of
``krylov.eigenpairs``); only the cost differs. ``stage_sizes`` plans a
check's stages from the product count of the previous check, from a fixed
menu so that few programs compile. ``uses_staging`` picks the form: staged
where the backend is a CPU and the loss has a convolution, in-graph
elsewhere (GPU and TPU loops are not taxed, and the in-graph form needs no
host round trip and no relinearization). The environment variable
``SAM_EOS_PROGRAMS`` (``staged`` or ``in_graph``) overrides the choice.

References:
  jax-ml/jax#12868 ("Convolutions are slow inside lax.scan/while_loop on
  CPU"), open since 2022.
  Long & Bartlett 2023 (the tracked quantities); Parlett 1998 (Lanczos).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp

from sam_eos import krylov
from sam_eos._types import PyTree
from sam_eos.hessian import flat_matvec, linearize_gradient
from sam_eos.loop import (
    ChunkOutput,
    Hyperparams,
    LoopConfig,
    Measurement,
    TrainState,
    _train_step,
    num_certified,
    operators,
    step_batch,
)

# Stage sizes (products per program), powers of two: each distinct size is
# one more program to compile (about 0.3 s per unrolled product of the paper
# CNN), while one more stage costs a relinearization (about half a product).
MENU = (1, 2, 4, 8, 16, 32, 64)
# A check with no previous one to go by starts with this many products
# beyond its warm block.
COLD_EXTRA = 5
# Untracked steps per straight-line program, at most.
MAX_SEGMENT = 16
# How ``uses_staging`` is overridden.
ENV_VAR = "SAM_EOS_PROGRAMS"
FORMS = ("staged", "in_graph")
_CONVOLUTION = "conv_general_dilated"


def _solves(
    config: LoopConfig, state: TrainState, data: PyTree, step: jax.Array
) -> tuple[Any, tuple[Any, ...], tuple[tuple[krylov.Spec, Any], ...]]:
  """The primal outputs, the operators and each solve's ``(spec, start)``."""
  primal, matvecs, starts = operators(
      config, state, step_batch(config, state, data, step)
  )
  begun = tuple(
      krylov.track_begin(
          matvec,
          start,
          config.num_lanczos_iters,
          config.sharpness_tol,
          config.axis_name,
          num_certified=certified,
      )
      for matvec, start, certified in zip(
          matvecs, starts, num_certified(config)
      )
  )
  return primal, matvecs, begun


def begin_measurement(
    config: LoopConfig,
    state: TrainState,
    data: PyTree,
    step: jax.Array,
    num_products: int,
) -> tuple[tuple[jax.Array, PyTree, PyTree], tuple[krylov.KrylovState, ...]]:
  """The gradient at ``w_t`` and the first ``num_products`` products.

  Args:
    config: static settings (``config.axis_name`` as in the in-graph form).
    state: the carry at step ``step`` (``w_t``).
    data: the training data.
    step: the global step ``t`` (its batch is drawn as the loop draws it).
    num_products: products of this stage (static).

  Returns:
    ``((loss, grads, new_model_state), solves)``: one ``KrylovState`` per
    operator (the Hessian's, then the preconditioned one).
  """
  primal, matvecs, begun = _solves(config, state, data, step)
  solves = tuple(
      krylov.advance(spec, matvec, solve, num_products)
      for matvec, (spec, solve) in zip(matvecs, begun)
  )
  return primal, solves


def advance_measurement(
    config: LoopConfig,
    state: TrainState,
    data: PyTree,
    step: jax.Array,
    solves: tuple[krylov.KrylovState, ...],
    num_products: int,
) -> tuple[krylov.KrylovState, ...]:
  """``num_products`` more products of every solve, relinearized at ``w_t``.

  Args: as ``begin_measurement``, with ``solves`` the solves so far.

  Returns:
    The advanced solves.
  """
  _, matvecs, begun = _solves(config, state, data, step)
  return tuple(
      krylov.advance(spec, matvec, solve, num_products)
      for matvec, (spec, _), solve in zip(matvecs, begun, solves)
  )


def measurement_running(
    solves: tuple[krylov.KrylovState, ...],
) -> tuple[jax.Array, jax.Array]:
  """Whether any solve of this member still needs products (its step too).

  Returns:
    ``(running, step)``: a bool and the number of products run so far.
  """
  running = jnp.any(jnp.stack([krylov.running(solve) for solve in solves]))
  return running, solves[0].solver.step


def finish_tracked_step(
    config: LoopConfig,
    hparams: Hyperparams,
    data: PyTree,
    eval_data: Any,
    state: TrainState,
    step: jax.Array,
    primal: tuple[jax.Array, PyTree, PyTree],
    solves: tuple[krylov.KrylovState, ...],
) -> tuple[TrainState, tuple[jax.Array, dict[str, jax.Array]]]:
  """The tracked step ``t`` from its measurement: ``loop._train_step``'s.

  Args:
    config, hparams, data, eval_data, state, step: as ``loop._train_step``.
    primal: ``(loss, grads, new_model_state)`` from ``begin_measurement``.
    solves: the finished solves.

  Returns:
    ``(new_state, (tracked, metrics))`` as ``loop._train_step``.
  """
  _, _, begun = _solves(config, state, data, step)
  measured = tuple(
      krylov.tracked(krylov.finish(spec, solve), start.start.dtype)
      for (spec, start), solve in zip(begun, solves)
  )
  supplied = Measurement(
      *primal,
      measured=measured[0],
      preconditioned=measured[1] if len(measured) > 1 else (),
  )
  return _train_step(
      config, hparams, data, eval_data, state, step, supplied=supplied
  )


def run_steps(
    config: LoopConfig,
    hparams: Hyperparams,
    data: PyTree,
    eval_data: Any,
    state: TrainState,
    start: jax.Array,
    num_steps: int,
) -> tuple[TrainState, ChunkOutput]:
  """Untracked steps ``start .. start + num_steps - 1``, unrolled.

  Args:
    config, hparams, data, eval_data, state: as ``loop.run_chunk``.
    start: the global index of the first step.
    num_steps: steps to run (static); none of them may be due a
      measurement (the caller runs those as tracked steps).

  Returns:
    The carry after the steps and their ``ChunkOutput`` (untracked rows).
  """
  tracked, metrics = [], []
  for i in range(num_steps):
    state, (flag, row) = _train_step(
        config, hparams, data, eval_data, state, start + i, supplied=None
    )
    tracked.append(flag)
    metrics.append(row)
  stack = lambda *xs: jnp.stack(xs)
  return state, ChunkOutput(
      step=start + jnp.arange(num_steps, dtype=jnp.int32),
      tracked=jnp.stack(tracked),
      metrics=jax.tree.map(stack, *metrics),
  )


def _menu_floor(n: int) -> int:
  """The largest menu size at most ``n`` (at least 1)."""
  return max([m for m in MENU if m <= max(n, 1)])


def stage_sizes(predicted: int, max_iters: int) -> Iterator[int]:
  """Products per stage of one check, until the cap (see the module).

  The first stage runs about the products the previous check needed
  (``predicted``, rounded down to the menu); the next ones double from 2,
  so a check that needs more pays one relinearization per stage and at
  most about twice the products beyond the first stage.

  Args:
    predicted: the products the previous check used (or a guess).
    max_iters: the cap on products.

  Yields:
    Stage sizes summing to at most ``max_iters``.

  Examples:
    >>> from sam_eos.staged import stage_sizes
    >>> list(stage_sizes(10, 30))
    [8, 2, 4, 8, 8]
  """
  done = 0
  size = _menu_floor(min(predicted, max_iters))
  growth = iter(MENU[1:])
  while done < max_iters:
    size = _menu_floor(min(size, max_iters - done))
    yield size
    done += size
    size = next(growth, MENU[-1])


def _has_convolution(jaxpr: Any) -> bool:
  """Whether a (sub)jaxpr holds a convolution."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == _CONVOLUTION:
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and _has_convolution(inner):
          return True
  return False


def uses_staging(fn: Callable[..., Any], *args: Any) -> bool:
  """Whether ``fn(*args)`` should run as staged programs (see the module).

  Args:
    fn: the function whose gradient the loop computes (the loss).
    *args: example arguments (traced abstractly, nothing runs).

  Returns:
    True where ``SAM_EOS_PROGRAMS=staged``, or, unless it is
    ``in_graph``, where the default backend is a CPU and ``fn`` holds a
    convolution.

  Raises:
    ValueError: if ``SAM_EOS_PROGRAMS`` is set to an unknown form.
  """
  form = os.environ.get(ENV_VAR, "")
  if form and form not in FORMS:
    raise ValueError(
        f"{ENV_VAR}={form!r} is not a program form: use one of {FORMS}, or "
        "leave it unset for staged programs on CPU for conv models."
    )
  if form:
    return form == "staged"
  if jax.default_backend() != "cpu":
    return False
  return _has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


@dataclasses.dataclass(frozen=True)
class HessianOperator:
  """The flat Hessian of ``loss_fn`` at ``(params, batch[, model_state])``.

  Hashable by ``loss_fn``'s identity, so ``solve``'s compiled stages are
  reused across calls with the same loss.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (``(scalar, aux)`` with
      ``has_aux``), or with ``with_state`` ``loss_fn(params, batch,
      model_state) -> (scalar, new_state)``, the state held fixed.
    has_aux: whether ``loss_fn`` returns a pair.
    with_state: whether ``model_state`` is its third argument.
  """

  loss_fn: Callable[..., Any]
  has_aux: bool = False
  with_state: bool = False

  def __call__(
      self, params: PyTree, batch: Any, model_state: PyTree = None
  ) -> tuple[Callable[[jax.Array], jax.Array], PyTree]:
    """``(flat matvec, gradient)`` at ``params``, one linearization."""
    loss = self.loss_fn
    if self.with_state:
      loss = lambda p, b: self.loss_fn(p, b, model_state)
    _, grads, matvec = linearize_gradient(
        loss, params, batch, has_aux=self.has_aux or self.with_state
    )
    return flat_matvec(matvec, params), grads


class SolveSettings(NamedTuple):
  """The static settings of a staged ``solve`` (see ``krylov.begin``)."""

  max_iters: int
  k: int
  tol: float | None
  which: str
  num_certified: int | None


def _begun(operator, settings, operands, start):
  """The operator's matvec and aux, the spec and the fresh solve."""
  matvec, aux = operator(*operands)
  spec, fresh = krylov.begin(
      matvec,
      start,
      settings.max_iters,
      k=settings.k,
      tol=settings.tol,
      which=settings.which,
      num_certified=settings.num_certified,
  )
  return matvec, aux, spec, fresh


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _first_stage(operator, settings, operands, start, num_products):
  matvec, aux, spec, solve = _begun(operator, settings, operands, start)
  solve = krylov.advance(spec, matvec, solve, num_products)
  return solve, aux, krylov.running(solve)


@functools.partial(jax.jit, static_argnums=(0, 1, 4), donate_argnums=(3,))
def _next_stage(operator, settings, operands, solve, num_products):
  matvec, _, spec, _ = _begun(operator, settings, operands, solve.start)
  solve = krylov.advance(spec, matvec, solve, num_products)
  return solve, krylov.running(solve)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _last_stage(operator, settings, operands, solve):
  spec = _begun(operator, settings, operands, solve.start)[2]
  return krylov.finish(spec, solve)


def solve(
    operator: Callable[..., tuple[Callable[[jax.Array], jax.Array], Any]],
    operands: tuple[Any, ...],
    start: jax.Array,
    settings: SolveSettings,
    *,
    predicted: int | None = None,
) -> tuple[krylov.KrylovResult, Any]:
  """``krylov.eigenpairs`` as compiled stages driven from the host.

  Not jit-able (it reads the stopping test between stages); each stage is
  a compiled straight-line program that rebuilds the operator from
  ``operands`` and runs unrolled products. The result equals
  ``krylov.eigenpairs(operator(*operands)[0], start, ...)`` to float
  rounding.

  Args:
    operator: a hashable ``operator(*operands) -> (matvec, aux)`` (e.g. a
      ``HessianOperator``); ``aux`` of the first stage is returned.
    operands: its array arguments.
    start: ``(b, n)`` or ``(n,)`` start block.
    settings: the solve's static settings (``tol`` a float or None).
    predicted: products expected (plans the first stage); default the
      start block's size plus ``COLD_EXTRA``.

  Returns:
    ``(KrylovResult, aux)``.
  """
  start = jnp.atleast_2d(jnp.asarray(start))
  if predicted is None:
    predicted = start.shape[0] + COLD_EXTRA
  sizes = stage_sizes(predicted, settings.max_iters)
  state, aux, running = _first_stage(
      operator, settings, operands, start, next(sizes)
  )
  for num in sizes:
    if not bool(running):
      break
    state, running = _next_stage(operator, settings, operands, state, num)
  return _last_stage(operator, settings, operands, state), aux


def is_traced(*trees: Any) -> bool:
  """Whether any leaf of ``trees`` is a tracer (inside ``jit``, ``vmap``)."""
  return any(
      isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees)
  )
