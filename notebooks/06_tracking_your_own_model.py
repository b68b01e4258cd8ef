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
#    `se.hessian_eigenpairs`;
# 6. track the same quantities in a training loop of your own, with
#    `se.SharpnessTracker` in a hand-written jitted optax step;
# 7. train a flax NNX model with BatchNorm under minibatch SAM, through
#    `se.nnx_loss`, and track its sharpness.
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
from flax import nnx
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
# ## Your own training loop: `se.SharpnessTracker`
#
# If you keep your own jitted `train_step`, build a tracker once and call its
# `update` inside the step. Like an optax transform it is a pair of pure
# functions: `tracker.init(params)` makes a small state (the warm-start block
# of the last three top Ritz vectors and a step counter), and
# `tracker.update(state, params, batch, learning_rate=..., rho=...,
# grad_norm=..., step=...)` measures at `params` on `batch` every
# `track_every` steps (a `lax.cond`: other steps cost nothing and return NaN
# metrics). Each measurement is warm-started Lanczos on exact Hessian-vector
# products, stopped once the top pair's relative residual is below `tol`
# (`sharpness_residual` says what was reached; `lanczos_iters` how many
# products it took). Pass the gradient norm your step computed at `params`
# on the same batch, or let the tracker compute it.
#
# Here: the same SAM run as above (`eta = 1`, `rho = 0.05`, full batch, same
# initialization), written by hand with `se.sam_gradient` and `optax.sgd`.

# %%
rho = rhos[1]
tracker = se.SharpnessTracker(loss_fn, track_every=10, tol=1e-3, max_iters=30)
optimizer = optax.sgd(eta)


@jax.jit
def train_step(params, opt_state, tracker_state, batch, step):
  out = se.sam_gradient(loss_fn, params, batch, rho=rho)
  tracker_state, metrics = tracker.update(
      tracker_state, params, batch, learning_rate=eta, rho=rho,
      grad_norm=out.grad_norm, step=step)
  updates, opt_state = optimizer.update(out.sam_grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state, tracker_state,
          metrics)


start = time.perf_counter()
own_params, opt_state = params, optimizer.init(params)
tracker_state = tracker.init(params)
rows = []
for t in range(NUM_STEPS):
  own_params, opt_state, tracker_state, m = train_step(
      own_params, opt_state, tracker_state, data, t)
  if m.tracked:
    rows.append(jax.device_get(m))
own = {name: np.array([getattr(r, name) for r in rows])
       for name in se.TrackerMetrics._fields}
print(f"{NUM_STEPS} steps in {time.perf_counter() - start:.1f} s, "
      f"{len(rows)} measurements; median Hessian-vector products per "
      f"measurement {np.median(own['lanczos_iters'][1:]):.0f} "
      f"(first, cold: {own['lanczos_iters'][0]:.0f}); "
      f"largest relative residual {own['sharpness_residual'].max():.1e}")

# %% [markdown]
# The hand-written loop computes the same iterates as `se.train` (same
# initialization, same full batch), so early on the tracked sharpness agrees
# with `result.history` (later the two runs part by rounding: the dynamics
# at the edge amplify tiny differences). Over the second half, SAM again
# sits near its SAM-edge.

# %%
np.testing.assert_array_equal(own["step"], hist["step"][1])
np.testing.assert_allclose(own["sharpness"][:3], hist["sharpness"][1, :3],
                           rtol=1e-2)
np.testing.assert_allclose(
    own["sam_edge"], se.sam_edge(eta, rho, own["grad_norm"]), rtol=1e-5)
late = own["step"] >= NUM_STEPS // 2
own_ratio = own["sharpness"][late] / own["sam_edge"][late]
print(f"hand-written loop: sharpness / SAM-edge median "
      f"{np.median(own_ratio):.3f} (se.train: {np.median(sam_ratio):.3f})")
assert 0.7 < np.median(own_ratio) < 1.4
assert np.all(own["sharpness_residual"] <= 1e-3)

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(own["step"], own["sharpness"], label="tracker: sharpness")
ax.plot(own["step"], own["sam_edge"], ":", label="tracker: SAM-edge")
ax.plot(steps, hist["sharpness"][1], lw=0.8, alpha=0.6,
        label="se.train: sharpness")
ax.axhline(2 / eta, color="k", ls="--", label="2 / eta")
ax.set(xlabel="step", ylabel="top Hessian eigenvalue",
       title=f"SAM (rho = {rho}) in a hand-written loop")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "06_tracking_your_own_model-tracker.png", dpi=120)
plt.show()

# %% [markdown]
# ## A flax NNX model with BatchNorm, under minibatch SAM
#
# `se.nnx_loss(model, loss)` splits an NNX model with `nnx.split(model,
# nnx.Param, ...)` into a pure `loss_fn(params, batch, model_state) -> (loss,
# new_model_state)`, its parameters and the rest of its state (here the
# BatchNorm running averages). Call it on the model in training mode
# (`model.train()`), where BatchNorm normalizes with the batch's own
# statistics and updates its running averages.
#
# What is measured: the sharpness is the top eigenvalue of the Hessian of
# `w -> loss_fn(w, batch, model_state)[0]`, the training-mode loss on the
# step's batch, differentiated through the batch statistics, with the
# running averages (which this loss does not use) held fixed. It is the
# curvature of the loss that the step descends, the one the SAM-edge
# analysis is about; it is not the curvature of the network in inference
# mode. The SAM ascent and the gradient norm use the same batch and state.
#
# Each step draws a minibatch of 64 examples, takes a SAM step
# (`se.sam_gradient(..., has_aux=True)` returns the new BatchNorm state at
# `w` as its `aux`) and tracks every 10 steps with the state it started
# from. `se.nnx_merge` gives the trained model back.


# %%
class BatchNormMLP(nnx.Module):
  def __init__(self, width, rngs):
    self.dense1 = nnx.Linear(784, width, rngs=rngs)
    self.norm = nnx.BatchNorm(width, rngs=rngs)
    self.dense2 = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    return self.dense2(nnx.relu(self.norm(self.dense1(x))))


def mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


bn_model = BatchNormMLP(WIDTH, nnx.Rngs(0))
bn_model.train()
bn_loss_fn, bn_params, bn_state = se.nnx_loss(bn_model, mse)
bn_eta, bn_rho, batch_size = 0.5, 0.05, 64
bn_tracker = se.SharpnessTracker(bn_loss_fn, track_every=10, tol=1e-3,
                                 max_iters=30, has_aux=True)
bn_optimizer = optax.sgd(bn_eta)


@jax.jit
def bn_step(params, model_state, opt_state, tracker_state, step):
  idx = jax.random.choice(jax.random.fold_in(key, step), len(data[0]),
                          (batch_size,), replace=False)
  batch = jax.tree.map(lambda a: a[idx], data)
  out, new_state = se.sam_gradient(
      lambda p, b: bn_loss_fn(p, b, model_state), params, batch, rho=bn_rho,
      has_aux=True)
  tracker_state, metrics = bn_tracker.update(
      tracker_state, params, batch, learning_rate=bn_eta, rho=bn_rho,
      grad_norm=out.grad_norm, step=step, model_state=model_state)
  updates, opt_state = bn_optimizer.update(out.sam_grads, opt_state, params)
  return (optax.apply_updates(params, updates), new_state, opt_state,
          tracker_state, metrics)


start = time.perf_counter()
p, s = bn_params, bn_state
opt_state, tracker_state = bn_optimizer.init(p), bn_tracker.init(p)
bn_rows = []
for t in range(NUM_STEPS):
  p, s, opt_state, tracker_state, m = bn_step(p, s, opt_state, tracker_state, t)
  if m.tracked:
    bn_rows.append(jax.device_get(m))
bn = {name: np.array([getattr(r, name) for r in bn_rows])
      for name in se.TrackerMetrics._fields}
print(f"{NUM_STEPS} minibatch SAM steps in {time.perf_counter() - start:.1f} s")

trained = se.nnx_merge(bn_loss_fn, p, s)  # the trained nnx.Module
trained.eval()  # inference: BatchNorm uses its running averages
accuracy = float(jnp.mean(jnp.argmax(trained(data[0]), -1)
                          == jnp.argmax(data[1], -1)))
moved = float(jnp.abs(s["norm"]["mean"] - bn_state["norm"]["mean"]).max())
bn_late = bn["step"] >= NUM_STEPS // 2
bn_ratio = bn["sharpness"][bn_late] / bn["sam_edge"][bn_late]
print(f"training accuracy (eval mode) {accuracy:.3f}; running means moved by "
      f"up to {moved:.3f}")
print(f"second half: sharpness median {np.median(bn['sharpness'][bn_late]):.3f}"
      f", SAM-edge median {np.median(bn['sam_edge'][bn_late]):.3f}, "
      f"ratio median {np.median(bn_ratio):.3f} (2/eta = {2 / bn_eta})")
assert np.all(np.isfinite(bn["sharpness"])) and moved > 0
assert accuracy > 0.5

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(bn["step"], bn["sharpness"], label="sharpness (batch, train mode)")
ax.plot(bn["step"], bn["sam_edge"], ":", label="SAM-edge")
ax.axhline(2 / bn_eta, color="k", ls="--", label="2 / eta")
ax.set(xlabel="step", ylabel="top Hessian eigenvalue",
       title="NNX MLP with BatchNorm, minibatch SAM")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "06_tracking_your_own_model-nnx.png", dpi=120)
plt.show()

# %% [markdown]
# At initialization the BatchNorm network is far sharper than `2/eta`; the
# first steps throw it out of that region (sharpness falls below `2/eta`
# within ten steps), and from then on the minibatch sharpness follows the
# minibatch SAM-edge (at the test size, 128 examples and 200 steps, the
# ratio's median over the second half was 0.975; the printout above gives
# this run's).

# %% [markdown]
# The run folder lives in a temporary directory; pass your own `out_dir` to
# keep runs (the test suite's small run removes its folder).

# %%
print(f"run folder: {out_dir}")
if SMALL:
  shutil.rmtree(out_dir.parent)
