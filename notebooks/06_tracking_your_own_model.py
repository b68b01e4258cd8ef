# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tracking sharpness on your own model
#
# `sam_eos` needs only a function `loss_fn(params, batch) -> scalar` and a
# parameter pytree, so any flax (or plain JAX) model works. This notebook
# walks through the whole workflow on a model defined here, not taken from
# the library:
#
# 1. define a flax network and wrap it as `loss_fn(params, batch)`;
# 2. train GD (`rho = 0`) and SAM (`rho = 0.05`) as one vmapped `se.train`
#    sweep, recording sharpness, gradient norm and both edges;
# 3. read `result.history` and plot sharpness against `2/eta` and the
#    SAM-edge;
# 4. look at what `out_dir` holds (`config.json`, `metrics.csv`, a
#    checkpoint), read the metrics back with `se.read_csv`, and resume a run;
# 5. compute the top three Hessian eigenpairs of the final parameters with
#    `se.hessian_eigenpairs`.
#
# What to look for: GD's sharpness rises to `2/eta` and hovers there (Cohen
# et al. 2021); SAM's stays far below, close to its SAM-edge (Long & Bartlett
# 2023). The data are the first few hundred MNIST training images with the
# paper's preprocessing and squared loss.
#
# References:
# - P. M. Long and P. L. Bartlett, *Sharpness-Aware Minimization and the Edge
#   of Stability*, arXiv:2309.12488, 2023.
# - J. Cohen, S. Kaur, Y. Li, J. Z. Kolter and A. Talwalkar, *Gradient Descent
#   on Neural Networks Typically Occurs at the Edge of Stability*, ICLR 2021.
# - P. Foret, A. Kleiner, H. Mobahi and B. Neyshabur, *Sharpness-Aware
#   Minimization for Efficiently Improving Generalization*, ICLR 2021.

# %%
import json
import os
import pathlib
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sam_eos as se
from sam_eos.experiments.data import load_mnist, preprocess_images

# SAM_EOS_SMALL=1 shrinks data, model and run for the test suite.
SMALL = os.environ.get("SAM_EOS_SMALL") == "1"
NUM_EXAMPLES = 128 if SMALL else 500
WIDTH = 64 if SMALL else 128
NUM_STEPS = 200 if SMALL else 600

# Figures go to notebooks/figures/ (or $SAM_EOS_FIGURES).
_here = pathlib.Path.cwd()
FIG_DIR = pathlib.Path(os.environ.get(
    "SAM_EOS_FIGURES",
    (_here if _here.name == "notebooks" else _here / "notebooks") / "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Data
#
# `load_mnist` reads the canonical files from `$SAM_EOS_DATA` (default
# `~/.cache/sam_eos`) and falls back to the first 2,000 training images
# bundled with the package, so this runs offline. `preprocess_images` applies
# the paper's preprocessing (pixels / 256, mean image subtracted) and one-hot
# targets.

# %%
images, labels = load_mnist("train", num_examples=NUM_EXAMPLES)
x, y = preprocess_images(images, labels, flatten=True)
data = (jnp.asarray(x), jnp.asarray(y))  # the full batch, on the device
print(f"x {x.shape} {x.dtype}, y {y.shape} (one-hot), "
      f"class counts {np.bincount(labels, minlength=10).tolist()}")

# %% [markdown]
# ## Your model and loss
#
# Any flax module will do. Here: two hidden tanh layers with flax's default
# initialization. The loss is the paper's squared loss, averaged over
# examples and classes. The only contract is the signature
# `loss_fn(params, batch) -> scalar`, with `batch` whatever pytree you pass
# as `data` (or a minibatch of it, with `batch_size=`).


# %%
class TanhMLP(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.width)(x))
    x = nn.tanh(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


model = TanhMLP(WIDTH)
key = jax.random.key(0)
params = model.init(key, data[0][:1])["params"]


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((model.apply({"params": params}, x) - y) ** 2)


num_params = sum(p.size for p in jax.tree.leaves(params))
print(f"{num_params:,} parameters; "
      f"loss at init {float(loss_fn(params, data)):.4f}, "
      f"sharpness at init {float(se.sharpness(loss_fn, params, data)):.3f}")

# %% [markdown]
# ## Train GD and SAM as one sweep
#
# `rho=[0.0, 0.05]` runs both from the same initialization as one vmapped
# program; `eta = 1`, so GD's edge is `2/eta = 2`. Every `track_every`
# steps the run records the history columns at the current iterate.
#
# With `out_dir`, `se.train` writes `config.json` at the start and, after
# every chunk of steps, appends to `metrics.csv` and saves a checkpoint. We
# stop halfway on purpose, to resume below. (`progress=True`, the default,
# shows a progress bar; it is off here to keep the notebook's output short.)

# %%
eta, rhos = 1.0, [0.0, 0.05]
settings = dict(learning_rate=eta, rho=rhos, track_every=10, progress=False)
out_dir = pathlib.Path(tempfile.mkdtemp(prefix="sam_eos_06_")) / "mnist-tanh"

start = time.perf_counter()
first = se.train(loss_fn, params, data, num_steps=NUM_STEPS // 2,
                 out_dir=out_dir, **settings)
print(f"{NUM_STEPS // 2} steps in {time.perf_counter() - start:.1f} s "
      "(compilation included)")
print({name: column.shape for name, column in first.history.items()})

# %% [markdown]
# ## What `out_dir` holds
#
# `config.json` records the settings (one entry per configuration of the
# sweep), `metrics.csv` one line per tracked step per configuration, and
# `checkpoint.npz` the training state. `se.read_csv` reads the metrics back as
# flat columns, with `config` telling the configurations apart; they match
# `result.history` row for row.

# %%
for path in sorted(out_dir.iterdir()):
  print(f"{path.name:16s} {path.stat().st_size:>10,d} bytes")
config = json.loads((out_dir / "config.json").read_text())
print(json.dumps({k: config[k] for k in ("configs", "track_every", "num_steps",
                                         "num_params")}, indent=1))

metrics = se.read_csv(out_dir / "metrics.csv")
print("columns:", list(metrics))
for c in range(len(rhos)):
  rows = metrics["config"] == c
  assert np.all(metrics["rho"][rows] == rhos[c])
  for name in se.HISTORY_COLUMNS:
    np.testing.assert_allclose(metrics[name][rows], first.history[name][c],
                               rtol=1e-12, err_msg=name)
print("metrics.csv == result.history")

# %% [markdown]
# ## Resume
#
# Calling `se.train` again with the same settings and `out_dir` but a larger
# `num_steps` picks up from the checkpoint and runs only the remaining steps.
# The resumed history starts with the rows already recorded, and it equals a
# run that was never interrupted (compared here with one kept in memory,
# `out_dir=None`), bit for bit apart from the wall-clock column.

# %%
start = time.perf_counter()
result = se.train(loss_fn, params, data, num_steps=NUM_STEPS, out_dir=out_dir,
                  **settings)
print(f"resumed: steps {NUM_STEPS // 2}..{NUM_STEPS} in "
      f"{time.perf_counter() - start:.1f} s")
hist = result.history
num_first = first.history["step"].shape[1]
for name in se.HISTORY_COLUMNS:
  np.testing.assert_array_equal(hist[name][:, :num_first], first.history[name])

uninterrupted = se.train(loss_fn, params, data, num_steps=NUM_STEPS,
                         **settings).history
for name in se.HISTORY_COLUMNS:
  if name != "wall_time":
    np.testing.assert_array_equal(hist[name], uninterrupted[name], err_msg=name)
assert len(se.read_csv(out_dir / "metrics.csv")["step"]) == hist["step"].size
print("resumed run == uninterrupted run; metrics.csv has every row")

# %% [markdown]
# ## Sharpness against the edges
#
# `result.history` holds arrays of shape `(configurations, rows)`. The
# `gd_edge` column is `2/eta`; `sam_edge` is the SAM-edge computed from the
# gradient norm at each tracked step (for `rho = 0` it equals `2/eta`).

# %%
steps = hist["step"][0]
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for c, rho in enumerate(rhos):
  name = "GD" if rho == 0 else f"SAM, rho = {rho}"
  axes[0].semilogy(steps, hist["loss"][c], label=name)
  line, = axes[1].plot(steps, hist["sharpness"][c], label=f"{name}: sharpness")
  if rho > 0:
    axes[1].plot(steps, hist["sam_edge"][c], color=line.get_color(), lw=1,
                 ls=":", label=f"{name}: SAM-edge")
axes[1].plot(steps, hist["gd_edge"][0], "k--", label="2 / eta (gd_edge)")
for ax in axes:
  ax.axvline(NUM_STEPS // 2, color="0.7", lw=0.8, zorder=0)  # resumed here
axes[0].set(xlabel="step", ylabel="training loss", title="Loss")
axes[1].set(xlabel="step", ylabel="top Hessian eigenvalue",
            title="GD at 2/eta, SAM at its SAM-edge")
for ax in axes:
  ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "06_tracking_your_own_model-sharpness.png", dpi=120)
plt.show()

# %% [markdown]
# In numbers, over the second half of the run:

# %%
late = steps >= NUM_STEPS // 2
gd_sharp, sam_sharp = hist["sharpness"][0, late], hist["sharpness"][1, late]
sam_ratio = sam_sharp / hist["sam_edge"][1, late]
print(f"GD : sharpness / (2/eta) median {np.median(gd_sharp) * eta / 2:.3f}")
print(f"SAM: sharpness / (2/eta) median {np.median(sam_sharp) * eta / 2:.3f}, "
      f"sharpness / SAM-edge median {np.median(sam_ratio):.3f}")

np.testing.assert_allclose(hist["gd_edge"], 2 / eta, rtol=1e-6)
np.testing.assert_allclose(hist["sam_edge"][0], 2 / eta, rtol=1e-6)
np.testing.assert_allclose(hist["sam_edge"][1],
                           se.sam_edge(eta, rhos[1], hist["grad_norm"][1]),
                           rtol=1e-5)
assert np.max(gd_sharp) > 0.9 * 2 / eta  # GD reaches its edge
assert np.median(sam_sharp) < 0.7 * np.median(gd_sharp)  # SAM stays flatter
assert 0.7 < np.median(sam_ratio) < 1.4  # ... near its own edge

# %% [markdown]
# ## The top of the Hessian spectrum at the end
#
# `se.hessian_eigenpairs` returns the `k` largest eigenvalues (Lanczos on
# exact Hessian-vector products), their eigenvectors as a pytree like
# `params` with a leading axis `k`, and the Lanczos residual estimates
# `|beta_m s_i[m]|` of `||H v - lam v||`. Those estimates assume exact
# arithmetic and can fall far below what float32 can resolve (even to 0), so
# we also measure the true residual of the top pair with one `se.hvp`. For a
# sweep, `result.params` carries a leading configuration axis; we slice out
# each configuration. Note how GD ends with several eigenvalues near `2/eta`,
# not just one.

# %%
for c, rho in enumerate(rhos):
  final = jax.tree.map(lambda leaf: leaf[c], result.params)
  pairs = se.hessian_eigenpairs(loss_fn, final, data, k=3, num_iters=30)
  values = np.asarray(pairs.values)
  top_vector = jax.tree.map(lambda leaf: leaf[0], pairs.vectors)
  h_v = se.hvp(loss_fn, final, data, top_vector)
  true_residual = float(optax.tree.norm(
      optax.tree.sub(h_v, optax.tree.scale(values[0], top_vector))))
  grad_norm = optax.tree.norm(jax.grad(loss_fn)(final, data))
  edge = float(se.sam_edge(eta, rho, grad_norm))
  estimates = np.array2string(np.asarray(pairs.residuals), precision=1)
  print(f"rho = {rho}: top eigenvalues {np.round(values, 4)} "
        f"(edge {edge:.4f}); residual estimates {estimates}, "
        f"true residual of the top pair {true_residual:.1e}")
  assert np.all(np.diff(values) <= 0)  # descending
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(pairs.vectors))
  assert true_residual < 1e-3 * values[0]
  if rho == 0:
    gd_top = values[0]
  else:
    assert values[0] < gd_top  # SAM ends flatter than GD

# %% [markdown]
# The run folder lives in a temporary directory; pass your own `out_dir` to
# keep runs (the test suite's small run removes its folder).

# %%
print(f"run folder: {out_dir}")
if SMALL:
  shutil.rmtree(out_dir.parent)
