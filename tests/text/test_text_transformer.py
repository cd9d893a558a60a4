"""TextTransformer (jaxgen/models/text.py): causality, pooling rules, layer selection, bf16, errors.
Numerical parity with transformers' CLIPTextModel is in tests/convert/test_clip_text.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, ShapeError, TokenError
from jaxgen.models.text import TextTransformer

EOS = 9
IDS = np.array([[8, 3, 4, EOS, EOS, EOS], [8, 5, EOS, 0, 0, 0]], np.int32)


@pytest.fixture(scope="module")
def model():
  m = TextTransformer(vocab_size=10, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                      max_positions=6, eos_token_id=EOS, projection_dim=8)
  return m, jax.jit(m.init)(jax.random.PRNGKey(0), IDS)  # one compile, not one per op


def test_outputs_and_pooling(model):
  m, v = model
  out = m.apply(v, IDS, output_hidden_states=True, layer_index=-2, norm_layer=True)
  assert out["last_hidden_state"].shape == (2, 6, 16) and out["text_embeds"].shape == (2, 8)
  assert len(out["hidden_states"]) == 3
  last = np.asarray(out["last_hidden_state"])
  # CLIP's rule: the first end token (row 0 pads with it), not the last
  np.testing.assert_allclose(out["pooler_output"], last[[0, 1], [3, 2]], rtol=1e-6)
  proj = v["params"]["text_projection"]["kernel"]
  np.testing.assert_allclose(out["text_embeds"], last[[0, 1], [3, 2]] @ proj, rtol=1e-5,
                             atol=1e-6)
  # argmax rule: the largest id, which is the end token here as in CLIP's vocabulary
  argmax = m.clone(pooling="argmax").apply(v, IDS)["pooler_output"]
  np.testing.assert_allclose(argmax, out["pooler_output"], rtol=1e-6)
  # the penultimate layer through the final LayerNorm, by hand
  h = np.asarray(out["hidden_states"][1], np.float64)
  ln = v["params"]["final_layer_norm"]
  ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out["layer_hidden_state"], ref * ln["scale"] + ln["bias"], atol=1e-5)
  raw = m.apply(v, IDS, layer_index=1)["layer_hidden_state"]
  np.testing.assert_array_equal(raw, out["hidden_states"][1])


def test_attention_is_causal_and_masks_padding(model):
  m, v = model
  changed = IDS.copy()
  changed[:, 4:] = 1
  a = m.apply(v, IDS)["last_hidden_state"]
  b = m.apply(v, changed)["last_hidden_state"]
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, 4:], b[:, 4:])
  # a padding mask changes only the padded positions' outputs (the attention is causal anyway)
  mask = (np.arange(6) < np.array([[4], [3]])).astype(np.int32)
  c = m.apply(v, IDS, mask)["last_hidden_state"]
  np.testing.assert_allclose(c[0, :4], a[0, :4], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(c[1, :3], a[1, :3], rtol=1e-6, atol=1e-6)
  assert not np.allclose(c[1, 3:], a[1, 3:])


def test_bidirectional_attention_reads_later_tokens_and_hides_padding(model):
  """causal=False: the same parameters, every token attends to every unmasked token."""
  m, v = model
  bi = m.clone(causal=False)
  changed = IDS.copy()
  changed[1, 1] = 6  # a later token of row 1
  a = bi.apply(v, IDS)["last_hidden_state"]
  b = bi.apply(v, changed)["last_hidden_state"]
  assert not np.allclose(a[1, 0], b[1, 0])  # the first token's state reads the second
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
  # padding hidden by the mask: changing padded ids changes no real token's state
  mask = (np.arange(6) < np.array([[6], [3]])).astype(np.int32)
  padded = IDS.copy()
  padded[1, 3:] = 7
  c, d = (bi.apply(v, x, mask)["last_hidden_state"] for x in (IDS, padded))
  np.testing.assert_allclose(c[1, :3], d[1, :3], rtol=1e-6, atol=1e-6)
  # with the same weights, the first token's state is no longer the causal model's
  assert not np.allclose(bi.apply(v, IDS)["last_hidden_state"][:, 0],
                         m.apply(v, IDS)["last_hidden_state"][:, 0])


def test_bfloat16_compute_keeps_float32_params(model):
  m, v = model
  m16 = m.clone(dtype=jnp.bfloat16)
  v16 = jax.eval_shape(m16.init, jax.random.PRNGKey(0), IDS)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v16))
  out = jax.jit(m16.apply)(v, IDS)  # under jit the vocabulary check is skipped (traced ids)
  assert out["last_hidden_state"].dtype == jnp.float32  # from the float32 final LayerNorm
  ref = m.apply(v, IDS)
  np.testing.assert_allclose(out["last_hidden_state"], ref["last_hidden_state"], atol=0.1)


def test_bad_inputs(model):
  m, v = model
  with pytest.raises(ShapeError, match="input_ids have 7 tokens but the position table holds 6"):
    m.apply(v, np.zeros((1, 7), np.int32))
  with pytest.raises(TokenError, match=r"token ids must lie in \[0, 10\), got values from 0 to 12"):
    m.apply(v, np.array([[0, 12]], np.int32))
  with pytest.raises(ShapeError, match=r"must be \[batch, length\]"):
    m.apply(v, np.zeros((6,), np.int32))
  with pytest.raises(ConfigError, match="layer_index is traced: make it a static argument"):
    jax.jit(m.apply)(v, IDS, layer_index=-2)
  with pytest.raises(ConfigError, match="layer_index 3 is out of range for 2 layers"):
    m.apply(v, IDS, layer_index=3)
  with pytest.raises(ConfigError, match="unknown activation 'relu'"):
    m.clone(activation="relu").apply(v, IDS)
  with pytest.raises(ConfigError, match="pooling must be one of"):
    m.clone(pooling="mean").apply(v, IDS)
