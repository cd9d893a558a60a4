"""The train step's update: the global-norm clip against optax's, the finite guard, and one
step against a plain optax AdamW computed here."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen.app import base_config
from jaxgen.train.optim import clip_by_global_norm, make_optimizer
from jaxgen.train.state import TrainState
from jaxgen.train.step import make_train_step


def _tree(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"w": jax.random.normal(k[0], (5, 4)), "b": jax.random.normal(k[1], (4,)),
          "deep": {"k": jax.random.normal(k[2], (3, 3, 2, 2))}}


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_by_global_norm_matches_optax(max_norm):
  g = _tree()
  norm = float(optax.tree.norm(g))
  ours, _ = clip_by_global_norm(max_norm).update(g, optax.EmptyState())
  ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  if norm < max_norm:  # untouched, bit for bit
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(g)))
  else:
    assert float(optax.tree.norm(ours)) == pytest.approx(max_norm, rel=1e-6)


def _setup(grad_clip, ema_decay=0.9):
  o = base_config("ddpm").optim
  o.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip=grad_clip)
  tx, _ = make_optimizer(o, num_steps=10)

  def loss_fn(params, model_state, batch, key):
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2), ({}, model_state)

  params = {"w": jnp.ones((3, 2)) * 0.5, "b": jnp.zeros((2,))}
  state = TrainState.create(params, tx, jax.random.PRNGKey(0))
  step = make_train_step(loss_fn, ema_decay=ema_decay)
  batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.ones((4, 2)) * 3}
  return o, loss_fn, state, step, batch


@pytest.mark.parametrize("grad_clip", [0.0, 0.1])
def test_one_step_equals_plain_optax_adamw(grad_clip):
  o, loss_fn, state, step, batch = _setup(grad_clip)
  params = state.params
  grads = jax.grad(lambda p: loss_fn(p, {}, batch, None)[0])(params)
  ref_tx = optax.adamw(o.lr, o.b1, o.b2, o.eps, weight_decay=o.weight_decay,
                       mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  if grad_clip:
    ref_tx = optax.chain(optax.clip_by_global_norm(grad_clip), ref_tx)
  updates, _ = ref_tx.update(grads, ref_tx.init(params), params)
  ref = optax.apply_updates(params, updates)
  new, metrics = step(jax.tree.map(jnp.copy, state), batch)
  assert bool(metrics["finite"]) and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for e, p0, p1 in zip(*(jax.tree.leaves(t) for t in (new.ema_params, params, ref))):
    np.testing.assert_allclose(e, p0 + 0.1 * (p1 - p0), rtol=1e-6, atol=1e-7)


def test_a_non_finite_step_leaves_the_whole_state_bit_for_bit():
  _, _, state, step, batch = _setup(1.0)
  state, _ = step(state, batch)  # a state with moments and a step count of its own
  before = jax.tree.map(np.asarray, state)
  bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))
  after, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert int(after.step) == 1


def test_clip_takes_the_callers_norm():
  g = _tree()
  norm = optax.tree.norm(g)
  own, _ = clip_by_global_norm(0.5).update(g, optax.EmptyState())
  given, _ = clip_by_global_norm(0.5).update(g, optax.EmptyState(), global_norm=norm)
  for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(given)):
    np.testing.assert_array_equal(a, b)
  # the norm is taken as given, not recomputed
  halved, _ = clip_by_global_norm(0.5).update(g, optax.EmptyState(), global_norm=2 * norm)
  np.testing.assert_allclose(optax.tree.norm(halved), 0.25, rtol=1e-6)


def test_frozen_parameters_get_no_backward_and_keep_their_values():
  """A frozen tower (LiT, SD's text encoder): its parameters and their EMA stay bit-for-bit,
  its gradient is never computed (no cos, the derivative of its sin, in the step), and the
  trained parameters get optax's clip + AdamW on the trained gradients alone."""
  o = base_config("ddpm").optim
  o.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip=0.05)
  frozen = lambda path: path.startswith("['tower']")
  tx, _ = make_optimizer(o, num_steps=10, frozen=frozen)

  def loss_fn(params, model_state, batch, key):
    feats = jnp.sin(batch["x"] @ params["tower"]["w"])
    pred = feats @ params["head"]["w"] + params["head"]["b"]
    return jnp.mean((pred - batch["y"]) ** 2), ({}, model_state)

  k = jax.random.split(jax.random.PRNGKey(3), 2)
  params = {"tower": {"w": jax.random.normal(k[0], (3, 4))},
            "head": {"w": jax.random.normal(k[1], (4, 2)), "b": jnp.zeros((2,))}}
  batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.ones((4, 2)) * 3}
  state = TrainState.create(params, tx, jax.random.PRNGKey(0))
  step = make_train_step(loss_fn, ema_decay=0.9, frozen=frozen)
  hlo = step.lower(state, batch).compile().as_text()
  assert " sine(" in hlo and " cosine(" not in hlo

  grads = jax.grad(lambda p: loss_fn(p, {}, batch, None)[0])(params)["head"]
  ref_tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(o.lr, o.b1, o.b2, o.eps, weight_decay=o.weight_decay,
                                   mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  updates, _ = ref_tx.update(grads, ref_tx.init(params["head"]), params["head"])
  ref = optax.apply_updates(params["head"], updates)
  new, metrics = step(jax.tree.map(jnp.copy, state), batch)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)
  assert float(metrics["grad_norm"]) > o.grad_clip  # the clip acted
  for a, b in zip(jax.tree.leaves(new.params["head"]), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(new.params["tower"]["w"], params["tower"]["w"])
  np.testing.assert_array_equal(new.ema_params["tower"]["w"], params["tower"]["w"])


def test_a_plain_optax_optimizer_runs_in_the_step():
  """A TrainState built with any optax transformation (no extra-args support) still steps."""
  _, loss_fn, state, _, batch = _setup(0.0)
  tx = optax.adam(1e-2)
  params = state.params
  grads = jax.grad(lambda p: loss_fn(p, {}, batch, None)[0])(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  ref = optax.apply_updates(params, updates)
  state = TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(0))
  new, _ = make_train_step(loss_fn, ema_decay=0.0)(state, batch)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
