"""Data-parallel placement over a device mesh, and exact padding with masks.

sam_eos uses JAX's own SPMD machinery: a ``jax.sharding.Mesh`` with a
``"data"`` axis (and optionally a leading ``"config"`` axis for sweeps), data
placed with ``NamedSharding``, and ``jit`` to partition the compiled loop.
Loss, gradients and Hessian-vector products stay global-batch quantities, so
results equal the single-device ones up to float reduction order.

Across hosts, call ``jax.distributed.initialize()`` first (on every process)
and give every process the same full data arrays; placement then uses
``jax.make_array_from_callback`` so each process supplies its own shards.

References:
  JAX documentation, "Distributed arrays and automatic parallelization" and
  "Multi-process environments".
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_eos._types import PyTree

DATA_AXIS = "data"
CONFIG_AXIS = "config"


def data_mesh(
    num_devices: int | None = None,
    *,
    num_config_shards: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A mesh ``("config", "data")`` over the first ``num_devices`` devices.

  Args:
    num_devices: devices to use (default: all, across processes).
    num_config_shards: size of the ``"config"`` axis that splits a vmapped
      sweep; the ``"data"`` axis gets ``num_devices / num_config_shards``.
    devices: explicit device list (overrides ``num_devices``).

  Returns:
    A ``jax.sharding.Mesh`` with axes ``("config", "data")``.

  Raises:
    ValueError: if ``num_devices`` exceeds the devices available or is not a
      multiple of ``num_config_shards``.

  Examples:
    >>> import sam_eos as se
    >>> se.data_mesh(1).shape
    OrderedDict([('config', 1), ('data', 1)])
  """
  available = list(devices) if devices is not None else jax.devices()
  num = len(available) if num_devices is None else int(num_devices)
  if not 1 <= num <= len(available):
    raise ValueError(
        f"`num_devices` must be in [1, {len(available)}] (the "
        f"devices available), got {num_devices}."
    )
  if num_config_shards < 1 or num % num_config_shards:
    raise ValueError(
        f"`num_config_shards` ({num_config_shards}) must divide "
        f"the number of devices ({num})."
    )
  grid = np.asarray(available[:num], dtype=object).reshape(
      num_config_shards, num // num_config_shards
  )
  return Mesh(grid, (CONFIG_AXIS, DATA_AXIS))


def axis_size(mesh: Mesh, name: str) -> int:
  """Size of mesh axis ``name`` (1 if the mesh has no such axis)."""
  return int(dict(mesh.shape).get(name, 1))


def place(tree: PyTree, sharding: NamedSharding) -> PyTree:
  """Puts every leaf of ``tree`` on ``sharding``, multi-process safe.

  In one process this is ``jax.device_put``; across processes each one
  builds its addressable shards from its own (identical) copy of the array.

  Args:
    tree: pytree of arrays, the same on every process.
    sharding: target sharding.

  Returns:
    The placed pytree of global ``jax.Array``.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if is_key(x):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(
        host.shape, sharding, lambda index: host[index]
    )

  return jax.tree.map(put, tree)


def is_key(x: Any) -> bool:
  """Whether ``x`` is an array of typed PRNG keys."""
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def shard_data(data: PyTree, mesh: Mesh) -> PyTree:
  """Shards the leading (example) axis of every leaf along ``"data"``.

  Args:
    data: pytree of arrays with a shared leading axis ``N``.
    mesh: a mesh with a ``"data"`` axis of size ``D``.

  Returns:
    ``data`` placed with ``PartitionSpec("data")`` (replicated over any
    other mesh axis): each device holds ``N / D`` examples.

  Raises:
    ValueError: if ``D`` does not divide ``N``; pad with
      :func:`pad_to_multiple` and use a :func:`masked_mean` loss.
  """
  size = axis_size(mesh, DATA_AXIS)
  num_examples = jax.tree.leaves(data)[0].shape[0]
  if num_examples % size:
    raise ValueError(
        f"`data` has {num_examples} examples, not a multiple of the {size} "
        f"devices of the mesh's '{DATA_AXIS}' axis. Pad it with "
        "se.pad_to_multiple(data, multiple) and make the loss ignore the "
        "padding with se.masked_mean, or pass a subset whose size divides "
        "(se.train pads minibatch runs itself)."
    )
  return place(data, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def pad_to_multiple(data: PyTree, multiple: int) -> tuple[PyTree, jax.Array]:
  """Pads the example axis to a multiple of ``multiple``; returns the mask.

  Padded examples repeat example 0 (so every input stays valid) and get
  mask 0; a loss built with :func:`masked_mean` ignores them exactly.

  Args:
    data: pytree of arrays with a shared leading axis ``N``.
    multiple: the padded size is the smallest multiple of this ``>= N``.

  Returns:
    ``(padded, mask)``: the padded pytree and a float ``(N_padded,)`` mask
    with ones on the real examples.

  Examples:
    >>> import jax.numpy as jnp, sam_eos as se
    >>> padded, mask = se.pad_to_multiple(jnp.arange(5.0), 4)
    >>> padded.tolist(), mask.tolist()
    ([0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
  """
  if multiple < 1:
    raise ValueError(f"`multiple` must be >= 1, got {multiple}.")
  num = jax.tree.leaves(data)[0].shape[0]
  extra = -num % multiple

  def pad(x):
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)], axis=0)

  mask = jnp.concatenate([jnp.ones(num), jnp.zeros(extra)])
  return jax.tree.map(pad, data), mask


def masked_mean(
    per_example_loss: Callable[[PyTree, Any], jax.Array],
) -> Callable[[PyTree, tuple[Any, jax.Array]], jax.Array]:
  """Turns a per-example loss into ``loss_fn(params, (batch, mask))``.

  The result is ``sum(mask * l(params, batch)) / sum(mask)``: the mean over
  the real examples, so padded data give exactly the unpadded loss, gradient
  and Hessian.

  Args:
    per_example_loss: ``(params, batch) -> (N,)`` losses.

  Returns:
    A loss function taking ``batch = (examples, mask)``.

  Examples:
    >>> import jax.numpy as jnp, sam_eos as se
    >>> loss = se.masked_mean(lambda w, x: (x - w) ** 2)
    >>> padded, mask = se.pad_to_multiple(jnp.array([1.0, 3.0, 5.0]), 2)
    >>> float(loss(0.0, (padded, mask)))  # mean of 1, 9, 25
    11.666666984558105
  """

  def loss_fn(params: PyTree, batch: tuple[Any, jax.Array]) -> jax.Array:
    examples, mask = batch
    losses = per_example_loss(params, examples)
    return jnp.sum(mask * losses) / jnp.sum(mask)

  return loss_fn


def to_host(tree: PyTree) -> PyTree:
  """Copies a pytree of (possibly multi-process) arrays to NumPy.

  Replicated arrays are read from a local shard; others are gathered. Typed
  PRNG keys are left as (host-committed) key arrays.

  Args:
    tree: pytree of ``jax.Array``.

  Returns:
    The same pytree of ``numpy.ndarray`` (keys: ``jax.Array`` of keys).
  """

  def get(x):
    if is_key(x):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(get(jax.random.key_data(x)), impl=impl)
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)
