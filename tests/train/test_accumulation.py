"""Gradient accumulation: the scanned (accelerators) and unrolled (CPU default) forms both equal
one value_and_grad over the whole batch for a loss that is a mean over examples."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.train.step import accumulated_grads


def _loss(params, model_state, batch, key):
  pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
  per = jnp.sum((pred - batch["y"]) ** 2, axis=-1)
  return per.mean(), (dict(err=per.mean()), model_state)


@pytest.mark.parametrize("unroll", [False, True])
def test_accumulated_equals_whole_batch(unroll):
  rng = np.random.default_rng(0)
  params = dict(w=jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), b=jnp.zeros(3))
  batch = dict(x=jnp.asarray(rng.normal(size=(12, 5)), jnp.float32),
               y=jnp.asarray(rng.normal(size=(12, 3)), jnp.float32))
  key = jax.random.PRNGKey(0)
  (l1, (m1, _)), g1 = jax.value_and_grad(_loss, has_aux=True)(params, {}, batch, key)
  f = jax.jit(lambda p, b: accumulated_grads(_loss, p, {}, b, key, 4, unroll=unroll))
  (l4, (m4, _)), g4 = f(params, batch)
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  np.testing.assert_allclose(m4["err"], m1["err"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  text = f.lower(params, batch).as_text()
  assert ("while" in text or "scan" in text) != unroll, "unroll did not pick the form asked for"


def test_batch_not_divisible_is_an_error():
  params = dict(w=jnp.zeros((5, 3)), b=jnp.zeros(3))
  batch = dict(x=jnp.zeros((10, 5)), y=jnp.zeros((10, 3)))
  with pytest.raises(ValueError, match="does not split into 4"):
    accumulated_grads(_loss, params, {}, batch, jax.random.PRNGKey(0), 4)
