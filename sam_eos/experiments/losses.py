"""Losses and metrics of the experiments, and the ``loss_fn`` they build.

The paper's squared loss averages over examples *and* classes with no 1/2
(the authors' code: ``mean(optax.squared_error(logits, y))``); Cohen et al.
(2021) use half the squared error summed over classes, averaged over
examples, which is ``num_classes / 2`` times larger, so its sharpness is too.
The language model uses the mean token cross-entropy.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Section 4 and the authors' released code.
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability", ICLR 2021
  (``locuslab/edge-of-stability``, ``SquaredLoss`` in ``src/utilities.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def mse_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """The paper's squared loss: ``mean((f(x) - y)^2)`` over examples and classes.

  Args:
    logits: predictions, shape ``(N, C)`` (any shape).
    targets: targets of the same shape, e.g. one-hot labels.

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> mse_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]]))
    Array(0.5, dtype=float32)

  References:
    Long & Bartlett 2023, Section 4 (authors' code).
  """
  return jnp.mean(jnp.square(logits - targets))


def half_sse_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cohen et al.'s squared loss: ``1/2 sum_c (f(x)_c - y_c)^2``, example mean.

  Args:
    logits: predictions, shape ``(N, C)``.
    targets: targets of the same shape.

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> half_sse_loss(jnp.array([[1.0, 1.0]]), jnp.array([[0.0, 0.0]]))
    Array(1., dtype=float32)

  References:
    Cohen et al. 2021, ``SquaredLoss`` (``src/utilities.py``).
  """
  return 0.5 * jnp.mean(jnp.sum(jnp.square(logits - targets), axis=-1))


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer targets under softmax(logits).

  Args:
    logits: shape ``(..., V)``, e.g. ``(B, T, V)`` for a language model.
    targets: integer labels in ``[0, V)``, shape ``(...)``.

  Returns:
    A scalar: ``mean(-log softmax(logits)[targets])`` over all positions.

  Examples:
    >>> import jax.numpy as jnp
    >>> cross_entropy_loss(jnp.zeros((1, 4)), jnp.array([2]))  # log 4
    Array(1.3862944, dtype=float32)

  References:
    Long & Bartlett 2023, Section 4 (Tiny Shakespeare).
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)
  return -jnp.mean(picked)


def accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Fraction of positions whose arg-max logit is the target class.

  Args:
    logits: shape ``(..., C)``.
    targets: integer labels of shape ``(...)``, or one-hot (or any scores)
      of shape ``(..., C)``, read by their arg-max.

  Returns:
    A scalar in ``[0, 1]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> accuracy(jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([1, 1]))
    Array(0.5, dtype=float32)
  """
  if targets.ndim == logits.ndim:
    targets = jnp.argmax(targets, axis=-1)
  return jnp.mean(jnp.argmax(logits, axis=-1) == targets, dtype=jnp.float32)


LOSSES: dict[str, LossFn] = {
    "mse": mse_loss,
    "half_sse": half_sse_loss,
    "cross_entropy": cross_entropy_loss,
}


def _split_batch(batch: Any) -> tuple[Any, Any]:
  if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
    return batch["x"], batch["y"]
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return batch[0], batch[1]
  raise ValueError(
      "`batch` must be a pair (x, y) or a mapping with keys 'x' "
      f"and 'y', got {type(batch).__name__}"
      f"{sorted(batch) if isinstance(batch, Mapping) else ''}."
  )


def make_loss_fn(
    model: nn.Module, loss: str | LossFn
) -> Callable[[PyTree, Any], jax.Array]:
  """The library's ``loss_fn(params, batch) -> scalar`` for a model and loss.

  ``loss_fn(params, batch) = loss(model.apply({"params": params}, x), y)``.

  Args:
    model: a flax module (see ``models``); ``params`` are its
      ``init(...)["params"]``.
    loss: ``"mse"``, ``"half_sse"``, ``"cross_entropy"`` or a function
      ``loss(logits, targets) -> scalar``.

  Returns:
    ``loss_fn(params, batch)`` where ``batch`` is ``(x, y)`` or
    ``{"x": x, "y": y}`` with leading example axes; pure and jit-able.

  Raises:
    ValueError: for an unknown loss name (and, when called, for a batch of
      another structure).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_eos.experiments import models
    >>> model = models.MLP((4,), num_outputs=2)
    >>> x, y = jnp.ones((3, 5)), jnp.zeros((3, 2))
    >>> params = models.init_params(model, jax.random.key(0), x)
    >>> loss_fn = make_loss_fn(model, "mse")
    >>> bool(loss_fn(params, (x, y)) == mse_loss(
    ...     model.apply({"params": params}, x), y))
    True

  References:
    Long & Bartlett 2023; the ``loss_fn(params, batch)`` convention of
    ``sam_eos`` (DESIGN.md).
  """
  if isinstance(loss, str):
    if loss not in LOSSES:
      raise ValueError(
          f"Unknown loss {loss!r}; choose one of {sorted(LOSSES)} "
          "or pass a function loss(logits, targets)."
      )
    loss = LOSSES[loss]
  elif not callable(loss):
    raise ValueError(
        f"`loss` must be a name in {sorted(LOSSES)} or a "
        f"function, got {loss!r}."
    )

  def loss_fn(params: PyTree, batch: Any) -> jax.Array:
    x, y = _split_batch(batch)
    return loss(model.apply({"params": params}, x), y)

  return loss_fn


def make_per_example_loss_fn(
    model: nn.Module, loss: str | LossFn
) -> Callable[[PyTree, Any], jax.Array]:
  """Per-example losses ``(params, batch) -> (N,)`` for masked padding.

  Every loss of ``LOSSES`` is a mean over examples of equally sized terms, so
  the mean of these ``N`` values is ``make_loss_fn(model, loss)``; wrapped in
  ``sam_eos.masked_mean`` it ignores padded examples exactly (data-parallel
  runs whose example count the device count does not divide).

  Args:
    model: a flax module; ``params`` are its ``init(...)["params"]``.
    loss: a name of ``LOSSES`` or ``loss(logits, targets) -> scalar`` that
      averages over examples.

  Returns:
    ``per_example(params, batch) -> (N,)``, ``batch`` as in ``make_loss_fn``.

  Raises:
    ValueError: for an unknown loss name.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_eos.experiments import models
    >>> model = models.MLP((4,), num_outputs=2)
    >>> x, y = jnp.ones((3, 5)), jnp.zeros((3, 2))
    >>> params = models.init_params(model, jax.random.key(0), x)
    >>> per_example = make_per_example_loss_fn(model, "mse")
    >>> per_example(params, (x, y)).shape
    (3,)
    >>> bool(jnp.allclose(per_example(params, (x, y)).mean(),
    ...                   make_loss_fn(model, "mse")(params, (x, y))))
    True

  References:
    The padding contract of ``sam_eos.pad_to_multiple``/``masked_mean``.
  """
  batch_loss = make_loss_fn(model, loss)

  def per_example(params: PyTree, batch: Any) -> jax.Array:
    x, y = _split_batch(batch)
    return jax.vmap(lambda xi, yi: batch_loss(params, (xi[None], yi[None])))(
        x, y
    )

  return per_example


def make_eval_fn(
    model: nn.Module, loss: str
) -> Callable[[PyTree, Any], dict[str, jax.Array]]:
  """Held-out metrics ``eval_fn(params, batch) -> {test_loss, test_accuracy}``.

  ``test_loss`` is the training loss ``loss`` on the held-out batch;
  ``test_accuracy`` the fraction of arg-max predictions equal to the label
  (the arg-max of a one-hot target, or the integer target itself).

  Args:
    model: a flax module (see ``models``).
    loss: a name in ``LOSSES``.

  Returns:
    ``eval_fn(params, batch)`` for ``se.train(..., eval_fn=...)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_eos.experiments import models
    >>> model = models.MLP((4,), num_outputs=2)
    >>> x, y = jnp.ones((3, 5)), jax.nn.one_hot(jnp.array([0, 1, 1]), 2)
    >>> params = models.init_params(model, jax.random.key(0), x)
    >>> out = make_eval_fn(model, "mse")(params, (x, y))
    >>> logits = model.apply({"params": params}, x)  # equal rows: one class
    >>> want = float(jnp.mean(jnp.argmax(logits, -1) == jnp.array([0, 1, 1])))
    >>> sorted(out), float(out["test_accuracy"]) == want
    (['test_accuracy', 'test_loss'], True)

  References:
    Long & Bartlett 2023 (generalization of SAM at its edge).
  """
  loss_fn = LOSSES[loss]

  def eval_fn(params: PyTree, batch: Any) -> dict[str, jax.Array]:
    x, y = _split_batch(batch)
    logits = model.apply({"params": params}, x)
    labels = y if y.ndim == logits.ndim - 1 else jnp.argmax(y, axis=-1)
    return {
        "test_loss": loss_fn(logits, y),
        "test_accuracy": accuracy(logits, labels),
    }

  return eval_fn


def _labels_for(loss: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
  """One-hot targets as integer labels for ``cross_entropy``; else as is."""
  if loss == "cross_entropy" and targets.ndim == logits.ndim:
    return jnp.argmax(targets, axis=-1)
  return targets


def make_stateful_loss_fn(
    model: nn.Module, loss: str
) -> Callable[[PyTree, Any, PyTree], tuple[jax.Array, PyTree]]:
  """``loss_fn(params, batch, batch_stats) -> (loss, new_batch_stats)``.

  For a model with BatchNorm (``models.ResNet``), in training mode: the
  batch is normalized with its own statistics and the running averages
  are updated, as ``se.train(..., model_state=batch_stats)`` expects.
  One-hot targets are read by their arg-max for ``"cross_entropy"``.

  Args:
    model: a flax module whose ``apply`` takes ``train`` and holds
      ``batch_stats``.
    loss: a name in ``LOSSES``.

  Returns:
    The pure, jit-able ``loss_fn``; ``batch`` as in ``make_loss_fn``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sam_eos.experiments import models
    >>> model = models.ResNet(widths=(2,))
    >>> x, y = jnp.ones((3, 4, 4, 3)), jnp.array([0, 1, 2])
    >>> params, stats = models.init_variables(model, jax.random.key(0), x)
    >>> value, new = make_stateful_loss_fn(model, "cross_entropy")(
    ...     params, (x, y), stats)
    >>> value.shape, jax.tree.structure(new) == jax.tree.structure(stats)
    ((), True)
  """
  loss_fn = LOSSES[loss]

  def stateful(
      params: PyTree, batch: Any, batch_stats: PyTree
  ) -> tuple[jax.Array, PyTree]:
    x, y = _split_batch(batch)
    logits, new = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return loss_fn(logits, _labels_for(loss, logits, y)), new["batch_stats"]

  return stateful


def make_stateful_eval_fn(
    model: nn.Module, loss: str
) -> Callable[[PyTree, Any, PyTree], dict[str, jax.Array]]:
  """``eval_fn(params, batch, batch_stats) -> {test_loss, test_accuracy}``.

  As ``make_eval_fn``, in inference mode: BatchNorm uses the running
  averages ``batch_stats`` (``se.train`` passes the carried model state).

  Args:
    model: a flax module whose ``apply`` takes ``train``.
    loss: a name in ``LOSSES``.

  Returns:
    The ``eval_fn`` for ``se.train(..., eval_fn=..., model_state=...)``.
  """
  loss_fn = LOSSES[loss]

  def eval_fn(
      params: PyTree, batch: Any, batch_stats: PyTree
  ) -> dict[str, jax.Array]:
    x, y = _split_batch(batch)
    logits = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=False
    )
    labels = y if y.ndim == logits.ndim - 1 else jnp.argmax(y, axis=-1)
    return {
        "test_loss": loss_fn(logits, _labels_for(loss, logits, y)),
        "test_accuracy": accuracy(logits, labels),
    }

  return eval_fn
