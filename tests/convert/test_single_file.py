"""Single-file Stable Diffusion checkpoints in the original LDM layout: a small random pipeline
saved by diffusers is rewritten in that layout (the renaming below is this test's own, and
diffusers' `from_single_file` reading the file back into the same pipeline vouches for it),
imported with and without a config folder, and compared with the pipeline."""
import logging

import jax
import numpy as np
import pytest

from jaxgen.app import restore_run
from jaxgen.cli import main
from jaxgen.convert import single_file as sf
from jaxgen.errors import CheckpointError, ConfigError
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
  tiny_pipeline,
  write_tokenizer_files,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
log = logging.getLogger(__name__)

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _res(rest):
  head, _, tail = rest.partition(".")
  return f"{_RES[head]}.{tail}"


def ldm_unet(sd, config):
  """diffusers UNet2DConditionModel names -> LDM (model.diffusion_model.*)."""
  L = config["layers_per_block"]
  up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
  fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
           "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.",
           "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
           "conv_out.": "out.2."}
  out = {}
  for k, v in sd.items():
    p = k.split(".")
    name = None
    for a, b in fixed.items():
      if k.startswith(a):
        name = b + k[len(a):]
    if p[0] == "down_blocks":
      lvl = int(p[1])
      if p[2] == "downsamplers":
        name = f"input_blocks.{1 + lvl * (L + 1) + L}.0.op." + ".".join(p[5:])
      else:
        i = 1 + lvl * (L + 1) + int(p[3])
        rest = ".".join(p[4:])
        name = (f"input_blocks.{i}.0." + _res(rest) if p[2] == "resnets"
                else f"input_blocks.{i}.1." + rest)
    elif p[0] == "mid_block":
      rest = ".".join(p[3:])
      name = ("middle_block.1." + rest if p[1] == "attentions"
              else f"middle_block.{2 * int(p[2])}." + _res(rest))
    elif p[0] == "up_blocks":
      lvl = int(p[1])
      if p[2] == "upsamplers":
        name = (f"output_blocks.{lvl * (L + 1) + L}.{2 if up_attn[lvl] else 1}.conv."
                + ".".join(p[5:]))
      else:
        i = lvl * (L + 1) + int(p[3])
        rest = ".".join(p[4:])
        name = (f"output_blocks.{i}.0." + _res(rest) if p[2] == "resnets"
                else f"output_blocks.{i}.1." + rest)
    assert name is not None, k
    out["model.diffusion_model." + name] = v
  return out


def ldm_vae(sd, levels):
  """diffusers AutoencoderKL names -> LDM (first_stage_model.*)."""
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
  out = {}
  for k, v in sd.items():
    p = k.split(".")
    if p[1] in ("down_blocks", "up_blocks"):
      i = int(p[2]) if p[0] == "encoder" else levels - 1 - int(p[2])
      grp = "down" if p[0] == "encoder" else "up"
      if p[3] == "resnets":
        name = f"{p[0]}.{grp}.{i}.block.{p[4]}." + ".".join(p[5:])
      else:
        name = f"{p[0]}.{grp}.{i}.{'downsample' if grp == 'down' else 'upsample'}.conv." + p[-1]
    elif p[1] == "mid_block" and p[2] == "resnets":
      name = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
    elif p[1] == "mid_block":
      name = f"{p[0]}.mid.attn_1.{attn[p[4]]}.{p[-1]}"
      if p[4] != "group_norm" and v.ndim == 2:
        v = v[:, :, None, None]
    else:
      name = k.replace("conv_norm_out", "norm_out")
    out["first_stage_model." + name.replace("conv_shortcut", "nin_shortcut")] = v
  return out


def ldm_open_clip(sd, width, extra_layer_seed=0, prefix="cond_stage_model.model."):
  """transformers CLIPTextModel names -> OpenCLIP's (cond_stage_model.model.*), with one more
  (random) block at the end, which SD 2.x does not use (extra_layer_seed=None: none; SDXL uses
  every block). A CLIPTextModelWithProjection's projection becomes OpenCLIP's [width, proj]."""
  out, layers = {}, {}
  for k, v in sd.items():
    k = k.removeprefix("text_model.")  # transformers >= 5.6 saves CLIPTextModel flat
    if k.endswith("position_ids"):
      continue
    if k.startswith("encoder.layers."):
      p = k.split(".")
      i, rest = int(p[2]), ".".join(p[3:])
      layers.setdefault(i, {})[rest] = v
    elif "token_embedding" in k:
      out["token_embedding.weight"] = v
    elif "position_embedding" in k:
      out["positional_embedding"] = v
    elif "final_layer_norm" in k:
      out["ln_final." + k.split(".")[-1]] = v
    elif k == "text_projection.weight":
      out["text_projection"] = v.T
  g = torch.Generator().manual_seed(extra_layer_seed or 0)
  if extra_layer_seed is not None:
    layers[len(layers)] = {k: torch.randn(v.shape, generator=g) for k, v in layers[0].items()}
  names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
  for i, d in layers.items():
    pre = f"transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      out[pre + f"attn.in_proj_{kind}"] = torch.cat(
          [d[f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
    for k, v in d.items():
      head = k.rsplit(".", 1)[0]
      if head in names:
        out[pre + names[head] + "." + k.rsplit(".", 1)[1]] = v
  out.setdefault("text_projection", torch.randn(width, width, generator=g))
  out["logit_scale"] = torch.tensor(4.6)
  return {prefix + k: v for k, v in out.items()}


def write_single_file(pipe, path, sd2):
  unet = ldm_unet(pipe.unet.state_dict(), dict(pipe.unet.config))
  vae = ldm_vae(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
  text_sd = pipe.text_encoder.state_dict()
  if sd2:
    text = ldm_open_clip(text_sd, pipe.text_encoder.config.hidden_size)
  else:
    text = {"cond_stage_model.transformer." + k: v for k, v in text_sd.items()}
  state = {k: v.detach().contiguous() for k, v in {**unet, **vae, **text}.items()}
  safetensors_torch.save_file(state, str(path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_single_file_imports_as_the_pipeline(tmp_path, sd2, capsys):
  pipe = tiny_pipeline(tmp_path, sd2)
  path = tmp_path / "model.safetensors"
  write_single_file(pipe, path, sd2)
  # The file is SD's layout as diffusers reads it: its single-file loaders give back the
  # pipeline's U-Net and VAE (the text tower is transformers' own names under a prefix).
  for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
    back = cls.from_single_file(str(path), config=str(tmp_path / "sd"), subfolder=name,
                                local_files_only=True).state_dict()
    ref = getattr(pipe, name).state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref), name

  wd = tmp_path / "run"
  main(["import", "--single-file", str(path), "--config", str(tmp_path / "sd"),
        "--workdir", str(wd)])
  assert capsys.readouterr().out.strip() == str(wd)
  run = restore_run(wd)
  model = run.task.model
  z = np.random.RandomState(4).randn(1, 4, 8, 8).astype(np.float32)
  with torch.no_grad():
    ref = pipe([PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, latents=torch.from_numpy(z), output_type="np").images
  image = t2i.text_to_image(model, run.params, run.model_state, [PROMPT], jax.random.PRNGKey(0),
                            steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE,
                            latents=nhwc(z))
  e = err(image, ref)
  log.info("sd2=%s: single file + config, whole text_to_image max |jaxgen - diffusers| %.2e",
           sd2, e)
  assert e <= 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_configs_inferred_from_the_tensors(tmp_path, capsys):
  """Without --config the architecture comes from the tensors: an SD 2.x-shaped model (OpenCLIP
  text tower, heads of 64 channels, GroupNorm of 32) imported with --tokenizer and
  --v-prediction generates what diffusers' pipeline of the same modules and SD's scheduler
  settings generates."""
  transformers = pytest.importorskip("transformers")
  vocab = clip_vocab(MERGES)
  torch.manual_seed(0)
  unet = randomized(diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
      cross_attention_dim=128, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 2),
      use_linear_projection=True), 1)
  vae = randomized(diffusers.AutoencoderKL(
      block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      norm_num_groups=32, scaling_factor=0.18215), 2)
  text = randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])), 3)
  state = {**ldm_unet(unet.state_dict(), dict(unet.config)), **ldm_vae(vae.state_dict(), 2),
           **ldm_open_clip(text.state_dict(), 128)}
  unet_sd, vae_sd, text_sd, kind, _ = sf.split_checkpoint(
      {k: v.numpy() for k, v in state.items()}, text_layers=2)
  assert kind == "open_clip"
  assert set(unet_sd) == set(unet.state_dict()) and set(vae_sd) == set(vae.state_dict())
  flat = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()
          if not k.endswith("position_ids")}
  assert {k.removeprefix("text_model.") for k in text_sd} == set(flat)
  for name, a in text_sd.items():  # q, k, v split back out of OpenCLIP's fused projection
    np.testing.assert_array_equal(a, flat[name.removeprefix("text_model.")].numpy(),
                                  err_msg=name)
  cfg = sf.infer_configs(unet_sd, vae_sd, text_sd, kind, v_prediction=True)
  u = cfg["unet"]
  assert (u["block_out_channels"], u["layers_per_block"], u["attention_head_dim"],
          u["use_linear_projection"], u["cross_attention_dim"], u["down_block_types"],
          u["up_block_types"], u["sample_size"]) == (
      [64, 128], 1, [1, 2], True, 128, ["CrossAttnDownBlock2D", "DownBlock2D"],
      ["UpBlock2D", "CrossAttnUpBlock2D"], 384)
  assert (cfg["vae"]["block_out_channels"], cfg["vae"]["latent_channels"]) == ([32, 64], 4)
  t = cfg["text_encoder"]
  assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
          t["hidden_act"]) == (128, 2, 2, "gelu")
  assert cfg["scheduler"]["prediction_type"] == "v_prediction"

  # the whole import from the file alone, against diffusers' pipeline of the same modules
  path = tmp_path / "sd2-768-v.safetensors"
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  write_tokenizer_files(tmp_path / "tok")
  wd = tmp_path / "run"
  main(["import", "--single-file", str(path), "--tokenizer", str(tmp_path / "tok"),
        "--v-prediction", "--workdir", str(wd)])
  assert capsys.readouterr().out.strip() == str(wd)
  run = restore_run(wd)
  assert run.config.diffusion.prediction == "v" and run.config.diffusion.sampler == "plms"
  tok = transformers.CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"),
                                   str(tmp_path / "tok" / "merges.txt"), pad_token="!",
                                   model_max_length=77)
  scheduler = diffusers.PNDMScheduler.from_config(cfg["scheduler"])
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  np.testing.assert_array_equal(run.task.model.tokenize([PROMPT])["input_ids"],
                                np.array(tok([PROMPT], padding="max_length").input_ids))
  model = run.task.model
  ids = model.tokenize([PROMPT])
  with torch.no_grad():
    text_ref = text(torch.from_numpy(np.asarray(ids["input_ids"]))).last_hidden_state.numpy()
  assert err(model.encode_text(run.params, ids["input_ids"], ids["attention_mask"]),
             text_ref) <= 1e-4
  z = np.random.RandomState(5).randn(1, 4, 8, 8).astype(np.float32)
  with torch.no_grad():
    out_ref = unet(torch.from_numpy(z), 500, encoder_hidden_states=torch.from_numpy(text_ref)
                   ).sample.numpy()
  out = model.denoise_fn(run.params)(nhwc(z), np.array([500]), text_ref)
  assert err(out, nhwc(out_ref)) <= 1e-4 * max(1.0, np.abs(out_ref).max())
  with torch.no_grad():
    ref = pipe([PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=STEPS, height=16,
               width=16, guidance_scale=GUIDANCE, latents=torch.from_numpy(z),
               output_type="latent").images
  ours = t2i.text_to_image(run.task.model, run.params, run.model_state, [PROMPT],
                           jax.random.PRNGKey(0), steps=STEPS, guidance_scale=GUIDANCE,
                           negative_prompt=NEGATIVE, latents=nhwc(z), height=16, width=16,
                           return_latents=True, sampler=run.config.diffusion.sampler)[1]
  e = err(ours, nhwc(ref))
  log.info("inferred SD2-v-like config: whole text_to_image (plms) max |jaxgen - diffusers| "
           "latents %.2e (max %.1f)", e, float(ref.abs().max()))
  assert e <= 1e-4 * max(1.0, float(ref.abs().max())), e


def test_pickles_and_bad_files_are_refused(tmp_path, capsys):
  ckpt = tmp_path / "v1-5.ckpt"
  ckpt.write_bytes(b"not even read")
  with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint"):
    sf.check_single_file(ckpt)
  for argv, code, words in (
      (["--single-file", str(ckpt)], 1, "unpickling runs code from the file"),
      (["--single-file", str(tmp_path / "none.safetensors"), "--tokenizer", str(tmp_path)], 1,
       "no such file"),
  ):
    with pytest.raises(SystemExit) as e:
      main(["import", *argv, "--workdir", str(tmp_path / "wd")])
    assert e.value.code == code and words in capsys.readouterr().err
  other = tmp_path / "other.safetensors"
  safetensors_torch.save_file({"foo.weight": torch.zeros(2)}, str(other))
  with pytest.raises(SystemExit) as e:
    main(["import", "--single-file", str(other), "--tokenizer", str(tmp_path),
          "--workdir", str(tmp_path / "wd")])
  assert e.value.code == 1 and "no U-Net (model.diffusion_model.*)" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    main(["import", "--single-file", str(other), "--workdir", str(tmp_path / "wd")])
  assert e.value.code == 2 and "give --tokenizer" in capsys.readouterr().err
  with pytest.raises(ConfigError, match="no unet/config.json"):
    sf.check_config_dir(tmp_path)
  assert not (tmp_path / "wd").exists()
