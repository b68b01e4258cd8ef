"""A tiny float64 tanh network shared by the tests of minibatch quantities.

``mlp_problem`` draws its parameters and data from NumPy's generator, so a
seed gives the same problem in every test file.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mlp_loss(params: dict[str, jax.Array], batch: Any) -> jax.Array:
  """Mean squared error of ``tanh(x W1 + b1) W2`` on ``batch = (x, y)``."""
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(seed: int = 0, num_examples: int = 8) -> tuple[Any, Any]:
  """``(params, (x, y))``: a 3-4-2 network and ``num_examples`` examples."""
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(3, 4)),
      "b1": 0.1 * rng.normal(size=4),
      "w2": rng.normal(size=(4, 2)),
  }
  data = (
      rng.normal(size=(num_examples, 3)),
      rng.normal(size=(num_examples, 2)),
  )
  return jax.tree.map(jnp.asarray, (params, data))
