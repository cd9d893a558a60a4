"""Metrics to WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb (process 0 only)."""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), "split": prefix}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      row[k] = v
      if self._tb is not None:
        self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, C]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
