"""Stable Diffusion 1.x/2.x as one .safetensors file in the original (CompVis/LDM) key layout:
`model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE), `cond_stage_model.*` (CLIP's
text tower as transformers names it for SD 1.x, OpenCLIP's for SD 2.x).

The tensors are renamed to diffusers' and transformers' layout (`split_checkpoint`), so the
folder importer's converters read them. The configs come from a diffusers folder without
weights (`config_dir`, like diffusers' `from_single_file(config=...)`) or are inferred from the
tensors (`infer_configs`): the variant shows in the text tower (CLIP ViT-L: SD 1.x; OpenCLIP
ViT-H: SD 2.x, penultimate layer), what tensors cannot tell (v-prediction, the image size)
comes from flags. Pickled `.ckpt` files are refused: loading them runs code from the file.
"""
from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping

import numpy as np

from jaxgen.errors import CheckpointError, ConfigError

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
OPEN_CLIP = TEXT + "model."
HF_CLIP = TEXT + "transformer."
# SDXL: the two text towers under the conditioner's embedders
SDXL_TEXT, SDXL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# SD's own scheduler settings (the configs its diffusers folders ship with PNDM/DDIM)
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                  "steps_offset": 1, "timestep_spacing": "leading",
                  "interpolation_type": "linear", "use_karras_sigmas": False}
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False, "timestep_spacing": "leading"}


def check_single_file(path) -> pathlib.Path:
  """CheckpointError unless `path` is a .safetensors file (pickles are refused by name)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise CheckpointError(
        f"{path}: a pickled PyTorch checkpoint ({path.suffix}) is not read: unpickling runs code "
        f"from the file. Convert it to .safetensors first (e.g. with diffusers, "
        f"StableDiffusionPipeline.from_single_file(...).save_pretrained(...), on a machine you "
        f"trust), or download the .safetensors release of the model.")
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file")
  if path.suffix.lower() != ".safetensors":
    raise CheckpointError(f"{path}: expected a .safetensors file")
  return path


# -- renaming ------------------------------------------------------------------------------------

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
           ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _resnet(rest: str) -> str:
  for old, new in _RESNET:
    if rest.startswith(old):
      return new + rest[len(old):]
  return rest


def unet_layers_per_block(keys) -> int:
  """layers_per_block from the first downsampler's input block index (SD: input_blocks.3)."""
  for k in keys:
    m = re.match(r"input_blocks\.(\d+)\.0\.op\.", k)
    if m:
      return int(m.group(1)) - 1
  raise CheckpointError("U-Net: no downsampling input block (input_blocks.N.0.op)")


def unet_name(key: str, layers: int) -> str:
  """An LDM U-Net key (without model.diffusion_model.) -> diffusers' UNet2DConditionModel name."""
  fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
           "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
           "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
  for old, new in fixed.items():
    if key.startswith(old):
      return new + key[len(old):]
  m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
  if m:
    i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    level, k = divmod(i - 1, layers + 1)
    if k == layers:
      return f"down_blocks.{level}.downsamplers.0.conv." + rest.removeprefix("op.")
    if j == 0:
      return f"down_blocks.{level}.resnets.{k}." + _resnet(rest)
    return f"down_blocks.{level}.attentions.{k}." + rest
  m = re.match(r"middle_block\.(\d)\.(.*)", key)
  if m:
    j, rest = int(m.group(1)), m.group(2)
    if j == 1:
      return "mid_block.attentions.0." + rest
    return f"mid_block.resnets.{j // 2}." + _resnet(rest)
  m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key)
  if m:
    i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    level, k = divmod(i, layers + 1)
    if j == 0:
      return f"up_blocks.{level}.resnets.{k}." + _resnet(rest)
    if rest.startswith("conv."):  # the upsampler: second without attention, else third
      return f"up_blocks.{level}.upsamplers.0." + rest
    return f"up_blocks.{level}.attentions.{k}." + rest
  return key


def vae_name(key: str, num_levels: int) -> tuple[str, bool]:
  """An LDM VAE key (without first_stage_model.) -> (diffusers' AutoencoderKL name, whether the
  tensor is a 1x1 conv that diffusers holds as a linear layer: the mid-block attention)."""
  key = key.replace("nin_shortcut.", "conv_shortcut.").replace("norm_out.", "conv_norm_out.")
  m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", key)
  if m:
    part, _, i, kind, rest = m.groups()
    level = int(i) if part == "encoder" else num_levels - 1 - int(i)
    blocks = "down_blocks" if part == "encoder" else "up_blocks"
    if kind == "block":
      return f"{part}.{blocks}.{level}.resnets.{rest}", False
    return f"{part}.{blocks}.{level}.{kind}rs.0.{rest}", False
  m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
  if m:
    part, which, rest = m.groups()
    if which != "attn_1":
      return f"{part}.mid_block.resnets.{int(which[-1]) - 1}.{rest}", False
    names = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.",
             "proj_out.": "to_out.0."}
    for old, new in names.items():
      if rest.startswith(old):
        return f"{part}.mid_block.attentions.0.{new}{rest[len(old):]}", old != "norm."
  return key, False


def open_clip_to_hf(sd: Mapping[str, np.ndarray], num_layers: int | None = None, *,
                    projection: bool = False) -> dict:
  """OpenCLIP's text tower (SD 2.x's cond_stage_model.model.*, prefix removed) -> transformers'
  CLIPTextModel names; the fused attention projection is split into q, k, v. Only the first
  num_layers blocks are kept (SD 2.x conditions on the penultimate layer: all but the last).
  projection: keep the text projection (SDXL's pooled embedding; SD 2.x does not use it)."""
  out = {}
  for key, value in sd.items():
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
    if m:
      i, rest = int(m.group(1)), m.group(2)
      if num_layers is not None and i >= num_layers:
        continue
      pre = f"text_model.encoder.layers.{i}."
      if rest.startswith("attn.in_proj_"):
        kind = rest.removeprefix("attn.in_proj_")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3)):
          out[f"{pre}self_attn.{name}.{kind}"] = part
        continue
      for old, new in (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                       ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."),
                       ("mlp.c_proj.", "mlp.fc2.")):
        if rest.startswith(old):
          out[pre + new + rest[len(old):]] = value
          break
      else:
        out[pre + rest] = value
    elif key == "text_projection":  # OpenCLIP's [width, projection] -> Linear's [out, in]
      if projection:
        out["text_projection.weight"] = np.asarray(value).T
    elif key == "token_embedding.weight":
      out["text_model.embeddings.token_embedding.weight"] = value
    elif key == "positional_embedding":
      out["text_model.embeddings.position_embedding.weight"] = value
    elif key.startswith("ln_final."):
      out["text_model.final_layer_norm." + key.removeprefix("ln_final.")] = value
    elif key not in ("logit_scale", "attn_mask"):
      out[key] = value  # left unconverted: the text converter names it as unused
  return out


def split_checkpoint(sd: Mapping[str, np.ndarray], text_layers: int | None = None
                     ) -> tuple[dict, dict, dict, str, dict | None]:
  """An LDM-layout state dict -> (U-Net, VAE, text encoder) state dicts in diffusers' and
  transformers' names, the kind: 'clip' (SD 1.x), 'open_clip' (SD 2.x) or 'sdxl', and SDXL's
  second text encoder (CLIPTextModelWithProjection names; else None)."""
  unet = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}
  vae = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
  text = {k[len(TEXT):]: v for k, v in sd.items() if k.startswith(TEXT)}
  text_2 = None
  if any(k.startswith(SDXL_TEXT_2) for k in sd):  # SDXL: CLIP-L, and OpenCLIP bigG (all layers)
    text = {"transformer." + k[len(SDXL_TEXT):]: v for k, v in sd.items()
            if k.startswith(SDXL_TEXT)}
    text_2 = open_clip_to_hf({k[len(SDXL_TEXT_2):]: v for k, v in sd.items()
                              if k.startswith(SDXL_TEXT_2)}, projection=True)
  missing = [name for name, part in (("U-Net (model.diffusion_model.*)", unet),
                                     ("VAE (first_stage_model.*)", vae),
                                     ("text encoder (cond_stage_model.* or conditioner.*)",
                                      text)) if not part]
  if missing:
    raise CheckpointError(f"not a Stable Diffusion single-file checkpoint in the original "
                          f"layout: no {', no '.join(missing)} tensors")
  layers = unet_layers_per_block(unet)
  unet = {unet_name(k, layers): v for k, v in unet.items()}
  levels = 1 + max(int(m.group(1)) for k in vae
                   if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
  vae_out = {}
  for k, v in vae.items():
    name, linear = vae_name(k, levels)
    vae_out[name] = np.asarray(v).reshape(v.shape[:2]) if linear and v.ndim == 4 else v
  if text_2 is not None:
    kind = "sdxl"
    text = _hf_text(text, text_layers)
  elif any(k.startswith("model.") for k in text):
    kind = "open_clip"
    text = open_clip_to_hf({k.removeprefix("model."): v for k, v in text.items()
                            if k.startswith("model.")}, text_layers)
  else:
    kind = "clip"
    text = _hf_text(text, text_layers)
  return unet, vae_out, text, kind, text_2


def _hf_text(text, text_layers):
  """transformers' CLIP text names under a `transformer.` prefix -> text_model.* names, keeping
  the first text_layers layers (all when None)."""
  text = {k.removeprefix("transformer."): v for k, v in text.items()}
  text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()
          if not k.endswith("position_ids")}
  if text_layers is not None:
    text = {k: v for k, v in text.items()
            if not (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
            or int(m.group(1)) < text_layers}
  return text


# -- configs inferred from the tensors -----------------------------------------------------------


def _count(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def _text_config(text: Mapping[str, np.ndarray], act: str, eos: int, pad: int) -> dict:
  emb = text["text_model.embeddings.token_embedding.weight"]
  width = int(emb.shape[1])
  out = dict(
      architectures=["CLIPTextModel"], vocab_size=int(emb.shape[0]), hidden_size=width,
      intermediate_size=int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
      num_hidden_layers=_count(text, r"text_model\.encoder\.layers\.(\d+)\."),
      num_attention_heads=width // 64,
      max_position_embeddings=int(text["text_model.embeddings.position_embedding.weight"]
                                  .shape[0]),
      hidden_act=act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=eos,
      pad_token_id=pad)
  if "text_projection.weight" in text:
    out.update(architectures=["CLIPTextModelWithProjection"],
               projection_dim=int(text["text_projection.weight"].shape[0]))
  return out


def infer_configs(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                  text: Mapping[str, np.ndarray], kind: str, *, v_prediction: bool = False,
                  image_size: int | None = None,
                  text_2: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """diffusers/transformers configs of the renamed tensors of an SD 1.x (kind 'clip') or 2.x
  ('open_clip') checkpoint: {"unet", "vae", "text_encoder", "scheduler"}. Head counts follow
  the published models (SD 1.x: 8 heads; SD 2.x and SDXL: heads of 64 channels); the image size
  defaults to 1024 for SDXL, 768 for v-prediction (SD 2.x 768-v), else 512. SDXL ('sdxl', with
  `text_2`) also gets "text_encoder_2" and its added conditioning."""
  keys = list(unet)
  levels = _count(keys, r"down_blocks\.(\d+)\.")
  layers = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
  chans = [int(unet[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
  attn = [f"down_blocks.{i}.attentions.0.proj_in.weight" in unet for i in range(levels)]
  proj = next(unet[k] for k in keys if k.endswith("attn2.to_k.weight"))
  linear = unet[next(k for k in keys if k.endswith("proj_in.weight"))].ndim == 2
  depth = [_count(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
           or 1 for i in range(levels)]
  heads = 8 if kind == "clip" else [c // 64 for c in chans]
  size = image_size or (1024 if kind == "sdxl" else 768 if v_prediction else 512)
  vae_levels = _count(vae, r"encoder\.down_blocks\.(\d+)\.")
  unet_config = dict(
      _class_name="UNet2DConditionModel", sample_size=size // 2 ** (vae_levels - 1),
      in_channels=int(unet["conv_in.weight"].shape[1]),
      out_channels=int(unet["conv_out.weight"].shape[0]), block_out_channels=chans,
      layers_per_block=layers, cross_attention_dim=int(proj.shape[1]),
      attention_head_dim=heads, use_linear_projection=linear,
      transformer_layers_per_block=depth if len(set(depth)) > 1 else depth[0],
      norm_num_groups=32,
      down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]])
  vae_config = dict(
      _class_name="AutoencoderKL", in_channels=int(vae["encoder.conv_in.weight"].shape[1]),
      out_channels=int(vae["decoder.conv_out.weight"].shape[0]),
      block_out_channels=[int(vae[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                          for i in range(vae_levels)],
      layers_per_block=_count(vae, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
      latent_channels=int(vae["quant_conv.weight"].shape[0]) // 2, norm_num_groups=32,
      sample_size=size, scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
      down_block_types=["DownEncoderBlock2D"] * vae_levels,
      up_block_types=["UpDecoderBlock2D"] * vae_levels)
  open_clip = kind == "open_clip"
  text_config = _text_config(text, "gelu" if open_clip else "quick_gelu", 49407 if open_clip else 2,
                             0 if open_clip else 1)
  base = SDXL_SCHEDULER if kind == "sdxl" else SD_SCHEDULER
  scheduler = dict(base, prediction_type="v_prediction" if v_prediction else "epsilon")
  out = {"unet": unet_config, "vae": vae_config, "text_encoder": text_config,
         "scheduler": scheduler}
  if text_2 is not None:
    out["text_encoder_2"] = _text_config(text_2, "gelu", 2, 1)
    add = unet["add_embedding.linear_1.weight"].shape[1]
    proj = out["text_encoder_2"]["projection_dim"]
    unet_config.update(addition_embed_type="text_time", addition_time_embed_dim=(add - proj) // 6,
                       projection_class_embeddings_input_dim=int(add))
  return out


def check_config_dir(path) -> pathlib.Path:
  path = pathlib.Path(path)
  for name in ("unet/config.json", "vae/config.json", "text_encoder/config.json"):
    if not (path / name).exists():
      raise ConfigError(f"--config {path}: no {name} (expected a diffusers Stable Diffusion "
                        f"folder; its weights are not needed)")
  return path
