"""Captions of a batch: its own (captioned data sets) or made from class names."""
from __future__ import annotations

import numpy as np

from jaxgen.errors import DataError


def captions_of(batch: dict, class_names, template: str = "a photo of a {}") -> np.ndarray:
  """The batch's `caption` column, else `template` filled with each label's class name."""
  if "caption" in batch:
    return batch["caption"]
  if "label" in batch and class_names:
    return np.array([template.format(class_names[int(i)]) for i in batch["label"]])
  raise DataError("The text model needs captions, or labels with class names to make them "
                  "from; this data set has neither.")
