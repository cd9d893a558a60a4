"""Wall time of one `text_to_image` call (tokenise, encode text, guided DDIM over the latents,
VAE decode), first call (compile included) and warm, for a trained latent-diffusion workdir or
for a config with random weights (timing only).

python benchmarks/text_to_image.py --workdir runs/ldm [--steps 50] [--batches 1,4,16]
python benchmarks/text_to_image.py --config configs/ldm.py:smoke     (no training needed)

Warm calls change the prompts, the seed and the guidance scale each time: the jitted function's
cache size is reported to show they never recompile. Writes benchmarks/results/text_to_image.*.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import write

from jaxgen import app, runtime
from jaxgen.pipelines import text_to_image as t2i

PROMPTS = ["a large red circle", "a small blue square left of a large yellow triangle",
           "a green diamond", "a large magenta triangle above a small cyan circle"]


def _model(a):
  if a.workdir:
    run = app.restore_run(a.workdir)
    return run.task.model, run.params, run.model_state, f"{a.workdir} step {run.step}"
  config = app.load_config(a.config)
  task = app.build_task(config)
  example = {k: v[:1] for k, v in task.example_batch().items()}
  params, model_state = task.init(jax.random.PRNGKey(0), example)
  return task.model, params, model_state, f"{a.config} (random weights)"


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir")
  src.add_argument("--config")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--batches", default="1,4,16", help="images per call")
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  runtime.setup_logging()
  model, params, model_state, what = _model(a)
  rows = []
  for n in [int(b) for b in a.batches.split(",")]:
    def call(i):
      prompts = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(n)]
      return t2i.text_to_image(model, params, model_state, prompts, jax.random.PRNGKey(i),
                               steps=a.steps, guidance_scale=3.0 + 0.5 * i)

    t0 = time.perf_counter()
    jax.block_until_ready(call(0))
    first = time.perf_counter() - t0
    size0 = t2i.text_to_image.jitted._cache_size()
    warm = []
    for i in range(1, a.repeats + 1):
      t0 = time.perf_counter()
      jax.block_until_ready(call(i))
      warm.append(time.perf_counter() - t0)
    recompiles = t2i.text_to_image.jitted._cache_size() - size0
    med = statistics.median(warm)
    rows.append(dict(images=n, steps=a.steps, first_call_s=first, warm_median_s=med,
                     warm_min_s=min(warm), images_per_s=n / med, recompiles=recompiles))
    print(rows[-1], flush=True)
  cols = ["images", "steps", "first_call_s", "warm_median_s", "warm_min_s", "images_per_s",
          "recompiles"]
  path, table = write("text_to_image", rows, cols,
                      dict(model=what, image_shape=list(model.image_shape),
                           latent_shape=list(model.latent_shape), sampler=model.default_sampler,
                           note="warm calls vary prompts, seed and guidance scale"))
  print(table)
  print(path)


if __name__ == "__main__":
  main()
