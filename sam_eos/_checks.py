"""Argument validation shared by the public API.

Checks apply only to concrete (non-traced) values, so every public function
stays jit- and vmap-able: a traced hyperparameter is accepted as is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> np.ndarray | None:
  """Returns ``value`` as a NumPy array, or None when it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless every concrete entry of ``value`` is > 0."""
  arr = concrete_value(value)
  if arr is not None and not np.all(arr > 0):
    raise ValueError(f"`{name}` must be positive (> 0), got {value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
  """Raises ValueError unless every concrete entry of ``value`` is >= 0."""
  arr = concrete_value(value)
  if arr is not None and not np.all(arr >= 0):
    raise ValueError(f"`{name}` must be non-negative (>= 0), got {value!r}.")


def check_nonnegative_scalar(name: str, value: Any, *, what: str = "") -> None:
  """Raises ValueError unless ``value`` is a real scalar, >= 0 when concrete.

  Accepts Python ints and floats, NumPy and JAX 0-d real arrays, and traced
  0-d arrays (checked for shape and dtype only). Rejects None, strings,
  booleans, complex numbers, non-scalar arrays, NaN and negative values.

  Args:
    name: argument name used in the message.
    value: the value to check.
    what: extra words appended to the message (e.g. what else is allowed).
  """
  message = f"`{name}` must be a non-negative real scalar{what}, got {value!r}."
  if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
    raise ValueError(message)
  try:
    shape = np.shape(value)
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
  except (TypeError, ValueError) as err:
    raise ValueError(message) from err
  if not (
      jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
  ):
    raise ValueError(message)
  if shape != ():
    raise ValueError(
        f"`{name}` must be a scalar (0-d), got shape {shape}; "
        "to sweep over values, jax.vmap over a scalar instead."
    )
  arr = concrete_value(value)
  if arr is not None and not arr >= 0:
    raise ValueError(message)


def check_momentum(value: Any) -> None:
  """Raises ValueError unless the heavy-ball momentum lies in [0, 1)."""
  arr = concrete_value(value)
  if arr is not None and not np.all((arr >= 0) & (arr < 1)):
    raise ValueError(f"`momentum` must lie in [0, 1), got {value!r}.")


def check_int(name: str, value: Any, minimum: int) -> int:
  """Returns ``value`` as a Python int, raising ValueError if < ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(
        f"`{name}` must be an integer >= {minimum}, got {value!r}."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value}.")
  return int(value)


def check_same_structure(
    name_a: str, tree_a: Any, name_b: str, tree_b: Any, *, shapes: bool = True
) -> None:
  """Raises ValueError unless two pytrees have equal structure (and shapes).

  Args:
    name_a: name of the reference argument.
    tree_a: the reference pytree.
    name_b: name of the checked argument (named in the message).
    tree_b: the checked pytree.
    shapes: also require equal leaf shapes.
  """
  struct_a = jax.tree.structure(tree_a)
  struct_b = jax.tree.structure(tree_b)
  if struct_a != struct_b:
    raise ValueError(
        f"`{name_b}` must have the same pytree structure as `{name_a}`: "
        f"got {struct_b} vs {struct_a}."
    )
  if not shapes:
    return
  shapes_a = [np.shape(x) for x in jax.tree.leaves(tree_a)]
  shapes_b = [np.shape(x) for x in jax.tree.leaves(tree_b)]
  if shapes_a != shapes_b:
    raise ValueError(
        f"`{name_b}` must have the same leaf shapes as `{name_a}`: "
        f"got {shapes_b} vs {shapes_a}."
    )
