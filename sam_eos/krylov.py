"""Extreme eigenpairs by Lanczos with a block warm start and certified stopping.

The solver behind ``hessian_eigenpairs`` and the training loop's tracking.
It grows an orthonormal basis ``Q`` (rows ``q_0, q_1, ...``) of a subspace,
stores the products ``P = [A q_0; A q_1; ...]`` and, after every product,
performs the Rayleigh-Ritz step on ``span(Q)``: the eigenpairs
``(theta_i, s_i)`` of the projected matrix ``M = Q A Q^T`` give Ritz pairs
``(theta_i, y_i = Q^T s_i)`` whose residuals are computed *exactly* from the
stored products,

  ``r_i = A y_i - theta_i y_i = P^T s_i - theta_i Q^T s_i``,

with no extra product. By the Bauer-Fike theorem for symmetric ``A`` some
eigenvalue lies within ``||r_i||`` of ``theta_i``, and ``theta_1 <=
lambda_max`` always (a Rayleigh quotient), so the iteration can stop as soon
as ``||r_i|| <= tol * |theta_i|`` for the pairs asked for: it pays only for
the accuracy requested. The number of products is returned with the result.

How the basis grows (``b`` start vectors, ``b >= 1``):

* steps ``0 .. b-1`` take the start vectors in turn (orthonormalized), so
  after ``b`` products the Ritz pairs are the Rayleigh-Ritz pairs of the
  start block. Carrying the previous top ``b`` Ritz vectors between checks
  along a training run finds the new top eigenvector even when the top
  eigenvalues swap order (the previous top vector can then be almost
  orthogonal to the new one, while the span of the previous top few is not);
* every later step expands with the residual ``r_i`` of the certified pair
  (see ``num_certified`` and ``which``) that is furthest from convergence
  (largest ``||r_i|| / |theta_i|``), as Davidson's method does without a
  preconditioner. With ``b = 1`` every Ritz residual is parallel to the next
  Lanczos vector, so this *is* Lanczos from the start vector (``M`` is the
  tridiagonal ``T`` up to rounding), whichever pair is chosen. With ``b > 1``
  expanding with ``A q_j`` instead would drag in ``A`` times the other start
  vectors at every step (a slowly growing block Krylov space); the residual
  keeps the expansion on the pairs asked for.

Every new vector is orthogonalized against the whole basis by classical
Gram-Schmidt, once for a residual (already orthogonal up to rounding) and
twice where the first pass cancels more than half its norm; a vector lost to
rounding (a breakdown, or a start vector dependent on the others) is
replaced by a fixed pseudo-random direction orthogonal to the basis, so no
NaN appears. The coefficients ``Q A q_j`` take one pass.

Shapes are static: the basis and products are preallocated for ``max_iters``
rows and the iteration is a ``lax.while_loop``. Under ``vmap`` it runs until
every member has converged, each member's result frozen when it stops; pass
``axis_name`` (the vmap axis) so that the stopping test stays a shared loop
condition (one ``pmax`` per product) rather than a select over the whole
basis at every product, which costs several passes over it.

Staged: ``begin``, ``advance`` and ``finish`` split the same iteration so
that it can run as several straight-line programs, ``num_products``
unrolled products each, with the stopping test (``running``) between them
on the host. On CPU, XLA runs the backward pass of a convolution 10-26x
slower inside a ``while_loop`` or ``cond`` than in straight-line code
(jax-ml/jax#12868), so ``sam_eos.staged`` measures conv models that way; the
products, Ritz values and stopping point are those of ``eigenpairs``.

References:
  Lanczos 1950; Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998,
  Ch. 11 (Rayleigh-Ritz, residual bounds) and Ch. 13.
  Stewart, "A Krylov-Schur Algorithm for Large Eigenproblems", SIAM J.
  Matrix Anal. Appl. 23, 2001, and Wu & Simon, "Thick-Restart Lanczos
  Method for Large Symmetric Eigenvalue Problems", SIAM J. Matrix Anal.
  Appl. 22, 2000: restarting Krylov methods from a few Ritz vectors, the
  idea behind the block warm start.
  Davidson, "The iterative calculation of a few of the lowest eigenvalues
  and corresponding eigenvectors of large real-symmetric matrices", J.
  Comput. Phys. 17, 1975, and Knyazev, "Toward the Optimal Preconditioned
  Eigensolver: LOBPCG", SIAM J. Sci. Comput. 23, 2001: residual expansion of
  a Ritz subspace.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_eos import _checks
from sam_eos.lanczos import (
    Matvec,
    _check_matvec,
    _dot,
    _restart_base,
    _restart_direction,
    _safe_normalize,
    working_dtype,
)

WHICH = ("top", "both")
AxisName = str | tuple[str, ...] | None


class KrylovResult(NamedTuple):
  """Extreme Ritz pairs after ``num_iters`` products with ``A``.

  Attributes:
    values: ``(k,)`` the largest Ritz values, descending.
    vectors: ``(k, n)`` their unit Ritz vectors (sign arbitrary).
    residuals: ``(k,)`` exact residual norms ``||A y_i - theta_i y_i||``
      (up to rounding in the stored products, about ``eps ||A||``).
    bottom_values: ``(k,)`` the smallest Ritz values, ascending. Each is an
      upper bound on the matching smallest eigenvalue of ``A``.
    bottom_vectors: ``(k, n)`` their unit Ritz vectors.
    bottom_residuals: ``(k,)`` their residual norms.
    num_iters: int32 scalar, the number of products with ``A`` used.
  """

  values: jax.Array
  vectors: jax.Array
  residuals: jax.Array
  bottom_values: jax.Array
  bottom_vectors: jax.Array
  bottom_residuals: jax.Array
  num_iters: jax.Array


class _State(NamedTuple):
  """The ``while_loop`` carry; rows ``>= size`` of the arrays are unused.

  ``size`` counts this member's products; ``step`` counts iterations, the
  same for every member of a vmapped call with ``axis_name``.
  """

  size: jax.Array
  step: jax.Array
  basis: jax.Array
  products: jax.Array
  coeffs: jax.Array
  converged: jax.Array


def _projected(coeffs: jax.Array, size: jax.Array) -> jax.Array:
  """``M = Q A Q^T`` on the first ``size`` rows, padded below its spectrum.

  Row ``j`` of ``coeffs`` holds ``Q A q_j``; only entries ``i <= j`` were
  computed against a filled row, so ``M`` is built from the lower triangle.
  Inactive diagonal entries are set below ``-||M||_F``, under every active
  eigenvalue, so ``eigh`` puts the ``size`` active Ritz values first (in
  descending order) with eigenvectors that vanish on the padding.
  """
  m = coeffs.shape[0]
  active = jnp.arange(m) < size
  mask = active[:, None] & active[None, :]
  lower = jnp.tril(coeffs)
  matrix = jnp.where(mask, lower + lower.T - jnp.diag(jnp.diag(lower)), 0)
  low = -(jnp.linalg.norm(matrix) + 1)
  return matrix + jnp.diag(jnp.where(active, 0, low))


def _ritz(
    state: _State,
) -> tuple[jax.Array, jax.Array]:
  """All Ritz values (descending, active ones first) and their ``s_i``."""
  values, vectors = jnp.linalg.eigh(_projected(state.coeffs, state.size))
  values, vectors = values[::-1], vectors[:, ::-1]
  active = jnp.arange(values.shape[0]) < state.size
  return values, jnp.where(active[:, None], vectors, 0)


def _pairs(
    state: _State,
    values: jax.Array,
    coords: jax.Array,
    index: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Ritz values, unit vectors, residual vectors and norms at ``index``.

  Args:
    state: the solver state.
    values: ``(m,)`` Ritz values.
    coords: ``(m, m)`` their coordinates ``s_i`` (columns).
    index: ``(p,)`` int indices of the pairs.

  Returns:
    ``(theta (p,), y (p, n), r (p, n), ||r|| (p,))``.
  """
  theta = values[index]
  s = coords[:, index].T
  vectors = _dot(s, state.basis)
  residual = _dot(s, state.products) - theta[:, None] * vectors
  return theta, vectors, residual, jnp.linalg.norm(residual, axis=1)


def _bottom_index(size: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` smallest active Ritz values, smallest first."""
  return jnp.maximum(size - 1 - jnp.arange(k), 0)


def _set_row(
    array: jax.Array, index: jax.Array, value: jax.Array, keep: jax.Array
) -> jax.Array:
  """``array`` with row ``index`` set to ``value`` if ``keep``, else zero.

  An ``index`` past the last row changes nothing. With ``index`` unbatched
  this is one in-place row update, also under vmap.
  """
  rows = array.shape[0]
  row = jnp.minimum(index, rows - 1)
  new = jnp.where(keep, value, 0)
  new = jnp.where(index < rows, new, array[row]).astype(array.dtype)
  return jax.lax.dynamic_update_index_in_dim(array, new, row, 0)


def _any(flag: jax.Array, axis_name: AxisName) -> jax.Array:
  """``flag`` or'ed over the vmap axes ``axis_name`` (unbatched), or itself."""
  if axis_name is None:
    return flag
  return jax.lax.pmax(flag.astype(jnp.int32), axis_name) > 0


def _branch(
    branches: bool,
    flag: jax.Array,
    axis_name: AxisName,
    rare: Callable[[], jax.Array],
    usual: Callable[[], jax.Array],
) -> jax.Array:
  """``rare()`` where ``flag``, else ``usual()``: a ``lax.cond`` on ``flag``
  or'ed over ``axis_name`` with ``branches``, else both and a select."""
  if not branches:
    return jnp.where(flag, rare(), usual())
  return jax.lax.cond(
      _any(flag, axis_name), lambda: jnp.where(flag, rare(), usual()), usual
  )


def _next_vector(
    basis: jax.Array,
    candidate: jax.Array,
    base: jax.Array,
    index: jax.Array,
    rounding: float,
    axis_name: AxisName,
    branches: bool = True,
) -> jax.Array:
  """``candidate`` orthonormalized against ``basis``, or a restart direction.

  One classical Gram-Schmidt pass, and a second only where the first
  cancelled more than half the norm (the Daniel-Gragg-Kaufman-Stewart
  criterion; "twice is enough"). The residual candidates of the expansion
  are orthogonal to the basis up to rounding already, so they take one pass.
  A candidate lost to rounding is replaced by a rolled fixed Gaussian vector
  orthogonal to the basis. With ``branches`` the rare cases are
  ``lax.cond``s on predicates or'ed over ``axis_name`` (under ``vmap`` they
  stay branches); without, both sides are computed and selected, the same
  values at a few more passes over the basis.
  """
  norm = jnp.linalg.norm(candidate)
  project = lambda v: v - _dot(_dot(basis, v), basis)
  vector = project(candidate)
  again = jnp.linalg.norm(vector) < 0.5 * norm
  vector = _branch(
      branches, again, axis_name, lambda: project(vector), lambda: vector
  )
  new_norm = jnp.linalg.norm(vector)
  lost = new_norm <= 10 * rounding * norm
  return _branch(
      branches,
      lost,
      axis_name,
      lambda: _restart_direction(basis, base, index),
      lambda: _safe_normalize(vector, new_norm),
  )


def _validate(
    start: jax.Array, max_iters: int, k: int, which: str, tol: float | None
) -> tuple[int, int]:
  """Checks the arguments of ``eigenpairs``; returns ``max_iters`` and ``k``."""
  if start.ndim != 2:
    raise ValueError(
        "`start` must be a 1-D vector (n,) or a 2-D block (b, n) of start "
        f"vectors, got shape {start.shape}."
    )
  num_start, size = start.shape
  max_iters = _checks.check_int("max_iters", max_iters, 1)
  k = _checks.check_int("k", k, 1)
  if max_iters > size:
    raise ValueError(
        f"`max_iters` ({max_iters}) must be <= the dimension ({size})."
    )
  if num_start > max_iters:
    raise ValueError(
        f"`start` has {num_start} vectors but `max_iters` is {max_iters}: "
        "pass at most `max_iters` start vectors or raise `max_iters`."
    )
  if k > max_iters:
    raise ValueError(f"`k` ({k}) must be <= `max_iters` ({max_iters}).")
  if which not in WHICH:
    raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
  if tol is not None:
    _checks.check_positive("tol", tol)
  concrete = _checks.concrete_value(start)
  if concrete is not None and not np.all(np.isfinite(concrete)):
    raise ValueError(
        "`start` must be finite: it contains NaN or inf (e.g. a warm start "
        "from a diverged run); pass a fresh random start instead."
    )
  return max_iters, k


class Spec(NamedTuple):
  """The static settings of one solve (see ``begin``); hashable.

  Attributes:
    max_iters: the cap on products (basis rows).
    k: pairs returned at each end.
    which: ``"top"`` or ``"both"``.
    num_certified: pairs (at each end) that must meet the tolerance.
    num_start: start vectors ``b``.
    size: the dimension ``n``.
    dtype: the working dtype (a name).
    rounding: the unit roundoff of the working and product dtypes.
    has_tol: whether a tolerance was given (else all ``max_iters``).
    axis_name: the ``vmap`` axes the solve runs under, or None.
  """

  max_iters: int
  k: int
  which: str
  num_certified: int
  num_start: int
  size: int
  dtype: str
  rounding: float
  has_tol: bool
  axis_name: AxisName


class KrylovState(NamedTuple):
  """A solve in progress: ``_State`` plus the start block and tolerance.

  Passed from one ``advance`` call (one compiled program) to the next, so a
  measurement can run in stages with the stopping test between them.

  Attributes:
    solver: the basis, products and projected matrix (``_State``).
    start: ``(b, n)`` the start block (rows taken by the first ``b`` steps).
    tol: the relative residual bound (0 when the solve has none).
  """

  solver: _State
  start: jax.Array
  tol: jax.Array


def begin(
    matvec: Matvec,
    start: jax.Array,
    max_iters: int,
    *,
    k: int = 1,
    tol: float | jax.Array | None = None,
    which: str = "top",
    num_certified: int | None = None,
    axis_name: AxisName = None,
) -> tuple[Spec, KrylovState]:
  """Validates a solve and returns its static ``Spec`` and initial state.

  Arguments as ``eigenpairs`` (``matvec`` is only checked, not called).
  ``eigenpairs`` is ``begin``, then ``advance`` by one product in a
  ``while_loop`` while ``running``, then ``finish``; a staged caller runs
  ``advance`` by several products per compiled program instead, with the
  stopping test (``running``) on the host between programs, and gets the
  same result.

  Returns:
    ``(spec, state)``.

  Raises:
    ValueError: as ``eigenpairs``.
  """
  start = jnp.asarray(start)
  if not jnp.issubdtype(start.dtype, jnp.floating):
    start = start.astype(jnp.result_type(float))
  if start.ndim == 1:
    start = start[None]
  max_iters, k = _validate(start, max_iters, k, which, tol)
  num_certified = k if num_certified is None else num_certified
  num_certified = _checks.check_int("num_certified", num_certified, 1)
  if num_certified > k:
    raise ValueError(f"`num_certified` ({num_certified}) must be <= `k` ({k}).")
  num_start, size = start.shape
  dtype = working_dtype(start.dtype)
  product_dtype = _check_matvec(matvec, size, dtype)
  spec = Spec(
      max_iters=max_iters,
      k=k,
      which=which,
      num_certified=num_certified,
      num_start=num_start,
      size=size,
      dtype=jnp.dtype(dtype).name,
      rounding=max(
          float(jnp.finfo(dtype).eps), float(jnp.finfo(product_dtype).eps)
      ),
      has_tol=tol is not None,
      axis_name=axis_name,
  )
  start = start.astype(dtype)
  first = jnp.linalg.norm(start[0])
  base = _restart_base(size, dtype)
  q0 = jnp.where(
      first > 0,
      start[0] / jnp.where(first > 0, first, 1),
      base / jnp.linalg.norm(base),
  )
  zeros = jnp.zeros((max_iters, size), dtype)
  solver = _State(
      size=jnp.array(0, jnp.int32),
      step=jnp.array(0, jnp.int32),
      basis=zeros.at[0].set(q0),
      products=zeros,
      coeffs=jnp.zeros((max_iters, max_iters), dtype),
      converged=jnp.array(False),
  )
  tol = jnp.asarray(0 if tol is None else tol, dtype)
  return spec, KrylovState(solver=solver, start=start, tol=tol)


def running(state: KrylovState) -> jax.Array:
  """Whether this member (not the vmapped group) needs more products."""
  solver = state.solver
  return ~solver.converged & (solver.size < solver.basis.shape[0])


def _product_step(
    spec: Spec, matvec: Matvec, state: KrylovState, branches: bool = True
) -> KrylovState:
  """One product, the Rayleigh-Ritz step and the next basis vector.

  Every running member has ``size == step``. A member that has stopped
  (under vmap, or past its stopping point inside a stage) computes on but
  writes zeros to rows past its size: it is frozen. ``step`` is unbatched
  under ``axis_name``, so the writes stay in-place row updates under vmap.
  """
  solver, start = state.solver, state.start
  dtype = jnp.dtype(spec.dtype)
  base = _restart_base(spec.size, dtype)
  step = solver.step
  active = running(state)
  product = jnp.asarray(matvec(solver.basis[step]), dtype)
  solver = solver._replace(
      size=solver.size + active,
      step=step + 1,
      products=_set_row(solver.products, step, product, active),
      coeffs=_set_row(solver.coeffs, step, _dot(solver.basis, product), active),
  )
  values, coords = _ritz(solver)
  index = jnp.arange(spec.num_certified)
  if spec.which == "both":
    index = jnp.concatenate(
        [index, _bottom_index(solver.size, spec.num_certified)]
    )
  theta, _, residual, norms = _pairs(solver, values, coords, index)
  scale = jnp.abs(theta)
  ok = jnp.all(norms <= state.tol * scale) if spec.has_tol else jnp.array(False)
  relative = norms / jnp.where(scale > 0, scale, 1)
  num_start = spec.num_start
  candidate = jnp.where(
      step + 1 < num_start,
      start[jnp.minimum(step + 1, num_start - 1)],
      residual[jnp.argmax(relative)],
  )
  vector = _next_vector(
      solver.basis,
      candidate,
      base,
      step + 1,
      spec.rounding,
      spec.axis_name,
      branches,
  )
  enough = step + 1 >= max(num_start, spec.k)
  solver = solver._replace(
      basis=_set_row(solver.basis, step + 1, vector, active),
      converged=solver.converged | (active & enough & ok),
  )
  return state._replace(solver=solver)


def advance(
    spec: Spec, matvec: Matvec, state: KrylovState, num_products: int
) -> KrylovState:
  """``num_products`` more products, unrolled: straight-line code.

  No loop or branch holds a product, so on CPU, where XLA runs a
  convolution's backward pass 10-26x slower inside a ``while_loop`` or
  ``cond`` (jax-ml/jax#12868), each product costs what it costs alone. The
  rare Gram-Schmidt cases are selects, not ``cond``s (the same values; a
  ``cond`` saves only passes over the basis), so a stage is branch-free. A member that stops inside the stage is frozen
  (its result is that of ``eigenpairs``); call ``running`` between stages.

  Args:
    spec: from ``begin``.
    matvec: ``x -> A x``, built inside the calling program.
    state: the solve so far.
    num_products: products to run (static).

  Returns:
    The advanced state.
  """
  for _ in range(num_products):
    state = _product_step(spec, matvec, state, branches=False)
  return state


def finish(spec: Spec, state: KrylovState) -> KrylovResult:
  """The ``KrylovResult`` of a solve (top and bottom ``k`` pairs)."""
  solver = state.solver
  values, coords = _ritz(solver)
  top = _pairs(solver, values, coords, jnp.arange(spec.k))
  bottom = _pairs(solver, values, coords, _bottom_index(solver.size, spec.k))
  return KrylovResult(
      values=top[0],
      vectors=top[1],
      residuals=top[3],
      bottom_values=bottom[0],
      bottom_vectors=bottom[1],
      bottom_residuals=bottom[3],
      num_iters=solver.size,
  )


def eigenpairs(
    matvec: Matvec,
    start: jax.Array,
    max_iters: int,
    *,
    k: int = 1,
    tol: float | jax.Array | None = None,
    which: str = "top",
    num_certified: int | None = None,
    axis_name: AxisName = None,
) -> KrylovResult:
  """The ``k`` largest (and smallest) eigenpairs of a symmetric operator.

  Runs the block-started Lanczos iteration of the module docstring for at
  most ``max_iters`` products with ``A``, stopping early once every certified
  pair meets ``||A y_i - theta_i y_i|| <= tol * |theta_i|`` (but never before
  the ``b`` start vectors and ``k`` pairs are in the basis). With
  ``tol=None`` it runs all ``max_iters`` products.

  The certificate bounds the distance from ``theta_i`` to *some* eigenvalue
  of ``A``; like every Krylov method it cannot see an eigenvector that has no
  component in the start vectors (a random start has one almost surely).

  Args:
    matvec: ``x -> A x`` for a symmetric ``A``, ``(n,) -> (n,)`` real.
    start: ``(n,)`` start vector or ``(b, n)`` block of start vectors (e.g.
      the previous top ``b`` Ritz vectors); need not be orthonormal. A zero
      or dependent row is replaced by a fixed pseudo-random direction.
    max_iters: the cap on products (basis size), ``b <= max_iters <= n``.
    k: number of top (and bottom) pairs returned, ``<= max_iters``.
    tol: relative residual bound, or None for a fixed ``max_iters``
      products. May be a traced scalar.
    which: ``"top"`` certifies the top pairs only; ``"both"`` also the
      bottom ones.
    num_certified: how many of the ``k`` pairs (at each end) must meet
      ``tol``; default ``k``. The training loop carries ``k`` vectors but
      certifies only the top one.
    axis_name: the name (or names) of the ``vmap`` axes this call runs
      under, or None. With it, the iteration continues while any member runs
      (one ``pmax`` per product) and a member that has stopped is frozen by
      writes to a dropped row; without it, ``vmap`` turns the stopping test
      into a select over the whole basis at every product, which costs
      several passes over it. Results are the same either way.

  Returns:
    ``KrylovResult``, in the working dtype ``promote_types(start.dtype,
    float32)``.

  Raises:
    ValueError: if ``start`` is not 1-D or 2-D or is concretely non-finite,
      if ``max_iters``, ``k`` or ``num_certified`` is out of range, if
      ``which`` is unknown or ``tol`` is not positive (each message names
      the argument), or if ``matvec`` does not map ``(n,)`` to ``(n,)``.

  Examples:
    The top eigenvalue of ``diag(10, 5, 4, ..., 1)`` to a relative
    residual of ``1e-4``, in fewer than ``n`` products:

    >>> import jax.numpy as jnp, sam_eos.krylov as krylov
    >>> d = jnp.array([10.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0])
    >>> out = krylov.eigenpairs(lambda x: d * x, jnp.ones(8), 8, tol=1e-4)
    >>> round(float(out.values[0]), 3), int(out.num_iters) < 8
    (10.0, True)
    >>> bool(out.residuals[0] <= 1e-4 * out.values[0])
    True

  References:
    Parlett 1998, Ch. 11 and 13; Stewart 2001; Wu & Simon 2000.
  """
  spec, state = begin(
      matvec,
      start,
      max_iters,
      k=k,
      tol=tol,
      which=which,
      num_certified=num_certified,
      axis_name=axis_name,
  )
  state = jax.lax.while_loop(
      lambda s: _any(running(s), axis_name),
      lambda s: _product_step(spec, matvec, s),
      state,
  )
  return finish(spec, state)


class Tracked(NamedTuple):
  """One tracking measurement of the top eigenvalue (see ``track_top``).

  Attributes:
    vectors: ``(b, n)`` the top ``b`` Ritz vectors, the next warm start.
    sharpness: the top Ritz value.
    lambda_min: the bottom Ritz value (an upper bound on the smallest
      eigenvalue, not certified).
    lanczos_iters: products used, as a float in the working dtype.
    residual: the top pair's relative residual ``||A y - theta y|| / |theta|``.
    values: ``(b,)`` the top ``b`` Ritz values, descending (``values[0]`` is
      ``sharpness``).
  """

  vectors: jax.Array
  sharpness: jax.Array
  lambda_min: jax.Array
  lanczos_iters: jax.Array
  residual: jax.Array
  values: jax.Array


def tracked(result: KrylovResult, dtype: Any) -> Tracked:
  """The ``Tracked`` of a solve warm-started from a block of ``dtype``."""
  top = result.values[0]
  return Tracked(
      vectors=result.vectors.astype(dtype),
      sharpness=top,
      lambda_min=result.bottom_values[0],
      lanczos_iters=result.num_iters.astype(top.dtype),
      residual=result.residuals[0] / jnp.abs(top),
      values=result.values,
  )


def track_begin(
    matvec: Matvec,
    vectors: jax.Array,
    max_iters: int,
    tol: float | jax.Array | None,
    axis_name: AxisName = None,
    num_certified: int = 1,
) -> tuple[Spec, KrylovState]:
  """``begin`` of the tracking solve (``track_top``'s settings)."""
  return begin(
      matvec,
      vectors,
      max_iters,
      k=vectors.shape[0],
      tol=tol,
      num_certified=num_certified,
      axis_name=axis_name,
  )


def track_top(
    matvec: Matvec,
    vectors: jax.Array,
    max_iters: int,
    tol: float | jax.Array | None,
    axis_name: AxisName = None,
    num_certified: int = 1,
) -> Tracked:
  """The tracking step shared by ``train`` and ``SharpnessTracker``.

  ``eigenpairs`` warm-started from the carried block ``vectors (b, n)``,
  returning ``b`` pairs and certifying the top ``num_certified`` ones. Its
  staged form is ``track_begin``, ``advance`` while ``running``, then
  ``tracked(finish(...))``: the same result.

  Args:
    matvec: ``x -> A x`` on ``(n,)`` arrays.
    vectors: ``(b, n)`` carried Ritz vectors (any non-zero rows).
    max_iters: the cap on products, ``b <= max_iters <= n``.
    tol: relative residual bound of the certified pairs, or None
      (``max_iters``).
    axis_name: the ``vmap`` axes it runs under, or None (see
      ``eigenpairs``).
    num_certified: how many top pairs must meet ``tol``, ``<= b``.

  Returns:
    ``Tracked``, the new block in the dtype of ``vectors``.
  """
  result = eigenpairs(
      matvec,
      vectors,
      max_iters,
      k=vectors.shape[0],
      tol=tol,
      num_certified=num_certified,
      axis_name=axis_name,
  )
  return tracked(result, vectors.dtype)
