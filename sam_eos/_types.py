"""Type aliases shared by the library's modules (annotations only).

``PyTree`` stands for any JAX pytree (nested tuples, lists, dicts,
NamedTuples and registered nodes with array leaves); JAX has no precise
static type for one, so it is ``Any``, named for the reader. ``ArrayLike`` is
``jax.typing.ArrayLike``: a JAX or NumPy array, a NumPy scalar, or a Python
bool, int, float or complex. ``LossFn`` is a loss ``loss_fn(params, batch)``
returning a scalar, or ``(scalar, aux)`` where a ``has_aux`` flag says so.
"""

from __future__ import annotations

from typing import Any, Callable

from jax.typing import ArrayLike

PyTree = Any
LossFn = Callable[..., Any]

__all__ = ["ArrayLike", "LossFn", "PyTree"]
