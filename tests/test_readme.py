"""The README stays true: its code runs and its figures match their runs.

- Every ```python block of README.md runs, in order, in one namespace (the
  mesh examples on the eight CPU devices that tests/conftest.py fakes).
- The committed runs behind the README's figures (``docs/figures/NAME``,
  written by ``docs/make_figures.py``) were made with today's ``cpu``
  presets, hold the paper's claims, and the README's table is the one that
  script writes from them.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import pytest

from sam_eos import history
from sam_eos.experiments import claims, plots, presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _make_figures():
  spec = importlib.util.spec_from_file_location(
      "make_figures", ROOT / "docs" / "make_figures.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


MAKE_FIGURES = _make_figures()


def test_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert len(blocks) >= 2
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  assert set(result.history) >= set(history.HISTORY_COLUMNS)
  assert namespace["lam"] > 0 and namespace["edge"] > 0


@pytest.mark.parametrize("name", MAKE_FIGURES.EXPERIMENTS)
def test_figures_come_from_the_current_cpu_preset(name):
  run = ROOT / "docs" / "figures" / name
  for figure in plots.FIGURES:
    assert (run / figure).exists(), f"{run / figure}: run `make figures`"
  with open(run / "config.json") as f:
    saved = json.load(f)["metadata"]
  current = json.loads(
      json.dumps(presets.get_experiment(name, "cpu").to_dict())
  )
  assert saved == current, (
      f"docs/figures/{name} was made with other "
      "settings than the cpu preset; run `make figures`"
  )
  found = claims.check_claims(history.read_csv(run / "metrics.csv"))
  known = presets.KNOWN_FAILURES.get(name, {})
  unexpected = [
      str(c)
      for c in found
      if not c.passed and (c.name, c.learning_rate, c.rho) not in known
  ]
  assert not unexpected, "\n".join(unexpected)


def test_readme_table_is_the_generated_one():
  table = README.split(MAKE_FIGURES.START)[1].split(MAKE_FIGURES.END)[0]
  assert table.strip().splitlines() == MAKE_FIGURES.table_rows(), (
      "README's figure table is stale; run `python docs/make_figures.py "
      "--table` (or `make figures` to rerun the experiments)"
  )
  for name in MAKE_FIGURES.EXPERIMENTS:
    assert f"docs/figures/{name}/sharpness.png" in README
  failures = README.split(MAKE_FIGURES.FAILURES_START)[1].split(
      MAKE_FIGURES.FAILURES_END
  )[0]
  assert failures.strip().splitlines() == MAKE_FIGURES.failure_lines(), (
      "README's list of failing claims is stale; run `python "
      "docs/make_figures.py --table`"
  )
