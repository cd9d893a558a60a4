"""No code runs from any file jaxgen reads: PyTorch weights (legacy pickle stream and zip),
safetensors, npz. Each payload would create a file if it ran; the test asserts it does not."""
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from jaxgen.convert.diffusers import read_safetensors
from jaxgen.convert.torch_pickle import load_torch_state_dict
from jaxgen.data.sources import load_npz
from jaxgen.errors import CheckpointError, DataError


class Payload:
  """Unpickling this calls os.system: it would create `target`."""

  def __init__(self, target):
    self.target = str(target)

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def _legacy(tmp_path, header=None, body=None):
  path = tmp_path / "evil.pth"
  f = io.BytesIO()
  magic = 0x1950A86A20F9469CFC6C
  pickle.dump(header if header is not None else magic, f, protocol=2)
  pickle.dump(1001, f, protocol=2)
  pickle.dump({"little_endian": True}, f, protocol=2)
  pickle.dump(body if body is not None else {"w": 1}, f, protocol=2)
  pickle.dump([], f, protocol=2)
  path.write_bytes(f.getvalue())
  return path


@pytest.mark.parametrize("where", ["magic", "state_dict"])
def test_legacy_pytorch_file_runs_no_code(tmp_path, where):
  target = tmp_path / "pwned"
  evil = Payload(target)
  path = _legacy(tmp_path, header=evil if where == "magic" else None,
                 body={"w": evil} if where == "state_dict" else None)
  with pytest.raises(CheckpointError, match="Could not read .* as a PyTorch state dict"):
    load_torch_state_dict(path)
  assert not target.exists()


def test_zip_pytorch_file_runs_no_code(tmp_path):
  target = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"w": Payload(target)}, protocol=2))
  with pytest.raises(CheckpointError, match="refusing to load posix.system|refusing to load"):
    load_torch_state_dict(path)
  assert not target.exists()


def test_fid_weights_path_refuses_a_hostile_file(tmp_path):
  from jaxgen.eval.fid import InceptionFeatures
  target = tmp_path / "pwned"
  path = _legacy(tmp_path, body={"w": Payload(target)})
  with pytest.raises(CheckpointError):
    InceptionFeatures.from_file(path)
  assert not target.exists()


@pytest.mark.parametrize("header, message", [
    (struct.pack("<Q", 2 ** 62), "header length .* exceeds the file"),
    (struct.pack("<Q", 5) + b"nojso", "header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    (b"\x01\x02", "shorter than its 8-byte header length"),
])
def test_garbage_safetensors_is_a_clear_error(tmp_path, header, message):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(header)
  with pytest.raises(CheckpointError, match=message):
    read_safetensors(path)


def test_safetensors_offsets_are_bounds_checked(tmp_path):
  import json
  head = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
  path = tmp_path / "short.safetensors"
  path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 16)
  with pytest.raises(CheckpointError, match=r"spans bytes \[0, 4000\) of 16"):
    read_safetensors(path)


def test_npz_with_a_pickled_object_runs_no_code(tmp_path):
  target = tmp_path / "pwned"
  path = tmp_path / "evil.npz"
  images = np.empty(2, dtype=object)
  images[0], images[1] = Payload(target), Payload(target)
  np.savez(path, images=images)  # object arrays are pickled inside the npz
  with pytest.raises(DataError):
    load_npz(str(path), "train", 8, 1, 0.5)
  assert not target.exists()
