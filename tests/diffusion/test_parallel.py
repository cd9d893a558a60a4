"""The sampler on 8 simulated devices: jit with sharded outputs, and pmap, match one device."""
import textwrap

import pytest

from helpers import run_python

pytestmark = pytest.mark.slow


def test_sampler_sharded_and_pmapped_over_eight_devices_matches_one_device():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jaxgen import diffusion as d, runtime
      from jaxgen.train import make_mesh
      from tests.diffusion.gaussian import exact_denoiser
      runtime.enable_compilation_cache()
      assert len(jax.devices()) == 8
      sched = d.make_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)
      labels = jnp.arange(16) % 3
      emb = jnp.array([[1.0, -1.0], [3.0, 0.5], [0.0, 0.0]])
      def model_fn(x, t, labels):
        return exact_denoiser(sched, 0.0, 0.5)(x - emb[labels], t)
      def run(key, scale):
        den = d.guided_denoiser(model_fn, labels, jnp.array(2), scale)
        return d.sample(den, sched, key, (16, 2), sampler="ddpm", num_steps=20)
      key = jax.random.key(0)
      mesh = make_mesh()
      sharded = jax.jit(run, out_shardings=NamedSharding(mesh, P("data")))(key, 2.0)
      assert len(sharded.sharding.device_set) == 8, sharded.sharding
      single = jax.jit(run)(key, 2.0)
      assert len(single.sharding.device_set) == 1
      np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)

      one = lambda key: d.sample(exact_denoiser(sched, 0.0, 0.5), sched, key, (2, 2),
                                 sampler="dpmpp_2m", num_steps=10)
      keys = jax.random.split(key, 8)
      mapped = jax.pmap(one)(keys)
      assert mapped.shape == (8, 2, 2) and len(mapped.sharding.device_set) == 8
      separate = np.stack([jax.jit(one)(k) for k in keys])
      np.testing.assert_allclose(mapped, separate, rtol=1e-5, atol=1e-6)
      assert np.unique(np.round(np.asarray(mapped), 4), axis=0).shape[0] == 8
      print("OK")
  """)
  r = run_python(code, devices=8)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
