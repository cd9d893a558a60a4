"""LoRA files for Stable Diffusion, read and written without torch.

Read (`read_lora`): the diffusers/PEFT layout (`unet.<module>.lora_A.weight` / `lora_B`, alpha
from the file's `lora_adapter_metadata`; also PEFT's own `base_model.model.` prefix and the
older diffusers `...processor.to_q_lora.down.weight` names) and kohya's (`lora_unet_<module with
underscores>.lora_down.weight` / `lora_up` / `alpha`, `lora_te_` for the text encoder), for the
U-Net's and the text encoder's dense and convolution layers. Modules are named as diffusers and
transformers name them and matched against the model's kernels (`module_index`), so a LoRA for
another architecture is an error naming the modules that do not exist, never a silent skip.

Written (`write_peft_lora`): diffusers' layout with its metadata, which diffusers'
`load_lora_weights` reads.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Mapping

import numpy as np
from flax import traverse_util

from jaxgen import lora as lora_lib
from jaxgen.convert.clip_text import hf_name
from jaxgen.convert.diffusers import (
  _UNET_RULES,
  diffusers_names,
  read_safetensors,
  write_safetensors,
)
from jaxgen.errors import CheckpointError

# file prefix -> (path of that part in an ldm run's params, kind)
LDM_PARTS = {"unet": (("unet", "params"), "unet"), "text_encoder": (("text", "params"), "text"),
             "text_encoder_2": (("text_2", "params"), "text")}  # SDXL's second tower


def module_index(params, parts: Mapping[str, tuple[tuple[str, ...], str]] = LDM_PARTS
                 ) -> dict[str, str]:
  """{diffusers/transformers module name with its file prefix (e.g. 'unet.down_blocks.0.
  attentions.0.proj_in'): '/'-joined kernel path in params} for every dense and conv kernel."""
  out = {}
  for path in traverse_util.flatten_dict(params):
    if path[-1] != "kernel":
      continue
    for prefix, (root, kind) in parts.items():
      if tuple(path[:len(root)]) != root:
        continue
      rest = path[len(root):]
      if kind == "unet":
        name = diffusers_names(rest, _UNET_RULES)[0]
        module = f"{prefix}.{name.removesuffix('.weight')}"
      else:
        module = f"{prefix}.text_model.{hf_name(rest).removesuffix('.weight')}"
      out[module] = lora_lib.join(path)
  return out


def _metadata(path: pathlib.Path) -> dict:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
  return json.loads(raw) if raw else {}


_OLD_DIFFUSERS = [(r"\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$", r".\1.\2"),
                  (r"\.processor\.to_out_lora\.(down|up)\.weight$", r".to_out.0.\1"),
                  (r"\.lora_linear_layer\.(down|up)\.weight$", r".\1")]


def _entries(sd: Mapping[str, np.ndarray], index: Mapping[str, str]) -> dict[str, dict]:
  """{module: {"down", "up", "alpha"?}} from any supported layout."""
  kohya = {}
  for module in index:
    prefix, _, rest = module.partition(".")
    short = {"unet": "lora_unet_", "text_encoder": "lora_te_",
             "text_encoder_2": "lora_te2_"}.get(prefix)
    if short is not None:
      kohya[short + rest.replace(".", "_")] = module
      if prefix == "text_encoder":  # SDXL's kohya files call the first tower te1
        kohya["lora_te1_" + rest.replace(".", "_")] = module
  out: dict[str, dict] = {}
  unknown = []
  for key, value in sd.items():
    key_n = key.replace("base_model.model.", "unet.", 1) if key.startswith("base_model.") else key
    key_n = key_n.replace(".default.weight", ".weight")
    for te in ("text_encoder.", "text_encoder_2."):
      if key_n.startswith(te) and not key_n.startswith(te + "text_model."):
        # transformers >= 5.6 names CLIPTextModel's layers without the text_model. level
        key_n = te + "text_model." + key_n.removeprefix(te)
    for te in ("lora_te_", "lora_te1_", "lora_te2_"):
      if key_n.startswith(te) and not key_n.startswith(te + "text_model_"):
        key_n = te + "text_model_" + key_n.removeprefix(te)
    m = re.match(r"(.*)\.lora_([AB])\.weight$", key_n)
    if m:
      out.setdefault(m.group(1), {})["down" if m.group(2) == "A" else "up"] = value
      continue
    m = re.match(r"(lora_(?:unet|te)_.*)\.(lora_down\.weight|lora_up\.weight|alpha)$", key_n)
    if m:
      module = kohya.get(m.group(1))
      if module is None:
        unknown.append(m.group(1))
        continue
      role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(2)]
      out.setdefault(module, {})[role] = value
      continue
    for pattern, repl in _OLD_DIFFUSERS:
      if re.search(pattern, key_n):
        module, _, role = re.sub(pattern, repl, key_n).rpartition(".")
        out.setdefault(module, {})[role] = value
        break
    else:
      unknown.append(key)
  if unknown:
    shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
    raise CheckpointError(f"LoRA: {len(unknown)} tensors of no supported layout or of no layer of "
                          f"this model: {shown}")
  return out


def read_lora(path, params, parts=LDM_PARTS) -> dict:
  """An adapter set for `params` (see jaxgen.lora) from a LoRA .safetensors file."""
  path = pathlib.Path(path)
  if path.suffix.lower() != ".safetensors":
    raise CheckpointError(f"{path}: LoRA weights are read from .safetensors files only (pickled "
                          f"files run code when loaded)")
  sd = read_safetensors(path)
  meta = _metadata(path)
  index = module_index(params, parts)
  flat = traverse_util.flatten_dict(params, sep=lora_lib.SEP)
  adapters, missing = {}, []
  for module, e in _entries(sd, index).items():
    if "down" not in e or "up" not in e:
      raise CheckpointError(f"LoRA: {module} lacks its {'up' if 'down' in e else 'down'} matrix")
    if module not in index:
      missing.append(module)
      continue
    target = index[module]
    kernel = flat[target]
    down, up = np.asarray(e["down"], np.float32), np.asarray(e["up"], np.float32)
    rank = down.shape[0]
    if up.shape[1] != rank:
      raise CheckpointError(f"LoRA: {module}: down has rank {rank}, up {up.shape[1]}")
    # torch layouts: dense down [r, in], up [out, r]; conv down [r, in, kh, kw], up [out, r, 1, 1]
    if kernel.ndim == 4:
      a = down.reshape(rank, *down.shape[1:]).transpose(2, 3, 1, 0) if down.ndim == 4 else (
          down.reshape(rank, -1, 1, 1).transpose(2, 3, 1, 0))
    else:
      a = down.reshape(rank, -1).T
    b = up.reshape(up.shape[0], rank).T
    alpha = e.get("alpha")
    if alpha is None:
      prefix = module.partition(".")[0]
      alpha = meta.get(f"{prefix}.alpha_pattern", {}).get(module.partition(".")[2],
                                                           meta.get(f"{prefix}.lora_alpha"))
    adapters[target] = {"a": a, "b": b,
                        "alpha": np.float32(rank if alpha is None else np.asarray(alpha))}
    if (a @ b).shape != kernel.shape:
      raise CheckpointError(f"LoRA: {module}: update of shape {list((a @ b).shape)} for a kernel "
                            f"of shape {list(kernel.shape)}")
  if missing:
    shown = ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
    raise CheckpointError(f"LoRA: {len(missing)} modules are not layers of this model (another "
                          f"architecture?): {shown}")
  if not adapters:
    raise CheckpointError(f"{path}: no LoRA tensors")
  return adapters


def write_peft_lora(path, adapters, params, *, alpha: float, parts=LDM_PARTS) -> pathlib.Path:
  """Writes trained adapters (no per-adapter alpha; the update is alpha / r * A @ B) in diffusers'
  layout with the metadata its load_lora_weights reads (rank, lora_alpha, target modules)."""
  index = {v: k for k, v in module_index(params, parts).items()}
  tensors, meta = {}, {}
  for target, ad in adapters.items():
    module = index.get(target)
    if module is None:
      raise CheckpointError(f"LoRA: {target} has no diffusers name")
    a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
    rank = a.shape[-1]
    if a.ndim == 4:  # HWIO with O = r -> [r, in, kh, kw]; up -> [out, r, 1, 1]
      down = a.transpose(3, 2, 0, 1)
      up = b.T[:, :, None, None]
    else:
      down, up = a.T, b.T
    # The text encoder's layers as transformers >= 5.6 names them (no text_model. level), which
    # the diffusers of that generation matches exactly; read_lora takes both spellings.
    module = re.sub(r"^(text_encoder(?:_2)?)\.text_model\.", r"\1.", module)
    tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(down)
    tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(up)
    prefix, _, name = module.partition(".")
    m = meta.setdefault(prefix, {"r": rank, "lora_alpha": float(alpha), "target_modules": []})
    m["target_modules"].append(name)
  packed = {f"{p}.{k}": v for p, d in meta.items() for k, v in d.items()}
  return write_safetensors(path, tensors, {"format": "pt",
                                           "lora_adapter_metadata": json.dumps(packed)})
