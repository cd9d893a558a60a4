"""Run a jitted per-batch function over a whole array data set with one compile."""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np


def map_batches(fn: Callable, arrays: dict[str, np.ndarray], batch_size: int,
                key: jax.Array | None = None) -> dict[str, np.ndarray]:
  """fn(batch, key) -> dict of per-example arrays [b, ...]. The last batch is padded to the
  full size (so fn compiles once) and the padding dropped from the results."""
  n = len(next(iter(arrays.values())))
  outs: dict[str, list] = {}
  for i, lo in enumerate(range(0, n, batch_size)):
    idx = np.arange(lo, lo + batch_size) % n
    batch = {k: v[idx] for k, v in arrays.items()}
    k = None if key is None else jax.random.fold_in(key, i)
    res = jax.device_get(fn(batch, k))
    keep = min(batch_size, n - lo)
    for name, v in res.items():
      outs.setdefault(name, []).append(np.asarray(v)[:keep])
  return {k: np.concatenate(v) for k, v in outs.items()}
