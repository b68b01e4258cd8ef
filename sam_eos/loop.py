"""The pure training core: a ``lax.scan`` of GD/SAM steps with in-graph tracking.

One compiled chunk runs ``chunk_len`` steps. Step ``t`` (a global counter,
not part of the vmapped state) draws its batch from ``fold_in(key, t)``,
computes the loss and gradient at the iterate ``w_t`` and, every
``track_every`` steps (``lax.cond`` on an unbatched predicate, so it stays a
real branch under ``vmap``), measures at ``w_t`` on the step's batch:

* ``sharpness``: the top Hessian eigenvalue, by Lanczos (``sam_eos.krylov``)
  warm-started from the previous top ``num_warm_vectors`` Ritz vectors (kept
  in the carry; their Rayleigh-Ritz step finds the new top eigenvector even
  when the top eigenvalues swap order), reusing the linearization that
  produced the gradient (no extra gradient on tracked steps). With a
  ``sharpness_tol`` it stops once the top pair's relative residual
  ``||H y - theta y|| / |theta|`` is at most the tolerance, capped at
  ``num_lanczos_iters`` products;
* ``lanczos_iters`` (the Hessian-vector products used) and
  ``sharpness_residual`` (the relative residual reached: some eigenvalue
  lies within ``sharpness_residual * sharpness`` of ``sharpness``);
* with ``num_top_eigenvalues = k > 1``, ``top_eigenvalue_2`` ...
  ``top_eigenvalue_k``: the next Ritz values of the same run, the stopping
  test then certifying all ``k`` top pairs to ``sharpness_tol``;
* ``lambda_min``: the bottom Ritz value of the same Lanczos run (free, not
  certified). It is an upper bound on the smallest Hessian eigenvalue, so
  ``|lambda_min| > sharpness`` proves that the dominant eigenvalue
  ``|lambda|`` the authors measure by power iteration is a negative one;
* ``grad_norm``, ``loss``, ``gd_edge``, ``sam_edge`` (``usam_edge`` for
  unnormalized SAM), ``grad_alignment = |cos(g, v1)|`` and
  ``sam_grad_alignment = |cos(g_SAM, v1)|``;
* with ``batch_sharpness_batches = K`` (minibatch runs), the batch sharpness
  ``E_B[g_B^T H_B g_B] / E_B[||g_B||^2]`` at ``w_t`` over ``K`` random
  batches of ``batch_size`` real examples drawn from
  ``batch_sharpness_key(key, t)`` (``stochastic.batch_sharpness``; columns
  ``batch_sharpness``, ``batch_sharpness_low``, ``batch_sharpness_high``)
  and ``batch_sam_edge = E_B[sam_edge(eta, rho, ||g_B||)]`` over the same
  batches (``stochastic.batch_sam_edge``; the USAM edge, which does not
  depend on the gradient, for unnormalized SAM), both with the loss at
  ``s_t``;
* if the config has an ``eval_fn``, its scalars ``eval_fn(w_t, eval_data)``
  (e.g. test loss and accuracy), inside the same compiled program.

It then takes the step ``w_{t+1} = w_t + base_update(grad L(w_t + e_t))``,
the SAM gradient coming from ``sam.perturbed_gradient`` fed with the step's
gradient (one more gradient per step; ``m_sharpness`` groups add their own;
none with ``use_sam=False``), as plain SAM, ASAM (``adaptive``) or
Eigen-SAM (``eigen_weight > 0``, with the top Ritz vector of the most
recent check, this step's on a tracked step). With a ``weight_decay``
``wd > 0`` the base update is fed ``grad L(w_t + e_t) + wd w_t`` and the
ascent ``e_t`` is along ``g_t`` (decay outside the perturbation) or, with
``decay_in_perturbation``, along ``g_t + wd w_t``; every recorded metric
is of the data loss ``L`` alone. The edges and alignments are computed on
tracked steps only.
Steps with ``t >= end`` are skipped (``lax.cond``), so a partial last chunk
reuses the same compiled program.

Model state (e.g. BatchNorm statistics): the loss is ``loss_fn(w, batch,
s_t) -> (loss, s_{t+1})``. The gradient, the Hessian (tracking) and the SAM
ascent all use the step's batch and the state ``s_t`` the step starts from,
in the same (training) mode; the carried state becomes the one returned by
the gradient at ``w_t`` (the perturbed point's is dropped), and ``eval_fn``
sees ``s_t`` with ``w_t``.

Divergence: step ``t`` diverges when its loss or gradient norm, its tracked
sharpness or ``lambda_min``, its new model state, or the new iterate
``w_{t+1}`` is not finite.
The first such step is recorded in ``TrainState.diverged_at``; from then on
the configuration is stopped: its params, optimizer state and eigenvector
stay at their last finite values (``w_t``) and its metrics are NaN, so in a
vmapped sweep the other configurations run on unharmed.

Everything here is pure; ``sam_eos.train`` is the driver (I/O, progress).
``sam_eos.staged`` runs the same ``_train_step`` as straight-line programs
(CPU conv models): ``supplied=None`` for an untracked step, a
``Measurement`` computed in stages for a tracked one.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (the tracked quantities, Figs. 1-6).
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021 (sharpness tracking during training).
  Kwon, Kim, Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
  Scale-Invariant Learning of Deep Neural Networks", ICML 2021 (``adaptive``).
  Luo et al., "Explicit Eigenvalue Regularization Improves Sharpness-Aware
  Minimization", 2024 (``eigen_weight``).
  Andreyev & Beneventano, "Edge of Stochastic Stability: Revisiting the Edge
  of Stability for SGD", arXiv:2412.20553, 2024 (``batch_sharpness``).
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021; Andriushchenko & Flammarion, "Towards
  Understanding Sharpness-Aware Minimization", ICML 2022 (weight decay).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from sam_eos import edges, krylov, stochastic
from sam_eos._types import PyTree
from sam_eos.hessian import flat_matvec
from sam_eos.lanczos import working_dtype
from sam_eos.sam import global_norm, perturbed_gradient

METRIC_NAMES = (
    "loss",
    "grad_norm",
    "sharpness",
    "lambda_min",
    "gd_edge",
    "sam_edge",
    "grad_alignment",
    "sam_grad_alignment",
    "lanczos_iters",
    "sharpness_residual",
)
# The metrics ``batch_sharpness_batches`` adds, in order.
BATCH_SHARPNESS_NAMES = (
    "batch_sharpness",
    "batch_sharpness_low",
    "batch_sharpness_high",
    "batch_sam_edge",
)
# Folded into a step's key for its batch-sharpness batches (see
# ``batch_sharpness_key``), so they differ from the step's own batch.
_BATCH_SHARPNESS_STREAM = 0x5EB5


def top_eigenvalue_names(num_top_eigenvalues: int) -> tuple[str, ...]:
  """The metrics ``num_top_eigenvalues = k`` adds: ``top_eigenvalue_2..k``.

  Args:
    num_top_eigenvalues: the number ``k >= 1`` of top eigenvalues tracked.

  Returns:
    The names of the 2nd to ``k``-th largest Ritz values (none for ``k = 1``,
    whose single value is ``sharpness``).

  Examples:
    >>> from sam_eos.loop import top_eigenvalue_names
    >>> top_eigenvalue_names(3)
    ('top_eigenvalue_2', 'top_eigenvalue_3')
  """
  return tuple(f"top_eigenvalue_{i}" for i in range(2, num_top_eigenvalues + 1))


def batch_sharpness_names(
    batch_sharpness_batches: int | None,
) -> tuple[str, ...]:
  """The metrics ``batch_sharpness_batches`` adds (none when it is None).

  Args:
    batch_sharpness_batches: the number ``K`` of random batches of each
      batch-sharpness estimate, or None for no estimate.

  Returns:
    ``BATCH_SHARPNESS_NAMES``, or ``()`` when ``batch_sharpness_batches`` is
    None.

  Examples:
    >>> from sam_eos.loop import batch_sharpness_names
    >>> batch_sharpness_names(8)
    ('batch_sharpness', 'batch_sharpness_low', 'batch_sharpness_high', 'batch_sam_edge')
    >>> batch_sharpness_names(None)
    ()
  """
  return () if batch_sharpness_batches is None else BATCH_SHARPNESS_NAMES


def batch_sharpness_key(key: jax.Array, step: jax.Array) -> jax.Array:
  """The PRNG key of step ``step``'s batch-sharpness batches.

  ``fold_in(fold_in(key, step), _BATCH_SHARPNESS_STREAM)``: reproducible
  from the run's ``key``, and distinct from ``fold_in(key, step)``, the key
  of the step's own batch. ``stochastic.batch_sharpness`` then draws batch
  ``i`` from ``fold_in`` of it with ``i``.

  Args:
    key: the run's PRNG key.
    step: the global step ``t``.

  Returns:
    The key passed to ``stochastic.batch_sharpness`` at step ``t``.
  """
  return jax.random.fold_in(
      jax.random.fold_in(key, step), _BATCH_SHARPNESS_STREAM
  )


class Hyperparams(NamedTuple):
  """Hyperparameters that may be traced, hence vmapped over in a sweep.

  Attributes:
    learning_rate: step size ``eta`` (scalar array).
    rho: SAM radius (scalar array); 0 gives plain GD/SGD.
  """

  learning_rate: jax.Array
  rho: jax.Array


class TrainState(NamedTuple):
  """The scan carry.

  Attributes:
    params: the iterate ``w_t``.
    opt_state: state of the base optimizer.
    key: the run's PRNG key; step ``t`` uses ``fold_in(key, t)``.
    eigvecs: ``(num_warm_vectors, n)`` flat unit vectors, the last top Ritz
      vectors of the Hessian, top first (the warm start), in the working
      dtype (float32 or wider).
    diverged_at: first diverged step (see the module docstring), -1 if none.
    model_state: the model's mutable state at ``w_t`` (e.g. BatchNorm
      running statistics), ``()`` for a stateless model.
    precond_vectors: ``(num_warm_vectors, n)`` warm start of the
      preconditioned measurement, ``()`` without a ``preconditioner``.
  """

  params: PyTree
  opt_state: optax.OptState
  key: jax.Array
  eigvecs: jax.Array
  diverged_at: jax.Array
  model_state: PyTree = ()
  precond_vectors: Any = ()


class ChunkOutput(NamedTuple):
  """Per-step outputs of one chunk, each of shape ``(chunk_len,)``.

  Attributes:
    step: global step index ``t``.
    tracked: whether row ``t`` was measured.
    metrics: dict name -> values (NaN on untracked rows, never used):
      ``METRIC_NAMES``, ``top_eigenvalue_names(num_top_eigenvalues)``,
      ``batch_sharpness_names(batch_sharpness_batches)``,
      ``preconditioned_sharpness`` with a ``preconditioner``, then the keys
      of ``eval_fn``'s dict.
  """

  step: jax.Array
  tracked: jax.Array
  metrics: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Static (compile-time) settings of the core.

  Attributes:
    loss_fn: ``loss_fn(params, batch, model_state) -> (loss, new_state)``
      (``sam_eos.train`` wraps a stateless loss into this form).
    batch_size: minibatch size drawn by key each step, or None for full batch.
    track_every: measure every ``track_every`` steps.
    num_lanczos_iters: Lanczos iterations per measurement (the cap when
      ``sharpness_tol`` is set).
    sharpness_tol: relative residual at which a measurement stops, or None
      for exactly ``num_lanczos_iters`` products.
    num_warm_vectors: Ritz vectors carried between measurements as the
      warm start (``num_top_eigenvalues <= num_warm_vectors <=
      num_lanczos_iters``).
    num_top_eigenvalues: the number ``k`` of top Ritz values recorded (and
      certified to ``sharpness_tol``) at each measurement: ``sharpness``,
      then the metrics ``top_eigenvalue_names(k)``.
    momentum: heavy-ball coefficient of the default SGD optimizer (static).
    normalize: normalized SAM (True) or unnormalized SAM (False).
    eps: added to ``||g||`` in the SAM normalization.
    use_sam: compute the perturbed gradient (False only when every rho is 0).
    optimizer: a custom optax base optimizer, or None for SGD(learning_rate,
      momentum) built from the (possibly traced) hyperparameters.
    m_sharpness: None for SAM with the whole batch's gradient (the paper's
      algorithm), or the number ``m`` of equal groups the batch is split
      into, each ascending with its own gradient and the SAM gradient being
      the mean of the groups' perturbed gradients (Foret et al.'s
      per-device "m-sharpness"; a different algorithm; see
      ``sam.perturbed_gradient``).
    adaptive: ASAM's perturbation, scaled elementwise by ``|w| +
      adaptive_eta`` (Kwon et al. 2021; see ``sam.sam_perturbation``).
    adaptive_eta: ASAM's ``eta_a >= 0``.
    eigen_weight: Eigen-SAM's weight ``alpha >= 0`` of the top Hessian
      eigenvector in the ascent direction (Luo et al. 2024; see
      ``sam.sam_perturbation``), the eigenvector being the top Ritz vector
      of the most recent measurement (refreshed every ``track_every``
      steps); 0 is plain SAM. Not together with ``adaptive``.
    batch_sharding: sharding of a drawn minibatch (data parallelism), or
      None.
    group_sharding: sharding of the ``(m, B/m, ...)`` groups, or None.
    eval_fn: ``eval_fn(params, eval_data) -> dict`` of real scalars (with
      ``eval_model_state``: ``eval_fn(params, eval_data, model_state)``),
      evaluated at tracked steps, or None.
    eval_model_state: whether ``eval_fn`` takes the model state.
    preconditioner: ``opt_state -> P``, a positive diagonal pytree like the
      params (e.g. ``se.adam_preconditioner``), or None. Tracked steps then
      also record ``preconditioned_sharpness``, the top eigenvalue of
      ``P^{-1/2} H P^{-1/2}`` at ``w_t`` with ``P`` from the optimizer state
      that reached ``w_t`` (Cohen et al. 2022), to the same tolerance.
    num_examples: minibatches are drawn from the first ``num_examples``
      rows of the data (the real examples; the rest is padding), or from
      all rows if None.
    injected_learning_rate: the custom ``optimizer`` is an
      ``optax.inject_hyperparams`` one with a ``learning_rate``
      hyperparameter: the run's ``learning_rate`` is written into its state
      at step 0, and the edges use the ``learning_rate`` (and ``momentum``,
      if injected) that the optimizer's state holds after each update.
    batch_sharpness_batches: with a ``batch_size``, the number ``K`` of
      random batches of ``batch_size`` examples (from the first
      ``num_examples`` rows) over which tracked steps estimate the batch
      sharpness and ``batch_sam_edge`` at ``w_t``; None for no estimate.
    weight_decay: ``wd >= 0``; the base optimizer is fed ``grad L(w + e) +
      wd w`` (L2 regularization coupled to the gradient), 0 for none.
    decay_in_perturbation: the SAM ascent is along ``g + wd w`` (the
      regularized loss's gradient, as ``optax.chain(
      optax.add_decayed_weights(wd), sam(base, rho))``) instead of ``g``
      (as ``sam(optax.chain(optax.add_decayed_weights(wd), base), rho)``).
      Not with ``m_sharpness``.
    axis_name: the name of the ``vmap`` axis over configurations that the
      core runs under, or None when it is not vmapped. Tracking passes it to
      the solver, whose stopping test then stays a loop condition shared by
      the configurations instead of a select over its basis at every product
      (``krylov.eigenpairs``).
  """

  loss_fn: Callable[[PyTree, Any, PyTree], tuple[jax.Array, PyTree]]
  batch_size: int | None = None
  track_every: int = 10
  num_lanczos_iters: int = 20
  sharpness_tol: float | None = None
  num_warm_vectors: int = 1
  num_top_eigenvalues: int = 1
  momentum: float = 0.0
  normalize: bool = True
  eps: float = 1e-12
  use_sam: bool = True
  optimizer: optax.GradientTransformation | None = None
  m_sharpness: int | None = None
  adaptive: bool = False
  adaptive_eta: float = 0.01
  eigen_weight: float = 0.0
  batch_sharding: jax.sharding.Sharding | None = None
  group_sharding: jax.sharding.Sharding | None = None
  eval_fn: Callable[[PyTree, Any], dict[str, jax.Array]] | None = None
  num_examples: int | None = None
  injected_learning_rate: bool = False
  eval_model_state: bool = False
  preconditioner: Callable[[optax.OptState], PyTree] | None = None
  batch_sharpness_batches: int | None = None
  weight_decay: float = 0.0
  decay_in_perturbation: bool = False
  axis_name: str | None = None


def make_optimizer(
    config: LoopConfig, hparams: Hyperparams
) -> optax.GradientTransformation:
  """The base optimizer: ``config.optimizer`` or SGD with heavy-ball momentum.

  Args:
    config: static settings.
    hparams: hyperparameters (``learning_rate`` may be traced).

  Returns:
    An optax transformation fed with the (SAM) gradient.
  """
  if config.optimizer is not None:
    return config.optimizer
  return optax.sgd(
      hparams.learning_rate,
      momentum=config.momentum if config.momentum else None,
  )


def init_state(
    config: LoopConfig,
    params: PyTree,
    hparams: Hyperparams,
    key: jax.Array,
    model_state: PyTree = (),
) -> TrainState:
  """Initial carry: optimizer state and random start vectors for Lanczos.

  Args:
    config: static settings.
    params: initial parameters ``w_0``.
    hparams: hyperparameters.
    key: the run's PRNG key.
    model_state: the model's initial mutable state (``()`` if none).

  Returns:
    A ``TrainState`` at step 0.
  """
  flat, _ = ravel_pytree(params)
  shape = (config.num_warm_vectors, flat.size)
  eigvecs = _unit_rows(
      jax.random.split(key)[1], shape, working_dtype(flat.dtype)
  )
  opt_state = make_optimizer(config, hparams).init(params)
  if config.injected_learning_rate:
    injected = opt_state.hyperparams
    opt_state = opt_state._replace(
        hyperparams={
            **injected,
            "learning_rate": jnp.asarray(
                hparams.learning_rate, injected["learning_rate"].dtype
            ),
        }
    )
  return TrainState(
      params=params,
      opt_state=opt_state,
      key=key,
      eigvecs=eigvecs,
      diverged_at=jnp.array(-1, jnp.int32),
      model_state=model_state,
      precond_vectors=(
          ()
          if config.preconditioner is None
          else _unit_rows(
              jax.random.fold_in(key, 1), eigvecs.shape, eigvecs.dtype
          )
      ),
  )


def _unit_rows(key: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
  """Random Gaussian rows of unit norm: a cold Lanczos start block."""
  rows = jax.random.normal(key, shape, dtype)
  return rows / jnp.linalg.norm(rows, axis=1, keepdims=True)


def sample_batch(
    data: PyTree,
    key: jax.Array,
    batch_size: int | None,
    sharding: jax.sharding.Sharding | None = None,
    num_examples: int | None = None,
) -> PyTree:
  """Full batch, or ``batch_size`` examples drawn without replacement.

  Args:
    data: pytree of arrays sharing the leading (example) axis ``N``.
    key: PRNG key of this step.
    batch_size: minibatch size ``B <= num_examples`` or None.
    sharding: if given, the drawn minibatch is constrained to it (e.g.
      split along a ``"data"`` mesh axis).
    num_examples: draw among the first ``num_examples`` rows only (the
      rest being padding), or among all ``N`` rows if None.

  Returns:
    ``data`` itself, or the pytree of the ``B`` drawn examples.
  """
  if batch_size is None:
    return data
  if num_examples is None:
    num_examples = jax.tree.leaves(data)[0].shape[0]
  idx = jax.random.choice(key, num_examples, (batch_size,), replace=False)
  batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
  if sharding is not None:
    batch = jax.lax.with_sharding_constraint(batch, sharding)
  return batch


def step_batch(
    config: LoopConfig, state: TrainState, data: PyTree, step: jax.Array
) -> Any:
  """Step ``step``'s batch: ``sample_batch`` with ``fold_in(key, step)``."""
  return sample_batch(
      data,
      jax.random.fold_in(state.key, step),
      config.batch_size,
      config.batch_sharding,
      config.num_examples,
  )


def _abs_cos(u: jax.Array, v: jax.Array) -> jax.Array:
  """``|<u, v>| / (||u|| ||v||)`` in float32 or wider, 0 when either is zero.

  Float16 squares overflow past 256, so narrower vectors are widened first.
  """
  dtype = jnp.promote_types(jnp.result_type(u, v), jnp.float32)
  u, v = u.astype(dtype), v.astype(dtype)
  denom = jnp.linalg.norm(u) * jnp.linalg.norm(v)
  dot = jnp.abs(jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST))
  return jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)


def _step_hyperparams(
    config: LoopConfig, hparams: Hyperparams, opt_state: optax.OptState
) -> tuple[Any, Any]:
  """The learning rate and momentum of the update just taken.

  The run's own, or those an ``inject_hyperparams`` optimizer's state holds
  after the update (``config.injected_learning_rate``).
  """
  if not config.injected_learning_rate:
    return hparams.learning_rate, config.momentum
  injected = opt_state.hyperparams
  return injected["learning_rate"], injected.get("momentum", 0.0)


def _all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every floating leaf of ``tree`` is finite."""
  checks = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _gradient(
    config: LoopConfig, params: PyTree, batch: Any, model_state: PyTree
) -> tuple[jax.Array, PyTree, PyTree]:
  """Loss, gradient and the new model state at ``params`` (no tracking)."""
  (loss, new_state), grads = jax.value_and_grad(config.loss_fn, has_aux=True)(
      params, batch, model_state
  )
  return loss, grads, new_state


def operators(
    config: LoopConfig, state: TrainState, batch: Any
) -> tuple[tuple[jax.Array, PyTree, PyTree], tuple[Any, ...], tuple[Any, ...]]:
  """The step's gradient and the operators a tracked step measures.

  Linearizes ``value_and_grad`` once (as ``hessian.linearize_gradient``
  does): its primal output is the step's loss, gradient and new model state,
  and its tangent map the Hessian-vector product (of the loss with the model
  state held at ``state.model_state``). With a ``preconditioner``, the same
  product also gives ``v -> d * H (d * v)``, ``d = P^{-1/2}`` flattened with
  ``P`` from ``state.opt_state`` (Cohen et al. 2022).

  Args:
    config: static settings.
    state: the carry at ``w_t``.
    batch: the step's batch.

  Returns:
    ``((loss, grads, new_model_state), matvecs, starts)``: the flat
    operators (the Hessian first) and their warm-start blocks.
  """
  params = state.params
  primal, linear = jax.linearize(
      lambda w: _gradient(config, w, batch, state.model_state), params
  )
  matvec = flat_matvec(lambda v: linear(v)[1], params)
  if config.preconditioner is None:
    return primal, (matvec,), (state.eigvecs,)
  vectors = state.precond_vectors
  diagonal = ravel_pytree(config.preconditioner(state.opt_state))[0]
  scale = jax.lax.rsqrt(diagonal.astype(vectors.dtype))
  scaled = lambda v: scale * matvec(scale * v).astype(vectors.dtype)
  return primal, (matvec, scaled), (state.eigvecs, vectors)


def num_certified(config: LoopConfig) -> tuple[int, int]:
  """Pairs certified by the Hessian's and the preconditioned solve."""
  return config.num_top_eigenvalues, 1


def _measure(
    config: LoopConfig,
    state: TrainState,
    batch: Any,
) -> tuple[jax.Array, PyTree, PyTree, krylov.Tracked, Any]:
  """Loss, gradient, new model state and the Hessian's top Ritz pairs.

  The operators of ``operators``, each measured by ``krylov.track_top``
  warm-started from its carried block (``state.eigvecs``; the
  preconditioned one, last output, else ``()``, from
  ``state.precond_vectors``).
  """
  primal, matvecs, starts = operators(config, state, batch)
  measured = tuple(
      krylov.track_top(
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
  return (*primal, measured[0], measured[1] if len(measured) > 1 else ())


def _evaluate(
    config: LoopConfig, params: PyTree, eval_data: Any, model_state: PyTree
) -> dict[str, jax.Array]:
  """``eval_fn``'s dict of arrays at ``params`` (empty without one)."""
  if config.eval_fn is None:
    return {}
  args = (model_state,) if config.eval_model_state else ()
  return {
      k: jnp.asarray(v)
      for k, v in config.eval_fn(params, eval_data, *args).items()
  }


def _batch_metrics(
    config: LoopConfig,
    state: TrainState,
    data: PyTree,
    step: jax.Array,
    learning_rate: jax.Array,
    rho: jax.Array,
    momentum: Any,
) -> dict[str, jax.Array]:
  """The batch sharpness and ``batch_sam_edge`` at ``w_t`` (see the module).

  Both draw the same ``K = config.batch_sharpness_batches`` batches of
  ``config.batch_size`` real examples, from ``batch_sharpness_key(key,
  step)``, and use the loss with the model state held at ``s_t``.
  """
  loss_fn = lambda p, b: config.loss_fn(p, b, state.model_state)
  examples = data
  if config.num_examples is not None:
    examples = jax.tree.map(lambda x: x[: config.num_examples], data)
  sampling = dict(
      batch_size=config.batch_size,
      num_batches=config.batch_sharpness_batches,
      key=batch_sharpness_key(state.key, step),
      has_aux=True,
  )
  sharpness = stochastic.batch_sharpness(
      loss_fn, state.params, examples, **sampling
  )
  if config.normalize:
    edge = stochastic.batch_sam_edge(
        loss_fn,
        state.params,
        examples,
        learning_rate=learning_rate,
        rho=rho,
        momentum=momentum,
        **sampling,
    ).value
  else:
    edge = edges.usam_edge(learning_rate, rho, momentum=momentum)
  return dict(
      zip(
          BATCH_SHARPNESS_NAMES,
          (sharpness.value, sharpness.lower, sharpness.upper, edge),
      )
  )


def _sam_gradient(
    config: LoopConfig,
    hparams: Hyperparams,
    params: PyTree,
    batch: Any,
    grads: PyTree,
    model_state: PyTree,
    eigenvector: PyTree | None,
) -> PyTree:
  """``grad L(w + e)`` on the step's batch, ``g`` itself at ``rho = 0``.

  The ascent ``e`` is along ``g``, or along ``g + wd w`` with
  ``config.decay_in_perturbation`` (and ``weight_decay > 0``); then
  ``perturbed_gradient``, which returns its ascent direction at ``rho = 0``,
  is followed by a select of ``g`` there.
  """
  inside = config.decay_in_perturbation and config.weight_decay > 0
  ascent = grads
  if inside:
    ascent = optax.tree.add(
        grads, optax.tree.scale(config.weight_decay, params)
    )
  sam_grads = perturbed_gradient(
      lambda p, b: config.loss_fn(p, b, model_state)[0],
      params,
      batch,
      ascent,
      rho=hparams.rho,
      normalize=config.normalize,
      eps=config.eps,
      m_sharpness=config.m_sharpness,
      group_sharding=config.group_sharding,
      adaptive=config.adaptive,
      adaptive_eta=config.adaptive_eta,
      eigenvector=eigenvector,
      eigen_weight=config.eigen_weight,
  )
  if not inside:
    return sam_grads
  return jax.tree.map(
      lambda g, s: jnp.where(hparams.rho == 0, g, s), grads, sam_grads
  )


def _nan_like(tree: PyTree) -> PyTree:
  """A pytree of NaN arrays with the shapes and dtypes of ``tree``'s leaves."""
  return jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan, x.dtype), tree)


# ``_train_step``'s ``supplied`` for the in-graph form: a ``lax.cond`` on the
# step decides whether to measure, inside the step's own program.
IN_GRAPH = "in_graph"


class Measurement(NamedTuple):
  """A tracked step's gradient and measurement, computed before the step.

  What the staged form (``begin_measurement`` ... ``finish_tracked_step``)
  hands to ``_train_step`` instead of measuring inside it.

  Attributes:
    loss: the loss at ``w_t`` on the step's batch.
    grads: its gradient.
    new_model_state: the model state the gradient returned.
    measured: the ``krylov.Tracked`` of the Hessian at ``w_t``.
    preconditioned: that of the preconditioned Hessian, or ``()``.
  """

  loss: jax.Array
  grads: PyTree
  new_model_state: PyTree
  measured: krylov.Tracked
  preconditioned: Any


def _train_step(
    config: LoopConfig,
    hparams: Hyperparams,
    data: PyTree,
    eval_data: Any,
    state: TrainState,
    step: jax.Array,
    supplied: Any = IN_GRAPH,
) -> tuple[TrainState, tuple[jax.Array, dict[str, jax.Array]]]:
  """One GD/SAM step at global step ``step``, measuring when it is due.

  ``supplied`` says how: ``IN_GRAPH`` decides in the program (a
  ``lax.cond`` on ``step % track_every == 0``); None makes the step
  untracked (straight-line, no measurement); a ``Measurement`` makes it a
  tracked step whose measurement was computed by the staged programs.
  """
  batch = step_batch(config, state, data, step)
  model_state = state.model_state

  def with_tracking(state):
    out = _measure(config, state, batch)
    return (*out, _evaluate(config, state.params, eval_data, model_state))

  def without_tracking(state):
    out = _gradient(config, state.params, batch, model_state)
    shapes = jax.eval_shape(lambda: with_tracking(state)[3:])
    measured, preconditioned, evals = _nan_like(shapes)
    if preconditioned:
      preconditioned = preconditioned._replace(vectors=state.precond_vectors)
    return (
        *out,
        measured._replace(vectors=state.eigvecs),
        preconditioned,
        evals,
    )

  if isinstance(supplied, str):
    tracked = step % config.track_every == 0
    loss, grads, new_model_state, measured, preconditioned, evals = (
        jax.lax.cond(tracked, with_tracking, without_tracking, state)
    )
  elif supplied is None:
    tracked = jnp.array(False)
    loss, grads, new_model_state, measured, preconditioned, evals = (
        without_tracking(state)
    )
  else:
    tracked = jnp.array(True)
    loss, grads, new_model_state, measured, preconditioned = supplied
    evals = _evaluate(config, state.params, eval_data, model_state)
  grad_norm = global_norm(grads)
  if config.use_sam:
    eigenvector = None
    if config.eigen_weight > 0:
      flat, unravel = ravel_pytree(state.params)
      eigenvector = unravel(measured.vectors[0].astype(flat.dtype))
    sam_grads = _sam_gradient(
        config, hparams, state.params, batch, grads, model_state, eigenvector
    )
  else:
    sam_grads = grads
  step_grads = sam_grads
  if config.weight_decay:
    step_grads = optax.tree.add(
        sam_grads, optax.tree.scale(config.weight_decay, state.params)
    )
  optimizer = make_optimizer(config, hparams)
  updates, opt_state = optimizer.update(
      step_grads, state.opt_state, state.params
  )
  params = optax.apply_updates(state.params, updates)

  finite = (
      jnp.isfinite(loss)
      & jnp.isfinite(grad_norm)
      & _all_finite(params)
      & _all_finite(new_model_state)
      & (
          ~tracked
          | (
              jnp.isfinite(measured.sharpness)
              & jnp.isfinite(measured.lambda_min)
          )
      )
  )
  diverged_at = jnp.where(
      (state.diverged_at < 0) & ~finite, step, state.diverged_at
  ).astype(jnp.int32)
  stopped = diverged_at >= 0
  learning_rate, momentum = _step_hyperparams(config, hparams, opt_state)

  def tracked_metrics():
    gd_edge, sam_edge = edges.stability_edges(
        learning_rate,
        hparams.rho,
        grad_norm,
        momentum=momentum,
        normalize=config.normalize,
    )
    top = measured.vectors[0]
    return {
        "gd_edge": gd_edge,
        "sam_edge": sam_edge,
        "grad_alignment": _abs_cos(ravel_pytree(grads)[0], top),
        "sam_grad_alignment": _abs_cos(ravel_pytree(sam_grads)[0], top),
    }

  derived = jax.lax.cond(
      tracked & ~stopped,
      tracked_metrics,
      lambda: _nan_like(jax.eval_shape(tracked_metrics)),
  )
  batch_metrics = {}
  if config.batch_sharpness_batches is not None:
    # On ``tracked`` alone, unbatched under vmap, so it stays a real branch.
    estimate = lambda: _batch_metrics(
        config, state, data, step, learning_rate, hparams.rho, momentum
    )
    nans = lambda: _nan_like(jax.eval_shape(estimate))
    if isinstance(supplied, str):
      batch_metrics = jax.lax.cond(tracked, estimate, nans)
    else:  # a staged step: straight-line code, no product inside a branch
      batch_metrics = estimate() if supplied is not None else nans()
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "sharpness": measured.sharpness,
      "lambda_min": measured.lambda_min,
      **derived,
      "lanczos_iters": measured.lanczos_iters,
      "sharpness_residual": measured.residual,
      **dict(
          zip(
              top_eigenvalue_names(config.num_top_eigenvalues),
              measured.values[1 : config.num_top_eigenvalues],
          )
      ),
      **batch_metrics,
      **(
          {"preconditioned_sharpness": preconditioned.sharpness}
          if preconditioned
          else {}
      ),
      **evals,
  }
  dtype = jnp.result_type(float)
  metrics = {
      k: jnp.where(tracked & ~stopped, v, jnp.nan).astype(dtype)
      for k, v in metrics.items()
  }
  precond_vectors = preconditioned.vectors if preconditioned else ()
  params, opt_state, eigvecs, new_model_state, precond_vectors = jax.tree.map(
      lambda old, new: jnp.where(stopped, old, new),
      (
          state.params,
          state.opt_state,
          state.eigvecs,
          state.model_state,
          state.precond_vectors,
      ),
      (params, opt_state, measured.vectors, new_model_state, precond_vectors),
  )
  new_state = TrainState(
      params=params,
      opt_state=opt_state,
      key=state.key,
      eigvecs=eigvecs,
      diverged_at=diverged_at,
      model_state=new_model_state,
      precond_vectors=precond_vectors,
  )
  return new_state, (tracked, metrics)


def run_chunk(
    config: LoopConfig,
    state: TrainState,
    data: PyTree,
    eval_data: Any,
    hparams: Hyperparams,
    start: jax.Array,
    end: jax.Array,
    chunk_len: int,
) -> tuple[TrainState, ChunkOutput]:
  """Runs steps ``start, ..., start + chunk_len - 1`` (those below ``end``).

  Pure and jit-able with ``config`` and ``chunk_len`` static; vmap over
  ``(state, hparams)`` (with ``start``/``end`` unbatched) for a sweep.

  Args:
    config: static settings.
    state: the carry at step ``start``.
    data: pytree of device-resident arrays (leading axis = examples).
    eval_data: the second argument of ``config.eval_fn`` (None without one).
    hparams: hyperparameters (may be traced).
    start: global index of the first step (scalar int array).
    end: steps ``>= end`` are skipped (scalar int array).
    chunk_len: number of scan iterations (static).

  Returns:
    The carry after the chunk and its ``ChunkOutput``.
  """

  def step_fn(state, step):
    return _train_step(config, hparams, data, eval_data, state, step)

  _, (_, shapes) = jax.eval_shape(step_fn, state, start)
  nan_metrics = jax.tree.map(
      lambda x: jnp.full(x.shape, jnp.nan, x.dtype), shapes
  )

  def body(state, step):
    def skip(state):
      return state, (jnp.array(False), nan_metrics)

    return jax.lax.cond(step < end, lambda s: step_fn(s, step), skip, state)

  steps = start + jnp.arange(chunk_len, dtype=jnp.int32)
  state, (tracked, metrics) = jax.lax.scan(body, state, steps)
  return state, ChunkOutput(step=steps, tracked=tracked, metrics=metrics)
