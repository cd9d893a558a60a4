"""The captioner's decoder: incremental decoding through the key/value cache equals the full
forward pass; the jitted caption functions never recompile for new images, keys or
temperatures, and vmap over images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError, ShapeError
from jaxgen.models.captioner import CaptionerModule, TextDecoder
from jaxgen.models.resnet import ResNet
from jaxgen.models.vit import ViT
from jaxgen.pipelines import captioning as cp
from jaxgen.text.words import WordTokenizer


def small_decoder(**kw):
  return TextDecoder(**dict(dict(vocab_size=11, width=16, layers=3, unimodal_layers=1, heads=2,
                                 mlp_dim=32, max_positions=7), **kw))


def test_incremental_decoding_equals_the_full_forward_pass():
  dec = small_decoder()
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 11, (2, 7)), jnp.int32)
  memory = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  params = jax.jit(dec.init)(jax.random.PRNGKey(0), ids, memory)
  full, unimodal, _ = dec.apply(params, ids, memory)
  cache = dec.init_cache(2)
  steps = []
  for pos in range(7):
    logits, uni, cache = dec.apply(params, ids[:, pos:pos + 1], memory, cache, pos)
    steps.append(logits[:, 0])
  np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
  # causal: a later token never changes an earlier position's logits
  other = ids.at[:, 4:].set(3)
  np.testing.assert_allclose(dec.apply(params, other, memory)[0][:, :4], full[:, :4], atol=1e-6)
  # the unimodal layer does not see the image; the multimodal ones do
  moved = memory + 1.0
  np.testing.assert_allclose(dec.apply(params, ids, moved)[1], unimodal, atol=1e-6)
  assert not np.allclose(dec.apply(params, ids, moved)[0], full, atol=1e-3)


def test_decoder_checks():
  memory = jnp.zeros((1, 3, 16))
  with pytest.raises(ConfigError, match="unimodal_layers=3"):
    small_decoder(unimodal_layers=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), int), memory)
  with pytest.raises(ShapeError, match="position table holds 7"):
    small_decoder().init(jax.random.PRNGKey(0), jnp.zeros((1, 9), int), memory)


def captioner(encoder, embed_dim=0):
  tok = WordTokenizer(["a", "red", "blue", "circle", "square"], context_length=7)
  module = CaptionerModule(encoder, small_decoder(vocab_size=tok.vocab_size), embed_dim)
  model = cp.Captioner(module, (16, 16, 3), tok)
  images = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3)).astype(np.uint8)
  t = tok(["a red circle", "a blue square", "a circle", "red", "a"])
  # jitted: one small program instead of flax's eager init, op by op (hundreds of compiles)
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)),
                                   t["input_ids"][:1], t["eos_positions"][:1])
  params = {"params": variables["params"]}
  state = {k: v for k, v in variables.items() if k != "params"}
  return model, params, state, images, t


@pytest.mark.parametrize("encoder", [ResNet(stage_sizes=(1, 1), width=8, norm="group", groups=4,
                                            cifar_stem=True),
                                     ViT(patch_size=8, width=16, depth=1, heads=2)],
                         ids=["resnet", "vit"])
def test_caption_functions_compile_once_and_vmap(encoder):
  model, params, state, images, _ = captioner(encoder)
  cp.sample_ids._clear_cache()
  typed = lambda t, k, p: (jnp.float32(t), jnp.int32(k), jnp.float32(p))
  first = cp.sample_ids(model, params, state, images, jax.random.PRNGKey(0), *typed(0, 0, 1))
  for seed, temperature in [(1, 0.5), (2, 1.5)]:
    cp.sample_ids(model, params, state, images[::-1], jax.random.PRNGKey(seed),
                  *typed(temperature, 3, 0.9))
  assert cp.sample_ids._cache_size() == 1
  # vmap over single images gives the batched result
  one = lambda x: cp.sample_ids(model, params, state, x[None], jax.random.PRNGKey(0), 0.0, 0,
                                1.0)[0]
  np.testing.assert_array_equal(jax.vmap(one)(jnp.asarray(images)), first)
  # the greedy result equals a plain loop over the full forward pass, without the cache (the
  # decoder is causal, so the logits at `pos` of the padded sequence are those of its prefix)
  variables = {**params, **state}
  memory = cp._encode(model, variables, (images / 127.5 - 1).astype(np.float32))
  decode = jax.jit(lambda v, ids, m: model.module.apply(v, ids, m, method=CaptionerModule.decode))
  ids = np.full((5, 7), model.tokenizer.pad_id)
  ids[:, 0] = model.tokenizer.bos_id
  done = np.zeros(5, bool)
  for pos in range(6):
    logits = decode(variables, jnp.asarray(ids), memory)[0]
    nxt = np.where(done, model.tokenizer.pad_id, np.argmax(logits[:, pos], -1))
    ids[:, pos + 1] = nxt
    done |= nxt == model.tokenizer.eos_id
  np.testing.assert_array_equal(first, ids)


def test_beam_one_is_greedy_and_text_comes_back():
  model, params, state, images, _ = captioner(
      ResNet(stage_sizes=(1,), width=8, norm="group", groups=4, cifar_stem=True))
  greedy = cp.caption(model, params, state, images)
  assert greedy == cp.caption(model, params, state, images, beam=1, length_penalty=0.0)
  beams, scores = cp.beam_ids(model, params, state, images, jnp.float32(1.0), 3)
  assert beams.shape == (5, 3, 7) and np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)
  with pytest.raises(ConfigError, match="needs a PRNG key"):
    cp.caption(model, params, state, images, temperature=0.7)
  with pytest.raises(ShapeError, match="16, 16, 3"):
    cp.caption(model, params, state, images[:, :8])


def test_coca_embeddings_and_log_likelihood():
  model, params, state, images, tok = captioner(
      ResNet(stage_sizes=(1,), width=8, norm="group", groups=4, cifar_stem=True), embed_dim=6)
  variables = {**params, **state}
  logits, (img, txt) = model.module.apply(variables, jnp.asarray(images / 127.5 - 1),
                                          tok["input_ids"], tok["eos_positions"])
  assert logits.shape == (5, 7, model.tokenizer.vocab_size) and img.shape == txt.shape == (5, 6)
  ll = cp.caption_log_likelihood(model, params, state, images, ["a red circle"] * 5)
  # the summed log-probability, checked against the teacher-forced logits
  one = model.tokenizer(["a red circle"])
  memory = cp._encode(model, variables, jnp.asarray(images / 127.5 - 1, jnp.float32))
  lg = model.module.apply(variables, jnp.repeat(one["input_ids"], 5, 0), memory,
                          method=CaptionerModule.decode)[0]
  logp = jax.nn.log_softmax(lg, -1)
  n = int(one["lengths"][0])
  expected = sum(logp[:, i, one["input_ids"][0, i + 1]] for i in range(n - 1))
  np.testing.assert_allclose(ll, expected, rtol=1e-5)
