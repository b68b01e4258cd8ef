"""Regenerates the README's figures and their table from the ``cpu`` presets.

Usage (``make figures``)::

  python docs/make_figures.py [NAME ...]   # rerun, then rewrite the table
  python docs/make_figures.py --table      # only rewrite the table
  python docs/make_figures.py --map        # rerun the SAM-edge map too

For each experiment (default: ``EXPERIMENTS``) this runs exactly
``sam-eos run NAME --out docs/figures/NAME --overwrite --no-progress``,
times it, checks the paper's claims on its ``metrics.csv`` and rewrites the
README's table between the ``FIGURES`` markers. ``config.json``,
``metrics.csv`` and the PNGs of each run are committed (the checkpoint is
not); ``tests/test_readme.py`` checks that they still match the presets and
the table, and the slow tests in ``tests/experiments/test_claims.py`` run
the same command.

It also rewrites, between their markers, the README's paragraph on the
SAM-edge map (``map_lines``, from the committed ``sam-eos map mnist-mlp``
run in ``docs/figures/edge_map``; ``--map`` reruns it) and the table of the
paper runs (``paper_rows``, from ``docs/paper/NAME`` where ``make paper``
has written a run, "not yet measured" elsewhere).

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

from sam_eos import history
from sam_eos.experiments import claims, cli, edge_map, plots, presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURE_ROOT = ROOT / "docs" / "figures"
README = ROOT / "README.md"
EXPERIMENTS = (
    "mnist-mlp",
    "cifar10-cnn",
    "shakespeare-transformer",
    "cifar10-fc-tanh",
    "cifar10-cnn-relu",
    "quadratic",
)
START, END = "<!-- FIGURES:START -->", "<!-- FIGURES:END -->"
FAILURES_START, FAILURES_END = (
    "<!-- FAILURES:START -->",
    "<!-- FAILURES:END -->",
)
TIMES = "times.json"
EDGE_MAP = FIGURE_ROOT / "edge_map"
MAP_START, MAP_END = "<!-- EDGE_MAP:START -->", "<!-- EDGE_MAP:END -->"
PAPER_ROOT = ROOT / "docs" / "paper"
PAPER_EXPERIMENTS = ("mnist-mlp", "cifar10-cnn", "shakespeare-transformer")
PAPER_START, PAPER_END = "<!-- PAPER:START -->", "<!-- PAPER:END -->"
# Beyond the paper: runs of other optimizers, reported in their own block.
ADAM_EXPERIMENT = "mnist-mlp-adam"
ADAM_START, ADAM_END = "<!-- ADAM:START -->", "<!-- ADAM:END -->"
# The Shakespeare run with the batch sharpness tracked, and its block.
BATCH_RUN = "shakespeare-batch-sharpness"
BATCH_START, BATCH_END = "<!-- BATCH:START -->", "<!-- BATCH:END -->"


def _over_seeds(found: list, name: str) -> str:
  """``median [low, high]`` of one claim's values over seeds, per setting."""
  groups: dict[tuple[float, float], list[float]] = {}
  for claim in found:
    if claim.name == name:
      groups.setdefault((claim.learning_rate, claim.rho), []).append(
          claim.value
      )
  parts = []
  for (eta, rho), values in groups.items():
    label = f"eta {eta:.3g}: " if len({k[0] for k in groups}) > 1 else ""
    label += (
        f"rho {rho:g}: " if name != "gd_at_edge" and len(groups) > 1 else ""
    )
    parts.append(
        f"{label}{np.median(values):.3f} [{min(values):.3f}, "
        f"{max(values):.3f}]"
    )
  return "<br>".join(parts) or "-"


def _test_accuracy(metrics: dict) -> str:
  """Final test accuracy, median over seeds, of GD and of SAM."""
  if "test_accuracy" not in metrics:
    return "-"
  final = {}
  for rows in claims.split_configs(metrics).values():
    kind = "GD" if rows["rho"][0] == 0 else "SAM"
    final.setdefault(kind, []).append(rows["test_accuracy"][-1])
  return " / ".join(
      f"{np.median(final[k]):.3f}" for k in ("GD", "SAM") if k in final
  )


def table_rows(names: tuple[str, ...] = EXPERIMENTS) -> list[str]:
  """The README table's rows, from the committed runs in ``docs/figures``.

  Args:
    names: experiments with a run folder ``docs/figures/NAME``.

  Returns:
    Markdown rows: experiment, description, wall time, seeds, the GD and
    SAM window medians of ``sam-eos check`` (median over seeds [seed
    range]), final test accuracy (GD / SAM), the claims that hold for every
    seed, and the figures.
  """
  with open(FIGURE_ROOT / TIMES) as f:
    times = json.load(f)
  rows = []
  for name in names:
    run = FIGURE_ROOT / name
    with open(run / "config.json") as f:
      metadata = json.load(f)["metadata"]
    metrics = history.read_csv(run / "metrics.csv")
    found = claims.check_claims(metrics)
    summary = claims.summarize(found)[1:]
    held = sum(line.startswith(("PASS", "N/A")) for line in summary)
    links = " ".join(
        f"[{p[:-4]}](docs/figures/{name}/{p})" for p in plots.FIGURES
    )
    rows.append(
        f"| `{name}` | {metadata['description']} | "
        f"{times[name]:.0f} s | {len(metadata['seeds'])} | "
        f"{_over_seeds(found, 'gd_at_edge')} | "
        f"{_over_seeds(found, 'sam_at_sam_edge')} | "
        f"{_test_accuracy(metrics)} | {held}/{len(summary)} | "
        f"{links} |"
    )
  return rows


def failure_lines(names: tuple[str, ...] = EXPERIMENTS) -> list[str]:
  """The README's list of claims not shown for every seed, with numbers.

  Lists every claim that fails for some seed, and every entry of
  ``presets.KNOWN_FAILURES`` (a claim a preset does not reliably show,
  even where it passes in the committed run).

  Args:
    names: experiments with a run folder ``docs/figures/NAME``.

  Returns:
    Markdown bullets: experiment, claim, setting, the ``summarize`` numbers,
    the failing seeds and the reason from ``presets.KNOWN_FAILURES`` (or
    "UNEXPECTED").
  """
  lines = []
  for name in names:
    found = claims.check_claims(
        history.read_csv(FIGURE_ROOT / name / "metrics.csv")
    )
    known = presets.KNOWN_FAILURES.get(name, {})
    failed = {(c.name, c.learning_rate, c.rho) for c in found if not c.passed}
    for key in sorted(failed | set(known)):
      group = [c for c in found if (c.name, c.learning_rate, c.rho) == key]
      numbers = claims.summarize(group)[1].split(": ", 1)[1]
      values = "; ".join(
          f"seed {c.seed}: {c.detail}" for c in group if not c.passed
      )
      outcome = f"Failing: {values}" if values else "Passes in this run"
      reason = known.get(key, "UNEXPECTED: not in presets.KNOWN_FAILURES")
      lines.append(
          f"- `{name}`, `{key[0]}` (eta {key[1]:.3g}, rho "
          f"{key[2]:g}): {numbers}. {outcome}. Likely reason: {reason}."
      )
  return lines or ["- none"]


def map_lines(folder: pathlib.Path = EDGE_MAP) -> list[str]:
  """The README's paragraph on the SAM-edge map, from its committed run.

  Args:
    folder: a ``sam-eos map`` output folder.

  Returns:
    One line: the finding of ``edge_map.describe`` on its ``edge_map.csv``
    as one paragraph, then the run's settings and training wall time.
  """
  saved = json.loads((folder / "config.json").read_text())
  config, run = saved["metadata"], saved["map"]
  rows = edge_map.read_map_csv(folder / "edge_map.csv")
  finding = " ".join(edge_map.describe(rows, label=f"`{config['name']}`"))
  tol, cap = config["sharpness_tol"], config["num_lanczos_iters"]
  measured = (
      f"by {cap} Lanczos iterations"
      if tol is None
      else f"certified to a relative residual of {tol:g} (at most {cap} "
      "Lanczos iterations)"
  )
  grouping = (
      "step sizes packed by memory"
      if run.get("packed", True)
      else "one per (eta, rho), its seeds"
  )
  text = (
      f"{finding} Settings: {config['num_steps']} steps, sharpness every "
      f"{config['track_every']} steps {measured} ({run['note']}); trained "
      f"as {len(run['programs'])} vmapped program(s) ({grouping}) in "
      f"{run['wall_time_s']:.0f} s on {run['devices']} (compilation "
      "included)."
  )
  timing_path = folder / "timing.json"
  if timing_path.exists():
    timing = json.loads(timing_path.read_text())
    load = timing["load_average_1min"]
    text += (
        f" The whole command took {timing['wall_time_s']:.0f} s of wall "
        f"time and {timing['cpu_time_s']:.0f} s of CPU time on "
        f"{timing['machine']} (1-minute load average {load['min']:g}-"
        f"{load['max']:g}, mean {load['mean']:g}, in its last "
        f"{load['over_s']} s; `timing.json`)."
    )
  return [text]


def adam_lines(name: str = ADAM_EXPERIMENT) -> list[str]:
  """The README's lines on the committed Adam run: its claims and findings.

  Args:
    name: an experiment with an Adam base and a run in ``docs/figures``.

  Returns:
    The run's settings and wall time, then the lines of
    ``claims.summarize`` (``adam_at_edge`` over seeds) and the Adam lines
    of ``claims.findings`` (every configuration, SAM on Adam included), as
    a Markdown list.
  """
  run = FIGURE_ROOT / name
  metadata = json.loads((run / "config.json").read_text())["metadata"]
  times = json.loads((FIGURE_ROOT / TIMES).read_text())
  metrics = history.read_csv(run / "metrics.csv")
  found = claims.check_claims(metrics)
  summary = [
      line for line in claims.summarize(found)[1:] if "adam_at_edge" in line
  ]
  adam = [line for line in claims.findings(metrics) if "(Adam," in line]
  head = (
      f"`sam-eos run {name}` ({metadata['description']}; eta "
      f"{', '.join(f'{v:g}' for v in metadata['learning_rates'])}, rho "
      f"{', '.join(f'{v:g}' for v in metadata['rhos'])}, "
      f"{len(metadata['seeds'])} seeds, {metadata['num_steps']:,} steps; "
      f"{times[name]:.0f} s on a shared 2-core machine; "
      f"[figure](docs/figures/{name}/{plots.ADAM_FIGURE})):"
  )
  return [head] + [f"- {line}" for line in summary + adam]


def batch_lines(folder: pathlib.Path = FIGURE_ROOT / BATCH_RUN) -> list[str]:
  """The README's lines on the committed run with the batch sharpness.

  Args:
    folder: a ``sam-eos run ... --batch-sharpness K`` output folder with a
      ``run.log`` (its console output).

  Returns:
    The run's settings and wall time, then the batch-sharpness lines of
    ``claims.findings`` and, for contrast, the ``summarize`` lines of
    ``gd_at_edge`` and ``sam_at_sam_edge`` (the sharpness of the step's
    own minibatch), as a Markdown list.
  """
  metadata = json.loads((folder / "config.json").read_text())["metadata"]
  metrics = history.read_csv(folder / "metrics.csv")
  done = [
      line
      for line in (folder / "run.log").read_text().splitlines()
      if line.startswith("Done in")
  ]
  found = claims.check_claims(metrics)
  contrast = [
      line
      for line in claims.summarize(found)[1:]
      if "gd_at_edge" in line or "sam_at_sam_edge" in line
  ]
  head = (
      f"`sam-eos run {metadata['name']} --batch-sharpness "
      f"{metadata['batch_sharpness_batches']}` ({metadata['description']}; "
      f"batches of {metadata['batch_size']}; {len(metadata['seeds'])} seeds, "
      f"{metadata['num_steps']:,} steps; {done[-1].rstrip('.') if done else 'unfinished'}"
      f"; [figure](docs/figures/{BATCH_RUN}/{plots.BATCH_FIGURE})):"
  )
  batch = [
      line for line in claims.findings(metrics) if line.startswith("Batch")
  ]
  return [head] + [f"- {line}" for line in batch + contrast]


def paper_rows(names: tuple[str, ...] = PAPER_EXPERIMENTS) -> list[str]:
  """The README's table of the paper runs: measured, or not yet.

  Args:
    names: the paper's experiments; a run is read from ``docs/paper/NAME``.

  Returns:
    Markdown rows: experiment, the preset's data and model, step size,
    radii, seeds, steps, and the run's status: "not yet measured" without a
    ``metrics.csv``, else its wall time and its claims.
  """
  rows = []
  for name in names:
    config = presets.get_experiment(name, "paper")
    folder = PAPER_ROOT / name
    status = "not yet measured (needs an accelerator)"
    if (folder / "metrics.csv").exists() and (folder / "check.txt").exists():
      check = (folder / "check.txt").read_text().strip().splitlines()
      done = [
          line
          for line in (folder / "run.log").read_text().splitlines()
          if line.startswith("Done in")
      ]
      status = f"{done[-1] if done else 'unfinished'}; {check[-1]}"
    rows.append(
        f"| `{name}` | {config.description} | "
        f"{', '.join(f'{v:g}' for v in config.learning_rates)} | "
        f"{', '.join(f'{v:g}' for v in config.rhos)} | {len(config.seeds)} | "
        f"{config.num_steps:,} | {status} |"
    )
  return rows


def _replace(text: str, start: str, end: str, lines: list[str]) -> str:
  head, rest = text.split(start)
  _, tail = rest.split(end)
  return head + start + "\n" + "\n".join(lines) + "\n" + end + tail


def write_table() -> None:
  """Rewrites the README's generated parts between their markers."""
  text = _replace(README.read_text(), START, END, table_rows())
  text = _replace(text, FAILURES_START, FAILURES_END, failure_lines())
  text = _replace(text, MAP_START, MAP_END, map_lines())
  text = _replace(text, ADAM_START, ADAM_END, adam_lines())
  text = _replace(text, BATCH_START, BATCH_END, batch_lines())
  README.write_text(_replace(text, PAPER_START, PAPER_END, paper_rows()))


def run_map() -> int:
  """Reruns ``sam-eos map mnist-mlp`` into ``EDGE_MAP`` and times it.

  Writes ``timing.json`` beside it: the command's wall time, this
  process's CPU time (``resource.getrusage``) and the 1-minute load average
  at its start and end (other jobs on the machine slow it down).

  Returns:
    The command's exit code.
  """
  import os  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top

  def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

  loads = [os.getloadavg()[0]]
  start, cpu_start = time.perf_counter(), cpu()
  code = cli.main(["map", "mnist-mlp", "--out", str(EDGE_MAP), "--no-progress"])
  wall, cpu_time = time.perf_counter() - start, cpu() - cpu_start
  loads.append(os.getloadavg()[0])
  timing = {
      "command": "sam-eos map mnist-mlp --out DIR --no-progress "
      "(docs/make_figures.py --map)",
      "wall_time_s": round(wall, 1),
      "cpu_time_s": round(cpu_time, 1),
      "cpu_time_note": "user + system time of the process (getrusage)",
      "load_average_1min": {
          "min": min(loads),
          "max": max(loads),
          "mean": round(sum(loads) / len(loads), 2),
          "samples": len(loads),
          "over_s": round(wall),
      },
      "machine": f"{os.cpu_count()} CPU cores",
  }
  (EDGE_MAP / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
  return code


def main(names: list[str]) -> int:
  """Runs each experiment's cpu preset into ``docs/figures/NAME``.

  Args:
    names: experiments to rerun (default: all of ``EXPERIMENTS``).

  Returns:
    0 if every run finished and its claims hold, else 1 (a failed claim
    is reported in the table, not hidden).
  """
  times_path = FIGURE_ROOT / TIMES
  times = json.loads(times_path.read_text()) if times_path.exists() else {}
  status = 0
  for name in names or EXPERIMENTS:
    out = FIGURE_ROOT / name
    start = time.perf_counter()
    code = cli.main(
        ["run", name, "--out", str(out), "--overwrite", "--no-progress"]
    )
    times[name] = round(time.perf_counter() - start, 1)
    (out / "checkpoint.npz").unlink(missing_ok=True)
    status = status or code or cli.main(["check", str(out)])
    times_path.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
  write_table()
  return status


if __name__ == "__main__":
  if sys.argv[1:] == ["--table"]:
    write_table()
  elif sys.argv[1:] == ["--map"]:
    run_map()
    write_table()
  else:
    sys.exit(main(sys.argv[1:]))
