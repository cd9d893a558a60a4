"""diffusers -> jaxgen: parity with the PyTorch models on small random ones, and error cases."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert import diffusers as conv
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.models import unet as unet_lib
from jaxgen.models.autoencoder import Autoencoder
from jaxgen.models.unet import UNet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

log = logging.getLogger(__name__)


def randomized(model, seed=0):
  """Perturb every parameter so that norm scales are not 1 and biases are not 0."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def config_of(model):
  return json.loads(model.to_json_string())


def assert_close(name, out, ref):
  err = float(np.max(np.abs(out - ref)))
  scale = max(1.0, float(np.max(np.abs(ref))))
  log.info("%s: max |jax - torch| = %.2e, output scale %.2f", name, err, scale)
  assert err <= 1e-4 * scale, f"{name}: max error {err:.3g} at output scale {scale:.3g}"


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def run_unet(model, kwargs, *, labels=None, context=None, added=None, seed=0):
  module, variables = conv.from_diffusers(config_of(model), state_dict(model))
  rng = np.random.RandomState(seed)
  x = rng.randn(2, model.config.in_channels, 16, 16).astype(np.float32)
  t = np.array([3, 741])
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), **kwargs).sample.numpy()
  jax_kwargs = {}
  if labels is not None:
    jax_kwargs["labels"] = labels
  if context is not None:
    jax_kwargs["context"] = context
  if added is not None:
    jax_kwargs["added"] = added
  out = jax.jit(module.apply)(variables, nhwc(x), t, **jax_kwargs)
  return module, variables, nchw(out), ref


@pytest.mark.parametrize("classes", [False, True])
def test_unet2d_matches_diffusers(classes):
  torch.manual_seed(0)
  model = randomized(diffusers.UNet2DModel(
      sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
      freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
      # DDPM's layout: one head over all channels; with classes, 16-channel heads.
      attention_head_dim=16 if classes else None, num_class_embeds=5 if classes else None))
  labels = np.array([4, 1]) if classes else None
  kwargs = {"class_labels": torch.from_numpy(labels)} if classes else {}
  module, variables, out, ref = run_unet(model, kwargs, labels=labels)
  assert module.attn_levels == (False, True) and module.asymmetric_downsample
  assert module.heads_per_level() == ((2, 4) if classes else (1, 1))
  assert_close(f"UNet2DModel classes={classes}", out, ref)


@pytest.mark.parametrize("sd2", [False, True])
def test_unet2d_condition_matches_diffusers(sd2):
  torch.manual_seed(0)
  # SD1: conv proj_in/out, 2 heads everywhere; SD2: linear projections, heads per level
  # (diffusers reads attention_head_dim as a number of heads here), two transformer layers.
  model = randomized(diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
      cross_attention_dim=24, attention_head_dim=(2, 4) if sd2 else 2,
      use_linear_projection=sd2, transformer_layers_per_block=2 if sd2 else 1))
  ctx = np.random.RandomState(1).randn(2, 7, 24).astype(np.float32)
  module, variables, out, ref = run_unet(
      model, {"encoder_hidden_states": torch.from_numpy(ctx)}, context=ctx)
  assert module.heads_per_level() == ((2, 4) if sd2 else (2, 2))
  blocks = variables["params"]["mid_attn_0"]
  assert blocks["proj_in"]["kernel"].ndim == (2 if sd2 else 4)
  assert ("transformer_blocks_1" in blocks) == sd2
  assert_close(f"UNet2DConditionModel sd2={sd2}", out, ref)


def test_sdxl_unet_with_added_conditioning_matches_diffusers():
  """SDXL's layout: no attention on the first level, transformer depth per level (1, 3; the
  middle takes the last), linear projections, and the added conditioning (pooled text +
  six micro-conditioning ids, each embedded sinusoidally, through an MLP onto the time
  embedding)."""
  torch.manual_seed(0)
  model = randomized(diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
      cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
      transformer_layers_per_block=(1, 3), addition_embed_type="text_time",
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8))
  rng = np.random.RandomState(2)
  ctx = rng.randn(2, 7, 24).astype(np.float32)
  pooled = rng.randn(2, 12).astype(np.float32)
  time_ids = np.array([[32, 48, 0, 4, 16, 16], [16, 16, 2, 0, 16, 16]], np.float32)
  module, variables, out, ref = run_unet(
      model, {"encoder_hidden_states": torch.from_numpy(ctx),
              "added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled),
                                    "time_ids": torch.from_numpy(time_ids)}},
      context=ctx, added={"text_embeds": pooled, "time_ids": time_ids})
  assert module.addition_time_embed_dim == 8 and module.addition_embed_dim == 60
  assert "transformer_blocks_2" in variables["params"]["mid_attn_0"]
  assert_close("UNet2DConditionModel sdxl", out, ref)
  other = jax.jit(module.apply)(variables, np.zeros((2, 16, 16, 4), np.float32),
                                np.array([3, 741]), context=ctx,
                                added={"text_embeds": pooled, "time_ids": time_ids[::-1]})
  assert not np.allclose(other, module.apply(variables, np.zeros((2, 16, 16, 4), np.float32),
                                             np.array([3, 741]), context=ctx,
                                             added={"text_embeds": pooled,
                                                    "time_ids": time_ids}))
  with pytest.raises(ConfigError, match="added conditioning"):
    module.apply(variables, np.zeros((2, 16, 16, 4), np.float32), np.array([3, 741]),
                 context=ctx)


def small_vae():
  torch.manual_seed(0)
  return randomized(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
      layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16))


def check_vae(model, module, variables):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 3, 16, 16).astype(np.float32)
  z = rng.randn(2, 4, 8, 8).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(x)).latent_dist
    ref_mean, ref_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
    ref_dec = model.decode(torch.from_numpy(z)).sample.numpy()
  mean, logvar = jax.jit(lambda v, x: module.apply(v, x, method=Autoencoder.encode))(
      variables, nhwc(x))
  dec = jax.jit(lambda v, z: module.apply(v, z, method=Autoencoder.decode))(variables, nhwc(z))
  assert_close("AutoencoderKL mean", nchw(mean), ref_mean)
  assert_close("AutoencoderKL logvar", nchw(logvar), ref_logvar)
  assert_close("AutoencoderKL decode", nchw(dec), ref_dec)


def test_autoencoder_kl_matches_diffusers_from_a_saved_folder(tmp_path):
  from safetensors.numpy import load_file
  model = small_vae()
  model.save_pretrained(tmp_path / "vae", safe_serialization=True)
  file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
  ours, reference = conv.read_safetensors(file), load_file(str(file))
  assert ours.keys() == reference.keys()
  assert all(np.array_equal(ours[k], reference[k]) for k in ours)
  module, variables = conv.load_diffusers_component(tmp_path / "vae")
  assert isinstance(module, Autoencoder) and module.ch_mult == (1, 2) and module.groups == 8
  assert conv.read_diffusers_config(tmp_path / "vae")["scaling_factor"] == 0.18215
  check_vae(model, module, variables)


def test_bfloat16_and_fp16_variant_files(tmp_path):
  from safetensors.torch import save_file
  a = torch.randn(3, 5).to(torch.bfloat16)
  save_file({"a": a, "b": torch.arange(4, dtype=torch.int64)}, str(tmp_path / "t.safetensors"))
  read = conv.read_safetensors(tmp_path / "t.safetensors")
  np.testing.assert_array_equal(read["a"].astype(np.float32), a.float().numpy())
  np.testing.assert_array_equal(read["b"], np.arange(4))
  model = small_vae()
  model.to(torch.float16).save_pretrained(tmp_path / "vae", variant="fp16")
  _, variables = conv.load_diffusers_component(tmp_path / "vae", variant="fp16")
  kernel = variables["params"]["encoder"]["conv_in"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, model.encoder.conv_in.weight.detach().float().numpy().transpose(2, 3, 1, 0))


def unet_parts():
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(
      sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)
  return config_of(model), state_dict(model)


def test_weight_mismatches_are_named():
  config, sd = unet_parts()
  missing = dict(sd)
  del missing["mid_block.attentions.0.to_k.bias"]
  with pytest.raises(CheckpointError, match=r"1 parameters have no tensor: "
                                            r"mid_block\.attentions\.0\.to_k\.bias"):
    conv.from_diffusers(config, missing)
  extra = dict(sd, **{"up_blocks.0.attentions.0.extra.weight": np.zeros(3)})
  with pytest.raises(CheckpointError, match=r"not used by the model: "
                                            r"up_blocks\.0\.attentions\.0\.extra\.weight"):
    conv.from_diffusers(config, extra)
  bad = dict(sd, **{"conv_in.weight": np.zeros((8, 4, 3, 3), np.float32)})
  with pytest.raises(CheckpointError, match=r"wrong shape: conv_in\.weight \[8, 4, 3, 3\] -> "
                                            r"conv_in/kernel \[3, 3, 3, 8\]"):
    conv.from_diffusers(config, bad)
  with pytest.raises(ConfigError, match=r"resnet_time_scale_shift='scale_shift' is not "
                                        r"supported"):
    conv.from_diffusers(dict(config, resnet_time_scale_shift="scale_shift"), sd)
  with pytest.raises(ConfigError, match=r"class 'VQModel' is not supported"):
    conv.from_diffusers(config, sd, kind="VQModel")


def test_legacy_attention_names_convert_alike():
  config, sd = unet_parts()
  legacy = {}
  for k, v in sd.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f".{new}.", f".{old}.")
    legacy[k] = v
  assert "mid_block.attentions.0.proj_attn.weight" in legacy
  _, a = conv.from_diffusers(config, sd)
  _, b = conv.from_diffusers(config, legacy)
  jax.tree.map(np.testing.assert_array_equal, a, b)


SD_COMMON = dict(
    in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=64)
FULL_SIZE = {
    # google/ddpm-cifar10-32/config.json
    "ddpm-cifar10": ("UNet2DModel", dict(
        act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
        center_input_sample=False, down_block_types=["DownBlock2D", "AttnDownBlock2D",
                                                     "DownBlock2D", "DownBlock2D"],
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3,
        layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
        out_channels=3, sample_size=32, time_embedding_type="positional",
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])),
    "sd-1.5": ("UNet2DConditionModel", dict(
        SD_COMMON, attention_head_dim=8, cross_attention_dim=768)),
    "sd-2.1": ("UNet2DConditionModel", dict(
        SD_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
        use_linear_projection=True, upcast_attention=True, sample_size=96)),
    # stabilityai/stable-diffusion-xl-base-1.0/unet/config.json
    "sdxl-base": ("UNet2DConditionModel", dict(
        SD_COMMON, addition_embed_type="text_time", addition_embed_type_num_heads=64,
        addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2816, sample_size=128,
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True)),
    "sd-vae": ("AutoencoderKL", dict(
        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
        norm_num_groups=32, sample_size=512)),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_configs_map_every_tensor(name):
  """Published configs: every diffusers tensor finds its parameter (shapes only, no memory)."""
  kind, config = FULL_SIZE[name]
  with torch.device("meta"):
    model = getattr(diffusers, kind)(**config)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  # Zero-stride arrays: the conversion checks and transposes them without allocating.
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  module, variables = conv.from_diffusers(config, fake, kind=kind)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
  assert n == sum(p.numel() for p in model.parameters())
  if name == "ddpm-cifar10":
    assert n == 35_746_307
  if name == "sdxl-base":  # SDXL's published 2.57B-parameter U-Net
    assert n == 2_567_463_684
    assert module == unet_lib.stable_diffusion_xl(null_label=False)
  if isinstance(module, UNet):
    assert module.dtype == jnp.float32
