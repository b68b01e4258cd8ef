"""Smoke tests: every benchmark script runs end to end at a tiny size.

Each ``benchmarks/bench_*.py`` runs as ``python -m benchmarks.NAME --quick
--out FILE`` (its real entry point, shrunk) in a subprocess, and its
markdown section is checked for its tables. ``run_all`` is checked with the
benchmarks replaced by stubs. Nothing here asserts on timings.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from benchmarks import run_all  # pylint: disable=g-import-not-at-top

# Each script takes 0.5-1 minute even shrunk: part of `make test`, not of
# `make test-quick`.
pytestmark = pytest.mark.slow


def _run_quick(name: str, tmp_path: pathlib.Path, *extra: str) -> str:
  out = tmp_path / f"{name}.md"
  subprocess.run(
      [
          sys.executable,
          "-m",
          f"benchmarks.{name}",
          "--quick",
          "--out",
          str(out),
          *extra,
      ],
      cwd=REPO,
      check=True,
      timeout=600,
      stdout=subprocess.DEVNULL,
  )
  return out.read_text(encoding="utf-8")


def test_sharpness_quick(tmp_path):
  text = _run_quick("bench_sharpness", tmp_path)
  assert "## Sharpness estimation" in text
  assert "(a) Default settings" in text and "(b) Equal accuracy" in text
  for method in (
      "sam_eos hessian_eigenpairs",
      "authors' protocol",
      "SciPy eigsh",
      "lobpcg_standard",
  ):
    assert method in text


def test_sam_step_quick(tmp_path):
  text = _run_quick("bench_sam_step", tmp_path)
  assert "## SAM step time" in text
  for row in ("GD (optax.sgd)", "se.sam(optax.sgd)", "optax.contrib.sam"):
    assert row in text
  assert "SAM / GD <= 2.05" in text


def test_training_quick(tmp_path):
  text = _run_quick("bench_training", tmp_path)
  assert "## Training loop" in text
  for row in (
      "se.train, tracking every",
      "tracking off",
      "Python loop",
      "authors' loop style",
  ):
    assert row in text


def test_scaling_quick(tmp_path):
  figure = tmp_path / "scaling.png"
  text = _run_quick("bench_scaling", tmp_path, "--figure", str(figure))
  assert "## Scaling" in text and "slope" in text
  assert figure.stat().st_size > 0


def test_run_all_writes_every_section(tmp_path, monkeypatch):
  def fake(name, quick, repeats):
    assert quick and repeats == 2
    return f"## {name}\n\n| a |\n|---|\n| 1 |\n", 0.5, "0.00 / 0.00 / 0.00"

  monkeypatch.setattr(run_all, "_run_one", fake)
  out = tmp_path / "RESULTS.md"
  assert (
      run_all.main(
          ["--quick", "--repeats", "2", "--out", str(out), "--note", "test"]
      )
      == 0
  )
  text = out.read_text(encoding="utf-8")
  assert "benchmarks.run_all --quick --repeats 2" in text
  assert "**Conditions:** test" in text
  for field in ("cpu", "cores", "jax", "device", "date"):
    assert f"| {field} |" in text
  for name in run_all.BENCHMARKS:
    assert f"## {name}" in text


@pytest.mark.parametrize("name", run_all.BENCHMARKS)
def test_every_benchmark_has_main_and_run(name):
  module = __import__(f"benchmarks.{name}", fromlist=["main", "run"])
  assert callable(module.main) and callable(module.run)
