"""The code is formatted by pyink (configured in pyproject.toml): `make format`."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_code_is_pyink_formatted():
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "pyink",
          "--check",
          "--diff",
          "sam_eos",
          "tests",
          "benchmarks",
          "docs",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, (
      "Run `make format`; pyink would change:\n" + result.stdout[-3000:]
  )
