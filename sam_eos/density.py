"""The rest of the spectrum: Hessian trace and spectral density.

``hessian_trace`` estimates ``tr H`` from Hessian-vector products:
Hutchinson's estimator ``mean_i z_i^T H z_i`` over Rademacher ``z_i``, or
Hutch++ (Meyer et al. 2021), which takes the trace of a low-rank sketch
exactly and applies Hutchinson only to the rest.

``spectral_density`` estimates the eigenvalue density
``phi(t) = (1/n) sum_i delta(t - lambda_i)`` of ``H`` by stochastic Lanczos
quadrature (SLQ): for a unit probe ``v``, ``m`` Lanczos steps from ``v`` give
the nodes ``theta_j`` (Ritz values) and weights ``tau_j = (e_1^T s_j)^2``
(squared first components of the eigenvectors of the tridiagonal ``T``) of
the Gauss quadrature of ``v^T f(H) v = sum_i (v^T u_i)^2 f(lambda_i)``, exact
for polynomials ``f`` of degree ``< 2m``. Averaged over probes with
``E[v v^T] = I / n`` it estimates ``(1/n) tr f(H)``. Smoothing the nodes with
a Gaussian of width ``sigma`` gives a density that integrates to 1.

References:
  Hutchinson, "A stochastic estimator of the trace of the influence matrix
  for Laplacian smoothing splines", 1990.
  Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace
  Estimation", SOSA 2021.
  Lin, Saad & Yang, "Approximating spectral densities of large matrices",
  SIAM Review 58(1), 2016.
  Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017.
  Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization
  via Hessian Eigenvalue Density", ICML 2019.
  Yao et al., PyHessian (github.com/amirgholami/PyHessian), for the same
  quantities in PyTorch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import _checks
from sam_eos._types import ArrayLike, LossFn, PyTree
from sam_eos.hessian import flat_matvec, hessian_matvec
from sam_eos.lanczos import lanczos, working_dtype

_METHODS = ("hutchinson", "hutch++")


def _flat_hessian(
    loss_fn: LossFn, params: PyTree, batch: Any, has_aux: bool
) -> tuple[Callable[[jax.Array], jax.Array], int, jnp.dtype]:
  """The Hessian on flat working-dtype vectors, the size and that dtype."""
  flat, _ = ravel_pytree(params)
  dtype = working_dtype(flat.dtype)
  hess = flat_matvec(
      hessian_matvec(loss_fn, params, batch, has_aux=has_aux), params
  )
  return (lambda v: hess(v).astype(dtype)), flat.size, dtype


def _hutch_plus_plus(
    matvec: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    num_samples: int,
    size: int,
    dtype: jnp.dtype,
) -> jax.Array:
  """Hutch++ with ``num_samples`` products: thirds for sketch, basis, rest."""
  num_sketch = min(num_samples // 3, size)
  num_rest = num_samples - 2 * num_sketch
  batched = jax.vmap(matvec)
  key_s, key_g = jax.random.split(key)
  sketch = jax.random.rademacher(key_s, (num_sketch, size), dtype)
  basis, _ = jnp.linalg.qr(batched(sketch).T)  # (size, num_sketch)
  low_rank = jnp.sum(basis * batched(basis.T).T)
  if num_sketch == size or num_rest == 0:
    return low_rank
  probes = jax.random.rademacher(key_g, (num_rest, size), dtype)
  probes = probes - (probes @ basis) @ basis.T
  rest = jnp.sum(probes * batched(probes)) / num_rest
  return low_rank + rest


def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    num_samples: int,
    key: jax.Array,
    method: str = "hutch++",
    has_aux: bool = False,
) -> jax.Array:
  """Stochastic estimate of ``tr H(w)`` from ``num_samples`` HVPs.

  * ``"hutchinson"``: ``(1/s) sum_i z_i^T H z_i`` over ``s = num_samples``
    Rademacher vectors; unbiased, variance ``2 (||H||_F^2 - sum_i H_ii^2) /
    s``.
  * ``"hutch++"`` (Meyer et al. 2021): ``k = min(s // 3, n)`` Rademacher
    vectors ``S``, ``Q = orth(H S)``, then ``tr(Q^T H Q)`` exactly plus
    Hutchinson with the remaining ``s - 2k`` vectors projected off ``Q``.
    Unbiased, with error ``O(1/s)`` instead of ``O(1/sqrt(s))`` when the
    spectrum decays; exact (up to rounding) once ``s >= 3 n`` (``Q`` spans
    everything). Needs ``s >= 3``.

  The products are vmapped, so memory is ``O(s n)``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w`` (``n`` entries).
    batch: passed unchanged to ``loss_fn``.
    num_samples: number of Hessian-vector products ``s`` (static).
    key: PRNG key of the probe vectors.
    method: ``"hutch++"`` or ``"hutchinson"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    Scalar estimate of the trace (float32 or wider).

  Raises:
    ValueError: for an unknown ``method`` or a ``num_samples`` below 1 (3 for
      Hutch++).

  Examples:
    On ``0.5 w^T A w`` the trace is ``tr A = 6``; Hutch++ with ``s >= 3 n``
    is exact:

    >>> import jax, jax.numpy as jnp, sam_eos as se
    >>> a = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
    >>> loss = lambda w, a: 0.5 * w @ a @ w
    >>> t = se.hessian_trace(loss, jnp.zeros(3), a, num_samples=9,
    ...                      key=jax.random.key(0))
    >>> round(float(t), 4), float(jnp.trace(a))
    (6.0, 6.0)

  References:
    Hutchinson 1990; Meyer et al., "Hutch++", SOSA 2021; Yao et al.,
    PyHessian (Hutchinson trace of neural-network Hessians).
  """
  if method not in _METHODS:
    raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
  minimum = 3 if method == "hutch++" else 1
  num_samples = _checks.check_int("num_samples", num_samples, minimum)
  matvec, size, dtype = _flat_hessian(loss_fn, params, batch, has_aux)
  if method == "hutch++":
    return _hutch_plus_plus(matvec, key, num_samples, size, dtype)
  probes = jax.random.rademacher(key, (num_samples, size), dtype)
  return jnp.sum(probes * jax.vmap(matvec)(probes)) / num_samples


def _gaussian(x: jax.Array, sigma: jax.Array) -> jax.Array:
  return jnp.exp(-0.5 * (x / sigma) ** 2) / (sigma * jnp.sqrt(2 * jnp.pi))


def spectral_density(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    num_iters: int,
    num_samples: int,
    key: jax.Array,
    grid: ArrayLike | None = None,
    num_points: int = 1000,
    sigma: ArrayLike | None = None,
    has_aux: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Gaussian-broadened Hessian eigenvalue density by SLQ.

  For ``s = num_samples`` probes ``v_l = z_l / sqrt(n)`` (``z_l`` Rademacher,
  drawn as ``jax.random.rademacher(key, (s, n))``; ``E[v v^T] = I / n``),
  ``m = num_iters`` Lanczos steps give nodes ``theta_lj`` and weights
  ``tau_lj`` (``sum_j tau_lj = 1``), and

    ``phi(t) = (1/s) sum_l sum_j tau_lj N(t; theta_lj, sigma^2)``,

  an estimate of ``(1/n) sum_i N(t; lambda_i, sigma^2)``, the exact spectrum
  broadened by the same Gaussian. Its moments are exact Gauss quadratures:
  ``int t phi = (1/s) sum_l v_l^T H v_l`` (a Hutchinson estimate of
  ``tr H / n``) for any ``m``, and ``int t^2 phi = (1/s) sum_l v_l^T H^2 v_l
  + sigma^2`` for ``m >= 2``. With ``m = n`` each probe's quadrature is exact
  and only the probe average is random.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w`` (``n`` entries).
    batch: passed unchanged to ``loss_fn``.
    num_iters: Lanczos steps per probe, ``1 <= m <= n``.
    num_samples: number of probes ``s >= 1``.
    key: PRNG key of the probes.
    grid: points ``t`` at which to evaluate ``phi``, a 1-D array; None for
      ``num_points`` evenly spaced points from ``min theta - 8 sigma`` to
      ``max theta + 8 sigma`` (the mass outside is below ``1e-15``, so the
      trapezoid rule integrates ``phi`` to 1 whenever the spacing is below
      about ``sigma``).
    num_points: number of grid points when ``grid`` is None.
    sigma: broadening width ``> 0``; None for 1% of the range of the nodes
      (1% of ``max |theta|`` if they coincide, 1 if all are zero).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(grid, density)``, two 1-D arrays of the grid's length.

  Raises:
    ValueError: for ``num_iters`` outside ``[1, n]``, ``num_samples < 1``,
      ``num_points < 2``, a non-positive concrete ``sigma`` or a ``grid`` that
      is not 1-D.

  Examples:
    On ``0.5 sum_i h_i w_i^2`` with ``h = (1, 2, 3, 4)`` the density's mean
    is the mean eigenvalue 2.5 (every probe gives ``v^T H v = 2.5`` here, as
    ``H`` is diagonal and ``v_i^2 = 1/4``), and it integrates to 1:

    >>> import jax, jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, h: 0.5 * jnp.sum(h * w**2)
    >>> t, phi = se.spectral_density(loss, jnp.zeros(4), jnp.arange(1.0, 5.0),
    ...     num_iters=4, num_samples=2, key=jax.random.key(0), sigma=0.1)
    >>> round(float(jnp.trapezoid(phi, t)), 5)
    1.0
    >>> round(float(jnp.trapezoid(t * phi, t)), 4)
    2.5

  References:
    Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao
    2019; Golub & Meurant, "Matrices, Moments and Quadrature with
    Applications", 2010 (Gauss quadrature from Lanczos).
  """
  num_samples = _checks.check_int("num_samples", num_samples, 1)
  num_points = _checks.check_int("num_points", num_points, 2)
  num_iters = _checks.check_int("num_iters", num_iters, 1)
  if sigma is not None:
    _checks.check_positive("sigma", sigma)
  matvec, size, dtype = _flat_hessian(loss_fn, params, batch, has_aux)
  if num_iters > size:
    raise ValueError(
        f"`num_iters` ({num_iters}) must be <= the number of parameters "
        f"({size})."
    )
  probes = jax.random.rademacher(key, (num_samples, size), dtype)
  probes = probes / jnp.sqrt(jnp.asarray(size, dtype))

  def quadrature(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = lanczos(matvec, v, num_iters)
    tri = (
        jnp.diag(out.alphas)
        + jnp.diag(out.betas[:-1], 1)
        + jnp.diag(out.betas[:-1], -1)
    )
    nodes, vectors = jnp.linalg.eigh(tri)
    return nodes, vectors[0] ** 2

  nodes, weights = jax.vmap(quadrature)(probes)  # (s, m) each
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  if sigma is None:
    spread = jnp.where(hi > lo, hi - lo, jnp.maximum(jnp.abs(hi), jnp.abs(lo)))
    sigma = 0.01 * jnp.where(spread > 0, spread, 1.0)
  sigma = jnp.asarray(sigma, dtype)
  if grid is None:
    grid = jnp.linspace(lo - 8 * sigma, hi + 8 * sigma, num_points, dtype=dtype)
  else:
    grid = jnp.asarray(grid, dtype)
    if grid.ndim != 1:
      raise ValueError(f"`grid` must be 1-D, got shape {grid.shape}.")
  kernel = _gaussian(grid[:, None] - nodes.ravel()[None, :], sigma)
  density = kernel @ weights.ravel() / num_samples
  return grid, density
