"""Models: exact parameter counts, shapes, causality, initialization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_eos.experiments import models


def _init(model, key, x):
  return jax.jit(models.init_params, static_argnums=0)(model, key, x)


def _apply(model, params, x):
  return jax.jit(model.apply)({"params": params}, x)


def _shapes(model, x):
  return jax.eval_shape(
      lambda k: models.init_params(model, k, x), jax.random.key(0)
  )


def _num_params(model, x):
  return models.count_params(_shapes(model, x))


def _dense(n_in, n_out):
  return n_in * n_out + n_out


def _conv3x3(c_in, c_out):
  return 3 * 3 * c_in * c_out + c_out


IMAGES_MNIST = jnp.zeros((2, 28, 28))
IMAGES_CIFAR = jnp.zeros((2, 32, 32, 3))
TOKENS = jnp.zeros((2, 64), jnp.int32)

# Transformer, per block: 2 LayerNorms (scale + bias), q/k/v projections
# 128 -> 8 heads x 32 with biases, output 256 -> 128, MLP 128 -> 512 -> 128.
_BLOCK = (
    2 * 2 * 128
    + 3 * _dense(128, 8 * 32)
    + _dense(8 * 32, 128)
    + _dense(128, 512)
    + _dense(512, 128)
)
_TRANSFORMER = (
    128 * 128
    + 64 * 128  # token and position embeddings
    + 6 * _BLOCK
    + 2 * 128
    + _dense(128, 128)
)


@pytest.mark.parametrize(
    "name, kwargs, x, expected",
    [
        # paper mnist-mlp: 784-1000-1000-1000-10
        (
            "mlp",
            {},
            IMAGES_MNIST,
            _dense(784, 1000) + 2 * _dense(1000, 1000) + _dense(1000, 10),
        ),
        # cpu preset 784-256-256-10
        (
            "mlp",
            {"hidden_sizes": (256, 256)},
            IMAGES_MNIST,
            _dense(784, 256) + _dense(256, 256) + _dense(256, 10),
        ),
        # paper CNN: conv 3->16, LN(16), pool, conv 16->32, LN(32), pool, 8*8*32->10
        (
            "cnn",
            {},
            IMAGES_CIFAR,
            _conv3x3(3, 16)
            + 2 * 16
            + _conv3x3(16, 32)
            + 2 * 32
            + _dense(8 * 8 * 32, 10),
        ),
        (
            "cnn",
            {"channels": (8, 16)},
            IMAGES_CIFAR,
            _conv3x3(3, 8)
            + 2 * 8
            + _conv3x3(8, 16)
            + 2 * 16
            + _dense(8 * 8 * 16, 10),
        ),
        # Cohen et al.: fc-tanh 3072-200-200-10, cnn-relu 32/32 channels, no norm
        (
            "fc-tanh",
            {},
            IMAGES_CIFAR,
            _dense(3072, 200) + _dense(200, 200) + _dense(200, 10),
        ),
        (
            "cnn-relu",
            {},
            IMAGES_CIFAR,
            _conv3x3(3, 32) + _conv3x3(32, 32) + _dense(8 * 8 * 32, 10),
        ),
        ("transformer", {}, TOKENS, _TRANSFORMER),
    ],
)
def test_exact_parameter_counts(name, kwargs, x, expected):
  assert _num_params(models.make_model(name, **kwargs), x) == expected


def test_known_totals():
  # The sizes quoted in DESIGN.md and the presets.
  assert (
      _num_params(
          models.make_model("mlp", hidden_sizes=(256, 256)), IMAGES_MNIST
      )
      == 269_322
  )
  assert (
      _num_params(models.make_model("cnn", channels=(8, 16)), IMAGES_CIFAR)
      == 11_690
  )
  assert _num_params(models.make_model("transformer"), TOKENS) == 1_626_496


def test_output_shapes_and_input_flattening():
  key = jax.random.key(0)
  mlp = models.MLP((16,))
  params = _init(mlp, key, IMAGES_MNIST)
  out_images = _apply(mlp, params, IMAGES_MNIST + 1.0)
  out_flat = _apply(mlp, params, jnp.ones((2, 784)))
  assert out_images.shape == (2, 10)
  np.testing.assert_array_equal(out_images, out_flat)
  cnn = models.CNN(channels=(4, 8), num_outputs=3)
  x = jnp.zeros((5, 16, 16, 3))
  out = jax.eval_shape(cnn.apply, {"params": _shapes(cnn, x)}, x)
  assert out.shape == (5, 3)


def test_layer_norm_only_in_the_paper_cnn():
  paper = _shapes(models.make_model("cnn", channels=(2, 2)), IMAGES_CIFAR)
  cohen = _shapes(models.make_model("cnn-relu", channels=(2, 2)), IMAGES_CIFAR)
  assert sorted(paper) == [
      "Conv_0",
      "Conv_1",
      "Dense_0",
      "LayerNorm_0",
      "LayerNorm_1",
  ]
  assert sorted(cohen) == ["Conv_0", "Conv_1", "Dense_0"]


def _small_transformer():
  return models.Transformer(
      context_length=12, num_layers=2, num_heads=2, key_size=8, model_size=16
  )


def test_transformer_is_causal():
  model = _small_transformer()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 128)
  params = _init(model, jax.random.key(0), tokens)
  logits = _apply(model, params, tokens)
  assert logits.shape == (2, 12, 128)
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 128)
  logits_changed = _apply(model, params, changed)
  np.testing.assert_array_equal(logits[:, :t], logits_changed[:, :t])
  assert not np.allclose(logits[:, t:], logits_changed[:, t:])
  # Shorter inputs use the first position embeddings: same prefix logits.
  np.testing.assert_allclose(
      _apply(model, params, tokens[:, :5]), logits[:, :5], rtol=1e-5, atol=1e-6
  )


def test_init_is_deterministic_by_key():
  model = _small_transformer()
  tokens = jnp.zeros((1, 12), jnp.int32)
  a = _init(model, jax.random.key(3), tokens)
  b = _init(model, jax.random.key(3), tokens)
  c = _init(model, jax.random.key(4), tokens)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a["position_embeddings"], c["position_embeddings"])


def test_glorot_normal_kernels_and_zero_biases():
  params = _init(models.make_model("mlp"), jax.random.key(0), IMAGES_MNIST)
  kernel = np.asarray(params["Dense_1"]["kernel"])  # 1000 x 1000
  std = np.sqrt(2.0 / (1000 + 1000))
  np.testing.assert_allclose(kernel.std(), std, rtol=0.01)
  assert np.abs(kernel).max() <= 2 * std / 0.87962566103423978
  for layer in params.values():
    np.testing.assert_array_equal(layer["bias"], 0.0)
  conv = _init(
      models.make_model("cnn", channels=(64,)),
      jax.random.key(0),
      jnp.zeros((1, 2, 2, 3)),
  )["Conv_0"]
  np.testing.assert_allclose(
      conv["kernel"].std(), np.sqrt(2.0 / (9 * 3 + 9 * 64)), rtol=0.05
  )


def test_transformer_initialization_follows_the_haiku_model():
  model = models.Transformer(num_layers=4)
  params = _init(model, jax.random.key(0), TOKENS)
  truncated = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
  embed = np.asarray(params["Embed_0"]["embedding"])
  np.testing.assert_allclose(embed.std(), 0.02 * truncated, rtol=0.03)
  mlp_in = np.asarray(params["block_0"]["Dense_0"]["kernel"])  # 128 -> 512
  np.testing.assert_allclose(mlp_in.std(), np.sqrt(2 / 4 / 128), rtol=0.02)
  query = np.asarray(
      params["block_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  )
  np.testing.assert_allclose(query.std(), np.sqrt(2 / 4 / 128), rtol=0.03)
  out = np.asarray(params["Dense_0"]["kernel"])
  np.testing.assert_allclose(out.std(), truncated / np.sqrt(128), rtol=0.03)


def test_float64_parameters(x64):
  model = models.MLP((4,), param_dtype=jnp.float64)
  x = jnp.ones((2, 3), jnp.float64)
  params = _init(model, jax.random.key(0), x)
  assert params["Dense_0"]["kernel"].dtype == jnp.float64
  assert _apply(model, params, x).dtype == jnp.float64


def test_make_model_defaults_and_overrides():
  assert models.make_model("mlp").hidden_sizes == (1000, 1000, 1000)
  fc = models.make_model("fc-tanh")
  assert (fc.hidden_sizes, fc.activation) == ((200, 200), "tanh")
  assert models.make_model("cnn-relu", num_outputs=4).num_outputs == 4
  assert models.make_model("transformer", num_layers=2).num_layers == 2


@pytest.mark.parametrize(
    "build, x, error, match",
    [
        (
            lambda: models.make_model("vit"),
            None,
            ValueError,
            "Unknown model",
        ),
        (
            lambda: models.make_model("mlp", width=3),
            None,
            TypeError,
            "MLP takes",
        ),
        (
            lambda: models.MLP((3,), activation="swish"),
            jnp.ones((1, 2)),
            ValueError,
            "`activation`",
        ),
        (lambda: models.CNN(), jnp.ones((1, 28, 28)), ValueError, "NHWC"),
        (
            _small_transformer,
            jnp.zeros((1, 13), jnp.int32),
            ValueError,
            "context_length",
        ),
    ],
)
def test_errors(build, x, error, match):
  with pytest.raises(error, match=match):
    models.init_params(build(), jax.random.key(0), x)


def test_count_params_counts_every_leaf():
  tree = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), jnp.zeros(())]}
  assert models.count_params(tree) == 11


@pytest.mark.parametrize("name", ["fc-tanh", "cnn-relu"])
def test_cohen_models_use_pytorch_default_init(name):
  # PyTorch: kernel and bias uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)].
  model = models.make_model(
      name,
      **(
          {"hidden_sizes": (300,)} if name == "fc-tanh" else {"channels": (64,)}
      ),
  )
  x = jnp.ones((1, 32, 32, 3))
  params = models.init_params(model, jax.random.key(0), x)
  first = params["Dense_0" if name == "fc-tanh" else "Conv_0"]
  fan_in = 3072 if name == "fc-tanh" else 27
  bound = 1 / np.sqrt(fan_in)
  for leaf in (first["kernel"], first["bias"]):
    leaf = np.asarray(leaf)
    assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.9 * bound
  # Sample variance of n uniforms: relative standard error sqrt(0.8 / n).
  n = first["kernel"].size
  np.testing.assert_allclose(
      np.var(first["kernel"]), bound**2 / 3, rtol=5 * np.sqrt(0.8 / n)
  )


def test_unknown_init_is_named():
  with pytest.raises(ValueError, match="`init_scheme`"):
    models.init_params(
        models.MLP((4,), init_scheme="he"), jax.random.key(0), jnp.ones((1, 3))
    )
