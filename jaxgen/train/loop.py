"""The one train loop, and restoring a run's whole TrainState for a built task.

WORKDIR/config.json      the resolved config of the latest start
WORKDIR/tokenizer/       the run's tokenizer (tasks with text), written at the first start
WORKDIR/checkpoints/N/   orbax checkpoints (TrainState + meta with the data position)
WORKDIR/metrics.jsonl    metrics; WORKDIR/tb/ TensorBoard events; WORKDIR/samples/ PNG grids
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxgen import config as config_lib
from jaxgen import images, runtime
from jaxgen.data import BatchLoader, batch_sharding, load_source
from jaxgen.errors import CheckpointError, ConfigError, NonFiniteLossError
from jaxgen.files import atomic_write_text, check_writable, make_dir, writing
from jaxgen.text.store import save_tokenizer
from jaxgen.train.checkpoint import Checkpointer, config_differences
from jaxgen.train.lock import WorkdirLock
from jaxgen.train.mesh import make_mesh, state_shardings
from jaxgen.train.metrics_writer import MetricWriter
from jaxgen.train.optim import make_optimizer
from jaxgen.train.state import TrainState
from jaxgen.train.step import make_train_step
from jaxgen.train.workdir import read_config

log = logging.getLogger(__name__)


def _state_factory(task, config, example: dict):
  tx, schedule = make_optimizer(config.optim, config.train.num_steps, task.frozen)
  example = jax.tree.map(lambda x: np.asarray(x[:1]), example)

  def init(key):
    k_init, k_rng = jax.random.split(key)
    params, model_state = task.init(k_init, example)
    if task.pretrained is not None:  # what it loads is not drawn at random first
      params, model_state = task.zeros_for_pretrained(params, model_state)
    return TrainState.create(params, tx, k_rng, model_state)

  return init, schedule


def param_count(task) -> int:
  """Parameters of the task's trained state (shapes only: nothing is computed)."""
  init, _ = _state_factory(task, task.config, task.example_batch())
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  return sum(x.size for x in jax.tree.leaves(shapes.params))


def _abstract_state(init, mesh, fsdp: bool = False):
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = state_shardings(shapes, mesh, fsdp)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _defaults(task) -> dict | None:
  """The task's base config: what a key missing from an older run's saved config means."""
  inner = getattr(task, "base", task)  # a LoRA task wraps the task of its base run
  try:
    sections = type(inner).default_config()
  except NotImplementedError:
    return None
  return config_lib.compose(task.config.task, sections).to_dict()


def _check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, has_ckpt: bool,
                   defaults: dict):
  if has_ckpt and (workdir / "config.json").exists():
    saved = read_config(workdir)  # a damaged config.json: the checkpoint's config
    diffs = config_differences(saved, config.to_dict(), defaults)
    if diffs:
      raise CheckpointError(
          f"{workdir} holds a run of another model config:\n  " + "\n  ".join(diffs)
          + "\nUse another --workdir, or the saved config. Nothing was deleted.")


@dataclasses.dataclass
class _Pending:
  """Metrics stay on the device until a log or save point reads them back in one go."""
  on_device: list = dataclasses.field(default_factory=list)
  on_host: list = dataclasses.field(default_factory=list)

  def fetch(self) -> list[tuple[int, dict]]:
    fresh, self.on_device = jax.device_get(self.on_device), []
    self.on_host += fresh
    return fresh

  def take(self) -> list[tuple[int, dict]]:
    self.fetch()
    rows, self.on_host = self.on_host, []
    return rows


def train(task, workdir: str | pathlib.Path, *, progress: bool = True,
          until_step: int | None = None, mesh=None) -> TrainState:
  """Trains a built task (`jaxgen.app.build_task(config)`) in `workdir`, resuming from its latest
  checkpoint. Returns the final state.

  `until_step` stops early (with a checkpoint) as if the run had been interrupted there. One
  training per workdir: process 0 holds WORKDIR/jaxgen.lock while it runs.
  """
  if not str(workdir).strip():
    raise ConfigError("--workdir is empty: name the folder for this run's checkpoints and logs.")
  workdir = make_dir(workdir)
  check_writable(workdir)
  if mesh is None:
    mesh = make_mesh(runtime.train_devices(lambda: param_count(task),
                                           task.config.data.batch_size))
  log.info("Data parallel over %d %s device(s); global batch %d", mesh.size,
           mesh.devices.flat[0].platform, task.config.data.batch_size)
  # The mesh is also the context of the run's other computations (cached encodings, pictures):
  # their batches are split over its devices too.
  # Every process calls _train from this one line: under jax 0.12.1 a jitted program's run id,
  # which pairs up the processes' collectives, depends on where it was traced from, and
  # processes that differ there wait forever in their first all-reduce.
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with jax.set_mesh(mesh), lock:
    return _train(task, workdir, progress, until_step, mesh)


def _train(task, workdir: pathlib.Path, progress: bool, until_step: int | None, mesh
           ) -> TrainState:
  config = task.config
  c, t = config, config.train
  loader = BatchLoader(load_source(c.data, c.data.train_split), c.data.batch_size, c.seed,
                       c.data.shuffle, preprocess=task.preprocess)
  # The held-out split is read now, so that a bad file there stops the run before any step,
  # not at the first picture (whose checkpoint would then never be written).
  load_source(c.data, c.data.eval_split)
  ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
  latest = ckpt.latest_step()
  _check_workdir(workdir, config, latest is not None, _defaults(task))
  init, schedule = _state_factory(task, config, loader.get(0))
  abstract = _abstract_state(init, mesh, t.fsdp)
  state_sharding = jax.tree.map(lambda s: s.sharding, abstract)
  if jax.process_index() == 0:
    atomic_write_text(workdir / "config.json", config_lib.to_json(config))
    with writing(workdir / "tokenizer"):
      save_tokenizer(workdir, config, getattr(task, "tokenizer", None))

  start = 0
  if latest is not None:
    state, meta = ckpt.restore(latest, abstract, config.to_dict(), defaults=_defaults(task))
    start = int(meta["data"]["batches_consumed"])
    saved_data = meta["data"]
    if (saved_data["dataset_size"], saved_data["global_batch"]) != (loader.n, loader.global_batch):
      log.warning("Data set size or batch size changed since the checkpoint (%s -> %s); "
                  "resuming, but batches differ from an uninterrupted run.",
                  (saved_data["dataset_size"], saved_data["global_batch"]),
                  (loader.n, loader.global_batch))
    log.info("Resumed from %s at step %d", ckpt.directory / str(latest), start)
  else:
    state = runtime.run_once(init, jax.random.PRNGKey(c.seed), out_shardings=state_sharding)
    if task.pretrained is not None:
      params, model_state = task.pretrained(state.params, state.model_state)
      state = jax.device_put(state.replace(params=params, model_state=model_state),
                             state_sharding)
      # EMA starts at the pretrained weights, in buffers of its own (the step donates both).
      copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state_sharding.params)
      state = state.replace(ema_params=copy(state.params))

  if task.prepare is not None:
    task.prepare(state)
  loader.cached = task.cached_inputs(state, loader.source)
  train_step = make_train_step(task.loss_fn, ema_decay=c.optim.ema_decay, schedule=schedule,
                               state_sharding=state_sharding,
                               batch_sharding=batch_sharding(mesh),
                               accum_steps=c.optim.grad_accum_steps, frozen=task.frozen)
  end = t.num_steps if until_step is None else min(until_step, t.num_steps)
  writer = MetricWriter(workdir, resume_step=start)
  pending = _Pending()
  last_saved = latest
  bar = tqdm(total=t.num_steps, initial=start, unit="step", dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0)
  tick, tick_step = time.perf_counter(), start

  def check_finite():
    for s, m in pending.fetch():
      if not bool(m["finite"]):
        how = ckpt.verified.get(last_saved)
        if last_saved is None:
          where = "no checkpoint had been written yet"
        elif how == "checksums":
          where = f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}"
        elif how == "finite":
          where = (f"the last checkpoint (step {last_saved}) is kept in {ckpt.directory}; it "
                   "had no checksums when it was restored (only its values were checked), so "
                   "it may itself be damaged")
        else:
          where = (f"the last checkpoint (step {last_saved}) is kept in {ckpt.directory}, not "
                   "yet verified")
        raise NonFiniteLossError(
            f"Loss became {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}. "
            f"Training stopped; {where}. Lower optim.lr, keep optim.grad_clip on, or check "
            "the data for NaNs.")

  def log_metrics(step: int):
    nonlocal tick, tick_step
    check_finite()
    rows = pending.take()
    now = time.perf_counter()
    ips = (step - tick_step) * c.data.batch_size / max(now - tick, 1e-9)
    tick, tick_step = now, step
    mean = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1] if k != "finite"}
    mean["images_per_s"] = ips
    writer.write(step, mean)
    bar.set_postfix(loss=f"{mean['loss']:.4g}", img_s=f"{ips:.0f}")

  def write_pictures(step: int):
    if jax.process_index() != 0:
      return
    key = jax.random.PRNGKey(c.seed + 1)  # same noise every time: grids are comparable
    for name, pic in task.pictures(state.ema_params, state.model_state, key).items():
      images.save_png(pic, workdir / "samples" / f"{name}_step{step:07d}.png")
      writer.image(step, name, pic)

  batches = loader.iterate(start, mesh)
  try:
    for step in range(start, end):
      state, metrics = train_step(state, next(batches))
      pending.on_device.append((step + 1, metrics))
      if len(pending.on_device) > 2:
        # Wait (no transfer) for the step two behind: the device always has the next step
        # queued, while the host does not run far ahead, so the bar and its ETA are honest.
        pending.on_device[-3][1]["loss"].block_until_ready()
      bar.update(1)
      done = step + 1
      if done % t.log_every == 0 or done == end:
        log_metrics(done)
      if t.sample_every and (done % t.sample_every == 0 or done == t.num_steps):
        check_finite()
        write_pictures(done)
      if done % t.ckpt_every == 0 or done == end:
        check_finite()
        ckpt.save(done, state, {"config": config.to_dict(), "data": loader.state(done)})
        last_saved = done
    if start >= end:
      log.info("Nothing to do: the checkpoint is already at step %d of %d.", start, end)
  finally:
    batches.close()
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state


def restore_state(task, workdir: str | pathlib.Path, step: int, mesh=None) -> TrainState:
  """The whole TrainState of checkpoint `step` in WORKDIR, with the task's shapes and the
  mesh's shardings (what resuming and `app.restore_run` use)."""
  workdir = pathlib.Path(workdir)
  mesh = mesh or make_mesh()
  init, _ = _state_factory(task, task.config, task.example_batch())
  abstract = _abstract_state(init, mesh, task.config.train.fsdp)
  ckpt = Checkpointer(workdir / "checkpoints", keep=task.config.train.keep_checkpoints)
  try:
    state, _ = ckpt.restore(step, abstract, task.config.to_dict(),
                            defaults=_defaults(task))
  finally:
    ckpt.close()
  return state
