"""jaxgen command line: train, sample and eval. Thin: each command calls a library function."""
from __future__ import annotations

import argparse
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
  eval     held-out metrics of a trained workdir, printed and written as JSON

Run 'jaxgen COMMAND --help' for a command's options."""


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


def _task_sample_help() -> str:
  from jaxgen import tasks
  parts = []
  for name in tasks.names():
    p = argparse.ArgumentParser(prog=f"options for task '{name}'", add_help=False)
    tasks.get(name).add_sample_args(p)
    parts.append(p.format_help())
  return "task options (chosen by the workdir's task):\n\n" + "\n".join(parts)


def build_parser(sample_epilog: str | None = None) -> argparse.ArgumentParser:
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
      description="Write pictures from the latest checkpoint in WORKDIR: for autoencoders, "
                  "prior samples, reconstructions and interpolations (linear and slerp).",
      epilog=sample_epilog)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default=None, help="output directory (default WORKDIR/samples)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")

  p = sub.add_parser(
      "eval", help="held-out metrics of a trained workdir",
      description="Evaluate the latest checkpoint in WORKDIR on the config's eval split; print "
                  "the metrics as JSON and write WORKDIR/eval_stepN.json.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
  return parser


def _cmd_train(args, overrides):
  from jaxgen import config as config_lib
  from jaxgen import runtime, train
  config = config_lib.load_config(args.config, overrides)  # all checks before any compute
  if args.distributed:
    runtime.initialize_distributed()
  train.train(config, args.workdir, progress=not args.no_progress)
  log.info("Done. Pictures in %s", pathlib.Path(args.workdir) / "samples")


def _cmd_sample(args, extra):
  from jaxgen import train
  run = train.restore_run(args.workdir, args.step)
  p = argparse.ArgumentParser(prog=f"jaxgen sample (task {run.config.task})")
  run.task.add_sample_args(p)
  task_args = p.parse_args(extra)
  for k, v in vars(args).items():
    setattr(task_args, k, v)
  outdir = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "samples"
  paths = run.task.sample(run.state.ema_params, run.state.model_state, task_args, outdir)
  for path in paths:
    print(path)


def _cmd_eval(args):
  import jax

  from jaxgen import train
  run = train.restore_run(args.workdir, args.step)
  metrics = run.task.evaluate(run.state.ema_params, run.state.model_state,
                              jax.random.PRNGKey(args.seed), limit=args.limit)
  metrics = dict(step=run.step, split=run.config.data.eval_split, **metrics)
  text = json.dumps(metrics, indent=2)
  (pathlib.Path(args.workdir) / f"eval_step{run.step}.json").write_text(text + "\n")
  print(text)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, overrides = _split_overrides(argv)
    wants_sample_help = rest[:1] == ["sample"] and any(a in ("-h", "--help") for a in rest)
    parser = build_parser(_task_sample_help() if wants_sample_help else None)
    args, extra = parser.parse_known_args(rest)
    if args.command is None:
      parser.print_help()
      sys.exit(2)
    if overrides and args.command != "train":
      parser.error("--config.KEY=VALUE overrides apply to 'train' only")
    if extra and args.command != "sample":
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from jaxgen import runtime
    runtime.setup_logging()
    runtime.enable_compilation_cache()
    if args.command == "train":
      _cmd_train(args, overrides)
    elif args.command == "sample":
      _cmd_sample(args, extra)
    elif args.command == "eval":
      _cmd_eval(args)
  except JaxgenError as e:
    print(f"jaxgen: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)
