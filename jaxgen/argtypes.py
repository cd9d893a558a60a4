"""argparse helpers shared by the command line (jaxgen.cli) and each task's command wiring
(jaxgen.commands). No JAX import here, so that `jaxgen --help`, a command's --help and a
mistyped command answer without loading JAX (2.6 s here)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
  """argparse type of counts (--num, --steps, --limit, ...): 0 or less is an error, never a
  silent default."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def decoding_args(p):
  """The decoding options of `jaxgen caption` and a captioner's sample/eval."""
  p.add_argument("--beam", type=positive_int, default=None, help="beam search with K beams")
  p.add_argument("--length-penalty", type=float, default=1.0,
                 help="beam search: scores are log-probability / length ** this")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="> 0 samples at this temperature (default 0: greedy)")
  p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k likeliest tokens")
  p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
