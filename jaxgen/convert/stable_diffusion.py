"""Convert a Stable Diffusion 1.x/2.x checkpoint in diffusers' folder layout (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/), without torch, into the sections of an
ldm-task config and its parameters (`convert`). The app layer (`jaxgen.app.
import_stable_diffusion`) composes the config, checks that the ldm task builds the very modules
the weights were converted for (`check_task_modules`) and writes the run, tokenizer included.

The config sections are filled from the converted modules' own fields (jaxgen.models.build), so a
new U-Net field reaches imported configs without an edit here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import time
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.convert.clip_text import load_text_encoder, load_tokenizer
from jaxgen.convert.diffusers import load_diffusers_component, read_diffusers_config
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.models import build
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.text import TextTransformer
from jaxgen.models.unet import UNet

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
# model_index.json: the components an SD 1.x/2.x pipeline needs, with the classes jaxgen reads,
# and those it may carry but that play no part in text to image.
_REQUIRED = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,  # any class: only its noise schedule and timestep grid are read
}
# SDXL's second text encoder and its tokenizer (both or neither)
_SDXL = {"text_encoder_2": ("CLIPTextModelWithProjection",),
         "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast")}
_IGNORED = ("safety_checker", "feature_extractor", "image_encoder")

# diffusers scheduler config -> jaxgen diffusion settings
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# diffusers' defaults for keys a scheduler config leaves out (they differ between classes)
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                           beta_end=0.02, prediction_type="epsilon", steps_offset=0,
                           clip_sample_range=1.0)
_LEADING_BY_DEFAULT = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")
_CLIPS_BY_DEFAULT = ("DDIMScheduler", "DDPMScheduler")
_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "plms",
             "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a"}
_FINAL_ALPHA_ZERO_BY_DEFAULT = ("PNDMScheduler",)


# ---------------------------------------------------------------------------------------------
# folder -> settings


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e


def read_model_index(path) -> dict:
  """model_index.json, checked to describe a pipeline jaxgen can import (SD 1.x/2.x layout)."""
  path = pathlib.Path(path)
  file = path / "model_index.json"
  if not file.exists():
    raise CheckpointError(f"{path}: no model_index.json (expected a diffusers pipeline folder "
                          f"with unet/, vae/, text_encoder/, tokenizer/ and scheduler/)")
  index = _read_json(file)
  for name, value in index.items():
    if name.startswith("_") or name in _REQUIRED or name in _IGNORED or name in _SDXL:
      continue
    if isinstance(value, (list, tuple)) and value and value[0] is not None:
      raise ConfigError(f"model_index.json: component {name!r} ({value[-1]}) is not supported: "
                        f"jaxgen imports Stable Diffusion 1.x/2.x pipelines ({', '.join(_REQUIRED)}"
                        f"); {index.get('_class_name', 'this pipeline')} needs more")
  for name, classes in _REQUIRED.items():
    value = index.get(name)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[1]):
      raise ConfigError(f"model_index.json: no {name!r} component")
    if classes is not None and value[1] not in classes:
      raise ConfigError(f"model_index.json: {name}={value[1]!r} is not supported "
                        f"(supported: {', '.join(classes)})")
    if not (path / name).is_dir():
      raise CheckpointError(f"{path}: no {name}/ folder, which model_index.json names")
  present = [n for n in _SDXL if isinstance(index.get(n), (list, tuple)) and index[n][0]]
  if present and len(present) != len(_SDXL):
    raise ConfigError(f"model_index.json: {present[0]} without {set(_SDXL) - set(present)}: "
                      f"SDXL's second text encoder needs its tokenizer")
  for name in present:
    if index[name][1] not in _SDXL[name]:
      raise ConfigError(f"model_index.json: {name}={index[name][1]!r} is not supported "
                        f"(supported: {', '.join(_SDXL[name])})")
    if not (path / name).is_dir():
      raise CheckpointError(f"{path}: no {name}/ folder, which model_index.json names")
  return index


def scheduler_settings(config: Mapping[str, Any]) -> dict:
  """A diffusers scheduler config -> {"diffusion": {...}, "ldm": {...}} keys of an ldm config:
  the noise schedule, the prediction type, x0 clipping, the timestep grid and a sampler.

  The scheduler's class sets the default sampler (PNDM: plms, Euler, Euler ancestral,
  DPM-Solver++(2M), DDIM, DDPM; ddim for the others) and its keys the settings every sampler
  follows: timestep_spacing and steps_offset, set_alpha_to_one, clip_sample or thresholding,
  use_karras_sigmas, final_sigmas_type."""
  cls = config.get("_class_name", "scheduler")
  c = {**_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
  if config.get("trained_betas") is not None:
    raise ConfigError(f"scheduler: trained_betas is not supported (only beta_schedule "
                      f"{', '.join(_BETA_SCHEDULES)})")
  if c.get("rescale_betas_zero_snr"):
    raise ConfigError("scheduler: rescale_betas_zero_snr=True is not supported")
  if c["beta_schedule"] not in _BETA_SCHEDULES:
    raise ConfigError(f"scheduler: beta_schedule={c['beta_schedule']!r} is not supported "
                      f"(supported: {', '.join(_BETA_SCHEDULES)})")
  if c["prediction_type"] not in _PREDICTIONS:
    raise ConfigError(f"scheduler: prediction_type={c['prediction_type']!r} is not supported "
                      f"(supported: {', '.join(_PREDICTIONS)})")
  spacing = c.get("timestep_spacing") or ("leading" if cls in _LEADING_BY_DEFAULT else "linspace")
  if spacing not in ("leading", "trailing", "linspace"):
    raise ConfigError(f"scheduler: timestep_spacing={spacing!r} is not supported "
                      f"(supported: leading, trailing, linspace)")
  steps_offset = int(c["steps_offset"])
  if steps_offset < 0:
    raise ConfigError(f"scheduler: steps_offset={steps_offset} is not supported (>= 0)")
  schedule = _BETA_SCHEDULES[c["beta_schedule"]]
  linear = schedule != "cosine"
  clip = c.get("clip_sample", cls in _CLIPS_BY_DEFAULT)
  sampler = _SAMPLERS.get(cls)
  if (cls == "DPMSolverMultistepScheduler" and c.get("algorithm_type", "dpmsolver++") ==
      "dpmsolver++" and c.get("solver_order", 2) == 2):
    sampler = "dpmpp_2m"
  if cls == "PNDMScheduler" and not c.get("skip_prk_steps", False):
    log.warning("scheduler: PNDM's Runge-Kutta warm-up (skip_prk_steps=False) is not "
                "implemented; sampling with PLMS, which is how Stable Diffusion configures it")
  if sampler is None:
    log.warning("scheduler: %s has no jaxgen counterpart; the default sampler is ddim (choose "
                "another with --sampler)", cls)
    sampler = "ddim"
  threshold = float(c.get("dynamic_thresholding_ratio", 0.995)) if c.get("thresholding") else 0.0
  if threshold:
    clip = False  # diffusers: thresholding replaces clip_sample
  # DDIM's last step goes to abar[0] when set_alpha_to_one is False (SD's configs; PNDM's
  # default); diffusers' pipelines never re-derive eps from a clipped x0.
  set_alpha_to_one = bool(c.get("set_alpha_to_one", cls not in _FINAL_ALPHA_ZERO_BY_DEFAULT))
  return {
      "diffusion": dict(
          schedule=schedule, num_timesteps=int(c["num_train_timesteps"]),
          beta_start=float(c["beta_start"]) if linear else 0.0,
          beta_end=float(c["beta_end"]) if linear else 0.0,
          prediction=_PREDICTIONS[c["prediction_type"]],
          clip_x0=float(c["clip_sample_range"]) if clip else 0.0,
          set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=False,
          threshold=threshold, sample_max_value=float(c.get("sample_max_value", 1.0)),
          karras=bool(c.get("use_karras_sigmas", False)),
          final_sigmas=c.get("final_sigmas_type", "zero"),
          sampler=sampler, sample_steps=50, guidance_scale=7.5),
      "ldm": dict(timestep_spacing=spacing, steps_offset=steps_offset),
  }


# ---------------------------------------------------------------------------------------------
# converted modules -> config sections


def _one(name: str, value):
  """A per-level value the ldm config holds as one number."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConfigError(f"{name}={list(value)} differs between levels; the ldm task holds one "
                        f"value for all levels")
    return value[0]
  return value


def unet_section(unet: UNet, unet_config: Mapping[str, Any], latent_channels: int,
                 text_width: int, dtype: str) -> dict:
  """text_width: the per-token width the U-Net attends to (SDXL: both towers' together)."""
  """model.unet of an ldm config for a converted UNet2DConditionModel."""
  chans = tuple(unet.block_channels)
  if unet.num_classes:
    raise ConfigError(f"unet: num_class_embeds={unet.num_classes} is not supported (the ldm "
                      f"task conditions on text only)")
  if unet.asymmetric_downsample:
    raise ConfigError("unet: downsample_padding=0 is not supported by the ldm task")
  if unet.time_embed_dim not in (None, 4 * chans[0]):
    raise ConfigError(f"unet: time_embedding_dim={unet.time_embed_dim} is not supported by the "
                      f"ldm task (4 * block_out_channels[0] = {4 * chans[0]})")
  for key, default in (("in_channels", 4), ("out_channels", 4)):
    if unet_config.get(key, default) != latent_channels:
      raise ConfigError(f"unet: {key}={unet_config.get(key, default)} differs from the VAE's "
                        f"latent_channels={latent_channels} (inpainting and depth models are "
                        f"not supported)")
  if unet.context_dim != text_width:
    raise ConfigError(f"unet: cross_attention_dim={unet.context_dim} differs from the text "
                      f"encoder's hidden_size={text_width}")
  heads = unet.heads_per_level()
  per_level = ("num_heads_per_level", "transformer_depth_per_level")
  keys = [k for k in build.conditional_unet_section() if k not in per_level]
  out = build.fields_of(unet, keys)
  depth = unet.transformer_depth
  depth = tuple(int(d) for d in depth) if isinstance(depth, (list, tuple)) else (int(depth),)
  out.update(num_heads=int(heads[-1]), num_heads_per_level=() if len(set(heads)) == 1 else heads,
             transformer_depth=depth[-1],
             transformer_depth_per_level=() if len(set(depth)) == 1 else depth,
             dtype=dtype, remat=False)
  return out


def vae_section(vae: Autoencoder, vae_config: Mapping[str, Any]) -> dict:
  """model.vae of an ldm config (vae-task keys) for a converted AutoencoderKL."""
  for key in ("in_channels", "out_channels"):
    if getattr(vae, key) != 3:
      raise ConfigError(f"vae: {key}={getattr(vae, key)} is not supported (RGB images: 3)")
  if vae_config.get("shift_factor"):
    raise ConfigError(f"vae: shift_factor={vae_config['shift_factor']} is not supported (the "
                      f"ldm task only scales its latents)")
  for key in ("latents_mean", "latents_std"):
    if vae_config.get(key) is not None:
      raise ConfigError(f"vae: {key} is not supported (the ldm task only scales its latents)")
  return dict(kind="vae", latent_dim=0, ch=int(vae.ch), ch_mult=tuple(vae.ch_mult),
              num_res_blocks=int(vae.num_res_blocks), z_channels=int(vae.z_channels),
              groups=int(vae.groups), eps=float(vae.eps), mid_attention=bool(vae.mid_attention),
              quant_conv=bool(vae.quant_conv))


def text_section(text: TextTransformer, text_config: Mapping[str, Any], tokenizer,
                 tokenizer_path: str) -> dict:
  """model.text of an ldm config for a converted CLIP text encoder and its tokenizer."""
  if text.eps != 1e-5:
    raise ConfigError(f"text_encoder: layer_norm_eps={text.eps} is not supported by the ldm "
                      f"task (1e-05)")
  if tokenizer.vocab_size != text.vocab_size:
    raise ConfigError(f"tokenizer: {tokenizer.vocab_size} tokens, but the text encoder's "
                      f"vocab_size is {text.vocab_size}")
  if tokenizer.context_length != text.max_positions:
    raise ConfigError(f"tokenizer: model_max_length={tokenizer.context_length} differs from the "
                      f"text encoder's max_position_embeddings={text.max_positions}")
  ratio = text.mlp_dim / text.hidden_size
  if int(ratio * text.hidden_size) != text.mlp_dim:
    raise ConfigError(f"text_encoder: intermediate_size={text.mlp_dim} is not a multiple the "
                      f"ldm task can express of hidden_size={text.hidden_size}")
  return dict(tokenizer="bpe", tokenizer_path=tokenizer_path,
              context_length=int(text.max_positions), width=int(text.hidden_size),
              layers=int(text.num_layers), heads=int(text.num_heads), mlp_ratio=float(ratio),
              activation=text.activation, init="", freeze=True, layer=0, layer_norm=True,
              attention_mask=bool(text_config.get("use_attention_mask", False)),
              # diffusers' pipelines tokenize with transformers' CLIPTokenizer, which keeps HTML
              # entities as typed
              html_unescape=False)


# ---------------------------------------------------------------------------------------------
# tokenizer folder


def copy_tokenizer(src, dst) -> pathlib.Path:
  """Copies a CLIP tokenizer folder; one saved by transformers 5 (tokenizer.json only) also gets
  the vocab.json and merges.txt that jaxgen's BPE tokenizer reads, taken from tokenizer.json."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.is_dir():
    raise DataError(f"{src}: no such tokenizer folder")
  shutil.copytree(src, dst)
  if ((dst / "vocab.json").exists() and (dst / "merges.txt").exists()) or (
      dst / "bpe_simple_vocab_16e6.txt.gz").exists():
    return dst
  if not (dst / "tokenizer.json").exists():
    raise DataError(f"{src}: neither vocab.json + merges.txt nor tokenizer.json")
  model = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
  if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
    raise DataError(f"{src}/tokenizer.json does not hold CLIP's BPE model")
  merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
  (dst / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False),
                                  encoding="utf-8")
  (dst / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                  encoding="utf-8")
  return dst


# ---------------------------------------------------------------------------------------------
# checks: the task builds the modules the weights were converted for


def _norm(value):
  if isinstance(value, (list, tuple)):
    return tuple(_norm(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (np.dtype, type)) and value is not bool:
    try:
      return np.dtype(value).name
    except TypeError:
      return value
  return value


def _fields(module, drop=()) -> dict:
  out = {f.name: _norm(getattr(module, f.name)) for f in dataclasses.fields(module)
         if f.name not in ("parent", "name", *drop)}
  if isinstance(module, UNet):  # per-level values compared level by level
    out["num_heads"] = tuple(module.heads_per_level())
    depth = module.transformer_depth
    out["transformer_depth"] = (tuple(depth) if isinstance(depth, (list, tuple))
                                else (depth,) * module.levels)
  return out


def check_same_module(what: str, built, converted, drop=()) -> None:
  """ConfigError naming the fields in which the task's module differs from the converted one."""
  a, b = _fields(built, drop), _fields(converted, drop)
  diff = [f"{k}: config builds {a[k]!r}, checkpoint has {b[k]!r}" for k in a if a[k] != b[k]]
  if diff:
    raise ConfigError(f"the ldm config does not reproduce the checkpoint's {what}: "
                      + "; ".join(diff))


def check_same_shapes(what: str, expected, actual) -> None:
  """CheckpointError naming parameters whose presence or shape differ between two pytrees."""
  e = {"/".join(map(str, k)): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected)
       .items()}
  a = {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(actual)
       .items()}
  problems = sorted(set(e) ^ set(a)) + sorted(f"{k} {a[k]} (wants {e[k]})"
                                             for k in set(e) & set(a) if e[k] != a[k])
  if problems:
    raise CheckpointError(f"{what}: the converted parameters do not fit the ldm task's model: "
                          + ", ".join(problems[:12]))


# ---------------------------------------------------------------------------------------------
# the import


def text_2_section(text_2: TextTransformer, pad_token: str) -> dict:
  """model.text_2 of an ldm config for SDXL's second text encoder (CLIPTextModelWithProjection):
  penultimate states without the final LayerNorm, and the pooled projection."""
  ratio = text_2.mlp_dim / text_2.hidden_size
  return dict(layers=int(text_2.num_layers), width=int(text_2.hidden_size),
              heads=int(text_2.num_heads), mlp_ratio=float(ratio), activation=text_2.activation,
              layer=-2, layer_norm=False, projection=int(text_2.projection_dim),
              pad_token=pad_token)


def ldm_sections(unet: UNet, unet_config, vae: Autoencoder, vae_config, text: TextTransformer,
                 text_config, tokenizer, tokenizer_path: str, schedule: dict, *,
                 dtype: str = "float32", text_2: TextTransformer | None = None,
                 pad_token_2: str = "!", force_zeros: bool = False) -> dict:
  """The sections of an ldm-task config for converted modules, their diffusers/transformers
  configs, the tokenizer at tokenizer_path and scheduler_settings(...) of the scheduler
  (`jaxgen.app.compose_config("ldm", sections)` makes the validated config). text_2: SDXL's
  second tower (both towers then give their penultimate states, as SDXL's pipelines take)."""
  v = vae_section(vae, vae_config)
  size = unet_config.get("sample_size", 64)
  size = size[0] if isinstance(size, (list, tuple)) else size
  width = text.hidden_size + (text_2.hidden_size if text_2 is not None else 0)
  model = dict(unet=unet_section(unet, unet_config, v["z_channels"], width, dtype), vae=v,
               text=text_section(text, text_config, tokenizer, tokenizer_path))
  if text_2 is not None:
    if text_2.projection_dim is None:
      raise ConfigError("text_encoder_2 has no text_projection (SDXL's pooled embedding)")
    model["text"].update(layer=-2, layer_norm=False)
    model["text_2"] = text_2_section(text_2, pad_token_2)
  return {
      # A placeholder that is never read: generating needs prompts, not data (see the ldm task).
      "data": dict(source="embedded", name="shapes", channels=3,
                   image_size=int(size) * 2 ** (len(v["ch_mult"]) - 1)),
      "model": model,
      "diffusion": schedule["diffusion"],
      "ldm": dict(schedule["ldm"], autoencoder="", vae_output="signed", cache_latents=False,
                  latent_scale=float(vae_config.get("scaling_factor") or 0.18215),
                  force_zeros_for_empty_prompt=bool(force_zeros)),
  }


def check_task_modules(task, unet: UNet, text: TextTransformer, vae: Autoencoder,
                       text_2: TextTransformer | None = None) -> None:
  """ConfigError unless the ldm task built the modules the weights were converted for."""
  check_same_module("U-Net", task.unet, unet, drop=("head_dim", "null_label", "remat"))
  # Pooling and the end-token id only shape the pooled output, which the U-Net never sees.
  check_same_module("text encoder", task.text, text, drop=("pooling", "eos_token_id"))
  if (task.text_2 is None) != (text_2 is None):
    raise ConfigError("the ldm task's second text tower does not match the checkpoint's")
  if text_2 is not None:
    # SDXL's pooled output: its end-of-text position is found by id ("eos") or as the largest
    # id ("argmax", transformers' rule for legacy configs): the same position for CLIP's vocab.
    check_same_module("text encoder 2", task.text_2, text_2, drop=("pooling", "eos_token_id"))
  # image_size is nominal: the autoencoder is fully convolutional.
  check_same_module("VAE", task.vae, vae, drop=("image_size",))


@dataclasses.dataclass
class Converted:
  """A converted pipeline: ldm config sections, parameters, model state and tokenizer."""
  sections: dict
  params: dict
  model_state: dict
  tokenizer: Any
  tokenizer_dir: pathlib.Path
  unet: UNet
  text: TextTransformer
  vae: Autoencoder
  text_2: TextTransformer | None = None


def convert(path, *, dtype: str = "float32", variant: str | None = None,
            scratch: str | pathlib.Path) -> Converted:
  """Reads the diffusers Stable Diffusion folder `path` (configs first: unsupported settings
  fail before any weight is read) and converts its modules. dtype: the U-Net's compute dtype
  in the config (parameters stay float32 whatever the files hold). variant: read e.g.
  *.fp16.safetensors. The tokenizer is copied to `scratch` (a new folder), in the vocab.json +
  merges.txt form that jaxgen reads."""
  if dtype not in DTYPES:
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a folder (expected a diffusers Stable Diffusion folder)")
  read_model_index(path)
  unet_config = read_diffusers_config(path / "unet")
  vae_config = read_diffusers_config(path / "vae")
  if not (path / "text_encoder" / "config.json").exists():
    raise CheckpointError(f"{path / 'text_encoder'}: no config.json")
  text_config = _read_json(path / "text_encoder" / "config.json")
  sched_file = path / "scheduler" / "scheduler_config.json"
  if not sched_file.exists():
    raise CheckpointError(f"{path / 'scheduler'}: no scheduler_config.json")
  schedule = scheduler_settings(_read_json(sched_file))

  t0 = time.perf_counter()
  unet, unet_vars = load_diffusers_component(path / "unet", variant=variant,
                                             dtype=jnp.dtype(dtype))
  vae, vae_vars = load_diffusers_component(path / "vae", variant=variant)
  text, text_vars = load_text_encoder(path / "text_encoder", variant=variant)
  second = None
  if (path / "text_encoder_2").is_dir() and "text_encoder_2" in read_model_index(path):
    second = load_text_encoder(path / "text_encoder_2", variant=variant)
  log.info("Converted the unet, vae and text encoder(s) of %s in %.1f s.", path,
           time.perf_counter() - t0)
  return _assemble(unet, unet_vars, unet_config, vae, vae_vars, vae_config, text, text_vars,
                   text_config, path / "tokenizer", schedule, dtype, scratch, second=second,
                   tokenizer_2_src=path / "tokenizer_2" if second else None,
                   force_zeros=bool(read_model_index(path).get("force_zeros_for_empty_prompt",
                                                               False)))


def _assemble(unet, unet_vars, unet_config, vae, vae_vars, vae_config, text, text_vars,
              text_config, tokenizer_src, schedule, dtype, scratch,
              pad_token: str | None = None, second=None, tokenizer_2_src=None,
              force_zeros: bool = False) -> Converted:
  if text.projection_dim is not None:  # pooled embeddings play no part in text to image
    text = text.clone(projection_dim=None)
    text_vars = {"params": {k: v for k, v in text_vars["params"].items()
                            if k != "text_projection"}}
  tok_dir = copy_tokenizer(tokenizer_src, scratch)
  if pad_token is not None:
    _set_pad_token(tok_dir, pad_token)
  tokenizer = load_tokenizer(tok_dir)
  text_2 = pad_2 = None
  if second is not None:
    text_2, text_2_vars = second
    pad_2 = (_second_tokenizer_pad(tokenizer, tokenizer_2_src, scratch)
             if tokenizer_2_src is not None else "!")
  sections = ldm_sections(unet, unet_config, vae, vae_config, text, text_config, tokenizer,
                          "tokenizer", schedule, dtype=dtype, text_2=text_2,
                          pad_token_2=pad_2 or "!", force_zeros=force_zeros)
  params = {"unet": unet_vars, "text": text_vars}
  if text_2 is not None:
    params["text_2"] = text_2_vars
  model_state = {"vae": {"params": vae_vars["params"]},
                 "latent": {"scale": np.float32(sections["ldm"]["latent_scale"])}}
  return Converted(sections, params, model_state, tokenizer, tok_dir, unet, text, vae, text_2)


def _second_tokenizer_pad(tokenizer, src, scratch) -> str:
  """SDXL's tokenizer_2: jaxgen reads it as the first tokenizer re-padded, so its vocabulary and
  merges must be the first's (CLIP's, for SDXL); returns its pad token."""
  tok_2 = load_tokenizer(copy_tokenizer(src, pathlib.Path(scratch).parent / "tokenizer_2"))
  if tok_2.vocab != tokenizer.vocab or tok_2.ranks != tokenizer.ranks:
    raise ConfigError("tokenizer_2 has another vocabulary or merges than tokenizer: jaxgen "
                      "reads SDXL's second tokenizer as the first with its own pad token")
  if tok_2.context_length != tokenizer.context_length:
    raise ConfigError("tokenizer_2's model_max_length differs from tokenizer's")
  return tok_2.pad_token


def _set_pad_token(tok_dir: pathlib.Path, pad_token: str) -> None:
  """Pads with `pad_token` unless the folder names its own special tokens; a merges-only folder
  is first written out as vocab.json + merges.txt, the form that carries settings."""
  if (tok_dir / "special_tokens_map.json").exists() or (
      tok_dir / "tokenizer_config.json").exists():
    return
  if not (tok_dir / "vocab.json").exists():
    tok = load_tokenizer(tok_dir)
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (tok_dir / "vocab.json").write_text(json.dumps(tok.vocab, ensure_ascii=False),
                                        encoding="utf-8")
    (tok_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  (tok_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}),
                                                   encoding="utf-8")


def convert_single_file(path, *, config_dir=None, tokenizer=None, v_prediction: bool = False,
                        image_size: int | None = None, dtype: str = "float32",
                        scratch: str | pathlib.Path) -> Converted:
  """Reads an SD 1.x/2.x single .safetensors file in the original LDM layout (see
  jaxgen.convert.single_file). Configs: those of the diffusers folder `config_dir` (weights not
  needed; its tokenizer and scheduler too), else inferred from the tensors with `v_prediction`
  and `image_size`, the CLIP tokenizer then read from the folder `tokenizer`."""
  from jaxgen.convert import single_file as sf
  from jaxgen.convert.clip_text import from_hf_clip_text
  from jaxgen.convert.diffusers import from_diffusers, read_safetensors

  if dtype not in DTYPES:
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
  path = sf.check_single_file(path)
  if config_dir is not None:
    config_dir = sf.check_config_dir(config_dir)
    if v_prediction or image_size:
      raise ConfigError("--v-prediction and --image-size are read from --config's folder; give "
                        "them only without --config")
    text_config = _read_json(config_dir / "text_encoder" / "config.json")
    layers = int(text_config["num_hidden_layers"])
  else:
    if tokenizer is None:
      raise ConfigError("a single-file checkpoint holds no tokenizer: give --tokenizer (a CLIP "
                        "tokenizer folder: vocab.json + merges.txt, or CLIP's "
                        "bpe_simple_vocab_16e6.txt.gz) or --config (a diffusers folder)")
    layers = None
  state = read_safetensors(path)
  kind_probe = any(k.startswith(sf.OPEN_CLIP) for k in state)
  if layers is None and kind_probe:  # SD 2.x conditions on OpenCLIP's penultimate layer
    layers = sf._count([k.removeprefix(sf.OPEN_CLIP) for k in state if k.startswith(sf.OPEN_CLIP)],
                       r"transformer\.resblocks\.(\d+)\.") - 1
  unet_sd, vae_sd, text_sd, kind, text_2_sd = sf.split_checkpoint(state, layers)
  text_2_config = tokenizer_2_src = None
  if config_dir is not None:
    unet_config = read_diffusers_config(config_dir / "unet")
    vae_config = read_diffusers_config(config_dir / "vae")
    sched_file = config_dir / "scheduler" / "scheduler_config.json"
    default = sf.SDXL_SCHEDULER if kind == "sdxl" else sf.SD_SCHEDULER
    scheduler = _read_json(sched_file) if sched_file.exists() else dict(default)
    tokenizer_src = config_dir / "tokenizer"
    if kind == "sdxl":
      if not (config_dir / "text_encoder_2" / "config.json").exists():
        raise ConfigError(f"--config {config_dir}: an SDXL checkpoint needs text_encoder_2/"
                          f"config.json and tokenizer_2/ (an SDXL diffusers folder)")
      text_2_config = _read_json(config_dir / "text_encoder_2" / "config.json")
      tokenizer_2_src = config_dir / "tokenizer_2"
  else:
    configs = sf.infer_configs(unet_sd, vae_sd, text_sd, kind, v_prediction=v_prediction,
                               image_size=image_size, text_2=text_2_sd)
    unet_config, vae_config = configs["unet"], configs["vae"]
    text_config, scheduler = configs["text_encoder"], configs["scheduler"]
    text_2_config = configs.get("text_encoder_2")
    tokenizer_src = pathlib.Path(tokenizer)
    log.info("%s: %s; inferred U-Net config %s", path.name,
             {"open_clip": "OpenCLIP text tower (SD 2.x)", "sdxl": "two text towers (SDXL)"}.get(
                 kind, "CLIP text tower (SD 1.x)"), unet_config)
  schedule = scheduler_settings(scheduler)
  t0 = time.perf_counter()
  unet, unet_vars = from_diffusers(unet_config, unet_sd, kind="UNet2DConditionModel",
                                   dtype=jnp.dtype(dtype))
  vae, vae_vars = from_diffusers(vae_config, vae_sd, kind="AutoencoderKL")
  text, text_vars = from_hf_clip_text(text_sd, text_config)
  second = None if text_2_sd is None else from_hf_clip_text(text_2_sd, text_2_config)
  log.info("Converted %s in %.1f s.", path, time.perf_counter() - t0)
  # SD 2.x's tokenizer pads with '!' (id 0), SD 1.x's with the end token: without a config
  # folder, the tokenizer folder's own choice wins, else the variant's.
  pad = "!" if config_dir is None and kind == "open_clip" else None
  return _assemble(unet, unet_vars, unet_config, vae, vae_vars, vae_config, text, text_vars,
                   text_config, tokenizer_src, schedule, dtype, scratch, pad_token=pad,
                   second=second, tokenizer_2_src=tokenizer_2_src, force_zeros=kind == "sdxl")
