"""Deterministic global batches, split per process and sharded over the mesh.

Batch k is a pure function of (seed, k): each epoch is a permutation drawn from (seed, epoch), and
each process reads only its slice of the global batch. The iterator position is therefore just
the number of batches consumed, which the checkpoint stores, and a resumed run sees exactly the
batches an uninterrupted one would.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen.data.sources import Source
from jaxgen.errors import DataError


class BatchLoader:
  """Global batch `k` of a source: `get(k)` returns this process's share as numpy arrays."""

  def __init__(self, source: Source, global_batch: int, seed: int, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None,
               preprocess=None, cached: dict[str, np.ndarray] | None = None):
    self.source = source
    self.preprocess = preprocess  # host-side, e.g. tokenising captions; runs on the thread
    # Per-example arrays computed once for the whole source (e.g. a frozen encoder's latents),
    # joined to each batch by data-set index: batches carry them next to the images.
    self.cached = cached
    self.n = len(source)
    self.global_batch = global_batch
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch > self.n:
      raise DataError(f"data.batch_size={global_batch} is larger than the data set ({self.n} "
                      "examples).")
    if global_batch % self.process_count:
      raise DataError(f"data.batch_size={global_batch} must divide evenly over "
                      f"{self.process_count} processes.")
    self.local_batch = global_batch // self.process_count
    self.steps_per_epoch = self.n // global_batch
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n)
                    if self.shuffle else np.arange(self.n))
      self._perm_epoch = epoch
    return self._perm

  def indices(self, k: int) -> np.ndarray:
    """Data-set indices of this process's share of global batch k."""
    epoch, offset = divmod(k, self.steps_per_epoch)
    batch = self._permutation(epoch)[offset * self.global_batch:(offset + 1) * self.global_batch]
    lo = self.process_index * self.local_batch
    return batch[lo:lo + self.local_batch]

  def get(self, k: int) -> dict[str, np.ndarray]:
    """Global batch k: this process's examples, with their data-set `index` and the `cached`
    arrays' rows for them."""
    idx = self.indices(k)
    batch = dict(self.source.get(idx), index=idx.astype(np.int32))
    if self.cached:
      batch.update({name: values[idx] for name, values in self.cached.items()})
    return self.preprocess(batch) if self.preprocess is not None else batch

  def state(self, k: int) -> dict:
    """What a checkpoint stores: the position and what it depends on."""
    epoch, offset = divmod(k, self.steps_per_epoch)
    return dict(batches_consumed=k, epoch=epoch, batch_in_epoch=offset, dataset_size=self.n,
                global_batch=self.global_batch, seed=self.seed, shuffle=self.shuffle)

  def iterate(self, start: int, mesh: Mesh | None = None, prefetch: int = 2
              ) -> Iterator[dict[str, jax.Array]]:
    """Batches start, start+1, ... read ahead on a thread and, with a mesh, already placed on the
    devices there, so that host reading and the host-to-device copy overlap the train step."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
      k = start
      while not stop.is_set():
        try:
          item = self.get(k)
          if mesh is not None:
            item = shard_batch(item, mesh)
        except Exception as e:  # hand the error to the consumer
          q.put(e)
          return
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        k += 1

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if isinstance(item, Exception):
          raise item
        yield item
    finally:
      stop.set()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def shard_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's share of a global batch -> global arrays split over the mesh's data axis.
  Text fields (captions) stay on the host: a task tokenises them in its preprocess step."""
  sharding = batch_sharding(mesh)
  n_data = mesh.shape["data"]
  out = {}
  for k, v in local.items():
    if v.dtype.kind in "USO":
      continue
    global_len = v.shape[0] * jax.process_count()
    if global_len % n_data:
      raise DataError(f"The global batch ({global_len}) must divide evenly over the "
                      f"{n_data} devices of the mesh's data axis.")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
