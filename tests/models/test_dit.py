"""DiT: shapes for every conditioning, adaLN-Zero starts at zero output, remat and bfloat16 give
the float32 results, the position table makes any patch grid work."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.dit import DiT

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
T = jnp.array([3.0, 700.0])


def init(model, **cond):
  return model.init(jax.random.PRNGKey(0), X, T, **cond)


def randomized(params, seed=1):
  """Every parameter random (adaLN-Zero's zero layers would hide most of the network)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, v.shape) for k, v in
                                   zip(keys, leaves)])


@pytest.mark.parametrize("cond", ["none", "class", "cross", "joint"])
def test_conditionings_and_zero_start(cond):
  kw = dict(patch_size=2, depth=2, hidden_size=32, heads=4)
  args = {}
  if cond == "class":
    kw["num_classes"] = 5
    args["labels"] = jnp.array([0, 5])  # 5: the null label
  if cond in ("cross", "joint"):
    kw.update(context_dim=12, text_mode=cond)
    args["context"] = jnp.ones((2, 7, 12))
  model = DiT(**kw)
  params = init(model, **args)
  out = model.apply(params, X, T, **args)
  assert out.shape == X.shape
  np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero: the final layer starts at zero
  params = randomized(params)
  out = model.apply(params, X, T, **args)
  assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).mean()) > 0
  if cond in ("cross", "joint"):  # the text changes the output
    other = model.apply(params, X, T, context=args["context"] * 0.5)
    assert not np.allclose(other, out)


def test_remat_and_bfloat16():
  model = DiT(patch_size=2, depth=2, hidden_size=32, heads=4, num_classes=3)
  y = jnp.array([1, 2])
  params = randomized(init(model, labels=y))
  loss = lambda m, p: jnp.mean(m.apply(p, X, T, labels=y) ** 2)
  val, grad = jax.value_and_grad(lambda p: loss(model, p))(params)
  val_r, grad_r = jax.value_and_grad(lambda p: loss(model.clone(remat=True), p))(params)
  np.testing.assert_allclose(val_r, val, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad_r, grad)
  bf = model.clone(dtype="bfloat16").apply(params, X, T, labels=y)
  f32 = model.apply(params, X, T, labels=y)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, f32, atol=0.05 * float(jnp.abs(f32).max()))


def test_other_image_sizes_and_checks():
  model = DiT(patch_size=4, depth=1, hidden_size=16, heads=2)
  params = init(model)
  assert model.apply(params, jnp.zeros((1, 12, 16, 3)), T[:1]).shape == (1, 12, 16, 3)
  with pytest.raises(ShapeError, match="not divisible by the patch size 4"):
    model.apply(params, jnp.zeros((1, 10, 8, 3)), T[:1])
  with pytest.raises(ConfigError, match="labels are needed exactly when"):
    model.apply(params, X, T, labels=jnp.array([0, 1]))
  with pytest.raises(ConfigError, match="unknown DiT size"):
    DiT(size="XXL").init(jax.random.PRNGKey(0), X, T)
