"""Runs a named experiment: data, model, loss, one vmapped ``se.train`` sweep.

``run_experiment(config, out_dir)`` is the whole pipeline behind
``sam-eos run``: it loads and preprocesses the data set, builds the model and
its ``loss_fn(params, batch)``, initializes the parameters from
``config.init_seed`` (and, for a model with BatchNorm, its ``batch_stats``,
carried as ``se.train``'s ``model_state``, with momentum SGD and weight
decay as the base optimizer), trains every configuration of the sweep
``learning_rates x rhos x seeds`` as ONE vmapped program (``se.train``), saves
the config as ``metadata`` in ``config.json`` beside ``metrics.csv`` and
``checkpoint.npz``, and draws the figures (``plots.plot_runs``).
``run_or_load(config, ...)`` trains a run (or, given ``run_dir``, finds a
finished one with ``find_run``) and reads it back from its folder, as the
notebooks do. The
structure follows the flax examples and nanodo: a thin entry point, a fully
commented config, and a smoke test that runs the real entry point shrunk.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Section 4 and the authors' code
  (``google-deepmind/sam_edge``).
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_eos as se
from sam_eos import parallel
from sam_eos.experiments import claims as claims_lib
from sam_eos.experiments import data as data_lib
from sam_eos.experiments import losses as losses_lib
from sam_eos.experiments import models as models_lib
from sam_eos.experiments.presets import DESCRIPTIVE_FIELDS, ExperimentConfig

PyTree = Any
# Files a run writes; ``overwrite=True`` deletes exactly these.
RUN_FILES = ("config.json", "metrics.csv", "checkpoint.npz")


class ExperimentRun(NamedTuple):
  """A run of an experiment as read back from its folder (``run_or_load``).

  Attributes:
    metrics: the flat columns of its ``metrics.csv`` (``se.read_csv``): one
      entry per tracked step and configuration.
    config: its settings, from the ``metadata`` of its ``config.json``.
    out_dir: the run folder.
    result: the ``se.TrainResult`` when ``run_or_load`` trained the run;
      None when it loaded a finished one.
  """

  metrics: dict[str, np.ndarray]
  config: ExperimentConfig
  out_dir: pathlib.Path
  result: se.TrainResult | None

  @property
  def trained(self) -> bool:
    """Whether this run was trained by the call (not loaded from disk)."""
    return self.result is not None


class Problem(NamedTuple):
  """What ``se.train`` needs for one experiment.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the initial parameters, one per configuration of the sweep
      (``runner.sweep`` order) stacked on a leading axis: configurations of
      the same seed share theirs (``se.train(..., per_config_params=True)``).
    data: pytree of arrays with a leading example axis.
    num_params: number of scalars of one configuration's parameters.
    eval_fn: ``eval_fn(params, eval_data) -> {"test_loss",
      "test_accuracy"}``, or None (the quadratic).
    eval_data: the held-out ``(inputs, targets)``, or None.
    model_state: for a model with BatchNorm (``models.STATEFUL_MODELS``),
      the initial ``batch_stats``, stacked like ``params``; ``loss_fn`` is
      then ``loss_fn(params, batch, state) -> (loss, new_state)`` (training
      mode) and ``eval_fn(params, eval_data, state)`` (inference mode).
      None otherwise.
    optimizer: the base optimizer for ``se.train(optimizer=...)``, or None
      for ``se.train``'s SGD with ``config.momentum``.
  """

  loss_fn: Callable[..., Any]
  params: PyTree
  data: PyTree
  num_params: int
  eval_fn: Callable[..., dict[str, jax.Array]] | None = None
  eval_data: PyTree = None
  model_state: PyTree = None
  optimizer: optax.GradientTransformation | None = None


# Settings of the base optimizer that a model's ``model_kwargs`` may hold
# beside the model's attributes (``ExperimentConfig`` has no field for
# them), with their defaults: only ``weight_decay``, read for the models of
# ``models.STATEFUL_MODELS``.
OPTIMIZER_KWARGS = {"weight_decay": 0.0}


def _sgd_with_weight_decay(
    learning_rate: float, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
  """``weight_decay * w`` added to the gradient, then heavy-ball SGD."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )


def base_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
  """Momentum SGD with weight decay inside it, as the SAM papers train.

  ``optax.inject_hyperparams`` of [``add_decayed_weights(weight_decay)`` ->
  ``sgd(learning_rate, momentum)``]: SAM's (perturbed) gradient of the loss
  gets ``weight_decay * w`` added and feeds the momentum buffer (Foret et
  al.'s setting). ``se.train`` sets the injected ``learning_rate`` of every
  configuration of the sweep and reads the injected ``momentum`` for the
  edges: ``gd_edge = 2 (1 + beta) / eta`` and the SAM-edge with momentum.
  The sharpness is that of the loss without the decay term (whose Hessian
  adds ``weight_decay`` to every eigenvalue, 5e-4 here, negligible beside
  the edges).

  Args:
    config: the experiment; ``momentum`` from its field, ``weight_decay``
      from its ``model_kwargs`` (default 0).

  Returns:
    The injected optimizer (its ``learning_rate`` is overwritten by
    ``se.train``).

  References:
    Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021 (momentum 0.9, weight
    decay 5e-4, rho 0.05 on CIFAR-10).
  """
  weight_decay = float(
      config.model_kwargs.get("weight_decay", OPTIMIZER_KWARGS["weight_decay"])
  )
  return optax.inject_hyperparams(_sgd_with_weight_decay)(
      learning_rate=config.learning_rates[0],
      momentum=config.momentum,
      weight_decay=weight_decay,
  )


def _text_crops(
    config: ExperimentConfig, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping crops of ``context_length + 1`` bytes of a split's text.

  As in the authors' code (``dataset.load_ascii_dataset``): the text is cut
  into consecutive crops; ``num_examples`` (``num_test_examples`` for the
  test split) of them are drawn without replacement (seed ``init_seed``),
  or all are used.
  """
  text = data_lib.load_shakespeare(split)
  crop_len = config.context_length + 1
  crops = text[: len(text) // crop_len * crop_len].reshape(-1, crop_len)
  field = "num_examples" if split == "train" else "num_test_examples"
  count = getattr(config, field)
  if count is not None:
    if count > len(crops):
      raise ValueError(
          f"`{field}` ({count}) exceeds the {len(crops)} non-overlapping "
          f"crops of {crop_len} characters in the Tiny Shakespeare {split} "
          "text; lower it or use None for all."
      )
    rng = np.random.default_rng(config.init_seed)
    crops = crops[np.sort(rng.choice(len(crops), count, replace=False))]
  crops = crops.astype(np.int32)
  return crops[:, :-1], crops[:, 1:]


def load_data(config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
  """The training data of an experiment as ``(inputs, targets)``.

  Images: the first ``num_examples`` training images, pixels / 256 centred
  by their mean image (and standardized if ``config.standardize``), one-hot
  targets. Text: crops (``_text_crops``). Quadratic: the diagonal, shape
  ``(1, d)``, as both entries.

  Args:
    config: the experiment.

  Returns:
    NumPy arrays with a shared leading example axis.

  Raises:
    ValueError: if ``num_examples`` exceeds the data set.
    data.DataUnavailableError: if the files are missing and cannot be
      downloaded.

  References:
    Long & Bartlett 2023, Section 4; Cohen et al. 2021 (standardization);
    LeCun et al. 1998 (MNIST); Krizhevsky 2009 (CIFAR-10); Karpathy 2015
    (Tiny Shakespeare).
  """
  if config.dataset == "quadratic":
    diagonal = np.asarray(config.model_kwargs["diagonal"], np.float32)[None]
    return diagonal, diagonal
  if config.dataset == "shakespeare":
    return _text_crops(config)
  loader = {"mnist": data_lib.load_mnist, "cifar10": data_lib.load_cifar10}
  images, labels = loader[config.dataset](
      "train", num_examples=config.num_examples
  )
  return data_lib.preprocess_images(
      images, labels, standardize=config.standardize
  )


def load_test_data(
    config: ExperimentConfig,
) -> tuple[np.ndarray, np.ndarray] | None:
  """The held-out data of an experiment as ``(inputs, targets)``, or None.

  Images: the first ``num_test_examples`` test images, preprocessed with the
  statistics of the training images (``load_data``). Text: crops of the
  held-out text (the last 10,000 lines). The quadratic has none.

  Args:
    config: the experiment.

  Returns:
    NumPy arrays with a shared leading example axis, or None.

  Raises:
    ValueError: if ``num_test_examples`` exceeds the split.
    data.DataUnavailableError: if the files are missing and cannot be
      downloaded.
  """
  if config.dataset == "quadratic":
    return None
  if config.dataset == "shakespeare":
    return _text_crops(config, "test")
  loader = {"mnist": data_lib.load_mnist, "cifar10": data_lib.load_cifar10}
  train_images, _ = loader[config.dataset](
      "train", num_examples=config.num_examples
  )
  images, labels = loader[config.dataset](
      "test", num_examples=config.num_test_examples
  )
  return data_lib.preprocess_images(
      images, labels, reference=train_images, standardize=config.standardize
  )


def _quadratic_loss(
    params: jax.Array, batch: tuple[jax.Array, jax.Array]
) -> jax.Array:
  """``1/2 sum_i h_i w_i^2`` with the diagonal ``h`` as the (only) example."""
  return 0.5 * jnp.sum(batch[0][0] * params**2)


def adam_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
  """``optax.adam`` with an injected learning rate, ``b1 = claims.ADAM_B1``.

  ``se.train`` sets the injected ``learning_rate`` of every configuration of
  the sweep; the preconditioner ``sqrt(v_hat) + eps`` is read from its state
  by ``se.adam_preconditioner`` (optax's ``b2`` and ``eps`` defaults).

  Args:
    config: the experiment (``optimizer="adam"``).

  Returns:
    The injected optimizer.

  References:
    Kingma & Ba, "Adam", ICLR 2015; Cohen et al., "Adaptive Gradient
    Methods at the Edge of Stability", 2022.
  """
  return optax.inject_hyperparams(optax.adam)(
      learning_rate=config.learning_rates[0], b1=claims_lib.ADAM_B1
  )


def train_options(config: ExperimentConfig, problem: Problem) -> dict[str, Any]:
  """The ``se.train`` keywords an experiment's settings decide.

  Everything but the sweep (``learning_rate``, ``rho``, ``key``), the run's
  files and its devices: the base optimizer (with Adam also its
  preconditioner), the SAM variant, the step counts and the tracking.

  Args:
    config: the experiment.
    problem: its ``build_problem`` output.

  Returns:
    Keyword arguments for ``se.train``.
  """
  adam = config.optimizer == "adam"
  return dict(
      num_steps=config.num_steps,
      # A custom base optimizer holds its own (injected) momentum.
      momentum=config.momentum if problem.optimizer is None else 0.0,
      optimizer=problem.optimizer,
      preconditioner=se.adam_preconditioner if adam else None,
      normalize=config.normalize,
      adaptive=config.adaptive,
      adaptive_eta=config.adaptive_eta,
      eigen_weight=config.eigen_weight,
      batch_size=config.batch_size,
      track_every=config.track_every,
      num_lanczos_iters=config.num_lanczos_iters,
      sharpness_tol=config.sharpness_tol,
      num_warm_vectors=config.num_warm_vectors,
      num_top_eigenvalues=config.num_top_eigenvalues,
      batch_sharpness_batches=config.batch_sharpness_batches,
      eps=config.eps,
      model_state=problem.model_state,
      per_config_params=True,
  )


def build_problem(
    config: ExperimentConfig, *, pad_to_multiple: int = 1
) -> Problem:
  """Data, model, loss and initial parameters of an experiment.

  Args:
    config: the experiment.
    pad_to_multiple: for a full-batch run on a data-parallel mesh, the size
      of its ``data`` axis. When it does not divide the example count, the
      data are padded with masked examples (``se.pad_to_multiple``) and the
      loss becomes the masked mean (``se.masked_mean``), which ignores them
      exactly: ``data = ((inputs, targets), mask)``. Nothing is dropped.

  Returns:
    A ``Problem``; the data arrays are on the default device.

  Raises:
    ValueError: for data requests that cannot be met (see ``load_data``), or
      padding asked of the quadratic (a single example).
  """
  inputs, targets = load_data(config)
  data = (jnp.asarray(inputs), jnp.asarray(targets))
  keys = jnp.stack(
      [
          jax.random.fold_in(jax.random.key(config.init_seed), s)
          for s in sweep(config)[2]
      ]
  )
  pad = len(inputs) % pad_to_multiple != 0
  eval_fn = eval_data = model_state = optimizer = None
  if config.model == "quadratic":
    if pad:
      raise ValueError(
          "The quadratic has a single example, which cannot be "
          "split over devices; run it without --data-parallel."
      )
    params = jax.vmap(
        lambda k: jax.random.normal(k, inputs.shape[1:], jnp.float32)
    )(keys)
    loss_fn = _quadratic_loss
  else:
    kwargs = dict(config.model_kwargs)
    if config.model == "transformer":
      kwargs["context_length"] = config.context_length
    if config.model in models_lib.STATEFUL_MODELS:
      return _stateful_problem(config, data, keys, kwargs, pad)
    model = models_lib.make_model(config.model, **kwargs)
    params = jax.jit(
        jax.vmap(
            lambda k, x: models_lib.init_params(model, k, x), in_axes=(0, None)
        )
    )(keys, data[0][:1])
    if pad:
      loss_fn = se.masked_mean(
          losses_lib.make_per_example_loss_fn(model, config.loss)
      )
      data = se.pad_to_multiple(data, pad_to_multiple)
    else:
      loss_fn = losses_lib.make_loss_fn(model, config.loss)
    eval_fn = losses_lib.make_eval_fn(model, config.loss)
    eval_data = tuple(jnp.asarray(a) for a in load_test_data(config))
  if config.optimizer == "adam":
    optimizer = adam_optimizer(config)
  one = jax.tree.map(lambda x: x[0], params)
  return Problem(
      loss_fn=loss_fn,
      params=params,
      data=data,
      num_params=models_lib.count_params(one),
      eval_fn=eval_fn,
      eval_data=eval_data,
      optimizer=optimizer,
  )


def _stateful_problem(
    config: ExperimentConfig,
    data: tuple[jax.Array, jax.Array],
    keys: jax.Array,
    kwargs: dict[str, Any],
    pad: bool,
) -> Problem:
  """``build_problem`` for a model with BatchNorm: state and base optimizer."""
  if config.optimizer != "sgd":
    raise ValueError(
        f"{config.model!r} trains with momentum SGD and weight decay "
        f"(base_optimizer); optimizer {config.optimizer!r} is for the "
        "models without BatchNorm."
    )
  if pad:
    raise ValueError(
        f"{config.model!r} has BatchNorm, whose batch statistics padded "
        "examples would change; run it with a batch_size (minibatches need "
        "no padding) or on a device count that divides num_examples."
    )
  for name in OPTIMIZER_KWARGS:
    kwargs.pop(name, None)
  model = models_lib.make_model(config.model, **kwargs)
  params, model_state = jax.jit(
      jax.vmap(
          lambda k, x: models_lib.init_variables(model, k, x),
          in_axes=(0, None),
      )
  )(keys, data[0][:1])
  one = jax.tree.map(lambda x: x[0], params)
  return Problem(
      loss_fn=losses_lib.make_stateful_loss_fn(model, config.loss),
      params=params,
      data=data,
      num_params=models_lib.count_params(one),
      eval_fn=losses_lib.make_stateful_eval_fn(model, config.loss),
      eval_data=tuple(jnp.asarray(a) for a in load_test_data(config)),
      model_state=model_state,
      optimizer=base_optimizer(config),
  )


def sweep(
    config: ExperimentConfig,
) -> tuple[list[float], list[float], list[int]]:
  """The configurations ``learning_rates x rhos x seeds``, as three lists.

  Args:
    config: the experiment.

  Returns:
    ``(learning_rates, rhos, seeds)`` of equal length ``config.num_configs``,
    learning rate slowest, seed fastest; configuration ``c`` of the run is
    entry ``c``.

  Examples:
    >>> from sam_eos.experiments.presets import get_experiment
    >>> sweep(get_experiment("mnist-mlp").replace(seeds=(0, 1)))
    ([0.9, 0.9, 0.9, 0.9], [0.0, 0.0, 0.1, 0.1], [0, 1, 0, 1])
  """
  product = list(
      itertools.product(config.learning_rates, config.rhos, config.seeds)
  )
  return (
      [p[0] for p in product],
      [p[1] for p in product],
      [p[2] for p in product],
  )


def _clear(out_dir: str) -> None:
  """Deletes the files of a previous run (only those) from ``out_dir``."""
  from sam_eos.experiments import plots  # pylint: disable=g-import-not-at-top

  for name in (
      RUN_FILES + plots.FIGURES + (plots.ADAM_FIGURE, plots.BATCH_FIGURE)
  ):
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
      os.remove(path)


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
  """Settings as JSON would store them, without ``num_steps`` and prose."""
  return {
      k: v
      for k, v in json.loads(json.dumps(settings)).items()
      if k not in DESCRIPTIVE_FIELDS + ("num_steps",)
  }


def _check_resumable(config: ExperimentConfig, out_dir: str) -> None:
  """Raises ValueError if ``out_dir`` holds a run of other settings.

  ``se.train`` resumes from a checkpoint when its own settings match; this
  also compares the experiment (data, model, ...), except ``num_steps``,
  which a resumed run may extend.
  """
  config_path = os.path.join(out_dir, "config.json")
  if not (
      os.path.exists(config_path)
      and os.path.exists(os.path.join(out_dir, "checkpoint.npz"))
  ):
    return
  with open(config_path) as f:
    saved = json.load(f).get("metadata") or {}
  if _comparable(saved) != _comparable(config.to_dict()):
    raise ValueError(
        f"`out_dir` {out_dir!r} holds a run with other settings; resume it "
        "with the same settings, pick another out_dir, or overwrite it "
        "(sam-eos run --overwrite)."
    )


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
    plot: bool = True,
    x_axis: str = "step",
    mesh: jax.sharding.Mesh | None = None,
) -> se.TrainResult:
  """Runs every configuration of an experiment as one vmapped program.

  Writes ``config.json`` (with ``config.to_dict()`` as ``metadata``),
  ``metrics.csv``, ``checkpoint.npz`` and, if ``plot``, the figures of
  ``plots.FIGURES`` to ``out_dir``. An existing run of the same settings in
  ``out_dir`` is resumed (and extended if ``num_steps`` grew).

  Args:
    config: the experiment (see ``presets``).
    out_dir: the run folder (created if needed).
    progress: show a progress bar on stderr.
    overwrite: delete a previous run's files in ``out_dir`` first.
    plot: draw the figures after training (also after a divergence, from
      the rows recorded before it).
    x_axis: ``"step"`` or ``"wall_time"``, the figures' x-axis.
    mesh: a device mesh (``se.data_mesh``) for data-parallel training: the
      batch is sharded along its ``data`` axis (a full batch that the axis
      does not divide is padded with masked examples, see
      ``build_problem``), the sweep along its ``config`` axis. Results equal
      the single-device run up to float rounding.

  Returns:
    ``se.TrainResult`` with a leading configuration axis (see ``sweep``).

  Raises:
    ValueError: for data requests that cannot be met, an unwritable
      ``out_dir``, an ``out_dir`` holding a run of other settings, or a bad
      ``x_axis``.
    se.TrainingDiverged: if every configuration's loss became non-finite;
      the rows before it are in ``metrics.csv`` and the figures. When only
      some diverged, the others run to the end, ``se.train`` warns and
      ``result.diverged_at`` names the step of each (-1 if finite).
  """
  if x_axis not in ("step", "wall_time"):
    raise ValueError(f"`x_axis` must be 'step' or 'wall_time', got {x_axis!r}.")
  out_dir = os.fspath(out_dir)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"`out_dir` {out_dir!r} cannot be created: {e}") from e
  if overwrite:
    if jax.process_index() == 0:
      _clear(out_dir)
  else:
    _check_resumable(config, out_dir)
  multiple = 1
  if mesh is not None and config.batch_size is None:
    multiple = parallel.axis_size(mesh, parallel.DATA_AXIS)
  problem = build_problem(config, pad_to_multiple=multiple)
  learning_rates, rhos, seeds = sweep(config)
  try:
    result = se.train(
        problem.loss_fn,
        problem.params,
        problem.data,
        learning_rate=learning_rates,
        rho=rhos,
        key=seeds,
        out_dir=out_dir,
        progress=progress,
        metadata=config.to_dict(),
        mesh=mesh,
        eval_fn=problem.eval_fn,
        eval_data=problem.eval_data,
        **train_options(config, problem),
    )
  except se.TrainingDiverged:
    if plot:
      _plot(out_dir, x_axis)
    raise
  if plot:
    _plot(out_dir, x_axis)
  return result


def _plot(out_dir: str, x_axis: str) -> None:
  """Draws the figures of the run in ``out_dir`` if it recorded any rows.

  Only process 0 draws (it alone writes ``metrics.csv``).
  """
  if jax.process_index() != 0:
    return
  from sam_eos.experiments import plots  # pylint: disable=g-import-not-at-top

  metrics_path = os.path.join(out_dir, "metrics.csv")
  if os.path.exists(metrics_path) and os.path.getsize(metrics_path):
    plots.plot_runs([out_dir], out_dir, x_axis=x_axis)


def find_run(run_dir: str | os.PathLike, name: str) -> pathlib.Path:
  """The run folder of experiment ``name`` at or directly under ``run_dir``.

  The candidates, in order: ``run_dir`` itself, then ``run_dir/NAME-paper``,
  ``run_dir/NAME-cpu`` and ``run_dir/NAME`` (the folder names ``sam-eos run``
  suggests); the first that holds a ``metrics.csv`` wins. Which experiment
  the folder holds is not checked here (``run_or_load`` checks it).

  Args:
    run_dir: a run folder (with ``metrics.csv``) or a folder of run folders;
      ``~`` is expanded.
    name: the experiment's registry name, e.g. ``"mnist-mlp"``.

  Returns:
    The run folder.

  Raises:
    FileNotFoundError: if no candidate holds a ``metrics.csv``; the message
      lists the candidates.

  Examples:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for folder in ("mnist-mlp-cpu", "mnist-mlp-paper"):
    ...   (root / folder).mkdir()
    ...   (root / folder / "metrics.csv").touch()
    >>> find_run(root, "mnist-mlp").name
    'mnist-mlp-paper'
    >>> find_run(root / "mnist-mlp-cpu", "mnist-mlp").name
    'mnist-mlp-cpu'
  """
  root = pathlib.Path(run_dir).expanduser()
  candidates = [root] + [
      root / f"{name}{suffix}" for suffix in ("-paper", "-cpu", "")
  ]
  for folder in candidates:
    if (folder / "metrics.csv").is_file():
      return folder
  raise FileNotFoundError(
      f"No run of {name!r} in `run_dir` {os.fspath(run_dir)!r}: none of "
      f"{[str(c) for c in candidates]} holds a metrics.csv."
  )


def run_or_load(
    config: ExperimentConfig,
    *,
    run_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    check: bool = True,
) -> ExperimentRun:
  """Trains ``config`` (or loads a finished run) and reads it back from disk.

  Without ``run_dir``: ``run_experiment(config, out_dir, plot=False)``, then
  the run folder is read back. With ``run_dir``: nothing is trained; the run
  of ``config.name`` is found by ``find_run(run_dir, config.name)`` and read,
  whatever its settings (a ``paper`` run, say). Either way the settings
  returned are the ones saved in the folder's ``config.json``, and, if
  ``check``, the history is checked by ``claims.check_history``: complete
  and equal to the returned history for a run trained here, a prefix for a
  loaded one.

  Args:
    config: the experiment to train; with ``run_dir``, only its ``name`` is
      used.
    run_dir: a finished run folder, or a folder of run folders (see
      ``find_run``), to load instead of training; None to train.
    out_dir: where to train (see ``run_experiment``); None for a fresh
      temporary folder (``ExperimentRun.out_dir``; the caller may delete
      it). Ignored with ``run_dir``.
    progress: show a progress bar on stderr while training.
    overwrite: delete a previous run's files in ``out_dir`` first instead of
      resuming it.
    check: run ``claims.check_history`` on the metrics read back.

  Returns:
    An ``ExperimentRun``: the metrics, the saved config, the folder, and the
    ``se.TrainResult`` (None when loaded).

  Raises:
    FileNotFoundError: if ``run_dir`` holds no run (see ``find_run``).
    ValueError: if the run found is of another experiment or has no
      ``config.json`` metadata, if ``check`` and its history fails
      ``claims.check_history``, or for the errors of ``run_experiment``.
    se.TrainingDiverged: if training diverged (see ``run_experiment``).

  Examples:
    >>> from sam_eos.experiments.presets import get_experiment
    >>> config = get_experiment("quadratic").replace(num_steps=20)
    >>> run = run_or_load(config, progress=False)
    >>> run.trained, run.config == config, len(run.metrics["step"])  # 6 x 4
    (True, True, 24)
    >>> again = run_or_load(config, run_dir=run.out_dir)
    >>> again.trained, again.out_dir == run.out_dir
    (False, True)
    >>> import shutil; shutil.rmtree(run.out_dir)
  """
  from sam_eos.experiments import plots  # pylint: disable=g-import-not-at-top

  result = None
  if run_dir is not None:
    folder = find_run(run_dir, config.name)
  else:
    if out_dir is None:
      out_dir = tempfile.mkdtemp(prefix=f"sam_eos_{config.name}_")
    folder = pathlib.Path(out_dir)
    result = run_experiment(
        config, folder, progress=progress, overwrite=overwrite, plot=False
    )
  metrics, metadata = plots.load_run(folder)
  if not metadata:
    raise ValueError(
        f"{folder} has no experiment settings (no `metadata` in its "
        "config.json): load a folder written by `sam-eos run` or "
        "run_experiment."
    )
  if metadata.get("name") != config.name:
    raise ValueError(
        f"{folder} holds a run of {metadata.get('name')!r}, not "
        f"{config.name!r}; point `run_dir` at a {config.name} run."
    )
  saved = ExperimentConfig.from_dict(metadata)
  if check:
    claims_lib.check_history(
        metrics,
        saved,
        complete=result is not None,
        history=None if result is None else result.history,
    )
  return ExperimentRun(
      metrics=metrics, config=saved, out_dir=folder, result=result
  )
