"""Top Hessian eigenpairs (sharpness) of a loss, and the paper's power method.

The sharpness ``S(w)`` is the largest eigenvalue of the Hessian ``H(w)`` of
``L(w) = loss_fn(w, batch)``. ``hessian_eigenpairs`` computes the top ``k``
eigenpairs by Lanczos (``sam_eos.krylov``) on exact forward-over-reverse
Hessian-vector products (``sam_eos.hessian_matvec``, linearized once per
point), with parameters flattened by ``ravel_pytree`` at the boundary; a warm
start from the previous top eigenvector makes tracking along a training run
cheap. ``power_iteration`` reproduces the measurement protocol of the
authors' code for side-by-side comparisons.

References:
  Lanczos 1950; Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998.
  Pearlmutter, "Fast Exact Multiplication by the Hessian", 1994.
  Kraemer et al., matfree (github.com/pnkraemer/matfree): pytrees flattened
  at the boundary of flat-vector numerics.
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, and their code github.com/google-deepmind/sam_edge
  (``hessian_norm.py``): the power-iteration protocol.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import _checks
from sam_eos._types import ArrayLike, LossFn, PyTree
from sam_eos.hessian import (
    finite_difference_matvec,
    flat_matvec,
    hessian_matvec,
)
from sam_eos import krylov, staged
from sam_eos.lanczos import working_dtype


class Eigenpairs(NamedTuple):
  """Top-``k`` Hessian eigenpairs.

  Attributes:
    values: ``(k,)`` Ritz values, descending (largest algebraic first), in
      the working dtype: float32 for bfloat16, float16 or float32
      parameters, float64 for float64 ones.
    vectors: pytree like ``params`` (and in their dtypes) whose leaves carry
      a leading axis ``k``;
      slice ``i`` is the unit-norm (in the flattened space) Ritz vector of
      ``values[i]``, sign arbitrary.
    residuals: ``(k,)`` (working dtype) residual norms
      ``||H y_i - values[i] y_i||``, computed from the stored products. In
      floating point they carry the rounding of those products, about
      ``eps * ||H||``: read a residual below that as "converged to working
      precision".
    num_iters: int32 scalar, the number of Hessian-vector products used.
  """

  values: jax.Array
  vectors: PyTree
  residuals: jax.Array
  num_iters: jax.Array


class PowerIterationResult(NamedTuple):
  """Output of ``power_iteration``.

  Attributes:
    value: scalar estimate ``||H v||`` of ``||H||_op = max_i |lambda_i|``
      (non-negative), in float32 or wider.
    vector: unit-norm pytree like ``params`` (in their dtypes), the last
      iterate ``v``.
    num_iters: int32 scalar, the number of iterations (each two gradients).
  """

  value: jax.Array
  vector: PyTree
  num_iters: jax.Array


def _start_block(
    params: PyTree, key: jax.Array | None, init: PyTree | None
) -> jax.Array:
  """The ``(b, n)`` start block: flat ``init`` rows, or one normal vector.

  ``init`` is a vector pytree like ``params`` (``b = 1``) or a block whose
  leaves carry a leading axis ``b`` (e.g. the ``vectors`` of an earlier
  ``Eigenpairs``). All-zero rows (possible when traced) fall back to the
  random vector drawn from ``key``. In the working dtype (float32 or wider).
  """
  flat, _ = ravel_pytree(params)
  dtype = working_dtype(flat.dtype)
  key = jax.random.key(0) if key is None else key
  random = jax.random.normal(key, flat.shape, dtype)
  if init is None:
    return random[None]
  if _is_block(params, init):
    block = jax.vmap(lambda v: ravel_pytree(v)[0])(init).astype(dtype)
  else:
    block = ravel_pytree(init)[0].astype(dtype)[None]
  zero = ~jnp.any(block != 0, axis=1, keepdims=True)
  return jnp.where(zero, random, block)


def _is_block(params: PyTree, init: PyTree) -> bool:
  """Whether every leaf of ``init`` is its ``params`` leaf with a leading axis.

  Raises:
    ValueError: if ``init`` is neither like ``params`` nor a block of such
      vectors (message names ``init``).
  """
  _checks.check_same_structure("params", params, "init", init, shapes=False)
  pairs = list(zip(jax.tree.leaves(params), jax.tree.leaves(init)))
  if all(jnp.shape(i) == jnp.shape(p) for p, i in pairs):
    return False
  sizes = {jnp.shape(i)[0] for p, i in pairs if jnp.ndim(i) == jnp.ndim(p) + 1}
  if len(sizes) == 1 and all(
      jnp.shape(i)[1:] == jnp.shape(p) for p, i in pairs
  ):
    return True
  raise ValueError(
      "`init` must be a vector pytree like `params` (same leaf shapes) or a "
      "block of b such vectors (every leaf with one leading axis b, e.g. "
      "`Eigenpairs.vectors`), got leaf shapes "
      f"{[jnp.shape(i) for _, i in pairs]} for params leaf shapes "
      f"{[jnp.shape(p) for p, _ in pairs]}."
  )


def hessian_eigenpairs(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    k: int = 1,
    num_iters: int = 20,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    has_aux: bool = False,
    tol: ArrayLike | None = None,
    which: str = "top",
) -> Eigenpairs:
  """The ``k`` largest (algebraic) eigenvalues of the Hessian and their vectors.

  Runs Lanczos with full reorthogonalization (``sam_eos.krylov``) on
  ``H(w)``, ``n`` the number of parameters, each step one exact
  Hessian-vector product, and returns the top ``k`` Ritz pairs
  ``(theta_i, y_i)``, ``theta_1 >= ... >= theta_k``. Ordering is by algebraic
  value: on a Hessian with eigenvalues ``{-5, -1}`` the top value is ``-1``.
  The residual ``r_i = ||H y_i - theta_i y_i||`` is computed exactly from the
  stored products and bounds the error: ``min_j |lambda_j - theta_i| <=
  r_i``. ``n`` steps give the exact spectrum.

  Accuracy: with ``tol=None`` it runs ``m = min(num_iters, n)`` steps. With
  a ``tol`` it stops at the first step where every returned pair has
  ``r_i <= tol * |theta_i|`` (a certified relative accuracy), ``num_iters``
  being the cap; ``Eigenpairs.num_iters`` says how many products were used.

  Start: ``init`` (a warm start), else a standard normal vector drawn from
  ``key``. ``init`` is a vector pytree like ``params`` (typically the
  previous top eigenvector; if it is exactly an eigenvector one step is
  exact) or a block of ``b`` of them (leaves with a leading axis ``b``, e.g.
  the ``vectors`` of an earlier call): the first ``b`` steps then take the
  Rayleigh-Ritz pairs of the block, which finds the new top eigenvector even
  when the top eigenvalues have swapped order since the block was computed.
  All-zero rows (possible when traced) fall back to the random start.

  Dtypes: each Hessian-vector product runs in the parameters' dtype; the
  basis, norms and the projected ``eigh`` run in float32 or wider, so
  bfloat16 and float16 parameters work. ``values`` and ``residuals`` come
  back in that working dtype (float32 for low-precision parameters),
  ``vectors`` in the parameters' dtypes.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w`` (``n`` entries in all).
    batch: passed unchanged to ``loss_fn``.
    k: number of eigenpairs (at each end for ``which="both"``),
      ``1 <= k <= min(num_iters, n)``.
    num_iters: Lanczos steps ``>= k`` (the cap when ``tol`` is given);
      capped at ``n`` (``n`` steps already give every eigenvalue).
    key: PRNG key of the random start; ``None`` means ``jax.random.key(0)``.
    init: optional warm start: a pytree like ``params``, or a block of
      ``b <= num_iters`` such vectors stacked on a leading axis.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
    tol: relative residual bound at which to stop (a positive scalar, may
      be traced), or None for exactly ``num_iters`` steps.
    which: ``"top"`` for the ``k`` largest pairs, ``"both"`` for the ``k``
      largest and the ``k`` smallest (all certified by ``tol``).

  Returns:
    ``Eigenpairs(values, vectors, residuals, num_iters)``: ``values (k,)``
    descending (``(2k,)`` for ``"both"``: the top ``k`` then the bottom
    ``k``, the whole array descending), ``vectors`` a pytree whose leaves
    carry the same leading axis, ``residuals`` alike, ``num_iters`` the
    number of Hessian-vector products used.

  Raises:
    ValueError: if ``k`` or ``num_iters`` is not an integer ``>= 1``, if
      ``k > num_iters`` or ``k > n`` (message names ``k``), if ``init`` is
      neither like ``params`` nor a block of such vectors, or holds more
      than ``num_iters`` vectors (names ``init``), if ``tol`` is not
      positive or ``which`` is unknown (names them).

  Examples:
    On ``L(w) = 0.5 sum_i h_i w_i^2`` the Hessian is ``diag(h)``:

    >>> import jax.numpy as jnp, sam_eos as se
    >>> h = jnp.array([1.0, -4.0, 3.0, 0.5])
    >>> loss = lambda w, h: 0.5 * jnp.sum(h * w["a"] ** 2)
    >>> params = {"a": jnp.zeros(4)}
    >>> out = se.hessian_eigenpairs(loss, params, h, k=2, num_iters=4)
    >>> [round(float(x), 3) for x in out.values]
    [3.0, 1.0]
    >>> [round(float(abs(x)), 3) for x in out.vectors["a"][0]]
    [0.0, 0.0, 1.0, 0.0]
    >>> [round(float(x), 3) for x in jnp.sort(h)[::-1][:2]]
    [3.0, 1.0]
    >>> both = se.hessian_eigenpairs(loss, params, h, num_iters=4, which="both")
    >>> [round(float(x), 3) for x in both.values]
    [3.0, -4.0]

  References:
    Lanczos 1950; Parlett 1998; Pearlmutter 1994; matfree (Kraemer et al.)
    for the design; Long & Bartlett 2023 (sharpness tracking).
  """
  k = _checks.check_int("k", k, 1)
  num_iters = _checks.check_int("num_iters", num_iters, 1)
  if k > num_iters:
    raise ValueError(f"`k` ({k}) must be <= `num_iters` ({num_iters}).")
  flat, unravel = ravel_pytree(params)
  if k > flat.size:
    raise ValueError(
        f"`k` ({k}) must be <= the number of parameters " f"({flat.size})."
    )
  max_iters = min(num_iters, flat.size)
  start = _start_block(params, key, init)
  if start.shape[0] > max_iters:
    raise ValueError(
        f"`init` holds {start.shape[0]} start vectors, more than the "
        f"{max_iters} Lanczos steps allowed (`num_iters`, capped at the "
        "number of parameters): pass fewer vectors or raise `num_iters`."
    )
  if _staged(loss_fn, params, batch, start, tol, has_aux):
    # Called eagerly on CPU with a conv loss: straight-line stages.
    settings = staged.SolveSettings(
        max_iters, k, None if tol is None else float(tol), which, None
    )
    result, _ = staged.solve(
        staged.HessianOperator(loss_fn, has_aux), (params, batch), start,
        settings,
    )  # fmt: skip
  else:
    matvec = flat_matvec(
        hessian_matvec(loss_fn, params, batch, has_aux=has_aux), params
    )
    result = krylov.eigenpairs(
        matvec, start, max_iters, k=k, tol=tol, which=which
    )
  values, vectors, residuals = (
      result.values,
      result.vectors,
      result.residuals,
  )
  if which == "both":
    values = jnp.concatenate([values, result.bottom_values[::-1]])
    vectors = jnp.concatenate([vectors, result.bottom_vectors[::-1]])
    residuals = jnp.concatenate([residuals, result.bottom_residuals[::-1]])
  return Eigenpairs(
      values=values,
      vectors=jax.vmap(unravel)(vectors.astype(flat.dtype)),
      residuals=residuals,
      num_iters=result.num_iters,
  )


def _staged(loss_fn, params, batch, start, tol, has_aux) -> bool:
  """Whether ``hessian_eigenpairs`` runs as ``staged.solve``: called outside
  any transformation, where ``staged.uses_staging`` says so for the loss
  (a CPU backend and a convolution; ``SAM_EOS_PROGRAMS`` overrides)."""
  if staged.is_traced(params, batch, start, tol):
    return False
  if has_aux:
    return staged.uses_staging(lambda p: loss_fn(p, batch)[0], params)
  return staged.uses_staging(lambda p: loss_fn(p, batch), params)


def sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    num_iters: int = 20,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    has_aux: bool = False,
    tol: ArrayLike | None = None,
) -> jax.Array:
  """The sharpness ``S(w) = lambda_max(H(w))``, the top Hessian eigenvalue.

  ``hessian_eigenpairs(...).values[0]`` with ``k = 1``: the largest
  algebraic eigenvalue by Lanczos on exact Hessian-vector products, to a
  certified relative residual ``tol`` if one is given.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    num_iters: Lanczos steps ``>= 1`` (capped at the number of parameters).
    key: PRNG key of the random start; ``None`` means ``jax.random.key(0)``.
    init: optional warm start, a pytree like ``params`` or a block of them.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    tol: relative residual bound at which Lanczos stops (``num_iters`` then
      being the cap), or None for exactly ``num_iters`` steps.

  Returns:
    Scalar top eigenvalue.

  Raises:
    ValueError: as ``hessian_eigenpairs``.

  Examples:
    A least-squares loss ``mean((x w - y)^2)`` has Hessian ``2 x^T x / N``:

    >>> import jax, jax.numpy as jnp, numpy as np, sam_eos as se
    >>> x = jax.random.normal(jax.random.key(1), (8, 3))
    >>> loss = lambda w, xy: jnp.mean((xy[0] @ w - xy[1]) ** 2)
    >>> s = se.sharpness(loss, jnp.zeros(3), (x, jnp.ones(8)))
    >>> dense = np.linalg.eigvalsh(2 * np.asarray(x.T @ x) / 8)[-1]
    >>> bool(np.isclose(s, dense, rtol=1e-5))
    True

  References:
    Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at
    the Edge of Stability", ICLR 2021; Long & Bartlett 2023.
  """
  return hessian_eigenpairs(
      loss_fn,
      params,
      batch,
      k=1,
      num_iters=num_iters,
      key=key,
      init=init,
      has_aux=has_aux,
      tol=tol,
  ).values[0]


def power_iteration(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    num_iters: int = 100,
    tol: ArrayLike = 1e-3,
    fd_eps: ArrayLike = 1e-3,
    key: jax.Array | None = None,
    has_aux: bool = False,
) -> PowerIterationResult:
  """``||H||_op`` by power iteration on finite-difference HVPs (paper protocol).

  The measurement of Long & Bartlett's code (``hessian_norm.py`` in
  google-deepmind/sam_edge): from a random unit vector ``v_0`` drawn from
  ``key``,

    ``p_t = (grad L(w + eps v_{t-1}) - grad L(w - eps v_{t-1})) / (2 eps)``,
    ``mu_t = ||p_t||``,  ``v_t = p_t / mu_t``,

  stopping once ``|mu_t - mu_{t-1}| <= tol * mu_t`` or ``mu_t <= tol`` or
  after ``num_iters`` steps, inside one ``lax.while_loop``. ``p_t`` is the
  central difference of gradients, as in the authors' code: it costs two
  gradients but its error is ``O(eps^2)`` (third derivatives cancel), while
  a forward difference costs one gradient per step with ``O(eps)`` error.
  ``mu_t`` converges to the largest-*magnitude* eigenvalue ``||H||_op =
  max_i |lambda_i|``, so this is the sharpness only when the top eigenvalue
  dominates the most negative one; convergence is linear with ratio
  ``|lambda_2| / |lambda_1|`` (by magnitude), and with ``tol = 1e-3`` it may
  stop well before the eigenvalue has converged on a small gap. Use
  ``sharpness`` for the accurate, signed value.

  Differences from the authors' code, none of which changes the protocol:
  the first estimate is not compared with the constant 1 (their loop starts
  from ``mu_0 = 1``), the central difference is divided by ``2 eps`` exactly
  (they add ``1e-5`` to the denominator, a 0.5% downward bias at
  ``eps = 1e-3``), and vectors are normalized exactly.

  Start vector: the authors draw a fresh random start at every check. Here
  the start is drawn from ``key``; ``key=None`` means ``jax.random.key(0)``,
  the same start at every call (deterministic, reproducible). For the
  authors' fresh starts pass a new key per call, e.g.
  ``jax.random.fold_in(key, step)``.

  Dtypes: the gradients run in the parameters' dtype; the iterate ``v``,
  the norms and ``value`` are kept in float32 or wider (the finite-difference
  points ``w +- eps v`` are rounded once to the parameters' dtype). With
  bfloat16 parameters the product is only accurate to about
  ``2^-8 ||g|| / eps``, so use a larger ``fd_eps`` (or ``sharpness``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    num_iters: maximum number of iterations, an integer ``>= 1``.
    tol: relative (and absolute) stopping tolerance, ``> 0``.
    fd_eps: finite-difference step along the unit vector, ``> 0``.
    key: PRNG key of the random start; ``None`` means ``jax.random.key(0)``,
      the same start at every call (pass a new key for a fresh start).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``PowerIterationResult(value, vector, num_iters)``: ``value = mu_t >= 0``
    (scalar), ``vector = v_t`` (unit pytree like ``params``), ``num_iters =
    t``.

  Raises:
    ValueError: if ``num_iters`` is not an integer ``>= 1`` or a concrete
      ``tol`` or ``fd_eps`` is not positive (message names the argument).

  Examples:
    On ``L(w) = 0.5 sum_i h_i w_i^2`` with ``h = (1, -5, 2)`` it finds
    ``max |h_i| = 5``, not the top eigenvalue 2:

    >>> import jax.numpy as jnp, sam_eos as se
    >>> h = jnp.array([1.0, -5.0, 2.0])
    >>> loss = lambda w, h: 0.5 * jnp.sum(h * w ** 2)
    >>> out = se.power_iteration(loss, jnp.zeros(3), h)
    >>> round(float(out.value), 2), round(float(jnp.max(jnp.abs(h))), 2)
    (5.0, 5.0)

    Without a key every call uses the same start:

    >>> again = se.power_iteration(loss, jnp.zeros(3), h)
    >>> bool(jnp.all(again.vector == out.vector))
    True

  References:
    Long & Bartlett 2023 and github.com/google-deepmind/sam_edge
    (``hessian_norm.py``); Golub & Van Loan, "Matrix Computations", 4th ed.,
    Sec. 8.2.1 (the power method).
  """
  num_iters = _checks.check_int("num_iters", num_iters, 1)
  _checks.check_positive("tol", tol)
  _checks.check_positive("fd_eps", fd_eps)
  flat, unravel = ravel_pytree(params)
  dtype = working_dtype(flat.dtype)
  # Unravels working-dtype vectors into a wide pytree like ``params``.
  _, unravel_wide = ravel_pytree(
      jax.tree.map(
          lambda p: jnp.asarray(p, working_dtype(jnp.result_type(p))), params
      )
  )
  fd_matvec = finite_difference_matvec(
      loss_fn, params, batch, fd_eps=fd_eps, has_aux=has_aux
  )

  def matvec(v: jax.Array) -> jax.Array:
    return ravel_pytree(fd_matvec(unravel_wide(v)))[0].astype(dtype)

  v0 = _start_block(params, key, None)[0]

  def cond(state: tuple[jax.Array, ...]) -> jax.Array:
    step, _, _, done = state
    return (step < num_iters) & ~done

  def body(state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    step, v, mu, _ = state
    product = matvec(v)
    new_mu = jnp.linalg.norm(product)
    new_v = jnp.where(new_mu > 0, product / jnp.where(new_mu > 0, new_mu, 1), v)
    done = (jnp.abs(new_mu - mu) <= tol * new_mu) | (new_mu <= tol)
    return step + 1, new_v, new_mu, done

  state = (
      jnp.zeros((), jnp.int32),
      v0 / jnp.linalg.norm(v0),
      jnp.full((), jnp.inf, dtype),
      jnp.zeros((), bool),
  )
  step, v, mu, _ = jax.lax.while_loop(cond, body, state)
  return PowerIterationResult(
      value=mu, vector=unravel(v.astype(flat.dtype)), num_iters=step
  )
