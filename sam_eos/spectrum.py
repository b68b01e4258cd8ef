"""Top Hessian eigenpairs (sharpness) of a loss, and the paper's power method.

The sharpness ``S(w)`` is the largest eigenvalue of the Hessian ``H(w)`` of
``L(w) = loss_fn(w, batch)``. ``hessian_eigenpairs`` computes the top ``k``
eigenpairs by Lanczos (``sam_eos.lanczos``) on exact forward-over-reverse
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
from sam_eos.lanczos import lanczos, working_dtype


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
    residuals: ``(k,)`` (working dtype) Lanczos estimates ``|beta_m s_i[m-1]|`` of
      ``||H y_i - values[i] y_i||``, exact in exact arithmetic. In floating
      point they can fall below the rounding level of the products (even to
      0 after a breakdown); the attainable accuracy is about
      ``eps * ||H||``, so read a residual below that as "converged to
      working precision", not as an error bound.
  """

  values: jax.Array
  vectors: PyTree
  residuals: jax.Array


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


def _start_vector(
    flat: jax.Array, key: jax.Array | None, init: PyTree | None
) -> jax.Array:
  """Flat ``init`` if given and non-zero, else a normal vector from ``key``.

  In the working dtype ``working_dtype(flat.dtype)`` (at least float32).
  """
  dtype = working_dtype(flat.dtype)
  key = jax.random.key(0) if key is None else key
  random = jax.random.normal(key, flat.shape, dtype)
  if init is None:
    return random
  warm = ravel_pytree(init)[0].astype(dtype)
  return jnp.where(jnp.any(warm != 0), warm, random)


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
) -> Eigenpairs:
  """The ``k`` largest (algebraic) eigenvalues of the Hessian and their vectors.

  Runs ``m = min(num_iters, n)`` Lanczos steps (full reorthogonalization) on
  ``H(w)``, ``n`` the number of parameters, each step one exact
  Hessian-vector product, and returns the top ``k`` Ritz pairs
  ``(theta_i, y_i)``, ``theta_1 >= ... >= theta_k``. Ordering is by algebraic
  value: on a Hessian with eigenvalues ``{-5, -1}`` the top value is ``-1``.
  The residual ``||H y_i - theta_i y_i|| <= r_i`` also bounds the error,
  ``min_j |lambda_j - theta_i| <= r_i``. ``m = n`` gives the exact spectrum.

  Start vector: ``init`` (a warm start, typically the previous top
  eigenvector; if it is exactly an eigenvector one step is exact), else a
  standard normal vector drawn from ``key``. An all-zero ``init`` (possible
  when traced) falls back to the random start.

  Dtypes: each Hessian-vector product runs in the parameters' dtype; Lanczos
  (basis, norms, the tridiagonal ``eigh``) runs in float32 or wider, so
  bfloat16 and float16 parameters work. ``values`` and ``residuals`` come
  back in that working dtype (float32 for low-precision parameters),
  ``vectors`` in the parameters' dtypes.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w`` (``n`` entries in all).
    batch: passed unchanged to ``loss_fn``.
    k: number of eigenpairs, ``1 <= k <= min(num_iters, n)``.
    num_iters: Lanczos steps ``>= k``; capped at ``n`` (``n`` steps already
      give every eigenvalue).
    key: PRNG key of the random start; ``None`` means ``jax.random.key(0)``.
    init: optional warm-start pytree like ``params``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

  Returns:
    ``Eigenpairs(values (k,), vectors (pytree, leaves (k, ...)), residuals
    (k,))``.

  Raises:
    ValueError: if ``k`` or ``num_iters`` is not an integer ``>= 1``, if
      ``k > num_iters`` or ``k > n`` (message names ``k``), or if ``init``
      differs from ``params`` in structure or leaf shapes (names ``init``).

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

  References:
    Lanczos 1950; Parlett 1998; Pearlmutter 1994; matfree (Kraemer et al.)
    for the design; Long & Bartlett 2023 (sharpness tracking).
  """
  k = _checks.check_int("k", k, 1)
  num_iters = _checks.check_int("num_iters", num_iters, 1)
  if k > num_iters:
    raise ValueError(f"`k` ({k}) must be <= `num_iters` ({num_iters}).")
  if init is not None:
    _checks.check_same_structure("params", params, "init", init)
  flat, unravel = ravel_pytree(params)
  if k > flat.size:
    raise ValueError(
        f"`k` ({k}) must be <= the number of parameters " f"({flat.size})."
    )
  matvec = flat_matvec(
      hessian_matvec(loss_fn, params, batch, has_aux=has_aux), params
  )
  result = lanczos(
      matvec, _start_vector(flat, key, init), min(num_iters, flat.size)
  )
  vectors = result.ritz_vectors[:k].astype(flat.dtype)
  return Eigenpairs(
      values=result.ritz_values[:k],
      vectors=jax.vmap(unravel)(vectors),
      residuals=result.residuals[:k],
  )


def sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    num_iters: int = 20,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    has_aux: bool = False,
) -> jax.Array:
  """The sharpness ``S(w) = lambda_max(H(w))``, the top Hessian eigenvalue.

  ``hessian_eigenpairs(...).values[0]`` with ``k = 1``: the largest
  algebraic eigenvalue by Lanczos on exact Hessian-vector products.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    num_iters: Lanczos steps ``>= 1`` (capped at the number of parameters).
    key: PRNG key of the random start; ``None`` means ``jax.random.key(0)``.
    init: optional warm-start pytree like ``params``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

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

  v0 = _start_vector(flat, key, None)

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
