"""Metrics to WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb (process 0 only).

metrics.jsonl holds one row per logged step: a resumed run first drops the rows past its
checkpoint (written after the checkpoint by the run that stopped, and about to be logged again),
rewriting the file atomically, so that any number of resumes leaves no duplicates."""
from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np

from jaxgen.files import append_text, atomic_write_text


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch where the process has not loaded it.

  tensorboardX imports torch whenever it is installed, only so that it can take torch tensors,
  which jaxgen never passes. Measured on the 2-core CPU with torch 2.13 (CPU build) installed,
  importing tensorboardX in a fresh process took 1.41 s and 221 MB peak RSS, and 0.13 s and
  29 MB with torch kept out (the cost of every training's start, and more for a CUDA build).
  Within the import, `import torch` fails as it does where torch is absent, the path
  tensorboardX already takes then."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True,
               resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled and self.path.exists():
      self._drop_rows_after(resume_step)
    if self.enabled and tensorboard:
      self._tb = summary_writer_class()(str(pathlib.Path(workdir) / "tb"))

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
