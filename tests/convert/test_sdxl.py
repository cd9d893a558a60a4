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


def tiny_sdxl(root, sd_shaped: bool = False):
  """A small random SDXL pipeline; sd_shaped: with SDXL's own rules that a single file's
  configs are inferred by (64-channel heads, GroupNorm of 32; its wider random text towers get
  smaller weights, whose states would otherwise drive cross-attention into a regime where float32
  rounding grows to 1% over four guided steps)."""
  write_tokenizer_files(root / "tok_src")
  vocab = clip_vocab(MERGES)
  files = (str(root / "tok_src" / "vocab.json"), str(root / "tok_src" / "merges.txt"))
  tok = transformers.CLIPTokenizer(*files, pad_token="<|endoftext|>", model_max_length=77)
  tok_2 = transformers.CLIPTokenizer(*files, pad_token="!", model_max_length=77)
  common = dict(vocab_size=len(vocab), max_position_embeddings=77, num_hidden_layers=3,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=2, pad_token_id=1)
  torch.manual_seed(0)
  w1, w2, proj, chans, groups = (64, 128, 32, (64, 128), 32) if sd_shaped else (
      16, 24, 20, (32, 64), 8)
  text = randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=w1, intermediate_size=4 * w1, num_attention_heads=max(w1 // 64, 2) if not
      sd_shaped else w1 // 64, hidden_act="quick_gelu", **common)), 1, 0.1 if sd_shaped else 0.3)
  text_2 = randomized(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=w2, intermediate_size=4 * w2, num_attention_heads=w2 // 64 if sd_shaped else 2,
      hidden_act="gelu", projection_dim=proj, **common)), 2, 0.1 if sd_shaped else 0.3)
  unet = randomized(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=chans,
      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=groups,
      cross_attention_dim=w1 + w2,
      attention_head_dim=tuple(c // 64 for c in chans) if sd_shaped else (2, 4),
      use_linear_projection=True, transformer_layers_per_block=(1, 2),
      addition_embed_type="text_time", addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=proj + 6 * 8), 3)
  vae = randomized(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64) if sd_shaped
      else (16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=groups,
      sample_size=16, scaling_factor=0.13025), 4)
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("inferred", [False, True], ids=["config", "inferred"])
def test_sdxl_single_file(tmp_path, capsys, inferred):
  """SDXL in the original single-file layout (conditioner.embedders.0/1, label_emb): diffusers'
  from_single_file reads the same U-Net back; jaxgen imports it, with the folder's configs or
  with configs inferred from the tensors (an SDXL-shaped model and --tokenizer), and generates
  what the pipeline generates."""
  from safetensors.torch import save_file

  from tests.convert.test_single_file import ldm_open_clip, ldm_unet, ldm_vae
  pipe = tiny_sdxl(tmp_path, sd_shaped=inferred)
  state = {**ldm_unet(pipe.unet.state_dict(), dict(pipe.unet.config)),
           **ldm_vae(pipe.vae.state_dict(), 2),
           **{"conditioner.embedders.0.transformer." + k
              if k.startswith("text_model.") else "conditioner.embedders.0.transformer.text_model."
              + k: v for k, v in pipe.text_encoder.state_dict().items()},
           **ldm_open_clip(pipe.text_encoder_2.state_dict(), pipe.text_encoder_2.config.hidden_size,
                           extra_layer_seed=None,
                           prefix="conditioner.embedders.1.model.")}
  path = tmp_path / "sdxl.safetensors"
  save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
  back = diffusers.UNet2DConditionModel.from_single_file(
      str(path), config=str(tmp_path / "sdxl"), subfolder="unet",
      local_files_only=True).state_dict()
  ref = pipe.unet.state_dict()
  assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)

  wd = tmp_path / "run"
  source = (["--tokenizer", str(tmp_path / "tok_src")] if inferred
            else ["--config", str(tmp_path / "sdxl")])
  main(["import", "--single-file", str(path), *source, "--workdir", str(wd)])
  assert capsys.readouterr().out.strip() == str(wd)
  run = restore_run(wd)
  assert run.config.ldm.force_zeros_for_empty_prompt and run.task.model.text_2 is not None
  z = np.random.RandomState(6).randn(1, 4, 8, 8).astype(np.float32)
  with torch.no_grad():
    ref_z = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=16, width=16,
                 latents=torch.from_numpy(z), output_type="latent").images
  ours = t2i.text_to_image(run.task.model, run.params, run.model_state, [PROMPT],
                           jax.random.PRNGKey(0), steps=STEPS, guidance_scale=GUIDANCE,
                           latents=nhwc(z), return_latents=True, height=16, width=16,
                           sampler=run.config.diffusion.sampler)[1]
  e = err(ours, nhwc(ref_z))
  log.info("SDXL-like single file (configs %s): whole text_to_image max |jaxgen - diffusers| "
           "latents %.2e (max %.1f)", "inferred" if inferred else "given", e,
           float(ref_z.abs().max()))
  assert e <= 1e-4 * max(1.0, float(ref_z.abs().max()))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sdxl_lora_on_both_text_towers_and_the_unet(tmp_path, monkeypatch):
  """A PEFT LoRA saved by StableDiffusionXLPipeline.save_lora_weights (U-Net, text_encoder,
  text_encoder_2) gives jaxgen's merged SDXL run the conditioning and U-Net output of diffusers'
  adapted modules."""
  peft = pytest.importorskip("peft")
  import transformers.integrations.peft as tpeft
  from peft.utils import get_peft_model_state_dict

  from jaxgen import lora
  from jaxgen.convert.lora import read_lora
  monkeypatch.setattr(tpeft, "check_peft_version", lambda *a, **k: None)  # see test_lora
  pipe = tiny_sdxl(tmp_path)
  main(["import", "--diffusers", str(tmp_path / "sdxl"), "--workdir", str(tmp_path / "run")])
  run = restore_run(tmp_path / "run")
  torch.manual_seed(7)
  pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                        target_modules=["to_q", "to_v", "add_embedding.linear_1"]))
  for te in (pipe.text_encoder, pipe.text_encoder_2):
    te.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                   target_modules=["q_proj", "v_proj"]))
  diffusers.StableDiffusionXLPipeline.save_lora_weights(
      tmp_path / "lora", weight_name="lora.safetensors",
      unet_lora_layers=get_peft_model_state_dict(pipe.unet),
      text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
      text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
      unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
      text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
      text_encoder_2_lora_adapter_metadata=pipe.text_encoder_2.peft_config["default"].to_dict())
  adapters = read_lora(tmp_path / "lora" / "lora.safetensors", run.params)
  assert {k.split("/")[0] for k in adapters} == {"unet", "text", "text_2"}
  params = lora.merge(run.params, adapters)
  model = run.task.model
  tok, _ = t2i._tokens(model, [PROMPT], None, 1)
  cond = model.condition(params, tok, (16, 16))
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    z = np.random.RandomState(8).randn(1, 4, 8, 8).astype(np.float32)
    ref = pipe.unet(torch.from_numpy(z), 400, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled,
                                       "time_ids": torch.tensor([[16., 16, 0, 0, 16, 16]])}).sample
  out = model.denoise_fn(params)(nhwc(z), np.array([400]), cond)
  for ours, theirs in ((cond["context"], embeds), (cond["text_embeds"], pooled),
                       (out, nhwc(ref.numpy()))):
    theirs = np.asarray(theirs)
    assert err(ours, theirs) <= 1e-5 * max(1.0, float(np.abs(theirs).max()))
