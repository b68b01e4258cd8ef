"""flax NNX models as ``loss_fn(params, batch, model_state)``.

sam_eos works on pure functions of a parameter pytree. An NNX model is a
stateful Python object; ``nnx.split`` separates it into a static graph
definition, its parameters (``nnx.Param``) and everything else (BatchNorm
batch statistics, RNG counters, ...), and ``nnx.merge`` rebuilds it. The
recipe, done by ``nnx_loss`` in one call:

1. ``model.train()`` (BatchNorm normalizes with the batch's statistics and
   updates its running averages), then ``graphdef, params, model_state =
   nnx.split(model, nnx.Param, ...)``, the states turned into plain arrays
   (``nnx.as_pure``);
2. ``loss_fn(params, batch, model_state)`` merges a fresh model, evaluates
   ``loss(model, batch)`` and splits the updated state back: it returns
   ``(loss, new_model_state)``, the form ``se.train(..., model_state=...)``
   and ``se.SharpnessTracker(..., has_aux=True)`` take;
3. after training, ``nnx_merge(loss_fn, params, model_state)`` (or
   ``nnx.merge(loss_fn.graphdef, params, model_state)``) gives the trained
   model back; call ``.eval()`` on it for inference with running averages.

What the sharpness of a BatchNorm network means here: the Hessian of ``w ->
loss_fn(w, batch, model_state)[0]`` in training mode, with the batch's own
mean and variance (functions of ``w``, differentiated through) and the
running averages held fixed (they do not enter the training-mode loss). It is
the curvature of the loss the SAM/GD step actually descends on that batch;
it is not the curvature of the inference-mode network.

flax is an optional dependency: it is imported when these functions are
called, so ``import sam_eos`` works without it.

References:
  flax NNX documentation, "The Flax NNX functional API" (``nnx.split``,
  ``nnx.merge``, ``nnx.as_pure``).
  Ioffe & Szegedy, "Batch Normalization", ICML 2015.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from sam_eos._types import PyTree


def _flax_nnx():
  """``flax.nnx``, or an ImportError saying how to get it."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "sam_eos.nnx_loss needs flax with NNX (flax >= 0.10): "
        "`pip install -U flax`."
    ) from err
  return nnx


@dataclasses.dataclass(frozen=True)
class NNXLoss:
  """``loss_fn(params, batch, model_state) -> (loss, new_model_state)``.

  Made by ``nnx_loss``; a hashable callable, so it can be a static argument
  of ``jax.jit`` (``se.train`` compiles it as one).

  Attributes:
    graphdef: the model's ``nnx.GraphDef`` (its static structure).
    loss: ``loss(model, batch) -> scalar``.
  """

  graphdef: Any
  loss: Callable[[Any, Any], jax.Array]

  def __call__(
      self, params: PyTree, batch: Any, model_state: PyTree
  ) -> tuple[jax.Array, PyTree]:
    """Merges a model, evaluates ``loss(model, batch)``, splits its state.

    Args:
      params: the ``nnx.Param`` state (plain arrays, from ``nnx_loss``).
      batch: passed unchanged to ``loss``.
      model_state: every other variable (plain arrays).

    Returns:
      ``(loss, new_model_state)``, the state after the call (e.g. BatchNorm
      running averages updated in training mode), with the structure of
      ``model_state``.
    """
    nnx = _flax_nnx()
    model = nnx.merge(self.graphdef, params, model_state)
    value = self.loss(model, batch)
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return value, nnx.as_pure(new_state)

  def merge(self, params: PyTree, model_state: PyTree) -> Any:
    """The NNX model with ``params`` and ``model_state`` (``nnx_merge``)."""
    return nnx_merge(self, params, model_state)


def nnx_loss(
    model: Any, loss: Callable[[Any, Any], jax.Array]
) -> tuple[NNXLoss, PyTree, PyTree]:
  """Splits an NNX model into a pure loss, its parameters and its state.

  Args:
    model: an ``nnx.Module`` in the mode to train in (``model.train()`` for
      BatchNorm batch statistics and running-average updates). It is not
      modified.
    loss: ``loss(model, batch) -> scalar``, calling the model (e.g. the mean
      squared error or cross-entropy of ``model(x)`` against ``y``).

  Returns:
    ``(loss_fn, params, model_state)``: ``loss_fn(params, batch,
    model_state) -> (loss, new_model_state)`` (an ``NNXLoss``), the
    ``nnx.Param`` state and every other variable as ``nnx.State`` pytrees of
    plain arrays. Hold the state fixed for a ``loss_fn(params, batch)``
    with ``lambda p, b: loss_fn(p, b, model_state)[0]``.

  Raises:
    ImportError: if flax NNX is not installed.
    ValueError: if ``model`` is not an ``nnx.Module`` or has no
      ``nnx.Param`` (names ``model``), or ``loss`` is not callable.

  Examples:
    A linear layer and BatchNorm; the loss matches calling the model, and the
    running mean moves towards the batch mean (momentum 0.99):

    >>> import jax.numpy as jnp, sam_eos as se
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]])
    >>> mse = lambda m, x: jnp.mean(m(x) ** 2)
    >>> loss_fn, params, state = se.nnx_loss(model, mse)
    >>> value, new_state = loss_fn(params, x, state)
    >>> bool(jnp.isclose(value, mse(model, x)))
    True
    >>> bool(jnp.allclose(new_state["layers"][1]["mean"],
    ...                   0.01 * jnp.mean(model.layers[0](x), axis=0)))
    True
    >>> trained = se.nnx_merge(loss_fn, params, new_state)
    >>> type(trained).__name__
    'Sequential'

  References:
    flax NNX documentation (``nnx.split``, ``nnx.merge``).
  """
  nnx = _flax_nnx()
  if not isinstance(model, nnx.Module):
    raise ValueError(
        f"`model` must be an nnx.Module, got {type(model).__name__}."
    )
  if not callable(loss):
    raise ValueError(
        "`loss` must be callable as loss(model, batch) -> scalar, got "
        f"{type(loss).__name__}."
    )
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  if not jax.tree.leaves(params):
    raise ValueError("`model` has no nnx.Param to train.")
  return NNXLoss(graphdef=graphdef, loss=loss), params, model_state


def nnx_merge(loss_fn: NNXLoss, params: PyTree, model_state: PyTree) -> Any:
  """The NNX model rebuilt from ``params`` and ``model_state``.

  ``nnx.merge(loss_fn.graphdef, params, model_state)``: use it on
  ``TrainResult.params`` and ``TrainResult.model_state`` (one configuration
  of a sweep at a time) to get the trained model back.

  Args:
    loss_fn: the ``NNXLoss`` from ``nnx_loss``.
    params: the ``nnx.Param`` state.
    model_state: the other variables.

  Returns:
    A new ``nnx.Module`` (in the mode the original was split in).

  Raises:
    ImportError: if flax NNX is not installed.
    ValueError: if ``loss_fn`` is not an ``NNXLoss`` (names ``loss_fn``).

  Examples:
    See ``nnx_loss``.
  """
  if not isinstance(loss_fn, NNXLoss):
    raise ValueError(
        "`loss_fn` must be the NNXLoss from se.nnx_loss, got "
        f"{type(loss_fn).__name__}."
    )
  nnx = _flax_nnx()
  return nnx.merge(loss_fn.graphdef, params, model_state)
