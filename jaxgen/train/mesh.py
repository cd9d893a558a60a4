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


def placement() -> jax.sharding.Sharding:
  """Where restored weights are placed: replicated over the mesh set by `jax.set_mesh` (the CLI
  sets one), else on this process's first device (no copy per device that nobody asked for)."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    return single_device(jax.local_devices()[0])
  return replicated(mesh)


def single_device(device) -> jax.sharding.Sharding:
  """A sharding on one device: `make_single_device_sharding` where jax has it (jax 0.12 warns
  that the `SingleDeviceSharding` class is deprecated), else that class."""
  make = getattr(jax.sharding, "make_single_device_sharding", None)
  return make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)


def constrain_batch(x: jax.Array) -> jax.Array:
  """x split on its leading (batch) axis over the 'data' axis of the mesh set by `jax.set_mesh`,
  where that axis has several devices and divides the batch; else x unchanged. The samplers
  apply it to their starting noise, so that sampling under a mesh runs data parallel (XLA
  propagates the split through the network) instead of every device computing every image."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "data" not in mesh.axis_names:
    return x
  n = mesh.shape["data"]
  if n == 1 or x.ndim == 0 or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, P("data"))


def put_batch(x):
  """A host batch placed split over the 'data' axis of the mesh set by `jax.set_mesh` (when that
  axis has several devices and divides it), else unchanged: the input of a batched jitted
  function then runs data parallel."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty or "data" not in mesh.axis_names or mesh.shape["data"] == 1:
    return x
  n = mesh.shape["data"]
  if x.ndim == 0 or x.shape[0] % n or x.dtype.kind in "USO":
    return x
  return jax.device_put(x, NamedSharding(mesh, P("data")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], n: int, min_size: int = 2 ** 14) -> P:
  """FSDP (ZeRO-3) placement of one array: its largest axis divisible by the n devices of the
  'data' axis is split over them; small arrays (biases, norms) stay replicated."""
  size = 1
  for d in shape:
    size *= d
  if n == 1 or size < min_size:
    return P()
  axes = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in axes:
    if shape[i] % n == 0:
      return P(*([None] * i + ["data"]))
  return P()


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool = False):
  """Shardings of a TrainState: replicated (data parallel), or with parameters, their EMA and
  the optimizer state split over the 'data' axis (FSDP). XLA gathers a layer's parameters
  where they are used and reduce-scatters their gradients; the program is otherwise the same."""
  rep = replicated(mesh)
  if not fsdp:
    return jax.tree.map(lambda _: rep, abstract_state)
  n = mesh.shape["data"]
  split = lambda s: NamedSharding(mesh, fsdp_spec(tuple(s.shape), n))
  return abstract_state.replace(
      step=rep, rng=rep, model_state=jax.tree.map(lambda _: rep, abstract_state.model_state),
      params=jax.tree.map(split, abstract_state.params),
      ema_params=jax.tree.map(split, abstract_state.ema_params),
      opt_state=jax.tree.map(split, abstract_state.opt_state))
