"""One process of the multi-process test (run by tests/test_parallel.py).

Usage: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
[MODE]``. Each process has 2 CPU devices; together they train on one global
mesh: one run over a ``data`` axis (MODE ``single``, the default), or a sweep
over two radii split along a ``config`` axis of 2 (MODE ``sweep``).
"""

import os
import sys


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_dir, *mode = argv
  sweep = mode == ["sweep"]
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=int(num_processes),
      process_id=int(process_id),
  )
  import numpy as np  # pylint: disable=g-import-not-at-top
  import sam_eos as se  # pylint: disable=g-import-not-at-top
  from test_parallel import mlp_loss, mlp_problem  # pylint: disable=g-import-not-at-top

  params, data = mlp_problem()
  mesh = se.data_mesh(num_config_shards=2 if sweep else 1)
  result = se.train(
      mlp_loss,
      params,
      data,
      learning_rate=0.1,
      rho=[0.0, 0.05] if sweep else 0.05,
      num_steps=20,
      track_every=5,
      num_lanczos_iters=8,
      mesh=mesh,
      out_dir=out_dir,
      progress=False,
      chunk_size=10,
  )
  np.savez(
      os.path.join(out_dir, f"result_{process_id}.npz"),
      sharpness=result.history["sharpness"],
      grad_norm=result.history["grad_norm"],
      num_devices=jax.device_count(),
  )


if __name__ == "__main__":
  main(sys.argv[1:])
