"""Multi-device and multi-process behaviour, each in its own process."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from helpers import REPO, config, params_of, run_python
from jaxgen.app import train

pytestmark = pytest.mark.slow


def test_eight_devices_match_one_device(tmp_path):
  code = textwrap.dedent(f"""
      import sys; sys.path.insert(0, "tests")
      import jax, numpy as np
      from jaxgen import runtime
      runtime.enable_compilation_cache()
      from helpers import config, params_of
      from jaxgen.app import train
      from jaxgen.train import make_mesh
      assert len(jax.devices()) == 8
      # The VAE, and SimCLR, whose BatchNorm statistics and NT-Xent negatives span the batch.
      for name in ("vae", "simclr"):
        c = config(name, "train.num_steps=3", "train.sample_every=0", "data.batch_size=16")
        s8 = train(c, f"{tmp_path}/{{name}}8", progress=False, mesh=make_mesh())
        s1 = train(c, f"{tmp_path}/{{name}}1", progress=False, mesh=make_mesh(jax.devices()[:1]))
        leaf = jax.tree.leaves(s8.params)[0]
        assert len(leaf.sharding.device_set) == 8, leaf.sharding
        a = params_of((s8.params, s8.model_state))
        b = params_of((s1.params, s1.model_state))
        diff = max(float(np.max(np.abs(x - y)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        print(name, "max_abs_diff", diff)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
          np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
      print("OK")
  """)
  r = run_python(code, devices=8)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
  """A real `jaxgen train` process is killed while orbax writes step 4; the next run resumes
  from step 2 and ends with exactly the parameters of an uninterrupted run."""
  wd, marker = tmp_path / "run", tmp_path / "saving"
  code = textwrap.dedent(f"""
      import asyncio, pathlib
      from orbax.checkpoint._src.handlers import json_checkpoint_handler as j
      original = j.JsonCheckpointHandler._save_fn
      async def slow_save(self, item, directory):
        await original(self, item, directory)
        if isinstance(item, dict) and item.get("step") == 4:
          pathlib.Path("{marker}").touch()
          await asyncio.sleep(600)   # the save of step 4 never completes
      j.JsonCheckpointHandler._save_fn = slow_save
      from jaxgen.cli import main
      main(["train", "--config", "configs/vae.py:smoke", "--workdir", "{wd}", "--no-progress",
            "--config.train.num_steps=6"])
  """)
  # One device, as the resumed and the uninterrupted runs below: bit-for-bit equality holds for
  # one device count (two split the gradient sums in another order).
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, JAXGEN_CPU_DEVICES="1"))
  deadline = time.time() + 300
  while not marker.exists():
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "the save of step 4 never started"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  leftovers = sorted(p.name for p in (wd / "checkpoints").iterdir())
  assert leftovers[0] == "2" and any("tmp" in n for n in leftovers), leftovers

  c = config("vae", "train.num_steps=6")
  resumed = train(c, wd, progress=False)
  full = train(c, tmp_path / "full", progress=False)
  for x, y in zip(jax.tree.leaves(params_of(resumed)), jax.tree.leaves(params_of(full))):
    np.testing.assert_array_equal(x, y)


def test_two_processes_train_like_one(tmp_path):
  """Two processes (jax.distributed over gloo), each reading its half of every global batch,
  reach the parameters of a single-process run; their checkpoint restores in one process."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  wd = tmp_path / "multi"
  env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
  procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multihost_worker.py"), str(i),
                             port, str(wd), str(tmp_path / f"p{i}.npz")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-3000:]
  single = train(config("vae", "train.num_steps=4", "train.sample_every=0"), tmp_path / "one",
                 progress=False)
  parts = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
  for i, leaf in enumerate(jax.tree.leaves(params_of(single.params))):
    np.testing.assert_array_equal(parts[0][f"arr_{i}"], parts[1][f"arr_{i}"])
    np.testing.assert_allclose(parts[0][f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
  from jaxgen.app import restore_run
  assert restore_run(wd).step == 4


def test_fsdp_and_gradient_accumulation_match_plain_data_parallel(tmp_path):
  """On 8 devices: parameters and optimizer state sharded over the devices (FSDP), and
  gradients accumulated over 2 micro-batches, give the losses and parameters of plain data
  parallelism on one device (the deterministic autoencoder: no sampling noise per example)."""
  code = textwrap.dedent(f"""
      import json
      import sys; sys.path.insert(0, "tests")
      import jax, numpy as np
      from jaxgen import runtime
      runtime.enable_compilation_cache()
      from helpers import config, params_of
      from jaxgen.app import train
      from jaxgen.train import make_mesh
      base = ["train.num_steps=4", "train.sample_every=0", "train.log_every=1",
              "data.batch_size=16", "model.ch=16", "model.groups=8"]
      runs = {{"one": (base, make_mesh(jax.devices()[:1])),
               "fsdp": (base + ["train.fsdp=true"], make_mesh()),
               "accum": (base + ["optim.grad_accum_steps=2"], make_mesh())}}
      out = {{}}
      for name, (over, mesh) in runs.items():
        s = train(config("ae", *over), f"{tmp_path}/{{name}}", progress=False, mesh=mesh)
        losses = [json.loads(l)["loss"] for l in open(f"{tmp_path}/{{name}}/metrics.jsonl")]
        out[name] = (params_of(s.params), losses, s)
      sharded = [x for x in jax.tree.leaves(out["fsdp"][2].params)
                 if x.sharding.spec != jax.sharding.PartitionSpec()]
      assert sharded, "FSDP sharded nothing"
      big = max(sharded, key=lambda x: x.size)
      assert big.addressable_shards[0].data.size * 8 == big.size, big.sharding
      for name in ("fsdp", "accum"):
        np.testing.assert_allclose(out[name][1], out["one"][1], rtol=2e-5)
        for x, y in zip(jax.tree.leaves(out[name][0]), jax.tree.leaves(out["one"][0])):
          np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)
        print(name, "losses", out[name][1])
      print("OK")
  """)
  r = run_python(code, devices=8)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_dit_trains_with_fsdp_on_8_devices(tmp_path):
  """The DiT's parameters shard over 8 devices (FSDP) and its flow-matching losses equal those
  of one device."""
  code = textwrap.dedent(f"""
      import json
      import sys; sys.path.insert(0, "tests")
      import jax, numpy as np
      from jaxgen import runtime
      runtime.enable_compilation_cache()
      from helpers import config
      from jaxgen.app import train
      from jaxgen.train import make_mesh
      base = ["train.num_steps=3", "train.sample_every=0", "train.log_every=1",
              "data.batch_size=16", "model.hidden_size=64", "model.heads=4"]
      losses = {{}}
      for name, over, mesh in (("one", base, make_mesh(jax.devices()[:1])),
                               ("fsdp", base + ["train.fsdp=true"], make_mesh())):
        s = train(config("dit", *over), f"{tmp_path}/{{name}}", progress=False, mesh=mesh)
        losses[name] = [json.loads(l)["loss"] for l in open(f"{tmp_path}/{{name}}/metrics.jsonl")]
        if name == "fsdp":
          sharded = [x for x in jax.tree.leaves(s.params)
                     if x.sharding.spec != jax.sharding.PartitionSpec()]
          assert sharded, "FSDP sharded nothing"
      np.testing.assert_allclose(losses["fsdp"], losses["one"], rtol=1e-4)
      print("OK", losses)
  """)
  r = run_python(code, devices=8)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
