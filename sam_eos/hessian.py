"""Exact Hessian-vector products of a loss, by forward-over-reverse AD.

For ``L(w) = loss_fn(w, batch)`` and a direction ``v`` (a pytree like ``w``)
the Hessian-vector product is the directional derivative of the gradient,

  ``H(w) v = d/dt grad L(w + t v) |_{t=0}``,

computed exactly (no finite differences) as a forward-mode JVP of the
reverse-mode gradient (Pearlmutter 1994). It costs a small constant times one
gradient and never forms ``H``. ``hessian_matvec`` linearizes the gradient
once at ``w`` so that many products at the same point (Lanczos, power
iteration) reuse the forward pass; ``linearize_gradient`` also returns the
loss and gradient of that linearization, for a caller that needs them too
(the training loop), and ``flat_matvec`` turns such an operator into one on
flat vectors, the form Lanczos takes. ``finite_difference_hvp`` (and
``finite_difference_matvec``) is the central-difference approximation used by
the authors' power iteration, kept here beside the exact product for
comparisons.

References:
  Pearlmutter, "Fast Exact Multiplication by the Hessian", Neural
  Computation 6(1), 1994.
  JAX documentation, "The Autodiff Cookbook", section on Hessian-vector
  products (forward-over-reverse).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_eos import _checks
from sam_eos._types import ArrayLike, LossFn, PyTree


def gradient_fn(
    loss_fn: LossFn, batch: Any, *, has_aux: bool = False
) -> Callable[[PyTree], PyTree]:
  """The map ``params -> grad L(params)`` on a fixed ``batch``, dropping aux.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    batch: passed unchanged to ``loss_fn``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.

  Returns:
    ``grad_fn(params) -> grads``, a pytree like ``params``.
  """
  grad = jax.grad(loss_fn, has_aux=has_aux)

  def fn(params: PyTree) -> PyTree:
    out = grad(params, batch)
    return out[0] if has_aux else out

  return fn


def _as_tangent(params: PyTree, vector: PyTree) -> PyTree:
  """Checks ``vector`` against ``params`` and casts it to their dtypes."""
  _checks.check_same_structure("params", params, "vector", vector)
  return jax.tree.map(
      lambda p, v: jnp.asarray(v, jnp.result_type(p)), params, vector
  )


def hvp(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    vector: PyTree,
    *,
    has_aux: bool = False,
) -> PyTree:
  """Hessian-vector product ``H(w) v`` by forward-over-reverse AD.

  Computes ``H(w) v = d/dt grad L(w + t v)|_{t=0}`` as ``jax.jvp`` of
  ``jax.grad``: exact up to rounding, about the cost of two to three
  gradients, memory linear in the number of parameters.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    vector: direction ``v``, a pytree with the structure and leaf shapes of
      ``params`` (cast to their dtypes).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

  Returns:
    ``H(w) v``, a pytree like ``params``.

  Raises:
    ValueError: if ``vector`` and ``params`` differ in structure or shapes.

  Examples:
    On ``L(w) = 0.5 w^T A w`` the product is ``A v``, as the dense Hessian
    says:

    >>> import jax, jax.numpy as jnp, sam_eos as se
    >>> a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    >>> loss = lambda w, a: 0.5 * w @ a @ w
    >>> w, v = jnp.array([0.5, -1.0]), jnp.array([1.0, 0.0])
    >>> se.hvp(loss, w, a, v).tolist()
    [2.0, 1.0]
    >>> (jax.hessian(loss)(w, a) @ v).tolist()
    [2.0, 1.0]

  References:
    Pearlmutter 1994; JAX Autodiff Cookbook (forward-over-reverse).
  """
  tangent = _as_tangent(params, vector)
  grad = gradient_fn(loss_fn, batch, has_aux=has_aux)
  return jax.jvp(grad, (params,), (tangent,))[1]


def linearize_gradient(
    loss_fn: LossFn, params: PyTree, batch: Any, *, has_aux: bool = False
) -> tuple[jax.Array, PyTree, Callable[[PyTree], PyTree]]:
  """Loss, gradient and the map ``v -> H(w) v``, from one linearization.

  ``jax.linearize`` of ``w -> (L(w), grad L(w))`` evaluates the loss and
  gradient at ``w`` (its primal output) and keeps the linear part of that
  computation, ``v -> (grad L(w) . v, H(w) v)``, whose second half is the
  Hessian-vector product (Pearlmutter's forward-over-reverse). A step that
  needs the gradient and Hessian products at one point (the tracked steps of
  the compiled training loop) so pays for a single gradient evaluation.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``, the linearization point.
    batch: passed unchanged to ``loss_fn``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.

  Returns:
    ``(loss, grads, matvec)``: the scalar ``L(w)``, ``grad L(w)`` (a pytree
    like ``params``) and ``matvec(vector) -> H(w) vector`` on pytrees like
    ``params``, which raises ValueError if ``vector`` and ``params`` differ
    in structure or shapes.

  Examples:
    On ``L(w) = 0.5 w^T A w``: ``L = 1.25``, ``g = A w``, ``H v = A v``:

    >>> import jax.numpy as jnp
    >>> from sam_eos.hessian import linearize_gradient
    >>> a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    >>> loss, g, matvec = linearize_gradient(lambda w, a: 0.5 * w @ a @ w,
    ...                                      jnp.array([0.5, -1.0]), a)
    >>> float(loss), g.tolist(), matvec(jnp.array([1.0, 0.0])).tolist()
    (1.25, [0.0, -2.5], [2.0, 1.0])

  References:
    Pearlmutter 1994; JAX documentation of ``jax.linearize``.
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def loss_and_grad(w: PyTree) -> tuple[jax.Array, PyTree]:
    value, grads = value_and_grad(w, batch)
    return (value[0] if has_aux else value), grads

  (loss, grads), linear = jax.linearize(loss_and_grad, params)

  def matvec(vector: PyTree) -> PyTree:
    return linear(_as_tangent(params, vector))[1]

  return loss, grads, matvec


def hessian_matvec(
    loss_fn: LossFn, params: PyTree, batch: Any, *, has_aux: bool = False
) -> Callable[[PyTree], PyTree]:
  """The map ``v -> H(w) v`` at a fixed point, linearized once.

  ``jax.linearize`` evaluates the gradient at ``w`` once and keeps the
  linear (tangent) part of its computation, so each later product costs only
  the tangent pass: the right operator for iterative eigensolvers that apply
  ``H(w)`` many times at one ``w``. It is the operator of
  ``linearize_gradient``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``, the linearization point.
    batch: passed unchanged to ``loss_fn``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

  Returns:
    ``matvec(vector) -> H(w) vector``, pytrees like ``params``. It raises
    ValueError if ``vector`` and ``params`` differ in structure or shapes.

  Examples:
    Products at one point agree with ``hvp`` and with the dense Hessian:

    >>> import jax, jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
    >>> w, x = jnp.array([0.3, -0.2]), jnp.array([[1.0, 2.0], [0.5, -1.0]])
    >>> matvec = se.hessian_matvec(loss, w, x)
    >>> dense = jax.hessian(loss)(w, x)
    >>> v = jnp.array([1.0, 2.0])
    >>> bool(jnp.allclose(matvec(v), dense @ v, atol=1e-5))
    True
    >>> bool(jnp.allclose(matvec(v), se.hvp(loss, w, x, v), atol=1e-5))
    True

  References:
    Pearlmutter 1994; JAX documentation of ``jax.linearize``.
  """
  return linearize_gradient(loss_fn, params, batch, has_aux=has_aux)[2]


def flat_matvec(
    matvec: Callable[[PyTree], PyTree], params: PyTree
) -> Callable[[jax.Array], jax.Array]:
  """An operator on pytrees like ``params`` as one on flat vectors.

  ``v -> ravel(matvec(unravel(v)))`` in ``jax.flatten_util.ravel_pytree``
  order, the form ``lanczos`` takes. The flat ``v`` may be wider than the
  parameters (the eigensolvers' working dtype, e.g. float32 for bfloat16
  parameters): it is cast to their flat dtype before the product, and the
  product is returned in that dtype.

  Args:
    matvec: a linear map on pytrees like ``params`` (e.g. from
      ``hessian_matvec``).
    params: the parameter pytree that fixes the structure, shapes and dtypes.

  Returns:
    ``flat(v) -> flat(matvec(v))`` on vectors of shape ``(n,)``, ``n`` the
    number of parameters.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sam_eos.hessian import flat_matvec
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    >>> double = lambda tree: {k: 2 * x for k, x in tree.items()}
    >>> flat_matvec(double, params)(jnp.array([1.0, 2.0, 3.0])).tolist()
    [2.0, 4.0, 6.0]
  """
  flat, unravel = ravel_pytree(params)
  return lambda v: ravel_pytree(matvec(unravel(v.astype(flat.dtype))))[0]


def finite_difference_matvec(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    fd_eps: ArrayLike = 1e-3,
    has_aux: bool = False,
) -> Callable[[PyTree], PyTree]:
  """The map ``v -> (g(w + eps v) - g(w - eps v)) / (2 eps)``, ``g = grad L``.

  The central-difference Hessian-vector product of the authors' power
  iteration (``hessian_norm.py`` in google-deepmind/sam_edge): two gradients
  per product, error ``O(eps^2 ||v||^2)`` (the third derivatives cancel) plus
  rounding ``~ eps_machine ||g|| / eps``. Use ``hvp`` or ``hessian_matvec``
  for the exact product.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    fd_eps: step ``eps > 0`` along ``v`` (not normalized: pass unit ``v``
      for the paper's protocol).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

  Returns:
    ``matvec(vector)``, a pytree like ``params`` (in their dtypes). The
    vector may be wider than ``params`` (e.g. float32 for bfloat16
    parameters): the points ``w +- eps v`` are formed in the wider dtype and
    rounded once. It raises ValueError if ``vector`` and ``params`` differ in
    structure or shapes.

  Raises:
    ValueError: if a concrete ``fd_eps`` is not positive.

  References:
    Long & Bartlett 2023 and github.com/google-deepmind/sam_edge
    (``hessian_norm.py``).
  """
  _checks.check_positive("fd_eps", fd_eps)
  grad = gradient_fn(loss_fn, batch, has_aux=has_aux)

  def matvec(vector: PyTree) -> PyTree:
    _checks.check_same_structure("params", params, "vector", vector)

    def shifted(sign: float) -> PyTree:
      return jax.tree.map(
          lambda p, v: (p + sign * fd_eps * v).astype(jnp.result_type(p)),
          params,
          vector,
      )

    return jax.tree.map(
        lambda a, b, p: ((a - b) / (2 * fd_eps)).astype(jnp.result_type(p)),
        grad(shifted(1.0)),
        grad(shifted(-1.0)),
        params,
    )

  return matvec


def finite_difference_hvp(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    vector: PyTree,
    *,
    fd_eps: ArrayLike = 1e-3,
    has_aux: bool = False,
) -> PyTree:
  """Central-difference approximation of ``H(w) v`` (the paper's product).

  ``(grad L(w + eps v) - grad L(w - eps v)) / (2 eps)``; see
  ``finite_difference_matvec``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` if
      ``has_aux``).
    params: parameter pytree ``w``.
    batch: passed unchanged to ``loss_fn``.
    vector: direction ``v``, a pytree like ``params``.
    fd_eps: step ``eps > 0``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is ignored.

  Returns:
    The approximation of ``H(w) v``, a pytree like ``params``.

  Raises:
    ValueError: if ``vector`` and ``params`` differ in structure or shapes,
      or a concrete ``fd_eps`` is not positive.

  Examples:
    On a quadratic the central difference is exact up to rounding:

    >>> import jax.numpy as jnp
    >>> from sam_eos.hessian import finite_difference_hvp
    >>> a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    >>> loss = lambda w, a: 0.5 * w @ a @ w
    >>> out = finite_difference_hvp(loss, jnp.zeros(2), a, jnp.array([1.0, 0.0]))
    >>> [round(float(x), 3) for x in out]
    [2.0, 1.0]

  References:
    Long & Bartlett 2023 and github.com/google-deepmind/sam_edge
    (``hessian_norm.py``).
  """
  return finite_difference_matvec(
      loss_fn, params, batch, fd_eps=fd_eps, has_aux=has_aux
  )(vector)
