"""The CLI's default on the CPU backend: data parallel over two host devices."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, TEST_XLA_FLAGS, config, run_python
from jaxgen import runtime
from jaxgen.errors import ConfigError


@pytest.mark.parametrize("value,expected", [("1", 1), ("3", 3), (" 2 ", 2)])
def test_device_count_from_the_environment(monkeypatch, value, expected):
  monkeypatch.setenv("JAXGEN_CPU_DEVICES", value)
  assert runtime.default_cpu_devices() == expected


def test_default_device_count_is_capped_by_the_cores(monkeypatch):
  monkeypatch.delenv("JAXGEN_CPU_DEVICES", raising=False)
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  assert runtime.default_cpu_devices() == 1
  monkeypatch.setattr(os, "cpu_count", lambda: 16)
  assert runtime.default_cpu_devices() == runtime.DEFAULT_CPU_DEVICES


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_device_count_names_the_variable(monkeypatch, value):
  monkeypatch.setenv("JAXGEN_CPU_DEVICES", value)
  with pytest.raises(ConfigError, match="JAXGEN_CPU_DEVICES"):
    runtime.default_cpu_devices()


@pytest.mark.parametrize("batch,expected", [(64, 2), (8, 2), (6, 1), (4, 1), (7, 1), (1, 1)])
def test_training_splits_batches_of_at_least_four_per_device(monkeypatch, batch, expected):
  monkeypatch.setenv("JAXGEN_CPU_DEVICES", "2")
  assert runtime.cpu_devices_for_batch(batch) == expected


def test_started_backends_are_left_alone():
  import jax
  jax.devices()  # this process's backends are running
  before = len(jax.devices())
  assert runtime.configure_cpu_devices(4) is None
  assert len(jax.devices()) == before


def _jaxgen(*args, devices):
  env = dict(os.environ, JAXGEN_CPU_DEVICES=str(devices), PYTHONUNBUFFERED="1")
  # no device count from the environment (the tests' own flags stay: see conftest.py)
  env["XLA_FLAGS"] = TEST_XLA_FLAGS
  r = subprocess.run([sys.executable, "-m", "jaxgen", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return r.stdout + r.stderr


@pytest.mark.slow
def test_cli_trains_and_samples_over_two_host_devices(tmp_path):
  """`jaxgen train` splits each batch over two CPU devices; `jaxgen sample` gives the same
  images over two devices as over one (the starting noise does not depend on the split)."""
  wd = tmp_path / "ddpm"
  out = _jaxgen("train", "--config", f"{REPO}/configs/ddpm_class.py:smoke", "--workdir", str(wd),
                "--no-progress", "--config.train.num_steps=2", devices=2)
  assert "Data parallel over 2 cpu device(s)" in out, out[-2000:]
  images = {}
  for n in (2, 1):
    png = tmp_path / f"samples{n}.png"
    _jaxgen("sample", "--workdir", str(wd), "--num", "4", "--steps", "3", "--out", str(png),
            devices=n)
    images[n] = np.asarray(Image.open(png), np.int16)
  assert images[2].shape == images[1].shape
  assert np.abs(images[2] - images[1]).max() <= 1


def test_a_model_too_large_for_its_batch_trains_on_one_of_the_split_devices():
  """Past MAX_PARAMS_PER_EXAMPLE_CPU_SPLIT parameters per example, training takes back the
  default split (one device trains such a model faster); a count the user set is kept."""
  code = textwrap.dedent("""
      import jax
      from jaxgen import runtime
      runtime.setup_logging()
      assert runtime.configure_cpu_devices(2) == 2
      limit = runtime.MAX_PARAMS_PER_EXAMPLE_CPU_SPLIT * 16
      print(len(runtime.train_devices(lambda: limit, 16)),
            runtime.train_devices(lambda: limit + 1, 16))
  """)
  default = run_python(code, env={"JAXGEN_CPU_DEVICES": ""})
  assert default.returncode == 0, default.stderr[-3000:]
  assert default.stdout.split("\n")[0] == "2 [CpuDevice(id=0)]", default.stdout
  assert "One CPU device of 2" in default.stderr
  chosen = run_python(code, env={"JAXGEN_CPU_DEVICES": "2"})
  assert chosen.returncode == 0, chosen.stderr[-3000:]
  assert chosen.stdout.startswith("2 [CpuDevice(id=0), CpuDevice(id=1)]"), chosen.stdout


def test_training_asks_for_its_devices_with_the_state_s_parameter_count(tmp_path, monkeypatch):
  import jax

  from jaxgen import app
  asked = []

  def train_devices(count_params, batch):
    asked.append((count_params(), batch))
    return jax.devices()[:1]

  monkeypatch.setattr(runtime, "train_devices", train_devices)
  cfg = config("vae", "train.num_steps=1", "data.batch_size=4")
  state = app.train(cfg, tmp_path / "run", progress=False)
  assert asked == [(sum(x.size for x in jax.tree.leaves(state.params)), 4)]
