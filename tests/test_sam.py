"""SAM gradient and perturbation against closed forms on quadratics and an MLP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_eos as se
from sam_eos.sam import perturbed_gradient


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def quadratic_loss(params, hess):
  return 0.5 * jnp.sum(hess * params["w"] ** 2) + 0.5 * jnp.sum(
      params["b"] ** 2
  )


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_problem(key=0):
  k = jax.random.split(jax.random.key(key), 4)
  params = {
      "w1": jax.random.normal(k[0], (3, 5)),
      "b1": jnp.zeros(5),
      "w2": jax.random.normal(k[1], (5, 2)),
  }
  batch = (jax.random.normal(k[2], (7, 3)), jax.random.normal(k[3], (7, 2)))
  return params, batch


def test_perturbation_normalized_and_unnormalized():
  grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
  out = se.sam_perturbation(grads, 2.0, eps=0.0)
  chex.assert_trees_all_close(
      out, {"a": jnp.array([1.2, 0.0]), "b": jnp.array([[1.6]])}
  )
  chex.assert_trees_all_close(optax_norm(out), 2.0)
  raw = se.sam_perturbation(grads, 2.0, normalize=False)
  chex.assert_trees_all_close(
      raw, {"a": jnp.array([6.0, 0.0]), "b": jnp.array([[8.0]])}
  )


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_zero_gradient_gives_zero_perturbation(eps):
  grads = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  out = se.sam_perturbation(grads, 0.1, eps=eps)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_equal(out, grads)
  with jax.enable_x64(False):
    g32 = jax.jit(lambda g: se.sam_perturbation(g, 0.1, eps=0.0))(
        {"a": jnp.zeros(3, jnp.float32)}
    )
    chex.assert_tree_all_finite(g32)


def test_sam_gradient_closed_form_on_quadratic():
  hess = jnp.array([5.0, 2.0, 0.5])
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
  rho = 0.3
  out = se.sam_gradient(quadratic_loss, params, hess, rho=rho, eps=0.0)
  g = {"w": hess * params["w"], "b": params["b"]}
  norm = optax_norm(g)
  expected = {
      "w": hess * (params["w"] + rho * g["w"] / norm),
      "b": params["b"] + rho * g["b"] / norm,
  }
  chex.assert_trees_all_close(out.grads, g)
  chex.assert_trees_all_close(out.grad_norm, norm)
  chex.assert_trees_all_close(out.sam_grads, expected)
  chex.assert_trees_all_close(out.loss, quadratic_loss(params, hess))
  usam = se.sam_gradient(quadratic_loss, params, hess, rho=rho, normalize=False)
  chex.assert_trees_all_close(
      usam.sam_grads,
      {
          "w": hess * (params["w"] + rho * g["w"]),
          "b": params["b"] + rho * g["b"],
      },
  )


def test_sam_gradient_matches_manual_on_mlp_and_aux():
  params, batch = mlp_problem()
  rho, eps = 0.05, 1e-12
  out = jax.jit(lambda p, b: se.sam_gradient(mlp_loss, p, b, rho=rho))(
      params, batch
  )
  g = jax.grad(mlp_loss)(params, batch)
  n = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
  moved = jax.tree.map(lambda p, gi: p + rho * gi / (n + eps), params, g)
  chex.assert_trees_all_close(
      out.sam_grads, jax.grad(mlp_loss)(moved, batch), rtol=1e-12
  )
  chex.assert_trees_all_close(out.grad_norm, n, rtol=1e-12)

  def loss_aux(p, b):
    return mlp_loss(p, b), {"twice": 2 * mlp_loss(p, b)}

  out_aux, aux = se.sam_gradient(loss_aux, params, batch, rho=rho, has_aux=True)
  chex.assert_trees_all_close(out_aux, out)
  chex.assert_trees_all_close(aux["twice"], 2 * out.loss)


def test_rho_zero_equals_plain_gradient_and_vmap_over_rho():
  params, batch = mlp_problem(1)
  out = se.sam_gradient(mlp_loss, params, batch, rho=0.0)
  chex.assert_trees_all_equal(out.sam_grads, out.grads)
  rhos = jnp.array([0.0, 0.01, 0.1])
  many = jax.vmap(lambda r: se.sam_gradient(mlp_loss, params, batch, rho=r))(
      rhos
  )
  for i, r in enumerate(rhos):
    single = se.sam_gradient(mlp_loss, params, batch, rho=float(r))
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[i], many.sam_grads),
        single.sam_grads,
        rtol=1e-12,
    )


def test_bad_rho():
  with pytest.raises(ValueError, match="rho"):
    se.sam_perturbation({"a": jnp.ones(2)}, -0.1)
  params, batch = mlp_problem()
  with pytest.raises(ValueError, match="rho"):
    se.sam_gradient(mlp_loss, params, batch, rho=-1.0)


def test_two_cycle_test_vector():
  """DESIGN.md: SAM on diag(50, 20, 5, 1), eta=0.01, rho=0.1 settles at the edge."""
  hess = jnp.array([50.0, 20.0, 5.0, 1.0])
  eta, rho = 0.01, 0.1
  loss = lambda w, h: 0.5 * jnp.sum(h * w**2)

  def step(w, _):
    out = se.sam_gradient(loss, w, hess, rho=rho, eps=0.0)
    return w - eta * out.sam_grads, out.grad_norm

  w0 = jnp.array([1.0, 1.0, 1.0, 1.0])
  _, norms = jax.lax.scan(step, w0, None, length=3000)
  expected_norm = eta * rho * 50.0**2 / (2 - eta * 50.0)
  chex.assert_trees_all_close(
      norms[-10:], jnp.full(10, expected_norm), rtol=1e-8
  )
  chex.assert_trees_all_close(se.sam_edge(eta, rho, norms[-1]), 50.0, rtol=1e-8)


def m_sharpness_reference(loss_fn, params, batch, m, rho, normalize, eps):
  """m-sharpness written out: a Python loop over the m groups, NumPy norms."""
  size = len(batch[0]) // m
  total = None
  for j in range(m):
    group = tuple(x[j * size : (j + 1) * size] for x in batch)
    g = jax.grad(loss_fn)(params, group)
    n = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
    scale = rho / (n + eps) if normalize else rho
    moved = jax.tree.map(lambda p, gi: p + scale * gi, params, g)
    sam_g = jax.grad(loss_fn)(moved, group)
    total = sam_g if total is None else jax.tree.map(np.add, total, sam_g)
  return jax.tree.map(lambda x: x / m, total)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_m_sharpness_matches_explicit_group_loop(m, normalize):
  params, _ = mlp_problem()
  k = jax.random.split(jax.random.key(5), 2)
  batch = (jax.random.normal(k[0], (8, 3)), jax.random.normal(k[1], (8, 2)))
  rho, eps = 0.1, 1e-12
  fn = jax.jit(
      lambda p, b: se.sam_gradient(
          mlp_loss, p, b, rho=rho, normalize=normalize, m_sharpness=m
      )
  )
  out = fn(params, batch)
  expected = m_sharpness_reference(
      mlp_loss, params, batch, m, rho, normalize, eps
  )
  chex.assert_trees_all_close(out.sam_grads, expected, rtol=1e-12, atol=1e-14)
  # Loss, gradient and its norm stay the whole batch's.
  whole = se.sam_gradient(mlp_loss, params, batch, rho=rho, normalize=normalize)
  chex.assert_trees_all_close(out.grads, whole.grads, rtol=1e-12)
  chex.assert_trees_all_close(out.loss, whole.loss, rtol=1e-12)
  chex.assert_trees_all_close(out.grad_norm, whole.grad_norm, rtol=1e-12)
  if m == 1:
    chex.assert_trees_all_close(out.sam_grads, whole.sam_grads, rtol=1e-12)
  else:  # a different algorithm: the groups' ascents differ from the batch's
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(out.sam_grads), jax.tree.leaves(whole.sam_grads)
        )
    )
    assert diff > 1e-6


def test_m_sharpness_rho_zero_is_the_whole_batch_gradient_under_vmap():
  params, _ = mlp_problem()
  batch = (
      jax.random.normal(jax.random.key(1), (6, 3)),
      jax.random.normal(jax.random.key(2), (6, 2)),
  )
  rhos = jnp.array([0.0, 0.05])
  many = jax.vmap(
      lambda r: se.sam_gradient(mlp_loss, params, batch, rho=r, m_sharpness=3)
  )(rhos)
  zero = jax.tree.map(lambda x: x[0], many)
  chex.assert_trees_all_equal(zero.sam_grads, zero.grads)
  expected = m_sharpness_reference(
      mlp_loss, params, batch, 3, 0.05, True, 1e-12
  )
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[1], many.sam_grads),
      expected,
      rtol=1e-12,
      atol=1e-14,
  )


def test_m_sharpness_with_aux_and_bad_values():
  params, batch = mlp_problem()  # 7 examples

  def loss_aux(p, b):
    return mlp_loss(p, b), {"n": b[0].shape[0]}

  even = jax.tree.map(lambda x: x[:6], batch)
  out, aux = se.sam_gradient(
      loss_aux, params, even, rho=0.1, m_sharpness=2, has_aux=True
  )
  assert aux["n"] == 6  # aux of the whole batch at w
  chex.assert_trees_all_close(
      out, se.sam_gradient(mlp_loss, params, even, rho=0.1, m_sharpness=2)
  )
  for m in (0, 2, 1.5):
    with pytest.raises(ValueError, match="m_sharpness"):
      se.sam_gradient(mlp_loss, params, batch, rho=0.1, m_sharpness=m)
  with pytest.raises(ValueError, match="group_sharding"):
    perturbed_gradient(
        mlp_loss,
        params,
        batch,
        params,
        rho=0.1,
        group_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )


def test_perturbed_gradient_reuses_the_given_gradient():
  params, batch = mlp_problem(2)
  traces = []

  def counted(p, b):
    traces.append(1)
    return mlp_loss(p, b)

  grads = jax.grad(mlp_loss)(params, batch)
  out = perturbed_gradient(counted, params, batch, grads, rho=0.05)
  assert len(traces) == 1  # only the ascent's gradient: g is not recomputed
  chex.assert_trees_all_close(
      out,
      se.sam_gradient(mlp_loss, params, batch, rho=0.05).sam_grads,
      rtol=1e-12,
  )
  # The ascent follows the given gradient, whatever it is.
  fake = jax.tree.map(jnp.ones_like, params)
  num = sum(x.size for x in jax.tree.leaves(params))
  moved = jax.tree.map(lambda p: p + 0.05 / np.sqrt(num), params)
  chex.assert_trees_all_close(
      perturbed_gradient(mlp_loss, params, batch, fake, rho=0.05, eps=0.0),
      jax.grad(mlp_loss)(moved, batch),
      rtol=1e-12,
  )


# ASAM and Eigen-SAM-style variants (sam_perturbation options).

W = {"a": np.array([1.0, -2.0]), "b": np.array([[0.5]])}  # float64
G = {"a": np.array([3.0, 1.0]), "b": np.array([[2.0]])}


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("normalize", [True, False])
def test_asam_closed_form(normalize):
  rho, eta_a = 0.3, 0.1
  t = np.abs(flat(W)) + eta_a
  g = flat(G)
  expected = rho * t**2 * g
  if normalize:
    expected = expected / np.linalg.norm(t * g)
  out = se.sam_perturbation(
      G,
      rho,
      params=W,
      adaptive=True,
      adaptive_eta=eta_a,
      eps=0.0,
      normalize=normalize,
  )
  chex.assert_trees_all_close(flat(out), expected, rtol=1e-14)
  if normalize:  # on the ellipsoid ||T^{-1} e|| = rho
    chex.assert_trees_all_close(np.linalg.norm(flat(out) / t), rho)


def test_asam_is_scale_invariant_per_coordinate():
  # With eta_a = 0, rescaling w_i -> c_i w_i and g_i -> g_i / c_i (what a
  # reparametrization does to the gradient) rescales e_i -> c_i e_i: the
  # perturbed model is the same.
  c = {"a": jnp.array([2.0, 0.25]), "b": jnp.array([[10.0]])}
  opts = dict(adaptive=True, adaptive_eta=0.0, eps=0.0)
  e = se.sam_perturbation(G, 0.2, params=W, **opts)
  e_scaled = se.sam_perturbation(
      jax.tree.map(lambda g, s: g / s, G, c),
      0.2,
      params=jax.tree.map(lambda w, s: w * s, W, c),
      **opts,
  )
  chex.assert_trees_all_close(
      e_scaled, jax.tree.map(lambda x, s: x * s, e, c), rtol=1e-13
  )


def test_asam_needs_params_and_zero_gradient():
  with pytest.raises(ValueError, match="`params`"):
    se.sam_perturbation(G, 0.1, adaptive=True)
  with pytest.raises(ValueError, match="adaptive_eta"):
    se.sam_perturbation(G, 0.1, params=W, adaptive=True, adaptive_eta=-1.0)
  with pytest.raises(ValueError, match="choose one"):
    se.sam_perturbation(G, 0.1, params=W, adaptive=True, eigenvector=G)
  zero = jax.tree.map(jnp.zeros_like, G)
  out = se.sam_perturbation(zero, 0.1, params=W, adaptive=True, eps=0.0)
  chex.assert_trees_all_equal(out, zero)


@pytest.mark.parametrize("normalize", [True, False])
def test_eigen_sam_closed_form_and_sign(normalize):
  rho, alpha = 0.3, 0.7
  v = {"a": np.array([0.0, -2.0]), "b": np.array([[0.5]])}  # <g, v> = -1
  g, vf = flat(G), flat(v)
  s = np.sign(g @ vf)
  d = g / np.linalg.norm(g) + alpha * s * vf / np.linalg.norm(vf)
  if normalize:
    expected = rho * d / np.linalg.norm(d)
  else:
    expected = rho * np.linalg.norm(g) * d
  for sign in (1.0, -1.0):  # the eigenvector's sign does not matter
    out = se.sam_perturbation(
        G,
        rho,
        eigenvector=jax.tree.map(lambda x: sign * x, v),
        eigen_weight=alpha,
        eps=0.0,
        normalize=normalize,
    )
    chex.assert_trees_all_close(flat(out), expected, rtol=1e-14)


def test_eigen_weight_zero_is_sam_and_zero_gradient_is_zero():
  v = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([[0.0]])}
  chex.assert_trees_all_close(
      se.sam_perturbation(G, 0.2, eigenvector=v, eigen_weight=0.0),
      se.sam_perturbation(G, 0.2),
      rtol=1e-12,  # the eigen path renormalizes: eps / ||g|| ~ 3e-13 apart
  )
  zero = jax.tree.map(jnp.zeros_like, G)
  out = se.sam_perturbation(zero, 0.2, eigenvector=v, eigen_weight=1.0)
  chex.assert_trees_all_equal(out, zero)
  with pytest.raises(ValueError, match="eigenvector"):
    se.sam_perturbation(G, 0.2, eigenvector={"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="eigen_weight"):
    se.sam_perturbation(G, 0.2, eigenvector=v, eigen_weight=-0.5)


def test_defaults_reproduce_plain_sam_bit_for_bit():
  params, batch = mlp_problem()
  grads = jax.grad(mlp_loss)(params, batch)
  norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(grads)))
  for normalize in (True, False):
    plain = se.sam_perturbation(grads, 0.1, normalize=normalize)
    explicit = se.sam_perturbation(
        grads,
        0.1,
        normalize=normalize,
        params=params,
        adaptive=False,
        eigenvector=None,
        eigen_weight=0.0,
    )
    chex.assert_trees_all_equal(plain, explicit)
  chex.assert_trees_all_close(
      se.sam_perturbation(grads, 0.1),
      jax.tree.map(lambda g: 0.1 * g / (norm + 1e-12), grads),
      rtol=1e-14,
  )
  out = se.sam_gradient(mlp_loss, params, batch, rho=0.1)
  again = se.sam_gradient(
      mlp_loss, params, batch, rho=0.1, adaptive=False, eigenvector=None
  )
  chex.assert_trees_all_equal(out, again)


def test_sam_gradient_variants_closed_form_on_a_quadratic():
  h = jnp.array([4.0, 1.0])
  loss = lambda w, h: 0.5 * jnp.sum(h * w**2)
  w = jnp.array([1.0, 2.0])
  g = h * w  # (4, 2)
  # ASAM: e = rho T^2 g / ||T g||, T = |w| + 0.1.
  t = jnp.abs(w) + 0.1
  e = 0.5 * t**2 * g / jnp.linalg.norm(t * g)
  out = se.sam_gradient(
      loss, w, h, rho=0.5, adaptive=True, adaptive_eta=0.1, eps=0.0
  )
  chex.assert_trees_all_close(out.sam_grads, h * (w + e), rtol=1e-14)
  # Eigen-SAM-style along the top eigenvector e_1.
  v = jnp.array([1.0, 0.0])
  d = g / jnp.linalg.norm(g) + 2.0 * v
  e = 0.5 * d / jnp.linalg.norm(d)
  out = se.sam_gradient(
      loss, w, h, rho=0.5, eigenvector=v, eigen_weight=2.0, eps=0.0
  )
  chex.assert_trees_all_close(out.sam_grads, h * (w + e), rtol=1e-14)
  # m-sharpness groups use the same options (no batch dependence here).
  batch_loss = lambda w, b: loss(w, h)
  grouped = perturbed_gradient(
      batch_loss,
      w,
      jnp.zeros((4, 1)),
      g,
      rho=0.5,
      eps=0.0,
      eigenvector=v,
      eigen_weight=2.0,
      m_sharpness=2,
  )
  chex.assert_trees_all_close(grouped, h * (w + e), rtol=1e-14)
