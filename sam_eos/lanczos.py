"""Symmetric Lanczos with full reorthogonalization, on flat vectors.

For a symmetric ``A`` (given only as ``matvec: x -> A x`` on ``(n,)``
arrays) and a start vector ``v0``, ``m`` Lanczos steps build an orthonormal
basis ``Q = [q_0; ...; q_{m-1}]`` (rows) of the Krylov space
``span{v0, A v0, ..., A^{m-1} v0}`` and a symmetric tridiagonal
``T = Q A Q^T`` (diagonal ``alphas``, off-diagonal ``betas[:-1]``) with

  ``A Q^T = Q^T T + betas[m-1] q_m e_{m-1}^T``.

The eigenpairs ``(theta_i, s_i)`` of ``T`` give Ritz values ``theta_i`` and
Ritz vectors ``y_i = Q^T s_i`` with the a-posteriori bound
``||A y_i - theta_i y_i|| = |betas[m-1] * s_i[m-1]|``, available without
another product with ``A``.

In floating point the basis loses orthogonality as Ritz pairs converge
(Paige 1972), producing spurious copies of eigenvalues. Each new vector is
therefore reorthogonalized against the whole stored basis by classical
Gram-Schmidt applied twice ("twice is enough"), which keeps ``Q`` orthonormal
to working precision at ``O(m n)`` extra cost per step.

Precision: the recurrence, the basis, the norms and the tridiagonal
eigendecomposition run in the working dtype ``promote_types(v0.dtype,
float32)`` (``eigh`` has no bfloat16 or float16 path, and a bfloat16 basis
could not stay orthonormal); results are returned in the dtype of ``v0``.

Breakdown: if ``beta_j`` vanishes (relative to ``||A q_j||``) the Krylov space
is invariant and its Ritz pairs are exact eigenpairs. Rather than divide by
zero, the iteration records ``beta_j = 0`` and restarts from a fixed
pseudo-random vector orthogonalized against the basis, so ``T`` becomes
block diagonal, every block being ``A`` projected on an orthonormal basis:
the Ritz values stay Rayleigh quotients of ``A`` and no NaN appears.

References:
  Lanczos, "An Iteration Method for the Solution of the Eigenvalue Problem
  of Linear Differential and Integral Operators", J. Res. Nat. Bur.
  Standards 45, 1950.
  Paige, "Computational Variants of the Lanczos Method for the
  Eigenproblem", IMA J. Appl. Math. 10, 1972.
  Parlett, "The Symmetric Eigenvalue Problem", SIAM, 1998, Ch. 13
  (reorthogonalization, breakdown).
  Giraud, Langou & Rozloznik, "The loss of orthogonality in the Gram-Schmidt
  orthogonalization process", Comput. Math. Appl. 50, 2005 (CGS twice).
  Kraemer et al., matfree (github.com/pnkraemer/matfree): the design of
  small pure functions on flat vectors with full reorthogonalization.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_eos import _checks

Matvec = Callable[[jax.Array], jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST
# Seed of the fixed pseudo-random directions used after a breakdown (and for
# a traced all-zero ``v0``); any fixed value works.
_RESTART_SEED = 0


class LanczosResult(NamedTuple):
  """The output of ``lanczos`` after ``m = num_iters`` steps on ``(n,)``.

  Attributes:
    ritz_values: ``(m,)`` eigenvalues of ``T``, descending (largest
      algebraic first).
    ritz_vectors: ``(m, n)`` unit Ritz vectors ``y_i = Q^T s_i``, row ``i``
      paired with ``ritz_values[i]`` (sign arbitrary).
    residuals: ``(m,)`` residual norms ``||A y_i - theta_i y_i||``, computed
      as ``|betas[m-1] * s_i[m-1]|``.
    alphas: ``(m,)`` diagonal of ``T``.
    betas: ``(m,)``; ``betas[:-1]`` is the off-diagonal of ``T`` (zero where
      a breakdown restarted the iteration) and ``betas[-1]`` the norm of the
      final residual vector.
    basis: ``(m, n)`` orthonormal rows ``Q``.
  """

  ritz_values: jax.Array
  ritz_vectors: jax.Array
  residuals: jax.Array
  alphas: jax.Array
  betas: jax.Array
  basis: jax.Array


def working_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype Lanczos computes in for inputs of ``dtype``: at least float32.

  Args:
    dtype: a floating dtype.

  Returns:
    ``promote_types(dtype, float32)``.
  """
  return jnp.promote_types(dtype, jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.dot`` at full float precision (no TF32/bf16 passes on GPU/TPU)."""
  return jnp.dot(a, b, precision=_HIGHEST)


def _orthogonalize(
    basis: jax.Array, vector: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Classical Gram-Schmidt twice against the rows of ``basis``.

  Unfilled (zero) rows of ``basis`` contribute nothing.

  Returns:
    The projected vector and the total coefficients ``(num_rows,)``.
  """
  coeffs_1 = _dot(basis, vector)
  vector = vector - _dot(coeffs_1, basis)
  coeffs_2 = _dot(basis, vector)
  vector = vector - _dot(coeffs_2, basis)
  return vector, coeffs_1 + coeffs_2


def _safe_normalize(vector: jax.Array, norm: jax.Array) -> jax.Array:
  """``vector / norm``, or zeros (not NaN) when ``norm`` is zero."""
  return vector / jnp.where(norm > 0, norm, 1)


def _restart_base(size: int, dtype: jnp.dtype) -> jax.Array:
  """The fixed ``(size,)`` Gaussian vector that restart directions roll."""
  return jax.random.normal(jax.random.key(_RESTART_SEED), (size,), dtype)


def _restart_direction(
    basis: jax.Array, base: jax.Array, index: jax.Array | int
) -> jax.Array:
  """``roll(base, index)`` orthogonalized against ``basis``, unit norm.

  Rolled copies of one Gaussian vector are, with probability one, linearly
  independent of each other and of any earlier basis.
  """
  vector, _ = _orthogonalize(basis, jnp.roll(base, index))
  return _safe_normalize(vector, jnp.linalg.norm(vector))


def _step(
    matvec: Matvec,
    base: jax.Array,
    rounding: float,
    index: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lanczos step ``index``: expands ``A q_index``, stores ``q_{index+1}``.

  ``rounding`` is the unit roundoff of the products (the coarser of the
  working dtype and the dtype ``matvec`` returns): a residual below ten
  times it, relative to ``||A q_index||``, is a breakdown.
  """
  basis, alphas, betas = state
  dtype = basis.dtype
  product = jnp.asarray(matvec(basis[index]), dtype)
  residual, coeffs = _orthogonalize(basis, product)
  beta = jnp.linalg.norm(residual)
  tol = 10 * rounding * jnp.linalg.norm(product)
  breakdown = beta <= tol
  # A cond, not a where: the restart costs two more passes over the basis,
  # paid only on a breakdown (under vmap both branches run, as with where).
  next_vector = jax.lax.cond(
      breakdown,
      lambda: _restart_direction(basis, base, index + 1),
      lambda: _safe_normalize(residual, beta),
  )
  basis = basis.at[index + 1].set(next_vector, mode="drop")
  alphas = alphas.at[index].set(coeffs[index])
  betas = betas.at[index].set(jnp.where(breakdown, 0, beta))
  return basis, alphas, betas


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
  """The dense ``(m, m)`` symmetric tridiagonal ``T``."""
  off = betas[:-1]
  return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _start_vector(v0: jax.Array, base: jax.Array) -> jax.Array:
  """Unit ``v0``, or the unit ``base`` if ``v0`` is zero.

  A non-finite ``v0`` (possible only when traced) stays non-finite, so the
  whole result is NaN rather than silently computed from another start.
  """
  norm = jnp.linalg.norm(v0)
  return jnp.where(
      norm == 0,
      _safe_normalize(base, jnp.linalg.norm(base)),
      v0 / jnp.where(norm == 0, 1, norm),
  )


def _validate(v0: jax.Array, num_iters: int) -> int:
  """Checks the arguments of ``lanczos``; returns ``num_iters`` as an int."""
  if v0.ndim != 1:
    raise ValueError(f"`v0` must be a 1-D array, got shape {v0.shape}.")
  num_iters = _checks.check_int("num_iters", num_iters, 1)
  if num_iters > v0.shape[0]:
    raise ValueError(
        f"`num_iters` ({num_iters}) must be <= the length of "
        f"`v0` ({v0.shape[0]})."
    )
  concrete = _checks.concrete_value(v0)
  if concrete is not None:
    if not np.all(np.isfinite(concrete)):
      raise ValueError(
          "`v0` must be finite: it contains NaN or inf (e.g. "
          "a warm start from a diverged run); pass a fresh "
          "random start vector instead."
      )
    if not concrete.any():
      raise ValueError("`v0` must be non-zero.")
  return num_iters


def _check_matvec(matvec: Matvec, size: int, dtype: jnp.dtype) -> jnp.dtype:
  """Checks ``matvec`` maps ``(size,)`` to ``(size,)`` reals, by ``eval_shape``.

  Returns:
    The dtype of ``matvec``'s output.
  """
  arg = jax.ShapeDtypeStruct((size,), dtype)
  out = jax.eval_shape(matvec, arg)
  if not hasattr(out, "shape") or not hasattr(out, "dtype"):
    raise ValueError(
        f"`matvec` must return one array of shape ({size},), got the pytree "
        f"{out}. For an operator on pytrees, flatten at the boundary: "
        "`lambda v: ravel_pytree(op(unravel(v)))[0]` "
        "(jax.flatten_util.ravel_pytree)."
    )
  if out.shape != (size,):
    raise ValueError(
        f"`matvec` must map shape ({size},) to shape ({size},) (x -> A x "
        f"for a square A), got output shape {out.shape}. Check that A is "
        f"{size} x {size} and that matvec returns a 1-D vector, e.g. "
        "`lambda x: a @ x` rather than `a @ x[:, None]`."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f"`matvec` must return a real floating dtype, got dtype {out.dtype} "
        f"for a {dtype} input. Lanczos needs a real symmetric operator: "
        "return A x as floats, e.g. `(a @ x).astype(x.dtype)`"
        + (
            " or its real part for a Hermitian A with real entries."
            if jnp.issubdtype(out.dtype, jnp.complexfloating)
            else "."
        )
    )
  return out.dtype


def lanczos(matvec: Matvec, v0: jax.Array, num_iters: int) -> LanczosResult:
  """Ritz pairs of a symmetric operator by ``num_iters`` Lanczos steps.

  Runs the three-term Lanczos recurrence

    ``beta_j q_{j+1} = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``,
    ``alpha_j = q_j^T A q_j``,  ``q_0 = v0 / ||v0||``,

  with every new vector reorthogonalized against all previous ones (classical
  Gram-Schmidt twice), in one ``lax.fori_loop`` with no host synchronization,
  then diagonalizes ``T = tridiag(betas, alphas, betas)`` with
  ``jnp.linalg.eigh``. The extreme Ritz values converge first, at a rate set
  by the relative gap; ``num_iters = n`` returns the whole spectrum (up to
  rounding). A breakdown (``beta_j ~ 0``: ``v0`` lies in an invariant
  subspace, e.g. is an eigenvector) restarts from a direction orthogonal to
  the basis with ``beta_j = 0``, so no NaN ever appears.

  Jit with ``num_iters`` static; vmap over ``v0`` (or over the data inside
  ``matvec``) works.

  Dtypes: everything is computed in the working dtype ``promote_types(
  v0.dtype, float32)`` (float32 for bfloat16/float16/float32, float64 for
  float64) and returned in the dtype of ``v0``. For float32 results from a
  bfloat16 operator (e.g. Ritz values more precise than bfloat16's three
  digits), pass a float32 ``v0``.

  Args:
    matvec: ``x -> A x`` for a symmetric ``A``, ``(n,) -> (n,)``. It is
      called with ``(n,)`` arrays of the working dtype and must return an
      ``(n,)`` real floating array (any precision; cast to the working
      dtype). Its output shape and dtype are checked once with
      ``jax.eval_shape``.
    v0: ``(n,)`` start vector, not necessarily normalized. A traced all-zero
      ``v0`` is replaced by a fixed pseudo-random vector; a traced ``v0``
      containing NaN or inf makes every output NaN (a concrete one raises).
    num_iters: number of steps ``m``, a Python int with ``1 <= m <= n``.

  Returns:
    ``LanczosResult(ritz_values (m,), ritz_vectors (m, n), residuals (m,),
    alphas (m,), betas (m,), basis (m, n))``, in the floating dtype of ``v0``.

  Raises:
    ValueError: if ``v0`` is not 1-D or is concretely zero, NaN or inf
      (message names ``v0``), if ``num_iters`` is not an integer in
      ``[1, n]`` (names ``num_iters``), or if ``matvec`` does not return an
      ``(n,)`` real floating array (names ``matvec`` and the fix).

  Examples:
    Five steps on a 5 x 5 matrix give its whole spectrum; three give the top
    eigenvalue of a matrix with a large gap to about 1e-7:

    >>> import jax.numpy as jnp, numpy as np, sam_eos as se
    >>> a = jnp.diag(jnp.array([4.0, -1.0, 2.0, 0.5, 3.0]))
    >>> a = a + 0.1 * jnp.ones((5, 5))
    >>> out = se.lanczos(lambda x: a @ x, jnp.ones(5), 5)
    >>> dense = np.linalg.eigvalsh(np.asarray(a))[::-1]
    >>> bool(np.allclose(out.ritz_values, dense, atol=1e-5))
    True
    >>> b = jnp.diag(jnp.array([100.0, 1.0, 0.9, 0.8, 0.7]))
    >>> top = se.lanczos(lambda x: b @ x, jnp.ones(5), 3).ritz_values[0]
    >>> round(float(top), 3)
    100.0

  References:
    Lanczos 1950; Paige 1972; Parlett 1998, Ch. 13; matfree (Kraemer et
    al.) for the design.
  """
  v0 = jnp.asarray(v0)
  if not jnp.issubdtype(v0.dtype, jnp.floating):
    v0 = v0.astype(jnp.result_type(float))
  num_iters = _validate(v0, num_iters)
  out_dtype = v0.dtype
  dtype = working_dtype(out_dtype)
  product_dtype = _check_matvec(matvec, v0.shape[0], dtype)
  rounding = max(
      float(jnp.finfo(dtype).eps), float(jnp.finfo(product_dtype).eps)
  )
  base = _restart_base(v0.shape[0], dtype)
  basis = jnp.zeros((num_iters, v0.shape[0]), dtype)
  basis = basis.at[0].set(_start_vector(v0.astype(dtype), base))
  state = (basis, jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype))
  basis, alphas, betas = jax.lax.fori_loop(
      0, num_iters, lambda j, s: _step(matvec, base, rounding, j, s), state
  )
  eigvals, eigvecs = jnp.linalg.eigh(_tridiagonal(alphas, betas))
  eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
  result = LanczosResult(
      ritz_values=eigvals,
      ritz_vectors=_dot(eigvecs.T, basis),
      residuals=jnp.abs(betas[-1] * eigvecs[-1]),
      alphas=alphas,
      betas=betas,
      basis=basis,
  )
  return jax.tree.map(lambda x: x.astype(out_dtype), result)
