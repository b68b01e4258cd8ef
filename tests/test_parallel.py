"""Data parallelism over a device mesh: equal results, real sharding, padding.

conftest.py gives this process 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

import os
import pathlib
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos as se
from sam_eos import loop, parallel
from sam_eos.sam import perturbed_gradient

COLUMNS = ("loss", "grad_norm", "sharpness", "sam_edge")


def per_example_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2, axis=-1)


def mlp_loss(params, batch):
  return jnp.mean(per_example_loss(params, batch))


def mlp_problem(num_examples=64, key=0):
  k = jax.random.split(jax.random.key(key), 4)
  params = {
      "w1": jax.random.normal(k[0], (5, 16)) * 0.5,
      "b1": jnp.zeros(16),
      "w2": jax.random.normal(k[1], (16, 3)) * 0.3,
  }
  data = (
      jax.random.normal(k[2], (num_examples, 5)),
      jax.random.normal(k[3], (num_examples, 3)),
  )
  return params, data


def run(mesh=None, data=None, loss=mlp_loss, **kwargs):
  params, default_data = mlp_problem()
  settings = dict(
      learning_rate=0.1,
      rho=0.05,
      num_steps=50,
      track_every=10,
      num_lanczos_iters=10,
      progress=False,
  )
  settings.update(kwargs)
  return se.train(
      loss,
      params,
      default_data if data is None else data,
      mesh=mesh,
      **settings,
  )


def assert_close(result, reference, rtol=1e-5):
  for name in COLUMNS:
    chex.assert_trees_all_close(
        result.history[name], reference.history[name], rtol=rtol, atol=1e-6
    )
  # |cos| of nearly orthogonal vectors: limited by the Ritz vector's accuracy.
  for name in ("grad_alignment", "sam_grad_alignment"):
    chex.assert_trees_all_close(
        result.history[name], reference.history[name], atol=1e-5
    )
  chex.assert_trees_all_close(
      result.params, reference.params, rtol=rtol, atol=1e-6
  )


def test_eight_devices_available():
  assert jax.device_count() >= 8


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_data_is_sharded_per_device(num_devices):
  _, data = mlp_problem()
  sharded = parallel.shard_data(data, se.data_mesh(num_devices))
  for leaf in jax.tree.leaves(sharded):
    shapes = {shard.data.shape for shard in leaf.addressable_shards}
    assert shapes == {(64 // num_devices, leaf.shape[1])}
    assert len(leaf.sharding.device_set) == num_devices


def test_sam_run_agrees_across_device_counts():
  reference = run()
  for num_devices in (1, 2, 4, 8):
    assert_close(run(se.data_mesh(num_devices)), reference)


def test_minibatch_is_drawn_sharded():
  _, data = mlp_problem()
  mesh = se.data_mesh(4)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")
  )
  seen = []

  @jax.jit
  def draw(data, key):
    batch = loop.sample_batch(data, key, 16, sharding)
    jax.debug.inspect_array_sharding(batch[0], callback=seen.append)
    return batch

  batch = draw(parallel.shard_data(data, mesh), jax.random.key(0))
  assert seen and seen[0].is_equivalent_to(sharding, 2)
  assert {s.data.shape for s in batch[0].addressable_shards} == {(4, 5)}
  minibatch = run(batch_size=16, key=3, num_steps=20)
  assert_close(
      run(se.data_mesh(4), batch_size=16, key=3, num_steps=20), minibatch
  )


def test_padding_with_mask_is_exact():
  params, data = mlp_problem(num_examples=10)
  padded, mask = se.pad_to_multiple(data, 4)
  assert padded[0].shape == (12, 5) and float(mask.sum()) == 10
  masked = se.masked_mean(per_example_loss)
  chex.assert_trees_all_close(
      masked(params, (padded, mask)), mlp_loss(params, data), rtol=1e-6
  )
  chex.assert_trees_all_close(
      jax.grad(masked)(params, (padded, mask)),
      jax.grad(mlp_loss)(params, data),
      rtol=1e-5,
      atol=1e-7,
  )
  reference = run(data=data, num_steps=20)
  assert_close(
      run(se.data_mesh(4), data=(padded, mask), loss=masked, num_steps=20),
      reference,
  )
  with pytest.raises(ValueError, match="pad_to_multiple"):
    run(se.data_mesh(4), data=data)


def test_per_shard_sam_matches_its_definition_and_differs_from_global():
  params, data = mlp_problem()
  eta, rho, m = 0.1, 0.05, 4
  result = run(se.data_mesh(4), num_steps=3, m_sharpness=m, track_every=1)
  global_sam = run(num_steps=3, track_every=1)
  w = params
  grad = jax.grad(mlp_loss)
  for _ in range(3):
    per_group = []
    for i in range(m):
      group = jax.tree.map(lambda x: x[i * 16 : (i + 1) * 16], data)
      out = se.sam_gradient(mlp_loss, w, group, rho=rho)
      per_group.append(out.sam_grads)
    mean = jax.tree.map(lambda *g: sum(g) / m, *per_group)
    w = jax.tree.map(lambda p, g: p - eta * g, w, mean)
  chex.assert_trees_all_close(result.params, w, rtol=1e-5, atol=1e-6)
  diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(
          jax.tree.leaves(result.params), jax.tree.leaves(global_sam.params)
      )
  )
  assert diff > 1e-4
  # The tracked quantities stay global-batch ones.
  chex.assert_trees_all_close(
      result.history["grad_norm"][0],
      jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad(params, data)))),
      rtol=1e-5,
  )


def test_sweep_on_config_by_data_mesh():
  rhos = [0.0, 0.05]
  reference = run(rho=rhos, num_steps=20)
  mesh = se.data_mesh(8, num_config_shards=2)
  assert dict(mesh.shape) == {"config": 2, "data": 4}
  result = run(mesh, rho=rhos, num_steps=20)
  assert_close(result, reference)
  leaf = jax.tree.leaves(result.params)[0]
  assert leaf.shape[0] == 2


def test_mesh_errors():
  with pytest.raises(ValueError, match="num_devices"):
    se.data_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match="num_config_shards"):
    se.data_mesh(8, num_config_shards=3)
  with pytest.raises(ValueError, match="batch_size"):
    run(se.data_mesh(8), batch_size=12)
  bad = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
  with pytest.raises(ValueError, match="'data' axis"):
    run(bad)
  with pytest.raises(ValueError, match="configurations"):
    run(se.data_mesh(8, num_config_shards=2), rho=[0.0, 0.01, 0.1])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(out_dir: pathlib.Path, mode: str) -> list:
  """Runs multiprocess_worker.py as 2 processes x 2 CPU devices."""
  port = _free_port()
  here = pathlib.Path(__file__).parent
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              str(here / "multiprocess_worker.py"),
              str(i),
              "2",
              str(port),
              str(out_dir),
              mode,
          ],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [np.load(out_dir / f"result_{i}.npz") for i in range(2)]
  assert int(results[0]["num_devices"]) == 4
  return results


def test_two_processes_sweep_over_config_axis_checkpoints(tmp_path):
  results = _run_two_processes(tmp_path, "sweep")
  reference = run(
      rho=[0.0, 0.05], num_steps=20, track_every=5, num_lanczos_iters=8
  )
  for r in results:
    chex.assert_trees_all_close(
        r["sharpness"], reference.history["sharpness"], rtol=1e-5
    )
  assert "checkpoint.npz" in os.listdir(tmp_path)
  rows = se.read_csv(tmp_path / "metrics.csv")
  assert rows["step"].tolist() == [0, 0, 5, 5, 10, 10, 15, 15]


def test_two_processes_train_together_and_only_process_zero_writes(tmp_path):
  results = _run_two_processes(tmp_path, "single")
  reference = run(num_steps=20, track_every=5, num_lanczos_iters=8)
  for r in results:
    chex.assert_trees_all_close(
        r["sharpness"], reference.history["sharpness"], rtol=1e-5
    )
    chex.assert_trees_all_close(
        r["grad_norm"], reference.history["grad_norm"], rtol=1e-5
    )
  assert sorted(os.listdir(tmp_path)) == [
      "checkpoint.npz",
      "config.json",
      "metrics.csv",
      "result_0.npz",
      "result_1.npz",
  ]
  assert se.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [
      0,
      5,
      10,
      15,
  ]


def test_minibatches_on_a_mesh_draw_real_examples_only():
  _, data = mlp_problem(num_examples=10)  # not a multiple of 4 devices
  kwargs = dict(data=data, batch_size=4, key=3, num_steps=20)
  assert_close(run(se.data_mesh(4), **kwargs), run(**kwargs))
  padded = jax.tree.map(
      lambda x: jnp.concatenate([x, jnp.full((2,) + x.shape[1:], jnp.nan)]),
      data,
  )
  for t in range(20):
    batch = loop.sample_batch(padded, jax.random.key(t), 4, num_examples=10)
    assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(batch))


def test_perturbed_gradient_constrains_the_groups_to_the_sharding():
  params, data = mlp_problem()
  mesh = se.data_mesh(4)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")
  )
  grads = jax.grad(mlp_loss)(params, data)

  def fn(group_sharding):
    return jax.jit(
        lambda p, b, g: perturbed_gradient(
            mlp_loss,
            p,
            b,
            g,
            rho=0.05,
            m_sharpness=4,
            group_sharding=group_sharding,
        )
    )

  sharded = parallel.shard_data(data, mesh)
  lowered = (
      lambda group_sharding: fn(group_sharding)
      .lower(params, sharded, grads)
      .as_text()
  )
  assert "sharding_constraint" in lowered(sharding)
  assert "sharding_constraint" not in lowered(None)
  chex.assert_trees_all_close(
      fn(sharding)(params, sharded, grads),
      fn(None)(params, data, grads),
      rtol=1e-5,
      atol=1e-7,
  )
