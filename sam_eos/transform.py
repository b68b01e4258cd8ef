"""SAM as an optax gradient transformation.

One ``update(grads, state, params, grad_fn=...)`` call is one whole SAM step:
it perturbs ``params`` along ``grads``, evaluates ``grad_fn`` there and feeds
that gradient to the base optimizer (as a correction of the incoming updates,
so transformations chained before it are kept). Compare ``optax.contrib.sam``, which
splits a SAM step over two ``update`` calls (``sync_period=2``); here the
caller sees ordinary steps, so schedules, step counters and tracking code
work unchanged.

References:
  Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021.
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Eq. (1).
  Kwon et al., "ASAM", ICML 2021; Luo et al., "Explicit Eigenvalue
  Regularization Improves Sharpness-Aware Minimization", 2025 (Eigen-SAM).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_eos import _checks
from sam_eos._types import ArrayLike, PyTree
from sam_eos.sam import global_norm, norm_dtype, sam_perturbation

Rho = ArrayLike | Callable[[jax.Array], jax.Array]


class SAMState(NamedTuple):
  """State of :func:`sam`.

  Attributes:
    base_state: state of the wrapped base optimizer.
    grad_norm: scalar ``||grad_fn(params)||`` of the last update, the raw
      gradient norm at the iterate (what ``se.sam_edge`` takes), in float32
      or wider.
    count: int32 number of updates so far (the step fed to a ``rho``
      schedule).
  """

  base_state: optax.OptState
  grad_norm: jax.Array
  count: jax.Array


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: Rho,
    *,
    normalize: bool = True,
    eps: float = 1e-12,
    adaptive: bool = False,
    adaptive_eta: ArrayLike = 0.01,
    eigen_weight: ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``base_optimizer`` so each update is one full SAM step.

  ``update(u, state, params, *, grad_fn, **extra)`` receives the incoming
  updates ``u`` (the gradient ``g = grad_fn(params)`` when ``sam`` comes
  first, or ``g`` transformed by whatever is chained before it) and computes

    ``e = rho * u / (||u|| + eps)``  (or ``rho * u`` if not ``normalize``),
    ``u_SAM = u + grad_fn(params + e) - grad_fn(params)``,

  then returns ``base_optimizer.update(u_SAM, base_state, params, **extra)``.
  That is: the ascent direction is the incoming (possibly transformed)
  update, and in the descent direction the raw gradient at ``params`` is
  replaced by the raw gradient at ``params + e`` while every earlier
  transformation is kept. Alone, ``u = g`` and ``u_SAM = grad_fn(params +
  e)`` exactly (entries where ``u`` equals ``grad_fn(params)`` take the
  perturbed gradient as is), so with ``optax.sgd(eta)`` this is
  ``w <- w - eta * grad L(w + rho g / (||g|| + eps))``, equal to
  ``se.sam_gradient``. Chained after ``optax.add_decayed_weights(wd)`` the
  base sees ``grad L(w + e) + wd * w`` with ``e`` along ``g + wd * w``;
  after ``optax.clip_by_global_norm(c)`` it sees the clipped ``g`` plus the
  unclipped SAM correction ``grad L(w + e) - g``. At ``rho = 0`` the base
  receives ``u`` itself, so the base optimizer (and any chain before ``sam``)
  is reproduced bit for bit (selected with ``jnp.where``, so ``rho`` may be
  traced).

  Weight decay, inside or outside the perturbation: the order of the chain
  says which.

  * ``optax.chain(optax.add_decayed_weights(wd), se.sam(base, rho))``
    (inside): the ascent is along ``g + wd w`` (the decay's gradient is part
    of the objective SAM perturbs) and the base sees ``grad L(w + e) + wd
    w``.
  * ``se.sam(optax.chain(optax.add_decayed_weights(wd), base), rho)``
    (outside): the ascent is along ``g`` alone and the base sees ``grad L(w
    + e) + wd w``, the decay taken at the unperturbed ``w``.
  * ``optax.adamw``-style decoupled decay inside ``base`` is outside too.

  Variants: ``adaptive=True`` is ASAM (Kwon et al. 2021), the ascent
  ``rho T^2 u / ||T u||`` with ``T = |w| + adaptive_eta``; ``eigen_weight >
  0`` with ``update(..., eigenvector=v)`` is Eigen-SAM-style, the ascent
  direction ``u / ||u|| + eigen_weight sign(<u, v>) v / ||v||`` rescaled to
  radius ``rho`` (see ``se.sam_perturbation``). An update without
  ``eigenvector`` is plain SAM.

  Cost: two evaluations of ``grad_fn`` per update (at ``params`` and at
  ``params + e``). Under ``jax.jit`` XLA usually merges ``grad_fn(params)``
  with the caller's identical computation of ``grads``.

  Norms (``||u||`` and the recorded ``grad_norm``) are computed by
  ``sam_eos.sam.global_norm`` in float32 or wider, so large float16 or
  bfloat16 gradients do not overflow.

  Args:
    base_optimizer: any optax transformation (sgd, sgd with momentum,
      adam...). A plain ``optax.GradientTransformation`` is wrapped with
      ``optax.with_extra_args_support``, so it ignores extra keyword
      arguments of ``update``; a ``GradientTransformationExtraArgs``
      receives them.
    rho: radius ``rho >= 0``: a real scalar (possibly a traced array, e.g.
      under ``jax.vmap``), or an optax schedule ``count -> rho`` evaluated at
      the number of previous updates (``SAMState.count``), as
      ``optax.scale_by_schedule`` does.
    normalize: SAM (True) or unnormalized SAM (False).
    eps: added to ``||u||`` in the normalization, ``>= 0``.
    adaptive: ASAM's elementwise scaling of the perturbation by ``|w| +
      adaptive_eta``.
    adaptive_eta: ASAM's ``eta_a >= 0``.
    eigen_weight: weight ``alpha >= 0`` of the Eigen-SAM-style component
      along the ``eigenvector`` passed to ``update``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword ``grad_fn: params -> grads`` (raw gradient on the same batch as
    the incoming updates) and ``params``, and takes an optional keyword
    ``eigenvector`` (a pytree like ``params``, not passed on to the base). Its state is a ``SAMState``;
    ``grad_norm`` is ``||grad_fn(params)||``, the raw gradient norm at the
    iterate (not the norm of the incoming, possibly clipped, updates).

  Raises:
    ValueError: at construction if ``rho`` is neither a callable nor a
      non-negative real scalar (negative, NaN, complex, a string, an array
      with more than one entry...) or ``eps`` is negative; at update time if
      ``grad_fn`` or ``params`` is missing, if ``grad_fn(params)`` differs
      from the updates in structure, or if a schedule returns a non-scalar
      or (concretely) negative ``rho``.

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

    Weight decay chained before ``sam`` is kept: at ``w = (1, 1)`` the
    incoming update is ``g + w = (5, 2)`` and SAM adds ``H e``:

    >>> opt = optax.chain(optax.add_decayed_weights(1.0),
    ...                   se.sam(optax.sgd(0.1), rho=0.1))
    >>> w = jnp.ones(2)
    >>> updates, _ = opt.update(jax.grad(loss)(w), opt.init(w), w,
    ...                         grad_fn=jax.grad(loss))
    >>> u = jnp.array([5.0, 2.0])
    >>> expected = -0.1 * (u + 0.1 * jnp.array([4.0, 1.0]) * u / jnp.sqrt(29.0))
    >>> bool(jnp.allclose(updates, expected, rtol=1e-6))
    True

    ``rho`` may be a schedule of the step count:

    >>> opt = se.sam(optax.sgd(0.1), optax.linear_schedule(0.0, 0.1, 10))
    >>> state = opt.init(w)
    >>> int(state.count)
    0

  References:
    Foret et al. 2021, Algorithm 1; Long & Bartlett 2023, Eq. (1); optax's
    ``contrib.sam`` for the two-call formulation, ``with_extra_args_support``
    and ``scale_by_schedule`` for the conventions.
  """
  schedule = rho if callable(rho) else None
  if schedule is None:
    _checks.check_nonnegative_scalar(
        "rho", rho, what=" (float or 0-d array) or an optax schedule"
    )
  _checks.check_nonnegative("eps", eps)
  _checks.check_nonnegative("adaptive_eta", adaptive_eta)
  _checks.check_nonnegative("eigen_weight", eigen_weight)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params: PyTree) -> SAMState:
    return SAMState(
        base_state=base.init(params),
        grad_norm=jnp.zeros([], norm_dtype(params)),
        count=jnp.zeros([], jnp.int32),
    )

  def update_fn(
      updates: PyTree,
      state: SAMState,
      params: PyTree | None = None,
      *,
      grad_fn: Callable[[PyTree], PyTree] | None = None,
      eigenvector: PyTree | None = None,
      **extra_args: Any,
  ) -> tuple[PyTree, SAMState]:
    if grad_fn is None:
      raise ValueError(
          "sam(...).update needs `grad_fn`, a function params -> gradient on "
          "the same batch, e.g. grad_fn=lambda p: jax.grad(loss_fn)(p, batch)."
      )
    if params is None:
      raise ValueError("sam(...).update needs `params` (the current iterate).")
    if schedule is None:
      rho_t = rho
    else:
      rho_t = schedule(state.count)
      _checks.check_nonnegative_scalar(
          "rho", rho_t, what=" (returned by the rho schedule)"
      )
    grads = grad_fn(params)
    _checks.check_same_structure("updates", updates, "grad_fn(params)", grads)
    perturbation = sam_perturbation(
        updates,
        rho_t,
        normalize=normalize,
        eps=eps,
        params=params,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        eigenvector=eigenvector,
        eigen_weight=eigen_weight,
    )
    sam_grads = grad_fn(optax.apply_updates(params, perturbation))
    _checks.check_same_structure(
        "updates", updates, "grad_fn(params + e)", sam_grads
    )

    def correct(u: jax.Array, g: jax.Array, s: jax.Array) -> jax.Array:
      corrected = jnp.where(u == g, s, u + (s - g)).astype(u.dtype)
      return jnp.where(rho_t == 0, u, corrected)

    sam_updates = jax.tree.map(correct, updates, grads, sam_grads)
    new_updates, base_state = base.update(
        sam_updates, state.base_state, params, **extra_args
    )
    grad_norm = global_norm(grads).astype(state.grad_norm.dtype)
    return new_updates, SAMState(
        base_state=base_state,
        grad_norm=grad_norm,
        count=optax.safe_int32_increment(state.count),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
