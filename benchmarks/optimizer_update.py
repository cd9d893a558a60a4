"""The optimizer half of a train step on a big model: the time to apply given gradients.

On the SD-like row's parameter shapes (149.8M float32 values in 706 arrays; params, EMA and two
Adam moments are 2.4 GB) this times, each as its own jitted call with the state donated:
- `adam`: optax.scale_by_adam + apply, the floor of any AdamW;
- `optax_clip+adam`, `jaxgen_clip+adam`: the same after optax.clip_by_global_norm (which
  divides each element by the norm and selects) or jaxgen.train.optim.clip_by_global_norm (one
  multiply by a scalar);
- `jaxgen_step`: the real `make_train_step` with the row's optimizer (clip, AdamW, frozen
  towers), EMA and finite guard, on a loss whose gradient is the given tensor (sum of p * g:
  one extra read of p and g and a write of the gradient). As in the loop, the task's frozen
  parameters (the header's `frozen`: the SD-like row's text tower) get no gradient, update or
  EMA work; every other variant updates all parameters;
- `torch_fused`: torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW(fused=True) + a foreach
  lerp for the EMA on the same shapes (when torch is installed; in the same process, after the
  JAX rows, whose threads are idle by then).

python benchmarks/optimizer_update.py [--row ldm_sd_like] [--repeats 6]
Writes benchmarks/results/optimizer_update.{json,md}. One host device (JAXGEN_CPU_DEVICES=1
is set here), both cores for its threads; the allocator as $JAXGEN_MALLOC says (jaxgen.host_memory,
default: freed memory kept), recorded in the header.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAXGEN_CPU_DEVICES", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_jax import train_setup
from common import host_malloc, median_time, write
from rows import ROWS

from jaxgen import app
from jaxgen.train.optim import clip_by_global_norm, frozen_mask


def _time(fn, repeats):
  r = median_time(fn, repeats=repeats, warmup=1)
  return dict(median_ms=1e3 * r["median_s"], min_ms=1e3 * r["min_s"], repeats=r["repeats"])


def jax_rows(params, config, task, batch_size, repeats) -> list[dict]:
  key = jax.random.PRNGKey(1)
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.fold_in(key, p.size),
                                                          p.shape), params)
  rows = []
  for name, tx in [("adam", optax.scale_by_adam()),
                   ("optax_clip+adam", optax.chain(optax.clip_by_global_norm(1e-3),
                                                   optax.scale_by_adam())),
                   ("jaxgen_clip+adam", optax.chain(clip_by_global_norm(1e-3),
                                                    optax.scale_by_adam()))]:
    def update(p, o, g, tx=tx):
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, jax.tree.map(lambda x: -1e-4 * x, u)), o
    f = jax.jit(update, donate_argnums=(0, 1))
    held = [jax.tree.map(jnp.copy, params), tx.init(params)]

    def one(f=f, held=held):
      held[0], held[1] = f(held[0], held[1], grads)
      return held[1]
    rows.append(dict(variant=name, **_time(one, repeats)))
    del held[:]

  # the real step; the loss's gradient is batch["g"] itself
  def loss_fn(p, model_state, batch, key):
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(batch["g"])))
    return dot, ({}, model_state)
  task.loss_fn = loss_fn
  state, _, step = train_setup(task, config, batch_size, 1)
  batch = {"g": grads}
  compiled = step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  held = [state]

  def one_step():
    held[0], metrics = compiled(held[0], batch)
    return metrics
  rows.append(dict(variant="jaxgen_step", **_time(one_step, repeats),
                   xla_temp_mb=mem.temp_size_in_bytes / 2**20))
  return rows


def torch_row(shapes, repeats) -> dict | None:
  try:
    import torch
  except ImportError:
    return None
  torch.manual_seed(0)
  params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
  for p in params:
    p.grad = 1e-3 * torch.randn_like(p)
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)

  def step():
    torch.nn.utils.clip_grad_norm_(params, 1e-3)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 0.005)
  r = median_time(step, repeats=repeats, warmup=1, block=lambda x: x)
  return dict(variant=f"torch_fused ({torch.__version__}, {torch.get_num_threads()} threads)",
              median_ms=1e3 * r["median_s"], min_ms=1e3 * r["min_s"], repeats=r["repeats"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--row", default="ldm_sd_like")
  ap.add_argument("--repeats", type=int, default=6)
  args = ap.parse_args()
  malloc = host_malloc()  # as the suite's workers: before JAX starts its threads
  row = ROWS[args.row]
  config = app.load_config(row.config_spec(), list(row.overrides))
  task = app.build_task(config)
  state, _, _ = train_setup(task, config, row.batch, 1)
  params = state.params
  del state
  shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
  n = int(sum(np.prod(s) for s in shapes))
  fixed = jax.tree.leaves(frozen_mask(params, task.frozen))
  n_frozen = int(sum(p.size for p, f in zip(jax.tree.leaves(params), fixed) if f))
  rows = jax_rows(params, config, task, row.batch, args.repeats)
  t = torch_row(shapes, args.repeats)
  if t:
    rows.append(t)
  path, table = write("optimizer_update", rows,
                      ["variant", "median_ms", "min_ms", "repeats", "xla_temp_mb"],
                      dict(row=args.row, params=n, frozen=n_frozen, arrays=len(shapes),
                           malloc=malloc))
  print(table)
  print(path)


if __name__ == "__main__":
  main()
