"""The notebooks: paired with their .py sources, stripped, and they run.

Every ``notebooks/*.ipynb`` (picked up by glob, so new notebooks are tested
without editing this file) must have a jupytext percent-format twin
``notebooks/*.py`` with the same cells, must be committed without outputs,
and must execute top to bottom in a fresh kernel with ``SAM_EOS_SMALL=1``
(small sizes). The notebooks ``assert`` their own key facts, so a broken
library fails here.

The kernel runs this interpreter (``sys.executable``, through a kernelspec
written to a temporary folder), from ``notebooks/``, with figures written to
a temporary folder instead of ``notebooks/figures/``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
REPO_ROOT = NOTEBOOK_DIR.parent
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9]*.py"))
CELL_TIMEOUT_S = 600
KERNEL_NAME = "sam_eos_notebook_test"


def _cells(nb) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def test_notebooks_found():
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_every_source_has_a_notebook(source: pathlib.Path):
  assert source.with_suffix(".ipynb").exists(), (
      f"{source.name} has no paired notebook; run "
      f"`jupytext --sync notebooks/{source.name}`."
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_and_stripped(path: pathlib.Path):
  jupytext = pytest.importorskip("jupytext")
  source = path.with_suffix(".py")
  assert source.exists(), f"{path.name} has no paired {source.name}"
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert "py:percent" in nb.metadata.get("jupytext", {}).get(
      "formats", ""
  ), f"{path.name} is not paired with a py:percent file"
  text = jupytext.read(source)
  assert _cells(nb) == _cells(text), (
      f"{path.name} and {source.name} differ; run "
      f"`jupytext --sync notebooks/{source.name}` after editing the .py."
  )
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"{path.name} cell {i} has outputs"
      assert (
          cell.execution_count is None
      ), f"{path.name} cell {i} has an execution count"


def _kernel_env(figure_dir: pathlib.Path) -> dict[str, str]:
  """This process's environment, small sizes, figures in ``figure_dir``."""
  env = dict(os.environ)
  env["SAM_EOS_SMALL"] = "1"
  env["SAM_EOS_FIGURES"] = str(figure_dir)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
  )
  # tests/conftest.py fakes eight CPU devices; a user's kernel has one.
  flags = re.sub(
      r"--xla_force_host_platform_device_count=\d+",
      "",
      env.get("XLA_FLAGS", ""),
  ).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env.pop("MPLBACKEND", None)  # the kernel's inline backend
  return env


def _kernel_manager(tmp_path: pathlib.Path):
  """A kernel manager that launches ``sys.executable -m ipykernel_launcher``."""
  pytest.importorskip("ipykernel")
  # pylint: disable=g-import-not-at-top
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  spec_dir = tmp_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
      json.dumps(
          {
              "argv": [
                  sys.executable,
                  "-m",
                  "ipykernel_launcher",
                  "-f",
                  "{connection_file}",
              ],
              "display_name": f"sam_eos tests ({sys.executable})",
              "language": "python",
          }
      )
  )
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


# Notebooks that need a data set beyond the bundled MNIST subset.
DATASETS = {
    "04_cifar10_cnn": "cifar10",
    "05_shakespeare_transformer": "shakespeare",
}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            p,
            marks=[pytest.mark.dataset(DATASETS[p.stem])]
            if p.stem in DATASETS
            else [],
        )
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_runs(path: pathlib.Path, tmp_path: pathlib.Path):
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb,
      km=_kernel_manager(tmp_path),
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  figure_dir = tmp_path / "figures"
  client.execute(env=_kernel_env(figure_dir))
  saved = sorted(p.name for p in figure_dir.glob("*.png"))
  assert all(name.startswith(path.stem + "-") for name in saved), saved
  assert saved, f"{path.name} saved no figure"
