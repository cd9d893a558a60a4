"""Training compute of the representation-conditioned pipeline (RCG) against the plain
unconditional DDPM: XLA's FLOP count of each config's loss + gradient at its batch size, times its
steps.

python benchmarks/representations.py [--vary runs/vary] [--rcg-steps 3000]
python benchmarks/representations.py --unclip [--clip runs/clip_neg_bi] \
    [--decoder runs/vary_shapes] [--ldm runs/ldm_pos]

RCG's total = SimCLR (configs/simclr.py:size=16) + the embedding-conditioned U-Net
(configs/vary.py; its embeddings are cached, so the frozen tower costs one pass over the data,
counted too) + the prior (configs/rcg.py). The table gives the steps of configs/ddpm.py that
spend the same compute. Shapes only: nothing is trained, no weights are read.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxgen import app  # noqa: E402


def _struct(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _abstract_init(task):
  example = {k: v for k, v in task.example_batch().items() if np.asarray(v).dtype.kind not in "USO"}
  return jax.eval_shape(lambda key: task.init(key, example), jax.random.PRNGKey(0))


def loss_grad_flops(task, config, batch: dict) -> float:
  """FLOPs of one loss + gradient evaluation (the train step less the optimizer update)."""
  params, model_state = _abstract_init(task)

  def step(p, s, b, key):
    return jax.grad(lambda q: task.loss_fn(q, s, b, key)[0])(p)

  compiled = jax.jit(step).lower(params, model_state, batch,
                                 _struct((2,), jnp.uint32)).compile()
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca["flops"])


def forward_flops(fn, *args) -> float:
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca["flops"])


def unclip_rows(args) -> list[dict]:
  """unCLIP (decoder + text prior) against the cross-attention latent text-to-image run whose
  saved config is --ldm (its autoencoder run counted too). The clip run serves both."""
  rows = []
  from jaxgen.weights import read_config
  for part, cfg in (("decoder", f"{REPO}/configs/vary.py:shapes,encoder={args.clip}"),
                    ("text prior", f"{REPO}/configs/unclip.py:decoder={args.decoder}")):
    c = app.load_config(cfg)
    t = app.build_task(c)
    n = c.data.batch_size
    if part == "decoder":
      d = c.data
      b = {"image": _struct((n, d.image_size, d.image_size, d.channels), jnp.uint8),
           "embedding": _struct((n, t.unet.embedding_dim), jnp.float32)}
    else:
      b = {"embedding": _struct((n, t.model.image_shape[-1]), jnp.float32),
           "cond": _struct((n, t.text_dim), jnp.float32)}
    per = loss_grad_flops(t, c, b)
    rows.append(dict(part=f"unCLIP {part}", config=cfg.replace(f"{REPO}/", ""), batch=n,
                     steps=int(c.train.num_steps), gflop_per_step=per / 1e9,
                     tflop=per * c.train.num_steps / 1e12))
  for part, wd in (("autoencoder", read_config(args.ldm)["ldm"]["autoencoder"]),
                   ("latent U-Net", args.ldm)):
    saved = read_config(wd)
    c = app.config_from_dict(saved)
    t = app.build_task(c)
    n = c.data.batch_size
    ex = {k: np.asarray(v) for k, v in t.example_batch().items()
          if np.asarray(v).dtype.kind not in "USO"}
    b = {k: _struct((n, *v.shape[1:]), v.dtype) for k, v in ex.items()}
    if c.task == "ldm":
      b.pop("image", None)
      b["latent_mean"] = b["latent_std"] = _struct((n, *t.model.latent_shape), jnp.float32)
    per = loss_grad_flops(t, c, b)
    rows.append(dict(part=f"cross-attention {part}", config=str(wd),
                     batch=n, steps=int(c.train.num_steps), gflop_per_step=per / 1e9,
                     tflop=per * c.train.num_steps / 1e12))
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--simclr", default="runs/simclr16")
  p.add_argument("--vary", default="runs/vary")
  p.add_argument("--rcg-steps", type=int, default=None, help="default: configs/rcg.py's")
  p.add_argument("--unclip", action="store_true",
                 help="instead: unCLIP's training compute against a cross-attention ldm run")
  p.add_argument("--clip", default="runs/clip_neg_bi")
  p.add_argument("--decoder", default="runs/vary_shapes")
  p.add_argument("--ldm", default="runs/ldm_pos")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  if args.unclip:
    rows = unclip_rows(args)
    out = pathlib.Path(args.out or REPO / "benchmarks" / "results" / "unclip_compute")
    out.with_suffix(".json").write_text(json.dumps(dict(rows=rows), indent=2) + "\n")
    lines = ["| part | config / run | batch | steps | GFLOP/step | TFLOP |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['part']} | `{r['config']}` | {r['batch']} | {r['steps']} | "
              f"{r['gflop_per_step']:.3f} | {r['tflop']:.2f} |" for r in rows]
    u = sum(r["tflop"] for r in rows if r["part"].startswith("unCLIP"))
    x = sum(r["tflop"] for r in rows if r["part"].startswith("cross"))
    lines.append(f"\nunCLIP in all: {u:.2f} TFLOP; cross-attention text-to-image in all: "
                 f"{x:.2f} TFLOP (XLA's FLOP count of loss + gradient; the shared clip run is "
                 "not counted).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return
  args.out = args.out or str(REPO / "benchmarks" / "results" / "rcg_compute")
  rows = []

  def add(name, spec, config, task, batch, steps):
    per = loss_grad_flops(task, config, batch)
    rows.append(dict(part=name, config=spec, batch=int(config.data.batch_size), steps=int(steps),
                     gflop_per_step=per / 1e9, tflop=per * steps / 1e12))
    print(f"{name}: {per / 1e9:.3f} GFLOP/step x {steps} = {per * steps / 1e12:.2f} TFLOP",
          flush=True)

  def images(c, n):
    d = c.data
    return {"image": _struct((n, d.image_size, d.image_size, d.channels), jnp.uint8),
            "label": _struct((n,), jnp.int32), "index": _struct((n,), jnp.int32)}

  c = app.load_config(f"{REPO}/configs/simclr.py:size=16")
  add("simclr", "configs/simclr.py:size=16", c, app.build_task(c),
      images(c, c.data.batch_size), c.train.num_steps)
  c = app.load_config(f"{REPO}/configs/vary.py:encoder={args.simclr}")
  t = app.build_task(c)
  b = dict(images(c, c.data.batch_size),
           embedding=_struct((c.data.batch_size, t.unet.embedding_dim), jnp.float32))
  add("vary", "configs/vary.py", c, t, b, c.train.num_steps)
  # the frozen tower's one pass over the training set (the cache)
  from jaxgen.data import load_source
  n_train = len(load_source(c.data, c.data.train_split))
  x = images(c, 256)["image"]
  _, emb_state = _abstract_init(t)
  per = forward_flops(lambda v, im: t.embedder.apply(v, im.astype(jnp.float32) / 127.5 - 1),
                      emb_state["embedder"], x) / 256
  rows.append(dict(part="embedding cache", config="configs/vary.py", batch=256,
                   steps=int(np.ceil(n_train / 256)), gflop_per_step=per * 256 / 1e9,
                   tflop=per * n_train / 1e12))
  c = app.load_config(f"{REPO}/configs/rcg.py:decoder={args.vary}")
  t = app.build_task(c)
  steps = args.rcg_steps or c.train.num_steps
  b = {"embedding": _struct((c.data.batch_size, t.model.image_shape[-1]), jnp.float32)}
  add("prior", "configs/rcg.py", c, t, b, steps)
  rcg_total = sum(r["tflop"] for r in rows)
  c = app.load_config(f"{REPO}/configs/ddpm.py")
  t = app.build_task(c)
  per = loss_grad_flops(t, c, images(c, c.data.batch_size))
  equal = int(round(rcg_total * 1e12 / per))
  rows.append(dict(part="plain DDPM", config="configs/ddpm.py", batch=int(c.data.batch_size),
                   steps=equal, gflop_per_step=per / 1e9, tflop=per * equal / 1e12))
  out = dict(rows=rows, rcg_total_tflop=rcg_total, ddpm_equal_steps=equal,
             backend=jax.default_backend())
  path = pathlib.Path(args.out)
  path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
  lines = ["| part | config | batch | steps | GFLOP/step | TFLOP |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['part']} | `{r['config']}` | {r['batch']} | {r['steps']} | "
            f"{r['gflop_per_step']:.3f} | {r['tflop']:.2f} |" for r in rows]
  lines.append(f"\nRCG in all: {rcg_total:.2f} TFLOP = {equal} steps of `configs/ddpm.py` "
               "(XLA's FLOP count of loss + gradient; the optimizer update is not counted).")
  path.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
