"""One process of a two-process (multi-host) training run on CPU, for test_parallel.py.

usage: python multihost_worker.py PROCESS_ID PORT WORKDIR OUT.npz
"""
import sys

import jax
import numpy as np

pid, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)

from helpers import config  # noqa: E402
from jaxgen import runtime  # noqa: E402
from jaxgen.app import train  # noqa: E402

runtime.setup_logging()
assert jax.process_count() == 2 and len(jax.devices()) == 2
state = train(config("vae", "train.num_steps=4", "train.sample_every=0"), workdir, progress=False)
local = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
np.savez(out, *local)
