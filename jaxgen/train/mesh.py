"""Device mesh and shardings for data-parallel training (one CPU, many devices, many hosts)."""
from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices (of all processes) with the axis 'data'.

  Auto axes: the compiler propagates shardings through the model, so the same model code runs
  unchanged on 1 or N devices; batches are split on 'data' and parameters replicated.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
