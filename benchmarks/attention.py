"""Attention memory and time against the sequence: the materialised softmax ("xla") and the
chunked online softmax ("chunked", jaxgen.models.chunked_attention), forward + backward of one
Stable Diffusion 1.5 first-level self-attention (8 heads of 40, batch 1) over 16x16 to 64x64
latent positions (128 to 512 pixels), and PyTorch's scaled_dot_product_attention beside them
when torch is installed.

Memory: XLA's compiled scratch memory of the gradient function (memory_analysis: exact, free of
allocator noise); PyTorch's CPU allocator reports no peak, so its rows have time only. Time:
median wall seconds of forward + backward.

python benchmarks/attention.py [--sizes 16 32 48 64] [--heads 8] [--head-dim 40]
Writes benchmarks/results/attention.{json,md}.
"""
from __future__ import annotations

import argparse
import sys

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import median_time, write

from jaxgen import runtime
from jaxgen.models import layers


def grad_fn(impl: str):
  def f(q, k, v):
    return jax.grad(lambda q, k, v: layers.attention(q, k, v).sum(), (0, 1, 2))(q, k, v)

  def traced(q, k, v):
    layers.set_attention(impl)
    try:
      return f(q, k, v)
    finally:
      layers.set_attention("auto")
  return jax.jit(traced)


def torch_row(side, heads, head_dim):
  try:
    import torch
  except ImportError:
    return None
  n = side * side
  q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))

  def step():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    return out
  return dict(impl="torch sdpa", side=side, sequence=n, temp_mib=float("nan"),
              seconds=median_time(step, repeats=3, block=lambda x: x)["median_s"])


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", type=int, nargs="*", default=[16, 32, 48, 64])
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=40)
  p.add_argument("--no-torch", action="store_true")
  a = p.parse_args()
  runtime.setup_logging()
  rows = []
  for side in a.sizes:
    n = side * side
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, n, a.heads, a.head_dim)) for kk in ks)
    for impl in ("xla", "chunked"):
      f = grad_fn(impl)
      temp = f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
      t = median_time(f, q, k, v, repeats=3)["median_s"]
      rows.append(dict(impl=impl, side=side, sequence=n, temp_mib=temp / 2 ** 20, seconds=t))
      print(rows[-1], flush=True)
    if not a.no_torch and (row := torch_row(side, a.heads, a.head_dim)):
      rows.append(row)
      print(row, flush=True)
  meta = dict(heads=a.heads, head_dim=a.head_dim, batch=1, what="forward + backward")
  path, table = write("attention", rows, ["impl", "side", "sequence", "temp_mib", "seconds"],
                      meta)
  print(path)
  print(table)


if __name__ == "__main__":
  main()
