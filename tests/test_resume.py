"""Resuming a run from its out_dir: what is compared, what is refused."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_eos as se
from sam_eos import checkpoint


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(num_examples=12, key=0):
  k = jax.random.split(jax.random.key(key), 4)
  params = {
      "w1": jax.random.normal(k[0], (3, 6)) * 0.8,
      "b1": jnp.zeros(6),
      "w2": jax.random.normal(k[1], (6, 2)) * 0.5,
  }
  data = (
      jax.random.normal(k[2], (num_examples, 3)),
      jax.random.normal(k[3], (num_examples, 2)),
  )
  return params, data


KWARGS = dict(
    learning_rate=0.1,
    rho=0.05,
    track_every=2,
    num_lanczos_iters=3,
    progress=False,
    chunk_size=2,
)


def test_custom_optimizer_run_resumes(tmp_path):
  params, data = mlp_problem()
  kwargs = dict(KWARGS, learning_rate=0.01)
  full = se.train(
      mlp_loss, params, data, num_steps=6, optimizer=optax.adam(1e-2), **kwargs
  )
  se.train(
      mlp_loss,
      params,
      data,
      num_steps=4,
      optimizer=optax.adam(1e-2),
      out_dir=tmp_path,
      **kwargs,
  )
  # A new (equal) optimizer object, as a new process would build.
  resumed = se.train(
      mlp_loss,
      params,
      data,
      num_steps=6,
      optimizer=optax.adam(1e-2),
      out_dir=tmp_path,
      **kwargs,
  )
  chex.assert_trees_all_equal(resumed.params, full.params)
  with pytest.raises(ValueError, match="optimizer"):
    se.train(
        mlp_loss,
        params,
        data,
        num_steps=8,
        optimizer=optax.sgd(1e-2, momentum=0.9),
        out_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p, d: (p, (2 * d[0], d[1])), "data"),
        (lambda p, d: (jax.tree.map(lambda x: x + 0.1, p), d), "params"),
        (
            lambda p, d: (
                {
                    **p,
                    "w1": p["w1"][:, :3],
                    "b1": p["b1"][:3],
                    "w2": p["w2"][:3],
                },
                d,
            ),
            "params",
        ),
    ],
)
def test_resume_refuses_other_data_params_or_model(tmp_path, change, match):
  params, data = mlp_problem()
  se.train(mlp_loss, params, data, num_steps=2, out_dir=tmp_path, **KWARGS)
  other_params, other_data = change(params, data)
  with pytest.raises(ValueError, match=f"other settings.*{match}"):
    se.train(
        mlp_loss,
        other_params,
        other_data,
        num_steps=4,
        out_dir=tmp_path,
        **KWARGS,
    )
  assert se.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [0]


def test_fewer_steps_than_the_checkpoint_holds_is_refused(tmp_path):
  params, data = mlp_problem()
  se.train(mlp_loss, params, data, num_steps=6, out_dir=tmp_path, **KWARGS)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match="num_steps.*4.*6"):
    se.train(mlp_loss, params, data, num_steps=4, out_dir=tmp_path, **KWARGS)
  assert (tmp_path / "config.json").read_text() == before


def test_unrelated_metrics_file_is_not_deleted(tmp_path):
  params, data = mlp_problem()
  (tmp_path / "metrics.csv").write_text("someone else's results\n")
  with pytest.raises(ValueError, match="metrics.csv"):
    se.train(mlp_loss, params, data, num_steps=2, out_dir=tmp_path, **KWARGS)
  assert (tmp_path / "metrics.csv").read_text() == "someone else's results\n"


def test_metadata_is_validated_before_any_file_is_written(tmp_path):
  params, data = mlp_problem()
  with pytest.raises(ValueError, match="metadata"):
    se.train(
        mlp_loss,
        params,
        data,
        num_steps=2,
        out_dir=tmp_path,
        metadata={"when": object()},
        **KWARGS,
    )
  assert not os.listdir(tmp_path)


def test_config_json_is_replaced_atomically(tmp_path):
  params, data = mlp_problem()
  se.train(
      mlp_loss,
      params,
      data,
      num_steps=2,
      out_dir=tmp_path,
      metadata={"run": 1},
      **KWARGS,
  )
  assert sorted(os.listdir(tmp_path)) == [
      "checkpoint.npz",
      "config.json",
      "metrics.csv",
  ]
  assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 2


def test_checkpoint_compares_the_signature_before_the_arrays(tmp_path):
  params, data = mlp_problem()
  se.train(mlp_loss, params, data, num_steps=2, out_dir=tmp_path, **KWARGS)
  template = {"not": jnp.zeros(3)}  # would fail the array checks
  with pytest.raises(ValueError, match="other settings"):
    checkpoint.load(tmp_path / "checkpoint.npz", template, {"other": 1})
