"""The metric writer's TensorBoard events, written without importing PyTorch."""
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = """
import pathlib, sys
import numpy as np
from jaxgen.train.metrics_writer import MetricWriter
wd = pathlib.Path(sys.argv[1])
w = MetricWriter(wd)
w.write(3, {"loss": 0.25})
w.image(3, "samples", np.zeros((4, 4, 3), np.uint8))
w.flush()
print("torch loaded:", "torch" in sys.modules)
import torch  # the blocking entry is gone: torch imports as usual afterwards
print("torch after:", torch.__name__)
"""


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  pytest.importorskip("torch")  # with torch absent there is nothing to keep out
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout
  assert "torch loaded: False" in out
  assert "torch after: torch" in out
  events = b"".join(p.read_bytes() for p in (tmp_path / "tb").glob("events.out.tfevents.*"))
  assert b"train/loss" in events and b"samples" in events
  assert '"loss": 0.25' in (tmp_path / "metrics.jsonl").read_text()


def test_a_process_that_loaded_torch_keeps_it(tmp_path):
  torch = pytest.importorskip("torch")
  from jaxgen.train.metrics_writer import summary_writer_class
  writer = summary_writer_class()(str(tmp_path / "tb"))
  writer.add_scalar("x", 1.0, 0)
  writer.close()
  assert sys.modules["torch"] is torch
