"""The training driver: runs the compiled core in chunks, observably and safely.

``train`` compiles one chunk program (ahead of time, once), then repeatedly
runs it: after every chunk it updates the progress bar, appends the new
tracked rows to ``out_dir/metrics.csv`` and writes an atomic checkpoint, so
an interrupted run loses at most one chunk and ``train`` called again with
the same ``out_dir`` resumes bit for bit. Several learning rates, radii or
seeds run as one vmapped program. A configuration that diverges (see
``train``) stops there while the others run on; when every configuration
has diverged, ``TrainingDiverged`` is raised after saving the rows recorded
before it.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_eos import _checks, checkpoint, history as hist, loop, parallel
from sam_eos import programs, staged
from sam_eos._types import PyTree

CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.csv"
# The history column ``preconditioner=`` adds (see ``train``).
PRECONDITIONED_COLUMN = "preconditioned_sharpness"
CONFIG_FILE = "config.json"


class TrainResult(NamedTuple):
  """What ``train`` returns.

  Attributes:
    params: final parameters (leading config axis for a sweep).
    history: dict of NumPy arrays with the columns ``step, loss, grad_norm,
      sharpness, lambda_min, gd_edge, sam_edge, grad_alignment,
      sam_grad_alignment, lanczos_iters, sharpness_residual, wall_time``
      (``se.HISTORY_COLUMNS``), then ``top_eigenvalue_2, ...,
      top_eigenvalue_k`` with ``num_top_eigenvalues = k > 1``,
      ``batch_sharpness, batch_sharpness_low, batch_sharpness_high,
      batch_sam_edge`` with ``batch_sharpness_batches``,
      ``preconditioned_sharpness`` with a ``preconditioner``, then the keys
      of ``eval_fn``'s dict; shape ``(rows,)``, or ``(configs, rows)`` for a
      sweep. A configuration of a sweep that diverged at step ``t`` has NaN
      in every column but ``step`` from step ``t`` on.
    diverged_at: the step at which each configuration diverged, -1 for a
      finite one: an int array ``(configs,)`` for a sweep, an int (always
      -1, since a single diverged run raises) otherwise.
    model_state: the final model state (leading config axis for a sweep;
      a diverged configuration's is its last finite one), None if ``train``
      was given no ``model_state``.
  """

  params: PyTree
  history: dict[str, np.ndarray]
  diverged_at: np.ndarray | int = -1
  model_state: PyTree = None


class TrainingDiverged(FloatingPointError):
  """Every configuration diverged (a single run: the run diverged).

  Attributes:
    step: the first diverged step (see ``train``) of any configuration.
    config: index of the configuration that diverged first.
    history: the rows recorded before the last configuration diverged (as
      in ``TrainResult``; a single run's rows stop before ``step``).
  """

  def __init__(
      self, message: str, step: int, config: int, history: dict[str, np.ndarray]
  ):
    super().__init__(message)
    self.step = step
    self.config = config
    self.history = history


def _as_vector(name: str, value: Any) -> np.ndarray:
  """A scalar or 1-D sequence of finite reals as a 1-D float64 array."""
  arr = np.atleast_1d(np.asarray(value, np.float64))
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(
        f"`{name}` must be a scalar or a non-empty 1-D sequence, "
        f"got shape {np.shape(value)}."
    )
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"`{name}` must be finite, got {value!r}.")
  return arr


def _raw_keys(key: Any) -> jax.Array:
  """Typed keys from raw ``uint32`` key data (trailing axis: one key's data)."""
  shape = jax.random.key_data(jax.random.key(0)).shape
  if np.shape(key)[-len(shape) :] != shape:
    raise ValueError(
        f"`key` is a uint32 array of shape {np.shape(key)}, read as raw key "
        f"data, which needs a trailing shape {shape}. Pass int seeds (a list "
        "or a signed integer array) or keys from jax.random.key."
    )
  return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def _keys(key: Any) -> tuple[jax.Array, list[Any]]:
  """Typed keys of shape ``(K,)`` and their JSON-friendly description.

  Ints, lists of ints and signed integer arrays are seeds; ``uint32``
  arrays (NumPy or JAX) are raw key data, as JAX's legacy keys.
  """
  if key is None:
    key = 0
  if getattr(key, "dtype", None) == np.uint32:
    key = _raw_keys(key)
  if isinstance(key, (int, np.integer)) or (
      isinstance(key, (list, tuple, np.ndarray))
      and np.ndim(key) == 1
      and all(isinstance(k, (int, np.integer)) for k in key)
  ):
    seeds = [int(k) for k in np.atleast_1d(key)]
    return jnp.stack([jax.random.key(s) for s in seeds]), seeds
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  key = key.reshape(-1)
  return key, [np.asarray(jax.random.key_data(k)).tolist() for k in key]


def _broadcast_configs(
    learning_rate: Any, rho: Any, key: Any
) -> tuple[np.ndarray, np.ndarray, jax.Array, list[Any], bool]:
  """Broadcasts the swept hyperparameters to a common length ``C``."""
  lrs = _as_vector("learning_rate", learning_rate)
  rhos = _as_vector("rho", rho)
  keys, seeds = _keys(key)
  sizes = {len(lrs), len(rhos), len(seeds)}
  num = max(sizes)
  if sizes - {1, num}:
    raise ValueError(
        "`learning_rate`, `rho` and `key` must be scalars or sequences of one "
        f"common length; got lengths {len(lrs)}, {len(rhos)}, {len(seeds)}."
    )
  sweep = (
      num > 1
      or any(np.ndim(v) > 0 for v in (learning_rate, rho))
      or (isinstance(key, (list, tuple)))
  )
  lrs = np.broadcast_to(lrs, (num,)).copy()
  rhos = np.broadcast_to(rhos, (num,)).copy()
  if len(seeds) == 1:
    keys = jnp.broadcast_to(keys, (num,))
    seeds = seeds * num
  return lrs, rhos, keys, seeds, sweep


def _check_data(data: PyTree, batch_size: int | None) -> int:
  """Validates the data pytree and ``batch_size``; returns the example count."""
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError("`data` must be a non-empty pytree of arrays.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        "`data` arrays must share their leading (example) axis; got leading "
        f"sizes {[np.shape(x)[:1] for x in leaves]}."
    )
  num_examples = sizes.pop()
  if num_examples == 0:
    raise ValueError("`data` has no examples (its leading axis is empty).")
  if batch_size is not None:
    _checks.check_int("batch_size", batch_size, 1)
    if batch_size > num_examples:
      raise ValueError(
          f"`batch_size` ({batch_size}) exceeds the number of "
          f"examples in `data` ({num_examples}); use "
          "batch_size=None for full batch."
      )
  return num_examples


def _check_params(params: PyTree) -> None:
  """Raises ValueError unless every leaf of ``params`` is floating-point."""
  leaves = jax.tree.leaves(params)
  bad = [
      str(jnp.result_type(x))
      for x in leaves
      if not jnp.issubdtype(jnp.result_type(x), jnp.floating)
  ]
  if not leaves or bad:
    raise ValueError(
        "`params` must be a non-empty pytree of floating-point "
        f"arrays; got leaves of dtype {sorted(set(bad))}."
    )


def _check_metadata(metadata: dict[str, Any] | None) -> None:
  """Raises ValueError unless ``metadata`` is None or JSON-serializable."""
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`metadata` must be JSON-serializable: {e}") from e


def _injected_learning_rate(
    optimizer: optax.GradientTransformation,
    params: PyTree,
    lrs: np.ndarray,
    momentum: float,
) -> bool:
  """Validates a custom ``optimizer`` against ``learning_rate``/``momentum``.

  Returns:
    Whether it is an ``optax.inject_hyperparams`` optimizer with a
    ``learning_rate`` hyperparameter (which ``learning_rate`` then sets).

  Raises:
    ValueError: for ``momentum`` with a custom optimizer, or a learning-rate
      sweep with one whose learning rate is not injected.
  """
  if momentum:
    raise ValueError(
        "`momentum` configures the default SGD optimizer and must be 0 with a "
        "custom `optimizer`; give the optimizer its own momentum (the edges "
        "use it when injected: optax.inject_hyperparams(optax.sgd)("
        "learning_rate=..., momentum=...))."
    )
  state = jax.eval_shape(optimizer.init, params)
  injected = "learning_rate" in getattr(state, "hyperparams", {})
  if not injected and np.unique(lrs).size > 1:
    raise ValueError(
        "A `learning_rate` sweep cannot drive a custom `optimizer`, which "
        "holds its own learning rate; build it with optax.inject_hyperparams "
        "(e.g. optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)) so "
        "`learning_rate` sets it, or run one learning rate at a time."
    )
  return injected


def _config_params(
    params: PyTree, num_configs: int, name: str = "params"
) -> PyTree:
  """Shape structs of one configuration's ``params`` (or ``name``) from a stack."""
  leaves = jax.tree.leaves(params)
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if not leaves or sizes != {num_configs}:
    raise ValueError(
        f"With `per_config_params=True`, every leaf of `{name}` needs a leading "
        f"axis of the {num_configs} configurations; got leading sizes "
        f"{sorted(map(str, sizes))}. Stack one initialization per "
        "configuration, e.g. jax.vmap(init)(keys)."
    )
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)),
      params,
  )


def _check_eval(
    eval_fn: Callable | None,
    params: PyTree,
    eval_data: Any,
    model_state: PyTree | None = None,
) -> tuple[str, ...]:
  """Validates ``eval_fn(params, eval_data[, model_state])``; returns its keys.

  The keys come in ``eval_fn``'s order; ``model_state`` is passed when given.
  """
  if eval_fn is None:
    if eval_data is not None:
      raise ValueError(
          "`eval_data` was given without an `eval_fn`; pass "
          "eval_fn(params, eval_data) -> dict of scalars."
      )
    return ()
  try:
    args = () if model_state is None else (model_state,)
    out = jax.eval_shape(eval_fn, params, eval_data, *args)
  except Exception as e:  # noqa: BLE001 - re-raised with the argument named
    call = "(params, eval_data" + (
        ")" if model_state is None else ", model_state)"
    )
    raise ValueError(
        f"`eval_fn{call}` failed on the given params and `eval_data`: {e}"
    ) from e
  if (
      not isinstance(out, dict)
      or not out
      or not all(
          isinstance(k, str)
          and isinstance(v, jax.ShapeDtypeStruct)
          and v.shape == ()
          and jnp.issubdtype(v.dtype, jnp.number)
          for k, v in out.items()
      )
  ):
    raise ValueError(
        "`eval_fn(params, eval_data)` must return a non-empty "
        "dict of str -> real scalar, e.g. {'test_loss': ..., "
        f"'test_accuracy': ...}}; got {out}."
    )
  hist.columns(tuple(out))  # raises on a name clash
  return tuple(out)


def _check_preconditioner(
    preconditioner: Callable, state: loop.TrainState
) -> None:
  """Raises ValueError unless ``preconditioner(opt_state)`` is like params."""
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  params = first(state.params)
  try:
    out = jax.eval_shape(preconditioner, first(state.opt_state))
  except Exception as e:  # noqa: BLE001 - re-raised with the argument named
    raise ValueError(
        f"`preconditioner(opt_state)` failed on the optimizer's state: {e}. "
        "Does the base `optimizer` hold the state it reads (e.g. optax.adam "
        "for se.adam_preconditioner)?"
    ) from e
  if _struct(out) != _struct(params):
    raise ValueError(
        "`preconditioner(opt_state)` must return a diagonal like `params` "
        f"(same structure, shapes and dtypes); got {out}."
    )


def _stateful_loss(
    loss_fn: Callable, has_aux: bool, with_state: bool
) -> Callable[[PyTree, Any, PyTree], tuple[jax.Array, PyTree]]:
  """``loss_fn`` as ``(params, batch, model_state) -> (loss, new_state)``.

  A stateless loss (``loss_fn(params, batch) -> loss``, or ``(loss, aux)``
  with ``has_aux``, ``aux`` dropped) passes its state ``()`` through.
  """
  if with_state:
    return loss_fn
  if has_aux:
    return lambda p, b, s: (loss_fn(p, b)[0], s)
  return lambda p, b, s: (loss_fn(p, b), s)


def _check_loss(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    batch_size: int | None,
    has_aux: bool,
    model_state: PyTree | None,
) -> None:
  """Raises ValueError unless ``loss_fn`` returns what ``train`` was told.

  A real scalar from ``loss_fn(params, batch)``; ``(scalar, aux)`` with
  ``has_aux``; ``(scalar, new_state)`` with ``new_state`` like
  ``model_state`` from ``loss_fn(params, batch, model_state)``.
  """
  batch = (
      data
      if batch_size is None
      else jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype),
          data,
      )
  )
  with_state = model_state is not None
  if with_state and has_aux:
    raise ValueError(
        "`has_aux=True` cannot be combined with `model_state`: the second "
        "output of `loss_fn` is then the new model state. Drop the aux "
        "output or carry it in the model state."
    )
  call = "(params, batch, model_state)" if with_state else "(params, batch)"
  args = (model_state,) if with_state else ()
  try:
    out = jax.eval_shape(loss_fn, params, batch, *args)
  except Exception as e:  # noqa: BLE001 - re-raised with the argument named
    raise ValueError(
        f"`loss_fn{call}` failed on the given params and a batch of "
        f"`data`: {e}"
    ) from e
  if with_state or has_aux:
    what = "(loss, new_model_state)" if with_state else "(loss, aux)"
    if not isinstance(out, tuple) or len(out) != 2:
      raise ValueError(
          f"`loss_fn{call}` must return a pair {what} "
          f"({'with `model_state`' if with_state else 'with `has_aux=True`'});"
          f" got {out}."
      )
    out, new_state = out
    if with_state and _struct(new_state) != _struct(model_state):
      raise ValueError(
          f"`loss_fn{call}` must return a new model state like "
          f"`model_state` (same structure, shapes and dtypes); got "
          f"{new_state} for {_struct(model_state)}."
      )
  if (
      not isinstance(out, jax.ShapeDtypeStruct)
      or out.shape != ()
      or not jnp.issubdtype(out.dtype, jnp.floating)
  ):
    hint = (
        " With an aux output pass `has_aux=True`; with a mutable model "
        "state pass `model_state=`."
        if not (with_state or has_aux)
        else ""
    )
    raise ValueError(
        f"`loss_fn{call}` must return a real scalar loss; got {out}. "
        f"Reduce it with a mean.{hint}"
    )


def _struct(tree: PyTree) -> PyTree:
  """``tree`` as shape/dtype structs, for comparing pytrees of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
  )


def _check_mesh(
    mesh: Mesh,
    num_configs: int,
    batch_size: int | None,
    m_sharpness: int | None,
) -> tuple[NamedSharding | None, NamedSharding | None]:
  """Validates ``mesh``; returns the minibatch and m-sharpness group shardings."""
  if parallel.DATA_AXIS not in mesh.axis_names:
    raise ValueError(
        f"`mesh` must have a '{parallel.DATA_AXIS}' axis, got axes "
        f"{mesh.axis_names}; build one with se.data_mesh()."
    )
  num_data = parallel.axis_size(mesh, parallel.DATA_AXIS)
  num_config_shards = parallel.axis_size(mesh, parallel.CONFIG_AXIS)
  if num_configs % num_config_shards:
    raise ValueError(
        f"The {num_configs} configurations must divide evenly over "
        f"the mesh's '{parallel.CONFIG_AXIS}' axis of size "
        f"{num_config_shards}."
    )
  data_spec = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
  batch_sharding = group_sharding = None
  if batch_size is not None:
    if batch_size % num_data:
      raise ValueError(
          f"`batch_size` ({batch_size}) must be a multiple of the "
          f"{num_data} devices of the mesh's 'data' axis."
      )
    batch_sharding = data_spec
  if m_sharpness is not None and m_sharpness % num_data == 0:
    group_sharding = data_spec
  return batch_sharding, group_sharding


def _prepare_out_dir(out_dir: str) -> None:
  """Creates ``out_dir``, raising ValueError if it cannot be written."""
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"`out_dir` {out_dir!r} cannot be created: {e}") from e
  if not os.access(out_dir, os.W_OK):
    raise ValueError(f"`out_dir` {out_dir!r} is not writable.")


def _warm_vectors(
    num_warm_vectors: int, num_lanczos_iters: int, num_params: int
) -> int:
  """``num_warm_vectors`` capped at the Lanczos basis size it must fit in."""
  return min(num_warm_vectors, num_lanczos_iters, num_params)


def _default_chunk(num_steps: int, track_every: int) -> int:
  """About 200 steps per chunk (a multiple of ``track_every`` up to 1,000).

  Capped by ``num_steps``, so a rare ``track_every`` does not ask for huge
  per-step scan outputs.
  """
  return min(num_steps, 1000, track_every * max(1, 200 // track_every))


def _progress(total: int, initial: int, enabled: bool):
  """A tqdm bar on stderr, or None."""
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(
      total=total,
      initial=initial,
      unit="step",
      dynamic_ncols=True,
      desc="train",
  )


def _postfix(history: dict[str, np.ndarray]) -> dict[str, str]:
  """Last tracked row of configuration 0, for the progress bar."""
  if history["step"].shape[1] == 0:
    return {}
  last = {k: v[0, -1] for k, v in history.items()}
  return {
      "loss": f"{last['loss']:.4g}",
      "sharp": f"{last['sharpness']:.4g}",
      "sam_edge": f"{last['sam_edge']:.4g}",
      "2/eta": f"{last['gd_edge']:.4g}",
  }


def _squeeze(
    history: dict[str, np.ndarray], sweep: bool
) -> dict[str, np.ndarray]:
  return history if sweep else {k: v[0] for k, v in history.items()}


class _Settings(NamedTuple):
  """A validated call of ``train``: everything the chunks and files need.

  Attributes:
    config: the static settings of the compiled core.
    hparams: per-configuration learning rates and radii, ``(C,)`` arrays.
    keys: per-configuration PRNG keys, ``(C,)``.
    configs: per-configuration ``learning_rate``, ``rho`` and ``seed``, as
      JSON-friendly dicts.
    sweep: whether the caller asked for a sweep (leading config axis).
    num_params: number of parameters of one configuration.
    eval_columns: the history columns ``eval_fn`` adds.
    chunk_size: steps per compiled chunk.
  """

  config: loop.LoopConfig
  hparams: loop.Hyperparams
  keys: jax.Array
  configs: list[dict[str, Any]]
  sweep: bool
  num_params: int
  eval_columns: tuple[str, ...]
  chunk_size: int


class _Files(NamedTuple):
  """The paths this process writes (None where it writes nothing).

  Attributes:
    checkpoint: the checkpoint path (process 0 only).
    metrics: the ``metrics.csv`` path (process 0 only).
    gather: whether the run saves checkpoints, for which every process
      takes part in gathering the carry to the host.
  """

  checkpoint: str | None
  metrics: str | None
  gather: bool


class _Progress(NamedTuple):
  """Where a run stands: its carry, the rows so far, the next step, seconds."""

  state: loop.TrainState
  history: dict[str, np.ndarray]
  next_step: int
  wall_time: float


def _check_variant(
    adaptive: bool, adaptive_eta: float, eigen_weight: float
) -> None:
  """Validates the ASAM / Eigen-SAM options of ``train``.

  Raises:
    ValueError: for a non-bool ``adaptive``, an ``adaptive_eta`` or
      ``eigen_weight`` that is not a finite real ``>= 0``, or ``adaptive``
      together with ``eigen_weight > 0`` (each message names the argument).
  """
  if not isinstance(adaptive, (bool, np.bool_)):
    raise ValueError(f"`adaptive` must be a bool, got {adaptive!r}.")
  for name, value in (
      ("adaptive_eta", adaptive_eta),
      ("eigen_weight", eigen_weight),
  ):
    _checks.check_nonnegative_scalar(name, value)
    if not np.isfinite(value):
      raise ValueError(f"`{name}` must be finite, got {value!r}.")
  if adaptive and eigen_weight > 0:
    raise ValueError(
        "`adaptive=True` (ASAM) and `eigen_weight > 0` (Eigen-SAM) cannot be "
        "combined; choose one."
    )


def _check_top_eigenvalues(
    num_top_eigenvalues: int, num_lanczos_iters: int, num_params: int
) -> None:
  """Raises ValueError unless the Lanczos basis can hold ``k`` Ritz pairs."""
  if num_top_eigenvalues > min(num_lanczos_iters, num_params):
    raise ValueError(
        f"`num_top_eigenvalues` ({num_top_eigenvalues}) must be <= "
        f"`num_lanczos_iters` ({num_lanczos_iters}) and the number of "
        f"parameters ({num_params}): each check finds at most that many "
        "Ritz values."
    )


def _check_batch_sharpness(
    batch_sharpness_batches: int | None, batch_size: int | None
) -> int | None:
  """Validates ``batch_sharpness_batches`` against ``batch_size``.

  Returns:
    ``batch_sharpness_batches`` as a Python int, or None.

  Raises:
    ValueError: for a count below 1, or one without a ``batch_size``.
  """
  if batch_sharpness_batches is None:
    return None
  if batch_size is None:
    raise ValueError(
        "`batch_sharpness_batches` estimates the sharpness of minibatches of "
        "`batch_size` examples and needs a `batch_size`; set batch_size (its "
        "value N, the number of examples, gives g^T H g / ||g||^2 of the "
        "full batch) or drop batch_sharpness_batches."
    )
  return _checks.check_int(
      "batch_sharpness_batches", batch_sharpness_batches, 1
  )


def _check_weight_decay(
    weight_decay: float, decay_in_perturbation: bool, m_sharpness: int | None
) -> float:
  """Validates the weight-decay options of ``train``; returns ``wd``.

  Raises:
    ValueError: for a ``weight_decay`` that is not a finite real ``>= 0``,
      a non-bool ``decay_in_perturbation``, or ``decay_in_perturbation``
      with ``m_sharpness`` (whose groups ascend along their own gradients).
  """
  _checks.check_nonnegative_scalar("weight_decay", weight_decay)
  if not np.isfinite(weight_decay):
    raise ValueError(f"`weight_decay` must be finite, got {weight_decay!r}.")
  if not isinstance(decay_in_perturbation, (bool, np.bool_)):
    raise ValueError(
        "`decay_in_perturbation` must be a bool, got "
        f"{decay_in_perturbation!r}."
    )
  if decay_in_perturbation and m_sharpness is not None:
    raise ValueError(
        "`decay_in_perturbation=True` cannot be combined with `m_sharpness`: "
        "each m-sharpness group ascends along its own gradient. Use "
        "decay_in_perturbation=False (decay outside the perturbation) or "
        "m_sharpness=None."
    )
  return float(weight_decay)


def _check_m_sharpness(
    m_sharpness: int | None, batch_size: int | None, num_examples: int
) -> int | None:
  """Validates ``m_sharpness`` against the batch size."""
  if m_sharpness is None:
    return None
  m_sharpness = _checks.check_int("m_sharpness", m_sharpness, 1)
  if (batch_size or num_examples) % m_sharpness:
    raise ValueError(
        f"`m_sharpness` ({m_sharpness}) must divide the batch "
        f"size ({batch_size or num_examples})."
    )
  return m_sharpness


def _validate(
    loss_fn: Callable,
    params: PyTree,
    data: PyTree,
    eval_data: Any,
    *,
    learning_rate: Any,
    num_steps: int,
    rho: Any,
    momentum: float,
    normalize: bool,
    optimizer: optax.GradientTransformation | None,
    batch_size: int | None,
    track_every: int,
    num_lanczos_iters: int,
    sharpness_tol: float | None,
    num_warm_vectors: int,
    num_top_eigenvalues: int,
    batch_sharpness_batches: int | None,
    key: Any,
    mesh: Mesh | None,
    chunk_size: int | None,
    eps: float,
    m_sharpness: int | None,
    adaptive: bool,
    adaptive_eta: float,
    eigen_weight: float,
    weight_decay: float,
    decay_in_perturbation: bool,
    eval_fn: Callable | None,
    per_config_params: bool,
    metadata: dict[str, Any] | None,
    has_aux: bool,
    model_state: PyTree | None,
    preconditioner: Callable | None,
) -> _Settings:
  """Checks every argument of ``train`` and builds its ``_Settings``.

  Args: those of ``train`` (see there), ``num_steps`` already checked.

  Returns:
    The ``_Settings`` of the run (hyperparameters on the default device).

  Raises:
    ValueError: naming the first invalid argument.
  """
  if not isinstance(normalize, (bool, np.bool_)):
    raise ValueError(f"`normalize` must be a bool, got {normalize!r}.")
  _check_metadata(metadata)
  _check_params(params)
  track_every = _checks.check_int("track_every", track_every, 1)
  num_lanczos_iters = _checks.check_int(
      "num_lanczos_iters", num_lanczos_iters, 1
  )
  if sharpness_tol is not None:
    _checks.check_positive("sharpness_tol", sharpness_tol)
    sharpness_tol = float(sharpness_tol)
  num_warm_vectors = _checks.check_int("num_warm_vectors", num_warm_vectors, 1)
  num_top_eigenvalues = _checks.check_int(
      "num_top_eigenvalues", num_top_eigenvalues, 1
  )
  _checks.check_momentum(momentum)
  _checks.check_nonnegative("eps", eps)
  _check_variant(adaptive, adaptive_eta, eigen_weight)
  lrs, rhos, keys, seeds, sweep = _broadcast_configs(learning_rate, rho, key)
  if not isinstance(has_aux, (bool, np.bool_)):
    raise ValueError(f"`has_aux` must be a bool, got {has_aux!r}.")
  if per_config_params:
    params = _config_params(params, len(lrs))
    if model_state is not None and jax.tree.leaves(model_state):
      model_state = _config_params(model_state, len(lrs), "model_state")
  num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  _check_top_eigenvalues(num_top_eigenvalues, num_lanczos_iters, num_params)
  _checks.check_positive("learning_rate", lrs)
  _checks.check_nonnegative("rho", rhos)
  if chunk_size is None:
    chunk_size = _default_chunk(num_steps, track_every)
  chunk_size = _checks.check_int("chunk_size", chunk_size, 1)
  num_examples = _check_data(data, batch_size)
  _check_loss(loss_fn, params, data, batch_size, has_aux, model_state)
  eval_columns = _check_eval(eval_fn, params, eval_data, model_state)
  if preconditioner is not None:
    if not callable(preconditioner):
      raise ValueError(
          "`preconditioner` must be a function opt_state -> diagonal "
          f"pytree like params (e.g. se.adam_preconditioner), got "
          f"{preconditioner!r}."
      )
    eval_columns = (PRECONDITIONED_COLUMN,) + eval_columns
  batch_sharpness_batches = _check_batch_sharpness(
      batch_sharpness_batches, batch_size
  )
  eval_columns = (
      loop.top_eigenvalue_names(num_top_eigenvalues)
      + loop.batch_sharpness_names(batch_sharpness_batches)
      + eval_columns
  )
  eval_columns = hist.columns(eval_columns)[len(hist.HISTORY_COLUMNS) :]
  m_sharpness = _check_m_sharpness(m_sharpness, batch_size, num_examples)
  weight_decay = _check_weight_decay(
      weight_decay, decay_in_perturbation, m_sharpness
  )
  injected = optimizer is not None and _injected_learning_rate(
      optimizer, params, lrs, momentum
  )
  batch_sharding = group_sharding = None
  if mesh is not None:
    batch_sharding, group_sharding = _check_mesh(
        mesh, len(lrs), batch_size, m_sharpness
    )
  config = loop.LoopConfig(
      loss_fn=_stateful_loss(loss_fn, has_aux, model_state is not None),
      batch_size=batch_size,
      track_every=track_every,
      # As in hessian_eigenpairs: n steps already give the exact spectrum.
      num_lanczos_iters=min(num_lanczos_iters, num_params),
      sharpness_tol=sharpness_tol,
      num_warm_vectors=max(
          _warm_vectors(num_warm_vectors, num_lanczos_iters, num_params),
          num_top_eigenvalues,
      ),
      num_top_eigenvalues=num_top_eigenvalues,
      momentum=float(momentum),
      normalize=normalize,
      eps=float(eps),
      use_sam=bool(np.any(rhos > 0)),
      optimizer=optimizer,
      m_sharpness=m_sharpness,
      adaptive=bool(adaptive),
      adaptive_eta=float(adaptive_eta),
      eigen_weight=float(eigen_weight),
      batch_sharding=batch_sharding,
      group_sharding=group_sharding,
      eval_fn=eval_fn,
      num_examples=None if batch_size is None else num_examples,
      injected_learning_rate=injected,
      eval_model_state=model_state is not None,
      preconditioner=preconditioner,
      batch_sharpness_batches=batch_sharpness_batches,
      weight_decay=weight_decay,
      decay_in_perturbation=bool(decay_in_perturbation),
  )
  dtype = jnp.result_type(float)
  hparams = loop.Hyperparams(
      learning_rate=jnp.asarray(lrs, dtype), rho=jnp.asarray(rhos, dtype)
  )
  configs = [
      {"learning_rate": float(l), "rho": float(r), "seed": s}
      for l, r, s in zip(lrs, rhos, seeds)
  ]
  return _Settings(
      config=config,
      hparams=hparams,
      keys=keys,
      configs=configs,
      sweep=sweep,
      num_params=num_params,
      eval_columns=eval_columns,
      chunk_size=chunk_size,
  )


# LoopConfig fields that are functions or placements, not comparable settings.
_UNSIGNED_FIELDS = (
    "loss_fn",
    "preconditioner",
    "optimizer",
    "batch_sharding",
    "group_sharding",
    "eval_fn",
)


def _fingerprint(tree: PyTree) -> dict[str, Any] | None:
  """Tree structure, leaf shapes and dtypes, and a SHA-256 of the leaf bytes."""
  if tree is None:
    return None
  host = parallel.to_host(
      jax.tree.map(
          lambda x: jax.random.key_data(x) if parallel.is_key(x) else x, tree
      )
  )
  leaves, treedef = jax.tree.flatten(host)
  digest = hashlib.sha256()
  for leaf in leaves:
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return {
      "structure": str(treedef),
      "shapes": [list(np.shape(x)) for x in leaves],
      "dtypes": [str(np.asarray(x).dtype) for x in leaves],
      "sha256": digest.hexdigest(),
  }


def _signature(
    settings: _Settings,
    per_config_params: bool,
    params: PyTree,
    data: PyTree,
    eval_data: Any,
    opt_state: optax.OptState,
    model_state: PyTree | None = None,
) -> dict[str, Any]:
  """The settings a checkpoint must share with the run that resumes it.

  The comparable ``LoopConfig`` fields (all but functions and shardings),
  the configurations, the parameter count, the evaluation columns, whether
  the params are per configuration, and fingerprints (structure, shapes,
  dtypes, SHA-256 of the bytes) of the initial ``params``, the ``data``,
  the ``eval_data`` and the optimizer's initial state. Functions
  (``loss_fn``, ``eval_fn``, the optimizer's code) cannot be compared: a
  custom optimizer is known by its state only.
  """
  config = settings.config
  signature = {
      f.name: getattr(config, f.name)
      for f in dataclasses.fields(config)
      if f.name not in _UNSIGNED_FIELDS
  }
  signature.update(
      configs=settings.configs,
      optimizer=None if config.optimizer is None else _fingerprint(opt_state),
      num_params=settings.num_params,
      eval_columns=list(settings.eval_columns),
      per_config_params=bool(per_config_params),
      params=_fingerprint(params),
      data=_fingerprint(data),
      eval_data=_fingerprint(eval_data),
      model_state=_fingerprint(model_state),
  )
  return json.loads(json.dumps(signature))


def _initial_state(
    settings: _Settings,
    params: PyTree,
    per_config_params: bool,
    model_state: PyTree | None,
) -> loop.TrainState:
  """The vmapped carry at step 0 (a copy: the chunks donate it)."""
  per_config = 0 if per_config_params else None
  vinit = jax.vmap(
      lambda p, h, k, m: loop.init_state(settings.config, p, h, k, m),
      in_axes=(per_config, 0, 0, per_config),
  )
  model_state = () if model_state is None else model_state
  state = vinit(params, settings.hparams, settings.keys, model_state)
  if per_config_params:  # the chunks donate the state: keep the caller's
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    state = state._replace(
        params=copy(state.params), model_state=copy(state.model_state)
    )
  return state


def _write_config(
    out_dir: str,
    signature: dict[str, Any],
    num_steps: int,
    metadata: dict[str, Any] | None,
    mesh: Mesh | None,
) -> None:
  """Writes ``config.json`` atomically: the signature, ``num_steps``, the machine."""
  path = os.path.join(out_dir, CONFIG_FILE)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(
        {
            **signature,
            "num_steps": num_steps,
            "metadata": metadata,
            "jax_version": jax.__version__,
            "num_devices": 1 if mesh is None else int(mesh.size),
            "device": str(jax.devices()[0].device_kind),
        },
        f,
        indent=2,
    )
    f.flush()
    os.fsync(f.fileno())
  checkpoint.replace(tmp, path)


def _is_our_run(out_dir: str) -> bool:
  """Whether ``out_dir/config.json`` was written by ``train``."""
  try:
    with open(os.path.join(out_dir, CONFIG_FILE)) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and {
      "configs",
      "num_steps",
      "jax_version",
  } <= set(config)


def _remove_stale_metrics(out_dir: str, metrics_path: str) -> None:
  """Deletes the ``metrics.csv`` of a run that never saved a checkpoint.

  Raises:
    ValueError: if ``config.json`` does not show the file is ``train``'s.
  """
  if not os.path.exists(metrics_path):
    return
  if not _is_our_run(out_dir):
    raise ValueError(
        f"`out_dir` {out_dir!r} holds a {METRICS_FILE} that no {CONFIG_FILE} "
        "of se.train claims; move it away or use a new out_dir."
    )
  os.remove(metrics_path)


def _open_run(
    out_dir: str | os.PathLike | None,
    settings: _Settings,
    signature: dict[str, Any],
    state: loop.TrainState,
    num_steps: int,
    metadata: dict[str, Any] | None,
    mesh: Mesh | None,
    place: Callable[[Any], Any],
) -> tuple[_Progress, _Files]:
  """Starts a run, or resumes the checkpoint in ``out_dir``.

  Args:
    out_dir: the run folder, or None to keep everything in memory.
    settings: the validated settings.
    signature: what a checkpoint must match (see ``_signature``).
    state: the carry at step 0, the template of a checkpoint's carry.
    num_steps: the requested total number of steps.
    metadata: saved in ``config.json``.
    mesh: the device mesh, or None.
    place: puts a loaded carry where the chunks expect it.

  Returns:
    The run's ``_Progress`` and the ``_Files`` this process writes.

  Raises:
    ValueError: for an unwritable ``out_dir``, a checkpoint of a run with
      other settings or more than ``num_steps`` steps, or a ``metrics.csv``
      in ``out_dir`` that is not ``train``'s.
  """
  start = _Progress(
      state,
      hist.empty_history(len(settings.configs), settings.eval_columns),
      0,
      0.0,
  )
  if out_dir is None:
    return start, _Files(None, None, False)
  out_dir = os.fspath(out_dir)
  writer = jax.process_index() == 0
  if writer:
    _prepare_out_dir(out_dir)
  ckpt_path = os.path.join(out_dir, CHECKPOINT_FILE)
  metrics_path = os.path.join(out_dir, METRICS_FILE)
  if os.path.exists(ckpt_path):
    try:
      saved = checkpoint.load(ckpt_path, state, signature)
    except ValueError as e:
      raise ValueError(
          f"`out_dir` {out_dir!r} holds a checkpoint that this "
          f"run cannot resume: {e}"
      ) from e
    if saved.next_step > num_steps:
      raise ValueError(
          f"`num_steps` ({num_steps}) is below the step the checkpoint in "
          f"`out_dir` {out_dir!r} has reached ({saved.next_step}); ask for "
          f"num_steps >= {saved.next_step}, or use a new out_dir."
      )
    start = _Progress(
        place(saved.state), saved.history, saved.next_step, saved.wall_time
    )
    if writer:
      hist.write_csv(
          metrics_path,
          start.history,
          settings.configs,
          parallel.to_host(saved.state.diverged_at),
      )
  elif writer:
    _remove_stale_metrics(out_dir, metrics_path)
  if not writer:
    return start, _Files(None, None, True)
  _write_config(out_dir, signature, num_steps, metadata, mesh)
  return start, _Files(ckpt_path, metrics_path, True)


def _all_diverged(
    settings: _Settings,
    history: dict[str, np.ndarray],
    diverged_at: np.ndarray,
    files: _Files,
) -> TrainingDiverged:
  """Keeps the rows before the last divergence; returns the error to raise."""
  bad = int(np.argmin(diverged_at))
  step = int(diverged_at[bad])
  history = hist.truncate(history, int(np.max(diverged_at)))
  if files.metrics is not None:
    hist.write_csv(files.metrics, history, settings.configs, diverged_at)
  which = "every configuration" if settings.sweep else "the run"
  return TrainingDiverged(
      f"Training diverged at step {step}: {which} diverged (configuration "
      f"{bad}, {settings.configs[bad]}, first): a loss, gradient, sharpness "
      "or the parameters became non-finite. Lower the learning rate or rho. "
      f"{history['step'].shape[1]} tracked rows before it were kept"
      + (f" in {files.metrics}." if files.metrics else "."),
      step=step,
      config=bad,
      history=_squeeze(history, settings.sweep),
  )


def _warn_diverged(settings: _Settings, diverged_at: np.ndarray) -> None:
  """Warns which configurations of a sweep diverged, and when."""
  bad = np.flatnonzero(diverged_at >= 0)
  if bad.size:
    warnings.warn(
        "Diverged and stopped: "
        + "; ".join(
            f"configuration {c} ({settings.configs[c]}) at step "
            f"{diverged_at[c]}"
            for c in bad
        )
        + ". Their history is NaN from that step on (no metrics.csv lines); "
        "the other configurations ran to the end.",
        stacklevel=3,
    )


def _warn_uncertified(
    settings: _Settings, history: dict[str, np.ndarray]
) -> None:
  """Warns once if checks stopped at the cap above ``sharpness_tol``.

  Their ``sharpness_residual`` column keeps the bound they reached.
  """
  tol = settings.config.sharpness_tol
  residual = np.atleast_2d(history["sharpness_residual"])
  if tol is None or residual.size == 0:
    return
  above = np.isfinite(residual) & (residual > tol)
  if not np.any(above):
    return
  worst = np.unravel_index(
      np.argmax(np.where(above, residual, -np.inf)), residual.shape
  )
  step = int(np.atleast_2d(history["step"])[worst])
  warnings.warn(
      f"{int(above.sum())} of {int(np.isfinite(residual).sum())} tracked "
      f"rows stopped at the cap of {settings.config.num_lanczos_iters} "
      f"products above sharpness_tol={tol:g} (worst relative residual "
      f"{residual[worst]:.3g}, configuration {worst[0]}, step {step}). Each "
      "row's sharpness_residual is the bound it reached; raise "
      "num_lanczos_iters to certify every row.",
      stacklevel=3,
  )


def _run_chunks(
    runner: Any,
    run: _Progress,
    settings: _Settings,
    data: PyTree,
    eval_data: Any,
    num_steps: int,
    files: _Files,
    bar: Any,
    signature: dict[str, Any],
) -> _Progress:
  """Runs chunks up to ``num_steps``, saving rows and checkpoint after each.

  ``runner`` is a ``programs.InGraphRunner`` or ``programs.StagedRunner``;
  the seconds it spends compiling are not training time.

  Raises:
    TrainingDiverged: when every configuration has diverged.
  """
  state, history, next_step, wall = run
  while next_step < num_steps:
    start_time = time.perf_counter()
    compiling = runner.compile_seconds
    stop = min(next_step + settings.chunk_size, num_steps)
    state, out = runner.advance(
        state, data, eval_data, settings.hparams, next_step, stop
    )
    out, diverged_at = parallel.to_host((out, state.diverged_at))
    compiling = runner.compile_seconds - compiling
    elapsed = time.perf_counter() - start_time - compiling
    num_active = stop - next_step
    rows = hist.chunk_rows(
        out.step[0],
        out.tracked[0],
        out.metrics,
        wall,
        wall + elapsed,
        next_step,
        num_active,
    )
    wall += elapsed
    history = hist.concat(history, rows)
    if np.all(diverged_at >= 0):
      raise _all_diverged(settings, history, diverged_at, files)
    next_step += num_active
    if files.gather:  # a cross-process gather: every process takes part
      host_state = parallel.to_host(state)
    if files.checkpoint is not None:
      hist.append_csv(files.metrics, rows, settings.configs, diverged_at)
      checkpoint.save(
          files.checkpoint, host_state, history, next_step, wall, signature
      )
    if bar is not None:
      bar.set_postfix(_postfix(history), refresh=False)
      bar.update(num_active)
  return _Progress(state, history, next_step, wall)


def _runner(
    settings: _Settings,
    spmd_axis: str | None,
    params: PyTree,
    data: PyTree,
    model_state: PyTree,
) -> Any:
  """The staged runner for CPU conv models, else the in-graph one."""
  config = settings.config
  rhos = np.array([c["rho"] for c in settings.configs])
  batch = jax.eval_shape(
      lambda d: loop.sample_batch(
          d, jax.random.key(0), config.batch_size, None, config.num_examples
      ),
      data,
  )
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  if staged.uses_staging(
      lambda p, b, s: config.loss_fn(p, b, s)[0],
      first(params),
      batch,
      first(model_state),
  ):
    return programs.StagedRunner(config, rhos, spmd_axis)
  return programs.InGraphRunner(config, rhos, spmd_axis, settings.chunk_size)


def train(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    learning_rate: float | Sequence[float],
    num_steps: int,
    rho: float | Sequence[float] = 0.0,
    momentum: float = 0.0,
    normalize: bool = True,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None = None,
    track_every: int = 10,
    num_lanczos_iters: int = 30,
    sharpness_tol: float | None = 1e-3,
    num_warm_vectors: int = 3,
    num_top_eigenvalues: int = 1,
    batch_sharpness_batches: int | None = None,
    has_aux: bool = False,
    model_state: PyTree | None = None,
    preconditioner: Callable[[optax.OptState], PyTree] | None = None,
    key: Any = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
    eps: float = 1e-12,
    m_sharpness: int | None = None,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eigen_weight: float = 0.0,
    weight_decay: float = 0.0,
    decay_in_perturbation: bool = False,
    metadata: dict[str, Any] | None = None,
    eval_fn: Callable[[PyTree, Any], dict[str, jax.Array]] | None = None,
    eval_data: Any = None,
    per_config_params: bool = False,
) -> TrainResult:
  """Trains with GD/SGD or SAM, recording sharpness and the edges.

  Runs ``num_steps`` steps of ``w <- w - eta * grad L(w + e)`` with
  ``e = rho g / (||g|| + eps)`` (``rho g`` if not ``normalize``; ``e = 0`` at
  ``rho = 0``), with heavy-ball ``momentum`` or a custom base ``optimizer``;
  ``adaptive`` (ASAM) and ``eigen_weight`` (Eigen-SAM) change ``e``, and
  ``weight_decay`` adds ``wd * w`` to the gradient the optimizer is fed.
  Every ``track_every`` steps it records, at the iterate and on the step's
  batch, the history columns (see ``TrainResult``); sharpness is the top
  Hessian eigenvalue by Lanczos, warm-started from the previous check's top
  ``num_warm_vectors`` Ritz vectors, run until its relative residual
  ``||H y - theta y|| / |theta|`` is at most ``sharpness_tol`` (at most
  ``num_lanczos_iters`` products). Each row records the products used
  (``lanczos_iters``) and the residual reached (``sharpness_residual``).

  Work per step: one gradient (its linearization serves the Hessian-vector
  products on tracked steps), plus one for SAM. In a sweep mixing GD
  (``rho = 0``) and SAM configurations, the GD ones run as their own
  vmapped program and skip the SAM gradient (unless a ``"config"`` mesh
  axis splits the sweep); results are those of separate runs.

  Programs: on GPU and TPU, and on CPU for models without convolutions,
  each chunk is one compiled scan (``loop.run_chunk``) with the measurement
  inside. On CPU, XLA runs a convolution's backward pass 10-26x slower
  inside a scan, loop or branch (jax-ml/jax#12868), so for a loss with a
  convolution the same steps run as straight-line programs
  (``sam_eos.staged``: unrolled untracked steps; a check in stages of
  unrolled products with the stopping test read on the host between
  them), with the same history to float rounding. The environment variable
  ``SAM_EOS_PROGRAMS=staged|in_graph`` forces a form.

  Sequences for ``learning_rate``, ``rho`` or ``key`` (seeds) of one common
  length ``C`` (scalars broadcast) run as one vmapped program from the same
  ``params`` (or, with ``per_config_params``, from one initialization per
  configuration); the history then has a leading config axis.

  Divergence: step ``t`` of a configuration diverges when its loss,
  gradient norm, tracked sharpness or ``lambda_min``, or its next iterate is
  not finite. That configuration stops: its params stay at the last finite
  iterate ``w_t``, its history is NaN from step ``t`` on and
  ``metrics.csv`` has no lines of it from step ``t`` on, so no non-finite
  value reaches the files. The others run to the end; ``diverged_at`` says
  which stopped, and a warning names them. When every configuration has
  diverged (for a single run: when it has), ``TrainingDiverged`` is raised.

  Resuming: with an ``out_dir`` holding a checkpoint, the run continues
  from it if its signature matches: the configurations, every setting of
  the compiled loop (``batch_size``, ``track_every``, ``momentum``, ...),
  and fingerprints (tree structure, shapes, dtypes, SHA-256 of the bytes)
  of the initial ``params``, ``data``, ``eval_data`` and, for a custom
  ``optimizer``, of its initial state. Code cannot be compared: two
  optimizers with equal states (e.g. ``optax.adam`` with other constant
  learning rates) or another ``loss_fn`` are not told apart; record such
  choices in ``metadata`` and compare them yourself (``sam-eos run`` does).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; ``-> (scalar, aux)``
      with ``has_aux``; ``loss_fn(params, batch, model_state) -> (scalar,
      new_model_state)`` with a ``model_state``.
    params: initial parameter pytree.
    data: pytree of arrays with a shared leading example axis ``N``; the
      batch passed to ``loss_fn`` is ``data`` itself (full batch) or a
      pytree of ``batch_size`` examples drawn without replacement.
    learning_rate: finite step size ``eta > 0``. With a custom
      ``optimizer`` it only drives the edges (so it must be the optimizer's
      learning rate, and a sweep is refused), unless the optimizer is an
      ``optax.inject_hyperparams`` one with a ``learning_rate``
      hyperparameter: then ``learning_rate`` sets it (a sweep works) and
      the edges use the learning rate the optimizer's state holds after each
      update (a schedule's value, if it injects one).
    num_steps: total number of steps (``>= 1``); with an existing checkpoint
      in ``out_dir``, training continues up to this step (which must not
      be below the checkpoint's).
    rho: finite SAM radius ``>= 0``; 0 is GD/SGD.
    momentum: heavy-ball coefficient in ``[0, 1)`` for the default optimizer
      (the edges use it too); must be 0 with a custom ``optimizer``, whose
      own momentum the edges use only if it injects a ``momentum``
      hyperparameter (``optax.inject_hyperparams(optax.sgd)``).
    normalize: (bool) normalized SAM (default) or unnormalized SAM (USAM);
      the ``sam_edge`` column then holds the USAM edge.
    optimizer: optional optax base optimizer replacing SGD (see
      ``learning_rate`` and ``momentum``).
    batch_size: minibatch size, or None for full batch.
    track_every: measure every this many steps (step 0 included).
    num_lanczos_iters: the cap on Lanczos iterations (Hessian-vector
      products) per measurement, itself capped at the number of parameters
      (which gives the exact spectrum). With ``sharpness_tol=None``, every
      measurement uses exactly this many.
    sharpness_tol: relative residual bound of the top Ritz pair at which a
      measurement stops, or None for a fixed ``num_lanczos_iters``. Some
      eigenvalue then lies within ``sharpness_tol * sharpness`` of the
      recorded sharpness (Bauer-Fike), and the eigenvalue error is usually
      far smaller (about residual squared over the spectral gap). The
      default ``1e-3`` is stricter than the authors' power-iteration
      protocol (relative change ``1e-3`` between iterates, about 3% error).
    num_warm_vectors: top Ritz vectors carried from one measurement to the
      next (a Rayleigh-Ritz step on them starts each measurement, costing
      that many products; 1 is the classic warm start from the previous top
      eigenvector, which misses a new top eigenvector when the top two swap
      order). Capped at ``num_lanczos_iters``, raised to
      ``num_top_eigenvalues``.
    num_top_eigenvalues: the number ``k`` of top Hessian eigenvalues
      recorded at every tracked step: with ``k > 1`` the history gains the
      columns ``top_eigenvalue_2``, ..., ``top_eigenvalue_k``, the 2nd to
      ``k``-th largest Ritz values of the same Lanczos run as
      ``sharpness``, which then stops only once all ``k`` top pairs meet
      ``sharpness_tol`` (more products per check). Each then lies within
      ``sharpness_tol`` times itself of some eigenvalue, as ``sharpness``
      does, unless the check stopped at the cap (``lanczos_iters ==
      num_lanczos_iters``). Must be ``<= num_lanczos_iters`` and the number
      of parameters.
    batch_sharpness_batches: with a ``batch_size``, an int ``K >= 1``: every
      tracked step also records, at ``w_t``, the batch sharpness
      ``E_B[g_B^T H_B g_B] / E_B[||g_B||^2]`` of minibatches ``B`` of
      ``batch_size`` examples (Andreyev & Beneventano 2024, the curvature
      that minibatch SGD drives to ``2 / eta``), estimated over ``K``
      random batches of the real examples (``se.batch_sharpness``), as the
      columns ``batch_sharpness``, ``batch_sharpness_low`` and
      ``batch_sharpness_high`` (the estimate and its 95% interval,
      ``-inf``/``inf`` for ``K = 1``), and ``batch_sam_edge``, the mean
      SAM-edge ``E_B[sam_edge(eta, rho, ||g_B||)]`` over the same batches
      (``se.batch_sam_edge``, with the step's learning rate, ``rho`` and
      momentum; ``2 (1 + momentum) / eta`` at ``rho = 0``, the USAM edge,
      constant in ``g``, with ``normalize=False``). The batches come from
      ``sam_eos.loop.batch_sharpness_key(key, step)``: reproducible, and
      not the step's own batch. With a ``model_state`` the losses use the
      step's ``s_t``. Costs ``K`` gradients and Hessian-vector products
      plus ``K`` gradients per tracked step. None (default): no columns.
    key: int seed, list (or signed integer array) of seeds, or PRNG
      key(s): typed keys, or ``uint32`` raw key data whose trailing axis is
      one key's data (as ``jax.random.PRNGKey``); default seed 0.
    out_dir: folder for ``config.json``, ``metrics.csv`` and
      ``checkpoint.npz`` (all replaced atomically); None keeps everything
      in memory. A ``metrics.csv`` there without a checkpoint is replaced
      only if ``config.json`` shows it is ``train``'s.
    progress: show a progress bar (stderr).
    mesh: optional ``jax.sharding.Mesh`` with a ``"data"`` axis (see
      ``se.data_mesh``): the (full or mini) batch is sharded along it,
      params, optimizer state and Lanczos vectors are replicated, and a
      ``"config"`` axis, if present, splits a sweep's configurations. Results
      equal the single-device ones up to float reduction order. A full
      batch's example count must divide evenly over the ``"data"`` axis
      (pad with ``se.pad_to_multiple`` and a ``se.masked_mean`` loss
      otherwise); minibatches need only ``batch_size`` to divide, as the
      data are padded here and batches drawn from the real examples only
      (do not pad them yourself). Across
      hosts, call ``jax.distributed.initialize()`` first; every process
      gathers the checkpoint, only process 0 writes files and shows
      progress.
    chunk_size: steps per compiled chunk (default about 200, a multiple of
      ``track_every``); files are written after every chunk.
    eps: added to ``||g||`` in the SAM normalization.
    m_sharpness: None (default) perturbs with the whole batch's gradient,
      the algorithm Long & Bartlett analyse. An int ``m`` splits each batch
      into ``m`` equal groups that each ascend with their own gradient and
      averages their perturbed gradients (Foret et al.'s per-device SAM,
      "m-sharpness": a different algorithm, one extra gradient per step).
    adaptive: ASAM (Kwon et al. 2021): the perturbation
      ``rho T^2 g / (||T g|| + eps)`` with the elementwise ``T = |w| +
      adaptive_eta`` (see ``se.sam_perturbation``), invariant to rescaling
      the weights. The ``sam_edge`` column stays plain SAM's edge.
    adaptive_eta: ASAM's ``eta_a >= 0`` (used with ``adaptive`` only).
    eigen_weight: ``alpha >= 0``; above 0, Eigen-SAM (Luo et al. 2024): the
      ascent direction ``g / ||g|| + alpha sign(<g, v>) v`` rescaled to
      radius ``rho`` (see ``se.sam_perturbation``), with ``v`` the top
      Hessian eigenvector the tracking carries: the top Ritz vector of the
      most recent check, so refreshed every ``track_every`` steps (on a
      tracked step, the one just measured at ``w_t``). 0 (default) is plain
      SAM. Not together with ``adaptive``. Like ``adaptive``, it changes
      SAM configurations only (``rho > 0``); GD rows are unaffected.
    weight_decay: finite ``wd >= 0``: L2 regularization ``wd/2 ||w||^2``
      coupled to the gradient, the optimizer being fed ``grad L(w + e) +
      wd * w``, the decay taken at the unperturbed ``w`` (0, the default,
      is none). With a custom ``optimizer`` (e.g. Adam) the decay passes
      through its preconditioning; for decoupled decay pass
      ``optax.adamw`` instead. Every recorded column (``loss``,
      ``grad_norm``, ``sharpness``, the eigenvalues, alignments and edges,
      which use ``||g||``) is of the data loss ``L`` without the decay
      term: the regularized objective's Hessian is ``H + wd I``, its top
      eigenvalue ``sharpness + wd``.
    decay_in_perturbation: (bool) where the decay enters the SAM ascent,
      which Foret et al. 2021 and Andriushchenko & Flammarion 2022 discuss.
      False (default, outside): ``e`` is computed from ``g = grad L(w)``
      alone, as ``se.sam(optax.chain(optax.add_decayed_weights(wd), base),
      rho)``. True (inside): ``e`` is computed from ``g + wd * w``, the
      gradient of the regularized loss, as ``optax.chain(
      optax.add_decayed_weights(wd), se.sam(base, rho))``. Either way the
      step is ``w <- w + base_update(grad L(w + e) + wd * w)``, exactly
      the transform's (see ``se.sam``). Not with ``m_sharpness``.
    metadata: extra JSON-serializable settings saved in ``config.json``
      (not compared on resume).
    eval_fn: optional ``eval_fn(params, eval_data) -> dict`` of real
      scalars (e.g. ``{"test_loss": ..., "test_accuracy": ...}``), evaluated
      at every tracked step inside the compiled chunk; each key becomes a
      history column (names must not clash with ``se.HISTORY_COLUMNS``).
      With a ``model_state`` it is called as ``eval_fn(params, eval_data,
      model_state)`` (e.g. BatchNorm in inference mode with the running
      statistics).
    eval_data: the pytree passed to ``eval_fn`` (e.g. held-out examples),
      an argument of the compiled program, not a captured constant.
    per_config_params: ``params`` holds one initialization per
      configuration, stacked along a leading axis of size ``C`` (e.g. one
      per seed); otherwise every configuration starts from ``params``. A
      ``model_state`` is then stacked the same way.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
    preconditioner: for an adaptive base ``optimizer``, a function
      ``opt_state -> P``, the positive diagonal preconditioner as a pytree
      like ``params`` (e.g. ``se.adam_preconditioner`` for optax Adam). Every
      tracked step then also records the column
      ``preconditioned_sharpness``, the top eigenvalue of ``P^{-1/2} H
      P^{-1/2}`` at ``w_t`` with ``P`` from the optimizer state that
      reached ``w_t`` (the step before's preconditioner; at step 0 Adam's is
      ``eps``), to the same ``sharpness_tol`` and from its own carried
      vectors. Compare it with ``se.adam_edge(learning_rate, b1)`` (Cohen et
      al. 2022).
    model_state: the model's mutable state (e.g. flax's ``batch_stats``),
      or None for a stateless model. It is carried through the compiled
      loop: step ``t`` calls ``loss_fn(w_t, batch, s_t) -> (L, s_{t+1})``,
      and the gradient, the SAM ascent and the tracked Hessian all use that
      batch and the state ``s_t`` the step starts from, in the mode
      ``loss_fn`` runs the model in (training mode for BatchNorm: batch
      statistics, so the sharpness is that of the training-mode loss on the
      step's batch, a function of ``w`` only through this batch's
      statistics). The perturbed point's new state is dropped. The state is
      checkpointed and resumed, and returned in ``TrainResult.model_state``.

  Returns:
    ``TrainResult(params, history, diverged_at, model_state)``.

  Raises:
    ValueError: for invalid arguments (named in the message: e.g. a
      non-finite ``learning_rate``, empty ``data``, integer ``params``, a
      non-bool ``normalize``, non-JSON ``metadata``, ``adaptive`` with
      ``eigen_weight > 0``, ``num_top_eigenvalues > num_lanczos_iters``,
      ``batch_sharpness_batches`` without a ``batch_size`` or below 1, a
      negative ``weight_decay``, ``decay_in_perturbation`` with
      ``m_sharpness``), a
      checkpoint in ``out_dir`` from a run with other settings (the message
      names them) or beyond ``num_steps``, or a foreign ``metrics.csv`` in
      ``out_dir``.
    TrainingDiverged: when every configuration has diverged.

  Warns:
    UserWarning: naming the configurations of a sweep that diverged; and,
      once, the number of tracked rows whose check stopped at the cap
      (``num_lanczos_iters``) above ``sharpness_tol``, with the worst bound.

  Examples:
    GD on a quadratic with Hessian ``diag(3, 1)``: the tracked sharpness is
    its top eigenvalue.

    >>> import jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, h: 0.5 * jnp.sum(h[0] * w ** 2)
    >>> result = se.train(loss, jnp.ones(2), jnp.array([[3.0, 1.0]]),
    ...                   learning_rate=0.1, num_steps=20, track_every=10,
    ...                   num_lanczos_iters=2, progress=False)
    >>> result.history["step"].tolist(), result.history["sharpness"].round(4).tolist()
    ([0, 10], [3.0, 3.0])

  References:
    Long & Bartlett 2023 (tracked quantities); Cohen et al. 2021; Kwon,
    Kim, Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", ICML 2021
    (``adaptive``); Luo et al., "Explicit Eigenvalue Regularization Improves
    Sharpness-Aware Minimization", 2024 (``eigen_weight``); Andreyev &
    Beneventano, "Edge of Stochastic Stability: Revisiting the Edge of
    Stability for SGD", arXiv:2412.20553, 2024 (``batch_sharpness_batches``);
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, and Andriushchenko & Flammarion, "Towards
    Understanding Sharpness-Aware Minimization", ICML 2022
    (``decay_in_perturbation``).
  """
  num_steps = _checks.check_int("num_steps", num_steps, 1)
  settings = _validate(
      loss_fn,
      params,
      data,
      eval_data,
      learning_rate=learning_rate,
      num_steps=num_steps,
      rho=rho,
      momentum=momentum,
      normalize=normalize,
      optimizer=optimizer,
      batch_size=batch_size,
      track_every=track_every,
      num_lanczos_iters=num_lanczos_iters,
      sharpness_tol=sharpness_tol,
      num_warm_vectors=num_warm_vectors,
      num_top_eigenvalues=num_top_eigenvalues,
      batch_sharpness_batches=batch_sharpness_batches,
      has_aux=has_aux,
      model_state=model_state,
      preconditioner=preconditioner,
      key=key,
      mesh=mesh,
      chunk_size=chunk_size,
      eps=eps,
      m_sharpness=m_sharpness,
      adaptive=adaptive,
      adaptive_eta=adaptive_eta,
      eigen_weight=eigen_weight,
      weight_decay=weight_decay,
      decay_in_perturbation=decay_in_perturbation,
      eval_fn=eval_fn,
      per_config_params=per_config_params,
      metadata=metadata,
  )
  state = _initial_state(settings, params, per_config_params, model_state)
  if preconditioner is not None:
    _check_preconditioner(preconditioner, state)
  signature = (
      None
      if out_dir is None
      else _signature(
          settings,
          per_config_params,
          params,
          data,
          eval_data,
          state.opt_state,
          model_state,
      )
  )
  hparams, place, spmd_axis = settings.hparams, lambda s: s, None
  if mesh is not None:
    if batch_size is not None:  # draws skip the padding (config.num_examples)
      data, _ = parallel.pad_to_multiple(
          data, parallel.axis_size(mesh, parallel.DATA_AXIS)
      )
    data = parallel.shard_data(data, mesh)
    if parallel.CONFIG_AXIS in mesh.axis_names:
      spmd_axis = parallel.CONFIG_AXIS
    per_config = NamedSharding(mesh, PartitionSpec(spmd_axis))
    place = lambda tree: parallel.place(tree, per_config)
    state, hparams = place(parallel.to_host((state, hparams)))
    settings = settings._replace(hparams=hparams)
  run, files = _open_run(
      out_dir, settings, signature, state, num_steps, metadata, mesh, place
  )
  if run.next_step < num_steps:
    runner = _runner(
        settings, spmd_axis, run.state.params, data, run.state.model_state
    )
    bar = _progress(
        num_steps, run.next_step, progress and jax.process_index() == 0
    )
    try:
      run = _run_chunks(
          runner,
          run,
          settings,
          data,
          eval_data,
          num_steps,
          files,
          bar,
          signature,
      )
    finally:
      if bar is not None:
        bar.close()
  diverged_at = parallel.to_host(run.state.diverged_at).astype(np.int64)
  _warn_diverged(settings, diverged_at)
  _warn_uncertified(settings, run.history)
  final_state = None if model_state is None else run.state.model_state
  if settings.sweep:
    return TrainResult(
        params=run.state.params,
        history=run.history,
        diverged_at=diverged_at,
        model_state=final_state,
    )
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  return TrainResult(
      params=first(run.state.params),
      history=_squeeze(run.history, False),
      diverged_at=int(diverged_at[0]),
      model_state=None if final_state is None else first(final_state),
  )
