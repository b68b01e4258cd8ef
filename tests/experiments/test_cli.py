"""The ``sam-eos`` entry point: smoke runs of every preset, errors, plot."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sam_eos import history
from sam_eos.experiments import cli, plots, presets

TINY = [
    "--steps",
    "2",
    "--track-every",
    "1",
    "--lanczos-iters",
    "2",
    "--no-progress",
]


def tiny_args(name: str, preset: str) -> list[str]:
  """The real entry point shrunk: two steps on eight examples."""
  config = presets.get_experiment(name, preset)
  args = ["run", name, "--preset", preset] + TINY
  if config.dataset != "quadratic":
    args += ["--num-examples", "8", "--num-test-examples", "8"]
  if config.batch_size is not None:
    args += ["--batch-size", "4"]
  return args


def assert_run_files(
    out: str, config: presets.ExperimentConfig, num_steps: int = 2
) -> dict[str, np.ndarray]:
  for name in ("config.json", "metrics.csv", "checkpoint.npz") + plots.FIGURES:
    assert os.path.exists(os.path.join(out, name)), name
  with open(os.path.join(out, "config.json")) as f:
    saved = json.load(f)
  assert saved["metadata"]["name"] == config.name
  assert saved["metadata"]["preset"] == config.preset
  assert len(saved["configs"]) == config.num_configs
  metrics = history.read_csv(os.path.join(out, "metrics.csv"))
  assert len(metrics["step"]) == num_steps * config.num_configs
  assert np.all(np.isfinite(metrics["sharpness"]))
  return metrics


@pytest.mark.parametrize(
    "name, preset",
    [
        (name, preset)
        for name in presets.list_experiments()
        for preset in presets.PRESETS
    ],
)
def test_smoke_run_of_every_preset(name, preset, tmp_path, capsys):
  out = str(tmp_path / "run")
  assert cli.main(tiny_args(name, preset) + ["--out", out]) == 0
  printed = capsys.readouterr().out
  config = presets.get_experiment(name, preset)
  assert f"{name} ({preset} preset)" in printed
  for field in ("learning_rates", "rhos", "num_lanczos_iters", "eps"):
    assert field in printed
  assert "S/SAM-edge" in printed and "sharpness.png" in printed
  assert_run_files(out, config)


def test_default_run_is_mnist_cpu_in_runs_folder(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert cli.main(["run"] + TINY + ["--num-examples", "8"]) == 0
  assert "mnist-mlp (cpu preset)" in capsys.readouterr().out
  config = presets.get_experiment("mnist-mlp").replace(num_examples=8)
  metrics = assert_run_files(str(tmp_path / "runs" / "mnist-mlp-cpu"), config)
  assert sorted(set(metrics["rho"])) == [0.0, 0.1]


def test_options_override_the_preset_and_resume(tmp_path, capsys):
  out = str(tmp_path / "run")
  args = [
      "run",
      "quadratic",
      "--out",
      out,
      "--rho",
      "0.02",
      "0.05",
      "0.1",
      "--lr",
      "0.01",
      "0.005",
      "--seed",
      "0",
      "1",
      "--track-every",
      "1",
      "--lanczos-iters",
      "4",
      "--no-progress",
  ]
  assert cli.main(args + ["--steps", "3"]) == 0
  config = presets.get_experiment("quadratic").replace(
      rhos=(0.02, 0.05, 0.1), learning_rates=(0.01, 0.005), seeds=(0, 1)
  )
  assert_run_files(out, config, num_steps=3)
  # Same settings, more steps: resumes and appends.
  assert cli.main(args + ["--steps", "5"]) == 0
  metrics = assert_run_files(out, config, num_steps=5)
  assert sorted(set(metrics["step"])) == [0, 1, 2, 3, 4]
  capsys.readouterr()
  # Other settings in the same folder: refused, then --overwrite.
  assert (
      cli.main(
          args[:-7] + ["--steps", "2", "--lanczos-iters", "2", "--no-progress"]
      )
      == 2
  )
  assert "--overwrite" in capsys.readouterr().err
  assert cli.main(args + ["--steps", "2", "--overwrite"]) == 0
  assert_run_files(out, config, num_steps=2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "mnist"], "argument NAME: invalid choice: 'mnist'"),
        (["run", "--preset", "gpu"], "argument --preset: invalid choice"),
        (["run", "--rho", "-0.1"], "argument --rho: must be a number >= 0"),
        (["run", "--rho", "abc"], "argument --rho: must be a number >= 0"),
        (["run", "--lr", "0"], "argument --lr: must be a number > 0"),
        (["run", "--steps", "0"], "argument --steps: must be an integer >= 1"),
        (
            ["run", "--steps", "1.5"],
            "argument --steps: must be an integer >= 1",
        ),
        (["run", "--track-every", "-2"], "argument --track-every: must be"),
        (["run", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["run", "--batch-size", "0"], "argument --batch-size: must be"),
        (["run", "--x", "time"], "argument --x: invalid choice"),
        (
            ["run", "--devices", "99"],
            "argument --devices/--config-shards: "
            "`num_devices` must be in [1, 8]",
        ),
        (
            ["run", "--devices", "4", "--config-shards", "3"],
            "`num_config_shards` (3) must divide",
        ),
        (["plot"], "the following arguments are required: DIR"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(args, message, capsys):
  assert cli.main(args) == 2
  assert message in capsys.readouterr().err


def test_unwritable_out_exits_2(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  assert cli.main(["run", "quadratic", "--out", str(blocker / "run")]) == 2
  assert "argument --out: cannot create" in capsys.readouterr().err
  run = str(tmp_path / "run")
  assert cli.main(["run", "quadratic"] + TINY + ["--out", run]) == 0
  assert cli.main(["plot", run, "--out", str(blocker / "figs")]) == 2
  assert "argument --out" in capsys.readouterr().err


@pytest.mark.dataset("shakespeare")
def test_invalid_preset_value_exits_2(tmp_path, capsys):
  # More examples than the data set holds: caught before training.
  assert (
      cli.main(
          [
              "run",
              "shakespeare-transformer",
              "--num-examples",
              "10000000",
              "--out",
              str(tmp_path / "r"),
              "--no-progress",
          ]
      )
      == 2
  )
  assert "`num_examples`" in capsys.readouterr().err


def test_missing_data_exits_1_saying_what_to_fetch(tmp_path, capsys):
  # 5,000 CIFAR-10 images exceed the local copies; downloads are disabled.
  assert (
      cli.main(
          [
              "run",
              "cifar10-fc-tanh",
              "--preset",
              "paper",
              "--out",
              str(tmp_path / "r"),
              "--no-progress",
          ]
      )
      == 1
  )
  err = capsys.readouterr().err
  assert "data unavailable" in err and "cifar-10-binary.tar.gz" in err


def test_divergence_prints_the_step_keeps_figures_and_exits_1(tmp_path, capsys):
  out = str(tmp_path / "run")
  assert (
      cli.main(
          [
              "run",
              "quadratic",
              "--lr",
              "1.0",
              "--steps",
              "300",
              "--track-every",
              "1",
              "--out",
              out,
              "--no-progress",
          ]
      )
      == 1
  )
  captured = capsys.readouterr()
  assert "Training diverged at step" in captured.err
  assert "S/SAM-edge" in captured.out
  metrics = history.read_csv(os.path.join(out, "metrics.csv"))
  assert 0 < len(metrics["step"]) < 2 * 300
  for name in plots.FIGURES:
    assert os.path.exists(os.path.join(out, name))


def test_list_shows_every_experiment_and_preset(capsys):
  assert cli.main(["list"]) == 0
  printed = capsys.readouterr().out
  for name in presets.list_experiments():
    assert f"\n{name}\n" in f"\n{printed}"
  num_experiments = len(presets.list_experiments())
  assert printed.count("--preset cpu") == num_experiments
  assert printed.count("--preset paper") == num_experiments


@pytest.fixture(scope="module")
def quadratic_runs(tmp_path_factory):
  """Two real runs on the quadratic: GD + SAM, and SAM only (~3 s each)."""
  root = tmp_path_factory.mktemp("quadratic")
  runs = {}
  for label, rhos in (("gd_sam", ["0", "0.1"]), ("sam", ["0.05"])):
    runs[label] = str(root / label)
    assert (
        cli.main(
            [
                "run",
                "quadratic",
                "--rho",
                *rhos,
                "--steps",
                "300",
                "--out",
                runs[label],
                "--no-progress",
            ]
        )
        == 0
    )
  return runs


def test_plot_redraws_and_overlays(quadratic_runs, tmp_path, capsys):
  first, second = quadratic_runs["gd_sam"], quadratic_runs["sam"]
  for name in plots.FIGURES:
    os.remove(os.path.join(first, name))
  assert cli.main(["plot", first]) == 0
  for name in plots.FIGURES:
    assert os.path.exists(os.path.join(first, name))
  out = str(tmp_path / "overlay")
  assert (
      cli.main(["plot", first, second, "--out", out, "--x", "wall_time"]) == 0
  )
  printed = capsys.readouterr().out.split()
  assert printed[-len(plots.FIGURES) :] == [
      os.path.join(out, name) for name in plots.FIGURES
  ]
  assert cli.main(["plot", str(tmp_path / "missing")]) == 2
  assert "argument DIR" in capsys.readouterr().err


def test_check_exit_code_follows_the_claims(quadratic_runs, tmp_path, capsys):
  # SAM settles into its 2-cycle at the SAM-edge exactly.
  assert cli.main(["check", quadratic_runs["sam"]]) == 0
  printed = capsys.readouterr().out
  assert "PASS  sam_at_sam_edge    config 0 (eta=0.01, rho=0.05" in printed
  assert "12/12 claims hold (3 of them N/A)" in printed
  assert (
      "SAM offset (eta=0.01, rho=0.05): median sharpness / SAM-edge 1.000"
      in printed
  )
  # GD on a fixed quadratic stays at lam1 = 50, a quarter of 2/eta = 200.
  assert cli.main(["check", quadratic_runs["gd_sam"]]) == 1
  printed = capsys.readouterr().out
  assert (
      "FAIL  gd_at_edge         config 0 (eta=0.01, rho=0, seed=0): "
      "median sharpness / (2/eta) = 0.250"
  ) in printed
  assert "FAIL  gd_at_edge         eta=0.01  rho=0     3 seeds" in printed
  assert cli.main(["check", str(tmp_path / "missing")]) == 2


def test_check_fails_an_incomplete_run(quadratic_runs, tmp_path, capsys):
  out = str(tmp_path / "short")
  assert (
      cli.main(
          [
              "run",
              "quadratic",
              "--rho",
              "0.05",
              "--steps",
              "300",
              "--out",
              out,
              "--no-progress",
          ]
      )
      == 0
  )
  with open(os.path.join(out, "config.json")) as f:
    saved = json.load(f)
  saved["metadata"]["num_steps"] = 400  # as if stopped after 300 of 400
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(saved, f)
  capsys.readouterr()
  assert cli.main(["check", out]) == 1
  assert "for a finished run" in capsys.readouterr().err


def test_data_parallel_run_pads_and_matches_one_device(tmp_path, capsys):
  # 10 examples on 4 devices: padded to 12 with two masked examples, so
  # loss, gradients and sharpness are those of the 10 real examples.
  args = [
      "run",
      "mnist-mlp",
      "--steps",
      "3",
      "--track-every",
      "1",
      "--lanczos-iters",
      "4",
      "--num-examples",
      "10",
      "--no-progress",
  ]
  single, parallel = str(tmp_path / "one"), str(tmp_path / "four")
  assert cli.main(args + ["--out", single]) == 0
  assert cli.main(args + ["--devices", "4", "--out", parallel]) == 0
  assert "'data': 4" in capsys.readouterr().out
  one = history.read_csv(os.path.join(single, "metrics.csv"))
  four = history.read_csv(os.path.join(parallel, "metrics.csv"))
  for column in ("loss", "grad_norm", "sharpness", "sam_edge"):
    np.testing.assert_allclose(
        four[column], one[column], rtol=2e-4, err_msg=column
    )
  with open(os.path.join(parallel, "config.json")) as f:
    assert json.load(f)["num_devices"] == 4


def test_config_shards_split_the_sweep(tmp_path, capsys):
  out = str(tmp_path / "run")
  assert (
      cli.main(
          [
              "run",
              "quadratic",
              "--steps",
              "4",
              "--track-every",
              "2",
              "--lanczos-iters",
              "2",
              "--rho",
              "0",
              "0.1",
              "--config-shards",
              "2",
              "--devices",
              "2",
              "--no-progress",
              "--out",
              out,
          ]
      )
      == 0
  )
  assert "'config': 2" in capsys.readouterr().out
  metrics = history.read_csv(os.path.join(out, "metrics.csv"))
  assert sorted(set(metrics["rho"].tolist())) == [0.0, 0.1]


def test_distributed_run_over_two_processes(tmp_path):
  # Two processes with two CPU devices each train on one 4-device mesh, as
  # two hosts would; only process 0 writes, and the numbers are the
  # single-device run's.
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  args = [
      "run",
      "mnist-mlp",
      "--steps",
      "2",
      "--track-every",
      "1",
      "--lanczos-iters",
      "3",
      "--num-examples",
      "8",
      "--no-progress",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  out = tmp_path / "run"
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "sam_eos.experiments.cli"]
          + args
          + [
              "--distributed",
              "--coordinator",
              f"127.0.0.1:{port}",
              "--num-processes",
              "2",
              "--process-id",
              str(i),
              "--out",
              str(out),
          ],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
  assert "'data': 4" in outputs[0]
  with open(out / "config.json") as f:
    assert json.load(f)["num_devices"] == 4
  reference = str(tmp_path / "one")
  assert cli.main(args + ["--out", reference]) == 0
  four = history.read_csv(out / "metrics.csv")
  one = history.read_csv(os.path.join(reference, "metrics.csv"))
  for column in ("loss", "grad_norm", "sharpness"):
    np.testing.assert_allclose(
        four[column], one[column], rtol=2e-4, err_msg=column
    )


def test_distributed_options_need_distributed(capsys):
  assert cli.main(["run", "--coordinator", "127.0.0.1:1234"]) == 2
  assert "only with --distributed" in capsys.readouterr().err
