"""Embedding-conditioned diffusion (image variations) through the real loop, `jaxgen vary` and
`jaxgen eval`, on smoke configs: the embeddings are those of the SimCLR run's own pipeline."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import check_zeros_for_pretrained, config
from jaxgen import app
from jaxgen.cli import main
from jaxgen.contrastive.losses import l2_normalize
from jaxgen.data import load_all, load_source
from jaxgen.errors import ConfigError, ShapeError
from jaxgen.eval.variations import faithfulness
from jaxgen.pipelines import contrastive
from jaxgen.pipelines import diffusion as pipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("variations")
  app.train(config("simclr", "data.image_size=8"), root / "simclr", progress=False)
  app.train(config("classifier", "data.image_size=8"), root / "classifier", progress=False)
  c = config("vary", "data.image_size=8", arg=f"smoke,encoder={root / 'simclr'}")
  app.train(c, root / "vary", progress=False)
  return root


def test_the_config_reads_the_encoder_run(runs):
  c = config("vary", arg=f"smoke,encoder={runs / 'simclr'}")
  simclr = app.restore_run(runs / "simclr", with_state=False).config
  assert c.model.embedding.encoder.to_dict() == simclr.model.encoder.to_dict()
  assert (c.model.embedding.image_size, c.model.embedding.projection) == (8, 0)
  with pytest.raises(ConfigError, match="holds a classifier run"):
    config("vary", arg=f"smoke,encoder={runs / 'classifier'}")
  bad = config("vary", arg=f"smoke,encoder={runs / 'simclr'}")
  bad.model.num_classes = 10
  with pytest.raises(ConfigError, match="alternatives"):
    app.validate(bad)


def test_the_init_program_leaves_the_loaded_tower_at_zero(runs):
  check_zeros_for_pretrained(app.build_task(
      config("vary", "data.image_size=8", arg=f"smoke,encoder={runs / 'simclr'}")))


def test_embeddings_are_the_simclr_runs_features(runs):
  """The run's frozen embedder, the training cache and SimCLR's own feature pipeline agree."""
  run = app.restore_run(runs / "vary", with_state=False)
  simclr = app.restore_run(runs / "simclr", with_state=False)
  images = load_all(load_source(run.config.data, run.config.data.eval_split), limit=16)["image"]
  ref = contrastive.features(simclr.task.module, simclr.params, simclr.model_state, images)
  ref = np.asarray(l2_normalize(ref)) * math.sqrt(ref.shape[-1])
  got = pipe.embed_images(run.task.model, run.model_state, images)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # the cache the loader joins to batches: the same function of the training images
  state = app.restore_run(runs / "vary").state
  train_src = load_source(run.config.data, run.config.data.train_split)
  cached = run.task.cached_inputs(state, train_src)["embedding"]
  assert cached.shape == (len(train_src), ref.shape[-1])
  first = load_all(train_src, limit=8)["image"]
  np.testing.assert_allclose(cached[:8], pipe.embed_images(run.task.model, run.model_state, first),
                             rtol=1e-4, atol=1e-4)


def test_the_loss_from_the_cache_equals_the_loss_on_the_device(runs):
  run = app.restore_run(runs / "vary", with_state=False)
  images = load_all(load_source(run.config.data, run.config.data.train_split), limit=8)["image"]
  batch = {"image": jnp.asarray(images)}
  cached = dict(batch, embedding=jnp.asarray(
      pipe.embed_images(run.task.model, run.model_state, images)))
  key = jax.random.PRNGKey(3)
  loss = jax.jit(run.task.loss_fn)   # one program per batch form, not flax's eager ops
  a = loss(run.params, run.model_state, batch, key)[0]
  b = loss(run.params, run.model_state, cached, key)[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_variations_and_guidance(runs):
  run = app.restore_run(runs / "vary", with_state=False)
  model = run.task.model
  images = load_all(load_source(run.config.data, run.config.data.eval_split), limit=3)["image"]
  x = pipe.vary(model, run.params, run.model_state, jax.random.PRNGKey(0), images, num=2,
                num_steps=3)
  assert x.shape == (3, 2, 8, 8, 1) and np.isfinite(x).all()
  assert not np.allclose(x[0, 0], x[0, 1])   # the rest varies
  emb = jnp.asarray(pipe.embed_images(model, run.model_state, images))
  key = jax.random.PRNGKey(1)
  plain = pipe.generate(model, run.params, key, num=3, embeddings=emb, num_steps=3)
  unit = pipe.generate(model, run.params, key, num=3, embeddings=emb, num_steps=3,
                       guidance_scale=jnp.float32(1.0))   # guidance 1 = the conditional model
  np.testing.assert_allclose(plain, unit, atol=2e-5)
  uncond = pipe.generate(model, run.params, key, num=3, num_steps=3)
  zeros = pipe.generate(model, run.params, key, num=3, embeddings=jnp.zeros_like(emb),
                        num_steps=3)
  np.testing.assert_allclose(uncond, zeros, atol=1e-6)   # no embedding = the zero embedding
  with pytest.raises(ConfigError, match="not labels"):
    pipe.generate(model, run.params, key, num=3, labels=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ShapeError, match=r"\[3, "):
    pipe.generate(model, run.params, key, num=3, embeddings=emb[:2])
  with pytest.raises(ShapeError):
    pipe.vary(model, run.params, run.model_state, key, images[..., :1][:, :4], num=2)


def test_vary_command_and_eval(runs, tmp_path, capsys):
  picture = tmp_path / "shoe.png"   # a user's picture of another size: resized, with a warning
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)).save(picture)
  main(["vary", "--workdir", str(runs / "vary"), "--image", str(picture), "--num", "3",
        "--steps", "2", "--guidance", "2"])
  out = capsys.readouterr().out.split()
  assert out == [str(tmp_path / "shoe_variations.png")]
  with Image.open(out[0]) as im:
    assert im.size[0] > 4 * im.size[1]   # one row: the picture, a gap, 3 variations
  with pytest.raises(SystemExit):       # a run without embeddings: a clear error, exit 2
    main(["vary", "--workdir", str(runs / "simclr"), "--image", str(picture)])
  assert "conditioned on image embeddings" in capsys.readouterr().err
  main(["eval", "--workdir", str(runs / "vary"), "--num", "20", "--steps", "2",
        "--variations", "6", "--per-source", "2", "--feature-net", str(runs / "classifier")])
  metrics = json.loads(capsys.readouterr().out)
  v = metrics["variations"]
  assert (v["sources"], v["per_source"]) == (6, 2)
  for k in ("class_agreement", "chance", "similarity", "random_similarity", "source_accuracy"):
    assert np.isfinite(v[k])


def test_faithfulness_scores():
  rng = np.random.default_rng(0)
  n, k, d, classes = 40, 3, 16, 4
  labels = np.arange(n) % classes
  centres = rng.normal(size=(classes, d)) * 3
  src = centres[labels] + rng.normal(size=(n, d))
  logits = np.eye(classes)[labels] * 5
  # variations equal to their sources: every class agrees, similarity 1
  same = faithfulness(src, labels, np.repeat(src[:, None], k, 1),
                      np.repeat(logits[:, None], k, 1))
  assert same["class_agreement"] == 1.0 and same["similarity"] == pytest.approx(1.0)
  # chance pairs each source with another one: with 4 balanced classes about a quarter agree
  # (fewer: the derangement never pairs a source with itself)
  assert 0.1 < same["chance"] < 0.4
  assert same["random_similarity"] < 0.8
  # variations that ignore their source (a shuffle): agreement falls to chance
  perm = rng.permutation(n)
  shuffled = faithfulness(src, labels, np.repeat(src[perm][:, None], k, 1),
                          np.repeat(logits[perm][:, None], k, 1))
  assert shuffled["class_agreement"] < 0.5 and shuffled["similarity"] < 0.8
  with pytest.raises(ValueError, match="do not agree"):
    faithfulness(src, labels[:-1], np.repeat(src[:, None], k, 1), np.repeat(logits[:, None], k, 1))


def test_a_clip_runs_projected_embeddings(tmp_path):
  """With a clip run, the embedding is its projected, normalised image embedding: the one
  jaxgen.pipelines.clip.embed_images gives (scaled by sqrt(D))."""
  from jaxgen import weights
  from jaxgen.pipelines import clip as clip_pipe
  c = config("clip")
  task = app.build_task(c)
  params, state = task.init(jax.random.PRNGKey(0), task.example_batch())
  weights.save_weights(tmp_path / "clip", c, params, state, tokenizer_from=None)
  v = config("vary", "data.name=shapes", "data.channels=3", "data.image_size=16",
             arg=f"smoke,encoder={tmp_path / 'clip'}")
  assert (v.model.embedding.projection, v.model.embedding.image_size) == (c.model.embed_dim, 32)
  vary = app.build_task(v)
  fresh, fresh_state = vary.init(jax.random.PRNGKey(1), vary.example_batch())
  _, loaded = vary.pretrained(fresh, fresh_state)
  images = load_all(load_source(c.data, "test"), limit=4)["image"]   # 32x32, the clip run's size
  model = clip_pipe.DualEncoder(task.module, (32, 32, 3), task.tokenizer)
  ref = clip_pipe.embed_images(model, params, state, images) * math.sqrt(c.model.embed_dim)
  small = np.asarray(jax.image.resize(jnp.asarray(images, jnp.float32), (4, 16, 16, 3), "linear",
                                      antialias=True))   # the vary run's 16x16 data ...
  got = vary.embedder.apply(loaded["embedder"], jnp.asarray(images, jnp.float32) / 127.5 - 1)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # ... are resized back to the tower's 32x32 inside the embedder
  assert pipe.embed_images(vary.model, loaded, np.clip(small, 0, 255).astype(np.uint8)).shape \
      == (4, c.model.embed_dim)
  bad = config("vary", "data.name=shapes", "data.channels=3", "data.image_size=16",
               "model.embedding.projection=0", arg=f"smoke,encoder={tmp_path / 'clip'}")
  with pytest.raises(ConfigError, match="projection=8"):
    app.build_task(bad).pretrained(fresh, fresh_state)


def test_rcg_prior_trains_samples_and_evaluates(runs, tmp_path, capsys):
  """The embedding prior trains on the decoder's embeddings through the loop, and its samples,
  decoded, are images; `jaxgen sample` and `jaxgen eval` work on it."""
  from jaxgen.pipelines import prior as prior_pipe
  c = config("rcg", arg=f"smoke,decoder={runs / 'vary'}")
  assert c.data.image_size == 8     # read from the decoder run
  app.train(c, tmp_path / "rcg", progress=False)
  run = app.restore_run(tmp_path / "rcg", with_state=False)
  emb = run.task.train_embeddings()
  stats = run.model_state["stats"]
  np.testing.assert_allclose(stats["mean"], emb.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["std"], np.maximum(emb.std(0), 1e-3), rtol=1e-4, atol=1e-5)
  e = prior_pipe.sample_embeddings(run.task.model, run.params, run.model_state,
                                   jax.random.PRNGKey(0), num=5, num_steps=3)
  d = emb.shape[-1]
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), math.sqrt(d), rtol=1e-5)
  main(["sample", "--workdir", str(tmp_path / "rcg"), "--num", "4", "--steps", "2",
        "--decoder-steps", "2", "--out", str(tmp_path / "rcg.png")])
  assert capsys.readouterr().out.split() == [str(tmp_path / "rcg.png")]
  main(["eval", "--workdir", str(tmp_path / "rcg"), "--num", "12", "--steps", "2",
        "--decoder-steps", "2", "--feature-net", str(runs / "classifier")])
  metrics = json.loads(capsys.readouterr().out)
  assert metrics["num_samples"] == 12 and np.isfinite(metrics["frechet_distance"])
  with pytest.raises(ConfigError, match="not conditioned on image embeddings"):
    app.build_task(config("rcg", arg=f"smoke,decoder={runs / 'simclr'}"))
  with pytest.raises(ConfigError, match="no run"):
    app.build_task(config("rcg", arg=f"smoke,decoder={tmp_path / 'missing'}"))


def test_the_prior_sampler_is_the_one_core():
  """On Gaussian data the MLP prior's pipeline equals jaxgen.diffusion.sample with the same
  network: sample_embeddings adds only the de-standardisation and the projection."""
  from jaxgen import diffusion
  from jaxgen.models.mlp_denoiser import MLPDenoiser
  from jaxgen.pipelines import prior as prior_pipe
  from jaxgen.pipelines.diffusion import DiffusionModel
  net = MLPDenoiser(6, width=16, depth=2)
  model = DiffusionModel(net, (6,), schedule="cosine", num_timesteps=100, clip_x0=None)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)), jnp.zeros((1,)))
  params = jax.tree.map(lambda p: p + 0.05, params)   # the output layer starts at zero
  stats = {"mean": jnp.arange(6.0), "std": jnp.full((6,), 2.0)}
  key = jax.random.PRNGKey(4)
  got = prior_pipe.sample_embeddings(model, params, {"stats": stats}, key, num=3, num_steps=7)
  x = diffusion.sample(lambda x_t, t: net.apply(params, x_t, t), model.make_schedule(), key,
                       (3, 6), sampler="ddim", num_steps=7)
  e = x * 2.0 + jnp.arange(6.0)
  np.testing.assert_allclose(got, e / np.linalg.norm(e, axis=-1, keepdims=True) * math.sqrt(6),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="unconditional"):
    prior_pipe.sample_embeddings(model, params, {"stats": stats}, key, num=3,
                                 guidance_scale=2.0)


def test_unclip_text_prior_through_the_shared_space(tmp_path, capsys):
  """unCLIP on the captioned shapes: a clip run, a decoder conditioned on its image embeddings,
  a prior conditioned on its text embeddings of the captions; generate and eval run on it."""
  app.train(config("clip", "data.image_size=16"), tmp_path / "clip", progress=False)
  app.train(config("vary", "data.image_size=16", arg=f"smoke,shapes,encoder={tmp_path / 'clip'}"),
            tmp_path / "decoder", progress=False)
  # the CLIP eval reads scenes with combinations left out of training apart from the others
  from jaxgen import commands
  clip_run = app.restore_run(tmp_path / "clip", with_state=False)
  clip_run.task.config.data.holdout_combinations = ("red circle", "blue square")
  m = commands.evaluate_dual_encoder(clip_run.task, clip_run.params, clip_run.model_state,
                                     limit=300)
  assert m["held_out"]["num"] + m["seen"]["num"] == 300 and m["held_out"]["num"] > 10
  assert set(m["held_out"]) == set(m) - {"held_out", "seen", "temperature"} | {"num"}
  c = config("unclip", arg=f"smoke,decoder={tmp_path / 'decoder'}")
  assert (c.prior.text, c.data.name, c.data.image_size) == (str(tmp_path / "clip"), "shapes", 16)
  app.train(c, tmp_path / "unclip", progress=False)
  run = app.restore_run(tmp_path / "unclip", with_state=False)
  assert run.task.text_dim == 8
  # the cached text condition is the clip run's own text embedding of each caption
  from jaxgen.pipelines import clip as clip_pipe
  model, params, _ = clip_pipe.load_dual_encoder(str(tmp_path / "clip"))
  captions = run.task.prompts(c.data.train_split, 5)
  np.testing.assert_allclose(run.task.train_text_embeddings()[:5],
                             clip_pipe.embed_texts(model, params, captions) * math.sqrt(8),
                             rtol=1e-4, atol=1e-4)
  main(["generate", "--workdir", str(tmp_path / "unclip"), "--prompt", "a red circle",
        "--num", "2", "--steps", "2", "--decoder-steps", "2", "--out", str(tmp_path / "t.png")])
  assert capsys.readouterr().out.split() == [str(tmp_path / "t.png")]
  main(["eval", "--workdir", str(tmp_path / "unclip"), "--num", "6", "--steps", "2",
        "--decoder-steps", "2"])
  metrics = json.loads(capsys.readouterr().out)
  assert set(metrics) >= {"generated", "real", "unconditional", "decoded_image_embeddings"}
  assert metrics["real"]["pixels"]["colour"] > 0.5   # the judge reads the real pictures
  rcg = app.build_task(config("rcg", arg=f"smoke,decoder={tmp_path / 'decoder'}"))
  with pytest.raises(ConfigError, match="unconditional"):   # RCG's prior takes no prompt
    rcg.generate(None, None, jax.random.PRNGKey(0), 1, prompts=["a red circle"])
