import numpy as np
import pytest

from jaxgen.data import ArraySource, BatchLoader
from jaxgen.errors import DataError


def _source(n=20):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
  return ArraySource(images, np.arange(n, dtype=np.int32))


def test_each_epoch_is_a_permutation_and_deterministic():
  a, b = BatchLoader(_source(), 5, seed=3), BatchLoader(_source(), 5, seed=3)
  epoch0 = np.concatenate([a.get(k)["label"] for k in range(4)])
  assert sorted(epoch0.tolist()) == list(range(20))
  epoch1 = np.concatenate([a.get(k)["label"] for k in range(4, 8)])
  assert sorted(epoch1.tolist()) == list(range(20)) and not np.array_equal(epoch0, epoch1)
  # Random access equals sequential reading: the position alone is the iterator state.
  assert np.array_equal(b.get(6)["label"], a.get(6)["label"])
  assert not np.array_equal(BatchLoader(_source(), 5, seed=4).get(0)["label"], a.get(0)["label"])
  assert a.state(6) == dict(batches_consumed=6, epoch=1, batch_in_epoch=2, dataset_size=20,
                            global_batch=5, seed=3, shuffle=True)


def test_processes_read_disjoint_slices_of_the_same_global_batch():
  whole = BatchLoader(_source(), 8, seed=0, process_index=0, process_count=1)
  parts = [BatchLoader(_source(), 8, seed=0, process_index=i, process_count=2) for i in range(2)]
  for k in range(5):
    joined = np.concatenate([p.get(k)["label"] for p in parts])
    assert np.array_equal(joined, whole.get(k)["label"])


def test_iterate_prefetches_in_order_and_shards():
  import jax

  from jaxgen.train import make_mesh
  loader = BatchLoader(_source(), 4, seed=1)
  it = loader.iterate(start=3, mesh=make_mesh())
  for k in range(3, 6):
    batch = next(it)
    assert isinstance(batch["label"], jax.Array)
    assert np.array_equal(np.asarray(batch["label"]), loader.get(k)["label"])
  it.close()


def test_bad_batch_sizes():
  with pytest.raises(DataError, match="larger than the data set"):
    BatchLoader(_source(4), 8, seed=0)
  with pytest.raises(DataError, match="divide evenly over 3 processes"):
    BatchLoader(_source(), 8, seed=0, process_index=0, process_count=3)
