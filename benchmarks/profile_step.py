"""Where one suite row's train step spends its time on this backend: each XLA thunk of a
jax.profiler trace mapped to its HLO instruction, summed by kind (convolution forward / input
gradient / filter gradient, dot, elementwise and reduction fusions, copies) and by where it sits
in the model (the attention core, the rest of the attention blocks, everything else), with the
most expensive instructions listed.

python benchmarks/profile_step.py ROW [--steps 2] [--top 25]

ROW is a name of benchmarks/rows.py (one device, the row's batch and overrides). Writes
benchmarks/results/profile_ROW.json and .md. $JAXGEN_MALLOC applies as in the suite (default
keep: jaxgen.host_memory). Thunk times are per thread: on the CPU a dot or
convolution that XLA splits over both cores counts once, on the thread that launched it.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import cpu_conv
from rows import ROWS


def _where(op_name: str) -> str:
  """The model region of an instruction, from its op_name metadata."""
  if "chunked" in op_name or "while" in op_name or "_attention" in op_name:
    return "attention core (softmax(QK^T)V and its gradient)"
  if "attn" in op_name:
    return "attention blocks, other (projections, norms, MLP)"
  return "rest (ResBlocks, up/down sampling, loss, optimizer)"


def profile(row_name: str, steps: int, top: int) -> dict:
  row = ROWS[row_name]
  cpu_conv.ROW = row_name
  compiled, state, batch, compile_s = cpu_conv._ddpm_step(row.overrides)
  kinds = cpu_conv._categorise(compiled.as_text())
  lines = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
    if m:
      lines[m.group(1)] = m.group(2)
  wall, thunks = cpu_conv.trace_steps(compiled, state, batch, steps)
  by_kind, by_where, by_instr = (collections.Counter() for _ in range(3))
  for name, ms in thunks.items():
    if name not in kinds:
      continue
    op = re.search(r'op_name="([^"]+)"', lines.get(name, ""))
    by_kind[kinds[name]] += ms
    by_where[_where(op.group(1) if op else "")] += ms
    by_instr[name] += ms
  shape = lambda name: lines.get(name, "").split(" ")[0]
  op_of = lambda name: (re.search(r'op_name="([^"]+)"', lines.get(name, "")) or [None, ""])[1]
  return dict(row=row_name, batch=row.batch, steps=steps, compile_s=compile_s,
              wall_ms_per_step=1e3 * wall, thread_ms_per_step=sum(by_kind.values()),
              by_kind=dict(by_kind.most_common()), by_where=dict(by_where.most_common()),
              top=[dict(instruction=n, ms=ms, kind=kinds[n], shape=shape(n), op=op_of(n)[-120:])
                   for n, ms in by_instr.most_common(top)])


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("row", choices=sorted(ROWS))
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args()
  malloc = common.host_malloc()  # as the suite's workers: before JAX starts its threads
  r = profile(a.row, a.steps, a.top)
  total = r["thread_ms_per_step"]
  share = lambda d: [dict(part=k, ms=v, share_pct=100 * v / total) for k, v in d.items()]
  common.write(f"profile_{a.row}", share(r["by_kind"]) + share(r["by_where"]) + r["top"],
               ["part", "instruction", "kind", "shape", "ms", "share_pct", "op"],
               dict(row=a.row, batch=r["batch"], steps=a.steps, compile_s=round(r["compile_s"], 1),
                    wall_ms_per_step=round(r["wall_ms_per_step"]),
                    thread_ms_per_step=round(total), malloc=malloc))
  print(f"{a.row}: {r['wall_ms_per_step']:.0f} ms/step traced, {total:.0f} thread-ms")
  for k, v in list(r["by_kind"].items()) + list(r["by_where"].items()):
    print(f"  {k:55s} {v:8.1f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
  main()
