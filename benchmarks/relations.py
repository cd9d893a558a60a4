"""Where is the spatial relation lost? Two tables for the captioned shapes.

Text towers (--clip WORKDIRS): on held-out two-object scenes, how often the image scores its
caption above the caption's twins (relation inverted; colours, shapes or sizes exchanged between
the objects; chance 50%), the cosine of the pooled text embeddings of caption and twin, and the
cosine of the per-token states a diffusion model attends to, at the relation word and over the
tokens after it (the tower is causal: those are the states that have read the relation).

Text-to-image runs (--t2i WORKDIRS): the pixel judge's and the CLIP judge's figures from each
run's newest `jaxgen eval` result (WORKDIR/eval_stepN.json), generated beside real and
unconditional.

Does the trained denoiser use the relation at all (--loss WORKDIRS)? Its training loss on
held-out two-object scenes with their own caption and with the relation twin, at several noise
levels, the same noise for both: equal losses mean the network ignores the relation words.

python benchmarks/relations.py --clip runs/clip runs/clip_neg --t2i runs/ldm runs/dit_latent
Writes benchmarks/results/relations_text.{json,md}, relations_t2i.{json,md} and
relations_loss.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import write

from jaxgen import app, runtime
from jaxgen.data import load_all, load_source
from jaxgen.eval.retrieval import twin_preference
from jaxgen.pipelines import clip as pipe
from jaxgen.text.negatives import KINDS, twin


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def token_cosines(model, params, captions) -> dict:
  """Mean cosine between the per-token states of captions and their relation twins: at the
  relation word, and over the tokens from it to the end token."""
  pairs = [(c, t) for c in captions if (t := twin(c, "relation"))]
  a, b = model.tokenize([p[0] for p in pairs]), model.tokenize([p[1] for p in pairs])
  sa = np.asarray(pipe.text_states(model, params, a["input_ids"], a["attention_mask"]))
  sb = np.asarray(pipe.text_states(model, params, b["input_ids"], b["attention_mask"]))
  cos = (_unit(sa) * _unit(sb)).sum(-1)  # [N, L]
  differs = a["input_ids"] != b["input_ids"]
  first = differs.argmax(1)  # the relation word's token
  at_word = cos[np.arange(len(cos)), first]
  after = [cos[i, first[i]:a["eos_positions"][i] + 1].mean() for i in range(len(cos))]
  before = [cos[i, :first[i]].mean() for i in range(len(cos))]
  return dict(token_cosine_before=float(np.mean(before)), token_cosine_at_word=float(
      np.mean(at_word)), token_cosine_after=float(np.mean(after)))


def text_rows(workdirs, num):
  rows = []
  for wd in workdirs:
    run = app.restore_run(wd)
    c = run.config
    data = load_all(load_source(c.data, c.data.eval_split), limit=num)
    captions = [str(x) for x in data["caption"]]
    model, params = run.task.model, run.params
    emb = pipe.embed_images(model, params, run.model_state, data["image"])
    pref = twin_preference(emb, lambda t: pipe.embed_texts(model, params, t), captions)
    row = dict(run=wd, step=run.step, hard_negatives="+".join(c.model.hard_negatives) or "-")
    for k in KINDS:
      row[f"{k}_pref"] = pref[f"twin_{k}_preference"]
    row["relation_pooled_cos"] = pref["twin_relation_text_cosine"]
    row["colour_pooled_cos"] = pref["twin_colour_text_cosine"]
    row.update(token_cosines(model, params, captions))
    rows.append(row)
  return rows


def t2i_rows(workdirs):
  rows = []
  for wd in workdirs:
    found = sorted(pathlib.Path(wd).glob("eval_step*.json"),
                   key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    if not found:
      raise SystemExit(f"{wd}: no eval_stepN.json; run `jaxgen eval --workdir {wd}` first.")
    m = json.loads(found[-1].read_text())
    for which in ("generated", "real", "unconditional"):
      px = m[which]["pixels"]
      rows.append(dict(run=wd, step=m["step"], images=which, relation=px["relation"],
                       colour=px["colour"], shape=px["shape"], size=px["size"],
                       both_present=px["both_present"], binding=px["binding"],
                       clip_shape=m[which]["shape_accuracy"],
                       clip_colour=m[which]["colour_accuracy"],
                       clip_score=m[which]["clip_score"], prompts=px["num"],
                       two_object=px["num_two_object"]))
  return rows


def loss_rows(workdirs, num, levels=(0.2, 0.5, 0.8, 0.95)):
  """Per run and noise level (a fraction of the schedule, or flow time): the mean loss with the
  true caption and with its relation twin, and how often the true one is lower (chance 0.5)."""
  import jax
  import jax.numpy as jnp
  rows = []
  for wd in workdirs:
    run = app.restore_run(wd)
    task, model = run.task, run.task.model
    data = load_all(load_source(run.config.data, run.config.data.eval_split), limit=4 * num)
    keep = [i for i, c in enumerate(data["caption"]) if twin(str(c), "relation")][:num]
    captions = [str(data["caption"][i]) for i in keep]
    z0 = model.encode_images(run.model_state, data["image"][keep], key=jax.random.PRNGKey(0))
    net = model.denoise_fn(run.params)

    def losses(texts, level, key):
      tok = task.tokenizer(texts)
      cond = model.condition(run.params, {k: jnp.asarray(tok[k]) for k in task.empty})
      eps = jax.random.normal(key, z0.shape)
      if model.is_flow:
        t = jnp.full((len(texts),), level, jnp.float32)
        out, target = net((1 - level) * z0 + level * eps, t, cond), eps - z0
      else:
        step = int(level * (task.schedule.num_timesteps - 1))
        abar = task.schedule.abar[step]
        z_t = jnp.sqrt(abar) * z0 + jnp.sqrt(1 - abar) * eps
        out = net(z_t, jnp.full((len(texts),), step), cond)
        target = eps if run.config.diffusion.prediction == "eps" else None
        if target is None:
          raise SystemExit(f"{wd}: --loss reads eps-prediction or flow runs.")
      return np.asarray(((out - target) ** 2).mean((1, 2, 3)))

    for level in levels:
      key = jax.random.PRNGKey(int(level * 1000))
      own = losses(captions, level, key)
      other = losses([twin(c, "relation") for c in captions], level, key)
      rows.append(dict(run=wd, objective="flow" if model.is_flow else "eps", noise_level=level,
                       loss_own=float(own.mean()), loss_twin=float(other.mean()),
                       own_lower=float(np.mean(own < other)), scenes=len(captions)))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clip", nargs="*", default=[], help="clip workdirs")
  p.add_argument("--t2i", nargs="*", default=[], help="text-to-image workdirs, evaluated")
  p.add_argument("--loss", nargs="*", default=[], help="text-to-image workdirs (loss test)")
  p.add_argument("--num", type=int, default=1000, help="held-out scenes for the text towers")
  a = p.parse_args()
  runtime.setup_logging()
  if a.clip:
    rows = text_rows(a.clip, a.num)
    for path in write("relations_text", rows, list(rows[0]), dict(num=a.num)):
      print(path)
  if a.t2i:
    rows = t2i_rows(a.t2i)
    for path in write("relations_t2i", rows, list(rows[0]), {}):
      print(path)
  if a.loss:
    rows = loss_rows(a.loss, min(a.num, 200))
    for path in write("relations_loss", rows, list(rows[0]), {}):
      print(path)


if __name__ == "__main__":
  main()
