"""Process set-up for the CLI and notebooks: logging, compilation cache, multi-host."""
from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable

import jax

DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "jaxgen" / "xla"
# Host devices on the CPU backend: two programs side by side keep both cores of a small machine
# busy where one program's many small operations leave one idle (benchmarks/results/suite.md).
DEFAULT_CPU_DEVICES = 2
log = logging.getLogger("jaxgen")


def default_cpu_devices() -> int:
  """The CPU backend's device count the CLI asks for: $JAXGEN_CPU_DEVICES, else
  DEFAULT_CPU_DEVICES capped at the machine's cores."""
  value = os.environ.get("JAXGEN_CPU_DEVICES", "").strip()
  if not value:
    return max(1, min(DEFAULT_CPU_DEVICES, os.cpu_count() or 1))
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n < 1:
    from jaxgen.errors import ConfigError
    raise ConfigError(f"JAXGEN_CPU_DEVICES must be a whole number of at least 1, got {value!r}")
  return n


# Fewer examples per device than this and one device does better: the SD-like U-Net at batch 4
# trains at 0.64 images/s on one device, 0.47 on two (README, "Performance").
MIN_BATCH_PER_CPU_DEVICE = 4
# More parameters than this per example of the batch and one device trains faster than two:
# a large matmul-heavy model already keeps both cores busy through XLA's threads, and each device
# repeats the whole AdamW update. CLIP ViT-B/32 (126M) at batch 16, 7.9M per example: 6.19 s per
# step on one device, 8.27 s on two (6.23 s with FSDP); the DDPM paper's U-Net (35.7M) at batch
# 16, 2.2M per example, trains 1.46x faster on two (README, "Performance").
MAX_PARAMS_PER_EXAMPLE_CPU_SPLIT = 4_000_000
# Set by configure_cpu_devices when it splits the CPU by its own default (not a count the user
# chose): train_devices may then take back the split for a model too large for it.
_default_split = False


def cpu_devices_for_batch(batch: int) -> int:
  """The device count `jaxgen train` asks for: the largest up to default_cpu_devices() that
  splits the batch into parts of at least MIN_BATCH_PER_CPU_DEVICE examples; else 1."""
  fits = [k for k in range(1, default_cpu_devices() + 1)
          if batch % k == 0 and batch // k >= MIN_BATCH_PER_CPU_DEVICE]
  return max(fits, default=1)


def configure_cpu_devices(n: int | None = None) -> int | None:
  """Splits the CPU backend into `n` devices (default: default_cpu_devices()) so that the train
  loop and the samplers run data parallel over them. Takes effect only before JAX starts its
  backends; left alone when XLA_FLAGS or jax_num_cpu_devices already set a count. Returns the
  count set, or None. Other backends (GPU, TPU) are not affected."""
  from jax._src import xla_bridge
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or jax.config.jax_num_cpu_devices != -1):
    return None
  n = default_cpu_devices() if n is None else n
  if xla_bridge.backends_are_initialized():
    log.debug("JAX already started: the CPU device count stays as it is")
    return None
  if n > 1:
    jax.config.update("jax_num_cpu_devices", n)
    global _default_split
    _default_split = not os.environ.get("JAXGEN_CPU_DEVICES", "").strip()
  return n


def cpu_split_pays(n_params: int, batch: int) -> bool:
  """Whether splitting the CPU into devices can speed up training a model of n_params
  parameters at this global batch (MAX_PARAMS_PER_EXAMPLE_CPU_SPLIT)."""
  return n_params <= MAX_PARAMS_PER_EXAMPLE_CPU_SPLIT * batch


def train_devices(count_params: Callable[[], int], batch: int) -> list:
  """The devices a training runs data parallel over: all of this process's, or only the first
  where configure_cpu_devices split the CPU by default and the model has more than
  MAX_PARAMS_PER_EXAMPLE_CPU_SPLIT parameters per example of the (global) batch.
  count_params is called only in that case (it traces the model's init)."""
  devices = jax.devices()
  if not (_default_split and len(devices) > 1 and devices[0].platform == "cpu"):
    return devices
  n_params = count_params()
  if not cpu_split_pays(n_params, batch):
    log.info("One CPU device of %d: %.1fM parameters for a batch of %d train faster unsplit "
             "(JAXGEN_CPU_DEVICES=%d splits it anyway)", len(devices), n_params / 1e6, batch,
             len(devices))
    return devices[:1]
  return devices


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
  # Every program, however quick to compile: flax's eager `init` and eager array code compile
  # hundreds of small programs (tens of ms each) that recur in every process. With a threshold
  # of 0.5 s they were compiled afresh each time: tests/convert/test_lora.py's training test took
  # 71.6 s with a warm cache, 44.6 s with every program cached (847 compiles, 20 s, skipped).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return str(path)


# A program that runs once, such as a model's initialisation, is compiled with LLVM's cheapest
# code generation on the CPU (XLA's HLO passes are unchanged): its random initialisers (an
# unrolled threefry hash per parameter array) make it slow to compile, and it runs once. The
# cheaper code runs slower, about 60 ns more per parameter drawn, so an output of more than
# RUN_ONCE_MAX_ELEMENTS values is compiled as jit compiles it. Measured on 2 cores, compile + run
# of the train state's init (python benchmarks/init_compile.py; benchmarks/results/
# init_compile.md): configs/vae.py 6.5 -> 2.5 s, configs/ddpm_class.py 11.9 -> 4.9 s,
# configs/ldm.py 26.7 -> 16.5 s, the SD-like U-Net's state (150M parameters, 600M values) 67.4 ->
# 56.9 s (its run 2.0 -> 11.2 s; by that rate, not measured, SD 1.5's 860M-parameter state would
# lose). Values can differ from the fully optimised program's in the last bit (contracted
# multiply-adds).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
RUN_ONCE_MAX_ELEMENTS = 2 ** 30


def run_once(fn: Callable, *args, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)(*args)` for a program called once: on the CPU, where its output
  has at most RUN_ONCE_MAX_ELEMENTS values, compiled with RUN_ONCE_COMPILER_OPTIONS."""
  jitted = jax.jit(fn, **jit_kwargs)
  if jax.default_backend() != "cpu":
    return jitted(*args)
  traced = jitted.trace(*args)
  size = sum(x.size for x in jax.tree.leaves(traced.out_info))
  options = RUN_ONCE_COMPILER_OPTIONS if size <= RUN_ONCE_MAX_ELEMENTS else None
  return traced.lower().compile(compiler_options=options)(*args)


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
