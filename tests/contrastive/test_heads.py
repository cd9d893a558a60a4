"""Projection heads: SimCLR's MLP (with and without BatchNorm) and CLIP's linear projection."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.heads import LinearProjection, ProjectionHead


def shapes(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))


def test_projection_head_layers_and_parameter_counts():
  x = jnp.ones((4, 32))
  v1 = shapes(ProjectionHead(hidden_dim=16, out_dim=8, batch_norm=False), x)
  # SimCLR v1: W2 relu(W1 h) with biases.
  assert sum(p.size for p in jax.tree.leaves(v1)) == 32 * 16 + 16 + 16 * 8 + 8
  assert set(v1) == {"params"}
  v2 = shapes(ProjectionHead(hidden_dim=16, out_dim=8, num_layers=3, final_bn=True), x)
  p = v2["params"]
  assert set(p) == {"dense1", "bn1", "dense2", "bn2", "dense3", "bn3"}
  assert "bias" not in p["dense1"] and "scale" not in p["bn3"] and "bias" in p["bn3"]
  assert jax.tree.leaves(v2["batch_stats"])


def test_projection_head_matches_numpy_and_updates_batch_stats():
  head = ProjectionHead(hidden_dim=6, out_dim=3)
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  variables = head.init(jax.random.PRNGKey(0), x)
  out, updates = head.apply(variables, x, train=True, mutable=["batch_stats"])
  p = variables["params"]
  h = x @ np.asarray(p["dense1"]["kernel"])
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
  ref = np.maximum(h, 0) @ np.asarray(p["dense2"]["kernel"]) + p["dense2"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], 0.0)
  assert head.apply(variables, x).shape == (5, 3)  # eval mode needs no mutable collection


def test_linear_projection_has_no_bias_and_can_normalise():
  x = np.random.default_rng(1).normal(size=(3, 10)).astype(np.float32)
  proj = LinearProjection(embed_dim=4, normalize=True)
  variables = proj.init(jax.random.PRNGKey(0), x)
  assert set(variables["params"]["proj"]) == {"kernel"}
  y = proj.apply(variables, x)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
  ref = x @ np.asarray(variables["params"]["proj"]["kernel"])
  np.testing.assert_allclose(y, ref / np.linalg.norm(ref, axis=-1, keepdims=True), rtol=1e-5,
                             atol=1e-6)
