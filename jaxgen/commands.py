"""The command wiring of `jaxgen sample|generate|eval`: for each task, its command-line options
and what they run (the pipelines' samplers and writers, the evaluators of jaxgen.eval) on a
restored run. The CLI looks a workdir's task up here, so `--help` on a workdir shows only the
options that apply to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import app, diffusion, runtime
from jaxgen import images as img
from jaxgen.argtypes import decoding_args, positive_int
from jaxgen.data import heldout_images, load_all, load_source
from jaxgen.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Commands:
  """A task's `sample` and `eval` commands: options (argparse) and the function that runs each
  on an `app.Run`. sample(run, args, outdir) -> written paths; evaluate(run, key, args) -> dict."""
  sample_args: Callable[[argparse.ArgumentParser], None]
  sample: Callable
  eval_args: Callable[[argparse.ArgumentParser], None]
  evaluate: Callable


def _out_path(args, default: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(args.out_file) if args.out_file else default


# -- autoencoders --------------------------------------------------------------------------------
def _vae_sample_args(p):
  p.add_argument("--num", type=positive_int, default=64, help="prior samples in the grid")
  p.add_argument("--pairs", type=positive_int, default=4,
                 help="held-out image pairs to interpolate between")
  p.add_argument("--steps", type=positive_int, default=10, help="points per interpolation")


def _vae_sample(run, args, outdir):
  from jaxgen.pipelines import autoencoder as pipe
  task = run.task
  scale = img.display_scale(run.config.data.image_size)
  ae = task.autoencoder_params(run.params)
  main = pathlib.Path(args.out_file) if args.out_file else None
  name = lambda default, suffix: (main.with_name(main.stem + suffix + ".png") if main
                                  else outdir / f"{default}.png")
  paths = []
  if run.config.model.kind == "vae":
    samples = pipe.sample_prior(task.model, ae, jax.random.PRNGKey(args.seed), args.num)
    paths.append(img.save_png(img.grid(samples, scale=scale), main or name("prior_samples", "")))
  x = heldout_images(run.config.data, max(16, 2 * args.pairs))
  paths.append(img.save_png(img.rows(x[:16], pipe.reconstruct(task.model, ae, x[:16]),
                                     scale=scale), name("reconstructions", "_reconstructions")))
  strips = [pipe.interpolation_strip(task.model, ae, x[2 * i], x[2 * i + 1], args.steps)
            for i in range(args.pairs)]
  paths.append(img.save_png(np.concatenate(strips, axis=0),
                            name("interpolations", "_interpolations")))
  return paths


def _limit_arg(p):
  p.add_argument("--limit", type=positive_int, default=None,
                 help="evaluate on the first N held-out images only")


def evaluate_autoencoder(task, params, model_state, key, limit: int | None = None) -> dict:
  """Held-out PSNR, SSIM, reconstruction loss, KL (and NLL / negative ELBO), and the latent
  scale measured exactly on the held-out images beside the running one."""
  from jaxgen.eval.autoencoder import reconstruction_metrics
  from jaxgen.pipelines import autoencoder as pipe
  d, m = task.config.data, task.config.model
  images = heldout_images(d, limit)
  ae = task.autoencoder_params(params)

  def predict(x, k):
    rec, kl, _ = task.terms(params, x, k)
    return dict(rec=rec, kl=kl, recon=pipe.reconstruct(task.model, ae, x))

  out = reconstruction_metrics(predict, images, d.batch_size, key,
                               likelihood=m.rec_loss == "likelihood", variational=m.kind == "vae")
  held = pipe.latent_stats(task.model, ae, images)
  out["latent_scale_heldout"] = float(pipe.latent_scale({"latent_stats": held}))
  if isinstance(model_state, dict) and "latent_stats" in model_state:
    out["latent_scale"] = float(pipe.latent_scale(model_state))
  return out


def _vae_eval(run, key, args):
  return evaluate_autoencoder(run.task, run.params, run.model_state, key, args.limit)


# -- pixel diffusion -----------------------------------------------------------------------------
SAMPLER_CHOICES = tuple(dict.fromkeys(diffusion.SAMPLERS + diffusion.FLOW_SAMPLERS))


def check_sampler(model, sampler: str) -> None:
  valid = diffusion.FLOW_SAMPLERS if model.is_flow else diffusion.SAMPLERS
  if sampler not in valid:
    kind = "flow-matching" if model.is_flow else "diffusion"
    raise ConfigError(f"--sampler {sampler}: a {kind} model samples with {', '.join(valid)}")


def _ddpm_sample_args(p):
  p.add_argument("--num", type=positive_int, default=64, help="images to draw")
  p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                 help="default: the config's diffusion.sampler (flow models: euler or heun)")
  _karras_arg(p)
  p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the "
                 "config's diffusion.sample_steps; ddpm usually 1000)")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 deterministic)")
  p.add_argument("--label", type=int, default=None,
                 help="class to draw (class-conditional models); default: every class")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale (default: the config's)")
  p.add_argument("--trajectory", action="store_true",
                 help="also write the denoising trajectory of the first images")


def _karras_arg(p):
  p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                 help=f"Karras sigmas for the {' and '.join(diffusion.KARRAS_SAMPLERS)} samplers "
                      f"(default: the config's diffusion.karras)")


def _scheduler_flags(model, args):
  """The run's model with the scheduler settings given on the command line."""
  if args.karras is None:
    return model
  return dataclasses.replace(model, karras=args.karras)


def _ddpm_sample(run, args, outdir):
  from jaxgen.pipelines import diffusion as pipe
  model, d = _scheduler_flags(run.task.model, args), run.config.diffusion
  sampler = args.sampler or d.sampler
  check_sampler(model, sampler)
  steps = args.steps or (d.num_timesteps if sampler == "ddpm" else d.sample_steps)
  labels, guidance = None, None
  if model.num_classes:
    labels = (jnp.full((args.num,), args.label, jnp.int32) if args.label is not None
              else pipe.grid_labels(model, args.num))
    guidance = jnp.float32(d.guidance_scale if args.guidance is None else args.guidance)
  elif args.label is not None or args.guidance is not None:
    raise ConfigError("This model is unconditional (model.num_classes=0): --label and "
                      "--guidance do not apply.")
  t0 = time.perf_counter()
  out = pipe.generate(model, run.params, jax.random.PRNGKey(args.seed), num=args.num,
                      labels=labels, guidance_scale=guidance, sampler=sampler, num_steps=steps,
                      eta=jnp.float32(args.eta), return_trajectory=args.trajectory)
  x = jax.block_until_ready(out[0] if args.trajectory else out)
  log.info("%d images, %s %d steps: %.1f s (compile included)", args.num, sampler, steps,
           time.perf_counter() - t0)
  scale = img.display_scale(model.image_shape[0])
  ncols = model.num_classes if (model.num_classes and args.label is None) else None
  path = _out_path(args, outdir / f"samples_{sampler}.png")
  paths = [img.save_png(img.grid(x, ncols=ncols, scale=scale), path)]
  if args.trajectory:
    traj = out[1]
    picks = np.linspace(0, traj.shape[0] - 1, 10).round().astype(int)
    rows = [img.from_signed(traj[picks, i]) for i in range(min(4, args.num))]
    paths.append(img.save_png(img.rows(*rows, scale=scale),
                              path.with_name(path.stem + "_trajectory.png")))
  return paths


def _ddpm_eval_args(p):
  p.add_argument("--num", type=positive_int, default=1000, help="samples to score")
  p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None)
  p.add_argument("--steps", type=positive_int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--batch", type=positive_int, default=250, help="images per sampler call")
  p.add_argument("--feature-net", dest="feature_net", default=None,
                 help="classifier workdir for the features (default: train/cache one)")
  p.add_argument("--inception", default=None,
                 help="pt_inception-2015-12-05 weights file: also report standard FID")
  p.add_argument("--baselines", action="store_true",
                 help="also score held-out images the feature network never saw, training "
                      "images (which it saw) and uniform noise")
  p.add_argument("--variations", type=int, default=250, metavar="N",
                 help="runs conditioned on image embeddings: also score variations of N held-out "
                      "images (0: off)")
  p.add_argument("--per-source", dest="per_source", type=positive_int, default=4,
                 help="--variations: variations per held-out image")


def evaluate_variations(task, params, model_state, key, net, *, sources=250, per_source=4,
                        sampler, steps, guidance, batch=250) -> dict:
  """How faithful the variations of `sources` held-out images are (jaxgen.eval.variations), read
  by the metric's classifier `net` (not the conditioning tower): class agreement against
  chance, feature similarity against random pairs; and the classifier's accuracy on the sources
  themselves (its ceiling)."""
  from jaxgen.eval.variations import faithfulness
  from jaxgen.pipelines import diffusion as pipe
  data = load_all(load_source(task.config.data, task.config.data.eval_split), limit=sources)
  if "label" not in data:
    raise ConfigError("--variations: the held-out split has no labels to compare classes with.")
  chunk = max(1, batch // per_source)
  varied = []
  for i, lo in enumerate(range(0, len(data["image"]), chunk)):
    x = pipe.vary(task.model, params, model_state, jax.random.fold_in(key, i),
                  data["image"][lo:lo + chunk], num=per_source, guidance_scale=guidance,
                  sampler=sampler, num_steps=steps)
    varied.append(img.to_uint8(x.reshape(-1, *x.shape[2:])))
  varied = np.concatenate(varied)
  src_f, src_logits = net(data["image"])
  var_f, var_logits = net(varied)
  n = len(data["image"])
  out = faithfulness(src_f, data["label"], var_f.reshape(n, per_source, -1),
                     var_logits.reshape(n, per_source, -1))
  out["source_accuracy"] = float(np.mean(np.argmax(src_logits, -1) == data["label"]))
  out["guidance_scale"] = guidance
  return out


def evaluate_diffusion(task, params, key, *, num=1000, sampler=None, steps=None, guidance=None,
                       batch=250, feature_net=None, inception=None, baselines=False,
                       progress=True, model_state=None, variations=0, per_source=4) -> dict:
  """Frechet distance, precision/recall, density/coverage (and class accuracy) of `num`
  samples against held-out images, in the offline feature network's space; for a model
  conditioned on image embeddings, the samples are unconditional (zero embedding) and
  `variations` > 0 held-out images also get `per_source` variations each, scored by
  evaluate_variations."""
  from jaxgen.eval import quality
  from jaxgen.pipelines import diffusion as pipe
  d = task.config.diffusion
  sampler = sampler or d.sampler
  check_sampler(task.model, sampler)
  steps = steps or (d.num_timesteps if sampler == "ddpm" else d.sample_steps)
  guidance = d.guidance_scale if guidance is None else guidance
  net = app.load_feature_net(task.config.data, feature_net, progress=progress)
  reference = heldout_images(task.config.data, num)
  t0 = time.perf_counter()
  samples, labels = pipe.draw(task.model, params, key, num, sampler=sampler, steps=steps,
                              guidance=guidance, batch=batch)
  seconds = time.perf_counter() - t0
  out = dict(sampler=sampler, steps=steps, sampling_seconds=seconds,
             **quality.quality(samples, reference, net, labels=labels))
  if labels is not None:
    out["guidance_scale"] = guidance
  if inception:
    from jaxgen.eval.fid import InceptionFeatures, feature_stats, frechet_distance
    inc = InceptionFeatures.from_file(inception)
    real_f = img.map_batches(inc, reference, 100)
    fake_f = img.map_batches(inc, samples, 100)
    out["inception_fid"] = frechet_distance(*feature_stats(real_f), *feature_stats(fake_f))
  if baselines:
    out["baselines"] = quality.baselines(task.config.data, net, num)
  if getattr(task.model, "embedder", None) is not None and variations:
    out["variations"] = evaluate_variations(
        task, params, model_state, jax.random.fold_in(key, 1), net, sources=variations,
        per_source=per_source, sampler=sampler, steps=steps, guidance=guidance, batch=batch)
  return out


def _ddpm_eval(run, key, args):
  return evaluate_diffusion(run.task, run.params, key, num=args.num, sampler=args.sampler,
                            steps=args.steps, guidance=args.guidance, batch=args.batch,
                            feature_net=args.feature_net, inception=args.inception,
                            baselines=args.baselines, model_state=run.model_state,
                            variations=args.variations, per_source=args.per_source)


# -- latent text to image ------------------------------------------------------------------------
def _ldm_sample_args(p):
  p.add_argument("--prompt", action="append", default=None,
                 help="a prompt (repeat for several); default: held-out captions of a trained "
                      "run (an imported run needs --prompt)")
  p.add_argument("--negative", default=None, help="negative prompt (default: empty)")
  p.add_argument("--num", type=positive_int, default=4, help="images per prompt")
  p.add_argument("--steps", type=positive_int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                 help="default: the config's diffusion.sampler (an imported run: the one its "
                      "scheduler config names)")
  _karras_arg(p)
  p.add_argument("--spacing", choices=diffusion.SPACINGS, default=None,
                 help="timestep spacing (default: the config's ldm.timestep_spacing)")
  p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                 help="LoRA weights (.safetensors: diffusers/PEFT or kohya layout) merged into "
                      "the U-Net and text encoder with SCALE (default 1); repeat for several")
  p.add_argument("--height", type=positive_int, default=None,
                 help="image height in pixels (default: the trained size)")
  p.add_argument("--width", type=positive_int, default=None,
                 help="image width in pixels (default: the trained size)")
  p.add_argument("--truncate", action="store_true",
                 help="cut prompts longer than the text encoder's context (with a warning) "
                      "instead of stopping")


def parse_lora(spec: str) -> tuple[str, float]:
  """'FILE[:SCALE]' -> (FILE, SCALE)."""
  path, sep, scale = spec.rpartition(":")
  if not sep or not path or "/" in scale or scale.endswith(".safetensors"):
    return spec, 1.0
  try:
    return path, float(scale)
  except ValueError:
    raise ConfigError(f"--lora {spec!r}: SCALE after the last ':' must be a number") from None


def with_loras(params, specs):
  """params with the LoRA files `specs` ('FILE[:SCALE]') merged in."""
  if not specs:
    return params
  from jaxgen import lora
  from jaxgen.convert.lora import read_lora
  files = [parse_lora(s) for s in specs]
  adapters = [read_lora(path, params) for path, _ in files]
  for (path, scale), a in zip(files, adapters):
    log.info("LoRA %s: %d layers, scale %g", path, len(a), scale)
  return jax.jit(lora.merge)(params, adapters, [s for _, s in files])


def _ldm_sample(run, args, outdir):
  from jaxgen.pipelines import text_to_image as t2i
  d = run.config.diffusion
  if not args.prompt and not run.config.ldm.autoencoder:
    # Only imported runs (jaxgen import) have no autoencoder run: their data section is a
    # placeholder, not data to draw held-out captions from.
    raise ConfigError("This run holds imported weights and no data set: give --prompt.")
  prompts = args.prompt or run.task.prompts(run.config.data.eval_split, 4)
  check_sampler(run.task.model, args.sampler or d.sampler)
  params = with_loras(run.params, args.lora)
  t0 = time.perf_counter()
  x = t2i.text_to_image(_scheduler_flags(run.task.model, args), params, run.model_state,
                        prompts,
                        jax.random.PRNGKey(args.seed), steps=args.steps or d.sample_steps,
                        guidance_scale=d.guidance_scale if args.guidance is None
                        else args.guidance, negative_prompt=args.negative,
                        sampler=args.sampler or d.sampler, num_per_prompt=args.num,
                        truncate=args.truncate, height=args.height, width=args.width,
                        spacing=args.spacing)
  x = jax.block_until_ready(x)
  log.info("%d images in %.1f s (compile included)", len(x), time.perf_counter() - t0)
  for i, p in enumerate(prompts):
    log.info("column %d: %s", i, p)
  path = _out_path(args, outdir / "text_to_image.png")
  return [img.save_png(img.labelled_grid(x, prompts, scale=img.display_scale(min(x.shape[1:3]))),
                       path)]


def _ldm_eval_args(p):
  p.add_argument("--num", type=positive_int, default=200, help="held-out prompts to draw")
  p.add_argument("--steps", type=positive_int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--judge", default=None,
                 help="clip workdir that scores the images (default: ldm.judge, else "
                      "model.text.init)")


def evaluate_text_to_image(task, params, model_state, key, *, num=200, steps=None,
                           guidance=None, judge=None) -> dict:
  """CLIP score and zero-shot prompt-following of images drawn for held-out prompts, beside
  the same measures for the real held-out images and for unconditional samples."""
  from jaxgen.pipelines import text_to_image as t2i
  c = task.config
  judge = judge or c.ldm.judge or c.model.text.init
  if not judge:
    raise ConfigError("Scoring needs a trained clip run: pass --judge WORKDIR or set ldm.judge.")
  from jaxgen.pipelines import clip as clip_pipe
  clip_pipe.load_dual_encoder(str(judge), "--judge")  # a wrong judge stops before sampling
  d = c.diffusion
  data, prompts = prompt_data(c.data, num)
  g = d.guidance_scale if guidance is None else guidance
  steps = steps or d.sample_steps

  def draw(prompt_list, k):
    out = []
    for i in range(0, len(prompt_list), 50):
      out.append(np.asarray(t2i.text_to_image(
          task.model, params, model_state, prompt_list[i:i + 50], jax.random.fold_in(k, i),
          steps=steps, guidance_scale=g, sampler=d.sampler)))
    return np.concatenate(out)

  t0 = time.perf_counter()
  generated = draw(prompts, key)
  seconds = time.perf_counter() - t0
  # Unconditional: the empty prompt both as condition and as guidance reference.
  unconditional = draw([""] * len(prompts), jax.random.fold_in(key, 1))
  out = dict(num_prompts=len(prompts), steps=steps, guidance_scale=g, sampling_seconds=seconds)
  out.update(judge_prompt_following(c.data, judge, prompts, data, generated=generated,
                                    real=data["image"], unconditional=unconditional))
  return out


def prompt_data(data_cfg, num: int) -> tuple[dict, list[str]]:
  """The held-out examples whose captions are the prompts of a text-to-image evaluation: the
  first `num`; with data.holdout_combinations, the first num // 2 scenes that hold a combination
  left out of training and the first ones that do not."""
  from jaxgen.data.captions import captions_of
  src = load_source(data_cfg, data_cfg.eval_split)
  if data_cfg.holdout_combinations:
    from jaxgen.data.shapes import has_combination
    everything = load_all(src)
    hit = has_combination(everything, data_cfg.holdout_combinations)
    idx = np.sort(np.concatenate([np.flatnonzero(hit)[:num // 2],
                                  np.flatnonzero(~hit)[:num - min(num // 2, int(hit.sum()))]]))
    data = {k: v[idx] for k, v in everything.items()}
  else:
    data = load_all(src, limit=num)
  return data, [str(c) for c in captions_of(data, src.class_names, "a photo of a {}")]


def judge_prompt_following(data_cfg, judge: str, prompts, data, **named_images) -> dict:
  """For each named set of images drawn for `prompts` (the held-out `data`'s captions): the
  CLIP judge's score and zero-shot prompt-following, and on the shapes data the pixel judge;
  with data.holdout_combinations, the pixel judge and CLIP score also for the prompts holding a
  combination left out of training ("held_out") and for the others ("seen")."""
  from jaxgen.eval.pixel_judge import pixel_judge
  from jaxgen.eval.prompt_following import prompt_following
  from jaxgen.pipelines import clip as clip_pipe
  jm, jp, js = clip_pipe.load_dual_encoder(str(judge), "--judge")
  shapes_data = data_cfg.source == "embedded" and data_cfg.name == "shapes"
  class_names = None
  if "label" in data and not shapes_data:
    class_names = load_source(data_cfg, data_cfg.train_split).class_names
  embed_images = lambda x: clip_pipe.embed_images(jm, jp, js, x)
  embed_texts = lambda t: clip_pipe.embed_texts(jm, jp, t)
  out = {}
  for name, images in named_images.items():
    score = clip_pipe.clip_score(jm, jp, js, images, prompts)["clip_score"]
    out[name] = dict(clip_score=score, **prompt_following(embed_images, embed_texts, images,
                                                          data, class_names))
    if shapes_data:  # read from the pixels against the prompts, beside the CLIP judge
      out[name]["pixels"] = pixel_judge(images, prompts)
    if data_cfg.holdout_combinations:
      from jaxgen.data.shapes import has_combination
      hit = has_combination(data, data_cfg.holdout_combinations)
      for part, mask in (("held_out", hit), ("seen", ~hit)):
        if mask.any():
          sub = [p for p, m in zip(prompts, mask) if m]
          out[name][part] = dict(
              num=int(mask.sum()), pixels=pixel_judge(images[mask], sub),
              clip_score=clip_pipe.clip_score(jm, jp, js, images[mask], sub)["clip_score"])
  return out


def _ldm_eval(run, key, args):
  return evaluate_text_to_image(run.task, run.params, run.model_state, key, num=args.num,
                                steps=args.steps, guidance=args.guidance, judge=args.judge)


# -- contrastive ---------------------------------------------------------------------------------
def _clip_sample_args(p):
  p.add_argument("--num", type=positive_int, default=8, help="held-out images to caption")


def _clip_sample(run, args, outdir):
  """Retrieves the best training caption for held-out images; writes the images as a strip and
  prints image -> caption lines."""
  from jaxgen.pipelines import clip as pipe
  d = run.config.data
  data = load_all(load_source(d, d.eval_split), limit=args.num)
  gallery = sorted(set(run.task.train_captions().tolist()))
  best = pipe.nearest_captions(run.task.model, run.params, run.model_state, data["image"],
                               gallery)
  return _show_captions(data, best, _out_path(args, outdir / "retrieval_images.png"))


def _show_captions(data, captions, path) -> list[pathlib.Path]:
  """Prints image -> caption lines (with the true caption when the data has one) and writes
  the images as a strip to `path`."""
  for i, caption in enumerate(captions):
    truth = data["caption"][i] if "caption" in data else ""
    print(f"image {i}: {caption!r}" + (f"   (true: {str(truth)!r})" if truth else ""))
  images = data["image"]
  return [img.save_png(img.grid(images, ncols=len(images),
                                scale=img.display_scale(images.shape[1])), path)]


def _clip_eval_args(p):
  p.add_argument("--limit", type=positive_int, default=None, help="held-out pairs to use")


def evaluate_dual_encoder(task, params, model_state, limit=None) -> dict:
  """Zero-shot accuracy (prompt ensembles) and image<->text retrieval on held-out pairs."""
  import math

  from jaxgen.data import shapes
  from jaxgen.data.captions import captions_of
  from jaxgen.eval.retrieval import dual_encoder_metrics
  from jaxgen.pipelines import clip as pipe
  d, m = task.config.data, task.config.model
  data = load_all(load_source(d, d.eval_split), limit=limit)
  zero_shot = {}
  if d.source == "embedded" and d.name == "shapes":
    for attr, (prompts, names) in shapes.attribute_prompts().items():
      zero_shot[attr] = (prompts, np.array([list(names).index(v) for v in data[attr]]))
  else:
    names = task.train_source().class_names
    if names:
      templates = [m.caption_template, "a {}", "a picture of a {}"]
      zero_shot["class"] = ([[t.format(n) for t in templates] for n in names], data["label"])
  captions = None
  if "caption" in data:  # retrieval needs captions that tell the images apart
    captions = captions_of(data, None)
  embed_images = lambda x: pipe.embed_images(task.model, params, model_state, x)
  embed_texts = lambda t: pipe.embed_texts(task.model, params, t)
  out = dual_encoder_metrics(embed_images, embed_texts, data["image"], captions, zero_shot)
  if d.holdout_combinations:  # the held-out split's scenes with a combination never trained on
    hit = shapes.has_combination(data, d.holdout_combinations)
    for part, mask in (("held_out", hit), ("seen", ~hit)):
      if mask.sum() > 1:
        out[part] = dict(num=int(mask.sum()), **dual_encoder_metrics(
            embed_images, embed_texts, data["image"][mask],
            None if captions is None else captions[mask],
            {k: (p, y[mask]) for k, (p, y) in zero_shot.items()}))
  out["temperature"] = float(math.exp(-min(float(params["params"]["logit_scale"]),
                                           math.log(100.0))))
  return out


def _clip_eval(run, key, args):
  return evaluate_dual_encoder(run.task, run.params, run.model_state, args.limit)


def _simclr_sample_args(p):
  p.add_argument("--num", type=positive_int, default=12, help="images whose views to show")


def _simclr_sample(run, args, outdir):
  from jaxgen.pipelines import contrastive as pipe
  d = run.config.data
  strip = pipe.view_strip(jax.random.PRNGKey(args.seed), heldout_images(d, args.num),
                          run.config.model, d.image_size)
  return [img.save_png(strip, _out_path(args, outdir / "augmented_views.png"))]


def _simclr_eval_args(p):
  p.add_argument("--limit", type=positive_int, default=None, help="training images for the probes")
  p.add_argument("--baselines", action="store_true",
                 help="also probe raw pixels and a randomly initialised encoder")


def evaluate_representations(task, params, model_state, limit=None, baselines=False) -> dict:
  """Linear probe and k-NN accuracy on the frozen encoder's features of held-out labels (and,
  with baselines, on raw pixels and on a randomly initialised encoder)."""
  from jaxgen.eval.probe import probe_metrics
  from jaxgen.pipelines.contrastive import features
  d = task.config.data
  train = load_all(load_source(d, d.train_split), limit=limit)
  test = load_all(load_source(d, d.eval_split))
  k = len(load_source(d, d.train_split).class_names or ()) or int(train["label"].max()) + 1
  probes = lambda ftr, fte: probe_metrics(ftr, train["label"], fte, test["label"], k)
  feats = lambda p, s, x: features(task.module, p, s, x)
  out = probes(feats(params, model_state, train["image"]),
               feats(params, model_state, test["image"]))
  if baselines:
    flat = lambda x: np.asarray(img.to_unit(x)).reshape(len(x), -1)
    out["raw_pixels"] = probes(flat(train["image"]), flat(test["image"]))
    rand, rand_state = runtime.run_once(task.init, jax.random.PRNGKey(12345),
                                        {"image": train["image"][:2]})
    out["random_encoder"] = probes(feats(rand, rand_state, train["image"]),
                                   feats(rand, rand_state, test["image"]))
  out.update(num_train=len(train["image"]), num_test=len(test["image"]))
  return out


def _simclr_eval(run, key, args):
  return evaluate_representations(run.task, run.params, run.model_state, args.limit,
                                  args.baselines)


# -- captioner -----------------------------------------------------------------------------------
def decoding_options(args) -> dict:
  if args.beam and args.temperature:
    raise ConfigError("--beam and --temperature exclude each other: beam search is "
                      "deterministic")
  return dict(beam=args.beam or 0, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, length_penalty=args.length_penalty)


def _captioner_sample_args(p):
  p.add_argument("--num", type=positive_int, default=8, help="held-out images to caption")
  decoding_args(p)


def _captioner_sample(run, args, outdir):
  """Captions held-out images; prints image -> caption (and the true one) and writes the
  images as a strip."""
  from jaxgen.pipelines import captioning as cp
  d = run.config.data
  data = load_all(load_source(d, d.eval_split), limit=args.num)
  captions = cp.caption(run.task.model, run.params, run.model_state, data["image"],
                        jax.random.PRNGKey(args.seed), **decoding_options(args))
  return _show_captions(data, captions, _out_path(args, outdir / "captioned_images.png"))


def _captioner_eval_args(p):
  p.add_argument("--limit", type=positive_int, default=None, help="held-out images to use")
  p.add_argument("--beam", type=positive_int, default=None,
                 help="decode with beam search (default: greedy)")
  p.add_argument("--baselines", action="store_true",
                 help="also score the most frequent training caption and this decoder on a "
                      "randomly initialised encoder")
  p.add_argument("--retrieval", default=None, metavar="CLIP_WORKDIR",
                 help="also score retrieval captioning: the training caption nearest each image "
                      "in this clip run's shared space")
  p.add_argument("--round-trip", default=None, metavar="LDM_WORKDIR",
                 help="also caption this text-to-image run's pictures of held-out prompts and "
                      "score the captions against the prompts")
  p.add_argument("--round-trip-num", type=positive_int, default=100,
                 help="prompts for the round trip")


def _caption_scorer(task, data, references):
  """captions -> BLEU-4, CIDEr-D, exact match (and, on the shapes data, the attributes read
  back from each caption against the scene's truth). On the shapes data a two-object scene has
  two references, one told from each object, and the attributes are compared in the canonical
  order (relation 'left of' or 'above'), so that either telling counts as right."""
  from jaxgen.data import shapes
  from jaxgen.eval.captions import attribute_accuracy, caption_metrics
  d = task.config.data
  on_shapes = d.source == "embedded" and d.name == "shapes"

  if on_shapes:  # a two-object scene has two true captions, one from each object
    references = [shapes.equivalent_captions(r) for refs in references for r in refs[:1]]
    truth = [shapes.canonical({k: str(data[k][i]) for k in shapes.ATTRIBUTES})
             for i in range(len(references))]
    truth = {k: np.array([t[k] for t in truth]) for k in shapes.ATTRIBUTES}

  def score(captions):
    out = caption_metrics(captions, references)
    if on_shapes:
      out["attributes"] = attribute_accuracy(
          [shapes.canonical(shapes.parse_caption(c)) for c in captions], truth)
    out["examples"] = list(captions[:3])
    return out
  return score


def evaluate_captioner(task, params, model_state, key, *, limit=None, beam=None,
                       baselines=False, retrieval=None, round_trip=None,
                       round_trip_num=100) -> dict:
  """BLEU-4 and CIDEr-D of the captions of held-out images against their true captions, and on
  the shapes data the accuracy of each attribute read back from the captions; beside them the
  baselines asked for (most frequent training caption, the decoder reading a random encoder,
  retrieval captioning with a clip run) and the round trip through a text-to-image run."""
  from collections import Counter

  from jaxgen.data.captions import captions_of
  from jaxgen.pipelines import captioning as cp
  d, m = task.config.data, task.config.model
  data = load_all(load_source(d, d.eval_split), limit=limit)
  names = None if "caption" in data else task.train_source().class_names
  truth = [str(c) for c in captions_of(data, names, m.caption_template)]
  score = _caption_scorer(task, data, [[t] for t in truth])
  caption = lambda p, s, x: cp.caption(task.model, p, s, x, beam=beam or 0)
  t0 = time.perf_counter()
  captions = caption(params, model_state, data["image"])
  out = dict(num_images=len(truth), decoding=f"beam {beam}" if beam else "greedy",
             seconds=time.perf_counter() - t0, **score(captions))
  train_captions = None
  if baselines or retrieval:
    train_captions = [str(c) for c in task.train_captions()]
  if baselines:
    common = Counter(train_captions).most_common(1)[0][0]
    out["most_frequent_caption"] = score([common] * len(truth))
    example = {k: v for k, v in task.example_batch().items() if v.dtype.kind not in "USO"}
    fresh, fresh_state = runtime.run_once(task.init, jax.random.PRNGKey(12345), example)
    swap = lambda tree, new: {**tree, "image_encoder": new["image_encoder"]} \
        if "image_encoder" in new else tree
    rand_params = {"params": swap(params["params"], fresh["params"])}
    rand_state = {col: swap(model_state.get(col, {}), tree) for col, tree in fresh_state.items()}
    out["random_encoder"] = score(caption(rand_params, rand_state, data["image"]))
  if retrieval:
    from jaxgen.pipelines import clip as clip_pipe
    jm, jp, js = clip_pipe.load_dual_encoder(str(retrieval), "--retrieval")
    bank = sorted(set(train_captions))
    out["retrieval"] = dict(workdir=str(retrieval), bank_size=len(bank), **score(
        clip_pipe.nearest_captions(jm, jp, js, data["image"], bank)))
  if round_trip:
    out["round_trip"] = _round_trip(task, params, model_state, key, round_trip,
                                    data, truth, round_trip_num, beam)
  return out


def _round_trip(task, params, model_state, key, workdir, data, prompts, num, beam):
  """Captions of a text-to-image run's pictures of held-out prompts, scored against the
  prompts (the attributes against the prompts' scenes)."""
  from jaxgen.pipelines import captioning as cp
  from jaxgen.pipelines import text_to_image as t2i
  run = app.restore_run(workdir, with_state=False)
  if run.config.task != "ldm":
    raise ConfigError(f"--round-trip: {workdir} holds a {run.config.task} run, not an ldm run")
  prompts = prompts[:num]
  d = run.config.diffusion
  pictures = np.concatenate([np.asarray(t2i.text_to_image(
      run.task.model, run.params, run.model_state, prompts[i:i + 50], jax.random.fold_in(key, i),
      steps=d.sample_steps, guidance_scale=d.guidance_scale, sampler=d.sampler))
      for i in range(0, len(prompts), 50)])
  size = task.model.image_shape
  if pictures.shape[1:] != size:
    pictures = np.asarray(jax.image.resize(pictures, (len(pictures), *size), "bicubic"))
  subset = {k: v[:num] for k, v in data.items()}
  score = _caption_scorer(task, subset, [[p] for p in prompts])
  captions = cp.caption(task.model, params, model_state, np.clip(pictures, 0, 1),
                        beam=beam or 0)
  return dict(workdir=str(workdir), num_prompts=len(prompts), **score(captions))


def _captioner_eval(run, key, args):
  return evaluate_captioner(run.task, run.params, run.model_state, key, limit=args.limit,
                            beam=args.beam, baselines=args.baselines, retrieval=args.retrieval,
                            round_trip=args.round_trip, round_trip_num=args.round_trip_num)


# -- classifier ----------------------------------------------------------------------------------
def _no_sample_args(p):
  pass


def _no_sample(run, args, outdir):
  raise ConfigError(f"A {run.config.task} run draws no pictures: use jaxgen eval.")


def evaluate_classifier(task, params, model_state, limit=None) -> dict:
  """Held-out accuracy."""
  from jaxgen.eval.quality import classify
  d = task.config.data
  data = load_all(load_source(d, d.eval_split), limit=limit)
  if "label" not in data:
    raise DataError("The eval split has no labels.")
  variables = {**params, **model_state}
  fn = lambda b, k: {"correct": classify(task.module, variables, b["image"])[1].argmax(-1)
                     == b["label"]}
  r = img.map_batches(fn, {"image": data["image"], "label": data["label"]},
                      min(d.batch_size, len(data["image"])))
  return dict(num_images=int(len(r["correct"])), accuracy=float(r["correct"].mean()))


def _classifier_eval(run, key, args):
  return evaluate_classifier(run.task, run.params, run.model_state, args.limit)


# -- a prior over embeddings (RCG) + its decoder ---------------------------------------------------
def _prior_sample_args(p):
  p.add_argument("--num", type=positive_int, default=64,
                 help="images (with --prompt: per prompt)")
  p.add_argument("--guidance", type=float, default=None,
                 help="the decoder's classifier-free guidance (default: prior.decoder_guidance)")
  p.add_argument("--steps", type=positive_int, default=None, help="the prior's sampling steps")
  p.add_argument("--decoder-steps", dest="decoder_steps", type=positive_int, default=None)


def _prior_sample_cli_args(p):
  _prior_sample_args(p)
  p.add_argument("--prompt", action="append", default=None,
                 help="text priors (unCLIP): a prompt (repeat for several)")
  p.add_argument("--prior-guidance", dest="prior_guidance", type=float, default=None,
                 help="text priors: the prior's guidance (default prior.guidance)")


def _prior_sample(run, args, outdir):
  prompts = getattr(args, "prompt", None)
  key = jax.random.PRNGKey(args.seed)
  options = dict(steps=args.steps, guidance=args.guidance, decoder_steps=args.decoder_steps)
  path = _out_path(args, outdir / f"samples_step{run.step}.png")
  if prompts:
    each = [q for q in prompts for _ in range(args.num)]
    x = run.task.generate(run.params, run.model_state, key, len(each), prompts=each,
                          prior_guidance=args.prior_guidance, **options)
    picture = img.labelled_grid(x, prompts, scale=img.display_scale(x.shape[1]))
  else:
    x = run.task.generate(run.params, run.model_state, key, args.num, **options)
    picture = img.grid(x, scale=img.display_scale(x.shape[1]))
  return [img.save_png(picture, path)]


def _prior_eval_args(p):
  _prior_sample_args(p)
  p.set_defaults(num=1000)
  p.add_argument("--batch", type=positive_int, default=250, help="images per sampler call")
  p.add_argument("--feature-net", dest="feature_net", default=None,
                 help="classifier workdir for the features (default: train/cache one)")
  p.add_argument("--prior-guidance", dest="prior_guidance", type=float, default=None,
                 help="text priors: the prior's guidance (default prior.guidance)")
  p.add_argument("--judge", default=None,
                 help="text priors: the clip run that scores prompt-following (default "
                      "prior.text)")


def evaluate_prior(task, params, model_state, key, *, num=1000, steps=None, guidance=None,
                   decoder_steps=None, batch=250, feature_net=None, progress=True,
                   prior_guidance=None, judge=None) -> dict:
  """An unconditional prior (RCG): Frechet distance, precision/recall, density/coverage of
  `num` images (prior samples decoded by prior.decoder) against held-out images, in the feature
  network's space. A text prior (unCLIP): prompt-following of images drawn for `num` held-out
  captions, beside the real images, unconditional samples (as `jaxgen eval` on an ldm run) and
  the decoder's pictures of the real images' own embeddings (what a perfect prior would give)."""
  if task.text_dim:
    return evaluate_text_prior(task, params, model_state, key, num=num, steps=steps,
                               guidance=guidance, decoder_steps=decoder_steps, batch=batch,
                               prior_guidance=prior_guidance, judge=judge)
  from jaxgen.eval import quality
  net = app.load_feature_net(task.config.data, feature_net, progress=progress)
  reference = heldout_images(task.config.data, num)
  t0 = time.perf_counter()
  samples = img.to_uint8(task.generate(params, model_state, key, num, steps=steps,
                                       guidance=guidance, decoder_steps=decoder_steps,
                                       batch=batch))
  seconds = time.perf_counter() - t0
  p = task.config.prior
  return dict(decoder=p.decoder, decoder_guidance=p.decoder_guidance if guidance is None
              else guidance, sampling_seconds=seconds,
              **quality.quality(samples, reference, net))


def evaluate_text_prior(task, params, model_state, key, *, num=200, steps=None, guidance=None,
                        decoder_steps=None, batch=250, prior_guidance=None, judge=None) -> dict:
  c = task.config
  judge = judge or c.prior.text
  from jaxgen.pipelines import clip as clip_pipe
  clip_pipe.load_dual_encoder(str(judge), "--judge")  # a wrong judge stops before sampling
  data, prompts = prompt_data(c.data, num)
  options = dict(steps=steps, guidance=guidance, decoder_steps=decoder_steps, batch=batch)
  t0 = time.perf_counter()
  generated = img.to_uint8(task.generate(params, model_state, key, len(prompts), prompts=prompts,
                                         prior_guidance=prior_guidance, **options))
  seconds = time.perf_counter() - t0
  unconditional = img.to_uint8(task.generate(params, model_state, jax.random.fold_in(key, 1),
                                             len(prompts), **options))
  # The decoder alone, given the real images' own embeddings: what any prior could reach.
  from jaxgen.pipelines import diffusion as pixel
  dec_params, dec_state = task.decoder_weights()
  dec = task.decoder.config.diffusion
  p = c.prior
  decoded = np.concatenate([img.to_uint8(pixel.vary(
      task.decoder.model, dec_params, dec_state, jax.random.fold_in(key, 2 + i),
      data["image"][i:i + batch], num=1,
      guidance_scale=p.decoder_guidance if guidance is None else guidance,
      sampler=p.decoder_sampler or dec.sampler,
      num_steps=decoder_steps or p.decoder_steps or dec.sample_steps)[:, 0])
      for i in range(0, len(prompts), batch)])
  out = dict(num_prompts=len(prompts), sampling_seconds=seconds,
             prior_guidance=p.guidance if prior_guidance is None else prior_guidance,
             decoder_guidance=p.decoder_guidance if guidance is None else guidance)
  out.update(judge_prompt_following(c.data, judge, prompts, data, generated=generated,
                                    real=data["image"], unconditional=unconditional,
                                    decoded_image_embeddings=decoded))
  return out


def _prior_eval(run, key, args):
  return evaluate_prior(run.task, run.params, run.model_state, key, num=args.num,
                        steps=args.steps, guidance=args.guidance,
                        decoder_steps=args.decoder_steps, batch=args.batch,
                        feature_net=args.feature_net, prior_guidance=args.prior_guidance,
                        judge=args.judge)


COMMANDS = {
    "vae": Commands(_vae_sample_args, _vae_sample, _limit_arg, _vae_eval),
    "ddpm": Commands(_ddpm_sample_args, _ddpm_sample, _ddpm_eval_args, _ddpm_eval),
    "dit": Commands(_ddpm_sample_args, _ddpm_sample, _ddpm_eval_args, _ddpm_eval),
    "ldm": Commands(_ldm_sample_args, _ldm_sample, _ldm_eval_args, _ldm_eval),
    "clip": Commands(_clip_sample_args, _clip_sample, _clip_eval_args, _clip_eval),
    "simclr": Commands(_simclr_sample_args, _simclr_sample, _simclr_eval_args, _simclr_eval),
    "captioner": Commands(_captioner_sample_args, _captioner_sample, _captioner_eval_args,
                          _captioner_eval),
    "classifier": Commands(_no_sample_args, _no_sample, _limit_arg, _classifier_eval),
    "prior": Commands(_prior_sample_cli_args, _prior_sample, _prior_eval_args, _prior_eval),
}


def of(task: str) -> Commands:
  if task not in COMMANDS:
    raise ConfigError(f"jaxgen has no commands for task {task!r}.")
  return COMMANDS[task]
