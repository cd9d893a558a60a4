"""Training core: one TrainState, one train-step factory, one loop, the mesh and checkpoints."""
from jaxgen.train.loop import restore_state, train
from jaxgen.train.mesh import make_mesh, replicated
from jaxgen.train.optim import make_optimizer
from jaxgen.train.state import TrainState
from jaxgen.train.step import make_train_step

__all__ = ["TrainState", "make_mesh", "make_optimizer", "make_train_step", "replicated",
           "restore_state", "train"]
