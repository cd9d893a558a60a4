"""jaxgen side of the suite: one row per process (run by benchmarks/run.py).

python benchmarks/bench_jax.py ROW [--quick] [--set KEY=VALUE ...] [--train-devices N] --out F.json
python benchmarks/bench_jax.py peak --out FILE.json     (the float32 matmul peak)

Train step: the task built from its config, the real `make_train_step(task.loss_fn)` with the
config's AdamW, compiled once through .lower().compile() (that compile is the reported compile
time; the persistent cache stays off), then the median of repeated donated steps. FLOPs come
from XLA's cost analysis of that compiled step. Samplers: jaxgen.pipelines.diffusion.generate
(pixel U-Nets) or jaxgen.diffusion.sample on latents (latent U-Nets), DDIM.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import host_malloc, median_time, peak_rss_bytes
from rows import ROWS

from jaxgen import app, diffusion
from jaxgen.data.pipeline import batch_sharding
from jaxgen.train.mesh import make_mesh, put_batch, state_shardings
from jaxgen.train.optim import make_optimizer
from jaxgen.train.state import TrainState
from jaxgen.train.step import make_train_step


def matmul_peak(n: int = 3072, repeats: int = 7) -> dict:
  """float32 [n, n] x [n, n] jitted: the machine's practical matmul peak for XLA."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  t = median_time(f, a, b, repeats=repeats, warmup=2)
  flops = 2.0 * n ** 3
  return dict(n=n, median_s=t["median_s"], flops_per_s=flops / t["median_s"],
              best_flops_per_s=flops / t["min_s"])


def _batch(task, config, n: int, key) -> dict:
  """A training batch of n examples with the shapes the loop would send (random content)."""
  ex = task.example_batch()
  batch = {k: np.repeat(np.asarray(v), n, axis=0) for k, v in ex.items()
           if np.asarray(v).dtype.kind not in "USO"}
  rng = np.random.default_rng(0)
  if "image" in batch:
    batch["image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  if "label" in batch:
    batch["label"] = (np.arange(n) % 10).astype(batch["label"].dtype)
  if config.task == "ldm":
    # The loop trains latent diffusion on cached latents (ldm.cache_latents): the posterior mean
    # and std of each image, sampled in the loss. The frozen autoencoder is not in the step.
    shape = (n, *task.model.latent_shape)
    batch.pop("image", None)
    batch["latent_mean"] = rng.standard_normal(shape).astype(np.float32)
    batch["latent_std"] = np.full(shape, 0.1, np.float32)
    tok = task.tokenizer(["a photo of a circle"] * n, truncate=True)
    batch.update(input_ids=np.asarray(tok["input_ids"]), attention_mask=np.asarray(
        tok["attention_mask"]))
  return jax.device_put(batch)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {}
  if m is not None:
    out = dict(xla_argument_bytes=m.argument_size_in_bytes, xla_output_bytes=m.output_size_in_bytes,
               xla_temp_bytes=m.temp_size_in_bytes, xla_alias_bytes=m.alias_size_in_bytes)
    # Donated inputs alias outputs: live at once are the arguments, the temporaries, and the
    # outputs that do not reuse an argument's buffer.
    out["xla_peak_bytes"] = (m.argument_size_in_bytes + m.output_size_in_bytes
                             - m.alias_size_in_bytes + m.temp_size_in_bytes)
  stats = jax.devices()[0].memory_stats()  # None on the CPU backend
  if stats:
    out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  return out


def _flops(compiled) -> float | None:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per device program
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


def _fill(shapes, key):
  """Parameters of the given shapes: N(0, 0.02) weights, unit scales, zero biases.

  Timing does not depend on the values, and the tasks' own init compiles a forward pass of every
  network at batch 1, which takes 10-40 s per row on 2 cores (XLA compiles each U-Net op).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(leaves))

  def one(path_leaf, k):
    path, leaf = path_leaf
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name in ("scale", "var"):  # norm scales, BatchNorm variances, the latent scale
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean") or leaf.ndim == 0:
      return jnp.zeros(leaf.shape, leaf.dtype)
    return 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype)

  return jax.tree_util.tree_unflatten(treedef, [one(pl, k) for pl, k in zip(leaves, keys)])


def _init_state(task, example, tx, key) -> TrainState:
  params_shape, state_shape = jax.eval_shape(task.init, key, example)
  k_params, k_rng = jax.random.split(key)
  k_params, k_state = jax.random.split(k_params)
  params, model_state = _fill(params_shape, k_params), _fill(state_shape, k_state)
  return TrainState.create(params, tx, k_rng, model_state)


def train_setup(task, config, batch_size: int, devices: int | None = None):
  """(state, batch, step): the loop's jitted step, a random-weight state placed on the first
  `devices` devices of this process (default all; replicated, or split with train.fsdp) and one
  batch split over 'data'."""
  tx, schedule = make_optimizer(config.optim, config.train.num_steps, task.frozen)
  key = jax.random.PRNGKey(0)
  example = {k: np.asarray(v)[:1] for k, v in task.example_batch().items()
             if np.asarray(v).dtype.kind not in "USO"}
  mesh = make_mesh(jax.devices()[:devices])
  state = _init_state(task, example, tx, key)
  shardings = state_shardings(state, mesh, config.train.fsdp)
  state = jax.device_put(state, shardings)
  batch = jax.device_put(_batch(task, config, batch_size, key), batch_sharding(mesh))
  step = make_train_step(task.loss_fn, ema_decay=config.optim.ema_decay, schedule=schedule,
                         state_sharding=shardings, batch_sharding=batch_sharding(mesh),
                         accum_steps=config.optim.grad_accum_steps, frozen=task.frozen)
  return state, batch, step


def bench_train(task, config, batch_size: int, repeats: int, devices: int | None = None
                ) -> tuple[dict, TrainState, dict]:
  """The loop's step on the first `devices` devices of this process (default all): batch split
  over the mesh's 'data' axis, the state replicated or (train.fsdp) split, micro-batches when
  optim.grad_accum_steps > 1."""
  state, batch, step = train_setup(task, config, batch_size, devices)
  n_devices = len(jax.devices()[:devices])
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  holder = dict(state=state)

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics

  metrics = jax.device_get(one_step())
  if not bool(metrics["finite"]):
    raise RuntimeError(f"{config.task}: non-finite loss in the benchmark step")
  t = median_time(one_step, repeats=repeats, warmup=1, min_seconds=2.0)
  flops = _flops(compiled)  # of one device's program: the step's is that times the devices
  flops = flops * n_devices if flops else flops
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params))
  row = dict(batch=batch_size, devices=n_devices, fsdp=bool(config.train.fsdp),
             accum=int(config.optim.grad_accum_steps), params=n_params, step_s=t["median_s"],
             step_min_s=t["min_s"],
             step_repeats=t["repeats"], train_images_per_s=batch_size / t["median_s"],
             lower_s=t1 - t0, compile_s=t2 - t1, flops_per_step=flops,
             achieved_flops_per_s=flops / t["median_s"] if flops else None, **_memory(compiled))
  row["rss_peak_bytes"] = peak_rss_bytes()
  row["jax_residual_bytes"] = residual_bytes(task, holder["state"], batch)
  return row, holder["state"], batch


def residual_bytes(task, state, batch) -> int:
  """Bytes JAX saves from the forward pass for the backward pass of the loss (the residuals of
  jax.vjp, found by tracing only): what rematerialisation and bfloat16 act on, before XLA."""
  key = jax.random.PRNGKey(0)
  fn = lambda p: task.loss_fn(p, state.model_state, batch, key)[0]
  leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(fn, p)[1]), state.params)
  return int(sum(x.size * x.dtype.itemsize for x in leaves))


def _unet_params(config, params):
  return params["unet"] if config.task == "ldm" else params["params"]


def bench_sampler(task, config, params, n: int, steps_list, quick: bool) -> dict:
  """Images/s of DDIM at each step count and its overhead over steps x one network call."""
  from jaxgen.pipelines import diffusion as pipe
  out = {}
  key = jax.random.PRNGKey(1)
  if config.task == "ddpm":
    model = task.model
    labels = (jnp.arange(n) % model.num_classes) if model.num_classes else None
    guidance = jnp.float32(config.diffusion.guidance_scale) if labels is not None else None
    m = 2 if labels is not None else 1  # guidance: conditional and unconditional in one call
    x = jnp.zeros((m * n, *model.image_shape))
    t = jnp.zeros((m * n,), jnp.int32)
    y = None if labels is None else jnp.concatenate([labels, labels])
    net = jax.jit(lambda p, x, t: model.apply(p, x, t, y))
    net_args = (params, put_batch(np.asarray(x)), put_batch(np.asarray(t)))

    def draw(steps):
      return pipe.generate(model, params, key, num=n, labels=labels, guidance_scale=guidance,
                           sampler="ddim", num_steps=steps)
  else:
    model = task.model
    tok = task.tokenizer(["a photo of a circle"] * n, truncate=True)
    empty = task.tokenizer([""] * n)
    cond = model.encode_text(params, jnp.asarray(tok["input_ids"]),
                             jnp.asarray(tok["attention_mask"]))
    uncond = model.encode_text(params, jnp.asarray(empty["input_ids"]),
                               jnp.asarray(empty["attention_mask"]))
    guidance = jnp.float32(config.diffusion.guidance_scale)
    schedule = model.make_schedule()
    x = jnp.zeros((2 * n, *model.latent_shape))
    t = jnp.zeros((2 * n,), jnp.int32)
    ctx2 = jnp.concatenate([cond, uncond])
    den_fn = model.denoise_fn(params)
    net = jax.jit(lambda x, t, c: den_fn(x, t, c))
    net_args = tuple(put_batch(np.asarray(a)) for a in (x, t, ctx2))

    cache = {}  # one jitted sampler per step count (the count is static)

    def draw(steps):
      if steps not in cache:
        @jax.jit
        def f(params, cond, uncond, key, guidance):
          den = diffusion.guided_denoiser(model.denoise_fn(params), cond, uncond, guidance)
          return diffusion.sample(den, schedule, key, (n, *model.latent_shape), sampler="ddim",
                                  num_steps=steps, prediction=model.prediction,
                                  clip_x0=model.clip_x0)
        cache[steps] = f
      return cache[steps](params, cond, uncond, key, guidance)

  one = median_time(net, *net_args, repeats=5 if quick else 10, warmup=1, min_seconds=1.0)
  out["sample_batch"] = n
  out["net_eval_s"] = one["median_s"]
  out["net_eval_batch"] = int(x.shape[0])
  for steps in steps_list:
    t0 = time.perf_counter()
    jax.block_until_ready(draw(steps))
    first = time.perf_counter() - t0
    reps = 1 if steps >= 1000 or quick else 3
    r = median_time(draw, steps, repeats=reps, warmup=0)
    out[f"ddim{steps}_s"] = r["median_s"]
    out[f"ddim{steps}_images_per_s"] = n / r["median_s"]
    out[f"ddim{steps}_overhead_pct"] = 100.0 * (r["median_s"] / (steps * one["median_s"]) - 1.0)
    out[f"ddim{steps}_compile_s"] = max(first - r["median_s"], 0.0)
  return out


def run_row(name: str, quick: bool, extra: list[str] = (), train_devices: int | None = None
            ) -> dict:
  row = ROWS[name]
  bs = row.train_batch(quick)
  config = app.load_config(row.config_spec(),
                           list(row.overrides) + [f"data.batch_size={bs}", *extra])
  task = app.build_task(config)
  out = dict(row=name, what=row.what, framework="jaxgen")
  train, state, _ = bench_train(task, config, bs, row.quick_repeats if quick else row.repeats,
                                train_devices)
  out.update(train)
  if config.task in ("ddpm", "dit", "ldm"):
    out["unet_params"] = sum(int(np.prod(x.shape))
                             for x in jax.tree.leaves(_unet_params(config, state.params)))
  if row.sample_batch:
    # as `jaxgen sample` runs: under the mesh of all devices, the weights on each, the batch
    # split over them (training may have used fewer: jaxgen.runtime.train_devices)
    mesh = make_mesh()
    params = jax.device_put(state.ema_params, NamedSharding(mesh, P()))
    del state  # the training state's buffers (parameters, AdamW moments) are freed first
    with jax.set_mesh(mesh):
      out.update(bench_sampler(task, config, params, row.sample_n(quick), row.steps(quick),
                               quick))
    out["sample_devices"] = mesh.size
  out["rss_peak_end_bytes"] = peak_rss_bytes()
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("row", help=f"peak | {' | '.join(ROWS)}")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", required=True)
  p.add_argument("--train-devices", type=int, default=None, metavar="N",
                 help="train on the first N devices of the process (default all); sampling "
                      "uses all")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override after the row's own (repeatable), e.g. train.fsdp=true")
  a = p.parse_args()
  import logging
  malloc = host_malloc()
  logging.basicConfig(level=logging.WARNING)
  if a.row == "peak":
    res = dict(row="peak", framework="jaxgen", **matmul_peak())
  else:
    res = run_row(a.row, a.quick, a.set, a.train_devices)
    res["overrides"] = a.set
  res["jax"] = jax.__version__
  res["malloc"] = malloc
  with open(a.out, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
