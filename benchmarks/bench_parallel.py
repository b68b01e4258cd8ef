"""Time per step of data-parallel ``se.train`` against the device count.

On this CPU machine the devices are fake (``--xla_force_host_platform_device_count``
splits one host into N devices that share its cores), so the table checks
the plumbing and its overhead, not speed-up; on a GPU/TPU host run it with
real devices. Each device count runs in a fresh subprocess (XLA reads the
flag at start-up). Also checks that every device count reproduces the
single-device history (max relative difference of the sharpness column).

Usage: ``python -m benchmarks.bench_parallel [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

DEVICE_COUNTS = (1, 2, 4, 8)


def worker(
    num_devices: int, num_examples: int, width: int, num_steps: int
) -> dict[str, float | list[float]]:
  """Runs in the subprocess: one SAM run with tracking on ``num_devices``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import sam_eos as se  # pylint: disable=g-import-not-at-top

  k = jax.random.split(jax.random.key(0), 4)
  params = {
      "w1": jax.random.normal(k[0], (784, width)) / 28.0,
      "b1": jnp.zeros(width),
      "w2": jax.random.normal(k[1], (width, 10)) / np.sqrt(width),
  }
  data = (
      jax.random.normal(k[2], (num_examples, 784)),
      jax.nn.one_hot(jax.random.randint(k[3], (num_examples,), 0, 10), 10),
  )

  def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  mesh = se.data_mesh(num_devices)
  kwargs = dict(
      learning_rate=0.1,
      rho=0.05,
      track_every=10,
      num_lanczos_iters=10,
      progress=False,
      mesh=mesh,
      chunk_size=num_steps,
  )
  result = se.train(loss_fn, params, data, num_steps=num_steps, **kwargs)
  # One chunk: wall_time (compile excluded) is interpolated linearly in the
  # step from the chunk's measured duration, so this recovers that duration.
  hist = result.history
  elapsed = hist["wall_time"][-1] * num_steps / (hist["step"][-1] + 1)
  return {
      "seconds_per_step": elapsed / num_steps,
      "sharpness": result.history["sharpness"].tolist(),
      "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
  }


def run(quick: bool = False) -> list[dict[str, float]]:
  """Times every device count in its own subprocess.

  Args:
    quick: tiny sizes (for the smoke test).

  Returns:
    One row per device count.
  """
  num_examples, width, num_steps = (64, 32, 10) if quick else (2048, 512, 60)
  rows, reference = [], None
  for n in DEVICE_COUNTS:
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"
    )
    code = (
        "import json, sys; from benchmarks.bench_parallel import worker; "
        f"print(json.dumps(worker({n}, {num_examples}, {width}, {num_steps})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    sharp = np.asarray(result["sharpness"])
    reference = sharp if reference is None else reference
    rows.append(
        {
            "devices": n,
            "ms_per_step": 1e3 * result["seconds_per_step"],
            "max_rel_diff_sharpness": float(
                np.max(np.abs(sharp - reference) / np.abs(reference))
            ),
            "device_kind": result["device_kind"],
            "jax_version": result["jax_version"],
        }
    )
  return rows


def table(rows: list[dict[str, float]]) -> str:
  """Markdown table of :func:`run`'s rows."""
  first = rows[0]
  lines = [
      "Data-parallel `se.train(..., mesh=se.data_mesh(n))`: SAM with "
      "tracking every 10 steps, an MLP on a full batch, on "
      f"{first['device_kind']} devices (JAX "
      f"{first['jax_version']}). On a CPU the devices are fake: they "
      "share the same cores, so this checks the sharding plumbing, its "
      "overhead and the agreement with one device, not speed-up. No GPU "
      "was lent for real-device numbers.",
      "",
      "| devices | ms / step (SAM, tracking every 10) | vs 1 device | "
      "max rel. diff. of sharpness vs 1 device |",
      "|---:|---:|---:|---:|",
  ]
  base = rows[0]["ms_per_step"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['ms_per_step']:.1f} | "
        f"{r['ms_per_step'] / base:.2f}x | "
        f"{r['max_rel_diff_sharpness']:.1e} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes")
  args = parser.parse_args(argv)
  out = table(run(args.quick))
  print(out)
  return out


if __name__ == "__main__":
  main()
