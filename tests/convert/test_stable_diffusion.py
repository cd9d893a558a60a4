"""Stable Diffusion in diffusers' folder layout -> a jaxgen ldm run (`jaxgen import`): one full
sampling step against diffusers' own pipeline pieces, then `jaxgen generate` on the run.

torch, diffusers and transformers serve only as the reference: tiny random pipelines saved with
save_pretrained, imported through the command line, compared number for number.
"""
import dataclasses
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import files_under
from jaxgen import app, diffusion
from jaxgen.app import restore_run
from jaxgen.cli import main
from jaxgen.convert import stable_diffusion as sd_import
from jaxgen.convert.clip_text import load_tokenizer, text_transformer_from_config
from jaxgen.convert.diffusers import module_from_config
from jaxgen.convert.stable_diffusion import read_model_index, scheduler_settings
from jaxgen.errors import ConfigError
from jaxgen.pipelines import text_to_image as t2i
from jaxgen.text.bpe import bytes_to_unicode, clip_vocab

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

log = logging.getLogger(__name__)

WIDTH = 32  # the text encoder's width, which the U-Net cross-attends to
MERGES = [("a", "t</w>"), ("c", "at</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"),
          ("phot", "o</w>"), ("o", "f</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"),
          ("re", "d</w>")]
PROMPT, NEGATIVE, GUIDANCE, STEPS = "a red photo of a cat", "a dog", 6.0, 4


def write_tokenizer_files(folder):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(clip_vocab(MERGES)))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))


def randomized(model, seed, scale=0.1):
  """Perturb every parameter so that norm scales are not 1 and biases are not 0."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def tiny_pipeline(root, sd2: bool):
  """An SD1-like (conv projections, 2 heads everywhere, quick_gelu, eps, leading + offset 1,
  tokenizer with vocab.json/merges.txt, padded with the end token) or SD2-like (linear
  projections, heads (2, 4) per level, gelu, v-prediction, trailing, padded with '!', tokenizer
  as transformers 5 saves it: tokenizer.json only) pipeline, saved under root/sd."""
  write_tokenizer_files(root / "tok_src")
  tok = transformers.CLIPTokenizer(str(root / "tok_src" / "vocab.json"),
                                   str(root / "tok_src" / "merges.txt"),
                                   pad_token="!" if sd2 else "<|endoftext|>", model_max_length=77)
  vocab = clip_vocab(MERGES)
  torch.manual_seed(0)
  text = randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77,
      hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=vocab["<|startoftext|>"],
      # SD 1.x's text_encoder/config.json carries the legacy eos_token_id=2
      eos_token_id=vocab["<|endoftext|>"] if sd2 else 2, pad_token_id=1)), 1, 0.3)
  unet = randomized(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, norm_num_groups=8, cross_attention_dim=WIDTH,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D" if sd2 else "DownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D" if sd2 else "UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2), 2)
  vae = randomized(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
      latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.37), 3)
  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      clip_sample=False, set_alpha_to_one=sd2, steps_offset=1,
      prediction_type="v_prediction" if sd2 else "epsilon",
      timestep_spacing="trailing" if sd2 else "leading")
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root / "sd")
  if not sd2:  # as on the Hub: vocab.json + merges.txt (transformers 5 writes tokenizer.json)
    (root / "sd" / "tokenizer" / "tokenizer.json").unlink()
    write_tokenizer_files(root / "sd" / "tokenizer")
  assert (root / "sd" / "tokenizer" / "vocab.json").exists() != sd2
  return pipe


def err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_import_then_one_sampling_step_matches_diffusers(tmp_path, sd2, capsys, monkeypatch):
  pipe = tiny_pipeline(tmp_path, sd2)
  wd = tmp_path / "run"
  main(["import", "--diffusers", str(tmp_path / "sd"), "--workdir", str(wd)])
  assert capsys.readouterr().out.strip() == str(wd)

  run = restore_run(wd)
  c, model = run.config, run.task.model
  assert c.task == "ldm" and run.params.keys() == {"unet", "text"}
  assert c.model.unet.num_heads_per_level == ((2, 4) if sd2 else ())
  assert c.model.unet.use_linear_projection == sd2 and c.model.text.attention_mask is False
  assert c.model.text.activation == ("gelu" if sd2 else "quick_gelu")
  # The tokenizer lives inside the run, named relative to it: the run can be moved.
  assert c.model.text.tokenizer_path == "tokenizer" and (wd / "tokenizer" / "vocab.json").exists()
  assert c.data.image_size == 16 and c.ldm.latent_scale == pytest.approx(0.37)
  assert c.diffusion.prediction == ("v" if sd2 else "eps") and c.diffusion.clip_x0 == 0.0
  assert (c.ldm.timestep_spacing, c.ldm.steps_offset) == ("trailing" if sd2 else "leading", 1)
  assert float(run.model_state["latent"]["scale"]) == pytest.approx(0.37)

  # The same tokens, and the same timestep grid.
  hf_ids = pipe.tokenizer([PROMPT, NEGATIVE, ""], padding="max_length", max_length=77).input_ids
  ids = model.tokenize([PROMPT, NEGATIVE, ""])
  np.testing.assert_array_equal(ids["input_ids"], np.array(hf_ids))
  html = ["fish &amp; chips", "a &lt;cat&gt;"]  # kept as typed, as diffusers' tokenizer does
  np.testing.assert_array_equal(
      model.tokenize(html)["input_ids"],
      np.array(pipe.tokenizer(html, padding="max_length", max_length=77).input_ids))
  moved = tmp_path / "moved"
  wd.rename(moved)
  np.testing.assert_array_equal(
      restore_run(moved).task.model.tokenize([PROMPT, NEGATIVE, ""])["input_ids"],
      np.array(hf_ids))
  moved.rename(wd)
  pipe.scheduler.set_timesteps(STEPS)
  ts = pipe.scheduler.timesteps.numpy()
  np.testing.assert_array_equal(np.asarray(model.grid("ddim", STEPS).t), ts)

  # diffusers: the pipeline's prompt encoding, the U-Net on [uncond, cond], guidance, DDIM step,
  # and the VAE decode of the next latents.
  z = np.random.RandomState(4).randn(2, 4, 8, 8).astype(np.float32)
  t = int(ts[1])  # a step in the middle of the grid
  with torch.no_grad():
    cond_ref, uncond_ref = pipe.encode_prompt([PROMPT] * 2, "cpu", 1, True, [NEGATIVE] * 2)
    latents = torch.from_numpy(z)
    inp = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), ts[1])
    out = pipe.unet(inp, ts[1], encoder_hidden_states=torch.cat([uncond_ref, cond_ref])).sample
    out_u, out_c = out.chunk(2)
    pred_ref = out_u + GUIDANCE * (out_c - out_u)
    next_ref = pipe.scheduler.step(pred_ref, ts[1], latents).prev_sample
    image = pipe.vae.decode(next_ref / pipe.vae.config.scaling_factor).sample
    image_ref = pipe.image_processor.postprocess(image, output_type="np")

  # jaxgen: the model's pieces and jaxgen.diffusion's DDIM update.
  @jax.jit
  def jaxgen_step(params, model_state, z, ids, mask, neg_ids, neg_mask):
    cond = model.encode_text(params, ids, mask)
    uncond = model.encode_text(params, neg_ids, neg_mask)
    den = diffusion.guided_denoiser(model.denoise_fn(params), cond, uncond, GUIDANCE)
    pred = den(z, jnp.full((z.shape[0],), t))
    step = diffusion.make_step(lambda x, tt: pred, sampler="ddim",
                               prediction=model.prediction, clip_x0=model.clip_x0)
    row = jax.tree.map(lambda a: a[1], model.grid("ddim", STEPS).rows())
    _, z_next = step(diffusion.SamplerState.create(z), (row, jax.random.PRNGKey(0)))
    return cond, uncond, pred, z_next, model.decode_latents(model_state, z_next)

  rep = lambda a: np.repeat(a[None], 2, axis=0)
  cond, uncond, pred, z_next, image = jaxgen_step(
      run.params, run.model_state, nhwc(z), rep(ids["input_ids"][0]),
      rep(ids["attention_mask"][0]), rep(ids["input_ids"][1]), rep(ids["attention_mask"][1]))
  errors = dict(text=max(err(cond, cond_ref), err(uncond, uncond_ref)),
                prediction=err(pred, nhwc(pred_ref)), next_latents=err(z_next, nhwc(next_ref)),
                decoded=err(image, image_ref))
  scales = dict(text=float(cond_ref.abs().max()), prediction=float(pred_ref.abs().max()),
                next_latents=float(next_ref.abs().max()), decoded=1.0)
  log.info("sd2=%s: max |jaxgen - diffusers| %s (scales %s)", sd2, errors, scales)
  assert scales["prediction"] > 0.5 and float(np.std(image_ref)) > 0.01  # far from trivial
  for k, e in errors.items():
    assert e <= 5e-5 * max(1.0, scales[k]), (k, errors, scales)

  if sd2:  # set_alpha_to_one=True: the whole 4-step sampler agrees, last step included
    with torch.no_grad():
      final_ref = pipe([PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, latents=torch.from_numpy(z[:1]),
                       output_type="latent").images
    den = diffusion.guided_denoiser(model.denoise_fn(run.params), cond[:1], uncond[:1], GUIDANCE)
    final = jax.jit(lambda x: diffusion.sample(
        den, model.make_schedule(), jax.random.PRNGKey(0), None, x_T=x,
        timesteps=model.grid("ddim", STEPS).t, prediction=model.prediction))(nhwc(z[:1]))
    e = err(final, nhwc(final_ref))
    log.info("sd2: 4-step sample, max |jaxgen - diffusers| %.2e", e)
    assert e <= 1e-4 * max(1.0, float(final_ref.abs().max()))
  # The whole guided text_to_image from the same starting latents against diffusers' pipeline:
  # SD1-like has set_alpha_to_one=False, so its last DDIM step ends at abar[0], not the data.
  with torch.no_grad():
    kw = dict(negative_prompt=[NEGATIVE], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              latents=torch.from_numpy(z[:1]))
    latents_ref = pipe([PROMPT], output_type="latent", **kw).images
    image_ref = pipe([PROMPT], output_type="np", **kw).images
  image, latents = t2i.text_to_image(model, run.params, run.model_state, [PROMPT],
                                     jax.random.PRNGKey(0), steps=STEPS, guidance_scale=GUIDANCE,
                                     negative_prompt=NEGATIVE, latents=nhwc(z[:1]),
                                     return_latents=True)
  e_lat, e_img = err(latents, nhwc(latents_ref)), err(image, image_ref)
  log.info("sd2=%s: whole text_to_image, max |jaxgen - diffusers| latents %.2e, image %.2e", sd2,
           e_lat, e_img)
  assert e_lat <= 1e-4 * max(1.0, float(latents_ref.abs().max())) and e_img <= 1e-4
  # The schedulers SD users switch to, each from the pipeline's scheduler config, against
  # jaxgen's sampler of the same name on the imported settings; Euler ancestral with the noise
  # jaxgen draws (handed to diffusers' scheduler in place of its own draws).
  key, errs, original = jax.random.PRNGKey(7), {}, pipe.scheduler
  for cls, sampler, extra in (("PNDMScheduler", "plms", dict(skip_prk_steps=True)),  # SD 1.x's
                              ("EulerDiscreteScheduler", "euler", dict(use_karras_sigmas=True)),
                              ("EulerAncestralDiscreteScheduler", "euler_a", {}),
                              ("DPMSolverMultistepScheduler", "dpmpp_2m",
                               dict(use_karras_sigmas=True))):
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    variant = dataclasses.replace(model, karras=extra.get("use_karras_sigmas", False))
    grid = variant.grid(sampler, STEPS)
    keys = jax.random.split(jax.random.split(key)[1], grid.num_rows)
    noises = iter([torch.from_numpy(np.asarray(jax.random.normal(
        jax.random.split(k)[0], (1, 8, 8, 4))).transpose(0, 3, 1, 2).copy()) for k in keys])
    monkeypatch.setattr(diffusers.schedulers.scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda *a, **k: next(noises))
    with torch.no_grad():
      ref = pipe([PROMPT], output_type="latent", **kw).images
    ours = t2i.text_to_image(variant, run.params, run.model_state, [PROMPT], key, steps=STEPS,
                             guidance_scale=GUIDANCE, negative_prompt=NEGATIVE,
                             latents=nhwc(z[:1]), return_latents=True, sampler=sampler)[1]
    e = err(ours, nhwc(ref))
    log.info("sd2=%s: whole text_to_image with %s, max |jaxgen - diffusers| latents %.2e", sd2,
             sampler, e)
    errs[sampler] = (e, float(ref.abs().max()))
  assert all(e <= 1e-4 * max(1.0, m) for e, m in errs.values()), errs
  pipe.scheduler = original
  if sd2:  # another size than the trained 16 x 16, from the same latents
    z_wide = np.random.RandomState(5).randn(1, 4, 12, 16).astype(np.float32)
    with torch.no_grad():
      wide_ref = pipe([PROMPT], output_type="np", height=24, width=32,
                      **dict(kw, latents=torch.from_numpy(z_wide))).images
    wide = t2i.text_to_image(model, run.params, run.model_state, [PROMPT], jax.random.PRNGKey(0),
                             steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE,
                             latents=nhwc(z_wide), height=24, width=32)
    assert wide.shape == (1, 24, 32, 3) and err(wide, wide_ref) <= 1e-4
  if not sd2:  # the end-to-end path: jaxgen generate on the imported run
    out = tmp_path / "gen.png"
    main(["generate", "--workdir", str(wd), "--prompt", PROMPT, "--negative", NEGATIVE,
          "--steps", "2", "--num", "2", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out) and out.stat().st_size > 0
    main(["generate", "--workdir", str(wd), "--prompt", PROMPT, "--steps", "2", "--num", "1",
          "--sampler", "euler", "--karras", "--spacing", "trailing", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit) as e:  # no data set to draw held-out captions from
      main(["generate", "--workdir", str(wd), "--steps", "2"])
    assert e.value.code == 2 and "give --prompt" in capsys.readouterr().err


def test_bad_input_is_refused_and_nothing_is_lost(tmp_path, capsys):
  sd = tmp_path / "sd"
  sd.mkdir()
  for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    (sd / name).mkdir()
  index = {"_class_name": "StableDiffusionPipeline",
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None]}
  (sd / "model_index.json").write_text(json.dumps(index))
  read_model_index(sd)
  # a component no Stable Diffusion pipeline jaxgen reads has (SDXL's are in test_sdxl)
  (sd / "model_index.json").write_text(json.dumps(
      dict(index, image_encoder_2=["transformers", "CLIPVisionModel"])))
  with pytest.raises(ConfigError, match="component 'image_encoder_2'"):
    read_model_index(sd)
  (sd / "model_index.json").write_text(json.dumps(dict(index, unet=["diffusers", "UNet2DModel"])))
  with pytest.raises(ConfigError, match="unet='UNet2DModel' is not supported"):
    read_model_index(sd)

  # Scheduler settings: diffusers' per-class defaults, and named refusals.
  sd15 = scheduler_settings({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                             "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                             "set_alpha_to_one": False, "skip_prk_steps": True})
  assert sd15["ldm"] == dict(timestep_spacing="leading", steps_offset=1)
  assert sd15["diffusion"]["schedule"] == "scaled_linear" and sd15["diffusion"]["clip_x0"] == 0
  assert sd15["diffusion"]["sampler"] == "plms" and not sd15["diffusion"]["set_alpha_to_one"]
  euler = scheduler_settings({"_class_name": "EulerDiscreteScheduler",
                              "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True,
                              "final_sigmas_type": "sigma_min"})
  assert euler["ldm"]["timestep_spacing"] == "linspace"
  assert euler["diffusion"]["schedule"] == "cosine" and euler["diffusion"]["beta_start"] == 0
  assert euler["diffusion"]["sampler"] == "euler" and euler["diffusion"]["karras"]
  assert euler["diffusion"]["final_sigmas"] == "sigma_min"
  assert scheduler_settings({"_class_name": "DDIMScheduler"})["diffusion"]["clip_x0"] == 1.0
  imagen = scheduler_settings({"_class_name": "DDPMScheduler", "thresholding": True,
                               "dynamic_thresholding_ratio": 0.99, "sample_max_value": 2.0})
  assert (imagen["diffusion"]["threshold"], imagen["diffusion"]["sample_max_value"],
          imagen["diffusion"]["clip_x0"]) == (0.99, 2.0, 0.0)
  dpm = scheduler_settings({"_class_name": "DPMSolverMultistepScheduler"})
  assert dpm["diffusion"]["sampler"] == "dpmpp_2m" and not dpm["diffusion"]["karras"]
  ancestral = scheduler_settings({"_class_name": "EulerAncestralDiscreteScheduler"})
  assert ancestral["diffusion"]["sampler"] == "euler_a"
  assert scheduler_settings({"_class_name": "LMSDiscreteScheduler"})["diffusion"]["sampler"] == (
      "ddim")  # no counterpart: the default sampler is DDIM (with a warning)
  for bad, key in (({"trained_betas": [0.1, 0.2]}, "trained_betas"),
                   ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
                   ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
                   ({"prediction_type": "flow"}, "prediction_type='flow'"),
                   ({"timestep_spacing": "karras"}, "timestep_spacing='karras'")):
    with pytest.raises(ConfigError, match=f"scheduler: {key}"):
      scheduler_settings(dict({"_class_name": "DDIMScheduler"}, **bad))

  # Through the command line: a clear error, exit code 2 for configs, and nothing on disk lost.
  (sd / "model_index.json").write_text(json.dumps(index))
  (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}))
  for name in ("unet", "vae", "text_encoder"):
    (sd / name / "config.json").write_text("{}")
  wd = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    main(["import", "--diffusers", str(sd), "--workdir", str(wd)])
  assert e.value.code == 2 and "scheduler: beta_schedule='sigmoid'" in capsys.readouterr().err
  assert not wd.exists()
  wd.mkdir()
  (wd / "notes.txt").write_text("keep me")
  before = files_under(wd)
  with pytest.raises(SystemExit) as e:
    main(["import", "--diffusers", str(sd), "--workdir", str(wd)])
  assert e.value.code == 1 and "is not empty; nothing was overwritten" in capsys.readouterr().err
  assert files_under(wd) == before
  shutil.rmtree(sd / "scheduler")
  with pytest.raises(SystemExit):
    main(["import", "--diffusers", str(sd), "--workdir", str(tmp_path / "run2")])
  assert "no scheduler/ folder" in capsys.readouterr().err


# The published configs of stable-diffusion-v1-5 and stable-diffusion-2-1 (keys that matter).
_SD_UNET = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
_SD_VAE = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32)
_SD_TEXT = dict(architectures=["CLIPTextModel"], bos_token_id=0, eos_token_id=2, pad_token_id=1,
                layer_norm_eps=1e-05, max_position_embeddings=77, vocab_size=49408)
PUBLISHED = {
    "sd15": dict(
        unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        vae=dict(_SD_VAE, sample_size=512),
        text=dict(_SD_TEXT, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                  num_attention_heads=12, num_hidden_layers=12, projection_dim=768),
        scheduler=dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                       beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False,
                       skip_prk_steps=True, steps_offset=1, trained_betas=None,
                       clip_sample=False)),
    "sd21": dict(
        unet=dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                  sample_size=96, use_linear_projection=True, upcast_attention=True,
                  dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                  resnet_time_scale_shift="default", class_embed_type=None),
        vae=dict(_SD_VAE, sample_size=768),
        text=dict(_SD_TEXT, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                  num_attention_heads=16, num_hidden_layers=23, projection_dim=512),
        scheduler=dict(_class_name="DDIMScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                       beta_start=0.00085, clip_sample=False, num_train_timesteps=1000,
                       prediction_type="v_prediction", set_alpha_to_one=False,
                       skip_prk_steps=True, steps_offset=1, trained_betas=None)),
}


@pytest.fixture(scope="module")
def clip_sized_tokenizer(tmp_path_factory):
  """A tokenizer folder with CLIP's 49,408 ids (made-up merges): what the full-size models need."""
  chars = list(bytes_to_unicode().values())
  merges = [(a, b) for a in chars for b in chars][:49408 - 2 * 256 - 2]
  folder = tmp_path_factory.mktemp("clip_tokenizer")
  (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges)))
  (folder / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges))
  (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
  return folder


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_become_ldm_configs_that_build_the_same_modules(name,
                                                                          clip_sized_tokenizer):
  """SD 1.5 and 2.1: the config mapping and the module check at full size, without weights."""
  c = PUBLISHED[name]
  unet = module_from_config(c["unet"], dtype=jnp.bfloat16)
  vae = module_from_config(c["vae"])
  text = text_transformer_from_config(c["text"], with_projection=False)
  tok = load_tokenizer(clip_sized_tokenizer)
  config = app.compose_config("ldm", sd_import.ldm_sections(
      unet, c["unet"], vae, c["vae"], text, c["text"], tok, str(clip_sized_tokenizer),
      scheduler_settings(c["scheduler"]), dtype="bfloat16"))
  sd2 = name == "sd21"
  u, t, d = config.model.unet, config.model.text, config.diffusion
  assert u.block_channels == (320, 640, 1280, 1280) and u.attn_levels == (True,) * 3 + (False,)
  assert (u.num_heads, u.num_heads_per_level) == ((20, (5, 10, 20, 20)) if sd2 else (8, ()))
  assert u.use_linear_projection == sd2 and u.dtype == "bfloat16" and u.groups == 32
  assert config.model.vae.ch_mult == (1, 2, 4, 4) and config.model.vae.ch == 128
  assert (t.width, t.layers, t.heads, t.mlp_ratio) == ((1024, 23, 16, 4.0) if sd2 else
                                                       (768, 12, 12, 4.0))
  assert config.data.image_size == (768 if sd2 else 512)
  assert config.ldm.latent_scale == pytest.approx(0.18215)  # old VAE configs leave it out
  assert (d.schedule, d.beta_start, d.beta_end) == ("scaled_linear", 0.00085, 0.012)
  assert d.prediction == ("v" if sd2 else "eps") and d.clip_x0 == 0.0
  assert (config.ldm.timestep_spacing, config.ldm.steps_offset) == ("leading", 1)
  task = app.build_task(config)
  sd_import.check_task_modules(task, unet, text, vae)
  np.testing.assert_array_equal(np.asarray(task.model.grid("ddim", 50).t)[[0, 1, -1]],
                                [981, 961, 1])
  # A module the config cannot reproduce is named.
  with pytest.raises(ConfigError, match=r"U-Net: use_linear_projection: config builds"):
    sd_import.check_task_modules(task, unet.clone(use_linear_projection=not sd2), text, vae)
  with pytest.raises(ConfigError, match="unet: cross_attention_dim=768 differs from the text "
                     "encoder's hidden_size=1024"):
    sd_import.unet_section(module_from_config(PUBLISHED["sd15"]["unet"]), c["unet"], 4, 1024,
                           "float32")
  with pytest.raises(ConfigError, match="unet: in_channels=9 differs"):
    sd_import.unet_section(unet, dict(c["unet"], in_channels=9), 4, unet.context_dim, "float32")
