"""jaxgen: generative image modelling in JAX/Flax.

Models are flax.linen modules used as pure functions; every pillar trains through the one
loop in `jaxgen.train`. Import submodules directly (`from jaxgen import train`): nothing heavy
loads here.
"""
__version__ = "0.1.0"
