"""Reads PyTorch `.pth`/`.pt` state dicts into NumPy without importing torch.

Both the zip format (torch >= 1.6) and the legacy pickle stream are understood. Unpickling is
restricted to tensor rebuilding and a few containers, so a file cannot run arbitrary code.
"""
from __future__ import annotations

import collections
import io
import pathlib
import pickle
import struct
import zipfile

import numpy as np

from jaxgen.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Storage is a flat NumPy array; builds the strided view and copies it."""
  itemsize = storage.dtype.itemsize
  if not size:
    return np.array(storage[offset], copy=True)
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
  return data


class _PlainUnpickler(pickle.Unpickler):
  """Plain data only (numbers, strings, bytes, lists, tuples, dicts): no class is ever looked
  up, so nothing in the stream can run code. For the legacy format's header records."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("unexpected persistent id in a weights file header")


def _plain_load(f):
  return _PlainUnpickler(f).load()


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name == "Size":
      return tuple
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
    dtype = _STORAGE_DTYPES.get(storage_type.name)
    if dtype is None:
      raise pickle.UnpicklingError(f"unsupported tensor storage {storage_type.name}")
    return self._load_storage(str(key), np.dtype(dtype), int(numel))


def _load_zip(path: pathlib.Path):
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
    prefix = pkl[:-len("data.pkl")]
    cache = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        raw = z.read(f"{prefix}data/{key}")
        cache[key] = np.frombuffer(raw, dtype=dtype, count=numel)
      return cache[key]

    return _Unpickler(io.BytesIO(z.read(pkl)), load_storage).load()


def _load_legacy(path: pathlib.Path):
  """The pre-1.6 stream: magic, protocol, sys info, object, storage keys, raw storages."""
  with path.open("rb") as f:
    magic = _plain_load(f)  # never pickle.load: a hostile file would run code
    if magic != _LEGACY_MAGIC:
      raise pickle.UnpicklingError("not a PyTorch file (no legacy magic number)")
    _plain_load(f)  # protocol version
    _plain_load(f)  # sys info
    pending: dict[str, tuple] = {}
    placeholders: dict[str, np.ndarray] = {}

    def load_storage(key, dtype, numel):
      if key not in placeholders:
        placeholders[key] = np.empty(numel, dtype)
        pending[key] = (dtype, numel)
      return placeholders[key]

    # Tensors are rebuilt before their bytes are read: rebuild lazily from placeholders.
    class Deferred(tuple):
      pass

    def rebuild(storage, offset, size, stride, *unused):
      return Deferred((storage, offset, size, stride))

    unpickler = _Unpickler(f, load_storage)
    unpickler.find_class = (lambda module, name, _orig=unpickler.find_class:
                            rebuild if (module, name) == ("torch._utils", "_rebuild_tensor_v2")
                            else _orig(module, name))
    obj = unpickler.load()
    keys = _plain_load(f)
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in pending for k in keys):
      raise pickle.UnpicklingError("storage keys do not match the tensors")
    for key in keys:
      (size,) = struct.unpack("<q", f.read(8))
      dtype, numel = pending[key]
      data = np.frombuffer(f.read(size * dtype.itemsize), dtype=dtype, count=size)
      placeholders[key][:] = data[:numel]
  return {k: _rebuild_tensor(*v) if isinstance(v, Deferred) else v for k, v in obj.items()}


def load_torch_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """name -> NumPy array from a file written by `torch.save(model.state_dict(), path)`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"Weights file not found: {path}")
  try:
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError,
          StopIteration, struct.error, zipfile.BadZipFile, MemoryError, OverflowError) as e:
    raise CheckpointError(f"Could not read {path} as a PyTorch state dict: {e}") from e
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
  return {k: np.asarray(v) for k, v in obj.items()}
