import json
import textwrap

import pytest

from helpers import REPO, config
from jaxgen import app
from jaxgen import config as jc
from jaxgen.errors import ConfigError


def test_smoke_config_loads_with_overrides_coerced():
  c = config("vae", "optim.lr=1", "model.ch_mult=1,2,2", "data.shuffle=false",
             "train.num_steps=1e2")
  assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
  assert c.model.ch_mult == (1, 2, 2)
  assert c.data.shuffle is False
  assert c.train.num_steps == 100 and isinstance(c.train.num_steps, int)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
    ("optimizer.lr=1e-3", "Unknown config key 'optimizer.lr'. Did you mean 'optim.lr'?"),
    ("train.num_steps=abc", "Config key 'train.num_steps' expects int, got 'abc'"),
    ("train.num_steps=2.5", "expects int, got 2.5"),
    ("data.shuffle=3", "expects a bool"),
    ("optim.name=rmsprop", "optim.name must be adamw, adam, sgd or lars"),
    ("model.groups=3", "model.groups=3 must divide every level's channels"),
    ("data.image_size=27", "must be divisible by the downsampling factor"),
    ("optim.lr", "must have the form key=value"),
    ("optim=3", "is a section"),
])
def test_bad_override_is_a_clear_error(override, message):
  with pytest.raises(ConfigError) as e:
    config("vae", override)
  assert message in str(e.value)


def test_unknown_config_argument():
  with pytest.raises(ConfigError, match=r"Unknown config argument\(s\) \['smok'\]"):
    config("vae", arg="smok")


def test_typo_inside_a_config_file(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text(textwrap.dedent("""
      from jaxgen import app
      def get_config(arg=None):
        c = app.base_config("vae")
        c.optim.lrr = 1e-3
        return c
  """))
  with pytest.raises(ConfigError, match="lrr"):
    app.load_config(str(path))


def test_missing_file_and_unknown_task(tmp_path):
  with pytest.raises(ConfigError, match="Config file not found"):
    app.load_config(str(tmp_path / "nope.py"))
  with pytest.raises(ConfigError, match="Unknown task 'gan'"):
    app.base_config("gan")


def test_json_round_trip_keeps_types():
  c = config("vae", "model.ch_mult=1,2")
  d = json.loads(jc.to_json(c))
  back = app.config_from_dict(d)
  assert back.model.ch_mult == (1, 2)
  assert back.to_dict() == c.to_dict()


def test_every_config_file_and_its_smoke_variant_load():
  files = sorted((REPO / "configs").glob("*.py"))
  assert files
  for f in files:
    if f.name == "lora.py":  # adapts an existing run (loaded on one in tests/convert/test_lora)
      with pytest.raises(ConfigError, match="lora.base: .* is not a jaxgen run"):
        app.load_config(f"{f}:smoke,base=/nonexistent/run")
      continue
    app.load_config(str(f))
    app.load_config(f"{f}:smoke")


def test_ldm_default_recipe_and_the_earlier_one():
  """configs/ldm.py trains with flow matching at uniform times and a position embedding in the
  U-Net's attention (the recipe that draws the prompt's relation); ':eps' is the earlier one."""
  c = app.load_config(f"{REPO}/configs/ldm.py:smoke")
  assert (c.diffusion.objective, c.diffusion.flow_time, c.diffusion.sampler) == (
      "flow", "uniform", "euler")
  assert c.model.unet.position_embedding
  e = app.load_config(f"{REPO}/configs/ldm.py:smoke,eps")
  assert (e.diffusion.objective, e.diffusion.prediction, e.diffusion.sampler) == (
      "diffusion", "eps", "ddim")
  assert not e.model.unet.position_embedding
