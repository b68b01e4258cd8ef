"""Sharpness-aware minimization as pure functions on pytrees.

SAM (Foret et al. 2021) in the form analysed by Long & Bartlett (2023):
``w <- w - eta * grad L(w + rho * g / (||g|| + eps))`` with ``g = grad L(w)``,
both gradients on the same batch. Unnormalized SAM (USAM) drops the division:
``w <- w - eta * grad L(w + rho * g)``.

References:
  Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for
  Efficiently Improving Generalization", ICLR 2021, Eq. (2)-(3).
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Eq. (1).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_eos import _checks

PyTree = Any


class SAMGrad(NamedTuple):
  """The two gradients of one SAM step.

  Attributes:
    loss: scalar loss ``L(w)`` at the unperturbed iterate.
    grads: ``g = grad L(w)``, a pytree like ``params``.
    grad_norm: scalar ``||g||`` (global Euclidean norm over all leaves, see
      ``global_norm``), in float32 or wider.
    sam_grads: ``grad L(w + perturbation)``, a pytree like ``params``.
  """
  loss: jax.Array
  grads: PyTree
  grad_norm: jax.Array
  sam_grads: PyTree


def norm_dtype(tree: PyTree) -> jnp.dtype:
  """The dtype ``global_norm`` returns: the leaves' float dtype, >= float32.

  Args:
    tree: a pytree of arrays.

  Returns:
    ``promote_types(common floating dtype of the leaves, float32)``: float32
    for bfloat16, float16 or float32 leaves, float64 for float64 leaves (and
    float32 for a tree without floating leaves).
  """
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  dtype = jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)


def global_norm(tree: PyTree) -> jax.Array:
  """Euclidean norm over all leaves, overflow-safe and in float32 or wider.

  ``optax.tree.norm`` squares in the leaves' own dtype: float16 squares
  overflow once an entry exceeds 256 (the norm becomes ``inf`` and SAM's
  normalized perturbation silently vanishes) and bfloat16 sums lose all but
  three digits. Here every leaf is cast to ``norm_dtype(tree)`` and divided
  by the power of two nearest below the largest magnitude (an exact
  scaling), so no square overflows or underflows to zero:

    ``||x|| = s * sqrt(sum_i (x_i / s)^2)``,  ``s = 2^floor(log2 max_i |x_i|)``.

  A zero tree gives 0 (not NaN); a NaN or ``inf`` entry gives NaN or
  ``inf``.

  Args:
    tree: a pytree of arrays (any shapes).

  Returns:
    A scalar of dtype ``norm_dtype(tree)``.

  Examples:
    In float16 the squares ``9e6`` and ``1.6e7`` would overflow (max 65504):

    >>> import jax.numpy as jnp
    >>> from sam_eos.sam import global_norm
    >>> g = {"w": jnp.array([3e3, 4e3], jnp.float16)}
    >>> float(global_norm(g)), global_norm(g).dtype
    (5000.0, dtype('float32'))
  """
  dtype = norm_dtype(tree)
  leaves = [jnp.asarray(x, dtype) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros([], dtype)
  largest = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in leaves]))
  _, exponent = jnp.frexp(largest)
  scale = jnp.where(jnp.isfinite(largest) & (largest > 0),
                    jnp.ldexp(jnp.ones([], dtype), exponent - 1), 1)
  total = sum(jnp.sum(jnp.square(x / scale)) for x in leaves)
  return (scale * jnp.sqrt(total)).astype(dtype)


def sam_perturbation(grads: PyTree, rho: float | jax.Array, *,
                     normalize: bool = True, eps: float = 1e-12) -> PyTree:
  """The SAM ascent step ``rho * g / (||g|| + eps)`` (or ``rho * g``).

  A zero gradient gives a zero perturbation, never NaN, even with ``eps = 0``.
  The norm ``||g||`` is computed by ``global_norm`` (float32 or wider, no
  overflow for large float16 gradients); the perturbation has the dtypes of
  ``grads``.

  Args:
    grads: gradient pytree ``g``.
    rho: radius ``rho >= 0`` (scalar, may be traced).
    normalize: divide by the global norm (SAM) or not (USAM).
    eps: added to ``||g||`` in the normalization, ``>= 0``.

  Returns:
    A pytree like ``grads``.

  Raises:
    ValueError: for a concrete ``rho < 0`` or ``eps < 0``.

  Examples:
    >>> import jax.numpy as jnp, sam_eos as se
    >>> se.sam_perturbation({"w": jnp.array([3.0, 4.0])}, 0.5)["w"]
    Array([0.3, 0.4], dtype=float32)

  References:
    Foret et al. 2021, Eq. (2); Long & Bartlett 2023, Eq. (1).
  """
  _checks.check_nonnegative("rho", rho)
  _checks.check_nonnegative("eps", eps)
  if not normalize:
    return optax.tree.scale(rho, grads)
  norm = global_norm(grads)
  denom = norm + eps
  scale = jnp.where(denom > 0, rho / jnp.where(denom > 0, denom, 1.0), 0.0)
  return jax.tree.map(lambda g: (scale * g).astype(g.dtype), grads)


def sam_gradient(loss_fn: Callable[..., Any], params: PyTree, batch: Any, *,
                 rho: float | jax.Array, normalize: bool = True,
                 eps: float = 1e-12, has_aux: bool = False
                 ) -> SAMGrad | tuple[SAMGrad, Any]:
  """Loss, gradient and SAM gradient of ``loss_fn`` at ``params``.

  Computes ``g = grad L(w)`` and ``grad L(w + e)`` with
  ``e = sam_perturbation(g, rho)``, both on ``batch``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: the batch passed to ``loss_fn`` for both gradients.
    rho: radius ``rho >= 0`` (may be traced, e.g. under ``vmap``).
    normalize: SAM (True) or unnormalized SAM (False).
    eps: added to ``||g||`` in the normalization.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``SAMGrad(loss, grads, grad_norm, sam_grads)``; with ``has_aux`` the pair
    ``(SAMGrad, aux)``, ``aux`` taken at the unperturbed ``params``.

  Raises:
    ValueError: for a concrete ``rho < 0`` or ``eps < 0``.

  Examples:
    On ``L(w) = 0.5 * w^T diag(4, 1) w`` the SAM gradient at ``w`` is
    ``H (w + rho * H w / ||H w||)``:

    >>> import jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, h: 0.5 * jnp.sum(h * w**2)
    >>> out = se.sam_gradient(loss, jnp.array([1.0, 0.0]), jnp.array([4.0, 1.0]),
    ...                       rho=0.5)
    >>> float(out.grad_norm), out.sam_grads.tolist()
    (4.0, [6.0, 0.0])

  References:
    Foret et al. 2021, Eq. (3); Long & Bartlett 2023, Eq. (1).
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
  value, grads = value_and_grad(params, batch)
  loss, aux = value if has_aux else (value, None)
  perturbation = sam_perturbation(grads, rho, normalize=normalize, eps=eps)
  perturbed = optax.apply_updates(params, perturbation)
  sam_value_grads = jax.grad(loss_fn, has_aux=has_aux)(perturbed, batch)
  sam_grads = sam_value_grads[0] if has_aux else sam_value_grads
  out = SAMGrad(loss=loss, grads=grads, grad_norm=global_norm(grads),
                sam_grads=sam_grads)
  return (out, aux) if has_aux else out
