"""Preconditioned sharpness: the curvature an adaptive optimizer sees.

An optimizer with a diagonal preconditioner ``P`` (Adam, RMSProp) steps
``w <- w - eta P^{-1} m``. Frozen at ``P``, on a quadratic it is stable iff
the eigenvalues of ``P^{-1} H`` stay below its edge (``se.adam_edge``).
``P^{-1} H`` is similar to the symmetric ``P^{-1/2} H P^{-1/2}`` (same
eigenvalues), which Lanczos can handle:

  ``S_P(w) = lambda_max(P^{-1/2} H(w) P^{-1/2})``.

For Adam, ``P = sqrt(v_hat) + eps`` with ``v_hat = nu / (1 - b2^t)`` the
bias-corrected second moment (``adam_preconditioner``). Coordinates whose
``sqrt(v_hat)`` sits far below ``eps`` (parameters that have received almost
no gradient, e.g. dead units) have ``P ~ eps``, so their Hessian entries are
multiplied by ``1 / eps ~ 1e8``: a tiny curvature there can dominate
``S_P`` although a step would at once raise ``v_hat`` and stabilize it.
``eps_floor_fraction`` counts such coordinates.

References:
  Cohen et al., "Adaptive Gradient Methods at the Edge of Stability",
  arXiv:2207.14484, 2022 (preconditioned sharpness, Sec. 3).
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sam_eos import _checks
from sam_eos._types import ArrayLike, LossFn, PyTree
from sam_eos.hessian import flat_matvec, hessian_matvec
from sam_eos.lanczos import lanczos, working_dtype


class PreconditionedEigenpairs(NamedTuple):
  """Top-``k`` eigenpairs of ``P^{-1/2} H P^{-1/2}``.

  Attributes:
    values: ``(k,)`` Ritz values, descending, float32 or wider.
    vectors: pytree like ``params`` whose leaves carry a leading axis ``k``:
      unit (flattened) eigenvectors ``y_i`` of ``P^{-1/2} H P^{-1/2}``;
      ``P^{-1/2} y_i`` is an eigenvector of ``P^{-1} H``.
    residuals: ``(k,)`` Lanczos residual norms, as in ``se.lanczos``.
  """

  values: jax.Array
  vectors: PyTree
  residuals: jax.Array


def _check_preconditioner(params: PyTree, preconditioner: PyTree) -> None:
  """Same structure as ``params`` and (when concrete) every entry > 0."""
  _checks.check_same_structure(
      "params", params, "preconditioner", preconditioner
  )
  for leaf in jax.tree.leaves(preconditioner):
    arr = _checks.concrete_value(leaf)
    if arr is not None and not np.all(arr > 0):
      raise ValueError(
          "`preconditioner` must be positive everywhere (e.g. sqrt(v_hat) + "
          "eps with eps > 0)."
      )


def preconditioned_eigenpairs(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    preconditioner: PyTree,
    *,
    k: int = 1,
    num_iters: int = 20,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    has_aux: bool = False,
) -> PreconditionedEigenpairs:
  """Top-``k`` eigenpairs of ``P^{-1/2} H P^{-1/2}``, ``P`` diagonal.

  Lanczos (``se.lanczos``) on the flat operator
  ``v -> d^{-1/2} * H (d^{-1/2} * v)``, ``d = ravel(preconditioner)``, one
  exact Hessian-vector product per step (linearized once at ``params``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w`` (``n`` entries in all).
    batch: passed unchanged to ``loss_fn``.
    preconditioner: the diagonal of ``P``, a positive pytree like ``params``.
    k: number of eigenpairs, ``1 <= k <= min(num_iters, n)``.
    num_iters: Lanczos steps (capped at ``n``).
    key: PRNG key of the random start; None means ``jax.random.key(0)``.
    init: optional warm start, a pytree like ``params`` (e.g. the previous
      ``vectors`` slice 0).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``PreconditionedEigenpairs(values (k,), vectors, residuals (k,))``,
    values descending.

  Raises:
    ValueError: if ``preconditioner`` (or ``init``) differs from ``params`` in
      structure or shapes, a concrete preconditioner entry is not positive,
      or ``k`` / ``num_iters`` are invalid.

  Examples:
    On ``0.5 w^T diag(4, 9) w`` with ``P = diag(1, 9)``, ``P^{-1} H =
    diag(4, 1)``:

    >>> import jax.numpy as jnp
    >>> from sam_eos.preconditioned import preconditioned_eigenpairs
    >>> loss = lambda w, h: 0.5 * jnp.sum(h * w**2)
    >>> out = preconditioned_eigenpairs(loss, jnp.zeros(2), jnp.array(
    ...     [4.0, 9.0]), jnp.array([1.0, 9.0]), k=2, num_iters=2)
    >>> [round(float(x), 4) for x in out.values]
    [4.0, 1.0]

  References:
    Cohen et al. 2022, Sec. 3; Lanczos 1950.
  """
  k = _checks.check_int("k", k, 1)
  num_iters = _checks.check_int("num_iters", num_iters, 1)
  if k > num_iters:
    raise ValueError(f"`k` ({k}) must be <= `num_iters` ({num_iters}).")
  _check_preconditioner(params, preconditioner)
  if init is not None:
    _checks.check_same_structure("params", params, "init", init)
  flat, unravel = ravel_pytree(params)
  if k > flat.size:
    raise ValueError(f"`k` ({k}) must be <= the number of parameters.")
  dtype = working_dtype(flat.dtype)
  scale = jax.lax.rsqrt(ravel_pytree(preconditioner)[0].astype(dtype))
  hess = flat_matvec(
      hessian_matvec(loss_fn, params, batch, has_aux=has_aux), params
  )

  def matvec(v: jax.Array) -> jax.Array:
    return scale * hess(scale * v).astype(dtype)

  key = jax.random.key(0) if key is None else key
  v0 = jax.random.normal(key, flat.shape, dtype)
  if init is not None:
    warm = ravel_pytree(init)[0].astype(dtype)
    v0 = jnp.where(jnp.any(warm != 0), warm, v0)
  result = lanczos(matvec, v0, min(num_iters, flat.size))
  return PreconditionedEigenpairs(
      values=result.ritz_values[:k],
      vectors=jax.vmap(unravel)(result.ritz_vectors[:k].astype(flat.dtype)),
      residuals=result.residuals[:k],
  )


def preconditioned_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    preconditioner: PyTree,
    *,
    num_iters: int = 20,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    has_aux: bool = False,
) -> jax.Array:
  """``lambda_max(P^{-1/2} H P^{-1/2})``, the sharpness an adaptive step sees.

  Compare it with ``se.adam_edge(eta, b1)`` (``38 / eta`` at ``b1 = 0.9``):
  full-batch Adam's preconditioned sharpness rises to that value and hovers
  there (Cohen et al. 2022). For Adam pass
  ``adam_preconditioner(opt_state)``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    preconditioner: the diagonal of ``P``, a positive pytree like ``params``.
    num_iters: Lanczos steps (capped at the number of parameters).
    key: PRNG key of the random start; None means ``jax.random.key(0)``.
    init: optional warm-start pytree like ``params``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The scalar top eigenvalue (float32 or wider).

  Raises:
    ValueError: as ``preconditioned_eigenpairs``.

  Examples:
    Against the dense ``P^{-1/2} H P^{-1/2}``:

    >>> import jax, jax.numpy as jnp, numpy as np, sam_eos as se
    >>> a = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    >>> loss = lambda w, a: 0.5 * w @ a @ w
    >>> p = jnp.array([0.5, 2.0])
    >>> s = se.preconditioned_sharpness(loss, jnp.zeros(2), a, p, num_iters=2)
    >>> d = np.diag(1 / np.sqrt(p))
    >>> bool(np.isclose(s, np.linalg.eigvalsh(d @ np.asarray(a) @ d)[-1]))
    True

  References:
    Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", 2022.
  """
  return preconditioned_eigenpairs(
      loss_fn,
      params,
      batch,
      preconditioner,
      k=1,
      num_iters=num_iters,
      key=key,
      init=init,
      has_aux=has_aux,
  ).values[0]


def _find_adam_states(opt_state: Any) -> list[optax.ScaleByAdamState]:
  """Every ``ScaleByAdamState`` inside a (nested, chained) optax state."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]


def adam_preconditioner(
    opt_state: Any, *, b2: ArrayLike = 0.999, eps: ArrayLike = 1e-8
) -> PyTree:
  """Adam's diagonal preconditioner ``sqrt(v_hat) + eps`` from an optax state.

  Finds the one ``optax.ScaleByAdamState`` anywhere in ``opt_state`` (a bare
  ``optax.adam`` state, a chain, ``optax.inject_hyperparams``, or a
  ``se.sam`` state wrapping Adam) and returns
  ``sqrt(nu / (1 - b2^t)) + eps`` with ``t`` its step count (0 gives
  ``eps``). Adam's update is ``mu_hat / P``, so ``P`` is what multiplies the
  curvature; the first-moment bias correction ``1 - b1^t`` (which tends to 1)
  is left out, as in Cohen et al.'s large-``t`` analysis. Assumes optax's
  default ``eps_root = 0``.

  Args:
    opt_state: an optax state containing exactly one ``ScaleByAdamState``.
    b2: the optimizer's second-moment decay (optax's default 0.999).
    eps: the optimizer's ``eps`` (optax's default 1e-8).

  Returns:
    A pytree like the parameters, in ``nu``'s dtypes.

  Raises:
    ValueError: if ``opt_state`` holds no ``ScaleByAdamState`` or more than
      one.

  Examples:
    After one step with gradient ``g``, ``v_hat = g^2``, so ``P = |g| + eps``:

    >>> import jax.numpy as jnp, optax, sam_eos as se
    >>> opt = optax.chain(optax.clip(1.0), optax.adam(0.1))
    >>> w = jnp.zeros(2)
    >>> _, state = opt.update(jnp.array([0.5, -0.25]), opt.init(w), w)
    >>> [round(float(x), 4) for x in se.adam_preconditioner(state, eps=0.0)]
    [0.5, 0.25]

  References:
    Kingma & Ba 2015, Algorithm 1; optax ``scale_by_adam``; Cohen et al.
    2022.
  """
  states = _find_adam_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        "`opt_state` must contain exactly one optax.ScaleByAdamState (from "
        f"optax.adam / adamw / scale_by_adam), found {len(states)}."
    )
  _checks.check_nonnegative("eps", eps)
  state = states[0]
  count = jnp.asarray(state.count)

  def precondition(nu: jax.Array) -> jax.Array:
    correction = 1 - jnp.asarray(b2, nu.dtype) ** count.astype(nu.dtype)
    safe = jnp.where(count > 0, correction, 1)
    v_hat = jnp.where(count > 0, nu / safe, 0)
    return (jnp.sqrt(v_hat) + eps).astype(nu.dtype)

  return jax.tree.map(precondition, state.nu)


def eps_floor_fraction(
    preconditioner: PyTree, eps: ArrayLike, *, factor: ArrayLike = 10.0
) -> jax.Array:
  """Fraction of coordinates with ``sqrt(v_hat) < factor * eps``.

  ``preconditioner`` is ``P = sqrt(v_hat) + eps``, so the test is
  ``P - eps < factor * eps``. Such coordinates have ``P`` within a factor
  ``1 + factor`` of ``eps``: ``P^{-1/2} H P^{-1/2}`` multiplies their Hessian
  entries by up to ``1 / eps``, so a small curvature there can inflate the
  preconditioned sharpness far above what Adam's step (which at once raises
  ``v_hat`` once such a coordinate moves) actually meets. A non-zero
  fraction is a reason to read ``preconditioned_sharpness`` with care (or to
  restrict it to the other coordinates).

  Args:
    preconditioner: ``sqrt(v_hat) + eps``, a pytree of arrays.
    eps: the optimizer's ``eps``.
    factor: threshold multiple of ``eps``.

  Returns:
    A scalar in ``[0, 1]``.

  Examples:
    >>> import jax.numpy as jnp, sam_eos as se
    >>> p = {"a": jnp.array([1e-8, 2e-8]), "b": jnp.array([1e-3, 0.1])}
    >>> float(se.eps_floor_fraction(p, 1e-8))
    0.5

  References:
    Cohen et al. 2022 (the eps floor of Adam's preconditioner).
  """
  leaves = jax.tree.leaves(preconditioner)
  below = sum(jnp.sum((p - eps) < factor * eps) for p in leaves)
  total = sum(p.size for p in leaves)
  return below / total
