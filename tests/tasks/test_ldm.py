"""Latent text-to-image diffusion through the real loop, the jitted pipeline and the CLI, on
smoke-sized autoencoder, dual encoder and U-Net."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import check_zeros_for_pretrained, config, params_of
from jaxgen import app, diffusion
from jaxgen.app import restore_run, train
from jaxgen.cli import main
from jaxgen.errors import ConfigError, ShapeError, TokenError
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.pipelines import text_to_image as t2i

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  """A smoke autoencoder and a smoke dual encoder on the captioned shapes."""
  root = tmp_path_factory.mktemp("stages")
  train(config("ldm_autoencoder"), root / "ae", progress=False)
  train(config("clip"), root / "clip", progress=False)
  return root


@pytest.fixture(scope="module")
def ldm_run(stages):
  # The run must not need the autoencoder after its start: train from a copy, then delete it.
  shutil.copytree(stages / "ae", stages / "ae_copy")
  wd = stages / "ldm"
  train(config("ldm", arg=f"smoke,ae={stages / 'ae_copy'},clip={stages / 'clip'}"), wd,
        progress=False)
  shutil.rmtree(stages / "ae_copy")
  return wd


def test_trained_run_is_self_contained_and_keeps_the_text_tower_frozen(ldm_run, stages):
  run = restore_run(ldm_run)
  assert (ldm_run / "samples" / "text_to_image_step0000004.png").exists()
  clip = restore_run(stages / "clip")
  text = params_of(run.params["text"]["params"])
  source = params_of(clip.params["params"]["text_encoder"])
  for name, leaf in jax.tree_util.tree_flatten_with_path(text)[0]:
    ref = source
    for k in name:
      ref = ref[k.key]
    np.testing.assert_array_equal(leaf, ref)
  ae = restore_run(stages / "ae")
  assert float(run.model_state["latent"]["scale"]) == pytest.approx(
      float(jax.lax.rsqrt(ae.model_state["latent_stats"]["var"])), rel=1e-6)


def test_text_to_image_without_recompiling(ldm_run):
  run = restore_run(ldm_run)
  model, params, state = run.task.model, run.params, run.model_state
  kw = dict(steps=3, guidance_scale=4.0)
  a = t2i.text_to_image(model, params, state, ["a large red circle"], jax.random.PRNGKey(0), **kw)
  size = t2i.text_to_image.jitted._cache_size()
  b = t2i.text_to_image(model, params, state, ["a small blue square"], jax.random.PRNGKey(1),
                        steps=3, guidance_scale=7.5, negative_prompt="a large red circle")
  assert t2i.text_to_image.jitted._cache_size() == size
  assert a.shape == b.shape == (1, 32, 32, 3)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and not np.allclose(a, b)
  with pytest.raises(TokenError, match="context length is 16"):
    t2i.text_to_image(model, params, state, ["a small red circle above " * 5],
                      jax.random.PRNGKey(0), **kw)
  with pytest.raises(ConfigError, match="2 negative prompts for 1 prompts"):
    t2i.text_to_image(model, params, state, ["a circle"], jax.random.PRNGKey(0),
                      negative_prompt=["", ""], **kw)


def test_vmap_over_seeds_equals_separate_calls(ldm_run):
  run = restore_run(ldm_run)
  model, params, state = run.task.model, run.params, run.model_state
  tok, neg = t2i._tokens(model, ["a small green diamond"], None, 1)
  f = lambda key: t2i._generate(model, params, state, tok, neg, key, 3.0, 0.0,
                                sampler=model.default_sampler, num_steps=2, spacing="trailing",
                                decode_batch=None, tile=None)
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  both = jax.vmap(f)(keys)
  for i in range(3):
    np.testing.assert_allclose(both[i], f(keys[i]), atol=1e-5)


def test_starting_latents_in_and_final_latents_out(ldm_run):
  """Given starting latents, text_to_image ignores the key and equals a plain guided run of the
  shared sampler from them (the reference: Euler on the flow grid, as configs/ldm.py trains
  with flow matching), decoded; the final latents come back on request."""
  run = restore_run(ldm_run)
  model, params, state = run.task.model, run.params, run.model_state
  z_T = jax.random.normal(jax.random.PRNGKey(3), (2, *model.latent_shape))
  prompts = ["a large red circle", "a small blue square"]
  a, z = t2i.text_to_image(model, params, state, prompts, jax.random.PRNGKey(0), steps=3,
                           guidance_scale=4.0, latents=z_T, return_latents=True)
  b = t2i.text_to_image(model, params, state, prompts, jax.random.PRNGKey(9), steps=3,
                        guidance_scale=4.0, latents=z_T)
  np.testing.assert_array_equal(a, b)
  tok, neg = t2i._tokens(model, prompts, None, 1)
  den = diffusion.guided_denoiser(
      model.denoise_fn(params), model.encode_text(params, tok["input_ids"],
                                                  tok["attention_mask"]),
      model.encode_text(params, neg["input_ids"], neg["attention_mask"]), 4.0)
  assert model.is_flow
  ref = diffusion.sample(den, None, jax.random.PRNGKey(0), None, x_T=z_T, sampler="euler",
                         prediction="flow", grid=diffusion.flow_grid(3, model.flow_shift,
                                                                     model.num_timesteps))
  np.testing.assert_allclose(z, ref, atol=1e-4)
  np.testing.assert_allclose(a, model.decode_latents(state, ref), atol=1e-4)
  with pytest.raises(ShapeError, match=r"latents: expected shape \[2, 8, 8, 4\]"):
    t2i.text_to_image(model, params, state, prompts, jax.random.PRNGKey(0), steps=3,
                      latents=z_T[:1])
  # Another size than the trained one: the same function, latents of that size.
  wide, z_wide = t2i.text_to_image(model, params, state, prompts[:1], jax.random.PRNGKey(0),
                                   steps=2, height=48, width=32, return_latents=True)
  assert wide.shape == (1, 48, 32, 3) and z_wide.shape == (1, 12, 8, 4)
  with pytest.raises(ShapeError, match="height and width must be positive multiples of 8"):
    t2i.text_to_image(model, params, state, prompts[:1], jax.random.PRNGKey(0), steps=2,
                      height=36)


def test_img2img_and_inpainting_in_latent_space(ldm_run):
  run = restore_run(ldm_run)
  model, params, state = run.task.model, run.params, run.model_state
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  out = t2i.image_to_image(model, params, state, ["a red circle", "a blue square"], images,
                           jax.random.PRNGKey(0), strength=0.5, steps=4)
  assert out.shape == (2, 32, 32, 3)
  mask = np.zeros((2, 32, 32, 1), np.float32)
  mask[:, :16] = 1.0
  filled = t2i.inpaint(model, params, state, ["a red circle", "a blue square"], images, mask,
                       jax.random.PRNGKey(1), steps=3)
  np.testing.assert_allclose(np.asarray(filled)[:, :16], images[:, :16] / 255.0, atol=1e-6)


def test_batched_and_tiled_decoding():
  vae = Autoencoder(in_channels=3, out_channels=3, image_size=32, ch=8, ch_mult=(1, 2),
                    z_channels=4, groups=4, mid_attention=False)
  variables = vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  model = t2i.LatentDiffusionModel(None, None, vae, (32, 32, 3))
  state = {"vae": variables, "latent": {"scale": jnp.float32(0.5)}}
  z = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 4))
  full = model.decode_latents(state, z)
  np.testing.assert_allclose(model.decode_latents(state, z, batch_size=2), full, atol=1e-6)
  np.testing.assert_array_equal(model.decode_latents(state, z, tile=16), full)
  # Each tile is decoded without its neighbours' context, so its borders differ; blending over
  # a larger overlap brings the result closer to whole-image decoding (the reference).
  err = lambda tile, overlap: float(jnp.mean(jnp.abs(
      model.decode_latents(state, z, tile=tile, overlap=overlap) - full)))
  hard, blended = err(10, 0), err(12, 6)
  assert blended < 0.75 * hard and blended < 0.03


def test_generate_and_eval_from_the_command_line(ldm_run, stages, capsys, tmp_path):
  main(["generate", "--workdir", str(ldm_run), "--prompt", "a large yellow circle",
        "--prompt", "a small cyan square", "--num", "2", "--steps", "2",
        "--out", str(tmp_path / "t2i.png")])
  assert capsys.readouterr().out.split() == [str(tmp_path / "t2i.png")]
  main(["generate", "--workdir", str(ldm_run), "--prompt", "a large yellow circle", "--num", "1",
        "--steps", "2", "--height", "48", "--out", str(tmp_path / "tall.png")])
  capsys.readouterr()
  with Image.open(tmp_path / "tall.png") as im:
    # a 48 x 32 image, enlarged 4x so that its column is 128+ px wide, its prompt written below
    assert im.size[0] == 4 * (32 + 4) and im.size[1] > 4 * (48 + 4) + 10
    strip = np.asarray(im.convert("L"))[4 * (48 + 4):]
    assert (strip < 100).any()
  main(["eval", "--workdir", str(ldm_run), "--num", "10", "--steps", "2"])
  m = json.loads(capsys.readouterr().out)
  for part in ("generated", "real", "unconditional"):
    assert {"clip_score", "shape_accuracy", "colour_accuracy", "pixels"} <= set(m[part])
    assert {"relation", "binding", "both_present"} <= set(m[part]["pixels"])
  assert m["real"]["pixels"]["binding"] == 1.0  # the pixel judge reads real scenes exactly
  with pytest.raises(SystemExit):
    main(["generate", "--workdir", str(stages / "clip"), "--prompt", "x"])
  assert "needs a latent diffusion (ldm) workdir" in capsys.readouterr().err


def test_the_init_program_leaves_the_loaded_towers_at_zero(stages):
  """The loop's init does not draw the autoencoder, nor the text tower of model.text.init,
  which `pretrained` loads (XLA drops their initialisers)."""
  check_zeros_for_pretrained(app.build_task(
      config("ldm", arg=f"smoke,ae={stages / 'ae'},clip={stages / 'clip'}")))


def test_an_autoencoder_of_another_architecture_is_refused(stages, tmp_path):
  c = config("ldm", arg=f"smoke,ae={stages / 'ae'},clip={stages / 'clip'}")
  c.model.vae.z_channels = 3
  with pytest.raises(ConfigError, match="z_channels"):
    train(c, tmp_path / "bad", progress=False)


@pytest.mark.parametrize("mode", ["latent", "mmdit"])
def test_latent_dit_text_to_image(stages, tmp_path, capsys, mode):
  """configs/dit.py:latent (cross-attention to the text) and :mmdit (joint attention) train as
  ldm runs with a DiT and generate from the command line."""
  wd = tmp_path / mode
  train(config("dit", arg=f"{mode},smoke,ae={stages / 'ae'},clip={stages / 'clip'}"), wd,
        progress=False)
  run = restore_run(wd)
  assert run.config.model.backbone == "dit" and run.task.model.is_flow
  assert run.task.unet.text_mode == ("joint" if mode == "mmdit" else "cross")
  main(["generate", "--workdir", str(wd), "--prompt", "a large red circle", "--steps", "2",
        "--sampler", "heun", "--out", str(tmp_path / "x.png")])
  assert capsys.readouterr().out.split() == [str(tmp_path / "x.png")]
  edited = t2i.image_to_image(run.task.model, run.params, run.model_state, ["a circle"],
                              np.zeros((1, 32, 32, 3), np.uint8), jax.random.PRNGKey(0),
                              strength=0.5, steps=2)  # flow SDEdit, Euler by default
  assert edited.shape == (1, 32, 32, 3) and np.isfinite(np.asarray(edited)).all()
  with pytest.raises(ShapeError, match="multiples of 8"):
    t2i.text_to_image(run.task.model, run.params, run.model_state, ["a circle"],
                      jax.random.PRNGKey(0), steps=2, height=36, width=36)
