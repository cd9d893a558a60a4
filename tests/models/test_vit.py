"""ViT: the published ViT-B/16 parameter count, a PyTorch reference forward, shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.vit import ViT, ViT_B16


def random_params(model, x, seed=0):
  """Parameters of the right shapes drawn in NumPy (eager jax.random compiles per shape)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))

  def draw(path, leaf):
    n = rng.normal(size=leaf.shape)
    if path[-1].key == "kernel":
      return n / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1.0 + 0.2 * n if path[-1].key == "scale" else 0.2 * n

  return jax.tree_util.tree_map_with_path(lambda p, leaf: jnp.asarray(draw(p, leaf), jnp.float32),
                                          shapes)


def test_vit_b16_parameter_count():
  # torchvision's vit_b_16 / timm's vit_base_patch16_224 (1000-way head): 86,567,656.
  shapes = jax.eval_shape(lambda: ViT_B16(num_classes=1000).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 86_567_656
  assert shapes["params"]["pos_embedding"].shape == (1, 197, 768)


def torch_reference(params, x, heads, depth):
  """The same pre-LN ViT built from torch.nn.TransformerEncoderLayer(norm_first=True)."""
  import torch
  t = lambda a: torch.tensor(np.asarray(a))
  width = params["patch_embed"]["kernel"].shape[-1]
  h = torch.nn.functional.conv2d(t(x).permute(0, 3, 1, 2),
                                 t(params["patch_embed"]["kernel"]).permute(3, 2, 0, 1),
                                 t(params["patch_embed"]["bias"]),
                                 stride=params["patch_embed"]["kernel"].shape[0])
  h = h.flatten(2).transpose(1, 2)  # [B, N, D], patches in row-major order
  h = torch.cat([t(params["cls_token"]).expand(h.shape[0], 1, width), h], dim=1)
  h = h + t(params["pos_embedding"])
  for i in range(depth):
    p = params[f"block{i + 1}"]
    a, m = p["attn"], p["mlp"]
    layer = torch.nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=m["fc1"]["kernel"].shape[1], dropout=0.0,
        activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
    sd = {"self_attn.in_proj_weight": torch.cat([t(a[n]["kernel"]).T for n in
                                                 ("query", "key", "value")]),
          "self_attn.in_proj_bias": torch.cat([t(a[n]["bias"]) for n in
                                               ("query", "key", "value")]),
          "self_attn.out_proj.weight": t(a["out"]["kernel"]).T,
          "self_attn.out_proj.bias": t(a["out"]["bias"]),
          "linear1.weight": t(m["fc1"]["kernel"]).T, "linear1.bias": t(m["fc1"]["bias"]),
          "linear2.weight": t(m["fc2"]["kernel"]).T, "linear2.bias": t(m["fc2"]["bias"]),
          "norm1.weight": t(p["ln1"]["scale"]), "norm1.bias": t(p["ln1"]["bias"]),
          "norm2.weight": t(p["ln2"]["scale"]), "norm2.bias": t(p["ln2"]["bias"])}
    layer.load_state_dict(sd)
    with torch.no_grad():
      h = layer(h)
  h = torch.nn.functional.layer_norm(h, (width,), t(params["ln_final"]["scale"]),
                                     t(params["ln_final"]["bias"]), eps=1e-6)
  return h.numpy()


def test_forward_matches_a_pytorch_reference_and_returns_tokens():
  model = ViT(patch_size=4, width=16, depth=2, heads=2)
  x = np.random.default_rng(0).uniform(size=(2, 8, 12, 3)).astype(np.float32)
  variables = random_params(model, x)
  pooled, tokens = model.apply(variables, x, return_tokens=True)
  assert pooled.shape == (2, 16) and tokens.shape == (2, 6, 16)
  ref = torch_reference(variables["params"], x, heads=2, depth=2)
  np.testing.assert_allclose(pooled, ref[:, 0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tokens, ref[:, 1:], rtol=1e-4, atol=1e-5)


def test_mean_pooling_has_no_class_token():
  model = ViT(patch_size=4, width=8, depth=1, heads=2, pool="mean", num_classes=3)
  x = jnp.ones((2, 8, 8, 1))
  variables = random_params(model, x)
  assert "cls_token" not in variables["params"]
  assert variables["params"]["pos_embedding"].shape == (1, 4, 8)
  logits, tokens = model.apply(variables, x, return_tokens=True)
  assert logits.shape == (2, 3) and tokens.shape == (2, 4, 8)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, tokens.mean(axis=1) @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-5)


def test_shape_errors_are_clear():
  model = ViT(patch_size=4, width=8, depth=1, heads=2)
  with pytest.raises(ShapeError, match="10x8 is not divisible by the patch size 4"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 8, 3)))
  variables = random_params(model, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ShapeError, match="initialised for 4 patches"):
    model.apply(variables, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ConfigError, match="divisible by heads"):
    ViT(width=10, heads=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
