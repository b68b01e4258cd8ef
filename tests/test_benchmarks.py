"""Tests of the benchmarks: their code paths at tiny sizes and their logic.

* Every ``benchmarks/bench_*.py`` runs end to end through its real entry
  point, shrunk (``--quick``), in a subprocess (slow).
* The met / not-met logic and the prose are checked on synthetic rows: the
  numbers a rendering function prints are the ones it was fed.
* The reproduce command in RESULTS.md parses as shell and round-trips.
* The warm starts of the sharpness benchmark are what tracking carries, and
  every method starts from the same vector.

Nothing here asserts on timings.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top
from benchmarks import _common
from benchmarks import bench_sharpness as bs
from benchmarks import bench_training as bt
from benchmarks import run_all

# pylint: enable=g-import-not-at-top


def _samples(*values: float) -> _common.Samples:
  return _common.Samples(tuple(values))


def _row(key: str, kind: str, seconds: float, work: float = 10.0) -> bs.Row:
  return bs.Row(
      method=f"method {key}",
      key=key,
      setting="s",
      kind=kind,
      unit="HVP",
      times=_samples(seconds, seconds * 1.1),
      per_check=seconds,
      compile=0.5,
      first_call=seconds,
      work=work,
      median_err=1e-5,
      max_err=1e-4,
      complete=True,
  )


# ----------------------------------------------------- logic and prose --


def test_samples_statistics():
  s = _samples(1.0, 2.0, 4.0)
  assert s.median == 2.0 and s.low == 1.0 and s.high == 4.0
  assert s.spread == pytest.approx(1.5)
  assert _common.fmt_spread(s) == "±75% (n=3)"
  assert _samples(3.0).spread == 0.0


def test_sharpness_targets_met_and_not_met():
  found = {
      ("ours", "cold"): _row("ours", "cold", 0.10, work=12),
      ("eigsh", "cold"): _row("eigsh", "cold", 0.25, work=30),
      ("lobpcg", "cold"): _row("lobpcg", "cold", 0.15, work=18),
      ("pyhessian", "cold"): None,
      ("matfree", "cold"): _row("matfree", "cold", 0.09, work=12),
      ("ours", "warm"): _row("ours", "warm", 0.05),
      ("matfree", "warm"): _row("matfree", "warm", 0.06),
  }
  lines = bs.targets(found)
  text = "\n".join(lines)
  assert "method eigsh cold: 2.50x -> met." in text
  assert "method lobpcg cold: 1.50x -> NOT met." in text
  assert "pyhessian did not reach" in text and "NOT determined" in text
  cold, warm = [line for line in lines if "matfree" in line]
  assert "cold" in cold and "0.90x" in cold and cold.endswith("NOT met.")
  assert "warm" in warm and "1.20x" in warm and warm.endswith("-> met.")
  why = "\n".join(bs.why_not(found))
  # lobpcg missed 2x: 18 products vs our 12 = 1.50x the work.
  assert "why lobpcg" in why and "18 products against our 12" in why
  assert "1.50x the work" in why
  assert "why eigsh" not in why


def test_sharpness_targets_when_ours_fails():
  lines = bs.targets({("ours", "cold"): None})
  assert len(lines) == 1 and "NOT met" in lines[0]


def test_sharpness_row_cells_carry_the_numbers():
  cells = bs.row_cells(_row("eigsh", "warm", 0.0123, work=17))
  assert cells[3] == "12.3 ms"
  assert cells[4] == _common.fmt_spread(_samples(0.0123, 0.0123 * 1.1))
  assert cells[5] == "512.3 ms"  # one-off = compile 0.5 s + first call
  assert cells[6] == "17 HVP"
  assert cells[7:] == ["1.0e-05", "1.0e-04"]


def test_training_targets_met_and_not_met():
  lines = bt.targets(
      10,
      1e-3,
      _samples(0.5, 0.6, 0.8),
      _samples(6.0, 7.0),
      2e-4,
      3e-2,
      _samples(1.05, 1.2, 1.3),
  )
  overhead, authors, sweep = lines
  assert "+60% (rounds +50% to +80%) -> met." in overhead
  assert "every 10 steps" in overhead
  assert "2.0e-04 vs their median 3.0e-02: yes" in authors
  assert "6.50x" in authors and authors.endswith("-> met.")
  assert "1.20x (rounds 1.05x to 1.30x) -> NOT met." in sweep
  # Faster but less accurate than the authors is not a met target.
  _, authors, _ = bt.targets(
      10,
      1e-3,
      _samples(0.9),
      _samples(9.0),
      5e-2,
      3e-2,
      _samples(1.0),
  )
  assert ": no)" in authors and authors.endswith("NOT met.")


def test_training_why_overhead_uses_the_measurements():
  run = bt.Tracked(
      cadence=10,
      vectors=3,
      seconds=_samples(0.040),
      products=np.array([10.0, 14.0, 12.0]),
      cold_products=20.0,
      errors=np.array([1e-5]),
      max_residual=1e-3,
      loss_diff=0.0,
  )
  text = bt.why_overhead(run, _samples(0.020), bt.FULL, 0.010, 0.012)
  # check = (40 - 20) ms x 10 = 200 ms = 10 plain steps; mean 12 products.
  assert "200.0 ms = 10.0 plain SAM steps" in text
  assert "mean of 12.0 products" in text and "max 14" in text
  assert "cold first check 20" in text
  # 70% of 10 steps x 20 ms = 140 ms = 11.7 products of 12 ms.
  assert "140.0 ms per check" in text and "11.7 products" in text
  # 12 products x 12 ms = 144 ms (+72% of 10 x 20 ms); 56 ms (28%) is rest.
  assert "make 144.0 ms (+72%)" in text and "56.0 ms (28% of a check)" in text
  why = bt.why_authors(run, _samples(0.130), _samples(0.020))
  # theirs (130 - 20) x 10 = 1.1 s, ours 200 ms: 5.50x per check; per step
  # 130 / 40 = 3.25x.
  assert "1.10 s" in why and "200.0 ms: 5.50x" in why and "3.25x" in why


def test_training_accuracy_aligns_steps():
  reference = {
      "step": np.array([0, 5, 10, 15]),
      "sharpness": np.array([1.0, 2.0, 4.0, 8.0]),
      "loss": np.array([1.0, 1.0, 1.0, 1.0]),
  }
  history = {
      "step": np.array([0, 10]),
      "sharpness": np.array([1.1, 4.0]),
      "loss": np.array([1.0, 1.5]),
  }
  errors, loss_diff = bt.accuracy(history, reference)
  np.testing.assert_allclose(errors, [0.1, 0.0], atol=1e-12)
  assert loss_diff == pytest.approx(0.5)


def test_reference_run_covers_every_tracked_step():
  for case in (bt.FULL, bt.QUICK):
    every = bt.reference_cadence(case)
    assert all(c % every == 0 for c in case.cadences + (case.track_every,))


def test_run_all_reports_a_failed_benchmark(tmp_path, monkeypatch):
  class Failed:
    returncode, stdout = 1, "partial"

  monkeypatch.setattr(run_all.subprocess, "run", lambda *a, **k: Failed())
  section, _, _ = run_all._run_one("bench_x", True, None)  # pylint: disable=protected-access
  assert "FAILED (exit status 1)" in section and "partial" not in section


def test_load_sentence_reports_the_load():
  busy = run_all.load_sentence((3.9, 3.0, 2.0), (4.2, 3.1, 2.1), 2)
  assert "3.90 / 3.00 / 2.00" in busy and "4.20 / 3.10 / 2.10" in busy
  assert "shared" in busy and "4.20 exceeds its 2 cores" in busy
  assert "idle" not in busy
  idle = run_all.load_sentence((0.1, 0.1, 0.1), (0.3, 0.2, 0.1), 2)
  assert "otherwise idle" in idle


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--note", "load (3.9) from experiment reruns; see issue #13"],
        ["--only", "bench_training", "--repeats", "2"],
    ],
)
def test_reproduce_command_parses_as_shell(argv):
  command = run_all.reproduce_command(argv)
  assert shlex.split(command) == [
      ".venv/bin/python",
      "-m",
      "benchmarks.run_all",
      *argv,
  ]
  # bash itself accepts it (no unquoted parentheses).
  subprocess.run(["bash", "-n", "-c", command], check=True)


def test_run_all_writes_every_section(tmp_path, monkeypatch):
  def fake(name, quick, repeats):
    assert quick and repeats == 2
    return f"## {name}\n\n| a |\n|---|\n| 1 |\n", 0.5, "0.00 / 0.00 / 0.00"

  monkeypatch.setattr(run_all, "_run_one", fake)
  out = tmp_path / "RESULTS.md"
  argv = ["--quick", "--repeats", "2", "--out", str(out), "--note", "a (b)"]
  assert run_all.main(argv) == 0
  text = out.read_text(encoding="utf-8")
  assert run_all.reproduce_command(argv) in text
  assert "**Conditions:** a (b)" in text
  for field in ("commit", "cpu", "cores", "jax", "jaxlib", "numpy", "scipy"):
    assert f"| {field} |" in text
  assert "Load average (1 / 5 / 15 min) before the run" in text
  for name in run_all.BENCHMARKS:
    assert f"## {name}" in text


def test_update_sections_replaces_one_and_appends_another(tmp_path):
  out = tmp_path / "RESULTS.md"
  out.write_text(
      "# Benchmarks\n\n## Old (bench_a.py)\n\nold\n\n## B (bench_b.py)\n\nb\n"
  )
  run_all.update_sections(
      out,
      "cmd --x",
      {
          "bench_a": "## New (bench_a.py)\n\nnew",
          "bench_c": "## C (bench_c.py)\n\nc",
      },
  )
  text = out.read_text()
  assert "old" not in text and "## New (bench_a.py)\n\nnew" in text
  assert text.index("bench_a.py") < text.index("## B (bench_b.py)\n\nb")
  assert text.rstrip().split("## ")[-1].startswith("C (bench_c.py)")
  assert text.count("updated by `cmd --x`") == 2


@pytest.mark.parametrize("name", run_all.BENCHMARKS)
def test_every_benchmark_has_main_and_run(name):
  module = __import__(f"benchmarks.{name}", fromlist=["main", "run"])
  assert callable(module.main) and callable(module.run)


# ------------------------------------------- warm starts and same starts --


@pytest.fixture(scope="module")
def quick_problem():
  return bs.make_problem(bs.QUICK_SPECS[0])


def test_warm_start_is_what_tracking_carries(quick_problem):
  spec = quick_problem.spec
  point = quick_problem.points[0]
  # Re-run the tracking by hand: the block carried into the check at
  # `step` is the Ritz block of the check `gap` steps earlier.
  params = _common.mlp_init(jax.random.key(0), _common.mlp_widths(spec.hidden))
  carried = jax.random.normal(
      jax.random.key(1), (bs.TRACK_VECTORS, quick_problem.num_params)
  )
  advance = bs.sam_chunk(spec.learning_rate, spec.rho, spec.gap)
  for _ in range(point.step // spec.gap):
    carried, products = bs.track_check(params, quick_problem.batch, carried)
    params = advance(params, quick_problem.batch)
  np.testing.assert_allclose(point.carried, carried, atol=1e-5)
  assert 1 <= int(products) <= bs.TRACK_CAP
  # Unit rows, top first, and a good start: the top carried vector's
  # Rayleigh quotient is close to the float64 reference.
  np.testing.assert_allclose(
      jnp.linalg.norm(point.carried, axis=1), 1.0, rtol=1e-4
  )
  assert point.residual < 1e-2 * abs(point.reference)


def test_every_method_runs_on_the_shared_starts(quick_problem):
  warm = quick_problem.starts("warm")
  block = quick_problem.starts("block")
  cold = quick_problem.starts("cold")
  for w, b in zip(warm, block):  # warm = the top row of the carried block
    np.testing.assert_array_equal(w.vector, b.vector[0])
  assert quick_problem.starts("cold") is cold  # cached: the same vectors
  for key, method in bs.methods().items():
    if key in ("authors", "pyhessian"):
      continue  # slow / torch; covered by the quick run
    for kind in method.kinds:
      start = quick_problem.starts(kind)[0]
      call, _ = method.prepare(
          quick_problem, quick_problem.spec.grids[key][0][-1], start
      )
      value, work = call(start)
      assert np.isfinite(value) and work >= 1


def test_torch_vector_matches_the_torch_parameter_order(quick_problem):
  pytest.importorskip("torch")
  from benchmarks import _peers  # pylint: disable=g-import-not-at-top

  point = quick_problem.points[0]
  flat, _ = ravel_pytree(point.params)
  pieces = _peers.torch_vector(flat, point.params)
  model = _peers.torch_mlp(point.params)
  for piece, param in zip(pieces, model.parameters()):
    np.testing.assert_allclose(piece.numpy(), param.detach().numpy())


def test_evaluator_finds_the_cheapest_accurate_setting(quick_problem):
  evaluator = bs.Evaluator(quick_problem)
  method = bs.methods()["ours"]
  row, trials = evaluator.equal_accuracy("ours", method, "cold")
  assert trials and all(t.kind == "cold" for t in trials)
  if row is not None:
    assert row.complete and row.max_err <= bs.TARGET_ERROR
    passing = [t for t in trials if t.error <= bs.TARGET_ERROR]
    assert row.setting in {t.setting for t in passing}


# ------------------------------------------------- end to end (slow) --


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


@pytest.mark.slow
def test_sharpness_quick(tmp_path):
  text = _run_quick("bench_sharpness", tmp_path, "--figure-dir", str(tmp_path))
  assert "## Sharpness estimation" in text and "Targets (equal accuracy" in text
  for method in (
      "sam_eos hessian_eigenpairs",
      "authors' protocol",
      "SciPy eigsh",
      "lobpcg_standard",
  ):
    assert method in text
  assert (tmp_path / "sharpness_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_sam_step_quick(tmp_path):
  text = _run_quick("bench_sam_step", tmp_path)
  assert "## SAM step time" in text
  for row in ("floor: 2 chained", "GD (optax.sgd)", "se.sam(optax.sgd)"):
    assert row in text
  assert "SAM / GD <= 2.05" in text


@pytest.mark.slow
def test_training_quick(tmp_path):
  text = _run_quick("bench_training", tmp_path, "--figure-dir", str(tmp_path))
  assert "## Training loop" in text
  for row in ("plain SAM", "se.train", "authors' loop style", "mixed sweep"):
    assert row in text
  assert (tmp_path / "tracking_overhead.png").stat().st_size > 0


@pytest.mark.slow
def test_scaling_quick(tmp_path):
  figure = tmp_path / "scaling.png"
  text = _run_quick("bench_scaling", tmp_path, "--figure", str(figure))
  assert "## Scaling" in text and "slope" in text
  assert figure.stat().st_size > 0
