"""SDXL as diffusers runs it, on a small random SDXL-layout pipeline saved by diffusers: two text
towers (CLIP-L-like, and OpenCLIP-bigG-like with a projection), penultimate states of both per
token, the pooled projection and the micro-conditioning ids as the U-Net's added conditioning,
zeros as the unconditional embeddings without a negative prompt. Imported with `jaxgen import`
and compared, whole guided sampling runs from the same latents, with StableDiffusionXLPipeline."""
import json
import logging

import jax
import numpy as np
import pytest

from jaxgen.app import restore_run
from jaxgen.cli import main
from jaxgen.convert.stable_diffusion import read_model_index
from jaxgen.errors import ConfigError
from jaxgen.pipelines import text_to_image as t2i
from jaxgen.text.bpe import clip_vocab
from tests.convert.test_stable_diffusion import (
  GUIDANCE,
  MERGES,
  NEGATIVE,
  PROMPT,
  STEPS,
  err,
  nhwc,
  randomized,
  write_tokenizer_files,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
log = logging.getLogger(__name__)


def tiny_sdxl(root):
  write_tokenizer_files(root / "tok_src")
  vocab = clip_vocab(MERGES)
  files = (str(root / "tok_src" / "vocab.json"), str(root / "tok_src" / "merges.txt"))
  tok = transformers.CLIPTokenizer(*files, pad_token="<|endoftext|>", model_max_length=77)
  tok_2 = transformers.CLIPTokenizer(*files, pad_token="!", model_max_length=77)
  common = dict(vocab_size=len(vocab), max_position_embeddings=77, num_hidden_layers=3,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=2, pad_token_id=1)
  torch.manual_seed(0)
  text = randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=16, intermediate_size=64, num_attention_heads=2, hidden_act="quick_gelu",
      **common)), 1, 0.3)
  text_2 = randomized(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=24, intermediate_size=96, num_attention_heads=2, hidden_act="gelu",
      projection_dim=20, **common)), 2, 0.3)
  unet = randomized(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
      cross_attention_dim=16 + 24, attention_head_dim=(2, 4), use_linear_projection=True,
      transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=20 + 6 * 8), 3)
  vae = randomized(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
      latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.13025), 4)
  scheduler = diffusers.EulerDiscreteScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
      unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
  pipe.save_pretrained(root / "sdxl")
  return pipe


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sdxl_import_and_text_to_image_match_the_pipeline(tmp_path, capsys):
  pipe = tiny_sdxl(tmp_path)
  wd = tmp_path / "run"
  main(["import", "--diffusers", str(tmp_path / "sdxl"), "--workdir", str(wd)])
  assert capsys.readouterr().out.strip() == str(wd)
  run = restore_run(wd)
  c, model = run.config, run.task.model
  assert (c.model.text_2.layers, c.model.text_2.projection, c.model.text_2.pad_token) == (
      3, 20, "!")
  assert c.model.unet.transformer_depth_per_level == (1, 2) and c.diffusion.sampler == "euler"
  assert c.ldm.force_zeros_for_empty_prompt and model.text_2 is not None

  # the conditioning: both towers' penultimate states per token, the pooled projection
  tok, _ = t2i._tokens(model, [PROMPT], None, 1)
  with torch.no_grad():
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=NEGATIVE)
  cond = model.condition(run.params, tok, (16, 16))
  for ours, ref in ((cond["context"], embeds), (cond["text_embeds"], pooled)):
    assert err(ours, ref.numpy()) <= 2e-6 * max(1.0, float(ref.abs().max()))
  np.testing.assert_array_equal(cond["time_ids"], [[16, 16, 0, 0, 16, 16]])

  z = np.random.RandomState(4).randn(1, 4, 8, 8).astype(np.float32)
  errors, latents = {}, {}
  for negative in (NEGATIVE, None):  # None: SDXL's zero unconditional embeddings
    with torch.no_grad():
      ref = pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, latents=torch.from_numpy(z),
                 output_type="latent").images
    ours = t2i.text_to_image(model, run.params, run.model_state, [PROMPT], jax.random.PRNGKey(0),
                             steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=negative,
                             latents=nhwc(z), return_latents=True,
                             sampler=c.diffusion.sampler)[1]
    errors[negative] = (err(ours, nhwc(ref)), float(ref.abs().max()))
    latents[negative] = ours
    log.info("SDXL-like, negative=%r: whole text_to_image max |jaxgen - diffusers| latents "
             "%.2e (max %.1f)", negative, *errors[negative])
  assert all(e <= 1e-4 * max(1.0, m) for e, m in errors.values()), errors
  assert err(latents[NEGATIVE], latents[None]) > 1e-2  # zero vs encoded unconditional
  out = tmp_path / "gen.png"
  main(["generate", "--workdir", str(wd), "--prompt", PROMPT, "--steps", "2", "--num", "1",
        "--out", str(out)])
  assert capsys.readouterr().out.strip() == str(out)


def test_sdxl_model_index_needs_both_second_components(tmp_path):
  sd = tmp_path / "sd"
  for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2"):
    (sd / name).mkdir(parents=True)
  index = {"_class_name": "StableDiffusionXLPipeline",
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
           "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
  (sd / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(ConfigError, match="text_encoder_2 without .*tokenizer_2"):
    read_model_index(sd)
