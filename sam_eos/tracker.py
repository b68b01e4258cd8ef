"""Sharpness tracking for a hand-written training loop, optax style.

``se.train`` tracks the sharpness inside its own compiled loop. Most
researchers keep their own jitted ``train_step``; ``SharpnessTracker`` gives
them the same measurement as a pair of pure functions, like an optax
transform:

* ``tracker.init(params) -> TrackerState``: a small pytree holding the
  warm-start block (the last top ``num_warm_vectors`` Ritz vectors of the
  Hessian, flat, float32 or wider) and a step counter;
* ``tracker.update(state, params, batch, *, learning_rate, ...) ->
  (TrackerState, TrackerMetrics)``: every ``track_every`` steps (a
  ``lax.cond``, so untracked steps cost nothing) it measures at ``params`` on
  ``batch``, exactly as the compiled loop does (``sam_eos.loop``):

  - ``sharpness``: the top Hessian eigenvalue of ``loss_fn(., batch)`` at
    ``params``, by Lanczos with a block warm start (``sam_eos.krylov``) on
    exact forward-over-reverse Hessian-vector products, stopping once the
    top pair's relative residual ``||H y - theta y|| / |theta|`` is at most
    ``tol`` (``max_iters`` products at most). ``sharpness_residual`` is the
    relative residual reached: some eigenvalue lies within
    ``sharpness_residual * |sharpness|`` of ``sharpness``, and ``sharpness``
    never exceeds the top eigenvalue (a Rayleigh quotient);
  - ``top_eigenvalues``: the top ``k = num_top_eigenvalues`` Ritz values of
    the same run, descending (``top_eigenvalues[0]`` is ``sharpness``); with
    ``k > 1`` the stopping test certifies all ``k`` top pairs to ``tol``, as
    ``se.train(..., num_top_eigenvalues=k)`` does for its columns
    ``top_eigenvalue_2..k``;
  - ``lambda_min``: the bottom Ritz value of the same run (an upper bound on
    the smallest eigenvalue, not certified), ``lanczos_iters`` (the products
    used);
  - ``grad_norm`` (the one passed in, else that of the gradient the
    linearization computes anyway), ``gd_edge = 2 (1 + beta) / eta`` and
    the ``sam_edge`` at that gradient norm (the USAM-edge for a tracker
    built with ``normalize=False``).

  Untracked steps return NaN metrics (``tracked`` False) and leave the
  warm-start block unchanged.

The gradient norm of the SAM-edge must be the one at ``params`` on the same
batch as the Hessian (the step's own batch in minibatch SAM); pass the norm
your step already computed (e.g. ``se.sam_gradient(...).grad_norm``) or let
the tracker compute it.

Low precision: with bfloat16 (or float16) parameters each Hessian-vector
product runs in that dtype and everything else (basis, norms, edges) in
float32. The products then carry a relative rounding error of a few ``eps``
(``2^-7`` for bfloat16), below which no residual can fall: use a ``tol`` of
about ``eps`` or more, or every measurement runs to ``max_iters`` (on a
small bfloat16 MLP the residual stalls at ``3e-3`` with the sharpness
``1.3e-4`` from the float64 answer; tests/test_tracker.py).

Model state (e.g. BatchNorm statistics): build the tracker with
``has_aux=True`` and a ``loss_fn(params, batch, model_state) -> (loss,
new_model_state)``, and pass ``model_state=`` to ``update``. The Hessian is
then that of ``w -> loss_fn(w, batch, model_state)[0]`` with the state held
fixed (in whatever mode the loss runs it, training mode for BatchNorm: the
batch statistics depend on ``w`` and are differentiated through, the
running averages are not); the new state is dropped.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (the tracked quantities).
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021.
  optax (github.com/google-deepmind/optax): the init/update design.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_eos import _checks, edges, krylov, staged
from sam_eos._types import ArrayLike, LossFn, PyTree
from sam_eos.hessian import flat_matvec, linearize_gradient
from sam_eos.lanczos import working_dtype
from sam_eos.sam import global_norm


class TrackerState(NamedTuple):
  """The carry of a ``SharpnessTracker``.

  Attributes:
    eigvecs: ``(num_warm_vectors, n)`` flat unit vectors (working dtype,
      float32 or wider): the last top Ritz vectors of the Hessian, top first,
      the warm start of the next measurement; ``n`` the number of
      parameters in ``ravel_pytree`` order.
    count: int32 scalar, the number of ``update`` calls so far.
  """

  eigvecs: jax.Array
  count: jax.Array


class TrackerMetrics(NamedTuple):
  """What one ``update`` measured; every float is NaN when not ``tracked``.

  Floats are in the working dtype (float32 for bfloat16, float16 or float32
  parameters, float64 for float64 ones).

  Attributes:
    step: int32 scalar, the step the metrics belong to.
    tracked: bool scalar, whether this step was measured.
    sharpness: the top Hessian eigenvalue (Ritz value).
    lambda_min: the bottom Ritz value of the same run.
    lanczos_iters: Hessian-vector products used (as a float, NaN when not
      tracked).
    sharpness_residual: relative residual ``||H y - theta y|| / |theta|``
      of the top pair.
    grad_norm: ``||grad L(w)||`` used by the SAM-edge.
    gd_edge: ``2 (1 + momentum) / learning_rate``.
    sam_edge: ``se.sam_edge(learning_rate, rho, grad_norm, momentum=...)``
      (``se.usam_edge`` for ``normalize=False``).
    top_eigenvalues: ``(k,)``, ``k = num_top_eigenvalues``: the ``k``
      largest Ritz values of the same run, descending, ``top_eigenvalues[0]
      == sharpness`` (``se.train``'s ``sharpness, top_eigenvalue_2, ...,
      top_eigenvalue_k``). Each lies within ``tol`` times its absolute value
      of some Hessian eigenvalue unless the run stopped at the cap
      (``lanczos_iters == min(max_iters, n)``).
  """

  step: jax.Array
  tracked: jax.Array
  sharpness: jax.Array
  lambda_min: jax.Array
  lanczos_iters: jax.Array
  sharpness_residual: jax.Array
  grad_norm: jax.Array
  gd_edge: jax.Array
  sam_edge: jax.Array
  top_eigenvalues: jax.Array


@dataclasses.dataclass(frozen=True)
class SharpnessTracker:
  """Warm-started, certified sharpness tracking inside your own train step.

  ``init`` and ``update`` are pure and jit-able (``update`` also vmap-able
  over the state, the parameters and the hyperparameters); call ``update``
  inside your jitted step, once per step. It measures when
  ``step % track_every == 0`` (``step`` defaults to the state's own counter;
  pass your loop's step, unbatched, to keep the ``lax.cond`` a real branch
  under ``vmap``).

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar``, or with ``has_aux``
      ``(scalar, aux)``; with ``has_aux`` and ``model_state`` passed to
      ``update``, ``loss_fn(params, batch, model_state) -> (scalar,
      new_model_state)``.
    track_every: measure every ``track_every`` steps (``>= 1``).
    tol: relative residual at which Lanczos stops (certified), or None for
      exactly ``max_iters`` products.
    max_iters: the cap on Hessian-vector products per measurement (capped
      at the number of parameters).
    num_warm_vectors: Ritz vectors carried as the warm start,
      ``<= max_iters``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is
      dropped.
    normalize: whether the SAM is normalized (``sam_edge``) or not
      (``usam_edge``).
    num_top_eigenvalues: the number ``k`` of top Hessian eigenvalues
      measured (``metrics.top_eigenvalues``), all ``k`` certified to ``tol``
      (more products per measurement for ``k > 1``); ``1 <= k <=
      num_warm_vectors`` (the Ritz pairs a measurement returns, so ``k <=
      max_iters`` too) and at most the number of parameters. The loop's
      equivalent is ``se.train(..., num_top_eigenvalues=k)``.

  Raises:
    ValueError: at construction, if ``loss_fn`` is not callable, an integer
      setting is out of range, ``num_warm_vectors > max_iters``,
      ``num_top_eigenvalues > num_warm_vectors`` or ``tol`` is not positive
      (each message names the argument).

  Examples:
    A hand-written GD loop on a least-squares loss, whose Hessian is
    ``2 x^T x / N``; every 5th step is measured:

    >>> import jax, jax.numpy as jnp, numpy as np, optax, sam_eos as se
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> batch = (x, jnp.ones(16))
    >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    >>> tracker = se.SharpnessTracker(loss, track_every=5, tol=1e-5)
    >>> opt = optax.sgd(0.1)
    >>> @jax.jit
    ... def step(w, opt_state, tracker_state):
    ...   grads = jax.grad(loss)(w, batch)
    ...   tracker_state, metrics = tracker.update(
    ...       tracker_state, w, batch, learning_rate=0.1)
    ...   updates, opt_state = opt.update(grads, opt_state)
    ...   return optax.apply_updates(w, updates), opt_state, tracker_state, metrics
    >>> w = jnp.zeros(4)
    >>> opt_state, tracker_state = opt.init(w), tracker.init(w)
    >>> for t in range(6):
    ...   w, opt_state, tracker_state, m = step(w, opt_state, tracker_state)
    ...   if m.tracked:
    ...     print(int(m.step), float(m.gd_edge), float(m.sharpness_residual) < 1e-5)
    0 20.0 True
    5 20.0 True
    >>> dense = np.linalg.eigvalsh(2 * np.asarray(x.T @ x) / 16)[::-1]
    >>> bool(np.isclose(m.sharpness, dense[0], rtol=1e-4))
    True

    The top two eigenvalues, both certified:

    >>> top2 = se.SharpnessTracker(loss, tol=1e-5, num_top_eigenvalues=2)
    >>> _, m2 = top2.update(top2.init(w), w, batch, learning_rate=0.1)
    >>> m2.top_eigenvalues.shape, bool(m2.top_eigenvalues[0] == m2.sharpness)
    ((2,), True)
    >>> bool(np.allclose(m2.top_eigenvalues, dense[:2], rtol=1e-4))
    True

  References:
    Long & Bartlett 2023; Cohen et al. 2021; optax's init/update design.
  """

  loss_fn: LossFn
  track_every: int = 10
  tol: float | None = 1e-3
  max_iters: int = 20
  num_warm_vectors: int = 3
  has_aux: bool = False
  normalize: bool = True
  num_top_eigenvalues: int = 1

  def __post_init__(self):
    if not callable(self.loss_fn):
      raise ValueError(
          f"`loss_fn` must be callable, got {type(self.loss_fn).__name__}."
      )
    _checks.check_int("track_every", self.track_every, 1)
    _checks.check_int("max_iters", self.max_iters, 1)
    _checks.check_int("num_warm_vectors", self.num_warm_vectors, 1)
    if self.num_warm_vectors > self.max_iters:
      raise ValueError(
          f"`num_warm_vectors` ({self.num_warm_vectors}) must be <= "
          f"`max_iters` ({self.max_iters})."
      )
    _checks.check_int("num_top_eigenvalues", self.num_top_eigenvalues, 1)
    if self.num_top_eigenvalues > self.max_iters:
      raise ValueError(
          f"`num_top_eigenvalues` ({self.num_top_eigenvalues}) must be <= "
          f"`max_iters` ({self.max_iters}): a measurement finds at most "
          "that many Ritz values; raise `max_iters` and `num_warm_vectors` "
          "to at least `num_top_eigenvalues`."
      )
    if self.num_top_eigenvalues > self.num_warm_vectors:
      raise ValueError(
          f"`num_top_eigenvalues` ({self.num_top_eigenvalues}) must be <= "
          f"`num_warm_vectors` ({self.num_warm_vectors}): a measurement "
          "returns that many Ritz pairs; pass "
          f"num_warm_vectors={self.num_top_eigenvalues} or more."
      )
    if self.tol is not None:
      if isinstance(self.tol, bool) or not np.isscalar(self.tol):
        raise ValueError(
            f"`tol` must be a positive scalar or None, got {self.tol!r}."
        )
      _checks.check_positive("tol", self.tol)

  def _sizes(self, params: PyTree) -> tuple[int, int, int]:
    """``n``, the Lanczos cap and the warm-block size for ``params``."""
    flat, _ = ravel_pytree(params)
    if flat.size == 0:
      raise ValueError("`params` must hold at least one parameter.")
    if not jnp.issubdtype(flat.dtype, jnp.floating):
      raise ValueError(
          f"`params` must be floating point, got dtype {flat.dtype}."
      )
    if self.num_top_eigenvalues > flat.size:
      raise ValueError(
          f"`num_top_eigenvalues` ({self.num_top_eigenvalues}) must be <= "
          f"the number of parameters ({flat.size})."
      )
    max_iters = min(self.max_iters, flat.size)
    return flat.size, max_iters, min(self.num_warm_vectors, max_iters)

  def init(
      self, params: PyTree, *, key: jax.Array | None = None
  ) -> TrackerState:
    """The initial state: random unit start vectors and a zero counter.

    Args:
      params: the parameter pytree (only structure, sizes and dtype used).
      key: PRNG key of the random start block; None means
        ``jax.random.key(0)``.

    Returns:
      ``TrackerState`` with ``eigvecs`` of shape ``(b, n)``, ``b =
      min(num_warm_vectors, max_iters, n)``, in the working dtype.

    Raises:
      ValueError: if ``params`` holds no parameter, is not floating point or
        holds fewer than ``num_top_eigenvalues`` parameters.
    """
    size, _, num_vectors = self._sizes(params)
    dtype = working_dtype(ravel_pytree(params)[0].dtype)
    key = jax.random.key(0) if key is None else key
    v0 = jax.random.normal(key, (num_vectors, size), dtype)
    return TrackerState(
        eigvecs=v0 / jnp.linalg.norm(v0, axis=1, keepdims=True),
        count=jnp.array(0, jnp.int32),
    )

  def measure(
      self,
      state: TrackerState,
      params: PyTree,
      batch: Any,
      *,
      learning_rate: ArrayLike,
      rho: ArrayLike = 0.0,
      grad_norm: ArrayLike | None = None,
      momentum: ArrayLike = 0.0,
      model_state: PyTree = None,
  ) -> tuple[TrackerState, TrackerMetrics]:
    """One measurement now, whatever the step (``update``'s tracked branch).

    Args and Returns: as ``update`` (``count`` is not advanced and
    ``metrics.step`` is the state's counter).
    """
    self._check_state(state, params)
    loss = self._loss(model_state)
    _, grads, matvec = linearize_gradient(
        loss, params, batch, has_aux=self.has_aux
    )
    _, max_iters, _ = self._sizes(params)
    measured = krylov.track_top(
        flat_matvec(matvec, params),
        state.eigvecs,
        max_iters,
        self.tol,
        num_certified=self.num_top_eigenvalues,
    )
    return self._metrics(
        state, measured, grads, learning_rate, rho, grad_norm, momentum
    )

  def _metrics(
      self,
      state: TrackerState,
      measured: krylov.Tracked,
      grads: PyTree,
      learning_rate: ArrayLike,
      rho: ArrayLike,
      grad_norm: ArrayLike | None,
      momentum: ArrayLike,
  ) -> tuple[TrackerState, TrackerMetrics]:
    """The new state and metrics of a measurement (``measure``'s end)."""
    dtype = state.eigvecs.dtype
    norm = global_norm(grads) if grad_norm is None else grad_norm
    norm = jnp.asarray(norm).astype(dtype)
    gd, sam = edges.stability_edges(
        learning_rate, rho, norm, momentum=momentum, normalize=self.normalize
    )
    metrics = TrackerMetrics(
        step=state.count,
        tracked=jnp.array(True),
        sharpness=measured.sharpness.astype(dtype),
        lambda_min=measured.lambda_min.astype(dtype),
        lanczos_iters=measured.lanczos_iters.astype(dtype),
        sharpness_residual=measured.residual.astype(dtype),
        grad_norm=norm,
        gd_edge=jnp.asarray(gd).astype(dtype),
        sam_edge=jnp.asarray(sam).astype(dtype),
        top_eigenvalues=measured.values[: self.num_top_eigenvalues].astype(
            dtype
        ),
    )
    return state._replace(eigvecs=measured.vectors), metrics

  def measure_staged(
      self,
      state: TrackerState,
      params: PyTree,
      batch: Any,
      *,
      learning_rate: ArrayLike,
      rho: ArrayLike = 0.0,
      grad_norm: ArrayLike | None = None,
      momentum: ArrayLike = 0.0,
      model_state: PyTree = None,
  ) -> tuple[TrackerState, TrackerMetrics]:
    """``measure`` as straight-line programs: for CPU loops with convolutions.

    On CPU, XLA runs a convolution's backward pass 10-26x slower inside a
    ``cond`` or ``while_loop`` (jax-ml/jax#12868), which is where ``update``
    and ``measure`` put every Hessian-vector product. Call this one from
    Python, outside ``jit``, at your check steps (e.g. ``if step %
    track_every == 0``), with your jitted step doing the training alone. It
    runs the same solve as compiled stages of unrolled products (each
    relinearizing at ``params``) with the stopping test between them on the
    host (``sam_eos.staged``), and returns what ``measure`` returns, to
    float rounding. The programs compile once per tracker and shapes.

    Args and Returns: as ``measure``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, sam_eos as se
      >>> x = jax.random.normal(jax.random.key(0), (16, 4))
      >>> batch = (x, jnp.ones(16))
      >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> tracker = se.SharpnessTracker(loss, tol=1e-5)
      >>> w = jnp.zeros(4)
      >>> _, m = tracker.measure_staged(tracker.init(w), w, batch,
      ...                               learning_rate=0.1)
      >>> dense = np.linalg.eigvalsh(2 * np.asarray(x.T @ x) / 16)[-1]
      >>> bool(np.isclose(m.sharpness, dense, rtol=1e-4))
      True
    """
    self._check_state(state, params)
    if model_state is not None and not self.has_aux:
      raise ValueError(
          "`model_state` needs a tracker built with has_aux=True and a "
          "loss_fn(params, batch, model_state) -> (loss, new_model_state)."
      )
    _, max_iters, _ = self._sizes(params)
    operator = staged.HessianOperator(
        self.loss_fn, self.has_aux, model_state is not None
    )
    settings = staged.SolveSettings(
        max_iters, state.eigvecs.shape[0], self.tol, "top",
        self.num_top_eigenvalues,
    )  # fmt: skip
    result, grads = staged.solve(
        operator, (params, batch, model_state), state.eigvecs, settings
    )
    measured = krylov.tracked(result, state.eigvecs.dtype)
    return _finish(
        self, state, measured, grads, learning_rate, rho, grad_norm, momentum
    )

  def update(
      self,
      state: TrackerState,
      params: PyTree,
      batch: Any,
      *,
      learning_rate: ArrayLike,
      rho: ArrayLike = 0.0,
      grad_norm: ArrayLike | None = None,
      momentum: ArrayLike = 0.0,
      step: ArrayLike | None = None,
      model_state: PyTree = None,
  ) -> tuple[TrackerState, TrackerMetrics]:
    """Measures at ``params`` on ``batch`` if the step is due; else NaNs.

    Args:
      state: the tracker state from ``init`` or the previous ``update``.
      params: the current iterate ``w_t`` (before this step's update).
      batch: the step's batch, passed unchanged to ``loss_fn``.
      learning_rate: the step size ``eta > 0`` (may be traced).
      rho: the SAM radius ``>= 0`` (0 for GD; may be traced).
      grad_norm: ``||grad L(w_t)||`` on ``batch``, or None to compute it
        (free: the linearization produces the gradient).
      momentum: heavy-ball coefficient in ``[0, 1)`` of the base optimizer.
      step: the step number deciding whether to measure (``step %
        track_every == 0``); None uses ``state.count``.
      model_state: the model state to hold fixed (needs ``has_aux``), or
        None for ``loss_fn(params, batch)``.

    Returns:
      ``(new_state, metrics)``: ``new_state.count`` advanced by one and, on
      a tracked step, the new top Ritz vectors as the warm start;
      ``metrics`` a ``TrackerMetrics`` (NaN floats when not tracked).

    Raises:
      ValueError: if ``state`` does not fit ``params`` (names ``state``),
        if ``model_state`` is given without ``has_aux`` (names
        ``model_state``), or for a concrete ``learning_rate <= 0``,
        ``rho < 0``, ``grad_norm < 0`` or ``momentum`` outside ``[0, 1)``
        (each named).
    """
    self._check_state(state, params)
    if model_state is not None and not self.has_aux:
      raise ValueError(
          "`model_state` needs a tracker built with has_aux=True and a "
          "loss_fn(params, batch, model_state) -> (loss, new_model_state)."
      )
    _checks.check_positive("learning_rate", learning_rate)
    _checks.check_nonnegative("rho", rho)
    _checks.check_momentum(momentum)
    if grad_norm is not None:
      _checks.check_nonnegative("grad_norm", grad_norm)
    step = state.count if step is None else jnp.asarray(step, jnp.int32)
    tracked = step % self.track_every == 0

    def measured(state):
      return self.measure(
          state,
          params,
          batch,
          learning_rate=learning_rate,
          rho=rho,
          grad_norm=grad_norm,
          momentum=momentum,
          model_state=model_state,
      )

    def skipped(state):
      shapes = jax.eval_shape(measured, state)[1]
      nans = TrackerMetrics(
          *(
              jnp.full(x.shape, jnp.nan, x.dtype)
              if jnp.issubdtype(x.dtype, jnp.floating)
              else jnp.zeros(x.shape, x.dtype)
              for x in shapes
          )
      )
      return state, nans

    new_state, metrics = jax.lax.cond(tracked, measured, skipped, state)
    metrics = metrics._replace(step=step, tracked=tracked)
    return new_state._replace(count=state.count + 1), metrics

  def _loss(self, model_state: PyTree) -> LossFn:
    """``loss_fn``, with ``model_state`` bound as its third argument."""
    if model_state is None:
      return self.loss_fn
    return lambda params, batch: self.loss_fn(params, batch, model_state)

  def _check_state(self, state: TrackerState, params: PyTree) -> None:
    """Raises ValueError (naming ``state``) unless it fits ``params``."""
    if not isinstance(state, TrackerState):
      raise ValueError(
          "`state` must be the TrackerState from `init` or `update`, got "
          f"{type(state).__name__}."
      )
    size, _, num_vectors = self._sizes(params)
    shape = tuple(np.shape(state.eigvecs))
    if shape != (num_vectors, size):
      raise ValueError(
          f"`state` does not fit `params`: its eigvecs have shape {shape}, "
          f"expected ({num_vectors}, {size}) (num_warm_vectors, number of "
          "parameters); call `init(params)` for these parameters."
      )


@functools.partial(jax.jit, static_argnums=(0,))
def _finish(tracker, state, measured, grads, *args):
  """``SharpnessTracker._metrics``, compiled (``measure_staged``'s end)."""
  return tracker._metrics(state, measured, grads, *args)
