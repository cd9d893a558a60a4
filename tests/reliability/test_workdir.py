"""One writer per workdir, every checkpoint verified, write failures and damaged files in the
workdir: each gives a clear jaxgen error (or a warning and the right behaviour), nothing lost."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, config, files_under, run_python
from jaxgen import app, files
from jaxgen.cli import main
from jaxgen.errors import CheckpointError, NonFiniteLossError, WorkdirBusyError, WriteError
from jaxgen.train.checkpoint import CHECKSUMS, Checkpointer
from jaxgen.train.lock import LOCK_FILE, WorkdirLock

pytestmark = pytest.mark.slow


def _cli(capsys, *argv):
  with pytest.raises(SystemExit) as e:
    main(list(argv))
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A VAE smoke run of 4 steps with checkpoints at 2 and 4; tests work on copies of it."""
  wd = tmp_path_factory.mktemp("vae") / "run"
  app.train(config("vae", "train.sample_every=0"), wd, progress=False)
  return wd


@pytest.fixture
def copy(run, tmp_path):
  import shutil
  dst = tmp_path / "copy"
  shutil.copytree(run, dst)
  return dst


# -- one writer per workdir ----------------------------------------------------------------------
def test_a_second_training_stops_at_once_naming_the_holder(copy, capsys):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (copy / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(),
                                              "pid": sleeper.pid, "started": 0}))
    before = files_under(copy)
    code, _, err = _cli(capsys, "train", "--config", f"{REPO}/configs/vae.py:smoke",
                        "--workdir", str(copy), "--config.train.sample_every=0",
                        "--config.train.num_steps=6", "--no-progress")
    assert code == 1 and f"is being trained by process {sleeper.pid}" in err
    assert "Traceback" not in err and files_under(copy) == before
    # Readers do not take the lock.
    main(["eval", "--workdir", str(copy), "--limit", "8"])
    assert json.loads(capsys.readouterr().out)["step"] == 4
  finally:
    sleeper.kill()


def test_a_stale_lock_is_taken_over_and_released(copy, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (copy / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
  app.train(config("vae", "train.sample_every=0", "train.num_steps=6"), copy, progress=False)
  assert "stale lock" in caplog.text
  assert not (copy / LOCK_FILE).exists()


def test_lock_of_another_host_is_respected(tmp_path):
  (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
  with pytest.raises(WorkdirBusyError, match="on host elsewhere"):
    WorkdirLock(tmp_path).acquire()


def test_metrics_have_one_row_per_step_after_resumes(tmp_path):
  c = config("vae", "train.sample_every=0", "train.log_every=1", "train.ckpt_every=2",
             "train.num_steps=6")
  wd = tmp_path / "run"
  app.train(c, wd, progress=False, until_step=3)  # rows 1-3 written, checkpoint at 2 and 3
  # As if the process had died after logging step 4 but before its checkpoint:
  with open(wd / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
  app.train(c, wd, progress=False)
  steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]


# -- every checkpoint verified -------------------------------------------------------------------
def test_every_save_is_sealed_with_checksums(run):
  for step in (2, 4):
    assert (run / "checkpoints" / str(step) / CHECKSUMS).is_file()


def test_an_unsealed_finite_checkpoint_is_checked_accepted_and_sealed(copy, caplog):
  (copy / "checkpoints" / "4" / CHECKSUMS).unlink()
  restored = app.restore_run(copy)
  assert restored.step == 4 and "arrays were restored and are all finite" in caplog.text
  assert (copy / "checkpoints" / "4" / CHECKSUMS).is_file()


def test_an_unsealed_non_finite_checkpoint_is_refused_until_accepted(tmp_path, capsys):
  directory = tmp_path / "w" / "checkpoints"
  ckpt = Checkpointer(directory)
  ckpt.save_weights(1, {"params": {"w": np.array([1.0, np.nan], np.float32)},
                        "model_state": {}}, {"config": {}})
  ckpt.close()
  (directory / "1" / CHECKSUMS).unlink()
  ckpt = Checkpointer(directory)
  with pytest.raises(CheckpointError, match=r"holds NaN or Inf in .*jaxgen verify --workdir "
                     r".* --step 1 --accept"):
    ckpt.restore_weights(1)
  ckpt.close()
  code, out, _ = _cli(capsys, "verify", "--workdir", str(tmp_path / "w"))
  assert code == 1 and "step 1: no checksums, non-finite" in out
  main(["verify", "--workdir", str(tmp_path / "w"), "--accept"])
  assert "step 1: no checksums, non-finite: ['params']['w']; accepted" in capsys.readouterr().out
  assert (directory / "1" / CHECKSUMS).is_file()


def test_nan_after_an_unverified_restore_is_not_called_good(copy, monkeypatch):
  from jaxgen.tasks.vae import AutoencoderTask
  (copy / "checkpoints" / "4" / CHECKSUMS).unlink()
  os.remove(copy / "checkpoints" / "2" / CHECKSUMS)
  original = AutoencoderTask.loss_fn

  def nan_loss(self, params, model_state, batch, key):
    loss, aux = original(self, params, model_state, batch, key)
    return loss * np.nan, aux

  monkeypatch.setattr(AutoencoderTask, "loss_fn", nan_loss)
  with pytest.raises(NonFiniteLossError, match="step 4.*had no checksums when it was restored"):
    app.train(config("vae", "train.sample_every=0", "train.num_steps=6"), copy, progress=False)


# -- write failures ------------------------------------------------------------------------------
def test_full_disk_stops_before_the_save_and_keeps_earlier_checkpoints(copy, monkeypatch,
                                                                       capsys):
  import shutil
  before = files_under(copy / "checkpoints")
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
  code, _, err = _cli(capsys, "train", "--config", f"{REPO}/configs/vae.py:smoke", "--workdir",
                      str(copy), "--config.train.sample_every=0", "--config.train.num_steps=6",
                      "--no-progress")
  assert code == 1 and "Not enough disk space to save step 6" in err and "Traceback" not in err
  after = files_under(copy / "checkpoints")
  assert {k: v for k, v in after.items() if k in before} == before
  monkeypatch.undo()
  assert app.restore_run(copy).step == 4


def test_read_only_and_file_workdirs_are_named(tmp_path, monkeypatch, capsys):
  f = tmp_path / "afile"
  f.write_text("x")
  code, _, err = _cli(capsys, "train", "--config", f"{REPO}/configs/vae.py:smoke", "--workdir",
                      str(f))
  assert code == 1 and f"{f} is a file, not a folder" in err and f.read_text() == "x"
  code, _, err = _cli(capsys, "train", "--config", f"{REPO}/configs/vae.py:smoke", "--workdir",
                      "")
  assert code == 2 and "--workdir is empty" in err

  import errno

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(files.pathlib.Path, "write_bytes", read_only)
  code, _, err = _cli(capsys, "train", "--config", f"{REPO}/configs/vae.py:smoke", "--workdir",
                      str(tmp_path / "ro"))
  assert code == 1 and "the file system is read-only" in err and str(tmp_path / "ro") in err


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  import errno
  path = tmp_path / "config.json"
  path.write_text('{"task": "vae"}')

  def full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(files.os, "fsync", full)
  with pytest.raises(WriteError, match=f"Could not write {path}: the disk is full"):
    files.atomic_write_text(path, '{"task": "vae", "seed": 1}')
  assert path.read_text() == '{"task": "vae"}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_damaged_config_json_falls_back_to_the_checkpoint(copy, capsys, caplog):
  (copy / "config.json").write_text('{"task": "va')  # cut by a full disk
  main(["sample", "--workdir", str(copy), "--num", "4", "--pairs", "1", "--steps", "3"])
  assert capsys.readouterr().out.count(".png") == 3
  assert "using the config stored in its latest checkpoint" in caplog.text
  (copy / "config.json").write_text("[1, 2]")
  assert app.restore_run(copy).step == 4
  app.train(config("vae", "train.sample_every=0", "train.num_steps=6"), copy, progress=False)
  assert json.loads((copy / "config.json").read_text())["task"] == "vae"


def test_killed_training_leaves_restorable_sealed_checkpoints(tmp_path):
  """SIGKILL right after a save commits: the step is sealed by the background thread or, if
  the kill came first, accepted after the finite check; either way the run resumes."""
  code = (
      "import sys; sys.path.insert(0, 'tests')\n"
      "from helpers import config\nfrom jaxgen import app\n"
      f"app.train(config('vae', 'train.sample_every=0', 'train.num_steps=2'), "
      f"r'{tmp_path / 'run'}', progress=False)\n"
      "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n")
  r = run_python(code)
  assert r.returncode == -9
  state = app.restore_run(tmp_path / "run")
  assert state.step == 2


def test_a_failure_in_the_background_commit_is_a_write_error(tmp_path, monkeypatch):
  import errno
  ckpt = Checkpointer(tmp_path / "checkpoints")
  import threading
  real = ckpt._mngr.wait_until_finished

  def failing():
    real()
    if threading.current_thread().name.startswith("jaxgen-seal"):  # orbax's writer failed
      raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt._mngr, "wait_until_finished", failing)
  ckpt.save_weights(1, {"params": {"w": np.ones(3, np.float32)}, "model_state": {}},
                    {"config": {}})
  with pytest.raises(WriteError, match="Saving a checkpoint in .* failed: the disk is full"):
    ckpt.wait()
  ckpt.wait()  # reported once
  ckpt.close()
