"""Low-rank adapters (LoRA, Hu et al. 2021) as pure functions of parameter pytrees.

An adapter set is a dict {"path/to/kernel": {"a": A, "b": B[, "alpha": alpha]}} keyed by the
'/'-joined path of a kernel in a model's parameter tree. A has the kernel's shape with its last
(output) axis replaced by the rank r, B is [r, out]: the kernel's update is
(alpha / r) * A @ B (alpha defaults to r), for dense kernels [in, out] and convolution kernels
[kh, kw, in, out] alike. Trained adapters carry no alpha (it would be trained too): their
scale goes to `merge`.
`merge` adds any number of adapter sets, each with its own (traced) scale: called once it merges
them into the weights; called inside a jitted function it applies them on the fly, and changing
a scale never recompiles. `init` makes trainable adapters whose update starts at zero.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxgen.errors import ConfigError, ShapeError

SEP = "/"


def join(path: Sequence[str]) -> str:
  return SEP.join(path)


def delta(adapter: Mapping[str, jax.Array]) -> jax.Array:
  """(alpha / r) * A @ B in float32: the kernel update of one adapter (alpha: r if absent)."""
  a = jnp.asarray(adapter["a"], jnp.float32)
  b = jnp.asarray(adapter["b"], jnp.float32)
  if "alpha" not in adapter:
    return a @ b
  return (jnp.asarray(adapter["alpha"], jnp.float32) / a.shape[-1]) * (a @ b)


def merge(params, adapter_sets, scales=None):
  """params with every adapter set's update added, scaled by `scales` (one per set, default 1).

  adapter_sets: one set or a sequence of sets. A path that names no kernel, or an update of the
  wrong shape, is a ShapeError naming it. Pure: jit it, or call it inside a jitted function to
  apply the adapters on the fly."""
  if isinstance(adapter_sets, Mapping):
    adapter_sets = [adapter_sets]
  adapter_sets = list(adapter_sets)
  scales = [1.0] * len(adapter_sets) if scales is None else list(scales)
  if len(scales) != len(adapter_sets):
    raise ConfigError(f"{len(scales)} scales for {len(adapter_sets)} adapter sets")
  flat = traverse_util.flatten_dict(params, sep=SEP)
  out = dict(flat)
  for adapters, scale in zip(adapter_sets, scales):
    for path, adapter in adapters.items():
      if path not in flat:
        raise ShapeError(f"LoRA: {path} is not a parameter of this model")
      d = delta(adapter)
      if d.shape != flat[path].shape:
        raise ShapeError(f"LoRA: the update of {path} has shape {list(d.shape)}, the parameter "
                         f"{list(flat[path].shape)}")
      w = out[path]
      out[path] = (w.astype(jnp.float32) + jnp.asarray(scale, jnp.float32) * d).astype(w.dtype)
  return traverse_util.unflatten_dict(out, sep=SEP)


def targets(params, pattern: str) -> list[str]:
  """The '/'-joined paths of the kernels (2-D dense or 4-D conv) whose path matches the regular
  expression `pattern` (re.search)."""
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(params, sep=SEP)
  return sorted(p for p, v in flat.items()
                if p.endswith(SEP + "kernel") and jnp.ndim(v) in (2, 4) and rx.search(p))


def init(key, params, paths: Sequence[str], rank: int) -> dict:
  """Trainable adapters for the kernels at `paths`: A ~ N(0, 1 / fan_in) (fan_in: the kernel's
  inputs), B = 0, so that merge(params, init(...)) == params at the start. No alpha: give
  merge the scale alpha / rank."""
  if not isinstance(rank, int) or rank < 1:
    raise ConfigError(f"LoRA rank must be a positive int, got {rank!r}")
  if not paths:
    raise ConfigError("LoRA: no parameter to adapt (the target pattern matched no kernel)")
  flat = traverse_util.flatten_dict(params, sep=SEP)
  out = {}
  for i, path in enumerate(paths):
    if path not in flat:
      raise ShapeError(f"LoRA: {path} is not a parameter of this model")
    shape = flat[path].shape
    fan_in = 1
    for n in shape[:-1]:
      fan_in *= n
    a = jax.random.normal(jax.random.fold_in(key, i), (*shape[:-1], rank), jnp.float32)
    out[path] = {"a": a / jnp.sqrt(jnp.float32(fan_in)),
                 "b": jnp.zeros((rank, shape[-1]), jnp.float32)}
  return out


def num_params(adapters) -> int:
  return sum(int(v["a"].size + v["b"].size) for v in adapters.values())
