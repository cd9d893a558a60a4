"""Writes notebooks/*.ipynb from the cell sources below (outputs empty), so they diff cleanly."""
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

SETUP = '''\
import os, pathlib
import jax
from IPython.display import display
from PIL import Image
from jaxgen import config, images, runtime, train
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
    train.train(config.load_config(f"{REPO}/configs/vae.py:smoke"), WORKDIR, progress=False)
run = train.restore_run(WORKDIR)
params, task = run.state.ema_params, run.task
print(f"step {run.step}, latent shape {task.model.latent_shape}")'''),
    new_markdown_cell("Held-out images (top) and their reconstructions (bottom):"),
    new_code_cell('''\
from jaxgen.pipelines import autoencoder as ae
x = task.eval_images(12)
show(images.rows(x, ae.reconstruct(task.model, params, x), scale=2))'''),
    new_markdown_cell("Decoded draws from the N(0, I) prior:"),
    new_code_cell('''\
show(images.grid(ae.sample_prior(task.model, params, jax.random.PRNGKey(0), 36), scale=2))'''),
    new_markdown_cell("Between two held-out images: linear (top) and spherical (bottom) "
                      "interpolation of the latent means, framed by the originals:"),
    new_code_cell("show(task.interpolation_strip(params, x[0], x[1], num=8))"),
    new_markdown_cell("Held-out reconstruction PSNR/SSIM and negative ELBO (nats per image):"),
    new_code_cell("task.evaluate(params, {}, jax.random.PRNGKey(0), limit=256)"),
]


def main():
  NOTEBOOKS.mkdir(exist_ok=True)
  for name, cells in {"vae": VAE}.items():
    nb = new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")


if __name__ == "__main__":
  main()
