"""Data: random-access sources (embedded, TFDS, folder, npz) and deterministic sharded batches."""
from jaxgen.data.pipeline import BatchLoader, batch_sharding, shard_batch
from jaxgen.data.sources import (
                                 EMBEDDED,
                                 ArraySource,
                                 Source,
                                 TfdsSource,
                                 fit_images,
                                 heldout_images,
                                 load_all,
                                 load_source,
)

__all__ = ["EMBEDDED", "ArraySource", "BatchLoader", "Source", "TfdsSource", "batch_sharding",
           "fit_images", "heldout_images", "load_all", "load_source", "shard_batch"]
