"""Training history: column names, rows from compiled chunks, CSV files.

The history of a run is a dict of NumPy arrays of shape
``(num_configs, num_rows)``, one row per tracked step; a single run is
squeezed to ``(num_rows,)`` by the driver. Its columns are
``HISTORY_COLUMNS`` followed by the keys of ``eval_fn``'s dict, if
``se.train`` was given one. A configuration of a sweep that diverged at step
``t`` has NaN in every column but ``step`` from row ``t`` on.
``metrics.csv`` holds one line per tracked step per configuration, with the
configuration columns first; a diverged configuration has no lines from its
divergence step on.
"""

from __future__ import annotations

import csv
import os
from typing import Mapping, Sequence

import numpy as np

from sam_eos import checkpoint
from sam_eos.loop import METRIC_NAMES

# The loop's recorded metrics, framed by the step and the wall time.
HISTORY_COLUMNS = ("step",) + METRIC_NAMES + ("wall_time",)
CONFIG_COLUMNS = ("config", "learning_rate", "rho", "seed")


def columns(extra: Sequence[str] = ()) -> tuple[str, ...]:
  """The history's columns: ``HISTORY_COLUMNS``, then the ``extra`` ones.

  Args:
    extra: names of additional columns (the keys of ``eval_fn``'s dict).

  Returns:
    The column names in file order.

  Raises:
    ValueError: if an extra name repeats or clashes with a built-in column.
  """
  extra = tuple(extra)
  clash = sorted(
      (set(extra) & set(HISTORY_COLUMNS + CONFIG_COLUMNS))
      | {n for n in extra if extra.count(n) > 1}
  )
  if clash:
    raise ValueError(
        f"Extra history columns {clash} repeat or clash with the "
        f"built-in columns {HISTORY_COLUMNS + CONFIG_COLUMNS}; "
        "rename them (e.g. prefix them with 'test_')."
    )
  return HISTORY_COLUMNS + extra


def extra_columns(history: Mapping[str, np.ndarray]) -> tuple[str, ...]:
  """The columns of ``history`` beyond ``HISTORY_COLUMNS``, in order."""
  return tuple(k for k in history if k not in HISTORY_COLUMNS)


def empty_history(
    num_configs: int, extra: Sequence[str] = ()
) -> dict[str, np.ndarray]:
  """A history with no rows.

  Args:
    num_configs: number of configurations ``C``.
    extra: names of additional (evaluation) columns.

  Returns:
    Dict column -> array of shape ``(C, 0)`` (``step`` int64, others float64).
  """
  return {
      name: np.zeros(
          (num_configs, 0), np.int64 if name == "step" else np.float64
      )
      for name in columns(extra)
  }


def chunk_rows(
    step: np.ndarray,
    tracked: np.ndarray,
    metrics: Mapping[str, np.ndarray],
    wall_start: float,
    wall_end: float,
    first_step: int,
    num_active: int,
) -> dict[str, np.ndarray]:
  """The tracked rows of one chunk as history columns.

  Wall time is measured at chunk boundaries and interpolated linearly in the
  step index inside the chunk.

  Args:
    step: ``(chunk_len,)`` global step indices (shared by all configs).
    tracked: ``(chunk_len,)`` bools, which rows were measured.
    metrics: name -> ``(C, chunk_len)`` values.
    wall_start: training seconds (compile excluded) before the chunk.
    wall_end: training seconds after it.
    first_step: first step run in the chunk.
    num_active: number of steps actually run in the chunk.

  Returns:
    Dict column -> ``(C, R)`` arrays, ``R`` = number of tracked rows.
  """
  keep = np.asarray(tracked, bool)
  steps = np.asarray(step)[keep]
  num_configs = next(iter(metrics.values())).shape[0]
  frac = (steps - first_step + 1) / max(num_active, 1)
  rows = {
      name: np.asarray(values, np.float64)[:, keep]
      for name, values in metrics.items()
  }
  rows["step"] = np.broadcast_to(
      steps.astype(np.int64), (num_configs, len(steps))
  )
  rows["wall_time"] = np.broadcast_to(
      wall_start + frac * (wall_end - wall_start), (num_configs, len(steps))
  )
  extra = [name for name in metrics if name not in HISTORY_COLUMNS]
  return {name: np.array(rows[name]) for name in columns(extra)}


def concat(
    history: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """Appends ``rows`` to ``history`` along the row axis."""
  return {
      name: np.concatenate([history[name], rows[name]], axis=1)
      for name in history
  }


def truncate(
    history: Mapping[str, np.ndarray], before_step: int
) -> dict[str, np.ndarray]:
  """Keeps the rows with ``step < before_step`` (equal across configs)."""
  keep = history["step"][0] < before_step
  return {name: values[:, keep] for name, values in history.items()}


def _csv_lines(
    history: Mapping[str, np.ndarray],
    configs: Sequence[Mapping[str, float]],
    diverged_at: Sequence[int] | None,
) -> list[list[str]]:
  """Long-format lines: configuration columns, then history columns.

  Lines of configuration ``c`` at steps ``>= diverged_at[c] >= 0`` are left
  out.
  """
  lines = []
  num_rows = history["step"].shape[1]
  for row in range(num_rows):
    for c, cfg in enumerate(configs):
      if (
          diverged_at is not None
          and 0 <= diverged_at[c] <= history["step"][c, row]
      ):
        continue
      line = [
          str(c),
          repr(float(cfg["learning_rate"])),
          repr(float(cfg["rho"])),
          str(cfg["seed"]),
      ]
      for name in history:
        value = history[name][c, row]
        line.append(str(int(value)) if name == "step" else repr(float(value)))
      lines.append(line)
  return lines


def append_csv(
    path: str | os.PathLike,
    history: Mapping[str, np.ndarray],
    configs: Sequence[Mapping[str, float]],
    diverged_at: Sequence[int] | None = None,
) -> None:
  """Appends rows to ``path``, writing the header if the file is new.

  Args:
    path: the CSV file.
    history: rows to append, ``(C, R)`` arrays.
    configs: per-configuration ``learning_rate``, ``rho``, ``seed``.
    diverged_at: per-configuration divergence step (-1 if none); a
      configuration's rows from its divergence step on are not written.
  """
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, "a", newline="") as f:
    writer = csv.writer(f)
    if new:
      writer.writerow(CONFIG_COLUMNS + tuple(history))
    writer.writerows(_csv_lines(history, configs, diverged_at))
    f.flush()
    os.fsync(f.fileno())


def write_csv(
    path: str | os.PathLike,
    history: Mapping[str, np.ndarray],
    configs: Sequence[Mapping[str, float]],
    diverged_at: Sequence[int] | None = None,
) -> None:
  """Writes the whole history to ``path`` atomically (temp file + rename).

  Args:
    path: the CSV file.
    history: all rows, ``(C, R)`` arrays.
    configs: per-configuration ``learning_rate``, ``rho``, ``seed``.
    diverged_at: as in :func:`append_csv`.
  """
  tmp = f"{path}.tmp"
  if os.path.exists(tmp):
    os.remove(tmp)
  append_csv(tmp, history, configs, diverged_at)
  checkpoint.replace(tmp, path)


def read_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``metrics.csv`` into flat column arrays (one entry per line).

  Args:
    path: a file written by :func:`append_csv`.

  Returns:
    Dict column -> 1-D array; ``config``, ``step`` and ``seed`` as integers.
    The file is long-format: one line per tracked step per configuration,
    in step order, the configurations told apart by ``config`` (``train``
    returns the same history with a leading configuration axis instead).

  Examples:
    A sweep over two ``rho`` values, tracked at steps 0 and 5:

    >>> import os, tempfile, jax.numpy as jnp, sam_eos as se
    >>> loss = lambda w, h: 0.5 * jnp.sum(h[0] * w ** 2)
    >>> out = os.path.join(tempfile.mkdtemp(), "run")
    >>> _ = se.train(loss, jnp.ones(2), jnp.array([[3.0, 1.0]]),
    ...              learning_rate=0.1, rho=[0.0, 0.1], num_steps=10,
    ...              track_every=5, num_lanczos_iters=2, out_dir=out,
    ...              progress=False)
    >>> rows = se.read_csv(os.path.join(out, "metrics.csv"))
    >>> rows["config"].tolist(), rows["step"].tolist(), rows["rho"].tolist()
    ([0, 1, 0, 1], [0, 0, 5, 5], [0.0, 0.1, 0.0, 0.1])
    >>> rows["sharpness"].round(4).tolist()
    [3.0, 3.0, 3.0, 3.0]

  References:
    The ``metrics.csv`` format of ``sam_eos.train`` (DESIGN.md).
  """
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    lines = list(reader)
    names = reader.fieldnames or []
  ints = {"config", "step", "seed"}
  return {
      name: np.array(
          [int(l[name]) if name in ints else float(l[name]) for l in lines]
      )
      for name in names
  }
