"""The networks of the paper's experiments and of Cohen et al.'s baselines.

All models are ``flax.linen`` modules used through pure ``init``/``apply``;
parameters are ``model.init(key, x)["params"]`` (see ``init_params``) and
outputs are logits. Dense and convolution kernels start Glorot-normal
(truncated; ``variance_scaling(1, "fan_avg", "truncated_normal")``, flax's
``glorot_normal``) with zero biases, as in the authors' released JAX code for
the image experiments; Cohen et al.'s ``fc-tanh`` and ``cnn-relu`` start from
PyTorch's default instead (``init_scheme="torch"``), as in their code. The
transformer follows the Haiku example language
model that the authors' code builds on, initialization included.

Named architectures (``make_model``):

- ``"mlp"``: ``MLP``, paper default 784-1000-1000-1000-10 ReLU (MNIST).
- ``"cnn"``: ``CNN``, paper default two blocks of 16 and 32 channels, each
  [3x3 conv -> ReLU -> LayerNorm] + 2x2 max-pool, then Dense (CIFAR-10).
- ``"transformer"``: ``Transformer``, paper default 6 layers, 8 heads of
  key size 32, width 128, context 64, vocabulary 128 (Tiny Shakespeare).
- ``"fc-tanh"``: Cohen et al.'s ``fc-tanh``, MLP 3072-200-200-10 tanh.
- ``"cnn-relu"``: Cohen et al.'s ``cnn-relu``, two [3x3 conv(32) -> ReLU ->
  2x2 max-pool] blocks, then Dense (no normalization).
- ``"resnet"``: ``ResNet``, a small ResNet with BatchNorm (a 3x3 conv stem,
  then one or more basic blocks per stage, global average pooling, Dense);
  the only model here with mutable state (``batch_stats``, see
  ``init_variables``).

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023, Section 4, and the authors' code
  (``image_classification.py``, ``transformer.py``; Apache-2.0, DeepMind).
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability", ICLR 2021; architectures as in
  ``locuslab/edge-of-stability``, ``src/archs.py``.
  Glorot & Bengio, "Understanding the difficulty of training deep
  feedforward neural networks", AISTATS 2010.
  Haiku's example transformer (``haiku/examples/transformer/model.py``).
  He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016 (the CIFAR ResNets); Ioffe & Szegedy, "Batch Normalization",
  ICML 2015.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

GLOROT_NORMAL = jax.nn.initializers.variance_scaling(
    1.0, "fan_avg", "truncated_normal"
)
# Standard deviation of a unit normal truncated to [-2, 2]: JAX's truncated
# variance scaling divides by it, Haiku's TruncatedNormal(stddev) does not.
_TRUNCATED_STD = 0.87962566103423978
# Haiku's default Linear init, TruncatedNormal(stddev=1/sqrt(fan_in)).
_HAIKU_LINEAR = jax.nn.initializers.variance_scaling(
    _TRUNCATED_STD**2, "fan_in", "truncated_normal"
)
_EMBED_INIT = jax.nn.initializers.truncated_normal(stddev=0.02)
# He et al.'s init for ReLU convs (fan_in, variance 2 / fan_in).
_HE_NORMAL = jax.nn.initializers.variance_scaling(
    2.0, "fan_in", "truncated_normal"
)

# PyTorch's default for nn.Linear and nn.Conv2d (kaiming_uniform with
# a = sqrt(5)): kernels and biases uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)]
# (variance 1/(3 fan_in)), which Cohen et al.'s models used.
_TORCH_KERNEL = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
INITS = ("glorot", "torch")


def _torch_bias(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default bias init: uniform in ``[-1, 1] / sqrt(fan_in)``."""
  bound = 1 / fan_in**0.5

  def init(
      key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32
  ) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _inits(init: str, fan_in: int) -> dict[str, Any]:
  """``kernel_init`` and ``bias_init`` of a layer under scheme ``init``."""
  if init == "glorot":
    return {"kernel_init": GLOROT_NORMAL}
  if init == "torch":
    return {"kernel_init": _TORCH_KERNEL, "bias_init": _torch_bias(fan_in)}
  raise ValueError(f"`init_scheme` must be one of {INITS}, got {init!r}.")


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(
        f"`activation` must be one of {sorted(ACTIVATIONS)}, " f"got {name!r}."
    )
  return ACTIVATIONS[name]


class MLP(nn.Module):
  """A fully connected network: Dense -> activation, repeated, then Dense.

  Inputs of shape ``(N, ...)`` are flattened to ``(N, D)`` first (so MNIST
  images ``(N, 28, 28)`` feed a 784-input network).

  Attributes:
    hidden_sizes: widths of the hidden layers, e.g. ``(1000, 1000, 1000)``
      (paper) or ``(256, 256)`` (cpu preset).
    num_outputs: number of logits.
    activation: one of ``ACTIVATIONS`` (``"relu"``, ``"tanh"``, ...).
    param_dtype: dtype of the parameters (float64 under ``jax.enable_x64``).
    init_scheme: ``"glorot"`` (the paper's: Glorot-normal kernels, zero biases) or
      ``"torch"`` (PyTorch's default, which Cohen et al. used: kernels and
      biases uniform in ``[-1, 1] / sqrt(fan_in)``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = MLP((8,), num_outputs=3)
    >>> params = init_params(model, jax.random.key(0), jnp.ones((2, 4, 4)))
    >>> model.apply({"params": params}, jnp.ones((2, 4, 4))).shape
    (2, 3)
    >>> count_params(params)  # (16 * 8 + 8) + (8 * 3 + 3)
    163

  References:
    Long & Bartlett 2023, Section 4 (MNIST, 3 hidden layers of 1000 ReLU);
    Cohen et al. 2021 (``fc-tanh``: 2 hidden layers of 200 tanh).
  """

  hidden_sizes: Sequence[int]
  num_outputs: int = 10
  activation: str = "relu"
  param_dtype: Any = jnp.float32
  init_scheme: str = "glorot"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of shape ``(N, num_outputs)`` for inputs ``(N, ...)``."""
    act = _activation(self.activation)
    h = jnp.reshape(x, (x.shape[0], -1))
    for width in self.hidden_sizes:
      h = act(
          nn.Dense(
              width,
              param_dtype=self.param_dtype,
              **_inits(self.init_scheme, h.shape[-1]),
          )(h)
      )
    return nn.Dense(
        self.num_outputs,
        param_dtype=self.param_dtype,
        **_inits(self.init_scheme, h.shape[-1]),
    )(h)


class CNN(nn.Module):
  """A convolutional network of conv blocks, then one Dense layer.

  Each block is a 3x3 'SAME' convolution with ``channels[i]`` features, the
  activation, a LayerNorm over channels (if ``layer_norm``), and a 2x2 max-pool
  with stride 2; the result is flattened into a Dense layer of
  ``num_outputs`` logits.

  Attributes:
    channels: features of each block: ``(16, 32)`` in the paper (16 * 2^i),
      ``(32, 32)`` in Cohen et al.'s ``cnn-relu``.
    num_outputs: number of logits.
    activation: one of ``ACTIVATIONS``.
    layer_norm: LayerNorm after each activation (paper: yes; Cohen et al.:
      no).
    param_dtype: dtype of the parameters.
    init_scheme: ``"glorot"`` (paper) or ``"torch"`` (Cohen et al.), as in
      ``MLP``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model, x = CNN(channels=(4,)), jnp.ones((2, 8, 8, 3))
    >>> shapes = jax.eval_shape(lambda k: init_params(model, k, x),
    ...                         jax.random.key(0))
    >>> count_params(shapes)  # conv 3*3*3*4+4, LayerNorm 2*4, dense 64*10+10
    770
    >>> jax.eval_shape(model.apply, {"params": shapes}, x).shape
    (2, 10)

  References:
    Long & Bartlett 2023, Section 4 (CIFAR-10), authors' ``CNN`` module;
    Cohen et al. 2021, ``cnn-relu`` (``convnet`` in ``src/archs.py``).
  """

  channels: Sequence[int] = (16, 32)
  num_outputs: int = 10
  activation: str = "relu"
  layer_norm: bool = True
  param_dtype: Any = jnp.float32
  init_scheme: str = "glorot"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of shape ``(N, num_outputs)`` for NHWC images ``(N, H, W, C)``.

    Raises:
      ValueError: if ``x`` is not 4-D.
    """
    if x.ndim != 4:
      raise ValueError(
          f"CNN expects NHWC images of shape (N, H, W, C), got "
          f"shape {x.shape}; add a channel axis with x[..., None] "
          "for grayscale images."
      )
    act = _activation(self.activation)
    h = x
    for features in self.channels:
      h = nn.Conv(
          features,
          (3, 3),
          padding="SAME",
          param_dtype=self.param_dtype,
          **_inits(self.init_scheme, 9 * h.shape[-1]),
      )(h)
      h = act(h)
      if self.layer_norm:
        h = nn.LayerNorm(param_dtype=self.param_dtype)(h)
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = jnp.reshape(h, (h.shape[0], -1))
    return nn.Dense(
        self.num_outputs,
        param_dtype=self.param_dtype,
        **_inits(self.init_scheme, h.shape[-1]),
    )(h)


class _DecoderBlock(nn.Module):
  """Pre-LayerNorm causal self-attention and GELU MLP, both residual."""

  num_heads: int
  key_size: int
  mlp_ratio: int
  kernel_init: Callable[..., jax.Array]
  param_dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    width = h.shape[-1]
    y = nn.LayerNorm(epsilon=1e-5, param_dtype=self.param_dtype)(h)
    h = h + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        qkv_features=self.num_heads * self.key_size,
        out_features=width,
        kernel_init=self.kernel_init,
        param_dtype=self.param_dtype,
    )(y, mask=mask)
    y = nn.LayerNorm(epsilon=1e-5, param_dtype=self.param_dtype)(h)
    y = nn.Dense(
        self.mlp_ratio * width,
        kernel_init=self.kernel_init,
        param_dtype=self.param_dtype,
    )(y)
    y = nn.Dense(
        width, kernel_init=self.kernel_init, param_dtype=self.param_dtype
    )(jax.nn.gelu(y))
    return h + y


class Transformer(nn.Module):
  """A pre-LayerNorm causal decoder for character-level language modelling.

  Token embeddings plus learned position embeddings, ``num_layers`` blocks of
  [LayerNorm -> causal multi-head self-attention -> residual; LayerNorm ->
  Dense(mlp_ratio * model_size) -> GELU -> Dense -> residual], a final
  LayerNorm and an (untied) output projection to ``vocab_size`` logits.
  Initialization as in the Haiku example model used by the authors:
  embeddings truncated normal (stddev 0.02), attention and MLP kernels
  ``variance_scaling(2 / num_layers, "fan_in", "truncated_normal")``, the
  output layer truncated normal with stddev ``1 / sqrt(model_size)``, zero
  biases, LayerNorm epsilon 1e-5. (The authors' model also masks a padding
  token; Tiny Shakespeare has none, so there is no padding here.)

  Attributes:
    vocab_size: number of tokens (128 for ASCII bytes).
    context_length: longest input sequence (size of the position table).
    num_layers: number of decoder blocks.
    num_heads: attention heads per block.
    key_size: size of each head's queries, keys and values.
    model_size: width of the residual stream.
    mlp_ratio: MLP hidden width as a multiple of ``model_size``.
    param_dtype: dtype of the parameters.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = Transformer(context_length=8, num_layers=1, num_heads=2,
    ...                     key_size=4, model_size=8)
    >>> tokens = jnp.zeros((2, 8), jnp.int32)
    >>> shapes = jax.eval_shape(lambda k: init_params(model, k, tokens),
    ...                         jax.random.key(0))
    >>> jax.eval_shape(model.apply, {"params": shapes}, tokens).shape
    (2, 8, 128)

  References:
    Long & Bartlett 2023, Section 4 (Tiny Shakespeare), authors'
    ``transformer.py``; Vaswani et al., "Attention Is All You Need", NeurIPS
    2017; Haiku's example transformer.
  """

  vocab_size: int = 128
  context_length: int = 64
  num_layers: int = 6
  num_heads: int = 8
  key_size: int = 32
  model_size: int = 128
  mlp_ratio: int = 4
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``(B, T, vocab_size)`` for integer tokens ``(B, T)``.

    Position ``t``'s logits depend on ``tokens[:, :t + 1]`` only.

    Raises:
      ValueError: if ``tokens`` is not 2-D or ``T > context_length``.
    """
    if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
      raise ValueError(
          f"`tokens` must have shape (batch, T) with T <= "
          f"context_length ({self.context_length}), got shape "
          f"{tokens.shape}."
      )
    length = tokens.shape[1]
    h = nn.Embed(
        self.vocab_size,
        self.model_size,
        embedding_init=_EMBED_INIT,
        param_dtype=self.param_dtype,
    )(tokens)
    positions = self.param(
        "position_embeddings",
        _EMBED_INIT,
        (self.context_length, self.model_size),
        self.param_dtype,
    )
    h = h + positions[:length]
    mask = nn.make_causal_mask(tokens)
    kernel_init = jax.nn.initializers.variance_scaling(
        2.0 / self.num_layers, "fan_in", "truncated_normal"
    )
    for i in range(self.num_layers):
      h = _DecoderBlock(
          self.num_heads,
          self.key_size,
          self.mlp_ratio,
          kernel_init,
          self.param_dtype,
          name=f"block_{i}",
      )(h, mask)
    h = nn.LayerNorm(epsilon=1e-5, param_dtype=self.param_dtype)(h)
    return nn.Dense(
        self.vocab_size, kernel_init=_HAIKU_LINEAR, param_dtype=self.param_dtype
    )(h)


class _BasicBlock(nn.Module):
  """He et al.'s basic block: [conv3x3 -> BN -> ReLU -> conv3x3 -> BN] + skip.

  The skip is the identity, or a strided 1x1 conv -> BN where the shape
  changes; a ReLU follows the sum.
  """

  features: int
  strides: int
  bn_momentum: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        param_dtype=self.param_dtype,
    )
    conv = lambda k, s: nn.Conv(
        self.features,
        (k, k),
        strides=(s, s),
        padding="SAME",
        use_bias=False,
        kernel_init=_HE_NORMAL,
        param_dtype=self.param_dtype,
    )
    y = jax.nn.relu(norm()(conv(3, self.strides)(x)))
    y = norm()(conv(3, 1)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm()(conv(1, self.strides)(x))
    return jax.nn.relu(x + y)


class ResNet(nn.Module):
  """A small CIFAR ResNet with BatchNorm (He et al. 2016, Section 4.2).

  A 3x3 conv stem with ``widths[0]`` channels -> BN -> ReLU, then one stage
  per entry of ``widths``, each ``blocks_per_stage`` basic blocks (the first
  of every stage after the first halves the resolution with stride 2), then
  global average pooling and a Dense layer of ``num_outputs`` logits. Convs
  have no bias and start He-normal (``variance_scaling(2, "fan_in",
  "truncated_normal")``), BN scales 1 and offsets 0.

  ``apply(..., train=True)`` normalizes with the batch's statistics and,
  with ``mutable=["batch_stats"]``, returns the updated running averages;
  ``train=False`` uses the running averages (inference mode).

  Attributes:
    widths: channels of each stage, e.g. ``(16, 32, 64)`` (He et al.'s
      ResNet-20 widths) or ``(8, 16, 32)``.
    blocks_per_stage: basic blocks per stage (1 gives a ResNet-8 for three
      stages: 1 + 3 x 2 convs + 1 Dense).
    num_outputs: number of logits.
    bn_momentum: BatchNorm's running-average decay (0.9 is PyTorch's
      ``momentum=0.1``, which the SAM papers' code uses).
    param_dtype: dtype of the parameters and the batch statistics.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model, x = ResNet(widths=(4, 8)), jnp.ones((2, 8, 8, 3))
    >>> params, stats = init_variables(model, jax.random.key(0), x)
    >>> logits, new = model.apply({"params": params, "batch_stats": stats},
    ...                           x, train=True, mutable=["batch_stats"])
    >>> logits.shape, sorted(new) == ["batch_stats"]
    ((2, 10), True)
    >>> model.apply({"params": params, "batch_stats": stats}, x,
    ...             train=False).shape
    (2, 10)

  References:
    He, Zhang, Ren & Sun, CVPR 2016; Ioffe & Szegedy, ICML 2015.
  """

  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 1
  num_outputs: int = 10
  bn_momentum: float = 0.9
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Logits ``(N, num_outputs)`` for NHWC images ``(N, H, W, C)``.

    Raises:
      ValueError: if ``x`` is not 4-D.
    """
    if x.ndim != 4:
      raise ValueError(
          f"ResNet expects NHWC images of shape (N, H, W, C), got shape "
          f"{x.shape}."
      )
    h = nn.Conv(
        self.widths[0],
        (3, 3),
        padding="SAME",
        use_bias=False,
        kernel_init=_HE_NORMAL,
        param_dtype=self.param_dtype,
    )(x)
    h = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        param_dtype=self.param_dtype,
    )(h)
    h = jax.nn.relu(h)
    for i, features in enumerate(self.widths):
      for j in range(self.blocks_per_stage):
        strides = 2 if i > 0 and j == 0 else 1
        h = _BasicBlock(features, strides, self.bn_momentum, self.param_dtype)(
            h, train
        )
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(
        self.num_outputs,
        kernel_init=GLOROT_NORMAL,
        param_dtype=self.param_dtype,
    )(h)


_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {"hidden_sizes": (1000, 1000, 1000)}),
    "cnn": (CNN, {}),
    "transformer": (Transformer, {}),
    "fc-tanh": (
        MLP,
        {
            "hidden_sizes": (200, 200),
            "activation": "tanh",
            "init_scheme": "torch",
        },
    ),
    "cnn-relu": (
        CNN,
        {"channels": (32, 32), "layer_norm": False, "init_scheme": "torch"},
    ),
    "resnet": (ResNet, {}),
}
# Models whose ``apply`` takes ``train`` and carries ``batch_stats``.
STATEFUL_MODELS = ("resnet",)


def make_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a named architecture; keyword arguments override its defaults.

  Args:
    name: ``"mlp"``, ``"cnn"``, ``"transformer"`` (the paper's, with its
      sizes as defaults), ``"fc-tanh"`` or ``"cnn-relu"`` (Cohen et al.'s),
      or ``"resnet"`` (a small ResNet with BatchNorm).
    **kwargs: attributes of the model class, e.g. ``hidden_sizes=(256,
      256)`` or ``channels=(8, 16)``.

  Returns:
    The flax module.

  Raises:
    ValueError: for an unknown ``name``.
    TypeError: for an attribute the model class does not have.

  Examples:
    >>> make_model("mlp", hidden_sizes=(256, 256)).hidden_sizes
    (256, 256)
    >>> make_model("cnn-relu").layer_norm
    False

  References:
    Long & Bartlett 2023, Section 4; Cohen et al. 2021, ``src/archs.py``.
  """
  if name not in _MODELS:
    raise ValueError(
        f"Unknown model {name!r}; choose one of " f"{sorted(_MODELS)}."
    )
  cls, defaults = _MODELS[name]
  try:
    return cls(**{**defaults, **kwargs})
  except TypeError as e:
    fields = [
        f for f in cls.__dataclass_fields__ if f not in ("parent", "name")
    ]
    raise TypeError(
        f"make_model({name!r}): {e}; {cls.__name__} takes " f"{fields}."
    ) from e


def init_params(model: nn.Module, key: jax.Array, x: jax.Array) -> PyTree:
  """Initial parameters: ``model.init(key, x)["params"]``.

  Args:
    model: a module of this file.
    key: a JAX PRNG key.
    x: an example input batch (its values are not used, only its shape).

  Returns:
    The parameter pytree, as taken by ``model.apply({"params": params}, x)``
    and by ``losses.make_loss_fn``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> params = init_params(MLP((2,)), jax.random.key(0), jnp.ones((1, 3)))
    >>> sorted(params)
    ['Dense_0', 'Dense_1']
  """
  return model.init(key, x)["params"]


def init_variables(
    model: nn.Module, key: jax.Array, x: jax.Array
) -> tuple[PyTree, PyTree]:
  """Initial ``(params, batch_stats)`` of a model with BatchNorm.

  Args:
    model: a module with BatchNorm (``ResNet``); ``x`` as in ``init_params``.
    key: a JAX PRNG key.
    x: an example input batch (only its shape is used).

  Returns:
    The parameters and the BatchNorm running statistics (means 0, variances
    1), as taken by ``model.apply({"params": ..., "batch_stats": ...}, x,
    train=...)``.
  """
  variables = model.init(key, x, train=False)
  return variables["params"], variables["batch_stats"]


def count_params(params: PyTree) -> int:
  """The number of scalars in a pytree of arrays (or of shape structs).

  Args:
    params: a parameter pytree, e.g. from ``init_params`` or from
      ``jax.eval_shape`` of it.

  Returns:
    The total number of entries.

  Examples:
    >>> import jax.numpy as jnp
    >>> count_params({"w": jnp.ones((3, 4)), "b": jnp.ones(4)})
    16
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
