"""The optax SAM transform: pure-function equivalence, optax.contrib.sam, rho=0."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import sam_eos as se


def mlp_loss(params, batch):
  x, y = batch
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def problem(key=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(key), 4)
  params = {
      "w1": jax.random.normal(k[0], (4, 8), dtype),
      "b1": jnp.full(8, 0.1, dtype),
      "w2": jax.random.normal(k[1], (8, 3), dtype) / 3,
  }
  batch = (
      jax.random.normal(k[2], (16, 4), dtype),
      jax.random.normal(k[3], (16, 3), dtype),
  )
  return params, batch


def run(opt, params, batch, num_steps):
  """Runs `num_steps` jitted optax steps, returning the params trajectory."""
  grad = jax.grad(mlp_loss)

  @jax.jit
  def step(params, state, batch):
    updates, state = opt.update(
        grad(params, batch), state, params, grad_fn=lambda p: grad(p, batch)
    )
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  traj = []
  for _ in range(num_steps):
    params, state = step(params, state, batch)
    traj.append(params)
  return traj, state


def test_transform_equals_pure_definition():
  with jax.enable_x64(True):
    params, batch = problem(dtype=jnp.float64)
    eta, rho = 0.05, 0.1
    traj, state = run(se.sam(optax.sgd(eta), rho), params, batch, 5)
    w = params
    for expected in traj:
      out = se.sam_gradient(mlp_loss, w, batch, rho=rho)
      w = jax.tree.map(lambda p, g: p - eta * g, w, out.sam_grads)
      chex.assert_trees_all_close(expected, w, rtol=1e-12)
    prev = traj[-2]
    chex.assert_trees_all_close(
        state.grad_norm, optax.tree.norm(jax.grad(mlp_loss)(prev, batch))
    )


@pytest.mark.parametrize(
    "base",
    [
        lambda: optax.sgd(0.05),
        lambda: optax.sgd(0.05, momentum=0.9),
        lambda: optax.adam(1e-2),
    ],
)
def test_rho_zero_reproduces_base_bit_for_bit(base):
  params, batch = problem(1)
  sam_traj, _ = run(se.sam(base(), 0.0), params, batch, 6)
  base_traj, _ = run(base(), params, batch, 6)
  for a, b in zip(sam_traj, base_traj):
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
    "base", [lambda: optax.sgd(0.05), lambda: optax.sgd(0.05, momentum=0.5)]
)
def test_equals_optax_contrib_sam_every_second_step(base):
  with jax.enable_x64(True):
    params, batch = problem(2, dtype=jnp.float64)
    rho = 0.1
    ours, _ = run(se.sam(base(), rho, eps=0.0), params, batch, 4)
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    theirs, _ = run(
        optax.contrib.sam(base(), adv, sync_period=2), params, batch, 8
    )
    for k in range(4):
      chex.assert_trees_all_close(ours[k], theirs[2 * k + 1], rtol=1e-10)


def test_usam_transform():
  with jax.enable_x64(True):
    params, batch = problem(3, dtype=jnp.float64)
    eta, rho = 0.05, 0.02
    traj, _ = run(
        se.sam(optax.sgd(eta), rho, normalize=False), params, batch, 1
    )
    out = se.sam_gradient(mlp_loss, params, batch, rho=rho, normalize=False)
    chex.assert_trees_all_close(
        traj[0],
        jax.tree.map(lambda p, g: p - eta * g, params, out.sam_grads),
        rtol=1e-12,
    )


def test_state_shapes_stable_under_cond_and_scan():
  params, batch = problem(4)
  opt = se.sam(optax.sgd(0.05, momentum=0.9), 0.1)
  grad = jax.grad(mlp_loss)

  def body(carry, i):
    params, state = carry

    def do_step(operand):
      params, state = operand
      updates, state = opt.update(
          grad(params, batch), state, params, grad_fn=lambda p: grad(p, batch)
      )
      return optax.apply_updates(params, updates), state

    return jax.lax.cond(i % 2 == 0, do_step, lambda o: o, (params, state)), None

  state0 = opt.init(params)
  (params_out, state), _ = jax.jit(
      lambda c: jax.lax.scan(body, c, jnp.arange(4))
  )((params, state0))
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
  chex.assert_tree_all_finite(params_out)


def test_traced_rho_vmap():
  params, batch = problem(5)
  grad = jax.grad(mlp_loss)

  def one_step(rho):
    opt = se.sam(optax.sgd(0.05), rho)
    updates, _ = opt.update(
        grad(params, batch),
        opt.init(params),
        params,
        grad_fn=lambda p: grad(p, batch),
    )
    return updates

  many = jax.jit(jax.vmap(one_step))(jnp.array([0.0, 0.1]))
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[1], many), one_step(0.1), rtol=1e-5, atol=1e-7
  )
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[0], many),
      jax.tree.map(lambda g: -0.05 * g, grad(params, batch)),
      rtol=1e-5,
      atol=1e-7,
  )


def test_no_recompilation_across_steps():
  params, batch = problem(6)
  opt = se.sam(optax.sgd(0.05), 0.1)
  grad = jax.grad(mlp_loss)
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    updates, state = opt.update(
        grad(params, batch), state, params, grad_fn=lambda p: grad(p, batch)
    )
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(5):
    params, state = step(params, state, batch)
  assert len(traces) == 1


def test_zero_gradient_no_nan():
  params = {"w": jnp.zeros(3)}
  opt = se.sam(optax.sgd(0.1), 0.1, eps=0.0)
  grad_fn = lambda p: jax.tree.map(jnp.zeros_like, p)
  updates, state = opt.update(
      grad_fn(params), opt.init(params), params, grad_fn=grad_fn
  )
  chex.assert_tree_all_finite((updates, state))


def test_errors():
  with pytest.raises(ValueError, match="rho"):
    se.sam(optax.sgd(0.1), -1.0)
  opt = se.sam(optax.sgd(0.1), 0.1)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="grad_fn"):
    opt.update(params, opt.init(params), params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, opt.init(params), grad_fn=lambda p: p)
  with pytest.raises(ValueError, match="structure"):
    opt.update(
        params, opt.init(params), params, grad_fn=lambda p: {"v": p["w"]}
    )


# Issue 14: composition, plain bases, rho schedules, validation.

H_DIAG = np.array([4.0, 1.0])  # L(w) = 0.5 (4 w1^2 + w2^2), H = diag(4, 1)


def quad_grad(w):
  return H_DIAG * w


def one_update(opt, w):
  updates, state = opt.update(quad_grad(w), opt.init(w), w, grad_fn=quad_grad)
  return updates, state


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_weight_decay_chained_before_sam_is_kept(rho):
  with jax.enable_x64(True):
    w = jnp.array([1.0, 1.0])
    opt = optax.chain(
        optax.add_decayed_weights(1.0), se.sam(optax.sgd(0.1), rho, eps=0.0)
    )
    updates, state = one_update(opt, w)
    # u = g + w = (5, 2); e = rho u / ||u||; the base sees
    # u + grad(w + e) - grad(w) = u + H e.
    u = jnp.array([5.0, 2.0])
    expected = -0.1 * (u + rho * H_DIAG * u / jnp.sqrt(29.0))
    chex.assert_trees_all_close(updates, expected, rtol=1e-14)
    if rho == 0.0:
      chex.assert_trees_all_close(updates, jnp.array([-0.5, -0.2]), rtol=1e-14)
    # grad_norm is the norm of the raw gradient grad_fn(w), not of u.
    chex.assert_trees_all_close(state[1].grad_norm, jnp.sqrt(17.0), rtol=1e-14)


def test_clipping_chained_before_sam_is_kept():
  with jax.enable_x64(True):
    w = jnp.array([1.0, 1.0])
    rho = 0.1
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), se.sam(optax.sgd(0.1), rho, eps=0.0)
    )
    updates, state = one_update(opt, w)
    g = jnp.array([4.0, 1.0])
    u = g / jnp.sqrt(17.0)  # clipped to norm 1
    expected = -0.1 * (u + rho * H_DIAG * u)  # ||u|| = 1
    chex.assert_trees_all_close(updates, expected, rtol=1e-14)
    chex.assert_trees_all_close(state[1].grad_norm, jnp.sqrt(17.0), rtol=1e-14)


def test_plain_gradient_transformation_base_ignores_extra_args():
  def update(updates, state, params=None):  # no **extra_args
    del params
    return jax.tree.map(lambda g: -0.1 * g, updates), state

  base = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
  w = jnp.array([1.0, 0.0])
  opt = se.sam(base, 0.5)
  updates, _ = opt.update(
      quad_grad(w), opt.init(w), w, grad_fn=quad_grad, value=jnp.array(2.0)
  )
  chex.assert_trees_all_close(updates, jnp.array([-0.6, 0.0]), rtol=1e-6)


def test_extra_args_reach_an_extra_args_base():
  seen = []

  def update(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    seen.append(value)
    return updates, state

  base = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(), update
  )
  w = jnp.array([1.0, 0.0])
  opt = se.sam(base, 0.5)
  opt.update(quad_grad(w), opt.init(w), w, grad_fn=quad_grad, value=3.0)
  assert seen == [3.0]


def test_rho_schedule_uses_step_count():
  schedule = optax.linear_schedule(0.0, 0.3, transition_steps=3)
  params, batch = problem(7)
  sched_traj, state = run(se.sam(optax.sgd(0.05), schedule), params, batch, 4)
  assert int(state.count) == 4
  w = params
  for k, expected in enumerate(sched_traj):
    traj, _ = run(se.sam(optax.sgd(0.05), float(schedule(k))), w, batch, 1)
    w = traj[0]
    chex.assert_trees_all_close(expected, w, rtol=1e-5, atol=1e-7)


def test_constant_rho_state_counts_steps():
  params, batch = problem(8)
  _, state = run(se.sam(optax.sgd(0.05), 0.1), params, batch, 3)
  chex.assert_trees_all_equal(state.count, jnp.asarray(3, jnp.int32))


@pytest.mark.parametrize(
    "rho",
    [-0.1, float("nan"), "0.1", 1j, [0.1, 0.2], jnp.array([0.1, 0.2]), None],
)
def test_invalid_rho_raises_value_error(rho):
  with pytest.raises(ValueError, match="rho"):
    se.sam(optax.sgd(0.1), rho)


def test_schedule_returning_negative_rho_raises():
  opt = se.sam(optax.sgd(0.1), lambda count: -0.1 + 0.0 * count)
  w = jnp.array([1.0, 1.0])
  with pytest.raises(ValueError, match="rho"):
    one_update(opt, w)


# Variants and weight decay inside/outside the perturbation.


def test_variants_equal_sam_gradient():
  with jax.enable_x64(True):
    params, batch = problem(dtype=jnp.float64)
    grad = jax.grad(mlp_loss)
    v = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size)).reshape(p.shape), params
    )
    cases = [
        (dict(adaptive=True, adaptive_eta=0.05), {}, {}),
        (
            dict(eigen_weight=0.5),
            {"eigenvector": v},
            dict(eigenvector=v, eigen_weight=0.5),
        ),
    ]
    for options, update_kw, pure_kw in cases:
      pure_kw = pure_kw or options
      opt = se.sam(optax.sgd(0.1), 0.05, **options)
      updates, _ = opt.update(
          grad(params, batch),
          opt.init(params),
          params,
          grad_fn=lambda p: grad(p, batch),
          **update_kw,
      )
      ref = se.sam_gradient(mlp_loss, params, batch, rho=0.05, **pure_kw)
      chex.assert_trees_all_close(
          updates,
          jax.tree.map(lambda s: -0.1 * s, ref.sam_grads),
          rtol=1e-12,
      )


def test_variant_defaults_and_no_eigenvector_are_plain_sam_bit_for_bit():
  params, batch = problem()
  plain, _ = run(se.sam(optax.sgd(0.1), 0.05), params, batch, 3)
  weighted, _ = run(
      se.sam(optax.sgd(0.1), 0.05, eigen_weight=0.5, adaptive_eta=0.3),
      params,
      batch,
      3,
  )
  chex.assert_trees_all_equal(plain, weighted)
  with pytest.raises(ValueError, match="adaptive_eta"):
    se.sam(optax.sgd(0.1), 0.05, adaptive=True, adaptive_eta=-1.0)
  with pytest.raises(ValueError, match="eigen_weight"):
    se.sam(optax.sgd(0.1), 0.05, eigen_weight=-1.0)


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_weight_decay_inside_and_outside_the_perturbation(rho):
  with jax.enable_x64(True):
    w = jnp.array([1.0, 1.0])
    g = H_DIAG * w  # (4, 1)
    wd = 1.0
    # Inside: ascent along u = g + wd w = (5, 2); base sees u + H e.
    inside = optax.chain(
        optax.add_decayed_weights(wd), se.sam(optax.sgd(0.1), rho, eps=0.0)
    )
    u = g + wd * w
    expected_in = -0.1 * (u + rho * H_DIAG * u / jnp.linalg.norm(u))
    # Outside: ascent along g alone; base sees grad L(w + e) + wd w.
    outside = se.sam(
        optax.chain(optax.add_decayed_weights(wd), optax.sgd(0.1)),
        rho,
        eps=0.0,
    )
    e = rho * g / jnp.linalg.norm(g)
    expected_out = -0.1 * (H_DIAG * (w + e) + wd * w)
    chex.assert_trees_all_close(
        one_update(inside, w)[0], expected_in, rtol=1e-14
    )
    chex.assert_trees_all_close(
        one_update(outside, w)[0], expected_out, rtol=1e-14
    )
    if rho > 0:  # the two orders differ
      assert not np.allclose(expected_in, expected_out)
