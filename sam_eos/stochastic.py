"""Minibatch sharpness: the edge of stochastic stability.

For minibatch GD the relevant curvature is not the full-batch sharpness but
the *batch sharpness* (Andreyev & Beneventano 2024)

  ``BS(w) = E_B[g_B^T H_B g_B] / E_B[||g_B||^2]``,

the average curvature of the minibatch losses along their own gradients,
which SGD drives to ``2 / eta``. ``batch_sharpness`` estimates it by Monte
Carlo over random batches, with a delta-method confidence interval and an
optional relative-error stopping rule. ``batch_sam_edge`` is the SAM
analogue to compare it with: ``E_B[sam_edge(eta, rho, ||g_B||)]``, the
SAM-edge at each batch's own gradient norm.

Sampling: batch ``i`` (``i = 0, 1, ...``) holds ``batch_size`` distinct
examples drawn uniformly without replacement from the ``N`` along the leading
axis of ``data``, by ``jax.random.choice(jax.random.fold_in(key, i), N,
(batch_size,), replace=False)``; batches are independent of each other (the
same example can appear in several batches). So ``B`` is uniform over the
subsets of size ``batch_size``, and the same ``key`` gives the same batches
in both functions.

References:
  Andreyev & Beneventano, "Edge of Stochastic Stability: Revisiting the Edge
  of Stability for SGD", arXiv:2412.20553, 2024.
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (the SAM-edge).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import _checks
from sam_eos._types import ArrayLike, LossFn, PyTree
from sam_eos.edges import sam_edge
from sam_eos.hessian import gradient_fn, linearize_gradient
from sam_eos.lanczos import working_dtype
from sam_eos.sam import global_norm


class BatchEstimate(NamedTuple):
  """A Monte Carlo estimate over random minibatches.

  Attributes:
    value: the estimate (scalar).
    lower: lower end of the confidence interval (``-inf`` with one batch).
    upper: upper end of the confidence interval (``inf`` with one batch).
    num_batches: int32 number of batches used.
  """

  value: jax.Array
  lower: jax.Array
  upper: jax.Array
  num_batches: jax.Array


def _check(data: Any, batch_size: int, num_batches: int) -> int:
  """Validates the sampling arguments; returns ``N``."""
  leaves = jax.tree.leaves(data)
  if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
    raise ValueError("`data` must be a pytree of arrays with an example axis.")
  sizes = {jnp.shape(x)[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(
        f"every leaf of `data` must share its leading axis, got {sizes}."
    )
  size = sizes.pop()
  batch_size = _checks.check_int("batch_size", batch_size, 1)
  if batch_size > size:
    raise ValueError(
        f"`batch_size` ({batch_size}) must be <= the number of examples "
        f"({size})."
    )
  _checks.check_int("num_batches", num_batches, 1)
  return size


def _monte_carlo_ratio(
    per_batch: Callable[[Any], tuple[jax.Array, jax.Array]],
    data: Any,
    dtype: jnp.dtype,
    *,
    batch_size: int,
    num_batches: int,
    key: jax.Array,
    rel_tol: ArrayLike | None,
    min_batches: int,
    confidence: float,
) -> BatchEstimate:
  """``mean(a) / mean(b)`` over batches, with a delta-method interval."""
  size = _check(data, batch_size, num_batches)
  min_batches = _checks.check_int("min_batches", min_batches, 2)
  if not 0 < confidence < 1:
    raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}.")
  if rel_tol is not None:
    _checks.check_positive("rel_tol", rel_tol)
  z = jax.scipy.stats.norm.ppf(0.5 + 0.5 * confidence).astype(dtype)

  def estimate(count: jax.Array, sums: jax.Array) -> tuple[jax.Array, ...]:
    k = count.astype(dtype)
    mean_a, mean_b = sums[0] / k, sums[1] / k
    ratio = mean_a / mean_b
    km1 = jnp.maximum(k - 1, 1)
    var_a = (sums[2] - k * mean_a**2) / km1
    var_b = (sums[3] - k * mean_b**2) / km1
    cov = (sums[4] - k * mean_a * mean_b) / km1
    var = (var_a - 2 * ratio * cov + ratio**2 * var_b) / (k * mean_b**2)
    half = jnp.where(count > 1, z * jnp.sqrt(jnp.maximum(var, 0)), jnp.inf)
    return ratio, half

  def body(state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    count, sums, _ = state
    idx = jax.random.choice(
        jax.random.fold_in(key, count), size, (batch_size,), replace=False
    )
    a, b = per_batch(jax.tree.map(lambda x: x[idx], data))
    a, b = a.astype(dtype), b.astype(dtype)
    sums = sums + jnp.stack([a, b, a * a, b * b, a * b])
    count = count + 1
    ratio, half = estimate(count, sums)
    done = count >= num_batches
    if rel_tol is not None:
      done |= (count >= min_batches) & (half <= rel_tol * jnp.abs(ratio))
    return count, sums, done

  state = (jnp.zeros((), jnp.int32), jnp.zeros(5, dtype), jnp.array(False))
  count, sums, _ = jax.lax.while_loop(lambda s: ~s[2], body, state)
  ratio, half = estimate(count, sums)
  return BatchEstimate(ratio, ratio - half, ratio + half, count)


def _gradient_curvature(
    loss_fn: LossFn, params: PyTree, batch: Any, has_aux: bool
) -> tuple[jax.Array, jax.Array]:
  """``(g^T H g, ||g||^2)`` on one batch, in float32 or wider."""
  _, grads, matvec = linearize_gradient(loss_fn, params, batch, has_aux=has_aux)
  flat_g = ravel_pytree(grads)[0]
  dtype = working_dtype(flat_g.dtype)
  flat_hg = ravel_pytree(matvec(grads))[0].astype(dtype)
  flat_g = flat_g.astype(dtype)
  return jnp.dot(flat_g, flat_hg), jnp.dot(flat_g, flat_g)


def batch_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    data: Any,
    *,
    batch_size: int,
    num_batches: int,
    key: jax.Array,
    rel_tol: ArrayLike | None = None,
    min_batches: int = 10,
    confidence: float = 0.95,
    has_aux: bool = False,
) -> BatchEstimate:
  """Batch sharpness ``E_B[g_B^T H_B g_B] / E_B[||g_B||^2]`` by Monte Carlo.

  Draws batches as described in the module docstring (uniform subsets of
  ``batch_size`` examples, independent across batches), and on each computes
  ``a_B = g_B^T H_B g_B`` (one gradient and one Hessian-vector product, from
  one linearization) and ``b_B = ||g_B||^2``. The estimate is the ratio of
  means ``mean(a) / mean(b)`` (consistent, bias ``O(1/K)`` for ``K``
  batches). Its confidence interval is the delta method:
  ``R +- z sqrt((s_aa - 2 R s_ab + R^2 s_bb) / (K mean(b)^2))`` with sample
  (co)variances ``s`` and ``z`` the normal quantile of ``confidence``.

  Stopping rule: with ``rel_tol``, the loop (one ``lax.while_loop``) stops
  after the first batch ``K >= min_batches`` at which the half-width is at
  most ``rel_tol * |R|``, or at ``num_batches``; without it, it uses exactly
  ``num_batches``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``), with ``batch`` a pytree like ``data`` of ``batch_size``
      examples.
    params: parameter pytree ``w``.
    data: pytree of arrays sharing a leading axis of ``N`` examples.
    batch_size: examples per batch, ``1 <= batch_size <= N``.
    num_batches: maximum number of batches ``K >= 1``.
    key: PRNG key of the batches.
    rel_tol: optional relative half-width at which to stop early.
    min_batches: batches needed before the stopping rule applies (``>= 2``).
    confidence: level of the interval, in ``(0, 1)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``BatchEstimate(value, lower, upper, num_batches)``.

  Raises:
    ValueError: for leaves of ``data`` without a shared leading axis, a
      ``batch_size`` outside ``[1, N]``, ``num_batches < 1``,
      ``min_batches < 2``, ``confidence`` outside ``(0, 1)`` or a
      non-positive concrete ``rel_tol``.

  Examples:
    With one full batch it is ``g^T H g / ||g||^2``; on ``0.5 sum_i h_i w_i^2``
    at ``w = (1, 1)`` with ``h = (2, 1)``: ``(8 + 1) / (4 + 1) = 1.8``:

    >>> import jax, jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, h: 0.5 * jnp.sum(jnp.mean(h, 0) * w**2)
    >>> out = se.batch_sharpness(loss, jnp.ones(2), jnp.array([[2.0, 1.0]]),
    ...     batch_size=1, num_batches=1, key=jax.random.key(0))
    >>> round(float(out.value), 6), int(out.num_batches)
    (1.8, 1)

  References:
    Andreyev & Beneventano, "Edge of Stochastic Stability", 2024; Casella &
    Berger, "Statistical Inference", 2nd ed., Sec. 5.5.4 (delta method).
  """
  dtype = working_dtype(ravel_pytree(params)[0].dtype)

  def per_batch(batch: Any) -> tuple[jax.Array, jax.Array]:
    return _gradient_curvature(loss_fn, params, batch, has_aux)

  return _monte_carlo_ratio(
      per_batch,
      data,
      dtype,
      batch_size=batch_size,
      num_batches=num_batches,
      key=key,
      rel_tol=rel_tol,
      min_batches=min_batches,
      confidence=confidence,
  )


def batch_sam_edge(
    loss_fn: LossFn,
    params: PyTree,
    data: Any,
    *,
    learning_rate: ArrayLike,
    rho: ArrayLike,
    batch_size: int,
    num_batches: int,
    key: jax.Array,
    momentum: ArrayLike = 0.0,
    rel_tol: ArrayLike | None = None,
    min_batches: int = 10,
    confidence: float = 0.95,
    has_aux: bool = False,
) -> BatchEstimate:
  """``E_B[sam_edge(eta, rho, ||g_B||)]``, the SAM-edge of minibatch SAM.

  Minibatch SAM perturbs along the batch's own gradient, so its edge on each
  step is the SAM-edge at ``||g_B||``; this is its mean over random batches,
  drawn as in ``batch_sharpness`` (the same ``key`` gives the same batches).
  The interval is the usual ``mean +- z sd / sqrt(K)`` and the stopping
  rule is the one of ``batch_sharpness``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)``).
    params: parameter pytree ``w``.
    data: pytree of arrays sharing a leading axis of ``N`` examples.
    learning_rate: step size ``eta > 0``.
    rho: SAM radius ``rho >= 0``.
    batch_size: examples per batch.
    num_batches: maximum number of batches.
    key: PRNG key of the batches.
    momentum: heavy-ball coefficient, as in ``se.sam_edge``.
    rel_tol: optional relative half-width at which to stop early.
    min_batches: batches needed before the stopping rule applies.
    confidence: level of the interval.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``BatchEstimate(value, lower, upper, num_batches)``.

  Raises:
    ValueError: as ``batch_sharpness``, and as ``se.sam_edge``.

  Examples:
    One full batch: the SAM-edge at the full gradient norm ``||(2, 1)||``:

    >>> import jax, jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, h: 0.5 * jnp.sum(jnp.mean(h, 0) * w**2)
    >>> out = se.batch_sam_edge(loss, jnp.ones(2), jnp.array([[2.0, 1.0]]),
    ...     learning_rate=0.1, rho=0.05, batch_size=1, num_batches=1,
    ...     key=jax.random.key(0))
    >>> bool(jnp.isclose(out.value, se.sam_edge(0.1, 0.05, jnp.sqrt(5.0))))
    True

  References:
    Long & Bartlett 2023 (the SAM-edge); Andreyev & Beneventano 2024.
  """
  dtype = working_dtype(ravel_pytree(params)[0].dtype)
  _checks.check_positive("learning_rate", learning_rate)
  _checks.check_nonnegative("rho", rho)

  def per_batch(batch: Any) -> tuple[jax.Array, jax.Array]:
    grads = gradient_fn(loss_fn, batch, has_aux=has_aux)(params)
    edge = sam_edge(learning_rate, rho, global_norm(grads), momentum=momentum)
    return edge, jnp.ones((), dtype)

  return _monte_carlo_ratio(
      per_batch,
      data,
      dtype,
      batch_size=batch_size,
      num_batches=num_batches,
      key=key,
      rel_tol=rel_tol,
      min_batches=min_batches,
      confidence=confidence,
  )
