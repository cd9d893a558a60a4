"""How long the training thread stalls around a checkpoint save, with the checksums written on
the training thread (jaxgen before 2026-12: hashed at the next save) or off it (now: a thread
seals each save once orbax commits it).

Trains the SD-like row (149M parameters; the TrainState with EMA and Adam moments is about
2.4 GB) for a few steps with a save every `--every` steps, and reports every step's wall time.

python benchmarks/checkpoint_stall.py [--row ldm_sd_like] [--steps 8] [--every 2]
Writes benchmarks/results/checkpoint_stall.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
from bench_jax import train_setup
from rows import ROWS

from jaxgen import app, runtime
from jaxgen.train.checkpoint import Checkpointer, write_checksums

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class InlineSeal(Checkpointer):
  """The old behaviour: the previous save is waited for and hashed on the training thread when
  the next save starts (and at the end)."""

  def _start_sealer(self, step):
    self._pending = step

  def wait(self):
    self._mngr.wait_until_finished()
    step = getattr(self, "_pending", None)
    if step is not None:
      write_checksums(self._step_dir(step))
      self._pending = None


def run(mode: str, row_name: str, steps: int, every: int) -> dict:
  row = ROWS[row_name]
  config = app.load_config(row.config_spec(), list(row.overrides)
                           + [f"data.batch_size={row.batch}"])
  task = app.build_task(config)
  state, batch, step_fn = train_setup(task, config, row.batch)
  state, m = step_fn(state, batch)  # compile
  jax.block_until_ready(m)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  times, saved_after = [], []
  with tempfile.TemporaryDirectory(dir=RESULTS.parent) as d:
    ckpt = (InlineSeal if mode == "inline" else Checkpointer)(pathlib.Path(d) / "ckpt", keep=2)
    for i in range(1, steps + 1):
      t0 = time.perf_counter()
      state, m = step_fn(state, batch)
      jax.block_until_ready(m["loss"])
      if i % every == 0:
        ckpt.save(i, state, {"config": {}})
        saved_after.append(i)
      times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt.close()
    close_s = time.perf_counter() - t0
  return dict(mode=mode, row=row_name, state_bytes=state_bytes, every=every, step_s=times,
              saves_after_steps=saved_after, close_s=close_s)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--row", default="ldm_sd_like")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--every", type=int, default=2)
  a = p.parse_args()
  runtime.enable_compilation_cache()
  runtime.setup_logging()
  results = [run(mode, a.row, a.steps, a.every) for mode in ("inline", "background")]
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "checkpoint_stall.json").write_text(json.dumps(results, indent=1) + "\n")
  lines = [f"# Training-thread stall around saves ({a.row}, "
           f"{results[0]['state_bytes'] / 2 ** 30:.2f} GiB TrainState, save every {a.every} "
           "steps)", "",
           "| checksums | " + " | ".join(f"step {i + 1}" for i in range(a.steps))
           + " | close | mean step that saves | mean step without a save |",
           "|---|" + "---|" * (a.steps + 3)]
  for r in results:
    saving = [t for i, t in enumerate(r["step_s"], 1) if i % a.every == 0]
    plain = [t for i, t in enumerate(r["step_s"], 1) if i % a.every and i > 1]
    what = ("on the training thread (before)" if r["mode"] == "inline"
            else "off it, sealed on commit (now)")
    lines.append(f"| {what} | " + " | ".join(f"{t:.2f}" for t in r["step_s"])
                 + f" | {r['close_s']:.2f} | {np.mean(saving):.2f} | {np.mean(plain):.2f} |")
  lines += ["", "Each step's wall time in seconds includes the save call when the step "
            "number is a multiple of `every`: the call waits for the previous save to "
            "commit, then returns once orbax has copied the arrays to the host (writing runs "
            "in the background). The old design also hashed the previous save's files there, "
            "on the training thread. Step 1 is excluded from the means (first-call effects).",
            ""]
  (RESULTS / "checkpoint_stall.md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
