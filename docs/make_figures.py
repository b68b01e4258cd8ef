"""Regenerates the README's figures and their table from the ``cpu`` presets.

Usage (``make figures``)::

  python docs/make_figures.py [NAME ...]   # rerun, then rewrite the table
  python docs/make_figures.py --table      # only rewrite the table

For each experiment (default: ``EXPERIMENTS``) this runs exactly
``sam-eos run NAME --out docs/figures/NAME --overwrite --no-progress``,
times it, checks the paper's claims on its ``metrics.csv`` and rewrites the
README's table between the ``FIGURES`` markers. ``config.json``,
``metrics.csv`` and the PNGs of each run are committed (the checkpoint is
not); ``tests/test_readme.py`` checks that they still match the presets and
the table, and the slow tests in ``tests/experiments/test_claims.py`` run
the same command.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from sam_eos import history
from sam_eos.experiments import claims, cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURE_ROOT = ROOT / "docs" / "figures"
README = ROOT / "README.md"
EXPERIMENTS = ("mnist-mlp", "cifar10-cnn", "shakespeare-transformer",
               "cifar10-5k", "quadratic")
START, END = "<!-- FIGURES:START -->", "<!-- FIGURES:END -->"
TIMES = "times.json"


def table_rows(names: tuple[str, ...] = EXPERIMENTS) -> list[str]:
  """The README table's rows, from the committed runs in ``docs/figures``.

  Args:
    names: experiments with a run folder ``docs/figures/NAME``.

  Returns:
    Markdown rows: experiment, description, wall time, the GD and SAM
    median ratios of ``sam-eos check`` (per configuration), the figures.
  """
  with open(FIGURE_ROOT / TIMES) as f:
    times = json.load(f)
  rows = []
  for name in names:
    run = FIGURE_ROOT / name
    with open(run / "config.json") as f:
      description = json.load(f)["metadata"]["description"]
    found = claims.check_claims(history.read_csv(run / "metrics.csv"))
    gd = ", ".join(f"{c.value:.3f}" for c in found if c.name == "gd_at_edge")
    sam = ", ".join(f"{c.value:.3f}" for c in found
                    if c.name == "sam_at_sam_edge")
    links = " ".join(f"[{p[:-4]}](docs/figures/{name}/{p})"
                     for p in ("sharpness.png", "sharpness_sam_edge.png",
                               "alignment.png", "loss.png"))
    rows.append(f"| `{name}` | {description} | {times[name]:.0f} s | "
                f"{gd or '-'} | {sam or '-'} | {links} |")
  return rows


def write_table() -> None:
  """Rewrites the README's table between the ``FIGURES`` markers."""
  text = README.read_text()
  head, rest = text.split(START)
  _, tail = rest.split(END)
  README.write_text(head + START + "\n" + "\n".join(table_rows()) + "\n"
                    + END + tail)


def main(names: list[str]) -> int:
  """Runs each experiment's cpu preset into ``docs/figures/NAME``.

  Args:
    names: experiments to rerun (default: all of ``EXPERIMENTS``).

  Returns:
    0 if every run finished and its claims hold, else 1.
  """
  times_path = FIGURE_ROOT / TIMES
  times = json.loads(times_path.read_text()) if times_path.exists() else {}
  status = 0
  for name in names or EXPERIMENTS:
    out = FIGURE_ROOT / name
    start = time.perf_counter()
    code = cli.main(["run", name, "--out", str(out), "--overwrite",
                     "--no-progress"])
    times[name] = round(time.perf_counter() - start, 1)
    (out / "checkpoint.npz").unlink(missing_ok=True)
    status = status or code or cli.main(["check", str(out)])
    times_path.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
  write_table()
  return status


if __name__ == "__main__":
  if sys.argv[1:] == ["--table"]:
    write_table()
  else:
    sys.exit(main(sys.argv[1:]))
