"""Writes tests/fixtures/fid_inception_reference.npz: pytorch-fid's FID Inception outputs for
deterministic synthetic weights, so that CI can check jaxgen's port without torchvision.

Run once in a separate venv (torchvision cannot be installed beside the project's CPU torch):
  python3 -m venv /tmp/tvenv && . /tmp/tvenv/bin/activate
  pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid && python scripts/make_fid_reference.py
The weights are a formula of each tensor's name and shape (no random generator), so the test
rebuilds them exactly with NumPy alone: see `synthetic_weights` (the test imports this file).
"""
import pathlib
import zlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests/fixtures/fid_inception_reference.npz"


def synthetic_weights(names, shapes):
  """Variance-preserving deterministic weights: conv weights ~ He scale, BN close to identity."""
  out = {}
  for name, shape in zip(map(str, names), shapes):
    shape = tuple(int(s) for s in shape if s >= 0)
    n = int(np.prod(shape)) if shape else 1
    phase = zlib.crc32(name.encode()) % 1000 / 1000.0
    # A classic deterministic hash: fractional part of a large multiple of sin(), made zero-mean
    # and unit-variance (uniform on [-sqrt(3), sqrt(3)]).
    u = np.modf(np.abs(np.sin(np.arange(n) * 12.9898 + phase * 78.233)) * 43758.5453)[0]
    wave = ((u - 0.5) * np.sqrt(12.0)).reshape(shape)
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      out[name] = (wave * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif name.endswith("bn.weight"):
      out[name] = (1.0 + 0.1 * wave).astype(np.float32)
    elif name.endswith("running_var"):
      out[name] = (1.0 + 0.05 * np.abs(wave)).astype(np.float32)
    elif name.endswith("num_batches_tracked"):
      out[name] = np.array(0, np.int64)
    else:  # biases, running means, fc
      out[name] = (0.05 * wave).astype(np.float32)
  return out


def inputs():
  """Four 32x32 RGB images in [0, 1]: smooth patterns that differ strongly."""
  y, x = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
  imgs = [np.stack([x, y, x * y], -1), np.stack([1 - x, y ** 2, 0.5 + 0 * x], -1),
          np.stack([np.sin(6 * x) ** 2, np.cos(5 * y) ** 2, x], -1),
          np.stack([(x > 0.5) * 1.0, (y > 0.5) * 1.0, 0.2 + 0 * x], -1)]
  return np.stack(imgs).astype(np.float32)  # NHWC


def main():
  import torch
  from pytorch_fid import inception as pi
  pi.load_state_dict_from_url = lambda *a, **k: None
  load = torch.nn.Module.load_state_dict
  torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None
  net = pi.fid_inception_v3()
  torch.nn.Module.load_state_dict = load
  sd = net.state_dict()
  names = list(sd)
  shapes = [list(v.shape) + [-1] * (4 - v.dim()) for v in sd.values()]
  weights = synthetic_weights(names, shapes)
  pi.load_state_dict_from_url = lambda *a, **k: {k: torch.from_numpy(v) for k, v in weights.items()}
  model = pi.InceptionV3([3]).eval()
  x = inputs()
  with torch.no_grad():
    f = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))[0][:, :, 0, 0].numpy()
  np.savez_compressed(OUT, names=np.array(names), shapes=np.array(shapes), images=x, features=f)
  print(OUT, f.shape, float(np.abs(f).max()), float(np.abs(f[0] - f[1]).max()))


if __name__ == "__main__":
  main()
