"""The paper's experiments: data, models, losses, presets, runner, figures, CLI.

Everything with I/O lives here, never in the core package: data loaders
(``data``), flax models (``models``), losses (``losses``), the registry of
named experiments with ``paper`` and ``cpu`` presets (``presets``), the
runner behind ``sam-eos run`` (``runner``), the figures (``plots``; imports
matplotlib lazily) and the claim checks (``claims``).

Examples:
  >>> from sam_eos import experiments as ex
  >>> config = ex.get_experiment("mnist-mlp", "cpu")
  >>> config.learning_rates, config.rhos
  ((0.9,), (0.0, 0.1))

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023.
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021.
"""

from __future__ import annotations

from sam_eos.experiments.claims import Claim, check_claims, check_history
from sam_eos.experiments.data import (
    DataChecksumError,
    DataUnavailableError,
    char_crops,
    load_cifar10,
    load_mnist,
    load_shakespeare,
    preprocess_images,
)
from sam_eos.experiments.losses import (
    cross_entropy_loss,
    half_sse_loss,
    make_loss_fn,
    make_per_example_loss_fn,
    mse_loss,
)
from sam_eos.experiments.models import (
    CNN,
    MLP,
    Transformer,
    count_params,
    init_params,
    make_model,
)
from sam_eos.experiments.plots import (
    FIGURES,
    load_run,
    plot_alignment,
    plot_loss,
    plot_ratio,
    plot_runs,
    plot_sharpness,
    seed_bands,
)
from sam_eos.experiments.presets import (
    EXPERIMENTS,
    PRESETS,
    ExperimentConfig,
    get_experiment,
    list_experiments,
)
from sam_eos.experiments.runner import (
    ExperimentRun,
    Problem,
    build_problem,
    find_run,
    load_data,
    load_test_data,
    run_experiment,
    run_or_load,
    sweep,
)

__all__ = [
    "CNN",
    "Claim",
    "DataChecksumError",
    "DataUnavailableError",
    "EXPERIMENTS",
    "ExperimentConfig",
    "ExperimentRun",
    "FIGURES",
    "MLP",
    "PRESETS",
    "Problem",
    "Transformer",
    "build_problem",
    "char_crops",
    "check_claims",
    "check_history",
    "count_params",
    "cross_entropy_loss",
    "find_run",
    "get_experiment",
    "half_sse_loss",
    "init_params",
    "list_experiments",
    "load_cifar10",
    "load_data",
    "load_test_data",
    "load_run",
    "load_mnist",
    "load_shakespeare",
    "make_loss_fn",
    "make_model",
    "make_per_example_loss_fn",
    "mse_loss",
    "plot_alignment",
    "plot_loss",
    "plot_ratio",
    "plot_runs",
    "plot_sharpness",
    "seed_bands",
    "run_experiment",
    "run_or_load",
    "sweep",
]
