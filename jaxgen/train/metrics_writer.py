"""Metrics to WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb (process 0 only).

metrics.jsonl holds one row per logged step: a resumed run first drops the rows past its
checkpoint (written after the checkpoint by the run that stopped, and about to be logged again),
rewriting the file atomically, so that any number of resumes leaves no duplicates."""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np

from jaxgen.files import append_text, atomic_write_text


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True,
               resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled and self.path.exists():
      self._drop_rows_after(resume_step)
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
    append_text(self.path, json.dumps(row) + "\n")

  def _drop_rows_after(self, step: int) -> None:
    lines = self.path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        row_step = json.loads(line).get("step", 0)
      except (ValueError, AttributeError):
        continue  # a line cut by a crash mid-write
      if row_step <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
      atomic_write_text(self.path, "".join(keep))

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
