"""jaxgen command line: train, sample, generate, eval and import. Thin: each command calls a
library function."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import sys

from jaxgen.errors import ConfigError, JaxgenError

log = logging.getLogger("jaxgen")

DESCRIPTION = """\
jaxgen: generative image models in JAX/Flax.

commands:
  train    train a config in a workdir (resumes from the workdir's latest checkpoint)
  sample   write pictures from a trained workdir (samples, reconstructions, interpolations)
  generate text to image with a latent diffusion workdir (sample with --prompt)
  eval     held-out metrics of a trained workdir, printed and written as JSON
  caption  describe your own pictures with a captioner workdir (or a clip run's retrieval)
  denoise  remove Gaussian noise from your own pictures with a pixel diffusion workdir
  vary     variations of your own pictures with an embedding-conditioned diffusion workdir
  import   turn a Stable Diffusion checkpoint (diffusers folder or file) into an ldm workdir
  verify   check a workdir's checkpoints against their checksums

Examples:
  jaxgen train --config configs/vae.py --workdir runs/vae
  jaxgen sample --workdir runs/ddpm_class --sampler ddim --steps 50 --label 7 --guidance 3
  jaxgen generate --workdir runs/ldm --prompt "a large red circle above a small blue square"
  jaxgen eval --workdir runs/ddpm_class --num 1000 --baselines
  jaxgen caption --workdir runs/captioner --image picture.png --beam 4
  jaxgen denoise --workdir runs/ddpm_class --image noisy.png --out clean.png
  jaxgen vary --workdir runs/vary --image picture.png --num 8 --guidance 3
  jaxgen import --diffusers ~/models/stable-diffusion-v1-5 --workdir runs/sd15

On a CPU, train, sample and generate run data parallel over two host devices (one per core);
train keeps one where each would get fewer than 4 examples or the model has more than 4M
parameters per example. JAXGEN_CPU_DEVICES=N picks another count (1: one device).

Run 'jaxgen COMMAND --help' for a command's options."""


# Tasks whose `sample` draws through the sampler core (jaxgen.diffusion.sample), which splits
# its batch over the devices of the mesh that `jaxgen sample` sets.
SAMPLER_TASKS = ("ddpm", "dit", "ldm", "prior")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates '--config.a.b=value' (or '--config.a.b value') overrides from other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"Override {arg} has no value.")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _workdir_task(argv: list[str]) -> str | None:
  """The task of the workdir named by --workdir in argv, if it names a readable jaxgen run."""
  for i, arg in enumerate(argv):
    value = (argv[i + 1] if arg == "--workdir" and i + 1 < len(argv)
             else arg.partition("=")[2] if arg.startswith("--workdir=") else None)
    if value:
      try:
        from jaxgen.weights import read_config
        return read_config(value)["task"]
      except JaxgenError:
        return None
  return None


def _task_help(command: str, task: str | None) -> str:
  """The options each task adds to `sample` or `eval`, for the command's --help: only the
  workdir's task's when --workdir names a run, else every task's."""
  from jaxgen import app, commands
  parts = []
  for name in [task] if task else app.task_names():
    p = argparse.ArgumentParser(prog=f"options for task '{name}'", add_help=False)
    getattr(commands.of(name), f"{command}_args")(p)
    if p._actions:
      parts.append(p.format_help())
    elif task:
      parts.append(f"options for task '{name}': none\n")
  head = (f"options of this workdir's task ({task}):" if task
          else "task options (chosen by the workdir's task; give --workdir to see only its own):")
  return head + "\n\n" + "\n".join(parts)


def _sample_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=None,
                 help="a folder, or a .png for the main picture (default WORKDIR/samples)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")


def build_parser(help_for: str | None = None, task: str | None = None
                 ) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxgen", description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")

  p = sub.add_parser(
      "train", help="train a config in a workdir",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Train CONFIG in WORKDIR. Running the same command again resumes from the "
                  "latest checkpoint in WORKDIR.",
      epilog="Override any config key with --config.KEY=VALUE, e.g. --config.optim.lr=1e-3 "
             "--config.train.num_steps=2000 --config.model.ch_mult=1,2,4.\n"
             "Writes WORKDIR/config.json, checkpoints/, metrics.jsonl, tb/ (TensorBoard) and "
             "samples/*.png.")
  p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                 help="config file, e.g. configs/vae.py or configs/vae.py:smoke")
  p.add_argument("--workdir", required=True, help="directory for checkpoints, logs, pictures")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first")

  p = sub.add_parser(
      "sample", help="write pictures from a trained workdir",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Write pictures from the latest checkpoint (EMA parameters) in WORKDIR: for "
                  "autoencoders prior samples, reconstructions and interpolations (linear and "
                  "slerp); for diffusion models a grid drawn with the chosen sampler.",
      epilog=_task_help("sample", task) if help_for == "sample" else None)
  _sample_options(p)

  p = sub.add_parser(
      "generate", help="text to image with a latent diffusion workdir",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Generate images from prompts with the latest checkpoint in WORKDIR (an ldm "
                  "run, trained or imported): one jitted call encodes the prompts, samples "
                  "latents with classifier-free guidance and decodes them.",
      epilog=_task_help("sample", "ldm") if help_for == "generate" else None)
  _sample_options(p)

  p = sub.add_parser(
      "eval", help="held-out metrics of a trained workdir",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Evaluate the latest checkpoint in WORKDIR against the config's eval split "
                  "(autoencoders: PSNR, SSIM, negative ELBO; diffusion: Frechet distance, "
                  "precision/recall and class accuracy in a classifier's feature space); print "
                  "the metrics as JSON and write WORKDIR/eval_stepN.json.",
      epilog=_task_help("eval", task) if help_for == "eval" else None)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  p.add_argument("--seed", type=int, default=0)

  p = sub.add_parser(
      "import", help="turn a Stable Diffusion checkpoint (diffusers folder or single "
                     ".safetensors file) into an ldm workdir",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert a Stable Diffusion 1.x/2.x or SDXL checkpoint saved in diffusers' "
                  "folder layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                  "scheduler/, SDXL's text_encoder_2/ and tokenizer_2/; safetensors files, no "
                  "torch needed), or as one .safetensors file in the "
                  "original LDM key layout (the variant is read from the tensors), into a "
                  "latent diffusion (ldm) WORKDIR that 'jaxgen generate', 'jaxgen eval' and "
                  "jaxgen.app.restore_run read like a trained run. The config reproduces the "
                  "checkpoint's architecture, noise schedule, prediction type and timestep "
                  "grid; the tokenizer is copied into WORKDIR/tokenizer.",
      epilog="Examples:\n  jaxgen import --diffusers ~/models/stable-diffusion-2-1 --workdir "
             "runs/sd21\n  jaxgen import --single-file v1-5-pruned-emaonly.safetensors "
             "--tokenizer ~/models/clip-tokenizer --workdir runs/sd15\n  jaxgen generate "
             "--workdir runs/sd21 --prompt \"a watercolour fox\" --steps 30 --guidance 7.5\n"
             "  jaxgen generate --workdir runs/sd21 --prompt \"a fox\" --lora fox.safetensors:0.8"
             "\nLoRA files are merged at generation time (--lora); configs/lora.py trains "
             "new ones on an imported run.\nWORKDIR must not exist or be empty.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--diffusers", metavar="PATH",
                   help="a local diffusers pipeline folder (with model_index.json)")
  src.add_argument("--single-file", metavar="FILE",
                   help="one .safetensors file in the original LDM layout (SD 1.x, 2.x 512 and "
                        "768-v, SDXL); pickled .ckpt files are refused")
  p.add_argument("--config", default=None, metavar="DIR",
                 help="single file: a diffusers folder whose configs, tokenizer and scheduler "
                      "to use (weights not needed); without it they are inferred")
  p.add_argument("--tokenizer", default=None, metavar="DIR",
                 help="single file without --config: a CLIP tokenizer folder (vocab.json + "
                      "merges.txt, or bpe_simple_vocab_16e6.txt.gz)")
  p.add_argument("--v-prediction", action="store_true",
                 help="single file without --config: the model predicts v (SD 2.x 768-v); "
                      "tensors cannot tell")
  p.add_argument("--image-size", type=int, default=None,
                 help="single file without --config: trained image size (default 768 with "
                      "--v-prediction, else 512)")
  p.add_argument("--workdir", required=True, help="the new run's directory (absent or empty)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="the U-Net's compute dtype (parameters are stored in float32)")
  p.add_argument("--variant", default=None,
                 help="weights variant to read, e.g. fp16 for *.fp16.safetensors")
  p = sub.add_parser(
      "caption", help="describe your own pictures with a captioner run",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Print one caption per picture (PATH: caption) from the captioner in WORKDIR: "
                  "greedy decoding by default, beam search with --beam, sampling with "
                  "--temperature (and --top-k / --top-p). With --retrieval CLIP_WORKDIR the "
                  "caption is instead the caption of a bank (the clip run's training captions, "
                  "or --bank FILE with one per line) nearest the picture in the clip run's "
                  "shared space. Pictures are converted to the model's channels; another size is "
                  "resized (shorter side) and centre-cropped to the model's, with a warning.",
      epilog="Examples:\n  jaxgen caption --workdir runs/captioner --image a.png --image b.png\n"
             "  jaxgen caption --workdir runs/captioner --image a.png --temperature 0.8 "
             "--top-p 0.9 --samples 3\n  jaxgen caption --retrieval runs/clip --image a.png")
  p.add_argument("--workdir", default=None, help="a captioner run (not needed with --retrieval)")
  p.add_argument("--image", action="append", required=True, help="a picture (repeat for several)")
  from jaxgen.argtypes import decoding_args, positive_int
  decoding_args(p)
  p.add_argument("--samples", type=positive_int, default=1,
                 help="captions per picture (sampling: each with another key)")
  p.add_argument("--retrieval", default=None, metavar="CLIP_WORKDIR",
                 help="caption by retrieval in this clip run's shared space")
  p.add_argument("--bank", default=None, metavar="FILE",
                 help="--retrieval: candidate captions, one per line (default: the clip run's "
                      "training captions)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")

  p = sub.add_parser(
      "denoise", help="remove Gaussian noise from your own pictures with a pixel diffusion run",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Denoise PNG/JPEG pictures with the diffusion model in WORKDIR (a ddpm run): "
                  "the noise level (estimated per picture unless --sigma) is matched to the "
                  "diffusion step of the same noise-to-signal ratio, and the reverse process "
                  "runs from there; a latent (ldm) run measures the noise its encoder leaves in "
                  "the latents and denoises those. Pictures are converted to the model's "
                  "channels; a pixel run takes any size (reflect-padded, cropped back). Prints the "
                  "written paths; the noise levels used go to the log.",
      epilog="Example:\n  jaxgen denoise --workdir runs/ddpm_class --image noisy.png --out "
             "clean.png\n  jaxgen denoise --workdir runs/ddpm_class --image a.png --image "
             "b.png --sigma 0.1 --draws 8 --outdir cleaned/")
  p.add_argument("--workdir", required=True)
  p.add_argument("--image", action="append", required=True, help="a picture (repeat for several)")
  p.add_argument("--sigma", type=float, default=None,
                 help="noise standard deviation on the [0, 1] scale (default: estimated)")
  p.add_argument("--steps", type=int, default=50, help="reverse steps from the matched level")
  p.add_argument("--draws", type=int, default=1,
                 help="1: deterministic DDIM; K > 1: the mean of K ancestral draws (an "
                      "estimate of the posterior mean: smoother)")
  p.add_argument("--prompt", default="",
                 help="ldm runs: what the picture shows (default: unconditional)")
  p.add_argument("--out", default=None, help="output file (one --image)")
  p.add_argument("--outdir", default=None, help="output folder (default: beside each image, "
                                                "NAME_denoised.png)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")

  p = sub.add_parser(
      "vary", help="variations of your own pictures with an embedding-conditioned diffusion run",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Variations of PNG/JPEG pictures with the diffusion model in WORKDIR (a ddpm "
                  "run conditioned on a frozen SimCLR/CLIP image embedding, e.g. "
                  "configs/vary.py): each picture is embedded by the run's frozen tower and NUM "
                  "samples are drawn conditioned on that embedding, with classifier-free "
                  "guidance G. They keep what the encoder sees and vary the rest. Pictures are "
                  "converted to the model's channels; another size is resized (shorter side) "
                  "and centre-cropped to the model's, with a warning. Writes one picture per "
                  "input (the input, then its variations) and prints its path.",
      epilog="Example:\n  jaxgen vary --workdir runs/vary --image shoe.png --num 8 --guidance 3\n"
             "  jaxgen vary --workdir runs/vary --image a.png --image b.png --outdir varied/")
  p.add_argument("--workdir", required=True)
  p.add_argument("--image", action="append", required=True, help="a picture (repeat for several)")
  from jaxgen.argtypes import positive_int
  p.add_argument("--num", type=positive_int, default=8, help="variations per picture")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale (default: the run's "
                      "diffusion.guidance_scale; 1: the conditional model alone)")
  p.add_argument("--sampler", default=None, help="default: the run's diffusion.sampler")
  p.add_argument("--steps", type=positive_int, default=None,
                 help="default: the run's diffusion.sample_steps")
  p.add_argument("--out", default=None, help="output file (one --image)")
  p.add_argument("--outdir", default=None, help="output folder (default: beside each image, "
                                                "NAME_variations.png)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")

  p = sub.add_parser(
      "verify", help="check a workdir's checkpoints against their checksums",
      description="Check every checkpoint in WORKDIR (or --step N) against the SHA-256 "
                  "checksums written when it was saved. A checkpoint without checksums (its "
                  "writer stopped right after saving) is restored and checked for NaN/Inf; "
                  "--accept seals it as it is, so that train, sample and eval take it without "
                  "asking again.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="one step (default: all)")
  p.add_argument("--accept", action="store_true",
                 help="write checksums for steps that have none, as they are")
  return parser


def _cmd_verify(args):
  from jaxgen.train.checkpoint import verify_steps
  directory = pathlib.Path(args.workdir) / "checkpoints"
  if not directory.is_dir():
    raise ConfigError(f"{args.workdir} has no checkpoints/ folder: is it a jaxgen workdir?")
  report = verify_steps(directory, None if args.step is None else [args.step],
                        accept=args.accept)
  if not report:
    raise ConfigError(f"{directory} holds no checkpoint.")
  for step, status in sorted(report.items()):
    print(f"step {step}: {status}")
  if any(not s.startswith(("ok", "no checksums")) or "non-finite" in s and not args.accept
         for s in report.values()):
    sys.exit(1)


def _cmd_train(args, overrides):
  from jaxgen import app, runtime
  config = app.load_config(args.config, overrides)  # all checks before any compute
  if args.distributed:
    runtime.initialize_distributed()
  else:  # data parallel over the CPU's cores: as many devices as split the (micro-)batch
    micro = config.data.batch_size // max(1, config.optim.grad_accum_steps)
    runtime.configure_cpu_devices(runtime.cpu_devices_for_batch(micro))
  app.train(config, args.workdir, progress=not args.no_progress)
  log.info("Done. Pictures in %s", pathlib.Path(args.workdir) / "samples")


def _task_args(task: str, command: str, args, extra: list[str]) -> argparse.Namespace:
  """The workdir's task's options, parsed (and checked) before any weight is loaded."""
  from jaxgen import commands
  p = argparse.ArgumentParser(prog=f"jaxgen {args.command} (task {task})")
  getattr(commands.of(task), f"{command}_args")(p)
  task_args = p.parse_args(extra)
  for k, v in vars(args).items():
    setattr(task_args, k, v)
  return task_args


def _cmd_sample(args, extra):
  from jaxgen import app, commands
  from jaxgen.weights import read_config
  task = read_config(args.workdir)["task"]
  if args.command == "generate" and task not in ("ldm", "prior"):
    raise ConfigError(f"jaxgen generate needs a latent diffusion (ldm) workdir; {args.workdir} "
                      f"holds a {task} run: use jaxgen sample.")
  task_args = _task_args(task, "sample", args, extra)
  mesh = contextlib.nullcontext()
  if task in SAMPLER_TASKS:
    import jax

    from jaxgen import runtime
    from jaxgen.train.mesh import make_mesh
    runtime.configure_cpu_devices()
    mesh = jax.set_mesh(make_mesh())  # weights land on every device; the sampler splits its batch
  with mesh:
    run = app.restore_run(args.workdir, args.step, with_state=False)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "samples"
    task_args.out_file = str(out) if out.suffix.lower() == ".png" else None
    outdir = out.parent if task_args.out_file else out
    paths = commands.of(run.config.task).sample(run, task_args, outdir)
  for path in paths:
    print(path)


def _cmd_denoise(args):
  import jax

  from jaxgen import app
  from jaxgen import images as img
  from jaxgen.pipelines import diffusion as pipe
  if args.out and len(args.image) != 1:
    raise ConfigError("--out names one file: give one --image, or --outdir for several")
  run = app.restore_run(args.workdir, args.step, with_state=False)
  if run.config.task not in ("ddpm", "dit", "ldm"):
    raise ConfigError(f"jaxgen denoise needs a diffusion run (ddpm, dit or ldm); {args.workdir} "
                      f"is a {run.config.task} run")
  channels = run.task.model.image_shape[-1]
  for i, path in enumerate(args.image):
    x = img.read_picture(path, channels)[0][None]
    key = jax.random.PRNGKey(args.seed + i)
    if run.config.task == "ldm":
      from jaxgen.pipelines import text_to_image as t2i
      out, sigma, sigma_z = t2i.denoise(run.task.model, run.params, run.model_state, x, key,
                                        sigma=args.sigma, prompt=args.prompt, steps=args.steps)
      log.info("%s: latent noise %.4f", path, sigma_z[0])
    else:
      out, sigma = pipe.denoise(run.task.model, run.params, x, key, sigma=args.sigma,
                                steps=args.steps, draws=args.draws)
    log.info("%s: noise sigma %.4f (%s)", path, sigma[0],
             "given" if args.sigma is not None else "estimated")
    src = pathlib.Path(path)
    dest = pathlib.Path(args.out) if args.out else (
        pathlib.Path(args.outdir) if args.outdir else src.parent) / f"{src.stem}_denoised.png"
    print(img.save_png(img.to_uint8(out[0]), dest))


def _cmd_vary(args):
  import jax

  from jaxgen import app, commands
  from jaxgen import images as img
  if args.out and len(args.image) != 1:
    raise ConfigError("--out names one file: give one --image, or --outdir for several")
  run = app.restore_run(args.workdir, args.step, with_state=False)
  model = getattr(run.task, "model", None)
  if run.config.task != "ddpm" or model.embedder is None:
    raise ConfigError(f"jaxgen vary needs a ddpm run conditioned on image embeddings (trained "
                      f"with model.embedding.init, e.g. configs/vary.py); {args.workdir} is not "
                      "one")
  sampler = args.sampler or run.config.diffusion.sampler
  commands.check_sampler(model, sampler)
  size, channels = model.image_shape[0], model.image_shape[-1]
  for i, path in enumerate(args.image):
    x, resized = img.read_picture(path, channels, size)
    if resized:
      log.warning("%s: resized and centre-cropped to the model's %dx%d", path, size, size)
    picture = run.task.variation_grid(run.params, run.model_state, jax.random.PRNGKey(
        args.seed + i), images=x[None], num=args.num, guidance=args.guidance,
        steps=args.steps, sampler=sampler)
    src = pathlib.Path(path)
    dest = pathlib.Path(args.out) if args.out else (
        pathlib.Path(args.outdir) if args.outdir else src.parent) / f"{src.stem}_variations.png"
    print(img.save_png(picture, dest))


def _cmd_caption(args):
  import jax
  import numpy as np

  from jaxgen import commands
  from jaxgen import images as img
  if args.retrieval:
    from jaxgen import app
    from jaxgen.pipelines import clip as clip_pipe
    if args.workdir:
      raise ConfigError("give either --workdir (a captioner) or --retrieval (a clip run)")
    model, params, state = clip_pipe.load_dual_encoder(args.retrieval, "--retrieval")
    if args.bank:
      bank = [line.strip() for line in pathlib.Path(args.bank).read_text(
          encoding="utf-8").splitlines() if line.strip()]
      if not bank:
        raise ConfigError(f"--bank {args.bank} holds no caption")
    else:
      bank = sorted(set(app.restore_run(args.retrieval, with_state=False).task
                        .train_captions().tolist()))
    size, channels = model.image_shape[0], model.image_shape[-1]
    describe = lambda x, k: clip_pipe.nearest_captions(model, params, state, x, bank)
  else:
    if not args.workdir:
      raise ConfigError("jaxgen caption needs --workdir (a captioner run) or --retrieval")
    if args.bank:
      raise ConfigError("--bank goes with --retrieval")
    from jaxgen.pipelines import captioning as cp
    model, params, state = cp.load_captioner(args.workdir, args.step)
    options = commands.decoding_options(args)
    size, channels = model.image_shape[0], model.image_shape[-1]
    describe = lambda x, k: cp.caption(model, params, state, x, k, **options)
  pictures = []
  for path in args.image:
    x, resized = img.read_picture(path, channels, size)
    if resized:
      log.warning("%s: resized and centre-cropped to the model's %dx%d", path, size, size)
    pictures.append(x)
  pictures = np.stack(pictures)
  for s in range(args.samples):
    for path, text in zip(args.image, describe(pictures, jax.random.PRNGKey(args.seed + s))):
      print(f"{path}: {text}")


def _cmd_import(args):
  from jaxgen import app
  print(app.import_stable_diffusion(args.diffusers or args.single_file, args.workdir,
                                    dtype=args.dtype, variant=args.variant,
                                    config_dir=args.config, tokenizer=args.tokenizer,
                                    v_prediction=args.v_prediction, image_size=args.image_size))


def _cmd_eval(args, extra):
  import jax

  from jaxgen import app, commands
  from jaxgen.weights import read_config
  task_args = _task_args(read_config(args.workdir)["task"], "eval", args, extra)
  run = app.restore_run(args.workdir, args.step, with_state=False)
  metrics = commands.of(run.config.task).evaluate(run, jax.random.PRNGKey(args.seed), task_args)
  metrics = dict(step=run.step, split=run.config.data.eval_split, **metrics)
  text = json.dumps(metrics, indent=2)
  print(text)
  from jaxgen.files import atomic_write_text
  atomic_write_text(pathlib.Path(args.workdir) / f"eval_step{run.step}.json", text + "\n")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    wants_help = (rest[:1] in (["sample"], ["eval"], ["generate"])
                  and any(a in ("-h", "--help") for a in rest))
    parser = build_parser(rest[0] if wants_help else None,
                          _workdir_task(rest) if wants_help else None)
    args, extra = parser.parse_known_args(rest)
    if args.command is None:
      parser.print_help()
      sys.exit(2)
    if overrides and args.command != "train":
      parser.error("--config.KEY=VALUE overrides apply to 'train' only")
    if extra and args.command not in ("sample", "eval", "generate"):
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxgen import host_memory, runtime
    host_memory.keep_freed_memory()  # before JAX starts its threads
    runtime.setup_logging()
    runtime.enable_compilation_cache()
    if args.command == "train":
      _cmd_train(args, overrides)
    elif args.command in ("sample", "generate"):
      _cmd_sample(args, extra)
    elif args.command == "eval":
      _cmd_eval(args, extra)
    elif args.command == "import":
      _cmd_import(args)
    elif args.command == "denoise":
      _cmd_denoise(args)
    elif args.command == "caption":
      _cmd_caption(args)
    elif args.command == "vary":
      _cmd_vary(args)
    elif args.command == "verify":
      _cmd_verify(args)
  except JaxgenError as e:
    print(f"jaxgen: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)
  except OSError as e:  # a file the command could not read or write: name it, no traceback
    from jaxgen.files import describe
    where = f"{e.filename}: " if e.filename else ""
    print(f"jaxgen: error: {where}{describe(e)} ({type(e).__name__}: {e})", file=sys.stderr)
    sys.exit(1)
