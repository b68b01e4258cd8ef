"""One process of the multi-process test (run by tests/test_parallel.py).

Usage: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``.
Each process has 2 CPU devices; together they train on one global mesh.
"""

import os
import sys


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_dir = argv
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(num_processes),
                             process_id=int(process_id))
  import numpy as np  # pylint: disable=g-import-not-at-top
  import sam_eos as se  # pylint: disable=g-import-not-at-top
  from test_parallel import mlp_loss, mlp_problem  # pylint: disable=g-import-not-at-top

  params, data = mlp_problem()
  result = se.train(mlp_loss, params, data, learning_rate=0.1, rho=0.05,
                    num_steps=20, track_every=5, num_lanczos_iters=8,
                    mesh=se.data_mesh(), out_dir=out_dir, progress=False)
  np.savez(os.path.join(out_dir, f"result_{process_id}.npz"),
           sharpness=result.history["sharpness"],
           grad_norm=result.history["grad_norm"],
           num_devices=jax.device_count())


if __name__ == "__main__":
  main(sys.argv[1:])
