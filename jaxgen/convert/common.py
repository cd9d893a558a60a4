"""What every weight importer shares: one clear error for tensors that do not fit the model."""
from __future__ import annotations

from typing import Iterable

from jaxgen.errors import CheckpointError


def _listing(names: Iterable[str], n: int = 12) -> str:
  names = sorted(names)
  more = f", ... ({len(names) - n} more)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def check_complete(what: str, missing, misshaped, unused) -> None:
  """Raises CheckpointError naming parameters without a tensor, tensors of the wrong shape and
  tensors the model does not use: an import never silently drops or invents weights."""
  problems = []
  if missing:
    problems.append(f"{len(missing)} parameters have no tensor: {_listing(missing)}")
  if misshaped:
    problems.append(f"{len(misshaped)} tensors have the wrong shape: {_listing(misshaped)}")
  if unused:
    problems.append(f"{len(unused)} tensors are not used by the model: {_listing(unused)}")
  if problems:
    raise CheckpointError(f"{what} weights do not match the model built from the config: "
                          + "; ".join(problems))
