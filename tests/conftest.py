"""Shared test setup: 8 CPU devices, the real data, float64, no network.

``$SAM_EOS_DATA`` defaults to the project's ``shared/data`` folder (beside the
repository root) when it exists, so tests read the real files; otherwise the
loaders fall back to the subset bundled with the package. Downloads are
disabled for every test: a test that needs one patches
``sam_eos.experiments.data._download`` itself.

Tests that need data the bundled subset lacks are skipped, with the
reason, on a machine without ``shared/data``: those marked
``@pytest.mark.dataset(name)`` when that data set is missing (for MNIST,
when more than the bundled 2,000 training images are missing), and those
parametrized by an experiment ``name`` when its cpu preset's training or
held-out data cannot be loaded.
"""

from __future__ import annotations

import os

# Eight fake CPU devices for the data-parallel tests; set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8"
  ).strip()

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Iterator

import jax
import pytest

from sam_eos.experiments import data, presets, runner

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SHARED_DATA = _REPO_ROOT.parent / "shared" / "data"
if _SHARED_DATA.is_dir():
  os.environ.setdefault(data.ENV_VAR, str(_SHARED_DATA))


@pytest.fixture
def x64() -> Iterator[None]:
  """Runs the test with float64 enabled (``jax.enable_x64``)."""
  with jax.enable_x64(True):
    yield


def _no_download(url: str, path: pathlib.Path) -> None:
  raise OSError(f"network access is disabled in tests (asked for {url})")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
  """Makes every download fail, so no test can reach the network."""
  monkeypatch.setattr(data, "_download", _no_download)


@functools.lru_cache(maxsize=None)
def _available(dataset: str) -> bool:
  """Whether the loaders find ``dataset`` locally (no download)."""
  load = {
      "mnist": lambda: data.load_mnist("train", num_examples=2_001),
      "cifar10": lambda: data.load_cifar10("train", num_examples=1),
      "shakespeare": lambda: data.load_shakespeare("train"),
      "quadratic": lambda: None,
  }[dataset]
  return _loads(load)


@functools.lru_cache(maxsize=None)
def _preset_available(name: str) -> bool:
  """Whether the cpu preset of ``name`` finds its data locally."""
  config = presets.get_experiment(name, "cpu")
  return _loads(
      lambda: (runner.load_data(config), runner.load_test_data(config))
  )


def _loads(load) -> bool:
  """Whether ``load()`` succeeds with downloads disabled."""
  original, data._download = data._download, _no_download  # pylint: disable=protected-access
  try:
    load()
    return True
  except data.DataUnavailableError:
    return False
  finally:
    data._download = original  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def _needs_data(request: pytest.FixtureRequest) -> None:
  """Skips a test whose data set is not on this machine (see above)."""
  needed = [m.args[0] for m in request.node.iter_markers("dataset")]
  callspec = getattr(request.node, "callspec", None)
  name = callspec.params.get("name") if callspec else None
  if (
      isinstance(name, str)
      and name in presets.EXPERIMENTS
      and not _preset_available(name)
  ):
    pytest.skip(
        f"the data of the {name} cpu preset are not available: point "
        f"${data.ENV_VAR} at a copy (see shared/data/README.md)"
    )
  for dataset in needed:
    if not _available(dataset):
      pytest.skip(
          f"the {dataset} data set is not available: point "
          f"${data.ENV_VAR} at a copy (see shared/data/README.md)"
      )
