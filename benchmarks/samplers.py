"""Sampler wall time and quality: DDPM over all timesteps against DDIM and DPM-Solver++ with
few steps for a diffusion model; Euler and Heun at 5-50 steps for a flow-matching model.

python benchmarks/samplers.py --workdir runs/ddpm_class [--num 1000] [--quality] [--stem NAME]
                              [--grid ddim:10,ddim:20,ddim:50]
Writes benchmarks/results/samplers.json and .md. Overhead = time / (model calls x one network
call); Heun makes 2 calls per step (2 steps - 1 in all, its last step being Euler's).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import timed, write

from jaxgen import app, runtime
from jaxgen.pipelines import diffusion as pipe

GRID = [("ddpm", 1000), ("ddim", 100), ("ddim", 50), ("ddim", 20), ("ddim", 10),
        ("dpmpp_2m", 20), ("dpmpp_2m", 10)]
FLOW_GRID = [("euler", 50), ("euler", 20), ("euler", 10), ("heun", 25), ("heun", 10),
             ("heun", 5)]


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--batch", type=int, default=100, help="images per sampler call")
  p.add_argument("--quality", action="store_true", help="also score each setting (slow)")
  p.add_argument("--num", type=int, default=1000, help="samples scored with --quality")
  p.add_argument("--stem", default="samplers", help="results file name under results/")
  p.add_argument("--grid", default="", help="sampler:steps,... (default: the model kind's)")
  a = p.parse_args()
  runtime.setup_logging()
  runtime.enable_compilation_cache()
  run = app.restore_run(a.workdir)
  task, params = run.task, run.params
  model = task.model
  n = a.batch
  labels = (jnp.arange(n) % model.num_classes) if model.num_classes else None
  guidance = run.config.diffusion.guidance_scale if labels is not None else None
  x = jnp.zeros((n, *model.image_shape))
  t = jnp.zeros((n,), jnp.float32 if model.is_flow else jnp.int32)
  grid = [(s.partition(":")[0], int(s.partition(":")[2])) for s in a.grid.split(",") if s] \
      or (FLOW_GRID if model.is_flow else GRID)
  # One network evaluation as the sampler makes it (guided: the doubled batch).
  if labels is not None:
    net = jax.jit(lambda p, x, t: model.apply(p, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                              jnp.concatenate([labels, labels])))
  else:
    net = jax.jit(lambda p, x, t: model.apply(p, x, t))
  one_eval = timed(net, params, x, t, repeats=5)["warm_s"]
  rows = []
  for sampler, steps in grid:
    if steps > model.num_timesteps:
      continue
    r = timed(pipe.generate, model, params, jax.random.PRNGKey(0), num=n, labels=labels,
              guidance_scale=guidance, sampler=sampler, num_steps=steps, repeats=1)
    calls = 2 * steps - 1 if sampler == "heun" else steps  # Heun: 2 per step, the last 1
    row = dict(sampler=sampler, steps=steps, model_calls=calls, batch=n,
               first_call_s=r["first_call_s"], warm_s=r["warm_s"], images_per_s=n / r["warm_s"],
               overhead_pct=100 * (r["warm_s"] / (calls * one_eval) - 1))
    if a.quality:
      from jaxgen.commands import evaluate_diffusion
      m = evaluate_diffusion(task, params, jax.random.PRNGKey(1), num=a.num, sampler=sampler,
                             steps=steps, batch=n)
      row.update({k: m[k] for k in ("frechet_distance", "precision", "recall",
                                    "class_accuracy") if k in m})
    rows.append(row)
    print(row, flush=True)
  cols = ["sampler", "steps", "model_calls", "batch", "warm_s", "images_per_s", "overhead_pct",
          "first_call_s"]
  if a.quality:
    cols += ["frechet_distance", "precision", "recall"] + (["class_accuracy"] if labels is not None
                                                         else [])
  path, table = write(a.stem, rows, cols, dict(workdir=a.workdir, step=run.step,
                                                   objective=model.objective,
                                                   one_network_eval_s=one_eval))
  print(table)
  print(path)


if __name__ == "__main__":
  main()
