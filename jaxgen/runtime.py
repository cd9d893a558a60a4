"""Process set-up for the CLI and notebooks: logging, compilation cache, multi-host."""
from __future__ import annotations

import logging
import os
import pathlib

import jax

DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "jaxgen" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
  """Persists compiled programs across processes (the second run of a command skips compiling).

  The directory comes from `path`, else $JAXGEN_COMPILATION_CACHE, else ~/.cache/jaxgen/xla;
  the value 'off' disables it.
  """
  path = path or os.environ.get("JAXGEN_COMPILATION_CACHE") or DEFAULT_CACHE
  if str(path).lower() in ("off", "0", "none"):
    return None
  pathlib.Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return str(path)


def setup_logging(level: int = logging.INFO) -> None:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("jaxgen").setLevel(level)
  try:  # orbax and tfds log through absl at INFO: keep the console for jaxgen's own messages
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def initialize_distributed() -> None:
  """Multi-host: one process per host, coordinator found from the environment (TPU pods, SLURM,
  or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
