"""Shared test setup: 8 CPU devices, the real data, float64, no network.

``$SAM_EOS_DATA`` defaults to the project's ``shared/data`` folder (beside the
repository root) when it exists, so tests read the real files; otherwise the
loaders fall back to the subset bundled with the package. Downloads are
disabled for every test: a test that needs one patches
``sam_eos.experiments.data._download`` itself.
"""

from __future__ import annotations

import os

# Eight fake CPU devices for the data-parallel tests; set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Iterator

import jax
import pytest

from sam_eos.experiments import data

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
