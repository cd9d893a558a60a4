"""LoRA files both ways against diffusers (with PEFT) on a small random SD pipeline: PEFT-layout
LoRAs written by diffusers and kohya-layout LoRAs read by diffusers give the same U-Net and text
encoder outputs in jaxgen, several at once with scales; adapters jaxgen writes load in
diffusers' load_lora_weights."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import check_zeros_for_pretrained
from jaxgen import lora
from jaxgen.app import restore_run
from jaxgen.cli import main
from jaxgen.convert import lora as lora_io
from jaxgen.errors import CheckpointError
from tests.convert.test_stable_diffusion import PROMPT, err, nhwc, tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")
log = logging.getLogger(__name__)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1"]


@pytest.fixture(autouse=True)
def _peft_on_transformers(monkeypatch):
  """transformers 5.25 asks for peft >= 0.22 to put adapters on its models; the newest peft on
  PyPI here is 0.21.2, whose LoRA layers it drives just the same (checked by these tests)."""
  import transformers.integrations.peft as tpeft
  monkeypatch.setattr(tpeft, "check_peft_version", lambda *a, **k: None)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  pipe = tiny_pipeline(root, False)
  main(["import", "--diffusers", str(root / "sd"), "--workdir", str(root / "run")])
  return root, pipe, restore_run(root / "run")


def outputs_torch(pipe, z, t, ids):
  with torch.no_grad():
    ctx = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state
    out = pipe.unet(torch.from_numpy(z), t, encoder_hidden_states=ctx).sample
  return ctx.numpy(), nhwc(out.numpy())


def outputs_jaxgen(model, params, z, t, ids):
  ctx = model.encode_text(params, ids)
  out = model.denoise_fn(params)(nhwc(z), jnp.full((z.shape[0],), t), ctx)
  return np.asarray(ctx), np.asarray(out)


def _inputs(model):
  z = np.random.RandomState(1).randn(2, 4, 8, 8).astype(np.float32)
  ids = np.asarray(model.tokenize([PROMPT, "a dog"])["input_ids"])
  return z, 300, ids


def add_random_peft(pipe, name, seed, r=4, alpha=8):
  torch.manual_seed(seed)
  pipe.unet.add_adapter(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=UNET_TARGETS,
                                        init_lora_weights=False), adapter_name=name)
  pipe.text_encoder.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj", "fc1"]),
                                adapter_name=name)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_from_diffusers_and_two_at_once(sd, tmp_path):
  root, pipe, run = sd
  model = run.task.model
  z, t, ids = _inputs(model)
  base = outputs_torch(pipe, z, t, ids)
  from peft.utils import get_peft_model_state_dict
  files = {}
  for name, seed in (("one", 1), ("two", 2)):
    add_random_peft(pipe, name, seed)
    files[name] = tmp_path / f"{name}.safetensors"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / name, weight_name="lora.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=name),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name=name),
        unet_lora_adapter_metadata=pipe.unet.peft_config[name].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config[name].to_dict())
    files[name] = tmp_path / name / "lora.safetensors"
  try:
    adapters = {n: lora_io.read_lora(f, run.params) for n, f in files.items()}
    for names, weights in ((["one"], [1.0]), (["one", "two"], [1.0, 0.5])):
      pipe.unet.set_adapters(names, weights)
      from diffusers.loaders.lora_base import set_adapters_for_text_encoder
      set_adapters_for_text_encoder(names, pipe.text_encoder, weights)
      ref = outputs_torch(pipe, z, t, ids)
      merged = jax.jit(lora.merge)(run.params, [adapters[n] for n in names], weights)
      ours = outputs_jaxgen(model, merged, z, t, ids)
      e_text, e_unet = err(ours[0], ref[0]), err(ours[1], ref[1])
      log.info("PEFT LoRA %s: max |jaxgen - diffusers| text %.2e, U-Net %.2e (change %.2e)",
               "+".join(names), e_text, e_unet, err(ref[1], base[1]))
      assert e_text <= 1e-4 and e_unet <= 1e-4
      assert err(ref[1], base[1]) > 1e-2  # the LoRA changed the output
  finally:
    pipe.unet.delete_adapters(["one", "two"])
    for name in ("one", "two"):
      pipe.text_encoder.delete_adapter(name)
  assert err(outputs_torch(pipe, z, t, ids)[1], base[1]) == 0


def kohya_file(pipe, path, seed):
  """A random LoRA in kohya's layout (lora_unet_/lora_te_ names, lora_down/lora_up, alpha) for
  the attention and feed-forward layers of the U-Net and the text encoder's attention."""
  g = torch.Generator().manual_seed(seed)
  out = {}
  for prefix, module, keep in (
      ("lora_unet_", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")),
      ("lora_te_", pipe.text_encoder, ("q_proj", "k_proj", "out_proj"))):
    for name, m in module.named_modules():
      if isinstance(m, torch.nn.Linear) and name.endswith(keep):
        key = prefix + (name if prefix == "lora_unet_" or name.startswith("text_model.")
                        else "text_model." + name).replace(".", "_")
        r = 2
        out[key + ".lora_down.weight"] = 0.3 * torch.randn(r, m.in_features, generator=g)
        out[key + ".lora_up.weight"] = 0.3 * torch.randn(m.out_features, r, generator=g)
        out[key + ".alpha"] = torch.tensor(1.0)
  safetensors_torch.save_file(out, str(path))
  return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kohya_lora_as_diffusers_reads_it(sd, tmp_path):
  root, pipe, run = sd
  model = run.task.model
  z, t, ids = _inputs(model)
  path = kohya_file(pipe, tmp_path / "kohya.safetensors", 3)
  ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd",
                                                               safety_checker=None)
  ref_pipe.load_lora_weights(str(path), adapter_name="k")
  ref = outputs_torch(ref_pipe, z, t, ids)
  adapters = lora_io.read_lora(path, run.params)
  ours = outputs_jaxgen(model, lora.merge(run.params, adapters), z, t, ids)
  e_text, e_unet = err(ours[0], ref[0]), err(ours[1], ref[1])
  log.info("kohya LoRA: max |jaxgen - diffusers| text %.2e, U-Net %.2e", e_text, e_unet)
  assert e_text <= 1e-4 and e_unet <= 1e-4
  assert err(ref[1], outputs_torch(pipe, z, t, ids)[1]) > 1e-2


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jaxgen_lora_loads_in_diffusers(sd, tmp_path):
  root, pipe, run = sd
  model = run.task.model
  z, t, ids = _inputs(model)
  targets = lora.targets(run.params, r"unet/.*(attn[12]/(to_q|to_v)|proj_in|conv1)/kernel$|"
                                     r"text/.*self_attn/(q_proj|v_proj)/kernel$")
  adapters = lora.init(jax.random.PRNGKey(0), run.params, targets, rank=4)
  adapters = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                          adapters)  # B = 0 would make a no-op LoRA
  path = lora_io.write_peft_lora(tmp_path / "ours.safetensors", adapters, run.params, alpha=2.0)
  ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd",
                                                               safety_checker=None)
  ref_pipe.load_lora_weights(str(path), adapter_name="ours")
  ref = outputs_torch(ref_pipe, z, t, ids)
  ours = outputs_jaxgen(model, lora.merge(run.params, adapters, [2.0 / 4]), z, t, ids)
  e_text, e_unet = err(ours[0], ref[0]), err(ours[1], ref[1])
  log.info("jaxgen LoRA in diffusers: max |jaxgen - diffusers| text %.2e, U-Net %.2e",
           e_text, e_unet)
  assert e_text <= 1e-4 and e_unet <= 1e-4
  # and it reads back as it was written
  back = lora_io.read_lora(path, run.params)
  assert set(back) == set(adapters)
  for k in adapters:
    np.testing.assert_allclose(lora.delta(back[k]), lora.delta(adapters[k]) * 0.5, rtol=1e-5,
                               atol=1e-6)


def test_lora_for_another_model_is_refused(sd, tmp_path):
  root, pipe, run = sd
  bad = tmp_path / "bad.safetensors"
  safetensors_torch.save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight":
                               torch.zeros(2, 4)}, str(bad))
  with pytest.raises(CheckpointError, match="of no supported layout or of no layer"):
    lora_io.read_lora(bad, run.params)
  peft_bad = tmp_path / "peft_bad.safetensors"
  safetensors_torch.save_file({"unet.down_blocks.7.proj_in.lora_A.weight": torch.zeros(2, 4),
                               "unet.down_blocks.7.proj_in.lora_B.weight": torch.zeros(4, 2)},
                              str(peft_bad))
  with pytest.raises(CheckpointError, match="not layers of this model"):
    lora_io.read_lora(peft_bad, run.params)
  with pytest.raises(CheckpointError, match=".safetensors files only"):
    lora_io.read_lora(tmp_path / "x.ckpt", run.params)


def test_generate_with_loras_from_the_command_line(sd, tmp_path, capsys):
  from jaxgen.commands import parse_lora
  root, pipe, run = sd
  assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
  assert parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
  assert parse_lora("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
  path = kohya_file(pipe, tmp_path / "k.safetensors", 4)
  outs = {}
  for name, extra in (("plain", []), ("lora", ["--lora", f"{path}:0.7", "--lora", str(path)])):
    outs[name] = tmp_path / f"{name}.png"
    main(["generate", "--workdir", str(root / "run"), "--prompt", PROMPT, "--steps", "2",
          "--num", "1", "--out", str(outs[name]), *extra])
    assert capsys.readouterr().out.strip() == str(outs[name])
  assert outs["plain"].read_bytes() != outs["lora"].read_bytes()
  with pytest.raises(SystemExit) as e:
    main(["generate", "--workdir", str(root / "run"), "--prompt", PROMPT, "--steps", "2",
          "--lora", f"{path}:strong"])
  assert e.value.code == 2 and "SCALE after the last ':' must be a number" in (
      capsys.readouterr().err)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_training_through_the_loop_and_into_diffusers(sd, tmp_path, capsys):
  """configs/lora.py on the imported run and a handful of captioned images: only the adapters
  train (parameters and optimizer state), the base is untouched, the loss on those images goes
  down, and the exported file gives diffusers the same U-Net as the jaxgen run."""
  import pathlib

  from PIL import Image

  from jaxgen import app
  root, pipe, run = sd
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.RandomState(0)
  for i in range(8):
    px = np.zeros((16, 16, 3), np.uint8)
    px[:, :, i % 3] = 200  # a plain colour with a little noise: an easy target
    px = np.clip(px + rng.randint(0, 30, px.shape), 0, 255).astype(np.uint8)
    Image.fromarray(px).save(folder / f"img{i}.png")
    (folder / f"img{i}.txt").write_text(["a red photo", "a green photo", "a blue photo"][i % 3])
  cfg_file = pathlib.Path(__file__).resolve().parents[2] / "configs" / "lora.py"
  config = app.load_config(f"{cfg_file}:smoke,steps=40,base={root / 'run'},images={folder}",
                           ["optim.lr=3e-3", "train.ckpt_every=40"])
  task = app.build_task(config)
  wd = tmp_path / "lora_run"
  batch = task.preprocess(next(iter([{
      "image": np.stack([np.asarray(Image.open(folder / f"img{i}.png")) for i in range(6)]),
      "caption": np.array([(folder / f"img{i}.txt").read_text() for i in range(6)]),
      "label": np.zeros(6, np.int32), "index": np.arange(6, dtype=np.int32)}])))

  def mean_loss(adapters, model_state):
    keys = jax.random.split(jax.random.PRNGKey(5), 24)
    f = jax.jit(lambda k: task.loss_fn(adapters, model_state, batch, k)[0])
    return float(np.mean([f(k) for k in keys]))

  check_zeros_for_pretrained(task)  # the loop's init leaves the base, which is loaded, at zero
  example = task.example_batch()
  params0, state0 = task.pretrained(*jax.jit(
      lambda k: task.zeros_for_pretrained(*task.init(k, example)))(jax.random.PRNGKey(0)))
  before = mean_loss(params0, state0)
  state = app.train(config, wd, progress=False)
  after = mean_loss(state.params, state.model_state)
  n_adapters = lora.num_params(state.params)
  n_opt = sum(a.size for a in jax.tree.leaves(state.opt_state) if jnp.ndim(a) > 0)
  n_base = sum(a.size for a in jax.tree.leaves(run.params))
  log.info("LoRA training: %d trainable parameters (%.2f%% of %d), optimizer state %d numbers; "
           "loss on the images %.4f -> %.4f", n_adapters, 100 * n_adapters / n_base, n_base,
           n_opt, before, after)
  assert set(state.params) == set(lora.targets(run.params, r"(to_q|to_k|to_v|to_out)/kernel$"))
  assert n_opt == 2 * n_adapters  # Adam's two moments, of the adapters only
  for a, b in zip(jax.tree.leaves(state.model_state["base"]), jax.tree.leaves(run.params)):
    np.testing.assert_array_equal(a, b)  # the base stays frozen
  assert after < before

  # the restored run samples with the merged weights; the exported file loads in diffusers
  lora_run = restore_run(wd)
  z, t, ids = _inputs(run.task.model)
  ours = outputs_jaxgen(run.task.model, lora_run.params, z, t, ids)
  ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "sd", safety_checker=None)
  ref_pipe.load_lora_weights(str(wd / app.LORA_FILE), adapter_name="trained")
  ref = outputs_torch(ref_pipe, z, t, ids)
  e = err(ours[1], ref[1])
  log.info("trained LoRA in diffusers: max |jaxgen - diffusers| U-Net %.2e (change %.2e)", e,
           err(ref[1], outputs_torch(pipe, z, t, ids)[1]))
  assert e <= 1e-4 and err(ours[0], ref[0]) <= 1e-5
  out = tmp_path / "gen.png"
  main(["generate", "--workdir", str(wd), "--prompt", "a red photo", "--steps", "2", "--num",
        "1", "--out", str(out)])
  assert capsys.readouterr().out.strip() == str(out)
