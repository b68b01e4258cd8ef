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
# # The edge of stability on a quadratic: GD and SAM
#
# On a quadratic loss `L(w) = 1/2 w^T H w` everything about the edges can be
# computed by hand, which makes it the right place to see where they come
# from. Write `lam` for an eigenvalue of `H` and `g = H w` for the gradient.
# Along the eigenvector of `lam`, one step multiplies the error by
#
# * GD: `1 - eta * lam`, stable iff `eta * lam <= 2`: the GD edge `2/eta`
#   (Cohen et al. 2021);
# * SAM, `w <- w - eta * grad L(w + rho * g / ||g||)` (Foret et al. 2021):
#   `1 - eta * lam * (1 + rho * lam / ||g||)`, stable iff
#   `eta * lam * (1 + rho * lam / ||g||) <= 2`. The largest stable `lam` is the
#   **SAM-edge** of Long & Bartlett (2023); it depends on `||g||` and falls
#   to zero with it.
#
# So SAM cannot converge to the minimum: as `||g||` shrinks, the SAM-edge
# drops below the top eigenvalue `lam1` and the iterate is pushed out again.
# Bartlett, Long & Bousquet (2023) showed that with `eta * lam1 < 2` SAM
# settles into a **2-cycle** along the top eigenvector, `w_t = (-1)^t a v1`,
# whose gradient norm solves `sam_edge(eta, rho, ||g||) = lam1`:
#
# $$\|g\| = \frac{\eta \rho \lambda_1^2}{2 - \eta \lambda_1}.$$
#
# What to look for:
# 1. GD with `eta` just above `2/lam1` diverges, just below converges.
# 2. SAM on `H = diag(50, 20, 5, 1)` with `eta = 0.01`, `rho = 0.1` ends in the
#    2-cycle with `||g|| = 1.6667` and SAM-edge exactly `lam1 = 50`, far below
#    GD's `2/eta = 200`.
# 3. Over a sweep of `eta` and `rho` the simulated `||g||` matches the closed
#    form.
# 4. In the `(lam, ||g||)` plane the run stops on the boundary of SAM's
#    stability region.
# 5. Where the exact 2-cycle exists and attracts (also for a rotated,
#    non-diagonal Hessian), and where its prediction stops being exact: a
#    quartic term bends `S / sam_edge` away from 1 and, past a critical
#    radius, removes the cycle.
#
# Every simulation is run twice, with `se.train` and with a hand-written
# `lax.scan`, and the two must agree.
#
# References:
# - P. M. Long and P. L. Bartlett, *Sharpness-Aware Minimization and the Edge
#   of Stability*, arXiv:2309.12488, 2023 (Section 3, the quadratic analysis).
# - P. L. Bartlett, P. M. Long and O. Bousquet, *The Dynamics of
#   Sharpness-Aware Minimization: Bouncing Across Ravines and Drifting Towards
#   Wide Minima*, JMLR 24, 2023 (the 2-cycle).
# - J. Cohen, S. Kaur, Y. Li, J. Z. Kolter and A. Talwalkar, *Gradient Descent
#   on Neural Networks Typically Occurs at the Edge of Stability*, ICLR 2021.
# - P. Foret, A. Kleiner, H. Mobahi and B. Neyshabur, *Sharpness-Aware
#   Minimization for Efficiently Improving Generalization*, ICLR 2021.

# %%
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import sam_eos as se

# SAM_EOS_SMALL=1 shrinks the sweeps for the test suite.
SMALL = os.environ.get("SAM_EOS_SMALL") == "1"
NUM_SWEEP = 5 if SMALL else 17        # configurations per sweep
NUM_SWEEP_STEPS = 1000 if SMALL else 3000

# Figures go to notebooks/figures/ (or $SAM_EOS_FIGURES).
_here = pathlib.Path.cwd()
FIG_DIR = pathlib.Path(os.environ.get(
    "SAM_EOS_FIGURES",
    (_here if _here.name == "notebooks" else _here / "notebooks") / "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The quadratic
#
# `H = diag(50, 20, 5, 1)`, so the eigenvectors are the coordinate axes. For
# `se.train` the "data" is the diagonal of `H`, stored as a batch of one
# example (`se.train` wants a leading example axis). Start at `w0 = (1, 1, 1,
# 1)`.

# %%
hess_diag = jnp.array([50.0, 20.0, 5.0, 1.0])
lam1 = float(hess_diag[0])
data = hess_diag[None, :]  # one "example": the Hessian diagonal
w0 = jnp.ones(4)


def loss_fn(w, batch):
  return 0.5 * jnp.sum(batch[0] * w ** 2)


def closed_form_grad_norm(eta, rho, lam=lam1):
  """||g|| on SAM's 2-cycle along an eigenvector with eigenvalue lam."""
  return eta * rho * lam ** 2 / (2 - eta * lam)


top = float(se.sharpness(loss_fn, w0, data, num_iters=4))
print(f"sharpness by Lanczos {top:.4f} (lam1 = {lam1}); "
      f"GD is stable iff eta <= 2 / lam1 = {2 / lam1}")
assert abs(top - lam1) < 1e-4 * lam1

# %% [markdown]
# ## Hand-written GD and SAM
#
# Both methods as one `lax.scan` each, recording the iterate and the gradient
# norm *before* each step, as `se.train` does. The SAM perturbation is
# `rho * g / (||g|| + eps)` with the library's default `eps = 1e-12`.


# %%
@functools.partial(jax.jit, static_argnames="num_steps")
def run_gd(w0, eta, num_steps):
  def step(w, _):
    g = hess_diag * w
    return w - eta * g, (w, jnp.linalg.norm(g))

  return jax.lax.scan(step, w0, None, length=num_steps)[1]


@functools.partial(jax.jit, static_argnames="num_steps")
def run_sam(w0, eta, rho, num_steps):
  def step(w, _):
    g = hess_diag * w
    grad_norm = jnp.linalg.norm(g)
    w_adv = w + rho * g / (grad_norm + 1e-12)
    return w - eta * hess_diag * w_adv, (w, grad_norm)

  return jax.lax.scan(step, w0, None, length=num_steps)[1]

# %% [markdown]
# ## 1. GD on either side of `2/lam1`
#
# With `eta = 0.98 * 2/lam1` the top component shrinks by `|1 - eta lam1| =
# 0.96` per step; with `eta = 1.02 * 2/lam1` it grows by `1.04` per step. The
# two learning rates run as one vmapped `se.train` program
# (`learning_rate=[...]`); `track_every=1` records every step.

# %%
gd_etas = [0.98 * 2 / lam1, 1.02 * 2 / lam1]
num_gd_steps = 300
gd = se.train(loss_fn, w0, data, learning_rate=gd_etas, num_steps=num_gd_steps,
              track_every=1, num_lanczos_iters=4, progress=False)

fig, ax = plt.subplots(figsize=(6, 3.5))
for i, eta in enumerate(gd_etas):
  ws, _ = run_gd(w0, eta, num_gd_steps)
  scan_loss = 0.5 * np.sum(np.asarray(hess_diag) * np.asarray(ws) ** 2, axis=1)
  np.testing.assert_allclose(gd.history["loss"][i], scan_loss, rtol=1e-5)
  line, = ax.semilogy(
      scan_loss, label=f"eta = {eta * lam1 / 2:.2f} x 2/lam1 (lax.scan)")
  ax.semilogy(gd.history["step"][i][::15], gd.history["loss"][i][::15], "o",
              color=line.get_color(), ms=4, label="se.train")
ax.set(xlabel="step", ylabel="loss", title="GD: stable iff eta * lam1 <= 2")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "02_edge_of_stability_quadratic-gd.png", dpi=120)
plt.show()

below, above = gd.history["loss"][0], gd.history["loss"][1]
print(f"loss after {num_gd_steps} steps: {below[-1]:.2e} (below the edge), "
      f"{above[-1]:.2e} (above); start {below[0]:.1f}")
assert below[-1] < 1e-6 * below[0] and above[-1] > 1e3 * above[0]

# %% [markdown]
# Further above the edge the loss overflows, and `se.train` stops with
# `se.TrainingDiverged`, which carries the step and the rows recorded before
# it.

# %%
try:
  se.train(loss_fn, w0, data, learning_rate=2.5 / lam1, num_steps=1000,
           track_every=10, num_lanczos_iters=4, progress=False)
  raise AssertionError("expected divergence")
except se.TrainingDiverged as e:
  print(e)
  assert 0 < e.step < 1000 and np.all(np.isfinite(e.history["loss"]))

# %% [markdown]
# ## 2. SAM settles into a 2-cycle
#
# `eta = 0.01` (so `eta * lam1 = 0.5 < 2`, and GD would converge) and
# `rho = 0.1`. The panels show the components of `|w_t|` along the four
# eigenvectors, the gradient norm against the closed form, and the SAM-edge
# recorded by `se.train` against the sharpness `lam1` and GD's edge.

# %%
eta, rho, num_sam_steps = 0.01, 0.1, 2000
ws, grad_norms = run_sam(w0, eta, rho, num_sam_steps)
ws, grad_norms = np.asarray(ws), np.asarray(grad_norms)
sam = se.train(loss_fn, w0, data, learning_rate=eta, rho=rho,
               num_steps=num_sam_steps, track_every=1, num_lanczos_iters=4,
               progress=False)
hist = sam.history
target = closed_form_grad_norm(eta, rho)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for i, lam in enumerate(np.asarray(hess_diag)):
  axes[0].semilogy(np.abs(ws[:, i]) + 1e-40, label=f"lam = {lam:g}")
axes[0].set(xlabel="step", ylabel="|w_t| along eigenvector", ylim=(1e-12, 2),
            title="Only the top direction survives")
axes[0].legend(fontsize=8)
axes[1].semilogy(grad_norms, label="lax.scan")
axes[1].semilogy(hist["step"][::4], hist["grad_norm"][::4], "o", ms=3,
                 label="se.train")
axes[1].axhline(target, color="k", ls="--",
                label="eta rho lam1^2 / (2 - eta lam1)")
axes[1].set(xlabel="step", ylabel="||g_t||", title="Gradient norm",
            xlim=(0, 200))
axes[1].legend(fontsize=8)
axes[2].plot(hist["step"], hist["sam_edge"], label="SAM-edge (se.train)")
axes[2].plot(hist["step"], hist["sharpness"], "--", label="sharpness")
axes[2].axhline(2 / eta, color="k", ls=":", label="2 / eta (GD edge)")
axes[2].set(xlabel="step", ylabel="eigenvalue", yscale="log", xlim=(0, 200),
            title="The SAM-edge comes down to lam1")
axes[2].legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "02_edge_of_stability_quadratic-sam-cycle.png", dpi=120)
plt.show()

# %% [markdown]
# The same facts as assertions: `se.train` and the scan agree step by step,
# the iterate flips sign along the top eigenvector and nothing else, and the
# DESIGN test vector holds (`||g|| -> 1.6667`, SAM-edge `-> 50`).

# %%
np.testing.assert_allclose(hist["grad_norm"], grad_norms, rtol=1e-5)
np.testing.assert_allclose(hist["sharpness"], lam1, rtol=1e-5)
final_norm, final_edge = hist["grad_norm"][-1], hist["sam_edge"][-1]
print(f"||g|| at the end: {final_norm:.6f}, closed form {target:.6f}")
print(f"SAM-edge at the end: {final_edge:.4f}, lam1 = {lam1}")
print(f"last two iterates: {ws[-2]}, {ws[-1]}")
assert abs(final_norm / target - 1) < 1e-5
assert abs(final_edge / lam1 - 1) < 1e-5
amplitude = target / lam1  # |w_t . v1| on the cycle
np.testing.assert_allclose(ws[-2:, 0], [-amplitude, amplitude], rtol=1e-5)
assert np.all(np.abs(ws[-1, 1:]) < 1e-6 * amplitude)  # nothing off v1
assert abs(float(se.sam_edge(eta, rho, target)) - lam1) < 1e-4

# %% [markdown]
# ## 3. The cycle's gradient norm across `eta` and `rho`
#
# One vmapped `se.train` program per sweep: `eta * lam1` from 0.3 to 1.9 at
# `rho = 0.1`, and `rho` from 0.03 to 3 at `eta = 0.01`. The gradient norm
# at the last recorded step is compared with the closed form. (The cycle's
# `||g||` grows without bound as `eta * lam1 -> 2`, where GD itself becomes
# unstable.)

# %%
sweep_etas = np.linspace(0.3, 1.9, NUM_SWEEP) / lam1
sweep_rhos = np.geomspace(0.03, 3.0, NUM_SWEEP)
by_eta = se.train(loss_fn, w0, data, learning_rate=sweep_etas, rho=0.1,
                  num_steps=NUM_SWEEP_STEPS, track_every=50,
                  num_lanczos_iters=4, progress=False).history
by_rho = se.train(loss_fn, w0, data, learning_rate=0.01, rho=sweep_rhos,
                  num_steps=NUM_SWEEP_STEPS, track_every=50,
                  num_lanczos_iters=4, progress=False).history

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
fine = np.linspace(0.2, 1.95, 200) / lam1
axes[0].semilogy(fine * lam1, closed_form_grad_norm(fine, 0.1), "k-",
                 label="eta rho lam1^2 / (2 - eta lam1)")
axes[0].semilogy(sweep_etas * lam1, by_eta["grad_norm"][:, -1], "o",
                 label="se.train, last step")
axes[0].set(xlabel="eta * lam1", ylabel="||g|| on the 2-cycle",
            title="rho = 0.1")
fine_rho = np.geomspace(0.02, 4.0, 200)
axes[1].loglog(fine_rho, closed_form_grad_norm(0.01, fine_rho), "k-",
               label="closed form")
axes[1].loglog(sweep_rhos, by_rho["grad_norm"][:, -1], "o",
               label="se.train, last step")
axes[1].set(xlabel="rho", ylabel="||g|| on the 2-cycle", title="eta = 0.01")
for ax in axes:
  ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "02_edge_of_stability_quadratic-cycle-norm.png", dpi=120)
plt.show()

err_eta = (by_eta["grad_norm"][:, -1]
           / closed_form_grad_norm(sweep_etas, 0.1) - 1)
err_rho = (by_rho["grad_norm"][:, -1]
           / closed_form_grad_norm(0.01, sweep_rhos) - 1)
print(f"max relative error: {np.abs(err_eta).max():.1e} (eta sweep), "
      f"{np.abs(err_rho).max():.1e} (rho sweep)")
assert np.abs(err_eta).max() < 1e-3 and np.abs(err_rho).max() < 1e-3
np.testing.assert_allclose(by_eta["sam_edge"][:, -1], lam1, rtol=1e-3)
np.testing.assert_allclose(by_rho["sam_edge"][:, -1], lam1, rtol=1e-3)

# %% [markdown]
# ## 4. The stability region in the `(lam, ||g||)` plane
#
# A direction with eigenvalue `lam` is stable at gradient norm `||g||` iff
# `eta * lam * (1 + rho * lam / ||g||) <= 2`, i.e. `lam <= sam_edge(eta, rho,
# ||g||)`. First we check `se.sam_edge` against this definition on a grid;
# then we draw the region and the SAM run of section 2: its gradient norm
# falls along the line `lam = lam1` until it meets the boundary, and stays
# there. The other eigenvalues end inside the region (their components
# decay); GD's region is everything left of `2/eta`.

# %%
lam_grid = np.geomspace(0.5, 500, 300)
norm_grid = np.geomspace(1e-2, 1e3, 300)
lam_mesh, norm_mesh = np.meshgrid(lam_grid, norm_grid)
factor = eta * lam_mesh * (1 + rho * lam_mesh / norm_mesh)
edge_mesh = np.asarray(se.sam_edge(eta, rho, norm_mesh))
clear = np.abs(factor - 2) > 1e-4  # leave out points on the boundary itself
assert np.array_equal((factor <= 2)[clear], (lam_mesh <= edge_mesh)[clear])

fig, ax = plt.subplots(figsize=(6.5, 4.5))
boundary = np.asarray(se.sam_edge(eta, rho, norm_grid))
ax.fill_betweenx(norm_grid, lam_grid[0], boundary, color="C2", alpha=0.2,
                 label="SAM stable: eta lam (1 + rho lam/||g||) <= 2")
ax.plot(boundary, norm_grid, "C2-", lw=2, label="SAM-edge")
ax.axvline(2 / eta, color="k", ls=":", label="GD edge 2/eta")
for lam in np.asarray(hess_diag)[1:]:
  ax.axvline(lam, color="0.6", lw=0.8)
first = 100  # the cycle is reached well within the first 100 steps
points = ax.scatter(np.full(first, lam1), grad_norms[:first],
                    c=np.arange(first), cmap="viridis", s=12, zorder=3,
                    label="SAM run at lam1 (colour = step)")
ax.plot([lam1], [target], "r*", ms=14, zorder=4, label="predicted 2-cycle")
ax.axhline(target, color="r", lw=0.8, ls="--")
fig.colorbar(points, ax=ax, label="step")
ax.set(xscale="log", yscale="log", xlabel="eigenvalue lam",
       ylabel="gradient norm ||g||", xlim=(lam_grid[0], lam_grid[-1]),
       ylim=(norm_grid[0], norm_grid[-1]),
       title=f"Stability region, eta = {eta}, rho = {rho}")
ax.legend(fontsize=7, loc="upper left")
fig.tight_layout()
fig.savefig(FIG_DIR / "02_edge_of_stability_quadratic-region.png", dpi=120)
plt.show()

# %% [markdown]
# ## An aside: which direction carries the cycle
#
# In exact arithmetic any nonzero top component grows back once `||g||` is
# small enough for `lam1` to be unstable, so the cycle always forms along
# `v1`. In floating point a component can first underflow to exactly zero:
# with a small `rho` (here 0.01) SAM behaves like GD until `||g||` is tiny,
# and GD shrinks the top component by `1 - eta * lam1 = 0.5` per step. In
# float32 it reaches zero after a few hundred steps, and SAM settles into the
# 2-cycle of the largest eigenvalue with a surviving component instead, with
# SAM-edge equal to *that* eigenvalue. Float64 keeps the top component
# alive long enough. (This is why the sweeps above start at `eta * lam1 = 0.3`
# and `rho = 0.03`: smaller values end in a lower cycle in float32.)

# %%
for dtype_name, x64 in [("float32", False), ("float64", True)]:
  with jax.enable_x64(x64):
    ws_small, norms_small = run_sam(jnp.ones(4, dtype_name), 0.01, 0.01, 5000)
    edge_small = float(se.sam_edge(0.01, 0.01, norms_small[-1]))
  print(f"{dtype_name}: final w = {np.asarray(ws_small[-1])}, "
        f"SAM-edge = {edge_small:.4f}")
assert abs(edge_small - lam1) < 1e-6 * lam1  # float64 reaches the top cycle
# %% [markdown]
# ## 5. Where the exact 2-cycle exists, and where it stops being exact
#
# The analysis above holds for any positive definite `H = Q diag(lam) Q^T`,
# diagonal or not: in the eigen-coordinates `u = Q^T w`, one SAM step
# multiplies `u_i` by `m_i(G) = 1 - eta lam_i (1 + rho lam_i / G)` with `G =
# ||g||`, and the SAM-edge is the `lam` with `m(G) = -1`. From this:
#
# * **Existence.** The cycle `u_1 = +-a` needs `m_1(G) = -1` at `G = lam1 a`:
#   `a = eta rho lam1 / (2 - eta lam1)`, so it exists iff `eta lam1 < 2`, and
#   then `sam_edge(eta, rho, G) = lam1` exactly. Past GD's edge, `|m_1| >= |1 -
#   eta lam1| > 1` at every `G`: SAM diverges.
# * **Attraction.** Along `v1` the cycle's multiplier is `(1 - eta lam1)^2 <
#   1`. Every other direction is multiplied by `m_i(G)`, and `|m_i(G)| < 1`
#   iff `lam_i < sam_edge(eta, rho, G) = lam1`: always. So the top cycle
#   attracts every start with a top component, as slowly as the largest
#   `|m_i(G)|` (near 1 for small `eta lam_i`). The cycles along lower
#   eigenvectors exist (`eta lam_k < 2`) but are saddles: at their `G_k` the
#   edge is `lam_k < lam1`, so `m_1(G_k) < -1`.
# * **How far `rho` reaches.** On the cycle `rho / ||g|| = (2 - eta lam1) /
#   (eta lam1^2)`, whatever `rho`: on a quadratic the SAM-edge is exact at
#   every `rho` and every `rho / ||g||`. It stops being exact where the
#   Hessian changes over the perturbation of length `rho`. Add a quartic
#   `kappa/4 (v1 . w)^4`: the symmetric cycle `+-a` solves `2a = eta (lam1
#   (a + rho) + kappa (a + rho)^3)`, a cubic in `y = 1 + a/rho` with `h = eta
#   lam1` and `k = kappa rho^2 / lam1`: `k h y^3 + (h - 2) y + 2 = 0`. There
#   `S = lam1 + 3 kappa a^2` and `||g|| = lam1 a + kappa a^3`, and `S /
#   sam_edge` departs from 1 as `k` grows. The cubic's two positive roots
#   merge at `y = 3 / (2 - h)`: the cycle exists iff `k <= (2 - h)^3 / (27
#   h)`, and past that radius SAM diverges.
#
# `tests/test_two_cycle.py` checks each statement in float64 against these
# closed forms. Here `se.train` (float32, Lanczos sharpness) runs them on a
# rotated Hessian with the same eigenvalues.

# %%
q_rot, r_rot = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
q_rot = q_rot * np.sign(np.diag(r_rot))  # a fixed rotation
rot_hess = q_rot @ np.diag(np.asarray(hess_diag)) @ q_rot.T
v1_rot = q_rot[:, 0]
w0_rot = jnp.asarray(q_rot @ np.full(4, 0.05), jnp.float32)


def quartic_loss(w, batch):
  """1/2 w^T H w + kappa/4 (v1 . w)^4; the batch is one example (H, v1, kappa)."""
  hess, v, kappa = batch[0][0], batch[1][0], batch[2][0]
  return 0.5 * w @ hess @ w + 0.25 * kappa * (v @ w) ** 4


def rotated_data(kappa):
  return (jnp.asarray(rot_hess[None], jnp.float32),
          jnp.asarray(v1_rot[None], jnp.float32),
          jnp.full((1,), kappa, jnp.float32))


print("off-diagonal part of H:", np.abs(rot_hess - np.diag(np.diag(rot_hess))).max())
rot = se.train(quartic_loss, w0_rot, rotated_data(0.0), learning_rate=0.01,
               rho=0.1, num_steps=3000, track_every=100, num_lanczos_iters=4,
               progress=False).history
print(f"rotated H: ||g|| = {rot['grad_norm'][-1]:.5f} (closed form "
      f"{closed_form_grad_norm(0.01, 0.1):.5f}), SAM-edge = "
      f"{rot['sam_edge'][-1]:.4f}, sharpness = {rot['sharpness'][-1]:.4f}")
np.testing.assert_allclose(rot["grad_norm"][-1], closed_form_grad_norm(0.01, 0.1),
                           rtol=1e-4)
np.testing.assert_allclose(rot["sam_edge"][-1], lam1, rtol=1e-4)

# %% [markdown]
# Now the quartic with `kappa = 50`, so that `k = kappa rho^2 / lam1 =
# rho^2`, at `eta = 0.01` (`h = 0.5`, critical radius `rho* = sqrt((2 -
# h)^3 / (27 h)) = 0.5`). One vmapped `se.train` sweeps `rho` from below to
# past `rho*`; the tracked sharpness over the SAM-edge at the last step is
# compared with the closed form, and the radii past `rho*` must diverge.


# %%
def quartic_cycle(h, k):
  """a / rho of the stable symmetric 2-cycle (the cubic's smaller root > 0)."""
  roots = np.roots([k * h, 0.0, h - 2, 2.0])
  y = np.sort(roots[np.abs(roots.imag) < 1e-9].real)
  y = y[y > 1]
  return y[0] - 1 if y.size else np.nan


def quartic_ratio(h, k):
  """S / sam_edge on that cycle (units of lam1 and rho drop out)."""
  x = quartic_cycle(h, k)
  grad = x + k * x ** 3  # ||g|| / (rho lam1)
  return h * (1 + 3 * k * x ** 2) * (1 + np.sqrt(1 + 8 / (h * grad))) / 4


def critical_k(h):
  return (2 - h) ** 3 / (27 * h)


kappa, eta_q = 50.0, 0.01
h_q = eta_q * lam1
rho_star = np.sqrt(critical_k(h_q) * lam1 / kappa)
fractions = np.array([0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.1, 1.3])
quartic = se.train(quartic_loss, w0_rot, rotated_data(kappa), learning_rate=eta_q,
                   rho=list(fractions * rho_star), num_steps=4000,
                   track_every=100, num_lanczos_iters=4, progress=False)
finite = quartic.diverged_at < 0
ks = kappa * (fractions * rho_star) ** 2 / lam1
predicted = np.array([quartic_ratio(h_q, k) for k in ks])
measured = quartic.history["sharpness"][:, -1] / quartic.history["sam_edge"][:, -1]
rho_over_g = fractions * rho_star / quartic.history["grad_norm"][:, -1]
for f, p, m, r, d in zip(fractions, predicted, measured, rho_over_g,
                         quartic.diverged_at):
  print(f"rho = {f:.1f} rho*: S/edge closed form {p:.4f}, se.train {m:.4f}, "
        f"rho/||g|| {r:.4f}" + (f"; diverged at step {d}" if d >= 0 else ""))
assert np.array_equal(finite, fractions < 1)  # past rho*, no cycle: divergence
np.testing.assert_allclose(measured[finite], predicted[finite], atol=2e-3)
assert abs(predicted[fractions == 0.9][0] - 1) > 0.02  # no longer exact

# %% [markdown]
# Where is the prediction within the map's band, `S / sam_edge` in `[0.85,
# 1.15]`? Left: the closed form over the plane of `h = eta lam1` and `k =
# kappa rho^2 / lam1`; the cycle exists below the black curve. Right: the
# same ratio against the dimensionless `rho lam1 / ||g||` on the cycle, one
# curve per `h`, each from `k -> 0` (the quadratic, where the ratio is 1 and
# `rho lam1 / ||g|| = (2 - h) / h`) up to the critical `k`. The printed
# lines give, per `h`, how far the ratio moves before the cycle disappears.

# %%
h_grid = np.linspace(0.05, 1.95, 60 if SMALL else 150)
k_grid = np.geomspace(1e-4, 10, 60 if SMALL else 150)
ratio_grid = np.array([[quartic_ratio(h, k) if k <= critical_k(h) else np.nan
                        for h in h_grid] for k in k_grid])
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
levels = [0.85, 0.9, 0.95, 0.99, 1.01, 1.05, 1.1, 1.15]
filled = axes[0].contourf(h_grid, k_grid, ratio_grid, levels=[0.3] + levels + [3],
                          cmap="RdBu_r")
axes[0].plot(h_grid, critical_k(h_grid), "k-", lw=2,
             label="k = (2 - h)^3 / (27 h): the cycle disappears")
axes[0].plot(np.full(finite.sum(), h_q), ks[finite], "ko", ms=4,
             label="se.train sweep above")
axes[0].plot(np.full((~finite).sum(), h_q), ks[~finite], "rx", ms=8,
             label="se.train: diverged")
axes[0].set(yscale="log", xlabel="h = eta lam1", ylabel="k = kappa rho^2 / lam1",
            title="S / SAM-edge on the quartic's 2-cycle", ylim=(1e-4, 10))
fig.colorbar(filled, ax=axes[0], label="S / SAM-edge")
axes[0].legend(fontsize=7, loc="upper right")
axes[1].axhspan(0.85, 1.15, color="C3", alpha=0.1, label="band 0.85-1.15")
for h in (0.1, 0.25, 0.5, 1.0, 1.5):
  k_path = critical_k(h) * np.geomspace(1e-4, 0.999, 200)
  x_path = np.array([quartic_cycle(h, k) for k in k_path])
  ratios = np.array([quartic_ratio(h, k) for k in k_path])
  axes[1].plot(1 / (x_path + k_path * x_path ** 3), ratios, label=f"h = {h:g}")
  print(f"h = eta lam1 = {h:g}: rho lam1/||g|| from {(2 - h) / h:.3g} (quadratic) "
        f"to {1 / (x_path[-1] + k_path[-1] * x_path[-1] ** 3):.3g} at the critical k; "
        f"S/edge within [{ratios.min():.3f}, {ratios.max():.3f}]")
axes[1].plot(rho_over_g[finite] * lam1, measured[finite], "ko", ms=4,
             label=f"se.train, h = {h_q:g}")
axes[1].set(xscale="log", xlabel="rho lam1 / ||g|| on the cycle",
            ylabel="S / SAM-edge", title="From the quadratic (k -> 0) to the critical k")
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIG_DIR / "02_edge_of_stability_quadratic-quartic.png", dpi=120)
plt.show()
below = (ratio_grid < 0.85) | (ratio_grid > 1.15)
outside_h = h_grid[np.any(below, axis=0)]
print(f"the ratio leaves [0.85, 1.15] before the cycle disappears only for "
      f"h <= {outside_h.max():.3f}" if outside_h.size else
      "the ratio stays within [0.85, 1.15] wherever the cycle exists")
assert np.all(np.isfinite(ratio_grid[k_grid[:, None] < critical_k(h_grid)[None] * 0.99]))

# %% [markdown]
# So in this model the SAM-edge stays exact at every `rho` on a quadratic,
# and with curvature that changes over the perturbation it is inexact by an
# amount set by `k = kappa rho^2 / lam1`; it leaves the band only at small
# `eta lam1`, which is where `rho lam1 / ||g||` on the cycle is large. At
# larger `eta lam1` the cycle disappears, and SAM diverges (the tests check
# three step sizes), before the ratio leaves the band. `sam-eos map`
# measures the same ratio on a network.
