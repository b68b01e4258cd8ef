"""The ``sam-eos`` command line: run, plot, list and check experiments.

Commands::

  sam-eos run [NAME] [--preset cpu|paper] [--rho R ...] [--lr ETA ...]
              [--steps N] [--track-every N] [--lanczos-iters N]
              [--seed S ...] [--batch-size B] [--num-examples N]
              [--data-parallel] [--devices N] [--config-shards K]
              [--distributed [--coordinator HOST:PORT --num-processes N
               --process-id I]]
              [--out DIR] [--overwrite] [--x step|wall_time] [--no-progress]
  sam-eos plot DIR [DIR ...] [--out DIR] [--x step|wall_time]
  sam-eos list
  sam-eos check DIR
  sam-eos map [NAME] [--preset cpu|paper] [--lr ETA ...] [--rho R ...]
              [--seeds S ...] [--steps N] [--track-every N]
              [--lanczos-iters N] [--num-examples N]
              [--max-configs-per-program K] [--out DIR] [--no-progress]

``sam-eos run`` with no arguments trains ``mnist-mlp`` with its ``cpu`` preset
(GD and SAM as one vmapped program) on the data bundled with the package and
writes ``runs/mnist-mlp-cpu/{config.json, metrics.csv, checkpoint.npz,
*.png}``; run again, it resumes (``--overwrite`` starts afresh). Several
``--rho``/``--lr``/``--seed`` values run as one vmapped program.
``--data-parallel`` (or ``--devices N``) shards the batch over the local
devices, ``--config-shards K`` the configurations too (``se.data_mesh``);
``--distributed`` runs one process per host on one global mesh
(``jax.distributed.initialize``); only process 0 writes files and figures.
``sam-eos map`` trains a grid of (eta, rho) with GD at every eta, three or
more seeds, as vmapped sweeps, and writes ``edge_map.{csv,png,md}`` (see
``sam_eos.experiments.edge_map``) to ``runs/NAME-map``.

Exit codes: 0 success; 1 every configuration diverged or data unavailable
(``run``), or a claim failed or the run is incomplete (``check``); 2 bad
arguments or settings (the message names the argument or field). A sweep
in which only some configurations diverged finishes the others and exits 0
after naming the diverged ones and their steps (on stderr and in the
summary); ``sam-eos check`` then fails it as incomplete.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from sam_eos.experiments import presets

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _number(
    kind: type, check: Callable[[float], bool], want: str
) -> Callable[[str], float]:
  """An argparse type: parses ``kind``, rejects values failing ``check``."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"must be {want}, got {text!r}"
      ) from None
    if not check(value):
      raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
    return value

  return parse


_RHO = _number(float, lambda v: v >= 0, "a number >= 0 (0 is GD)")
_POSITIVE_REAL = _number(float, lambda v: v > 0, "a number > 0")
_POSITIVE = _number(int, lambda v: v >= 1, "an integer >= 1")
_SEED = _number(int, lambda v: v >= 0, "an integer >= 0")


def _parser() -> (
    tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]
):
  """The top-level parser and each command's parser (for its errors)."""
  parser = argparse.ArgumentParser(
      prog="sam-eos",
      description="SAM and GD at the edge of stability (Long & Bartlett "
      "2023): run the paper's experiments, plot and check them.",
  )
  commands = parser.add_subparsers(
      dest="command", required=True, metavar="{run,plot,list,check,map}"
  )

  run = commands.add_parser(
      "run",
      help="train an experiment (default: mnist-mlp, cpu preset)",
      description="Train every (learning rate, rho, seed) of an experiment as "
      "one vmapped program; write config.json, metrics.csv, checkpoint.npz "
      "and the figures. Options override the preset.",
  )
  run.add_argument(
      "name",
      nargs="?",
      default="mnist-mlp",
      choices=presets.list_experiments(),
      metavar="NAME",
      help="experiment (see `sam-eos list`); default mnist-mlp",
  )
  run.add_argument(
      "--preset",
      default="cpu",
      choices=presets.PRESETS,
      help="settings: cpu (default, minutes on a laptop) or paper "
      "(published, needs an accelerator)",
  )
  run.add_argument(
      "--rho", type=_RHO, nargs="+", metavar="R", help="SAM radii (0 is GD)"
  )
  run.add_argument(
      "--lr",
      type=_POSITIVE_REAL,
      nargs="+",
      metavar="ETA",
      help="learning rates",
  )
  run.add_argument(
      "--seed",
      type=_SEED,
      nargs="+",
      metavar="S",
      help="seeds: each its own initialization, minibatch "
      "draws and Lanczos start",
  )
  run.add_argument(
      "--steps", type=_POSITIVE, metavar="N", help="number of training steps"
  )
  run.add_argument(
      "--track-every",
      type=_POSITIVE,
      metavar="N",
      help="measure sharpness every N steps",
  )
  run.add_argument(
      "--lanczos-iters",
      type=_POSITIVE,
      metavar="N",
      help="Lanczos iterations per measurement",
  )
  run.add_argument(
      "--batch-size",
      type=_POSITIVE,
      metavar="B",
      help="minibatch size (default: the preset's)",
  )
  run.add_argument(
      "--num-examples",
      type=_POSITIVE,
      metavar="N",
      help="training examples (text crops for shakespeare)",
  )
  run.add_argument(
      "--num-test-examples",
      type=_POSITIVE,
      metavar="N",
      help="held-out examples for test_loss and test_accuracy",
  )
  run.add_argument(
      "--optimizer",
      choices=presets.OPTIMIZERS,
      help="base optimizer: sgd (heavy-ball, the paper's) or adam (records "
      "preconditioned_sharpness, judged against adam_edge)",
  )
  run.add_argument(
      "--adaptive",
      action="store_true",
      default=None,
      help="ASAM: the perturbation scaled by |w| + ETA_A (Kwon et al. 2021)",
  )
  run.add_argument(
      "--adaptive-eta",
      type=_RHO,
      metavar="ETA_A",
      help="ASAM's eta_a (default 0.01)",
  )
  run.add_argument(
      "--eigen-weight",
      type=_RHO,
      metavar="ALPHA",
      help="Eigen-SAM: weight of the tracked top eigenvector in the ascent "
      "(Luo et al. 2024); 0 is plain SAM",
  )
  run.add_argument(
      "--top-k",
      type=_POSITIVE,
      metavar="K",
      help="record the K top Hessian eigenvalues per check (columns "
      "top_eigenvalue_2..K)",
  )
  run.add_argument(
      "--batch-sharpness",
      type=_POSITIVE,
      metavar="K",
      help="minibatch runs: also estimate the batch sharpness over K random "
      "batches per check, with batch_sam_edge (Andreyev & Beneventano 2024)",
  )
  run.add_argument(
      "--data-parallel",
      action="store_true",
      help="shard the batch over all local devices (GPUs, TPU "
      "cores; on CPU set XLA_FLAGS="
      "--xla_force_host_platform_device_count=N)",
  )
  run.add_argument(
      "--devices",
      type=_POSITIVE,
      metavar="N",
      help="data-parallel over the first N devices (implies "
      "--data-parallel)",
  )
  run.add_argument(
      "--config-shards",
      type=_POSITIVE,
      metavar="K",
      help="also split the sweep's configurations over K groups "
      "of devices (a config x data mesh; K must divide the "
      "devices and the number of configurations)",
  )
  run.add_argument(
      "--distributed",
      action="store_true",
      help="multi-host: call jax.distributed.initialize() first "
      "and use every process's devices (implies "
      "--data-parallel); on TPU, SLURM or Open MPI it needs "
      "nothing else, elsewhere give the next three options",
  )
  run.add_argument(
      "--coordinator",
      metavar="HOST:PORT",
      help="with --distributed: process 0's address",
  )
  run.add_argument(
      "--num-processes",
      type=_POSITIVE,
      metavar="N",
      help="with --distributed: number of processes",
  )
  run.add_argument(
      "--process-id",
      type=_SEED,
      metavar="I",
      help="with --distributed: this process's index",
  )
  run.add_argument(
      "--out", metavar="DIR", help="run folder (default runs/NAME-PRESET)"
  )
  run.add_argument(
      "--overwrite",
      action="store_true",
      help="delete a previous run in DIR instead of resuming it",
  )
  run.add_argument(
      "--x",
      dest="x_axis",
      default="step",
      choices=("step", "wall_time"),
      help="figures' x-axis",
  )
  run.add_argument("--no-progress", action="store_true", help="no progress bar")

  plot = commands.add_parser(
      "plot",
      help="redraw (and overlay) the figures of run folders",
      description="Redraw the figures of one run folder, or overlay several.",
  )
  plot.add_argument("run_dirs", nargs="+", metavar="DIR", help="run folders")
  plot.add_argument(
      "--out",
      metavar="DIR",
      help="where to write the PNGs (default: the run folder, "
      "or ./plots for several)",
  )
  plot.add_argument(
      "--x",
      dest="x_axis",
      default="step",
      choices=("step", "wall_time"),
      help="x-axis",
  )

  commands.add_parser("list", help="show the experiments and their presets")

  check = commands.add_parser(
      "check",
      help="check the paper's claims on a run folder",
      description="Check the paper's claims (GD sharpens to 2/eta and "
      "oscillates there, SAM at its SAM-edge and below 2/eta, flat early, "
      "tracking its edge) on every seed of a finished run; exit 1 if a claim "
      "fails or the run is incomplete.",
  )
  check.add_argument("run_dir", metavar="DIR", help="a run folder")
  return parser, {
      "run": run,
      "plot": plot,
      "check": check,
      "map": _map_parser(commands),
  }


def _map_parser(commands) -> argparse.ArgumentParser:
  """``sam-eos map``: the grid's options (the preset fills the rest)."""
  edge = commands.add_parser(
      "map",
      help="map where the SAM-edge holds over a grid of (eta, rho)",
      description="Train a grid of learning rates x radii (plus GD at every "
      "learning rate) x seeds as vmapped sweeps; write edge_map.csv (one row "
      "per configuration and seed: median sharpness / SAM-edge over the "
      "claim window with a bootstrap 90%% interval, median rho/||g|| and "
      "rho*sharpness, GD's ratio, divergence), edge_map.png, edge_map.md "
      "(the finding), metrics.csv and config.json. The grid is "
      "--lr x --rho x --seeds; the defaults depend on the experiment "
      "(mnist-mlp: 4 x 5 x 3, 500 steps).",
  )
  edge.add_argument(
      "name",
      nargs="?",
      default="mnist-mlp",
      choices=presets.list_experiments(),
      metavar="NAME",
      help="experiment (see `sam-eos list`); default mnist-mlp",
  )
  edge.add_argument(
      "--preset",
      default="cpu",
      choices=presets.PRESETS,
      help="the preset the map starts from (default cpu)",
  )
  edge.add_argument(
      "--lr",
      type=_POSITIVE_REAL,
      nargs="+",
      metavar="ETA",
      help="the grid's step sizes",
  )
  edge.add_argument(
      "--rho",
      type=_RHO,
      nargs="+",
      metavar="R",
      help="the grid's SAM radii (GD, rho 0, is always added)",
  )
  edge.add_argument(
      "--seeds",
      "--seed",
      dest="seeds",
      type=_SEED,
      nargs="+",
      metavar="S",
      help="seeds, each its own initialization (default: the preset's)",
  )
  edge.add_argument(
      "--steps", type=_POSITIVE, metavar="N", help="training steps"
  )
  edge.add_argument(
      "--track-every",
      type=_POSITIVE,
      metavar="N",
      help="measure sharpness every N steps",
  )
  edge.add_argument(
      "--lanczos-iters",
      type=_POSITIVE,
      metavar="N",
      help="Lanczos iterations per measurement",
  )
  edge.add_argument(
      "--sharpness-tol",
      type=_POSITIVE_REAL,
      metavar="TOL",
      help="relative residual that certifies a sharpness measurement "
      "(mnist-mlp's map: 1e-2, enough for its 15%% band)",
  )
  edge.add_argument(
      "--num-examples",
      type=_POSITIVE,
      metavar="N",
      help="training examples (text crops for shakespeare)",
  )
  edge.add_argument(
      "--batch-size", type=_POSITIVE, metavar="B", help="minibatch size"
  )
  edge.add_argument(
      "--max-configs-per-program",
      type=_POSITIVE,
      metavar="K",
      help="at most K configurations per vmapped program (default: as many "
      "as fit a share of the device memory)",
  )
  edge.add_argument(
      "--pack",
      action=argparse.BooleanOptionalAction,
      default=None,
      help="pack step sizes into programs up to K configurations; "
      "--no-pack: one program per (eta, rho), its seeds (default: pack on "
      "an accelerator, not on a CPU, where a check waits for its slowest "
      "member)",
  )
  edge.add_argument(
      "--out", metavar="DIR", help="output folder (default runs/NAME-map)"
  )
  edge.add_argument(
      "--no-progress", action="store_true", help="no progress bars"
  )
  return edge


def _overrides(args: argparse.Namespace) -> dict[str, object]:
  """The preset fields set on the command line."""
  pairs = {
      "rhos": args.rho,
      "learning_rates": args.lr,
      "seeds": args.seed,
      "num_steps": args.steps,
      "track_every": args.track_every,
      "num_lanczos_iters": args.lanczos_iters,
      "batch_size": args.batch_size,
      "num_examples": args.num_examples,
      "num_test_examples": args.num_test_examples,
      "optimizer": args.optimizer,
      "adaptive": args.adaptive,
      "adaptive_eta": args.adaptive_eta,
      "eigen_weight": args.eigen_weight,
      "num_top_eigenvalues": args.top_k,
      "batch_sharpness_batches": args.batch_sharpness,
  }
  return {
      k: tuple(v) if isinstance(v, list) else v
      for k, v in pairs.items()
      if v is not None
  }


def _writable(parser: argparse.ArgumentParser, path: str) -> None:
  """Creates ``path`` or exits with a usage error naming ``--out``."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    parser.error(
        f"argument --out: cannot create {path!r} ({e.strerror}); "
        "choose a writable folder"
    )
  if not os.access(path, os.W_OK):
    parser.error(
        f"argument --out: {path!r} is not writable; choose a " "writable folder"
    )


def _print_config(config: presets.ExperimentConfig) -> None:
  print(f"{config.name} ({config.preset} preset): {config.description}")
  for key, value in config.to_dict().items():
    if key not in ("name", "preset", "description"):
      print(f"  {key:18} {value}")


def _summary(out_dir: str) -> list[str]:
  """Per configuration the final loss, test accuracy and window medians;
  then the claims over seeds (``claims.summarize``) and the findings."""
  from sam_eos import history  # pylint: disable=g-import-not-at-top
  from sam_eos.experiments import claims  # pylint: disable=g-import-not-at-top

  metrics = history.read_csv(os.path.join(out_dir, "metrics.csv"))
  configs = claims.split_configs(metrics)
  lines = [
      f"{'config':>6} {'eta':>8} {'rho':>6} {'seed':>4} {'step':>7} "
      f"{'loss':>10} {'test_acc':>8} {'S/(2/eta)':>10} {'S/SAM-edge':>10}"
  ]
  last = max(
      int(rows["step"][-1]) for rows in configs.values() if rows["step"].size
  )
  for c, rows in configs.items():
    if rows["step"].size == 0:
      continue
    accuracy = rows.get("test_accuracy")
    stopped = "  (diverged: rows stop early)" if rows["step"][-1] < last else ""
    lines.append(
        f"{c:>6} {rows['learning_rate'][0]:>8.4g} {rows['rho'][0]:>6g} "
        f"{rows['seed'][0]:>4} {rows['step'][-1]:>7} {rows['loss'][-1]:>10.4g} "
        f"{'-' if accuracy is None else f'{accuracy[-1]:.3f}':>8} "
        f"{claims.tail_median(rows, 'sharpness', 'gd_edge'):>10.3f} "
        f"{claims.tail_median(rows, 'sharpness', 'sam_edge'):>10.3f}{stopped}"
    )
  lines.append(
      "S = sharpness; medians over the last third of the steps; "
      "test_acc at the last tracked step."
  )
  try:
    lines += [""] + claims.summarize(claims.check_claims(metrics))
  except ValueError as e:
    lines.append(f"claims not checked: {e}")
  lines += claims.findings(metrics)
  return lines


def _initialize_distributed(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
  """``jax.distributed.initialize`` from ``--coordinator`` and friends."""
  manual = (args.coordinator, args.num_processes, args.process_id)
  if not args.distributed:
    if any(v is not None for v in manual):
      parser.error(
          "argument --coordinator/--num-processes/--process-id: "
          "only with --distributed"
      )
    return
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes exchange data through gloo; GPUs and TPUs ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
  except (ValueError, RuntimeError) as e:
    parser.error(
        f"argument --distributed: {e}; give --coordinator, "
        "--num-processes and --process-id outside TPU/SLURM/MPI"
    )


def _mesh(parser: argparse.ArgumentParser, args: argparse.Namespace):
  """The ``config x data`` mesh the options ask for, or None (one device)."""
  _initialize_distributed(parser, args)
  if not (
      args.data_parallel
      or args.devices
      or args.config_shards
      or args.distributed
  ):
    return None
  import sam_eos as se  # pylint: disable=g-import-not-at-top

  try:
    return se.data_mesh(args.devices, num_config_shards=args.config_shards or 1)
  except ValueError as e:
    parser.error(f"argument --devices/--config-shards: {e}")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  import sam_eos as se  # pylint: disable=g-import-not-at-top
  from sam_eos.experiments import data, plots, runner  # pylint: disable=g-import-not-at-top

  try:
    config = presets.get_experiment(args.name, args.preset)
    overrides = _overrides(args)
    if args.top_k:  # the k tracked pairs are warm-started from k vectors
      overrides["num_warm_vectors"] = max(args.top_k, config.num_warm_vectors)
    config = config.replace(**overrides)
  except ValueError as e:
    parser.error(f"invalid settings: {e}")
  mesh = _mesh(parser, args)
  out_dir = args.out or os.path.join("runs", f"{args.name}-{args.preset}")
  _writable(parser, out_dir)
  _print_config(config)
  print(
      f"  {'configurations':18} {config.num_configs} "
      "(learning_rates x rhos x seeds, one vmapped program)"
  )
  if mesh is not None:
    print(
        f"  {'mesh':18} {dict(mesh.shape)} over "
        f"{mesh.devices.flat[0].platform} devices"
    )
  print(f"Writing to {out_dir}")
  sys.stdout.flush()
  start = time.perf_counter()
  status = EXIT_OK
  try:
    result = runner.run_experiment(
        config,
        out_dir,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        x_axis=args.x_axis,
        mesh=mesh,
    )
    learning_rates, rhos, seeds = runner.sweep(config)
    for c, step in enumerate(np.atleast_1d(result.diverged_at)):
      if step >= 0:
        print(
            f"Configuration {c} (eta={learning_rates[c]:g}, "
            f"rho={rhos[c]:g}, seed={seeds[c]}) diverged at step {step}; "
            "its rows stop there, the other configurations ran to the end.",
            file=sys.stderr,
        )
  except se.TrainingDiverged as e:
    print(
        f"Training diverged at step {e.step} (configuration {e.config}): {e}",
        file=sys.stderr,
    )
    status = EXIT_FAILED
  except ValueError as e:
    print(f"sam-eos run: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except data.DataUnavailableError as e:
    print(f"sam-eos run: data unavailable: {e}", file=sys.stderr)
    return EXIT_FAILED
  print(f"Done in {time.perf_counter() - start:.1f} s.")
  if os.path.exists(os.path.join(out_dir, "metrics.csv")):
    print("\n".join(_summary(out_dir)))
  print(f"Files: {out_dir}/config.json, metrics.csv, checkpoint.npz")
  figures = ", ".join(
      os.path.join(out_dir, f)
      for f in plots.FIGURES + (plots.ADAM_FIGURE, plots.BATCH_FIGURE)
      if f in plots.FIGURES or os.path.exists(os.path.join(out_dir, f))
  )
  print(f"Figures: {figures}")
  return status


def _plot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  from sam_eos.experiments import plots  # pylint: disable=g-import-not-at-top

  for run_dir in args.run_dirs:
    if not os.path.exists(os.path.join(run_dir, "metrics.csv")):
      parser.error(
          f"argument DIR: {run_dir!r} has no metrics.csv; pass run "
          "folders written by `sam-eos run`"
      )
  out_dir = args.out or (
      args.run_dirs[0] if len(args.run_dirs) == 1 else "plots"
  )
  _writable(parser, out_dir)
  for path in plots.plot_runs(args.run_dirs, out_dir, x_axis=args.x_axis):
    print(path)
  return EXIT_OK


def _list() -> int:
  for name in presets.list_experiments():
    print(name)
    for preset, config in sorted(presets.EXPERIMENTS[name].items()):
      print(
          f"  --preset {preset:6} {config.description}; "
          f"eta {', '.join(f'{v:.4g}' for v in config.learning_rates)}; "
          f"rho {', '.join(f'{v:g}' for v in config.rhos)}; "
          f"{config.num_steps} steps"
      )
  return EXIT_OK


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  from sam_eos import history  # pylint: disable=g-import-not-at-top
  from sam_eos.experiments import claims, plots  # pylint: disable=g-import-not-at-top

  path = os.path.join(args.run_dir, "metrics.csv")
  if not os.path.exists(path):
    parser.error(
        f"argument DIR: {args.run_dir!r} has no metrics.csv; pass a "
        "run folder written by `sam-eos run`"
    )
  try:
    metrics, metadata = plots.load_run(args.run_dir)
    if metadata:  # a run of sam-eos run: it must be complete and sound
      claims.check_history(
          metrics, presets.ExperimentConfig.from_dict(metadata), complete=True
      )
    results = claims.check_claims(history.read_csv(path))
  except ValueError as e:
    print(f"sam-eos check: {e}", file=sys.stderr)
    return EXIT_FAILED
  for claim in results:
    print(claim)
  print()
  print("\n".join(claims.summarize(results)))
  for line in claims.findings(metrics):
    print(line)
  passed = all(c.passed for c in results)
  print(
      f"{sum(c.passed for c in results)}/{len(results)} claims hold "
      f"({sum(not c.applicable for c in results)} of them N/A), every "
      "seed judged on its own."
  )
  return EXIT_OK if passed else EXIT_FAILED


def _map(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  from sam_eos.experiments import data, edge_map  # pylint: disable=g-import-not-at-top

  try:
    config, note = edge_map.map_config(
        args.name,
        args.preset,
        learning_rates=args.lr,
        rhos=args.rho,
        seeds=args.seeds,
        num_steps=args.steps,
        track_every=args.track_every,
        num_lanczos_iters=args.lanczos_iters,
        sharpness_tol=args.sharpness_tol,
        num_examples=args.num_examples,
        batch_size=args.batch_size,
    )
  except ValueError as e:
    parser.error(f"invalid settings: {e}")
  if len(config.seeds) < 3:
    print(
        f"Warning: {len(config.seeds)} seed(s); the map's finding asks "
        "every seed, use three or more.",
        file=sys.stderr,
    )
  out_dir = args.out or os.path.join("runs", f"{args.name}-map")
  _writable(parser, out_dir)
  _print_config(config)
  print(f"  {'map':18} {note}")
  print(
      f"  {'configurations':18} {config.num_configs} (learning_rates x rhos "
      "x seeds, GD included)"
  )
  print(f"Writing to {out_dir}")
  sys.stdout.flush()
  try:
    result = edge_map.run_map(
        config,
        out_dir,
        note=note,
        progress=not args.no_progress,
        max_configs=args.max_configs_per_program,
        pack=args.pack,
    )
  except ValueError as e:
    print(f"sam-eos map: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except data.DataUnavailableError as e:
    print(f"sam-eos map: data unavailable: {e}", file=sys.stderr)
    return EXIT_FAILED
  print(
      f"Trained {config.num_configs} configurations in "
      f"{len(result.programs)} program(s) in {result.wall_time:.1f} s."
  )
  print()
  print("\n".join(result.lines))
  print()
  files = ", ".join(edge_map.MAP_FILES)
  print(f"Files: {out_dir}/{{{files}}}")
  return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``sam-eos``.

  Args:
    argv: the arguments after the program name; None reads ``sys.argv``.

  Returns:
    The exit code: 0 success; 1 diverged run, missing data or failed claim;
    2 bad arguments or settings.
  """
  parser, commands = _parser()
  try:
    args = parser.parse_args(argv)
    if args.command == "list":
      return _list()
    command = {"run": _run, "plot": _plot, "check": _check, "map": _map}[
        args.command
    ]
    return command(commands[args.command], args)
  except SystemExit as e:  # argparse's usage errors and --help
    return e.code if isinstance(e.code, int) else EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
