"""Labelled grids: columns in order, each label written under its own column."""
import numpy as np
import pytest

from jaxgen import images as img
from jaxgen.errors import ShapeError


def test_labelled_grid_puts_each_label_under_its_column():
  x = np.zeros((6, 8, 8, 3), np.uint8)
  for i in range(6):
    x[i] = 10 + 40 * i  # column 0: images 0-2, column 1: images 3-5
  labels = ["a large red circle left of a small blue square", "b"]
  p = img.labelled_grid(x, labels, scale=1, min_column_px=64)
  scale = -(-64 // 10)
  cell = 10 * scale
  for col in range(2):
    for row in range(3):
      y0, x0 = (2 + row * 10) * scale, (2 + col * 10) * scale
      assert (p[y0:y0 + 8 * scale, x0:x0 + 8 * scale] == 10 + 40 * (3 * col + row)).all()
  strip = p[(3 * 10 + 2) * scale:]
  ink = (strip < 128).all(-1)
  assert ink[:, 2 * scale:cell].any() and ink[:, cell + 2 * scale:].any()
  # the long label wraps onto more lines than the short one has
  rows_with_ink = lambda cols: np.flatnonzero(ink[:, cols].any(1))
  assert rows_with_ink(slice(0, cell)).max() > rows_with_ink(slice(cell, None)).max() + 5
  with pytest.raises(ShapeError, match="labelled columns"):
    img.labelled_grid(x[:5], labels)
