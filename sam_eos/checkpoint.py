"""Atomic checkpoints of the training carry and history (one ``.npz`` file).

A checkpoint stores the leaves of the (possibly vmapped) ``TrainState``, the
history recorded so far, the next step, the training seconds spent and a
JSON signature of the settings, so a resumed run can refuse a mismatch
(compared before any array is read). PRNG key leaves are stored as their raw
key data. Files are replaced atomically: a temporary file, fsync, rename,
then fsync of the folder so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from sam_eos import parallel
from sam_eos._types import PyTree


class Checkpoint(NamedTuple):
  """What a checkpoint holds.

  Attributes:
    state: the carry (same pytree structure as the template it was read with).
    history: dict column -> ``(C, R)`` array.
    next_step: the first step not yet run.
    wall_time: training seconds spent so far.
    signature: the settings the run was started with.
  """

  state: PyTree
  history: dict[str, np.ndarray]
  next_step: int
  wall_time: float
  signature: dict[str, Any]


def fsync_dir(path: str | os.PathLike) -> None:
  """Flushes the directory entry of ``path`` (after a rename) to disk."""
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
  """Renames the written and fsynced ``tmp`` over ``path``, durably."""
  os.replace(tmp, path)
  fsync_dir(path)


def signature_mismatch(
    saved: dict[str, Any], signature: dict[str, Any]
) -> list[str]:
  """The keys whose values differ between two signatures, sorted."""
  return sorted(
      k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k)
  )


def save(
    path: str | os.PathLike,
    state: PyTree,
    history: dict[str, np.ndarray],
    next_step: int,
    wall_time: float,
    signature: dict[str, Any],
) -> None:
  """Writes a checkpoint atomically: a temp file, fsync, then rename.

  Args:
    path: destination ``.npz`` file.
    state: the carry pytree. One spanning several processes must first be
      gathered with ``parallel.to_host`` on every process (a collective),
      since only process 0 calls this.
    history: recorded rows.
    next_step: the first step not yet run.
    wall_time: training seconds spent so far.
    signature: JSON-serializable settings of the run.
  """
  raw = jax.tree.map(
      lambda x: jax.random.key_data(x) if parallel.is_key(x) else x, state
  )
  leaves = jax.tree.leaves(parallel.to_host(raw))
  arrays = {f"state_{i}": np.asarray(x) for i, x in enumerate(leaves)}
  arrays.update({f"history_{k}": v for k, v in history.items()})
  arrays["history_columns"] = np.array(json.dumps(list(history)))
  arrays["next_step"] = np.array(next_step)
  arrays["wall_time"] = np.array(wall_time)
  arrays["signature"] = np.array(json.dumps(signature, sort_keys=True))
  tmp = f"{path}.tmp.npz"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  replace(tmp, path)


def load(
    path: str | os.PathLike, template: PyTree, signature: dict[str, Any] | None
) -> Checkpoint:
  """Reads a checkpoint, rebuilding the carry on ``template``'s structure.

  Args:
    path: a file written by :func:`save`.
    template: a carry with the expected structure, shapes and dtypes.
    signature: the settings the checkpoint must have been saved with
      (compared as JSON, before any array is read), or None to accept any.

  Returns:
    The ``Checkpoint``.

  Raises:
    ValueError: if the stored signature differs from ``signature`` (the
      message names the differing settings), or the stored leaves do not
      fit ``template``.
  """
  with np.load(path) as f:
    saved = json.loads(str(f["signature"]))
    if signature is not None:
      differ = signature_mismatch(saved, json.loads(json.dumps(signature)))
      if differ:
        raise ValueError(
            f"Checkpoint {path} is of a run with other settings: "
            f"{', '.join(differ)} differ. Resume it with the same settings, "
            "or use a new out_dir to start afresh."
        )
    leaves, treedef = jax.tree.flatten(template)
    stored = [
        f[f"state_{i}"] for i in range(len(leaves)) if f"state_{i}" in f.files
    ]
    if len(stored) != len(leaves):
      raise ValueError(
          f"Checkpoint {path} does not match this run's state "
          "structure; start a new out_dir."
      )
    restored = []
    for new, old in zip(stored, leaves):
      if parallel.is_key(old):
        new = jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
      if new.shape != old.shape or new.dtype != old.dtype:
        raise ValueError(
            f"Checkpoint {path} holds an array {new.shape} {new.dtype} where "
            f"this run has {old.shape} {old.dtype}; start a new out_dir."
        )
      restored.append(new)
    names = json.loads(str(f["history_columns"]))
    history = {k: f[f"history_{k}"] for k in names}
    return Checkpoint(
        state=jax.tree.unflatten(treedef, restored),
        history=history,
        next_step=int(f["next_step"]),
        wall_time=float(f["wall_time"]),
        signature=saved,
    )
