"""Peer sharpness estimators, re-implemented or wrapped for side-by-side timing.

Each estimator takes the problem (``loss_fn``, ``params``, ``batch``, or a
PyTorch copy of them), a start and one accuracy setting, and gives the top
eigenvalue with the work it took (Hessian-vector products or gradients);
the jitted ones are returned as functions for the caller to compile once.

* ``authors_power_iteration``: the measurement of Long & Bartlett's released
  code (github.com/google-deepmind/sam_edge, ``hessian_norm.py``,
  ``CurvatureEstimator.curvature_and_direction``), re-implemented from reading
  it: power iteration on central finite-difference HVPs (step 1e-3, divided
  by ``2 eps + 1e-5``), host-side Python loop stopping when the norm changes
  by at most ``tol = 1e-3`` relatively (or is below ``tol``), at most 100
  iterations, a fresh random unit start, and a new ``jax.jit`` of the
  iteration (closing over params and data) at every check, which JAX
  re-traces and XLA re-compiles (the closed-over arrays are embedded in the
  program as constants, so a check at new parameters never hits a cache).
* ``cohen_eigsh``: Cohen et al.'s protocol (github.com/locuslab/
  edge-of-stability, ``src/utilities.py``, ``lanczos``): SciPy's ARPACK
  ``eigsh`` on a ``LinearOperator`` whose matvec moves the vector to the
  device, computes an exact HVP (re-differentiating the loss each time, as
  their ``compute_hvp`` does) and brings it back. Here the HVP is one jitted
  JAX function compiled once; ``which='LA'``, ``k=1``.
* ``lobpcg_fn``: ``jax.experimental.sparse.linalg.lobpcg_standard`` on a
  linearized HVP (one ``jax.linearize`` per call, vmapped over the block).
* ``matfree_fn``: matfree's ``eig.eigh_partial(decomp.tridiag_sym(m))``
  (full reorthogonalization) on the same linearized HVP.
* ``pyhessian_power_iteration``: PyHessian's ``hessian(...).eigenvalues()``
  (github.com/amirgholami/PyHessian; the PyPI package when installed, else
  ``_pyhessian_reimplementation``), on a PyTorch copy of the same MLP and
  data, double-backward HVPs, ``maxIter=100``, ``tol=1e-3``.

Every estimator accepts a start vector (the authors' and PyHessian's random
starts are replaced by it on request), so that a comparison gives every
method the same start. No code was copied from these projects; they are
cited for the protocols.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import sam_eos as se
from benchmarks import _common

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]
# The authors' constants (hessian_norm.py, more_tree_utils.py).
AUTHORS_FD_STEP = 1e-3
AUTHORS_TOL = 1e-3
AUTHORS_MAX_ITERS = 100
AUTHORS_NORMALIZING_EPS = 1e-5


# ------------------------------------------------------- authors' protocol --


def _tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


@jax.jit
def _random_direction(key: jax.Array, params: PyTree) -> PyTree:
  """A standard normal pytree scaled to unit norm (plus their 1e-5 guard)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  leaves = [
      jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)
  ]
  norm = _tree_norm(leaves)
  return jax.tree.unflatten(
      treedef, [x / (norm + AUTHORS_NORMALIZING_EPS) for x in leaves]
  )


class AuthorsEstimate(NamedTuple):
  """Output of ``authors_power_iteration``.

  Attributes:
    value: ``|v_t . p_t|`` = the last product's norm, their ``||H||_op``.
    iterations: power iterations run (two gradients each).
    vector: the last unit iterate ``v_t`` (a pytree), their principal
      direction.
  """

  value: float
  iterations: int
  vector: PyTree


def authors_power_iteration(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    key: jax.Array,
    *,
    tol: float = AUTHORS_TOL,
    max_iters: int = AUTHORS_MAX_ITERS,
    start: PyTree | None = None,
) -> AuthorsEstimate:
  """The authors' check: host loop, fresh jit, finite-difference HVPs.

  ``start`` (a pytree like ``params``) replaces their random start drawn
  from ``key``, so that every method of a comparison starts from the same
  vector; it is scaled to unit norm as theirs is.
  """
  grad = jax.grad(loss_fn)
  eps = AUTHORS_FD_STEP

  def iteration(old_v: PyTree) -> tuple[PyTree, PyTree, jax.Array]:
    plus = jax.tree.map(lambda p, v: p + eps * v, params, old_v)
    minus = jax.tree.map(lambda p, v: p - eps * v, params, old_v)
    product = jax.tree.map(
        lambda a, b: (a - b) / (2.0 * eps + AUTHORS_NORMALIZING_EPS),
        grad(plus, batch),
        grad(minus, batch),
    )
    norm = _tree_norm(product)
    return jax.tree.map(lambda x: x / norm, product), product, norm

  # A new jit object closing over (params, batch) at every check, exactly as
  # their `curvature_and_direction_with_start` defines `@jit def iteration`.
  step = jax.jit(iteration)
  if start is None:
    v = _random_direction(key, params)
  else:
    norm = _tree_norm(start)
    v = jax.tree.map(lambda x: x / (norm + AUTHORS_NORMALIZING_EPS), start)
  last_norm, current_norm, t = None, 1.0, 0
  while (
      last_norm is None
      or (
          abs(current_norm - last_norm) > current_norm * tol
          and abs(current_norm) > tol
      )
  ) and t < max_iters:
    last_norm = current_norm
    v, product, current_norm = step(v)
    t += 1
  value = sum(
      jnp.sum(a * b)
      for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(product))
  )
  return AuthorsEstimate(value=abs(float(value)), iterations=t, vector=v)


# ------------------------------------------------------------- Cohen eigsh --


def flat_hvp_fn(loss_fn: LossFn) -> Callable[..., jax.Array]:
  """Jitted ``(params, batch, flat v) -> flat H v`` by ``se.hvp``."""

  @jax.jit
  def fn(params: PyTree, batch: Any, vector: jax.Array) -> jax.Array:
    _, unravel = ravel_pytree(params)
    return ravel_pytree(se.hvp(loss_fn, params, batch, unravel(vector)))[0]

  return fn


def cohen_eigsh(
    hvp: Callable[..., jax.Array],
    params: PyTree,
    batch: Any,
    v0: np.ndarray | None,
    *,
    tol: float = 0.0,
    ncv: int | None = None,
) -> tuple[float, int]:
  """ARPACK ``eigsh(k=1, which='LA')`` with a host round trip per product.

  Args:
    hvp: from ``flat_hvp_fn`` (compiled once, outside the timing).
    params, batch: the problem.
    v0: start vector (None: ARPACK's own random start).
    tol: ARPACK's relative accuracy (0 = machine precision, the default that
      Cohen et al. use).
    ncv: Lanczos vectors per restart cycle (None: SciPy's default, 20 for
      k = 1).

  Returns:
    ``(top eigenvalue, HVPs)``, including the product SciPy makes to infer
    the operator's dtype (their LinearOperator gives none).
  """
  from scipy.sparse.linalg import LinearOperator, eigsh  # pylint: disable=g-import-not-at-top

  n = ravel_pytree(params)[0].size
  count = [0]

  def matvec(v: np.ndarray) -> np.ndarray:
    count[0] += 1
    return np.asarray(hvp(params, batch, jnp.asarray(v, jnp.float32)))

  operator = LinearOperator((n, n), matvec=matvec)
  values = eigsh(
      operator,
      k=1,
      which="LA",
      tol=tol,
      v0=v0,
      ncv=ncv,
      return_eigenvectors=False,
  )
  return float(values[-1]), count[0]


# ------------------------------------------------------ lobpcg and matfree --


def _flat_linearized(
    loss_fn: LossFn, params: PyTree, batch: Any
) -> Callable[[jax.Array], jax.Array]:
  """``flat v -> flat H v`` linearized once at ``params``."""
  _, unravel = ravel_pytree(params)
  matvec = se.hessian_matvec(loss_fn, params, batch)
  return lambda v: ravel_pytree(matvec(unravel(v)))[0]


def lobpcg_fn(
    loss_fn: LossFn, num_iters: int, tol: float | None
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Jitted ``(params, batch, x0 (n, 1)) -> (top eigenvalue, iterations)``."""
  from jax.experimental.sparse.linalg import lobpcg_standard  # pylint: disable=g-import-not-at-top

  @jax.jit
  def fn(params: PyTree, batch: Any, x0: jax.Array):
    matvec = _flat_linearized(loss_fn, params, batch)
    block = jax.vmap(matvec, in_axes=1, out_axes=1)
    theta, _, iters = lobpcg_standard(block, x0, m=num_iters, tol=tol)
    return theta[0], iters

  return fn


def matfree_fn(loss_fn: LossFn, num_matvecs: int) -> Callable[..., jax.Array]:
  """Jitted ``(params, batch, v0) -> top Ritz value`` by matfree's Lanczos."""
  from matfree import decomp, eig  # pylint: disable=g-import-not-at-top

  eigh = eig.eigh_partial(decomp.tridiag_sym(num_matvecs))

  @jax.jit
  def fn(params: PyTree, batch: Any, v0: jax.Array) -> jax.Array:
    values, _ = eigh(_flat_linearized(loss_fn, params, batch), v0)
    return jnp.max(values)

  return fn


# ---------------------------------------------------------------- PyTorch --


def torch_mlp(params: dict[str, PyTree]) -> Any:
  """A ``torch.nn.Sequential`` ReLU MLP holding a copy of ``params``."""
  import torch  # pylint: disable=g-import-not-at-top

  layers = []
  num_layers = len(params)
  for i in range(num_layers):
    w = np.asarray(params[f"layer_{i}"]["w"], np.float32)
    b = np.asarray(params[f"layer_{i}"]["b"], np.float32)
    linear = torch.nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(w.T.copy()))
      linear.bias.copy_(torch.from_numpy(b.copy()))
    layers.append(linear)
    if i < num_layers - 1:
      layers.append(torch.nn.ReLU())
  return torch.nn.Sequential(*layers)


def torch_batch(batch: Any) -> tuple[Any, Any]:
  """``(x, y)`` as float32 torch tensors."""
  import torch  # pylint: disable=g-import-not-at-top

  return tuple(
      torch.from_numpy(np.asarray(a, np.float32).copy()) for a in batch
  )


def uses_pyhessian_package() -> bool:
  """Whether PyHessian from PyPI is importable (else the re-implementation)."""
  return _common.installed("pyhessian")


@contextlib.contextmanager
def _counting_pyhessian_products() -> Iterator[list[int]]:
  """Counts calls of PyHessian's ``hessian_vector_product``."""
  module = importlib.import_module("pyhessian.hessian")
  original = module.hessian_vector_product
  count = [0]

  def counted(*args, **kwargs):
    count[0] += 1
    return original(*args, **kwargs)

  module.hessian_vector_product = counted
  try:
    yield count
  finally:
    module.hessian_vector_product = original


def torch_vector(flat: Any, params: dict[str, PyTree]) -> list[Any]:
  """A flat JAX vector over ``params`` as tensors in ``torch_mlp`` order.

  ``ravel_pytree`` orders ``{"layer_i": {"b", "w"}}`` as ``b, w`` per layer;
  ``torch.nn.Linear`` holds ``weight = w^T`` then ``bias``.
  """
  import torch  # pylint: disable=g-import-not-at-top

  _, unravel = ravel_pytree(params)
  tree = unravel(jnp.asarray(flat, jnp.float32))
  out = []
  for i in range(len(tree)):
    w = np.asarray(tree[f"layer_{i}"]["w"], np.float32)
    b = np.asarray(tree[f"layer_{i}"]["b"], np.float32)
    out += [torch.from_numpy(w.T.copy()), torch.from_numpy(b.copy())]
  return out


class _TorchWithStart:
  """Stands in for ``torch`` in ``pyhessian.hessian``: ``randn`` returns the
  given start vector's pieces in order (PyHessian draws its start with one
  ``torch.randn(p.size())`` per parameter tensor); all else is ``torch``."""

  def __init__(self, pieces: list[Any]):
    import torch  # pylint: disable=g-import-not-at-top

    self._torch = torch
    self._pieces = list(pieces)

  def randn(self, *size, **kwargs):
    if self._pieces:
      piece = self._pieces.pop(0)
      if tuple(piece.shape) != tuple(self._torch.Size(*size)):
        raise ValueError("start vector pieces do not match the parameters")
      return piece.clone()
    return self._torch.randn(*size, **kwargs)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._torch, name)


@contextlib.contextmanager
def _pyhessian_start(pieces: list[Any] | None) -> Iterator[None]:
  """PyHessian's random start replaced by ``pieces`` (None: unchanged)."""
  if pieces is None:
    yield
    return
  module = importlib.import_module("pyhessian.hessian")
  original = module.torch
  module.torch = _TorchWithStart(pieces)
  try:
    yield
  finally:
    module.torch = original


def _pyhessian_reimplementation(
    model: Any,
    data: tuple[Any, Any],
    *,
    tol: float,
    max_iters: int,
    start: list[Any] | None = None,
) -> tuple[float, int]:
  """PyHessian's ``eigenvalues(top_n=1)`` re-implemented (when not installed).

  One backward pass with ``create_graph=True``, then power iteration with
  double-backward HVPs, the Rayleigh quotient ``v^T H v`` as the estimate,
  stopping when it changes by less than ``tol`` relatively.
  """
  import torch  # pylint: disable=g-import-not-at-top

  x, y = data
  params = [p for p in model.parameters() if p.requires_grad]
  loss = torch.nn.functional.mse_loss(model(x), y)
  grads = torch.autograd.grad(loss, params, create_graph=True)

  def normalize(vs):
    norm = float(torch.sqrt(sum(torch.sum(v * v) for v in vs)))
    return [v / (norm + 1e-6) for v in vs]

  v = normalize(
      [torch.randn_like(p) for p in params] if start is None else start
  )
  eigenvalue = None
  for it in range(1, max_iters + 1):
    hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
    estimate = float(sum(torch.sum(a * b) for a, b in zip(hv, v)))
    v = normalize(list(hv))
    if eigenvalue is not None and (
        abs(eigenvalue - estimate) / (abs(eigenvalue) + 1e-6) < tol
    ):
      break
    eigenvalue = estimate
  return eigenvalue, it


def pyhessian_power_iteration(
    model: Any,
    data: tuple[Any, Any],
    seed: int,
    *,
    tol: float = 1e-3,
    max_iters: int = 100,
    start: list[Any] | None = None,
) -> tuple[float, int]:
  """PyHessian's top eigenvalue on a PyTorch model; ``(value, HVPs)``.

  The ``hessian`` object is built inside (its constructor runs the forward
  and ``create_graph`` backward pass), as a check during training would.
  ``start`` (tensors in ``model.parameters()`` order, see ``torch_vector``)
  replaces its random start.
  """
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  if not uses_pyhessian_package():
    return _pyhessian_reimplementation(
        model, data, tol=tol, max_iters=max_iters, start=start
    )
  from pyhessian import hessian  # pylint: disable=g-import-not-at-top

  with _counting_pyhessian_products() as count, _pyhessian_start(start):
    computer = hessian(model, torch.nn.MSELoss(), data=data, cuda=False)
    values, _ = computer.eigenvalues(maxIter=max_iters, tol=tol, top_n=1)
  model.zero_grad(set_to_none=True)
  return float(values[0]), count[0]


def torch_hvp_seconds(
    model: Any, data: tuple[Any, Any], repeats: int
) -> tuple[float, float]:
  """Median seconds of one PyTorch gradient and one double-backward HVP."""
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  x, y = data
  params = list(model.parameters())
  v = [torch.randn_like(p) for p in params]

  def gradient():
    loss = torch.nn.functional.mse_loss(model(x), y)
    return torch.autograd.grad(loss, params)

  def hvp():
    loss = torch.nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=v)

  out = []
  for fn in (gradient, hvp):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    out.append(statistics.median(times))
  return out[0], out[1]
