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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_eos import _checks
from sam_eos._types import ArrayLike, LossFn, PyTree
from sam_eos.hessian import gradient_fn


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
  leaves = [
      x
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.result_type(x), jnp.floating)
  ]
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
  scale = jnp.where(
      jnp.isfinite(largest) & (largest > 0),
      jnp.ldexp(jnp.ones([], dtype), exponent - 1),
      1,
  )
  total = sum(jnp.sum(jnp.square(x / scale)) for x in leaves)
  return (scale * jnp.sqrt(total)).astype(dtype)


def _validate_variant(
    params: PyTree | None,
    grads: PyTree,
    adaptive: bool,
    adaptive_eta: ArrayLike,
    eigenvector: PyTree | None,
    eigen_weight: ArrayLike,
) -> None:
  """Checks the ASAM / Eigen-SAM options of ``sam_perturbation``."""
  if adaptive and eigenvector is not None:
    raise ValueError(
        "`adaptive` (ASAM) and `eigenvector` (Eigen-SAM) cannot be combined; "
        "choose one."
    )
  if adaptive:
    if params is None:
      raise ValueError(
          "`adaptive=True` (ASAM) scales the perturbation by |w| + "
          "adaptive_eta, so it needs `params`."
      )
    _checks.check_same_structure("grads", grads, "params", params)
    _checks.check_nonnegative("adaptive_eta", adaptive_eta)
  if eigenvector is not None:
    _checks.check_same_structure("grads", grads, "eigenvector", eigenvector)
    _checks.check_nonnegative("eigen_weight", eigen_weight)


def _scaled(scale: jax.Array, tree: PyTree, like: PyTree) -> PyTree:
  """``scale * tree`` in the dtypes of ``like``."""
  return jax.tree.map(lambda x, g: (scale * x).astype(g.dtype), tree, like)


def _safe_ratio(rho: ArrayLike, denom: jax.Array) -> jax.Array:
  """``rho / denom``, or 0 (never NaN) when ``denom`` is 0."""
  return jnp.where(denom > 0, rho / jnp.where(denom > 0, denom, 1.0), 0.0)


def sam_perturbation(
    grads: PyTree,
    rho: ArrayLike,
    *,
    normalize: bool = True,
    eps: float = 1e-12,
    params: PyTree | None = None,
    adaptive: bool = False,
    adaptive_eta: ArrayLike = 0.01,
    eigenvector: PyTree | None = None,
    eigen_weight: ArrayLike = 0.0,
) -> PyTree:
  """The SAM ascent step ``rho * g / (||g|| + eps)`` (or ``rho * g``).

  A zero gradient gives a zero perturbation, never NaN, even with ``eps = 0``.
  The norm ``||g||`` is computed by ``global_norm`` (float32 or wider, no
  overflow for large float16 gradients); the perturbation has the dtypes of
  ``grads``.

  Variants (the defaults give plain SAM, bit for bit):

  * ASAM (``adaptive=True``, Kwon et al. 2021, ``p = 2``): with the
    elementwise ``T = |w| + adaptive_eta``,
    ``e = rho T^2 g / (||T g|| + eps)`` (unnormalized: ``rho T^2 g``), the
    worst case over the ellipsoid ``||T^{-1} e|| <= rho``, which makes the
    perturbation invariant to rescaling the weights. Applied to every leaf
    (Kwon et al.'s code leaves biases unscaled; pass ``params`` with ones in
    place of biases and ``adaptive_eta = 0`` there to mimic that).
  * Eigen-SAM-style (``eigenvector=v``, Luo et al. 2025): the direction
    ``d = g / ||g|| + alpha s v / ||v||`` with ``alpha = eigen_weight`` and
    ``s = sign(<g, v>)`` (+1 at 0), then ``e = rho d / ||d||`` (radius
    ``rho``; unnormalized: ``e = rho ||g|| d``). With ``alpha = 0`` it is
    SAM's perturbation up to rounding. ``v`` is typically the top Hessian
    eigenvector the tracking already computes.

  Args:
    grads: gradient pytree ``g``.
    rho: radius ``rho >= 0`` (scalar, may be traced).
    normalize: divide by the global norm (SAM) or not (USAM).
    eps: added to ``||g||`` (``||T g||`` for ASAM) in the normalization,
      ``>= 0``.
    params: the iterate ``w``, a pytree like ``grads``; needed by ASAM only.
    adaptive: ASAM's elementwise scaling.
    adaptive_eta: ASAM's ``eta_a >= 0`` in ``T = |w| + eta_a``.
    eigenvector: a pytree like ``grads`` (any non-zero norm), or None.
    eigen_weight: ``alpha >= 0``, the weight of the eigenvector component.

  Returns:
    A pytree like ``grads``.

  Raises:
    ValueError: for a concrete ``rho < 0``, ``eps < 0``, ``adaptive_eta <
      0`` or ``eigen_weight < 0``; ``adaptive`` without ``params`` (the
      message names ``params``); ``params`` or ``eigenvector`` unlike
      ``grads``; ``adaptive`` together with ``eigenvector``.

  Examples:
    >>> import jax.numpy as jnp, sam_eos as se
    >>> se.sam_perturbation({"w": jnp.array([3.0, 4.0])}, 0.5)["w"]
    Array([0.3, 0.4], dtype=float32)

    ASAM at ``w = (1, 0)``, ``eta_a = 0``: only the first weight can move,
    ``e = 0.5 (1, 0) * (3, 4) / 3 = (0.5, 0)``:

    >>> g = jnp.array([3.0, 4.0])
    >>> se.sam_perturbation(g, 0.5, params=jnp.array([1.0, 0.0]),
    ...                     adaptive=True, adaptive_eta=0.0, eps=0.0).tolist()
    [0.5, 0.0]

    Eigen-SAM-style with ``v = (0, 1)`` and weight 1: ``d = (0.6, 1.8)``:

    >>> e = se.sam_perturbation(g, 0.5, eigenvector=jnp.array([0.0, 1.0]),
    ...                         eigen_weight=1.0, eps=0.0)
    >>> bool(jnp.allclose(e, 0.5 * jnp.array([0.6, 1.8]) / jnp.sqrt(3.6)))
    True

  References:
    Foret et al. 2021, Eq. (2); Long & Bartlett 2023, Eq. (1); Kwon, Kim,
    Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", ICML 2021, Eq. (11);
    Luo et al., "Explicit Eigenvalue Regularization Improves
    Sharpness-Aware Minimization", arXiv:2501.12666, 2025.
  """
  _checks.check_nonnegative("rho", rho)
  _checks.check_nonnegative("eps", eps)
  _validate_variant(
      params, grads, adaptive, adaptive_eta, eigenvector, eigen_weight
  )
  if adaptive:
    t = jax.tree.map(
        lambda w, g: jnp.abs(w).astype(g.dtype) + adaptive_eta, params, grads
    )
    tg = jax.tree.map(lambda a, g: a * g, t, grads)
    direction = jax.tree.map(lambda a, x: a * x, t, tg)
    if not normalize:
      return _scaled(rho, direction, grads)
    return _scaled(_safe_ratio(rho, global_norm(tg) + eps), direction, grads)
  if eigenvector is not None:
    norm = global_norm(grads)
    unit_g = _scaled(_safe_ratio(1.0, norm + eps), grads, grads)
    inner = sum(
        jnp.vdot(g, v)
        for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(eigenvector))
    )
    sign = jnp.where(inner >= 0, 1.0, -1.0)
    v_scale = sign * eigen_weight * _safe_ratio(1.0, global_norm(eigenvector))
    direction = jax.tree.map(
        lambda u, v: u + v_scale * v.astype(u.dtype), unit_g, eigenvector
    )
    live = norm > 0  # a zero gradient gives a zero perturbation
    if not normalize:
      return _scaled(jnp.where(live, rho * norm, 0.0), direction, grads)
    scale = jnp.where(live, _safe_ratio(rho, global_norm(direction)), 0.0)
    return _scaled(scale, direction, grads)
  if not normalize:
    return optax.tree.scale(rho, grads)
  norm = global_norm(grads)
  denom = norm + eps
  scale = jnp.where(denom > 0, rho / jnp.where(denom > 0, denom, 1.0), 0.0)
  return jax.tree.map(lambda g: (scale * g).astype(g.dtype), grads)


def _split_groups(batch: Any, m_sharpness: int) -> Any:
  """``batch`` with each leaf's leading axis ``B`` reshaped to ``(m, B/m)``."""

  def split(x: jax.Array) -> jax.Array:
    if jnp.ndim(x) == 0 or jnp.shape(x)[0] % m_sharpness:
      raise ValueError(
          f"`m_sharpness` ({m_sharpness}) must divide the leading (example) "
          f"axis of every leaf of `batch`; got a leaf of shape {jnp.shape(x)}."
      )
    return jnp.reshape(x, (m_sharpness, -1) + jnp.shape(x)[1:])

  return jax.tree.map(split, batch)


def perturbed_gradient(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    grads: PyTree,
    *,
    rho: ArrayLike,
    normalize: bool = True,
    eps: float = 1e-12,
    m_sharpness: int | None = None,
    group_sharding: jax.sharding.Sharding | None = None,
    has_aux: bool = False,
    adaptive: bool = False,
    adaptive_eta: ArrayLike = 0.01,
    eigenvector: PyTree | None = None,
    eigen_weight: ArrayLike = 0.0,
) -> PyTree:
  """The SAM gradient ``grad L(w + e)``, given the gradient ``g`` at ``w``.

  Whole-batch SAM (``m_sharpness=None``, the algorithm Long & Bartlett
  analyse) ascends along the given ``grads = g = grad L(w)`` and takes the
  gradient there, on the same ``batch``: one gradient evaluation,

    ``grad L(w + e)``,  ``e = sam_perturbation(g, rho)``.

  m-sharpness (Foret et al. 2021, Sec. 4.1; their per-accelerator SAM)
  splits the batch's leading axis of ``B`` examples into ``m`` consecutive
  groups ``b_1, ..., b_m`` of ``B/m`` examples. Each group ascends with its
  own gradient and the SAM gradient is the mean of the groups' perturbed
  gradients:

    ``e_j = sam_perturbation(grad L_{b_j}(w), rho)``,
    ``g_SAM = (1/m) sum_j grad L_{b_j}(w + e_j)``,

  two gradient evaluations per group (vmapped over the groups); ``grads``
  then serves only the ``rho == 0`` case. With ``m = 1`` it is whole-batch
  SAM.

  For ``rho == 0`` the result is ``grads`` itself, bit for bit (selected with
  ``jnp.where``, so ``rho`` may be traced, e.g. under ``vmap``), so SAM with
  ``rho = 0`` is exactly the base method.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: the batch passed to ``loss_fn``; with ``m_sharpness``, a pytree
      of arrays sharing a leading (example) axis divisible by it.
    grads: ``g = grad L(w)`` on ``batch``, a pytree like ``params`` (e.g.
      from the caller's own ``jax.value_and_grad``, so it is not recomputed).
    rho: radius ``rho >= 0`` (may be traced).
    normalize: SAM (True) or unnormalized SAM (False).
    eps: added to ``||g||`` in the normalization.
    m_sharpness: None for whole-batch SAM, or the number ``m >= 1`` of
      groups.
    group_sharding: with ``m_sharpness``, a sharding the ``(m, B/m, ...)``
      groups are constrained to (e.g. one group per device along a
      ``"data"`` mesh axis), or None.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    adaptive: ASAM's perturbation (see ``sam_perturbation``), scaled by
      ``|w| + adaptive_eta`` at ``params``.
    adaptive_eta: ASAM's ``eta_a >= 0``.
    eigenvector: Eigen-SAM-style direction added to each ascent (see
      ``sam_perturbation``), a pytree like ``params``, or None.
    eigen_weight: its weight ``alpha >= 0``.

  Returns:
    The SAM gradient, a pytree like ``params``.

  Raises:
    ValueError: for a concrete ``rho < 0`` or ``eps < 0``, an
      ``m_sharpness`` that is not a positive integer dividing the batch's
      leading axis, or a ``group_sharding`` without ``m_sharpness``.

  Examples:
    On ``L(w) = 0.5 * w^T diag(4, 1) w`` (no batch dependence) every group
    sees the whole-batch gradient, so m-sharpness equals SAM:

    >>> import jax.numpy as jnp
    >>> from sam_eos.sam import perturbed_gradient
    >>> loss = lambda w, b: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w**2)
    >>> w, batch = jnp.array([1.0, 0.0]), jnp.zeros((4, 1))
    >>> perturbed_gradient(loss, w, batch, jnp.array([4.0, 0.0]), rho=0.5
    ...                    ).tolist()
    [6.0, 0.0]
    >>> perturbed_gradient(loss, w, batch, jnp.array([4.0, 0.0]), rho=0.5,
    ...                    m_sharpness=2).tolist()
    [6.0, 0.0]

  References:
    Foret et al. 2021, Eq. (3) and Sec. 4.1 (m-sharpness); Long & Bartlett
    2023, Eq. (1).
  """
  if group_sharding is not None and m_sharpness is None:
    raise ValueError(
        "`group_sharding` constrains the m-sharpness groups; it "
        "needs `m_sharpness`."
    )

  def grad(w: PyTree, b: Any) -> PyTree:
    return gradient_fn(loss_fn, b, has_aux=has_aux)(w)

  def ascend(g: PyTree, b: Any) -> PyTree:
    e = sam_perturbation(
        g,
        rho,
        normalize=normalize,
        eps=eps,
        params=params,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        eigenvector=eigenvector,
        eigen_weight=eigen_weight,
    )
    return grad(optax.apply_updates(params, e), b)

  if m_sharpness is None:
    sam_grads = ascend(grads, batch)
  else:
    m_sharpness = _checks.check_int("m_sharpness", m_sharpness, 1)
    groups = _split_groups(batch, m_sharpness)
    if group_sharding is not None:
      groups = jax.lax.with_sharding_constraint(groups, group_sharding)
    per_group = jax.vmap(lambda b: ascend(grad(params, b), b))(groups)
    sam_grads = jax.tree.map(lambda x: jnp.mean(x, axis=0), per_group)
  return jax.tree.map(lambda g, s: jnp.where(rho == 0, g, s), grads, sam_grads)


def sam_gradient(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    rho: ArrayLike,
    normalize: bool = True,
    eps: float = 1e-12,
    m_sharpness: int | None = None,
    has_aux: bool = False,
    adaptive: bool = False,
    adaptive_eta: ArrayLike = 0.01,
    eigenvector: PyTree | None = None,
    eigen_weight: ArrayLike = 0.0,
) -> SAMGrad | tuple[SAMGrad, Any]:
  """Loss, gradient and SAM gradient of ``loss_fn`` at ``params``.

  Computes ``g = grad L(w)`` on ``batch`` and the SAM gradient from it with
  ``perturbed_gradient``: ``grad L(w + e)`` with
  ``e = sam_perturbation(g, rho)``, on the same batch, or with
  ``m_sharpness`` the mean over ``m`` groups of the batch of each group's
  own SAM gradient (Foret et al.'s m-sharpness; see ``perturbed_gradient``).
  The loss, gradient and gradient norm are the whole batch's either way.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: the batch passed to ``loss_fn`` for both gradients.
    rho: radius ``rho >= 0`` (may be traced, e.g. under ``vmap``).
    normalize: SAM (True) or unnormalized SAM (False).
    eps: added to ``||g||`` in the normalization.
    m_sharpness: None for SAM with the whole batch's gradient, or the
      number ``m`` of equal groups the batch's leading axis is split into.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    adaptive: ASAM (Kwon et al. 2021): the perturbation scaled elementwise by
      ``|w| + adaptive_eta`` (see ``sam_perturbation``).
    adaptive_eta: ASAM's ``eta_a >= 0``.
    eigenvector: Eigen-SAM-style: a direction (e.g. the top Hessian
      eigenvector) added to the perturbation with weight ``eigen_weight``.
    eigen_weight: the weight ``alpha >= 0`` of ``eigenvector``.

  Returns:
    ``SAMGrad(loss, grads, grad_norm, sam_grads)``; with ``has_aux`` the pair
    ``(SAMGrad, aux)``, ``aux`` taken at the unperturbed ``params`` on the
    whole batch. With ``rho == 0``, ``sam_grads`` is ``grads`` exactly.

  Raises:
    ValueError: for a concrete ``rho < 0`` or ``eps < 0``, an
      ``m_sharpness`` that is not a positive integer dividing the batch's
      leading axis, or bad ASAM / Eigen-SAM options (as
      ``sam_perturbation``).

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
    Foret et al. 2021, Eq. (3) and Sec. 4.1 (m-sharpness); Long & Bartlett
    2023, Eq. (1).
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
  value, grads = value_and_grad(params, batch)
  loss, aux = value if has_aux else (value, None)
  sam_grads = perturbed_gradient(
      loss_fn,
      params,
      batch,
      grads,
      rho=rho,
      normalize=normalize,
      eps=eps,
      m_sharpness=m_sharpness,
      has_aux=has_aux,
      adaptive=adaptive,
      adaptive_eta=adaptive_eta,
      eigenvector=eigenvector,
      eigen_weight=eigen_weight,
  )
  out = SAMGrad(
      loss=loss, grads=grads, grad_norm=global_norm(grads), sam_grads=sam_grads
  )
  return (out, aux) if has_aux else out
