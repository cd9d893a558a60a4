"""Writes notebooks/*.ipynb from the cell sources below (outputs empty), so they diff cleanly."""
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

SETUP = '''\
import os, pathlib
import jax
import numpy as np
from IPython.display import display
from PIL import Image
from jaxgen import app, images, runtime
runtime.enable_compilation_cache()
runtime.setup_logging()
REPO = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
show = lambda picture: display(Image.fromarray(images.to_uint8(picture).squeeze()))'''

VAE = [
    new_markdown_cell(
        "# VAE on the embedded Fashion-MNIST\n\n"
        "Loads the run that the README's first command trains (`runs/vae`), or trains the smoke "
        "config if there is none, then shows reconstructions, samples from the prior, an "
        "interpolation between two held-out images and the held-out metrics. Set "
        "`JAXGEN_WORKDIR` to use another run."),
    new_code_cell(SETUP),
    new_code_cell('''\
WORKDIR = pathlib.Path(os.environ.get("JAXGEN_WORKDIR", REPO / "runs" / "vae"))
if not (WORKDIR / "checkpoints").exists():
    app.train(app.load_config(f"{REPO}/configs/vae.py:smoke"), WORKDIR, progress=False)
run = app.restore_run(WORKDIR)
params, task = run.params, run.task
print(f"step {run.step}, latent shape {task.model.latent_shape}")'''),
    new_markdown_cell("Held-out images (top) and their reconstructions (bottom):"),
    new_code_cell('''\
from jaxgen.data import heldout_images
from jaxgen.pipelines import autoencoder as ae
x = heldout_images(run.config.data, 12)
show(images.rows(x, ae.reconstruct(task.model, params, x), scale=2))'''),
    new_markdown_cell("Decoded draws from the N(0, I) prior:"),
    new_code_cell('''\
show(images.grid(ae.sample_prior(task.model, params, jax.random.PRNGKey(0), 36), scale=2))'''),
    new_markdown_cell("Between two held-out images: linear (top) and spherical (bottom) "
                      "interpolation of the latent means, framed by the originals:"),
    new_code_cell("show(ae.interpolation_strip(task.model, params, x[0], x[1], num=8))"),
    new_markdown_cell("Held-out reconstruction PSNR/SSIM and negative ELBO (nats per image):"),
    new_code_cell("from jaxgen import commands\n"
                  "commands.evaluate_autoencoder(task, params, {}, jax.random.PRNGKey(0), "
                  "limit=256)"),
]


DDPM = [
    new_markdown_cell(
        "# Class-conditional DDPM on the embedded Fashion-MNIST (16x16)\n\n"
        "Loads `runs/ddpm_class` (see the README), or trains the smoke config if there is none "
        "(then the pictures are noise: the point is that every call runs). Shows each sampler, "
        "a guidance sweep with `vmap`, inpainting and an interpolation through DDIM inversion. "
        "Set `JAXGEN_WORKDIR` to use another run."),
    new_code_cell(SETUP),
    new_code_cell('''\
import jax.numpy as jnp
from jaxgen.pipelines import diffusion as dp
WORKDIR = pathlib.Path(os.environ.get("JAXGEN_WORKDIR", REPO / "runs" / "ddpm_class"))
if not (WORKDIR / "checkpoints").exists():
    app.train(app.load_config(f"{REPO}/configs/ddpm_class.py:smoke"), WORKDIR, progress=False)
run = app.restore_run(WORKDIR)
params, task = run.params, run.task
model, classes = task.model, run.config.model.num_classes
print(f"step {run.step}; {model.image_shape}; {classes} classes; T={model.num_timesteps}")'''),
    new_markdown_cell("One grid per sampler (one column per class, guidance 3). DDPM runs all "
                      "of the model's timesteps; DDIM and DPM-Solver++(2M) far fewer:"),
    new_code_cell('''\
labels = jnp.arange(20) % classes
key = jax.random.PRNGKey(0)
for sampler, steps in [("ddpm", model.num_timesteps), ("ddim", 50), ("dpmpp_2m", 20)]:
    x = dp.generate(model, params, key, num=20, labels=labels, guidance_scale=3.0,
                    sampler=sampler, num_steps=steps)
    print(sampler, steps, "steps")
    show(images.grid(x, ncols=classes, scale=3))'''),
    new_markdown_cell("Guidance sweep in one call: `vmap` over the scale (0 = conditional "
                      "model alone, then stronger guidance), one row per scale, class 7:"),
    new_code_cell('''\
scales = jnp.array([0.0, 1.0, 3.0, 6.0])
sweep = jax.vmap(lambda g: dp.generate(model, params, key, num=8, labels=jnp.full(8, 7),
                                       guidance_scale=g, num_steps=30))(scales)
show(images.rows(*sweep, scale=3))'''),
    new_markdown_cell("Inpainting: the left half of held-out images is kept, the right half "
                      "drawn (rows: original, masked, inpainted):"),
    new_code_cell('''\
from jaxgen.data import load_all, load_source
held_out = load_all(load_source(run.config.data, "test"), limit=8)
x0, y0 = held_out["image"], held_out["label"]
mask = np.zeros(x0.shape, np.float32)
mask[:, :, : x0.shape[2] // 2] = 1
filled = dp.inpaint(model, params, key, x0, mask, num=8, labels=jnp.asarray(y0),
                    guidance_scale=3.0, num_steps=50)
show(images.rows(x0 / 255, x0 / 255 * mask, filled, scale=3))'''),
    new_markdown_cell("Interpolation between two held-out images: deterministic DDIM inversion "
                      "of both, slerp between the inverted noises, DDIM decoding:"),
    new_code_cell('''\
path = dp.interpolate(model, params, x0[0], x0[1], num=8, num_steps=50)
show(images.grid(path, ncols=8, scale=3))'''),
]


CLIP = [
    new_markdown_cell(
        "# A CLIP-style dual encoder on captioned shapes\n\n"
        "Loads `runs/clip` (see the README), or trains the smoke config if there is none. Shows "
        "zero-shot predictions on held-out images, caption retrieval and the held-out metrics. "
        "Set `JAXGEN_WORKDIR` to use another run."),
    new_code_cell(SETUP),
    new_code_cell('''\
from jaxgen.data import load_all, load_source, shapes
from jaxgen.pipelines import clip as cp
WORKDIR = pathlib.Path(os.environ.get("JAXGEN_WORKDIR", REPO / "runs" / "clip"))
if not (WORKDIR / "checkpoints").exists():
    app.train(app.load_config(f"{REPO}/configs/clip.py:smoke"), WORKDIR, progress=False)
run = app.restore_run(WORKDIR)
model, params, state = run.task.model, run.params, run.model_state
held_out = load_all(load_source(run.config.data, "test"), limit=200)
show(images.grid(held_out["image"][:8], ncols=8, scale=3))'''),
    new_markdown_cell("Zero-shot shape and colour of the first object in each picture: each class "
                      "embedding is the mean of prompts over the other attributes (a prompt "
                      "ensemble), and the nearest class wins:"),
    new_code_cell('''\
img_emb = cp.embed_images(model, params, state, held_out["image"])
for attribute, names in [("shape", shapes.SHAPES), ("colour", shapes.COLOUR_NAMES)]:
    others = [(z, c) for z in shapes.SIZE_NAMES for c in shapes.COLOUR_NAMES] \\
        if attribute == "shape" else [(z, k) for z in shapes.SIZE_NAMES for k in shapes.SHAPES]
    prompts = [[f"a {z} {n} {o}" if attribute == "colour" else f"a {z} {o} {n}"
                for z, o in others] for n in names]
    classes = cp.zero_shot_classifier(model, params, prompts)
    pred = np.asarray(img_emb @ classes.T).argmax(1)
    truth = held_out[attribute]
    print(f"{attribute}: predicted {[names[i] for i in pred[:8]]}")
    print(f"{attribute}: accuracy {np.mean(np.array(names)[pred] == truth):.3f} "
          f"(chance {1 / len(names):.3f})")'''),
    new_markdown_cell("Retrieval: the best of all held-out captions for the first images:"),
    new_code_cell('''\
captions = sorted(set(held_out["caption"].tolist()))
txt_emb = cp.embed_texts(model, params, captions)
for i in range(6):
    best = np.argsort(-(txt_emb @ img_emb[i]))[:3]
    print(f"{held_out['caption'][i]!r:55} -> {[captions[j] for j in best]}")'''),
    new_code_cell("from jaxgen import commands\n"
                  "commands.evaluate_dual_encoder(run.task, params, state, limit=500)"),
]


TEXT_TO_IMAGE = [
    new_markdown_cell(
        "# Text to image with latent diffusion\n\n"
        "Loads `runs/ldm` (see the README: autoencoder, dual encoder, then the latent U-Net), "
        "or trains the three smoke configs if there is none (then the pictures are noise). "
        "Generates from prompts in one jitted call, sweeps the guidance scale, and edits an "
        "image (img2img). The last section shows how to run Stable Diffusion weights from a "
        "local folder; it is skipped unless `SD_PATH` points to one. Set `JAXGEN_WORKDIR` to "
        "use another run."),
    new_code_cell(SETUP),
    new_code_cell('''\
import jax.numpy as jnp
from jaxgen.pipelines import text_to_image as t2i
WORKDIR = pathlib.Path(os.environ.get("JAXGEN_WORKDIR", REPO / "runs" / "ldm"))
if not (WORKDIR / "checkpoints").exists():
    stages = WORKDIR.parent
    for name in ("ldm_autoencoder", "clip"):
        if not (stages / name / "checkpoints").exists():
            app.train(app.load_config(f"{REPO}/configs/{name}.py:smoke"), stages / name,
                        progress=False)
    spec = f"{REPO}/configs/ldm.py:smoke,ae={stages / 'ldm_autoencoder'},clip={stages / 'clip'}"
    app.train(app.load_config(spec), WORKDIR, progress=False)
run = app.restore_run(WORKDIR)
model, params, state = run.task.model, run.params, run.model_state
print(f"step {run.step}; images {model.image_shape}; latents {model.latent_shape}")'''),
    new_markdown_cell("Four seeds for each prompt (one row per prompt):"),
    new_code_cell('''\
prompts = ["a large red circle", "a small blue square left of a large yellow triangle",
           "a large green diamond above a small magenta circle"]
x = t2i.text_to_image(model, params, state, prompts, jax.random.PRNGKey(0), steps=50,
                      guidance_scale=4.0, num_per_prompt=4)
show(images.grid(x, ncols=4, scale=3))'''),
    new_markdown_cell("Guidance sweep for one prompt and seed (scales 1, 2, 4, 8): the prompt "
                      "tokens, the seed and the scale are traced, so these calls reuse one "
                      "compiled program:"),
    new_code_cell('''\
sweep = [t2i.text_to_image(model, params, state, ["a large cyan square"], jax.random.PRNGKey(1),
                           steps=50, guidance_scale=g)[0] for g in (1.0, 2.0, 4.0, 8.0)]
show(images.grid(np.stack(sweep), ncols=4, scale=3))'''),
    new_markdown_cell("img2img: held-out pictures (top) re-drawn towards a new prompt at "
                      "strength 0.6 (bottom):"),
    new_code_cell('''\
from jaxgen.data import load_all, load_source
src = load_all(load_source(run.config.data, "test"), limit=4)["image"]
edited = t2i.image_to_image(model, params, state, ["a large yellow circle"] * 4, src,
                            jax.random.PRNGKey(2), strength=0.6, steps=50)
show(images.rows(src / 255, edited, scale=3))'''),
    new_markdown_cell(
        "## Stable Diffusion weights from a local folder\n\n"
        "With a diffusers-layout checkpoint on disk (e.g. downloaded once with "
        "`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --exclude "
        "\"*.bin\" \"*.ckpt\" --local-dir sd15`), `jaxgen import` writes a jaxgen run and the "
        "same functions generate from it. Not run in CI: no weights can be fetched there."),
    new_code_cell('''\
SD_PATH = os.environ.get("SD_PATH")  # e.g. "sd15"
if SD_PATH and pathlib.Path(SD_PATH).exists():
    sd_dir = pathlib.Path("runs/sd15")
    if not (sd_dir / "checkpoints").exists():
        app.import_stable_diffusion(SD_PATH, sd_dir)
    sd = app.restore_run(sd_dir)
    x = t2i.text_to_image(sd.task.model, sd.params, sd.model_state,
                          ["a watercolour painting of a fox in the snow"], jax.random.PRNGKey(0),
                          steps=30, guidance_scale=7.5, decode_batch=1)
    show(x[0])
else:
    print("SD_PATH not set: skipping the Stable Diffusion section.")'''),
]


def main():
  NOTEBOOKS.mkdir(exist_ok=True)
  for name, cells in {"vae": VAE, "ddpm": DDPM, "clip": CLIP,
                      "text_to_image": TEXT_TO_IMAGE}.items():
    nb = new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")


if __name__ == "__main__":
  main()
