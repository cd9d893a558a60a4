"""jaxgen's DiT against diffusers' DiTTransformer2DModel on the same weights; the paper's
DiT-XL/2 parameter count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.dit import from_diffusers_dit
from jaxgen.errors import CheckpointError
from jaxgen.models.dit import DiT, num_params, sincos_2d

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def reference_model(seed=0):
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(**CONFIG).eval()
  with torch.no_grad():
    for p in model.parameters():  # no zero-initialised layer: every path is exercised
      p.normal_(0, 0.2)
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:  # as converted checkpoints are
      block.norm1.emb.load_state_dict(first)
  return model


def state_dict_of(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_dit_matches_diffusers():
  model = reference_model()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
  t = np.array([0, 500, 999])
  labels = np.array([1, 9, 10])  # 10: the null label
  with torch.no_grad():
    expected = model(torch.from_numpy(x), torch.from_numpy(t),
                     torch.from_numpy(labels)).sample.numpy()
  module, variables = from_diffusers_dit(dict(CONFIG), state_dict_of(model))
  got = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     labels=jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=2e-4,
                             rtol=1e-4)


def test_embedder_copies_that_differ_are_refused():
  sd = state_dict_of(reference_model())
  name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
  sd[name] = sd[name] + 1
  with pytest.raises(CheckpointError, match="differs from block 0"):
    from_diffusers_dit(dict(CONFIG), sd)


def test_position_table_matches_diffusers():
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  expected = get_2d_sincos_pos_embed(32, 6, base_size=6).numpy()
  np.testing.assert_allclose(sincos_2d(32, 6, 6), expected, atol=1e-6)


def test_dit_xl_2_has_the_papers_parameter_count():
  """DiT-XL/2 on 32x32x4 latents, 1000 classes, learned sigma (8 output channels): the paper's
  675M; the original code's count (675,129,632) includes its fixed 256 x 1152 position table,
  which jaxgen computes instead of storing."""
  dit = DiT(size="XL", patch_size=2, out_channels=8, num_classes=1000)
  shapes = jax.eval_shape(lambda: dit.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)),
                                           jnp.zeros((1,)), labels=jnp.zeros((1,), jnp.int32)))
  assert num_params(shapes["params"]) + 256 * 1152 == 675_129_632
  # diffusers' version holds a copy of the embedders in each of the 28 blocks
  with torch.device("meta"):
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72,
                                          in_channels=4, out_channels=8, num_layers=28,
                                          sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
  per_copy = sum(p.numel() for p in ref.transformer_blocks[0].norm1.emb.parameters())
  assert num_params(shapes["params"]) == sum(p.numel() for p in ref.parameters()) - 27 * per_copy
