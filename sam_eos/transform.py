"""SAM as an optax gradient transformation.

One ``update(grads, state, params, grad_fn=...)`` call is one whole SAM step:
it perturbs ``params`` along ``grads``, evaluates ``grad_fn`` there and feeds
that gradient to the base optimizer. Compare ``optax.contrib.sam``, which
splits a SAM step over two ``update`` calls (``sync_period=2``); here the
caller sees ordinary steps, so schedules, step counters and tracking code
work unchanged.

References:
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021.
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Eq. (1).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_eos import _checks
from sam_eos.sam import sam_perturbation

PyTree = Any


class SAMState(NamedTuple):
  """State of :func:`sam`.

  Attributes:
    base_state: state of the wrapped base optimizer.
    grad_norm: scalar ``||g||`` of the gradient passed to the last update.
  """
  base_state: optax.OptState
  grad_norm: jax.Array


def _float_dtype(tree: PyTree) -> jnp.dtype:
  """The common floating dtype of a pytree's leaves (float32 if none)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)


def sam(base_optimizer: optax.GradientTransformation, rho: float | jax.Array, *,
        normalize: bool = True, eps: float = 1e-12
        ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``base_optimizer`` so each update is one full SAM step.

  ``update(grads, state, params, *, grad_fn, **extra)`` computes
  ``e = rho * grads / (||grads|| + eps)`` (or ``rho * grads``), calls
  ``grad_fn(params + e)`` and returns
  ``base_optimizer.update(grad_fn(params + e), base_state, params, **extra)``.
  With ``optax.sgd(eta)`` this is
  ``w <- w - eta * grad L(w + rho g / (||g|| + eps))``. At ``rho = 0`` the
  base optimizer's update is reproduced bit for bit (the incoming ``grads``
  are used, selected with ``jnp.where`` so ``rho`` may be traced).

  Args:
    base_optimizer: any optax transformation (sgd, sgd with momentum, adam...).
    rho: radius ``rho >= 0``; a scalar, possibly a traced array.
    normalize: SAM (True) or unnormalized SAM (False).
    eps: added to ``||g||`` in the normalization.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword ``grad_fn: params -> grads`` (gradient on the same batch as
    ``grads``) and ``params``.

  Raises:
    ValueError: for a concrete ``rho < 0`` or ``eps < 0``; at update time if
      ``grad_fn`` or ``params`` is missing.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_eos as se
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w**2)
    >>> opt = se.sam(optax.sgd(0.1), rho=0.5)
    >>> w = jnp.array([1.0, 0.0])
    >>> state = opt.init(w)
    >>> updates, state = opt.update(jax.grad(loss)(w), state, w,
    ...                             grad_fn=jax.grad(loss))
    >>> optax.apply_updates(w, updates).tolist(), float(state.grad_norm)
    ([0.3999999761581421, 0.0], 4.0)

  References:
    Foret et al. 2021, Algorithm 1; Long & Bartlett 2023, Eq. (1); optax's
    ``contrib.sam`` for the two-call formulation.
  """
  _checks.check_nonnegative("rho", rho)
  _checks.check_nonnegative("eps", eps)

  def init_fn(params: PyTree) -> SAMState:
    return SAMState(base_state=base_optimizer.init(params),
                    grad_norm=jnp.zeros([], _float_dtype(params)))

  def update_fn(updates: PyTree, state: SAMState, params: PyTree | None = None,
                *, grad_fn: Callable[[PyTree], PyTree] | None = None,
                **extra_args: Any) -> tuple[PyTree, SAMState]:
    if grad_fn is None:
      raise ValueError(
          "sam(...).update needs `grad_fn`, a function params -> gradient on "
          "the same batch, e.g. grad_fn=lambda p: jax.grad(loss_fn)(p, batch).")
    if params is None:
      raise ValueError("sam(...).update needs `params` (the current iterate).")
    perturbation = sam_perturbation(updates, rho, normalize=normalize, eps=eps)
    sam_grads = grad_fn(optax.apply_updates(params, perturbation))
    _checks.check_same_structure("grads", updates, "grad_fn(params)", sam_grads)
    sam_grads = jax.tree.map(lambda g, s: jnp.where(rho == 0, g, s),
                             updates, sam_grads)
    new_updates, base_state = base_optimizer.update(
        sam_grads, state.base_state, params, **extra_args)
    grad_norm = optax.tree.norm(updates).astype(state.grad_norm.dtype)
    return new_updates, SAMState(base_state=base_state, grad_norm=grad_norm)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
