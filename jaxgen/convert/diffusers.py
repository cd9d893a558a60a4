"""Import diffusers weights (config.json + safetensors state dict) into jaxgen modules, no torch.

Supported: UNet2DModel and UNet2DConditionModel -> jaxgen.models.unet.UNet, AutoencoderKL ->
jaxgen.models.autoencoder.Autoencoder. Every tensor of the state dict must land in exactly one
flax parameter of the right shape, and every parameter must be filled: anything else is a
CheckpointError naming the tensors, never a silent skip.
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxgen.convert.common import check_complete
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.unet import UNet

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# config.json -> module


def _strip_res(block: str) -> str:
  return block[len("UNetRes"):] if block.startswith("UNetRes") else block  # as diffusers does


def _check_keys(cls: str, config: Mapping[str, Any], fixed: Mapping[str, Any],
                used: set[str]) -> None:
  """Values we cannot represent are errors; keys we do not know are logged, not dropped silently."""
  for key, value in config.items():
    if key.startswith("_"):
      continue
    if key in fixed:
      allowed = fixed[key] if isinstance(fixed[key], tuple) else (fixed[key],)
      if value not in allowed:
        raise ConfigError(f"{cls}: {key}={value!r} is not supported by jaxgen "
                          f"(supported: {', '.join(map(repr, allowed))})")
    elif key not in used:
      log.warning("%s: config key %r (= %r) is not interpreted by jaxgen", cls, key, value)


def _levels_with_attention(cls, config, blocks, defaults) -> tuple[bool, ...]:
  """attn_levels from down/up_block_types. blocks: ((plain_down, attn_down), (plain_up,
  attn_up)); defaults: diffusers' default (down, up) lists for the class."""
  (plain_down, attn_down), (plain_up, attn_up) = blocks
  down = [_strip_res(b) for b in config.get("down_block_types", defaults[0])]
  up = [_strip_res(b) for b in config.get("up_block_types", defaults[1])]
  if len(down) != len(up):
    raise ConfigError(f"{cls}: {len(down)} down blocks but {len(up)} up blocks")
  for b in down:
    if b not in (plain_down, attn_down):
      raise ConfigError(f"{cls}: down block type {b!r} is not supported "
                        f"(supported: {plain_down}, {attn_down})")
  for b in up:
    if b not in (plain_up, attn_up):
      raise ConfigError(f"{cls}: up block type {b!r} is not supported "
                        f"(supported: {plain_up}, {attn_up})")
  levels = tuple(b == attn_down for b in down)
  for k, b in enumerate(up):
    i = len(up) - 1 - k
    if (b == attn_up) != levels[i]:
      raise ConfigError(f"{cls}: up block {k} ({b}) does not mirror down block {i} "
                        f"({down[i]}); jaxgen's U-Net is symmetric")
  return levels


def _downsample_padding(cls, config) -> bool:
  pad = config.get("downsample_padding", 1)
  if pad not in (0, 1):
    raise ConfigError(f"{cls}: downsample_padding={pad} is not supported (0 or 1)")
  return pad == 0  # diffusers pads (0, 1) when padding is 0


_UNET2D_FIXED = dict(
    center_input_sample=False, time_embedding_type="positional", mid_block_scale_factor=(1, 1.0),
    downsample_type="conv", upsample_type="conv", act_fn=("silu", "swish"),
    resnet_time_scale_shift="default", class_embed_type=None, mid_block_type="UNetMidBlock2D")
_UNET2D_USED = {
    "sample_size", "in_channels", "out_channels", "freq_shift", "flip_sin_to_cos",
    "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "norm_eps", "add_attention", "num_class_embeds",
    "time_embedding_dim", "num_train_timesteps"}


def unet2d_from_config(config: Mapping[str, Any], *, dtype=jnp.float32) -> UNet:
  """diffusers UNet2DModel config -> UNet with attention="self" (pixel-space DDPM models)."""
  cls = "UNet2DModel"
  _check_keys(cls, config, _UNET2D_FIXED, _UNET2D_USED)
  chans = tuple(config.get("block_out_channels", (224, 448, 672, 896)))
  groups = config.get("norm_num_groups", 32)
  if config.get("attn_norm_num_groups") not in (None, groups):
    raise ConfigError(f"{cls}: attn_norm_num_groups={config['attn_norm_num_groups']} differs "
                      f"from norm_num_groups={groups}; not supported")
  # UNet2DModel really means a head *size* here; None means one head over all channels.
  head_dim = config.get("attention_head_dim", 8)
  num_classes = config.get("num_class_embeds") or 0
  return UNet(
      out_channels=config.get("out_channels", 3), block_channels=chans,
      layers_per_block=config.get("layers_per_block", 2),
      attn_levels=_levels_with_attention(
          cls, config, (("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")),
          (("DownBlock2D",) + ("AttnDownBlock2D",) * 3, ("AttnUpBlock2D",) * 3 + ("UpBlock2D",))),
      mid_attention=bool(config.get("add_attention", True)), attention="self",
      num_heads=1, head_dim=head_dim, num_classes=num_classes, null_label=False,
      dropout=float(config.get("dropout", 0.0)), groups=groups,
      norm_eps=config.get("norm_eps", 1e-5), flip_sin_to_cos=config.get("flip_sin_to_cos", True),
      freq_shift=config.get("freq_shift", 0),
      asymmetric_downsample=_downsample_padding(cls, config),
      time_embed_dim=config.get("time_embedding_dim"), dtype=dtype)


_UNET2D_COND_FIXED = dict(
    center_input_sample=False, time_embedding_type="positional", mid_block_scale_factor=(1, 1.0),
    act_fn=("silu", "swish"), resnet_time_scale_shift="default", class_embed_type=None,
    mid_block_type="UNetMidBlock2DCrossAttn", dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None, time_embedding_act_fn=None, timestep_post_act=None,
    time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=(None, False),
    cross_attention_norm=None, resnet_skip_time_act=False, resnet_out_scale_factor=(1, 1.0),
    reverse_transformer_layers_per_block=None)
_UNET2D_COND_USED = {
    "sample_size", "in_channels", "out_channels", "freq_shift", "flip_sin_to_cos",
    "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "downsample_padding", "dropout", "attention_head_dim", "num_attention_heads",
    "norm_num_groups", "norm_eps", "num_class_embeds", "time_embedding_dim",
    "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
    "only_cross_attention", "addition_embed_type_num_heads", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    # Precision hint for fp16 torch: jaxgen computes the softmax in float32 always.
    "upcast_attention"}


def _one_value(cls, key, value):
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConfigError(f"{cls}: per-level {key}={list(value)} is not supported (one value)")
    return value[0]
  return value


def unet2d_condition_from_config(config: Mapping[str, Any], *, dtype=jnp.float32) -> UNet:
  """diffusers UNet2DConditionModel config (Stable Diffusion 1.x/2.x) -> transformer UNet."""
  cls = "UNet2DConditionModel"
  _check_keys(cls, config, _UNET2D_COND_FIXED, _UNET2D_COND_USED)
  if config.get("norm_num_groups", 32) is None:
    raise ConfigError(f"{cls}: norm_num_groups=None (no output norm) is not supported")
  if any(np.atleast_1d(config.get("only_cross_attention", False))):
    raise ConfigError(f"{cls}: only_cross_attention is not supported")
  # diffusers' naming quirk: in this class `attention_head_dim` holds the number of heads
  # (github.com/huggingface/diffusers/issues/2011); num_attention_heads overrides it when set.
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  heads = tuple(heads) if isinstance(heads, (list, tuple)) else heads
  depth = config.get("transformer_layers_per_block", 1)
  if isinstance(depth, (list, tuple)):
    if any(isinstance(d, (list, tuple)) for d in depth):
      raise ConfigError(f"{cls}: per-layer transformer_layers_per_block is not supported")
    depth = tuple(depth)
  num_classes = config.get("num_class_embeds") or 0
  added = config.get("addition_embed_type")
  if added not in (None, "text_time"):
    raise ConfigError(f"{cls}: addition_embed_type={added!r} is not supported (None or "
                      f"'text_time', SDXL's)")
  add_time = int(config.get("addition_time_embed_dim") or 0) if added else 0
  add_dim = int(config.get("projection_class_embeddings_input_dim") or 0) if added else 0
  if added and not (add_time and add_dim):
    raise ConfigError(f"{cls}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                      f"projection_class_embeddings_input_dim")
  return UNet(
      out_channels=config.get("out_channels", 4),
      block_channels=tuple(config.get("block_out_channels", (320, 640, 1280, 1280))),
      layers_per_block=_one_value(cls, "layers_per_block", config.get("layers_per_block", 2)),
      attn_levels=_levels_with_attention(
          cls, config,
          (("DownBlock2D", "CrossAttnDownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
          (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
      mid_attention=True, attention="transformer", num_heads=heads, head_dim=None,
      transformer_depth=depth,
      context_dim=_one_value(cls, "cross_attention_dim", config.get("cross_attention_dim", 1280)),
      use_linear_projection=bool(config.get("use_linear_projection", False)),
      num_classes=num_classes, null_label=False, dropout=float(config.get("dropout", 0.0)),
      groups=config.get("norm_num_groups", 32), norm_eps=config.get("norm_eps", 1e-5),
      flip_sin_to_cos=config.get("flip_sin_to_cos", True), freq_shift=config.get("freq_shift", 0),
      asymmetric_downsample=_downsample_padding(cls, config),
      time_embed_dim=config.get("time_embedding_dim"), addition_time_embed_dim=add_time,
      addition_embed_dim=add_dim, dtype=dtype)


_VAE_FIXED = dict(act_fn=("silu", "swish"), force_upcast=(True, False))
_VAE_USED = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "use_quant_conv",
    "use_post_quant_conv", "mid_block_add_attention",
    # Latent scaling belongs to the diffusion pipeline, which reads it from the config.
    "scaling_factor", "shift_factor", "latents_mean", "latents_std"}


def autoencoder_kl_from_config(config: Mapping[str, Any], *, dtype=jnp.float32) -> Autoencoder:
  """diffusers AutoencoderKL config -> Autoencoder (spatial Gaussian latents, quant convs)."""
  cls = "AutoencoderKL"
  _check_keys(cls, config, _VAE_FIXED, _VAE_USED)
  chans = tuple(config.get("block_out_channels", (64,)))
  for b in config.get("down_block_types", ("DownEncoderBlock2D",)):
    if b != "DownEncoderBlock2D":
      raise ConfigError(f"{cls}: down block type {b!r} is not supported")
  for b in config.get("up_block_types", ("UpDecoderBlock2D",)):
    if b != "UpDecoderBlock2D":
      raise ConfigError(f"{cls}: up block type {b!r} is not supported")
  if any(c % chans[0] for c in chans):
    raise ConfigError(f"{cls}: block_out_channels {list(chans)} are not multiples of the first")
  quant = config.get("use_quant_conv", True)
  if config.get("use_post_quant_conv", True) != quant:
    raise ConfigError(f"{cls}: use_quant_conv and use_post_quant_conv must agree")
  size = config.get("sample_size", 32)
  size = size[0] if isinstance(size, (list, tuple)) else size
  return Autoencoder(
      in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
      image_size=size, ch=chans[0], ch_mult=tuple(c // chans[0] for c in chans),
      num_res_blocks=config.get("layers_per_block", 1),
      z_channels=config.get("latent_channels", 4), latent_dim=0, variational=True,
      groups=config.get("norm_num_groups", 32), eps=1e-6,
      mid_attention=bool(config.get("mid_block_add_attention", True)), quant_conv=quant,
      dtype=dtype)


_FROM_CONFIG: dict[str, Callable[..., nn.Module]] = {
    "UNet2DModel": unet2d_from_config,
    "UNet2DConditionModel": unet2d_condition_from_config,
    "AutoencoderKL": autoencoder_kl_from_config,
}


def module_from_config(config: Mapping[str, Any], *, kind: str | None = None,
                       dtype=jnp.float32) -> nn.Module:
  """The jaxgen module for a diffusers config; kind defaults to config['_class_name']."""
  kind = kind or config.get("_class_name")
  if kind not in _FROM_CONFIG:
    raise ConfigError(f"diffusers class {kind!r} is not supported "
                      f"(supported: {', '.join(_FROM_CONFIG)})")
  return _FROM_CONFIG[kind](config, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# state dict -> params

# Flax path (joined with "/") -> diffusers name, applied in order.
_UNET_RULES = [
    (r"\b(down|up)_(\d+)_res_(\d+)\b", r"\1_blocks.\2.resnets.\3"),
    (r"\b(down|up)_(\d+)_attn_(\d+)\b", r"\1_blocks.\2.attentions.\3"),
    (r"\bdown_(\d+)_downsample\b", r"down_blocks.\1.downsamplers.0"),
    (r"\bup_(\d+)_upsample\b", r"up_blocks.\1.upsamplers.0"),
    (r"\bmid_res_(\d+)\b", r"mid_block.resnets.\1"),
    (r"\bmid_attn_(\d+)\b", r"mid_block.attentions.\1"),
    (r"\btransformer_blocks_(\d+)\b", r"transformer_blocks.\1"),
    (r"\bnet_(\d+)\b", r"net.\1"),
    (r"\bto_out\b", "to_out.0"),
]
_VAE_RULES = [
    (r"^quant\b", "quant_conv"),
    (r"^post_quant\b", "post_quant_conv"),
    (r"\bmid/res_(\d+)\b", r"mid_block/resnets.\1"),
    (r"\bmid/attn\b", "mid_block/attentions.0"),
    (r"\bnorm_out\b", "conv_norm_out"),
] + _UNET_RULES
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
# Names older diffusers versions saved for the spatial attention blocks.
_LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def diffusers_names(path: tuple[str, ...], rules) -> list[str]:
  """Candidate diffusers state-dict names for one flax parameter path, preferred first."""
  name = "/".join(path[:-1])
  for pattern, repl in rules:
    name = re.sub(pattern, repl, name)
  name = name.replace("/", ".") + "." + _LEAF[path[-1]]
  names = [name]
  for new, old in _LEGACY.items():
    if new in name:
      names.append(name.replace(new, old))
  return names


def _to_flax(leaf: str, target: tuple[int, ...], a: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and len(target) == 4 and a.ndim == 4:
    return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "kernel" and len(target) == 2:
    if a.ndim == 4 and a.shape[2:] == (1, 1):  # a 1x1 conv saved for a linear layer
      a = a[:, :, 0, 0]
    if a.ndim == 2:
      return a.T  # (out, in) -> (in, out)
  return a


def convert_state_dict(module: nn.Module, init_args: tuple, state_dict: Mapping[str, Any],
                       rules, *, param_dtype=np.float32, init_kwargs=None) -> dict:
  """Fill every parameter of `module` (shapes from module.init(*init_args)) from state_dict.

  Returns the variables dict {"params": ...} as numpy arrays (views where possible: no copy of
  a float32 memory-mapped file). Raises CheckpointError naming missing, unused and mis-shaped
  tensors.
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args,
                                              **(init_kwargs or {})))
  flat = traverse_util.flatten_dict(shapes["params"])
  out, used, missing, misshaped = {}, set(), [], []
  for path, target in flat.items():
    names = diffusers_names(path, rules)
    name = next((n for n in names if n in state_dict), None)
    if name is None:
      missing.append(f"{names[0]} (for {'/'.join(path)})")
      continue
    used.add(name)
    a = np.asarray(state_dict[name])
    value = _to_flax(path[-1], tuple(target.shape), a)
    if value.shape != tuple(target.shape):
      misshaped.append(f"{name} {list(a.shape)} -> {'/'.join(path)} {list(target.shape)}")
      continue
    out[path] = value.astype(param_dtype, copy=False)
  unused = set(state_dict) - used
  # Downsample2D(name="conv") registers one conv under two names; older files kept both.
  for name in list(unused):
    twin = name.replace(".Conv2d_0.", ".conv.")
    if twin != name and twin in used and np.array_equal(state_dict[name], state_dict[twin]):
      unused.discard(name)
  check_complete(type(module).__name__, missing, misshaped, unused)
  return {"params": traverse_util.unflatten_dict(out)}


def _unet_init_args(module: UNet, config):
  s = module.downsample_factor
  # diffusers' defaults: 3 channels for UNet2DModel, 4 (SD latents) for UNet2DConditionModel.
  channels = config.get("in_channels", 4 if module.attention == "transformer" else 3)
  args = (jnp.zeros((1, s, s, channels), module.dtype), jnp.zeros((1,)))
  kwargs = {}
  if module.num_classes:
    kwargs["labels"] = jnp.zeros((1,), jnp.int32)
  if module.context_dim is not None:
    kwargs["context"] = jnp.zeros((1, 1, module.context_dim), module.dtype)
  if module.addition_time_embed_dim:  # only the concatenated width shapes the parameters
    kwargs["added"] = {"text_embeds": jnp.zeros((1, module.addition_embed_dim
                                                 - module.addition_time_embed_dim)),
                       "time_ids": jnp.zeros((1, 1))}
  return args, kwargs


def from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                   kind: str | None = None, dtype=jnp.float32,
                   param_dtype=np.float32) -> tuple[nn.Module, dict]:
  """(module, variables) from a diffusers config dict and state dict (name -> numpy array).

  kind: "UNet2DModel", "UNet2DConditionModel" or "AutoencoderKL"; defaults to the config's
  _class_name. dtype is the module's compute dtype; params are param_dtype (float32).
  """
  kind = kind or config.get("_class_name")
  module = module_from_config(config, kind=kind, dtype=dtype)
  if isinstance(module, UNet):
    args, kwargs = _unet_init_args(module, config)
    variables = convert_state_dict(module, args, state_dict, _UNET_RULES,
                                   param_dtype=param_dtype, init_kwargs=kwargs)
  else:
    s = module.downsample_factor
    x = jnp.zeros((1, s, s, module.in_channels), dtype)
    variables = convert_state_dict(module, (x,), state_dict, _VAE_RULES,
                                   param_dtype=param_dtype)
  return module, variables


# ---------------------------------------------------------------------------------------------
# files


_MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the JSON header


def read_safetensors(path) -> dict[str, np.ndarray]:
  """A .safetensors file as name -> read-only numpy arrays memory-mapped from disk.

  Reads the format directly (8-byte header size, JSON header, raw little-endian data) so that
  bfloat16 files load too, which safetensors.numpy cannot represent.
  """
  import ml_dtypes  # a jax dependency

  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  path = pathlib.Path(path)
  size = path.stat().st_size
  bad = lambda why: CheckpointError(f"{path} is not a valid .safetensors file: {why}.")
  with open(path, "rb") as f:
    if size < 8:
      raise bad(f"{size} bytes, shorter than its 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > min(size - 8, _MAX_HEADER):  # checked before reading: a garbage length is no alloc
      raise bad(f"its header length {n} exceeds the file ({size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError) as e:
      raise bad(f"its header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise bad("its header is not a JSON object")
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else None
  out = {}
  for name, info in header.items():
    if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
      raise bad(f"tensor {name!r} lacks its dtype, shape or data_offsets")
    if info.get("dtype") not in dtypes:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
    start, end = info["data_offsets"]
    shape = info["shape"]
    if not all(isinstance(v, int) and v >= 0 for v in [start, end, *shape]):
      raise bad(f"tensor {name!r} has a negative or non-integer offset or dimension")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtypes[info["dtype"]]).itemsize
    if not start <= end <= data_size or end - start != nbytes:
      raise bad(f"tensor {name!r} spans bytes [{start}, {end}) of {data_size}, but its shape "
                f"{shape} needs {nbytes}")
    out[name] = data[start:end].view(dtypes[info["dtype"]]).reshape(shape)
  return out


def write_safetensors(path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes name -> numpy array as a .safetensors file (the format read_safetensors reads:
  8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data),
  atomically: the file is the old one or the whole new one."""
  from jaxgen.files import atomic_write_bytes

  codes = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
           np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  chunks, offset = [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in codes:
      raise ConfigError(f"write_safetensors: {name} has unsupported dtype {a.dtype}")
    data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return atomic_write_bytes(path, len(raw).to_bytes(8, "little") + raw + b"".join(chunks))


def read_diffusers_config(path) -> dict:
  """config.json of a diffusers component folder (e.g. scaling_factor of a VAE)."""
  file = pathlib.Path(path) / "config.json"
  if not file.exists():
    raise CheckpointError(f"{path}: no config.json (expected a diffusers component folder, "
                          f"e.g. <model>/unet or <model>/vae)")
  return json.loads(file.read_text())


def load_diffusers_component(path, *, variant: str | None = None, dtype=jnp.float32,
                             param_dtype=np.float32) -> tuple[nn.Module, dict]:
  """(module, variables) from a diffusers folder: config.json + diffusion_pytorch_model
  [.variant].safetensors, or its sharded form with a .safetensors.index.json."""
  path = pathlib.Path(path)
  config = read_diffusers_config(path)
  stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
  single, index = path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json"
  if single.exists():
    state_dict = read_safetensors(single)
  elif index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state_dict = {}
    for shard in shards:
      state_dict.update(read_safetensors(path / shard))
  else:
    raise CheckpointError(f"{path}: no {single.name} (only safetensors files are read; convert "
                          f"a .bin checkpoint with diffusers' save_pretrained first)")
  return from_diffusers(config, state_dict, dtype=dtype, param_dtype=param_dtype)
