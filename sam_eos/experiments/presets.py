"""Named experiments and their presets: the paper's settings and CPU-sized ones.

Every experiment of Long & Bartlett (2023) and Cohen et al.'s (2021) CIFAR-10
baseline is registered under a name with two presets:

- ``paper``: the published settings (from the paper and the authors'
  released JAX code, ``google-deepmind/sam_edge``), with a ``rho`` grid and
  three seeds of our choice. They need an accelerator and have not been run
  yet: per step, every configuration of the vmapped sweep computes two
  gradients, plus up to ``num_lanczos_iters`` Hessian-vector products (about
  two gradients each; as many as the ``sharpness_tol`` needs) every
  ``track_every`` steps; no time is claimed for them.
- ``cpu``: a shrunk version (fewer examples, a smaller network, another step
  size where needed) in the regime the paper is about where a 2-core CPU
  allows it: GD starts below ``2/eta`` and sharpens to it. Every cpu preset
  runs three seeds (each its own initialization) and tracks at least 20
  points in the claim window. ``make figures`` measures their wall times
  (``docs/figures/times.json``, the README's table); ``KNOWN_FAILURES``
  lists the claims a cpu preset does not show, with the likely reason.

Step counts of the ``paper`` presets are our choice: the authors trained for
a fixed wall-clock time (4 to 12 hours on a V100), not a number of steps.

Settings common to the image experiments (authors' code): full-batch GD/SAM
with no momentum or weight decay, pixels / 256 centred by the mean training
image, one-hot targets, the loss ``mean((f(x) - y)^2)`` over examples and
classes, Glorot-normal kernels with zero biases (PyTorch's default init for
Cohen et al.'s models), SAM's ``eps = 1e-5``.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (JMLR 2024), Section 4, and the authors' code.
  Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability", ICLR 2021
  (``cifar10-fc-tanh``, ``cifar10-cnn-relu``).
  Bartlett, Long & Bousquet, "The Dynamics of Sharpness-Aware Minimization",
  JMLR 2023 (the quadratic test vector).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from sam_eos.experiments import losses as losses_lib

PRESETS = ("cpu", "paper")
DATASETS = ("mnist", "cifar10", "shakespeare", "quadratic")
# ``models.make_model`` names, and the exact quadratic.
MODELS = (
    "mlp",
    "cnn",
    "transformer",
    "fc-tanh",
    "cnn-relu",
    "resnet",
    "quadratic",
)
# Fields that describe a configuration without changing what is computed.
DESCRIPTIVE_FIELDS = ("description",)
# Base optimizers of ``ExperimentConfig.optimizer``.
OPTIMIZERS = ("sgd", "adam")
# Fields added after runs were first committed, with their defaults:
# ``to_dict`` leaves a field out while it holds its default, so a run saved
# before the field existed (which used that default) still matches.
OPTIONAL_FIELDS = {
    "optimizer": "sgd",
    "adaptive": False,
    "adaptive_eta": 0.01,
    "eigen_weight": 0.0,
    "num_top_eigenvalues": 1,
    "batch_sharpness_batches": None,
}


def _as_tuple(value: Any) -> tuple:
  """A scalar or a sequence as a tuple (lists from JSON become tuples)."""
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return (value,)


def _freeze(value: Any) -> Any:
  """Lists (from JSON) to tuples, recursively, so configs compare equal."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Every setting of one experiment; ``se.train`` runs it as one sweep.

  The sweep is the cartesian product ``learning_rates x rhos x seeds``, run
  as one vmapped program from one initialization. Build variants with
  ``config.replace(...)`` (validated like the constructor).

  Attributes:
    name: registry name, e.g. ``"mnist-mlp"``.
    preset: ``"cpu"`` or ``"paper"`` (or a name of your own).
    description: one line for ``sam-eos list`` and the figures.
    dataset: ``"mnist"``, ``"cifar10"``, ``"shakespeare"`` or
      ``"quadratic"``.
    num_examples: training examples used, from the start of the official
      split (images), or the number of non-overlapping text crops drawn
      (Shakespeare); None for all. Ignored by ``"quadratic"``.
    model: a ``models.make_model`` name (``"mlp"``, ``"cnn"``,
      ``"transformer"``, ``"fc-tanh"``, ``"cnn-relu"``) or ``"quadratic"``.
    model_kwargs: overrides of the model's attributes, e.g.
      ``{"hidden_sizes": (256, 256)}``; for ``"quadratic"``,
      ``{"diagonal": (...)}``, the Hessian's diagonal (which is also the
      data).
    loss: ``"mse"`` (paper), ``"half_sse"`` (Cohen et al.),
      ``"cross_entropy"`` (language model) or ``"quadratic"``
      (``1/2 sum_i h_i w_i^2``).
    learning_rates: step sizes ``eta`` swept over.
    rhos: SAM radii swept over; 0 is GD (or SGD).
    seeds: training keys swept over (minibatch draws, Lanczos start); the
      initialization is shared, see ``init_seed``.
    num_steps: total training steps.
    track_every: measure sharpness, edges and alignments every this many
      steps.
    num_lanczos_iters: the cap on warm-started Lanczos iterations
      (Hessian-vector products) per measurement.
    sharpness_tol: relative residual at which a measurement stops (``se.train``'s
      ``sharpness_tol``), None for exactly ``num_lanczos_iters``.
    num_warm_vectors: top Ritz vectors carried between measurements.
    batch_size: minibatch size (drawn in-graph by key), None for full batch.
    momentum: heavy-ball momentum (0 in the paper).
    eps: added to ``||g||`` in SAM's normalization (paper: 1e-5).
    normalize: normalized SAM (paper) or unnormalized SAM (USAM).
    standardize: also divide pixels by their standard deviation over the
      training images (Cohen et al.); the paper only centres them.
    context_length: the language model's context; crops hold
      ``context_length + 1`` characters.
    init_seed: base seed of the initial parameters (seed ``s`` of the sweep
      starts from ``fold_in(key(init_seed), s)``, so every seed is another
      initialization, shared by the learning rates and radii of that seed)
      and of the choice of text crops.
    num_test_examples: held-out examples for ``test_loss`` and
      ``test_accuracy`` at every tracked step, from the start of the official
      test split (images) or crops of the held-out text (the last 10,000
      lines of Tiny Shakespeare); None for all. Ignored by ``"quadratic"``.
    optimizer: the base optimizer: ``"sgd"`` (heavy-ball ``momentum``) or
      ``"adam"`` (``optax.adam`` with ``b1 = claims.ADAM_B1``; tracked steps
      then also record ``preconditioned_sharpness``, judged against
      ``se.adam_edge``, Cohen et al. 2022).
    adaptive: ASAM's perturbation (``se.train``'s ``adaptive``).
    adaptive_eta: ASAM's ``eta_a``.
    eigen_weight: Eigen-SAM's weight of the top eigenvector in the ascent
      (``se.train``'s ``eigen_weight``); 0 is plain SAM.
    num_top_eigenvalues: top Hessian eigenvalues recorded per check
      (``se.train``'s ``num_top_eigenvalues``: columns ``top_eigenvalue_2``
      ... ``top_eigenvalue_k``).
    batch_sharpness_batches: for a minibatch run, the batches ``K`` over
      which every check also estimates the batch sharpness (``se.train``'s
      ``batch_sharpness_batches``: columns ``batch_sharpness``, its interval,
      and ``batch_sam_edge``; Andreyev & Beneventano 2024); None: not
      recorded.
  """

  name: str
  preset: str
  description: str
  dataset: str
  num_examples: int | None
  model: str
  model_kwargs: Mapping[str, Any]
  loss: str
  learning_rates: tuple[float, ...]
  rhos: tuple[float, ...]
  num_steps: int
  track_every: int
  num_lanczos_iters: int
  seeds: tuple[int, ...] = (0,)
  sharpness_tol: float | None = 1e-3
  num_warm_vectors: int = 3
  batch_size: int | None = None
  momentum: float = 0.0
  eps: float = 1e-5
  normalize: bool = True
  standardize: bool = False
  context_length: int | None = None
  init_seed: int = 0
  num_test_examples: int | None = 1_000
  optimizer: str = OPTIONAL_FIELDS["optimizer"]
  adaptive: bool = OPTIONAL_FIELDS["adaptive"]
  adaptive_eta: float = OPTIONAL_FIELDS["adaptive_eta"]
  eigen_weight: float = OPTIONAL_FIELDS["eigen_weight"]
  num_top_eigenvalues: int = OPTIONAL_FIELDS["num_top_eigenvalues"]
  batch_sharpness_batches: int | None = OPTIONAL_FIELDS[
      "batch_sharpness_batches"
  ]

  def __post_init__(self):
    """Normalizes sequences to tuples and validates every field.

    Raises:
      ValueError: naming the first invalid field and its valid values.
    """
    normalized = {
        "learning_rates": tuple(
            float(v) for v in _as_tuple(self.learning_rates)
        ),
        "rhos": tuple(float(v) for v in _as_tuple(self.rhos)),
        "seeds": _as_tuple(self.seeds),
        "model_kwargs": {
            k: _freeze(v) for k, v in sorted(dict(self.model_kwargs).items())
        },
    }
    for field, value in normalized.items():
      object.__setattr__(self, field, value)
    if self.dataset not in DATASETS:
      raise ValueError(
          f"`dataset` must be one of {DATASETS}, got " f"{self.dataset!r}."
      )
    if self.model not in MODELS:
      raise ValueError(f"`model` must be one of {MODELS}, got {self.model!r}.")
    if (self.model == "quadratic") != (self.dataset == "quadratic"):
      raise ValueError(
          "`model` and `dataset` must both be 'quadratic' or "
          f"neither, got {self.model!r} and {self.dataset!r}."
      )
    loss_names = sorted(losses_lib.LOSSES) + ["quadratic"]
    if self.loss not in loss_names:
      raise ValueError(
          f"`loss` must be one of {loss_names}, got " f"{self.loss!r}."
      )
    if not self.learning_rates or min(self.learning_rates) <= 0:
      raise ValueError(
          "`learning_rates` must be one or more positive numbers, "
          f"got {self.learning_rates}."
      )
    if not self.rhos or min(self.rhos) < 0:
      raise ValueError(
          "`rhos` must be one or more non-negative numbers, got "
          f"{self.rhos}."
      )
    if not self.seeds or not all(_is_int(s, 0) for s in self.seeds):
      raise ValueError(
          "`seeds` must be one or more non-negative integers, got "
          f"{self.seeds}."
      )
    for field, minimum in (
        ("num_steps", 1),
        ("track_every", 1),
        ("num_lanczos_iters", 1),
        ("num_warm_vectors", 1),
        ("init_seed", 0),
        ("num_top_eigenvalues", 1),
    ):
      if not _is_int(getattr(self, field), minimum):
        raise ValueError(
            f"`{field}` must be an integer >= {minimum}, got "
            f"{getattr(self, field)!r}."
        )
    for field in (
        "num_examples",
        "batch_size",
        "context_length",
        "num_test_examples",
    ):
      value = getattr(self, field)
      if value is not None and not _is_int(value, 1):
        raise ValueError(
            f"`{field}` must be None or an integer >= 1, got " f"{value!r}."
        )
    if self.sharpness_tol is not None and not self.sharpness_tol > 0:
      raise ValueError(
          "`sharpness_tol` must be None or positive, got "
          f"{self.sharpness_tol!r}."
      )
    if not 0 <= self.momentum < 1:
      raise ValueError(f"`momentum` must lie in [0, 1), got {self.momentum}.")
    self._check_optimizer()
    if self.eps < 0:
      raise ValueError(f"`eps` must be >= 0, got {self.eps}.")
    if self.dataset == "shakespeare" and self.context_length is None:
      raise ValueError(
          "`context_length` must be set for the 'shakespeare' "
          "dataset (the paper uses 64)."
      )
    if self.model == "quadratic" and not self.model_kwargs.get("diagonal"):
      raise ValueError(
          "`model_kwargs` must hold a non-empty 'diagonal' for "
          "the 'quadratic' model."
      )

  def _check_optimizer(self) -> None:
    """Validates the base optimizer and the SAM variant (see the fields)."""
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}."
      )
    if self.optimizer == "adam" and self.momentum:
      raise ValueError(
          "`momentum` must be 0 with optimizer 'adam' (Adam's b1 is its "
          f"momentum), got {self.momentum}."
      )
    if self.adaptive_eta < 0 or self.eigen_weight < 0:
      raise ValueError(
          "`adaptive_eta` and `eigen_weight` must be >= 0, got "
          f"{self.adaptive_eta} and {self.eigen_weight}."
      )
    if self.adaptive and self.eigen_weight:
      raise ValueError(
          "`adaptive` (ASAM) and `eigen_weight` (Eigen-SAM) are two "
          "variants; set one of them."
      )
    if self.batch_sharpness_batches is not None and (
        self.batch_size is None or not _is_int(self.batch_sharpness_batches, 1)
    ):
      raise ValueError(
          "`batch_sharpness_batches` must be None or an integer >= 1 of a "
          "minibatch run (set batch_size), got "
          f"{self.batch_sharpness_batches!r} with batch_size "
          f"{self.batch_size!r}."
      )
    if self.num_top_eigenvalues > self.num_warm_vectors:
      raise ValueError(
          f"`num_top_eigenvalues` ({self.num_top_eigenvalues}) must be at "
          f"most `num_warm_vectors` ({self.num_warm_vectors}); raise "
          "num_warm_vectors."
      )

  @property
  def num_configs(self) -> int:
    """Number of swept configurations: ``len(lrs) * len(rhos) * len(seeds)``."""
    return len(self.learning_rates) * len(self.rhos) * len(self.seeds)

  def replace(self, **overrides: Any) -> ExperimentConfig:
    """A copy with some fields changed (``dataclasses.replace``), validated.

    Args:
      **overrides: field names and new values.

    Returns:
      The new config.

    Raises:
      ValueError: for an unknown field name or an invalid value.

    Examples:
      >>> config = get_experiment("mnist-mlp").replace(num_steps=10)
      >>> config.num_steps, config.name
      (10, 'mnist-mlp')
    """
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise ValueError(
          f"Unknown ExperimentConfig field(s) {unknown}; valid "
          f"fields are {sorted(names)}."
      )
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    """Every field as JSON-friendly values (tuples as lists via ``json``).

    A field of ``OPTIONAL_FIELDS`` is left out while it holds its default.

    Returns:
      Dict field name -> value; ``from_dict`` inverts it.

    Examples:
      >>> "optimizer" in get_experiment("mnist-mlp").to_dict()
      False
      >>> get_experiment("mnist-mlp").replace(optimizer="adam").to_dict()[
      ...     "optimizer"]
      'adam'
    """
    out = dataclasses.asdict(self)
    out["model_kwargs"] = dict(self.model_kwargs)
    for field, default in OPTIONAL_FIELDS.items():
      if out[field] == default:
        del out[field]
    return out

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuilds a config from ``to_dict`` output (e.g. read from JSON).

    Args:
      values: field name -> value.

    Returns:
      The config.

    Raises:
      ValueError: for unknown or missing fields, or invalid values.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"Unknown ExperimentConfig field(s) {unknown}.")
    try:
      return cls(**values)
    except TypeError as e:
      raise ValueError(f"Incomplete ExperimentConfig: {e}.") from e

  def settings(self) -> dict[str, Any]:
    """``to_dict`` without descriptive fields: what decides the computation."""
    return {
        k: v for k, v in self.to_dict().items() if k not in DESCRIPTIVE_FIELDS
    }


def _is_int(value: Any, minimum: int) -> bool:
  return (
      isinstance(value, int)
      and not isinstance(value, bool)
      and value >= minimum
  )


# The paper's image-task settings (authors' image_classification.py). The
# comments on the cpu presets quote the medians over the last third of a run
# (sharpness / (2/eta) for GD; sharpness / SAM-edge for SAM), measured.
_IMAGE = dict(
    loss="mse", momentum=0.0, eps=1e-5, normalize=True, batch_size=None
)

# CPU: Cohen et al.'s cnn-relu with 4-8 channels on the first 64 images, at
# their 2/eta = 30. NOT the sharpening regime: the sharpness at
# initialization differs by a factor of about 4 between the three seeds, so
# some start near or above 2/eta, and a step size small enough for every
# seed to start below it would need far more steps than a CPU run affords
# (XLA's CPU convolutions are slow).
CNN_RELU_CPU = ExperimentConfig(
    name="cifar10-cnn-relu",
    preset="cpu",
    description="CIFAR-10 (first 64), cnn-relu 4-8 channels",
    dataset="cifar10",
    num_examples=64,
    model="cnn-relu",
    model_kwargs={"channels": (4, 8)},
    loss="half_sse",
    learning_rates=(2 / 30,),
    rhos=(0.0, 0.1),
    seeds=(0, 1, 2),
    standardize=True,
    num_steps=400,
    track_every=6,
    num_lanczos_iters=30,
    momentum=0.0,
    eps=1e-5,
    batch_size=None,
    num_test_examples=256,
)

# Bartlett, Long & Bousquet's test vector: Hessian diag(50, 20, 5, 1), eta =
# 0.01, rho = 0.1; SAM settles into a 2-cycle along the top eigenvector with
# ||g|| -> 1.6667 and SAM-edge -> 50 = lam1, exactly. GD is not at its edge
# on a fixed quadratic (lam1 < 2/eta), so only SAM radii are swept.
QUADRATIC = ExperimentConfig(
    name="quadratic",
    preset="cpu",
    description="Quadratic diag(50, 20, 5, 1): SAM's exact 2-cycle",
    dataset="quadratic",
    num_examples=None,
    model="quadratic",
    model_kwargs={"diagonal": (50.0, 20.0, 5.0, 1.0)},
    loss="quadratic",
    learning_rates=(0.01,),
    rhos=(0.05, 0.1),
    seeds=(0, 1, 2),
    num_steps=500,
    track_every=5,
    num_lanczos_iters=4,
    eps=0.0,
)

# SAM's CIFAR-10 training recipe (Foret et al. 2021) on a small ResNet with
# BatchNorm: minibatch SAM with rho = 0.05 on momentum SGD (beta = 0.9,
# eta = 0.1) with weight decay 5e-4 inside the base optimizer, cross-entropy,
# standardized pixels (no augmentation). ``model_kwargs`` holds the ResNet's
# attributes and the base optimizer's ``weight_decay`` (read by
# ``runner.base_optimizer``; ExperimentConfig has no field for it). The
# edges use the momentum: gd_edge = 2 (1 + beta) / eta = 38, and the
# SAM-edge with momentum.
_RESNET = dict(
    dataset="cifar10",
    model="resnet",
    loss="cross_entropy",
    learning_rates=(0.1,),
    rhos=(0.0, 0.05),
    seeds=(0, 1, 2),
    momentum=0.9,
    eps=1e-5,
    normalize=True,
    standardize=True,
    num_lanczos_iters=30,
)

# Beyond the paper: full-batch Adam at its edge, and SAM on top of Adam.
# The settings of notebook 07 (first 1,000 MNIST images, a 784-64-64-10 tanh
# MLP, Cohen et al.'s squared loss, eta = 1e-3, b1 = 0.9: Adam's edge
# 38/eta = 38,000), with the registry's Glorot init. No paper measured this;
# both presets are the same CPU-sized run.
ADAM_MNIST = ExperimentConfig(
    name="mnist-mlp-adam",
    preset="cpu",
    description="MNIST (first 1,000), MLP 784-64-64-10 tanh, "
    "full-batch Adam (Cohen et al. 2022)",
    dataset="mnist",
    num_examples=1_000,
    model="mlp",
    model_kwargs={"hidden_sizes": (64, 64), "activation": "tanh"},
    loss="half_sse",
    learning_rates=(1e-3,),
    rhos=(0.0, 0.01, 0.05),
    seeds=(0, 1, 2),
    num_steps=1_500,
    track_every=25,
    num_lanczos_iters=30,
    optimizer="adam",
    momentum=0.0,
    eps=1e-5,
    batch_size=None,
)

EXPERIMENTS: dict[str, dict[str, ExperimentConfig]] = {
    "mnist-mlp": {
        # Paper: all 60,000 training images, MLP 784-1000-1000-1000-10 ReLU,
        # full-batch GD/SAM at eta = 0.01. The rho grid is our choice (no
        # source gives one; the paper's figures show one rho each).
        "paper": ExperimentConfig(
            name="mnist-mlp",
            preset="paper",
            description="MNIST, MLP 784-1000-1000-1000-10 ReLU, full batch",
            dataset="mnist",
            num_examples=None,
            model="mlp",
            model_kwargs={"hidden_sizes": (1000, 1000, 1000)},
            learning_rates=(0.01,),
            rhos=(0.0, 0.01, 0.1, 1.0),
            seeds=(0, 1, 2),
            num_steps=20_000,
            track_every=100,
            num_lanczos_iters=30,
            num_test_examples=10_000,
            **_IMAGE,
        ),
        # CPU: first 2,000 images, 784-128-128-128-10 (three hidden layers,
        # as in the paper). The initial sharpness of the three seeds is
        # 1.42-1.58, so eta = 0.9 (2/eta = 2.22) starts GD at about 0.7 x
        # 2/eta, in the regime of progressive sharpening.
        "cpu": ExperimentConfig(
            name="mnist-mlp",
            preset="cpu",
            description="MNIST (first 2,000), MLP 784-128-128-128-10 ReLU",
            dataset="mnist",
            num_examples=2_000,
            model="mlp",
            model_kwargs={"hidden_sizes": (128, 128, 128)},
            learning_rates=(0.9,),
            rhos=(0.0, 0.1),
            seeds=(0, 1, 2),
            num_steps=1_500,
            track_every=25,
            num_lanczos_iters=30,
            num_test_examples=1_000,
            **_IMAGE,
        ),
    },
    "cifar10-cnn": {
        # Paper: first 1,000 CIFAR-10 training images, CNN with blocks of 16
        # and 32 channels ([conv 3x3 -> ReLU -> LayerNorm] + max-pool), eta =
        # 0.01. Test metrics on the first 1,000 test images (bundled).
        "paper": ExperimentConfig(
            name="cifar10-cnn",
            preset="paper",
            description="CIFAR-10 (first 1,000), CNN 16-32 channels",
            dataset="cifar10",
            num_examples=1_000,
            model="cnn",
            model_kwargs={"channels": (16, 32)},
            learning_rates=(0.01,),
            rhos=(0.0, 0.01, 0.1, 1.0),
            seeds=(0, 1, 2),
            num_steps=20_000,
            track_every=100,
            num_lanczos_iters=30,
            num_test_examples=1_000,
            **_IMAGE,
        ),
        # CPU: first 64 images, 8-16 channels. NOT the regime of the paper:
        # the sharpness at initialization is already about 2/eta = 200 (GD
        # starts at the edge, a known failure of gd_sharpens), and 256 or
        # more images do not fit the CPU budget: with 20 tracked points in
        # the claim window, 3 seeds and GD + SAM, XLA's CPU convolutions
        # and their Hessian-vector products take over 5 minutes on 2 cores.
        "cpu": ExperimentConfig(
            name="cifar10-cnn",
            preset="cpu",
            description="CIFAR-10 (first 64), CNN 8-16 channels",
            dataset="cifar10",
            num_examples=64,
            model="cnn",
            model_kwargs={"channels": (8, 16)},
            learning_rates=(0.01,),
            rhos=(0.0, 0.1),
            seeds=(0, 1, 2),
            num_steps=200,
            track_every=3,
            num_lanczos_iters=30,
            num_test_examples=256,
            **_IMAGE,
        ),
    },
    "shakespeare-transformer": {
        # Paper: Tiny Shakespeare (last 10,000 lines held out), bytes as
        # tokens, non-overlapping crops of 64 + 1 characters, pre-LN causal
        # decoder (6 layers, 8 heads of key size 32, width 128, GELU MLP x4,
        # learned positions), minibatch SAM on plain SGD with eta = 0.1,
        # batch 128; sharpness and ||g|| of the current minibatch.
        "paper": ExperimentConfig(
            name="shakespeare-transformer",
            preset="paper",
            description="Tiny Shakespeare, 6-layer transformer, SGD batch 128",
            dataset="shakespeare",
            num_examples=None,
            model="transformer",
            model_kwargs={
                "num_layers": 6,
                "num_heads": 8,
                "key_size": 32,
                "model_size": 128,
            },
            loss="cross_entropy",
            learning_rates=(0.1,),
            rhos=(0.0, 0.01, 0.1, 1.0),
            seeds=(0, 1, 2),
            batch_size=128,
            context_length=64,
            num_steps=20_000,
            track_every=100,
            num_lanczos_iters=30,
            eps=1e-5,
            num_test_examples=None,
        ),
        # CPU: a 2-layer, width-32 transformer on 2,048 crops of 32 + 1
        # characters, batch 32, at the paper's eta = 0.1 and at 0.04: the
        # minibatch sharpness sits above 2/eta, more so for larger eta (the
        # README reports both).
        "cpu": ExperimentConfig(
            name="shakespeare-transformer",
            preset="cpu",
            description="Tiny Shakespeare (2,048 crops), 2-layer transformer",
            dataset="shakespeare",
            num_examples=2_048,
            model="transformer",
            model_kwargs={
                "num_layers": 2,
                "num_heads": 2,
                "key_size": 16,
                "model_size": 32,
            },
            loss="cross_entropy",
            learning_rates=(0.04, 0.1),
            rhos=(0.0, 0.1),
            seeds=(0, 1, 2),
            batch_size=32,
            context_length=32,
            num_steps=600,
            track_every=10,
            num_lanczos_iters=30,
            eps=1e-5,
            num_test_examples=512,
        ),
    },
    "cifar10-fc-tanh": {
        # Cohen et al. 2021: first 5,000 CIFAR-10 training images (centred
        # and standardized), fc-tanh 3072-200-200-10 with PyTorch's default
        # init, loss 1/2 * sum over classes averaged over examples,
        # full-batch GD at two of their step sizes (2/eta = 30 and 50); a SAM
        # row for comparison.
        "paper": ExperimentConfig(
            name="cifar10-fc-tanh",
            preset="paper",
            description="CIFAR-10 (first 5,000), fc-tanh 3072-200-200-10 "
            "(Cohen et al.)",
            dataset="cifar10",
            num_examples=5_000,
            model="fc-tanh",
            model_kwargs={},
            loss="half_sse",
            learning_rates=(2 / 30, 2 / 50),
            rhos=(0.0, 0.1),
            seeds=(0, 1, 2),
            standardize=True,
            num_steps=10_000,
            track_every=50,
            num_lanczos_iters=30,
            momentum=0.0,
            eps=1e-5,
            batch_size=None,
            num_test_examples=10_000,
        ),
        # CPU: the first 500 images, 3072-64-64-10 tanh. The sharpness at
        # initialization is about 120 (all seeds), above Cohen et al.'s
        # 2/eta = 30 and 50, so eta = 0.01 (2/eta = 200): GD starts at
        # 0.4-0.6 x 2/eta and sharpens progressively to the edge.
        "cpu": ExperimentConfig(
            name="cifar10-fc-tanh",
            preset="cpu",
            description="CIFAR-10 (first 500), fc-tanh 3072-64-64-10",
            dataset="cifar10",
            num_examples=500,
            model="fc-tanh",
            model_kwargs={"hidden_sizes": (64, 64)},
            loss="half_sse",
            learning_rates=(0.01,),
            rhos=(0.0, 0.1),
            seeds=(0, 1, 2),
            standardize=True,
            num_steps=4_000,
            track_every=50,
            num_lanczos_iters=30,
            momentum=0.0,
            eps=1e-5,
            batch_size=None,
            num_test_examples=500,
        ),
    },
    "cifar10-cnn-relu": {
        # Cohen et al.'s cnn-relu (two [conv(32) -> ReLU -> max-pool]
        # blocks, PyTorch's default init) on the same 5,000 images and loss.
        "paper": ExperimentConfig(
            name="cifar10-cnn-relu",
            preset="paper",
            description="CIFAR-10 (first 5,000), cnn-relu (Cohen et al.)",
            dataset="cifar10",
            num_examples=5_000,
            model="cnn-relu",
            model_kwargs={},
            loss="half_sse",
            learning_rates=(2 / 30, 2 / 50),
            rhos=(0.0, 0.1),
            seeds=(0, 1, 2),
            standardize=True,
            num_steps=10_000,
            track_every=50,
            num_lanczos_iters=30,
            momentum=0.0,
            eps=1e-5,
            batch_size=None,
            num_test_examples=10_000,
        ),
        "cpu": CNN_RELU_CPU,
    },
    "cifar10-resnet": {
        # All 50,000 training images, ResNet-20 (three stages of three basic
        # blocks, 16-32-64 channels), batch 128: about 51 epochs. Not run.
        "paper": ExperimentConfig(
            name="cifar10-resnet",
            preset="paper",
            description="CIFAR-10, ResNet-20 with BatchNorm, SAM on momentum "
            "SGD, batch 128",
            num_examples=None,
            model_kwargs={
                "widths": (16, 32, 64),
                "blocks_per_stage": 3,
                "weight_decay": 5e-4,
            },
            batch_size=128,
            num_steps=20_000,
            track_every=100,
            num_test_examples=10_000,
            **_RESNET,
        ),
        # CPU: the first 512 images, a ResNet-8 (one basic block per stage,
        # 4-8-16 channels, 5k parameters), batch 16 for 300 steps (about 9
        # epochs), tracked every 5 steps (20 points in the claim window) with
        # at most 20 Lanczos iterations. Sized by cost alone (on 2 loaded
        # cores a vmapped Hessian-vector product of six configurations takes
        # 1.75 s at 8-16-32 channels and batch 32); fixed before the first
        # run, not tuned to the claims.
        "cpu": ExperimentConfig(
            name="cifar10-resnet",
            preset="cpu",
            description="CIFAR-10 (first 512), ResNet-8 4-8-16 with "
            "BatchNorm, SAM on momentum SGD, batch 16",
            num_examples=512,
            model_kwargs={
                "widths": (4, 8, 16),
                "blocks_per_stage": 1,
                "weight_decay": 5e-4,
            },
            batch_size=16,
            num_steps=300,
            track_every=5,
            num_test_examples=1_000,
            **{**_RESNET, "num_lanczos_iters": 20},
        ),
    },
    "mnist-mlp-adam": {
        "paper": ADAM_MNIST.replace(preset="paper"),
        "cpu": ADAM_MNIST,
    },
    "quadratic": {
        # Small enough for any machine: both presets are the same run.
        "paper": QUADRATIC.replace(preset="paper"),
        "cpu": QUADRATIC,
    },
}

# The cpu presets whose claims ``make test`` checks (every seed). The two
# CNN presets are left out: on 2 CPU cores they took 10-18 minutes as one
# compiled scan (XLA's CPU convolutions inside loops, jax-ml/jax#12868);
# the staged programs brought cifar10-cnn to about 6 minutes, still more
# than the test budget allows, and most of their claims fail
# (KNOWN_FAILURES). Their committed runs in
# docs/figures are checked by tests/test_readme.py instead.
CLAIM_PRESETS = (
    "mnist-mlp",
    "shakespeare-transformer",
    "cifar10-fc-tanh",
    "quadratic",
)

# Findings, not passes: claims a cpu preset does NOT show, as
# ``{name: {(claim, learning_rate, rho): reason}}``. The README reports them
# with their numbers (``make figures``); the slow tests require every other
# claim to hold for every seed.
KNOWN_FAILURES: dict[str, dict[tuple[str, float, float], str]] = {
    "cifar10-cnn": {
        ("gd_sharpens", 0.01, 0.0): (
            "the sharpness at initialization is already at or above 2/eta; "
            "the sharpening regime needs more images and steps than a CPU "
            "run affords"
        ),
        ("gd_at_edge", 0.01, 0.0): (
            "after starting above the edge GD settles just below it, for "
            "one seed below the band"
        ),
        ("gd_oscillates", 0.01, 0.0): (
            "no loss rise and no alignment with the top eigenvector: GD "
            "descends stably just below the edge, not at the edge of "
            "stability"
        ),
        ("sam_at_sam_edge", 0.01, 0.1): (
            "one seed sits far above its SAM-edge: on 64 images ||g|| "
            "shrinks fast and rho/||g|| grows, where the quadratic model "
            "behind the SAM-edge is poor"
        ),
        ("early_flattening", 0.01, 0.1): (
            "for one seed SAM's early sharpness stays close to GD's, which "
            "itself starts high"
        ),
        ("edge_tracking", 0.01, 0.1): (
            "not robust: the run of the staged programs (the same steps, "
            "other float rounding, which the edge of stability amplifies "
            "over 200 steps) moved seed 2's correlation from 0.894 (the "
            "in-graph run before it) to 0.654"
        ),
    },
    "cifar10-cnn-relu": {
        ("gd_sharpens", 2 / 30, 0.0): (
            "the initial sharpness differs widely between seeds: one seed "
            "starts above the edge"
        ),
        ("gd_at_edge", 2 / 30, 0.0): (
            "GD's sharpness sits above 2/eta for some seeds: the run is too "
            "short to settle after starting above the edge"
        ),
        ("sam_at_sam_edge", 2 / 30, 0.1): (
            "SAM's ratio to its edge differs widely between seeds: rho/||g|| "
            "is large on so few images, where the quadratic model behind the "
            "SAM-edge is poor"
        ),
        ("edge_tracking", 2 / 30, 0.1): (
            "as for sam_at_sam_edge: the sharpness does not follow the edge "
            "where rho/||g|| is large"
        ),
    },
    "shakespeare-transformer": {
        ("gd_sharpens", 0.04, 0.0): (
            "the minibatch sharpness of the transformer at initialization "
            "spikes far above 2/eta (step 0), and for some seeds it starts "
            "at the edge"
        ),
        ("gd_sharpens", 0.1, 0.0): (
            "as at eta = 0.04: the initial minibatch sharpness is at or "
            "above 2/eta"
        ),
        ("gd_at_edge", 0.1, 0.0): (
            "at the paper's eta = 0.1 the sharpness of SGD's minibatch "
            "sits above 2/eta: the edge 2/eta is a full-batch quantity, and "
            "small batches are sharper than the full batch"
        ),
        ("gd_at_edge", 0.04, 0.0): (
            "the same minibatch effect, weaker at eta = 0.04: seeds sit at "
            "the upper end of the band, so the claim is not reliably shown"
        ),
    },
}


def list_experiments() -> list[str]:
  """The registered experiment names, sorted.

  Examples:
    >>> list_experiments()[:3]
    ['cifar10-cnn', 'cifar10-cnn-relu', 'cifar10-fc-tanh']
  """
  return sorted(EXPERIMENTS)


def get_experiment(name: str, preset: str = "cpu") -> ExperimentConfig:
  """The config of a named experiment and preset.

  Args:
    name: a name from ``list_experiments()``.
    preset: ``"cpu"`` (default) or ``"paper"``.

  Returns:
    The ``ExperimentConfig``.

  Raises:
    ValueError: for an unknown name or preset, listing the valid ones.

  Examples:
    >>> get_experiment("mnist-mlp", "paper").model_kwargs
    {'hidden_sizes': (1000, 1000, 1000)}
  """
  if name not in EXPERIMENTS:
    raise ValueError(
        f"Unknown experiment {name!r}; choose one of " f"{list_experiments()}."
    )
  if preset not in EXPERIMENTS[name]:
    raise ValueError(
        f"Unknown preset {preset!r} for {name!r}; choose one of "
        f"{sorted(EXPERIMENTS[name])}."
    )
  return EXPERIMENTS[name][preset]
