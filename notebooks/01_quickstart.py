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
# # Quickstart: SAM, sharpness and the SAM-edge
#
# This notebook tours the core of `sam_eos` on a model small enough that
# every number can be checked against a dense computation:
#
# 1. **SAM as a function** (`se.sam_gradient`) and **as an optax transform**
#    (`se.sam`), and a numerical check that both take the same step.
# 2. **Sharpness**, the top eigenvalue of the loss Hessian (`se.sharpness`,
#    Lanczos on exact Hessian-vector products), against the eigenvalues of
#    the dense `jax.hessian`.
# 3. **The SAM-edge** (`se.sam_edge`), with its defining equation checked.
# 4. **A short training run** (`se.train`) of gradient descent (GD) and SAM.
#
# What to look for in the last figure: GD's sharpness climbs to `2/eta` and
# hovers there, the *edge of stability* of Cohen et al. (2021). SAM's
# sharpness stops lower, at the **SAM-edge**, which depends on the gradient
# norm and moves during training, as Long & Bartlett (2023) found.
#
# SAM (Foret et al. 2021), in the form Long & Bartlett analyse, takes the step
#
# $$w \leftarrow w - \eta\, \nabla L\!\left(w + \rho\, \frac{\nabla L(w)}{\|\nabla L(w)\|}\right),$$
#
# and on a quadratic it is stable along a Hessian eigenvector with
# eigenvalue $\lambda$ exactly when
# $\eta \lambda (1 + \rho \lambda / \|\nabla L(w)\|) \le 2$. The largest such
# $\lambda$ is the SAM-edge.
#
# References:
# - P. M. Long and P. L. Bartlett, *Sharpness-Aware Minimization and the Edge
#   of Stability*, arXiv:2309.12488, 2023.
# - J. Cohen, S. Kaur, Y. Li, J. Z. Kolter and A. Talwalkar, *Gradient Descent
#   on Neural Networks Typically Occurs at the Edge of Stability*, ICLR 2021.
# - P. Foret, A. Kleiner, H. Mobahi and B. Neyshabur, *Sharpness-Aware
#   Minimization for Efficiently Improving Generalization*, ICLR 2021.

# %%
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import sam_eos as se

# SAM_EOS_SMALL=1 shrinks the run for the test suite.
SMALL = os.environ.get("SAM_EOS_SMALL") == "1"
NUM_STEPS = 200 if SMALL else 600

# Figures go to notebooks/figures/ (or $SAM_EOS_FIGURES).
_here = pathlib.Path.cwd()
FIG_DIR = pathlib.Path(os.environ.get(
    "SAM_EOS_FIGURES",
    (_here if _here.name == "notebooks" else _here / "notebooks") / "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
print(f"jax {jax.__version__} on {jax.devices()[0].platform}, SMALL={SMALL}")

# %% [markdown]
# ## A small model
#
# Any pytree of parameters and any `loss_fn(params, batch) -> scalar` will do.
# Here: a two-hidden-layer tanh network (369 parameters) fitting a smooth
# function of four inputs with the squared loss, on a full batch of 64
# points.

# %%
key = jax.random.key(0)
key_x, key_params = jax.random.split(key)
x = jax.random.normal(key_x, (64, 4))
y = jnp.sin(2 * x[:, :1]) * jnp.cos(x[:, 1:2])
batch = (x, y)


def init_mlp(key, sizes):
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    w = jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in)
    params.append({"w": w, "b": jnp.zeros(fan_out)})
  return params


def predict(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((predict(params, x) - y) ** 2)


params = init_mlp(key_params, [4, 16, 16, 1])
num_params = ravel_pytree(params)[0].size
print(f"{num_params} parameters, loss at init "
      f"{float(loss_fn(params, batch)):.4f}")

# %% [markdown]
# ## SAM as a function
#
# `se.sam_gradient` returns the loss, gradient `g` and its norm at `w`, and
# the SAM gradient at the perturbed point `w + rho * g / ||g||`, both on the
# same batch. We rebuild the SAM gradient by hand from `se.sam_perturbation`.

# %%
eta, rho = 0.2, 0.05
out = se.sam_gradient(loss_fn, params, batch, rho=rho)
print(f"loss {float(out.loss):.4f}, ||g|| {float(out.grad_norm):.4f}")

perturbation = se.sam_perturbation(out.grads, rho)
by_hand = jax.grad(loss_fn)(optax.apply_updates(params, perturbation), batch)
err = optax.tree.norm(optax.tree.sub(out.sam_grads, by_hand))
print(f"||perturbation|| = {float(optax.tree.norm(perturbation)):.6f} "
      f"(rho = {rho})")
print(f"||sam_grads - by hand|| = {float(err):.2e}")
assert np.isclose(optax.tree.norm(perturbation), rho, rtol=1e-5)
assert err <= 1e-6 * optax.tree.norm(by_hand)

# %% [markdown]
# ## SAM as an optax transform
#
# `se.sam(base_optimizer, rho)` wraps any optax optimizer. One `update` call
# is one whole SAM step: it needs the gradient at `w`, the parameters and a
# `grad_fn` that evaluates the gradient (on the same batch) at the perturbed
# point. With `optax.sgd(eta)` the update is `-eta * sam_grads`. We take 25
# steps both ways under `jit` and compare the iterates; at `rho = 0` the
# transform must reproduce plain SGD bit for bit.

# %%
grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
opt = se.sam(optax.sgd(eta), rho=rho)


@jax.jit
def step_transform(params, state):
  updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
  return optax.apply_updates(params, updates), state


@jax.jit
def step_function(params):
  sam_grads = se.sam_gradient(loss_fn, params, batch, rho=rho).sam_grads
  return jax.tree.map(lambda p, g: p - eta * g, params, sam_grads)


p_transform, state, p_function = params, opt.init(params), params
for _ in range(25):
  p_transform, state = step_transform(p_transform, state)
  p_function = step_function(p_function)
gap = optax.tree.norm(optax.tree.sub(p_transform, p_function))
print(f"after 25 steps: ||w_transform - w_function|| = {float(gap):.2e}, "
      f"last ||g|| in SAMState = {float(state.grad_norm):.4f}")
assert gap <= 1e-5 * optax.tree.norm(p_function)

sgd, sam0 = optax.sgd(eta), se.sam(optax.sgd(eta), rho=0.0)
g0 = grad_fn(params)
u_sgd, _ = sgd.update(g0, sgd.init(params), params)
u_sam0, _ = sam0.update(g0, sam0.init(params), params, grad_fn=grad_fn)
assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                        u_sgd, u_sam0)))
print("rho = 0: se.sam(optax.sgd) == optax.sgd, bit for bit")

# %% [markdown]
# ## Sharpness
#
# `se.sharpness` runs a few Lanczos iterations on exact forward-over-reverse
# Hessian-vector products: it never forms the Hessian. With 369 parameters we
# can afford the dense Hessian and compare.

# %%
lam = float(se.sharpness(loss_fn, params, batch))
flat, unravel = ravel_pytree(params)
dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
dense_eigs = np.linalg.eigvalsh(np.asarray(dense, np.float64))
print(f"se.sharpness:           {lam:.6f}")
print(f"dense eigvalsh maximum: {dense_eigs[-1]:.6f}")
print(f"next dense eigenvalues: {np.round(dense_eigs[-4:-1][::-1], 4)}")
assert np.isclose(lam, dense_eigs[-1], rtol=1e-4)

# %% [markdown]
# ## The SAM-edge
#
# `se.sam_edge(eta, rho, ||g||)` is the positive root `lam` of
# `eta * lam * (1 + rho * lam / ||g||) = 2`. It equals GD's edge `2/eta`
# (`se.gd_edge`) at `rho = 0`, falls as the gradient shrinks, and behaves like
# `sqrt(2 ||g|| / (eta * rho))` for small `||g||`: a small gradient makes SAM
# unstable at much smaller curvature than GD.

# %%
grad_norm = float(out.grad_norm)
edge = float(se.sam_edge(eta, rho, grad_norm))
residual = eta * edge * (1 + rho * edge / grad_norm) - 2
print(f"||g|| = {grad_norm:.4f}: SAM-edge {edge:.4f}, "
      f"GD edge {float(se.gd_edge(eta)):.1f}")
print(f"eta * lam * (1 + rho * lam / ||g||) - 2 = {residual:.1e}")
assert abs(residual) < 1e-5
assert float(se.sam_edge(eta, 0.0, grad_norm)) == float(se.gd_edge(eta))

norms = jnp.logspace(-4, 3, 200)
fig, ax = plt.subplots(figsize=(6, 3.5))
for r in (0.01, 0.05, 0.2):
  edges = se.sam_edge(eta, r, norms)
  assert np.all(np.diff(np.asarray(edges)) > 0)  # increasing in ||g||
  ax.loglog(norms, edges, label=f"SAM-edge, rho = {r}")
ax.loglog(norms, np.sqrt(2 * norms / (eta * 0.05)), "k:", lw=1,
          label="sqrt(2 ||g|| / (eta rho)), rho = 0.05")
ax.axhline(float(se.gd_edge(eta)), color="k", ls="--", label="2 / eta (GD)")
ax.set(xlabel="gradient norm ||g||", ylabel="edge (eigenvalue)",
       title=f"Stability edges at eta = {eta}", ylim=(1e-1, 30))
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "01_quickstart-edges.png", dpi=120)
plt.show()

# %% [markdown]
# ## Training with `se.train`
#
# `se.train` runs GD or SAM as one compiled `lax.scan` and, every
# `track_every` steps, records loss, gradient norm, sharpness (warm-started
# Lanczos), `gd_edge` and `sam_edge` at the current iterate. A list of radii
# runs as one vmapped program: here `rho = 0` (GD) and `rho = 0.05` (SAM)
# from the same initialization, with `eta = 0.2` (so `2/eta = 10`).

# %%
rhos = [0.0, 0.05]
result = se.train(loss_fn, params, batch, learning_rate=eta, rho=rhos,
                  num_steps=NUM_STEPS, track_every=5, progress=False)
hist = result.history  # dict of arrays of shape (len(rhos), num_rows)
print({k: v.shape for k, v in hist.items()})

steps = hist["step"][0]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(steps, hist["sharpness"][0], label="GD sharpness")
ax.plot(steps, hist["sharpness"][1], label=f"SAM sharpness (rho = {rhos[1]})")
ax.plot(steps, hist["sam_edge"][1], "k-", lw=1, alpha=0.6, label="SAM-edge")
ax.axhline(float(se.gd_edge(eta)), color="k", ls="--", label="2 / eta")
ax.set(xlabel="step", ylabel="top Hessian eigenvalue",
       title="GD rises to 2/eta; SAM stops at the SAM-edge")
ax.legend()
fig.tight_layout()
fig.savefig(FIG_DIR / "01_quickstart-sharpness.png", dpi=120)
plt.show()

# %% [markdown]
# The checks below state the figure's message in numbers (over the second
# half of the run), and check the recorded edges against the formula.

# %%
late = steps >= steps[-1] // 2
gd_sharp, sam_sharp = hist["sharpness"][0, late], hist["sharpness"][1, late]
ratio = sam_sharp / hist["sam_edge"][1, late]
print(f"GD : max sharpness / (2/eta) = {gd_sharp.max() / se.gd_edge(eta):.3f}")
print(f"SAM: median sharpness {np.median(sam_sharp):.3f} "
      f"vs GD {np.median(gd_sharp):.3f}")
print(f"SAM: sharpness / SAM-edge in [{ratio.min():.3f}, {ratio.max():.3f}]")

np.testing.assert_allclose(hist["gd_edge"], float(se.gd_edge(eta)), rtol=1e-6)
np.testing.assert_allclose(
    hist["sam_edge"][1], se.sam_edge(eta, rhos[1], hist["grad_norm"][1]),
    rtol=1e-5)
assert gd_sharp.max() > 0.9 * float(se.gd_edge(eta))  # GD reaches the edge
assert np.median(sam_sharp) < 0.8 * np.median(gd_sharp)  # SAM sits lower
assert 0.7 < np.median(ratio) < 1.3  # ... near its own edge
